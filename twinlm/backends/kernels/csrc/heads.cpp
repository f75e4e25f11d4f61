#include "heads.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace twinlm {

namespace {

constexpr int ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112;  // CBLAS's enum values

// One operand's matrices as BLAS reads them: a base pointer per batch entry, the leading dimension, and
// whether the stored matrix is the transpose of the logical one (columns with stride 1).
struct Operand {
  std::vector<const float*> mats;
  int ld = 0;
  bool flipped = false;
  std::vector<float> copy;  // only when neither rows nor columns are unit-strided
};

// `x` (..., R, C) as stored; `batch` entries in row-major order of the leading dims.
Operand operand(const mx::array& x, size_t batch, bool ignore_strides) {
  Operand o;
  int nd = x.ndim();
  int64_t R = x.shape(nd - 2), C = x.shape(nd - 1);
  int64_t sr = x.strides()[nd - 2], sc = x.strides()[nd - 1];
  const float* base = x.data<float>();
  std::vector<int64_t> offs(batch, 0);
  for (size_t i = 0; i < batch; i++) {  // the batch entry's offset through the leading dims' strides
    size_t rest = i;
    int64_t off = 0;
    for (int d = nd - 3; d >= 0; d--) {
      off += (int64_t)(rest % x.shape(d)) * x.strides()[d];
      rest /= x.shape(d);
    }
    offs[i] = off;
  }
  if (ignore_strides) {  // tests only: read each matrix as if it were contiguous
    for (size_t i = 0; i < batch; i++) o.mats.push_back(base + i * R * C);
    o.ld = (int)std::max<int64_t>(C, 1);
    return o;
  }
  if ((sc == 1 || C == 1) && sr >= std::max<int64_t>(C, 1)) {
    o.ld = (int)std::max<int64_t>(sr, 1);
  } else if ((sr == 1 || R == 1) && sc >= std::max<int64_t>(R, 1)) {
    o.flipped = true;
    o.ld = (int)std::max<int64_t>(sc, 1);
  } else {  // neither: gather a contiguous copy
    o.copy.resize(batch * R * C);
    for (size_t i = 0; i < batch; i++) {
      for (int64_t r = 0; r < R; r++) {
        for (int64_t c = 0; c < C; c++) o.copy[(i * R + r) * C + c] = base[offs[i] + r * sr + c * sc];
      }
    }
    for (size_t i = 0; i < batch; i++) o.mats.push_back(o.copy.data() + i * R * C);
    o.ld = (int)std::max<int64_t>(C, 1);
    return o;
  }
  for (size_t i = 0; i < batch; i++) o.mats.push_back(base + offs[i]);
  return o;
}

}  // namespace

mx::array head_matmul(const mx::array& a, const mx::array& b, bool ta, bool tb, int fault, mx::StreamOrDevice s) {
  mx::Stream stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("twinlm kernels run on the CPU only");
  if (a.dtype() != mx::float32 || b.dtype() != mx::float32) throw std::invalid_argument("head_matmul: float32 only");
  if (a.ndim() < 2 || a.ndim() != b.ndim()) throw std::invalid_argument("head_matmul: a and b of one rank >= 2");
  for (int d = 0; d < a.ndim() - 2; d++) {
    if (a.shape(d) != b.shape(d)) throw std::invalid_argument("head_matmul: leading dims must match");
  }
  int64_t M = ta ? a.shape(-1) : a.shape(-2), K = ta ? a.shape(-2) : a.shape(-1);
  int64_t Kb = tb ? b.shape(-1) : b.shape(-2), N = tb ? b.shape(-2) : b.shape(-1);
  if (K != Kb) throw std::invalid_argument("head_matmul: inner dimensions differ");
  mx::Shape shape(a.shape().begin(), a.shape().end() - 2);
  shape.push_back((int)M);
  shape.push_back((int)N);
  return mx::array(shape, mx::float32, std::make_shared<HeadMatmul>(stream, ta, tb, fault), {a, b});
}

void HeadMatmul::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  auto& c = out[0];
  c.set_data(mx::allocator::malloc(c.nbytes()));
  const auto &a = in[0], &b = in[1];
  int nd = c.ndim();
  size_t M = c.shape(nd - 2), N = c.shape(nd - 1), K = ta_ ? a.shape(nd - 2) : a.shape(nd - 1);
  size_t batch = (M * N) ? c.size() / (M * N) : 0;
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(a);
  enc.set_input_array(b);
  enc.set_output_array(c);
  enc.dispatch([a, b, cp = c.data<float>(), M, N, K, batch, ta = ta_, tb = tb_, fault = fault_] {
    if (batch == 0) return;
    if (K == 0) {
      std::memset(cp, 0, batch * M * N * sizeof(float));
      return;
    }
    Operand oa = operand(a, batch, fault == 1), ob = operand(b, batch, fault == 1);
    bool trans_a = ta != oa.flipped, trans_b = tb != ob.flipped;
    for (size_t i = 0; i < batch; i++) {
      cblas_sgemm(ROW_MAJOR, trans_a ? TRANS : NO_TRANS, trans_b ? TRANS : NO_TRANS, (int)M, (int)N, (int)K, 1.0f,
                  oa.mats[i], oa.ld, ob.mats[i], ob.ld, 0.0f, cp + i * M * N, (int)N);
    }
  });
}

// C = op(A) op(B): dA = G op(B)^T (ta: op(B) G^T), dB = op(A)^T G (tb: G^T op(A)), each the same primitive.
std::vector<mx::array> HeadMatmul::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                       const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const auto &a = primals[0], &b = primals[1], &g = cot[0];
  std::vector<mx::array> result;
  for (int arg : argnums) {
    if (arg == 0) {
      result.push_back(ta_ ? head_matmul(b, g, tb_, true, fault_, stream())
                           : head_matmul(g, b, false, !tb_, fault_, stream()));
    } else {
      result.push_back(tb_ ? head_matmul(g, a, true, ta_, fault_, stream())
                           : head_matmul(a, g, !ta_, false, fault_, stream()));
    }
  }
  return result;
}

bool HeadMatmul::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const HeadMatmul&>(other);
  return ta_ == o.ta_ && tb_ == o.tb_ && fault_ == o.fault_;
}

}  // namespace twinlm
