#include "shm_allreduce.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace twinlm {

namespace {

constexpr int MAX_RANKS = 64;
constexpr uint64_t MAGIC = 0x74776c6d73686d31ULL;  // "twlmshm1"
constexpr size_t HEADER_BYTES = 8192;
constexpr double CHECK_S = 0.2;  // how often a waiting rank looks for dead peers

struct Header {
  std::atomic<uint64_t> config;      // MAGIC ^ (size, slot length): every rank must agree
  std::atomic<uint32_t> attached;    // ranks that mapped the segment (the last one unlinks the name)
  alignas(64) std::atomic<uint32_t> arrivals;  // the futex word: bumped by every publish
  alignas(64) std::atomic<uint64_t> seq[MAX_RANKS];    // the last chunk each rank published
  std::atomic<int64_t> count[MAX_RANKS][2];            // that chunk's length (a mismatch is an error)
  std::atomic<int32_t> pid[MAX_RANKS];
};
static_assert(sizeof(Header) <= HEADER_BYTES);
static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free);

long futex(std::atomic<uint32_t>* word, int op, uint32_t val, const timespec* timeout) {
  // Not FUTEX_PRIVATE: the word is shared between processes.
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, val, timeout, nullptr, 0);
}

bool process_gone(int32_t pid) {
  if (pid <= 0) return false;  // not attached yet: the timeout covers a rank that never starts
  if (kill(pid, 0) != 0 && errno == ESRCH) return true;
  // A rank that died but was not yet reaped by its parent is a zombie: as dead.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() &&
         (line[close + 2] == 'Z' || line[close + 2] == 'X');
}

}  // namespace

class ShmGroup {
 public:
  ShmGroup(std::string name, int rank, int size, int64_t slot_floats, double timeout_s)
      : name_(std::move(name)), rank_(rank), size_(size), slot_(slot_floats), timeout_s_(timeout_s) {
    slot_bytes_ = ((size_t)slot_ * sizeof(float) + 63) / 64 * 64;
    bytes_ = HEADER_BYTES + 2 * (size_t)size_ * slot_bytes_;
    int fd = shm_open(name_.c_str(), O_CREAT | O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error(what("shm_open") + ": " + std::strerror(errno));
    // Every rank sizes it the same (new pages read as zeros); the config check below catches a mismatch.
    struct stat st;
    if (fstat(fd, &st) != 0 || (st.st_size == 0 && ftruncate(fd, (off_t)bytes_) != 0)) {
      int e = errno;
      close(fd);
      throw std::runtime_error(what("sizing the segment") + ": " + std::strerror(e));
    }
    if (st.st_size != 0 && (size_t)st.st_size != bytes_) {  // never resize a peer's mapping under it
      close(fd);
      throw std::runtime_error(what("attach") + ": the segment was made for another group (rank count or "
                                                "slot length differs)");
    }
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) throw std::runtime_error(what("mmap") + ": " + std::strerror(errno));
    base_ = static_cast<char*>(p);
    h_ = reinterpret_cast<Header*>(base_);
    uint64_t want = MAGIC ^ ((uint64_t)size_ << 48) ^ (uint64_t)slot_;
    uint64_t seen = 0;
    if (!h_->config.compare_exchange_strong(seen, want) && seen != want) {
      munmap(base_, bytes_);
      throw std::runtime_error(what("attach") + ": the segment was made for another group (rank count or "
                                                "slot length differs)");
    }
    h_->pid[rank_].store((int32_t)getpid());
    seq_ = h_->seq[rank_].load();
    if (h_->attached.fetch_add(1) + 1 == (uint32_t)size_) shm_unlink(name_.c_str());  // all are in
  }

  ~ShmGroup() { munmap(base_, bytes_); }

  int rank() const { return rank_; }
  int size() const { return size_; }
  int64_t slot() const { return slot_; }
  const std::string& name() const { return name_; }

