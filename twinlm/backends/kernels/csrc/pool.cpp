#include "pool.h"

#include <cstdlib>

namespace twinlm {

Pool::Pool(int threads) : threads_(std::max(1, threads)) {
  for (int i = 1; i < threads_; i++) workers_.emplace_back([this] { worker(); });
}

Pool::~Pool() {
  {
    std::lock_guard<std::mutex> lk(m_);
    stop_ = true;
    generation_++;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

// Claim chunks until none is left.
void Pool::work() {
  for (int c; (c = next_.fetch_add(1, std::memory_order_acq_rel)) < chunks_;) {
    size_t b, e;
    chunk_bounds(c, chunks_, n_, b, e);
    (*job_)(c, b, e);
    done_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void Pool::worker() {
  uint64_t seen = 0;
  for (;;) {
    // Spin (yielding) a little for the next job, then sleep.
    for (int i = 0; i < 2000 && generation_.load(std::memory_order_acquire) == seen; i++) {
      std::this_thread::yield();
    }
    bool join = false;
    {
      std::unique_lock<std::mutex> lk(m_);
      cv_.wait(lk, [&] { return stop_ || generation_.load() != seen; });
      if (stop_) return;
      seen = generation_.load();
      if (!closed_) {  // a worker that wakes after the job is finished stays out of it
        in_job_.fetch_add(1);
        join = true;
      }
    }
    if (join) {
      work();
      in_job_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
}

void Pool::run(int chunks, size_t n, const std::function<void(int, size_t, size_t)>& fn) {
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  {
    std::lock_guard<std::mutex> lk(m_);
    job_ = &fn;
    chunks_ = chunks;
    n_ = n;
    next_.store(0);
    done_.store(0);
    closed_ = false;
    generation_++;
  }
  cv_.notify_all();
  work();
  while (done_.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  {
    std::lock_guard<std::mutex> lk(m_);
    closed_ = true;
  }
  while (in_job_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

static int default_threads() {
  for (const char* var : {"TWINLM_KERNEL_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"}) {
    const char* v = std::getenv(var);
    if (v && std::atoi(v) > 0) return std::atoi(v);
  }
  unsigned hw = std::thread::hardware_concurrency();
  return (int)std::min<unsigned>(hw ? hw : 1, 8);
}

// Never destroyed: joining threads during interpreter shutdown is not worth the risk.
static Pool*& pool_ptr() {
  static Pool* p = nullptr;
  return p;
}

static std::mutex pool_init_mutex;

Pool& pool() {
  auto& p = pool_ptr();
  if (!p) {
    std::lock_guard<std::mutex> lk(pool_init_mutex);
    if (!p) p = new Pool(default_threads());
  }
  return *p;
}

void set_threads(int threads) {
  std::lock_guard<std::mutex> lk(pool_init_mutex);
  Pool* old = pool_ptr();
  pool_ptr() = new Pool(threads > 0 ? threads : default_threads());
  delete old;
}

}  // namespace twinlm
