// A same-host all-reduce (sum) over POSIX shared memory for data-parallel ranks that one launcher started
// on one machine (issue #23): the ring backend's TCP loopback spins a core for ~8 ms per 3.2 MB call, this
// copies, waits on a futex (no spinning) and sums.
//
// The segment (shm_open + mmap, named from a per-launch id) holds a header and two buffers of one slot per
// rank. Per chunk k of the vector (vectors longer than a slot go in chunks): each rank copies its chunk
// into its slot of buffer k % 2, publishes seq[rank] = k and wakes the others (FUTEX_WAKE), waits
// (FUTEX_WAIT with a timeout) until every rank's seq >= k, then sums the slots IN RANK ORDER, so every rank
// gets the same bits. Two buffers make one barrier per chunk enough: a rank that reaches chunk k has seen
// every rank publish k - 1, which each did after reading chunk k - 2 out of the buffer k reuses.
// A peer that died (its pid gone or a zombie) is an error at once; one that stops answering, after the
// timeout. The last rank to attach unlinks the name (the mapping stays), so nothing is left in /dev/shm.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "primitives.h"

namespace twinlm {

class ShmGroup;

// The sum of x over the `size` ranks attached to segment `name` (this process is `rank`), float32, as an
// MLX primitive; its VJP is the same all-reduce of the cotangent. `slot_floats`: the chunk length (every
// rank must pass the same); `timeout_s`: how long a wait for the other ranks may last. `fault` (tests'
// negative controls only): 1 = no wait (stale slots are read), 2 = slots summed in reverse rank order.
mx::array shm_all_sum(const mx::array& x, const std::string& name, int rank, int size, int64_t slot_floats,
                      double timeout_s, int fault = 0, mx::StreamOrDevice s = {});

class ShmAllSum : public CpuPrimitive {
 public:
  ShmAllSum(mx::Stream s, std::shared_ptr<ShmGroup> group, int fault)
      : CpuPrimitive(s), group_(std::move(group)), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmShmAllSum"; }
  // Never merged with another call by mx.compile: every call is one collective every rank makes.
  bool is_equivalent(const mx::Primitive&) const override { return false; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  std::shared_ptr<ShmGroup> group_;
  int fault_;
};

// Unlink a segment's name (the launcher's clean-up after its ranks exit); false if it was already gone.
bool shm_unlink_segment(const std::string& name);

}  // namespace twinlm