  // y = the sum over ranks of every rank's x (n floats), in rank order. Runs on MLX's stream thread.
  void all_sum(const float* x, float* y, size_t n, int fault) {
    std::lock_guard<std::mutex> lock(m_);  // one collective at a time per process
    for (size_t at = 0; at < n; at += (size_t)slot_) {
      size_t len = std::min((size_t)slot_, n - at);
      uint64_t k = ++seq_;
      int buf = (int)(k & 1);
      std::memcpy(slot(buf, rank_), x + at, len * sizeof(float));
      h_->count[rank_][buf].store((int64_t)len, std::memory_order_relaxed);
      h_->seq[rank_].store(k, std::memory_order_release);
      h_->arrivals.fetch_add(1, std::memory_order_release);
      futex(&h_->arrivals, FUTEX_WAKE, INT_MAX, nullptr);
      if (fault != 1) wait_all(k);
      for (int r = 0; r < size_; r++) {
        int64_t c = h_->count[r][buf].load(std::memory_order_relaxed);
        if (fault != 1 && c != (int64_t)len) {
          throw std::runtime_error(what("all_sum") + ": rank " + std::to_string(r) + " summed a vector of another "
                                   "length (chunk of " + std::to_string(c) + " floats, this rank " +
                                   std::to_string(len) + ")");
        }
      }
      sum_slots(buf, y + at, len, fault == 2);
    }
  }

 private:
  float* slot(int buf, int r) { return reinterpret_cast<float*>(base_ + HEADER_BYTES + ((size_t)buf * size_ + r) * slot_bytes_); }

  std::string what(const std::string& step) const {
    return "shm all-reduce (rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ", " + name_ + "): " + step;
  }

  // Sleep on the futex until every rank published chunk k. No spinning: the word changes on each publish.
  void wait_all(uint64_t k) {
    using clock = std::chrono::steady_clock;
    auto start = clock::now();
    auto next_check = start + std::chrono::duration<double>(CHECK_S);
    for (;;) {
      uint32_t seen = h_->arrivals.load(std::memory_order_acquire);
      int missing = -1;
      for (int r = 0; r < size_ && missing < 0; r++) {
        if (h_->seq[r].load(std::memory_order_acquire) < k) missing = r;
      }
      if (missing < 0) return;
      auto now = clock::now();
      double waited = std::chrono::duration<double>(now - start).count();
      if (now >= next_check) {
        for (int r = 0; r < size_; r++) {
          int32_t pid = h_->pid[r].load();
          if (h_->seq[r].load(std::memory_order_acquire) < k && process_gone(pid)) {
            throw std::runtime_error(what("rank " + std::to_string(r) + " (pid " + std::to_string(pid) +
                                          ") died before the all-reduce finished"));
          }
        }
        next_check = now + std::chrono::duration<double>(CHECK_S);
      }
      if (waited >= timeout_s_) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.1f", timeout_s_);
        throw std::runtime_error(what("rank " + std::to_string(missing) + " did not reach the all-reduce within " +
                                      buf + " s"));
      }
      double slice = std::min(CHECK_S, timeout_s_ - waited);
      timespec ts{(time_t)slice, (long)((slice - (double)(time_t)slice) * 1e9)};
      futex(&h_->arrivals, FUTEX_WAIT, seen, &ts);  // returns at once if a publish came in since `seen`
    }
  }

  // y = slot 0 + slot 1 + ... in rank order (the same bits on every rank); `reverse`: the tests' control.
  void sum_slots(int buf, float* y, size_t len, bool reverse) {
    constexpr size_t BLOCK = 4096;  // kept in L1 across the ranks' passes
    for (size_t b = 0; b < len; b += BLOCK) {
      size_t e = std::min(len, b + BLOCK);
      const float* first = slot(buf, reverse ? size_ - 1 : 0);
#pragma omp simd
      for (size_t i = b; i < e; i++) y[i] = first[i];
      for (int j = 1; j < size_; j++) {
        const float* s = slot(buf, reverse ? size_ - 1 - j : j);
#pragma omp simd
        for (size_t i = b; i < e; i++) y[i] += s[i];
      }
    }
  }

  std::string name_;
  int rank_, size_;
  int64_t slot_;
  double timeout_s_;
  size_t slot_bytes_ = 0, bytes_ = 0;
  char* base_ = nullptr;
  Header* h_ = nullptr;
  uint64_t seq_ = 0;
  std::mutex m_;
};

