// A small fork-join thread pool for the kernels' row loops.
//
// MLX runs a stream's tasks one after another on one thread, so our kernels and the BLAS calls never
// overlap: the pool takes the cores while a kernel runs and leaves them to OpenBLAS in between. Workers
// spin briefly (yielding) after a job, then sleep on a condition variable, so an idle pool costs nothing.
// Chunks are claimed from a shared counter, the calling thread included: on a busy machine, where a
// worker may not get a core for milliseconds, the caller simply runs the chunks itself instead of
// waiting. The split into chunks is fixed by the sizes and the thread count (not by who runs which), so
// the results, reductions included (partial sums per chunk, added in chunk order), repeat exactly.
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
  // Run fn(chunk, begin, end) over [0, n) in `chunks` contiguous pieces, the calling thread included.
  void run(int chunks, size_t n, const std::function<void(int, size_t, size_t)>& fn);

 private:
  void worker();
  void work();
  int threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one job at a time (MLX may run several streams)
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> next_{0}, done_{0}, in_job_{0};
  bool stop_ = false, closed_ = true;
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

// The number of chunks parallel_rows uses for n rows of `cost` elements (for per-chunk partial sums):
// up to 4 per thread (load balance), none smaller than MIN_WORK elements (waking a thread costs more).
inline int row_chunks(size_t n, size_t cost) {
  constexpr size_t MIN_WORK = 1 << 14;
  int threads = pool().threads();
  if (threads <= 1) return 1;
  size_t total = n * std::max<size_t>(cost, 1);
  return std::max(1, (int)std::min<size_t>({(size_t)(4 * threads), total / MIN_WORK, n}));
}

// Split [0, n) rows over the pool when there is enough work (`cost` = work per row, in elements).
template <class F>
void parallel_rows(size_t n, size_t cost, F&& f) {
  Pool& p = pool();
  int chunks = row_chunks(n, cost);
  if (chunks <= 1) {
    f(0, (size_t)0, n);
    return;
  }
  std::function<void(int, size_t, size_t)> fn = [&](int c, size_t b, size_t e) { f(c, b, e); };
  p.run(chunks, n, fn);
}


}  // namespace twinlm
