// A small fork-join thread pool for the kernels' row loops.
//
// MLX runs a stream's tasks one after another on one thread, so our kernels and the BLAS calls never
// overlap: the pool takes the cores while a kernel runs and leaves them to OpenBLAS in between. Workers
// spin briefly (yielding) after a job, then sleep on a condition variable, so an idle pool costs nothing
// on a shared machine. Work is split into at most `threads` contiguous chunks in a fixed way, so the
// results (including reductions, summed chunk by chunk in order) are the same from run to run.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace twinlm {

class Pool {
 public:
  explicit Pool(int threads);
  ~Pool();
  int threads() const { return threads_; }
  // Run fn(chunk, begin, end) over [0, n) in `chunks` contiguous pieces (chunk 0 on the calling thread).
  void run(int chunks, size_t n, const std::function<void(int, size_t, size_t)>& fn);

 private:
  void worker(int index);
  int threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one job at a time (MLX may run several streams)
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  bool stop_ = false;
  const std::function<void(int, size_t, size_t)>* job_ = nullptr;
  int chunks_ = 0;
  size_t n_ = 0;
};

Pool& pool();
void set_threads(int threads);

inline void chunk_bounds(int chunk, int chunks, size_t n, size_t& begin, size_t& end) {
  begin = n * chunk / chunks;
  end = n * (chunk + 1) / chunks;
}

// Split [0, n) rows over the pool when there is enough work (`cost` = work per row, in elements).
template <class F>
void parallel_rows(size_t n, size_t cost, F&& f) {
  constexpr size_t MIN_WORK = 1 << 14;  // elements per chunk below which waking a thread costs more
  Pool& p = pool();
  size_t total = n * std::max<size_t>(cost, 1);
  int chunks = (int)std::min<size_t>({(size_t)p.threads(), total / MIN_WORK, n});
  if (chunks <= 1) {
    f(0, (size_t)0, n);
    return;
  }
  std::function<void(int, size_t, size_t)> fn = [&](int c, size_t b, size_t e) { f(c, b, e); };
  p.run(chunks, n, fn);
}

// The number of chunks parallel_rows would use (for per-chunk partial sums).
inline int row_chunks(size_t n, size_t cost) {
  constexpr size_t MIN_WORK = 1 << 14;
  size_t total = n * std::max<size_t>(cost, 1);
  return std::max(1, (int)std::min<size_t>({(size_t)pool().threads(), total / MIN_WORK, n}));
}

}  // namespace twinlm