namespace {

std::shared_ptr<ShmGroup> group_for(const std::string& name, int rank, int size, int64_t slot_floats,
                                    double timeout_s) {
  static std::mutex m;
  // Kept for the process's lifetime and never destroyed: at exit MLX's stream thread may still be in a call.
  static auto& groups = *new std::map<std::string, std::shared_ptr<ShmGroup>>();
  std::lock_guard<std::mutex> lock(m);
  auto it = groups.find(name);
  if (it != groups.end()) {
    auto& g = it->second;
    if (g->rank() != rank || g->size() != size || g->slot() != slot_floats) {
      throw std::invalid_argument("shm_all_sum: segment " + name + " is already attached with another rank, size "
                                  "or slot length");
    }
    return g;
  }
  auto g = std::make_shared<ShmGroup>(name, rank, size, slot_floats, timeout_s);
  groups[name] = g;
  return g;
}

}  // namespace

mx::array shm_all_sum(const mx::array& x, const std::string& name, int rank, int size, int64_t slot_floats,
                      double timeout_s, int fault, mx::StreamOrDevice s) {
  mx::Stream stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("shm_all_sum runs on the CPU only");
  if (x.dtype() != mx::float32) {
    throw std::invalid_argument("shm_all_sum: float32 only (the training step sums float32 gradients)");
  }
  if (size < 1 || size > MAX_RANKS || rank < 0 || rank >= size) {
    throw std::invalid_argument("shm_all_sum: need 0 <= rank < size <= " + std::to_string(MAX_RANKS));
  }
  if (slot_floats < 1 || name.empty() || name[0] != '/' || name.find('/', 1) != std::string::npos) {
    throw std::invalid_argument("shm_all_sum: slot_floats >= 1 and a name '/like-this' are needed");
  }
  if (!(timeout_s > 0)) throw std::invalid_argument("shm_all_sum: timeout_s must be > 0");
  auto group = group_for(name, rank, size, slot_floats, timeout_s);
  auto xc = mx::contiguous(x, false, stream);
  return mx::array(xc.shape(), mx::float32, std::make_shared<ShmAllSum>(stream, group, fault), {xc});
}

void ShmAllSum::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  out[0].set_data(mx::allocator::malloc(out[0].nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(in[0]);
  enc.set_output_array(out[0]);
  enc.dispatch([g = group_, x = in[0].data<float>(), y = out[0].data<float>(), n = out[0].size(), f = fault_] {
    try {
      g->all_sum(x, y, n, f);
    } catch (const std::exception& e) {
      // An exception on MLX's stream thread would end the process with std::terminate (an abort and a
      // core dump, no message the launcher can read): say it in one `error:` line and exit instead.
      std::fprintf(stderr, "error: %s\n", e.what());
      std::fflush(stderr);
      std::_Exit(1);
    }
  });
}

std::vector<mx::array> ShmAllSum::vjp(const std::vector<mx::array>&, const std::vector<mx::array>& cotangents,
                                      const std::vector<int>&, const std::vector<mx::array>&) {
  // d(sum over ranks of x_r)/dx_r: every rank's output depends on x, so the cotangent is summed likewise.
  auto g = mx::contiguous(cotangents[0], false, stream());
  return {mx::array(g.shape(), mx::float32, std::make_shared<ShmAllSum>(stream(), group_, fault_), {g})};
}

bool shm_unlink_segment(const std::string& name) { return ::shm_unlink(name.c_str()) == 0; }

}  // namespace twinlm
