#include "fused.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"
#include "stream.h"
#include "vmath.h"

namespace twinlm {

namespace {

void allocate(mx::array& a) { a.set_data(mx::allocator::malloc(a.nbytes())); }

template <class F>
void launch(const mx::Stream& s, F&& f) {
  mx::cpu::get_command_encoder(s).dispatch(std::forward<F>(f));
}

std::pair<mx::array, mx::array> add_norm(const mx::array& x, const mx::array& y, const mx::array& w,
                                         const std::optional<mx::array>& b, float eps, bool rms, int fault,
                                         mx::StreamOrDevice s, const char* what) {
  auto stream = cpu_stream(s);
  if (x.shape() != y.shape() || x.ndim() < 1) {
    throw std::invalid_argument(std::string(what) + ": x and y must have one shape (..., C)");
  }
  int64_t C = x.shape(-1);
  if (w.ndim() != 1 || w.shape(0) != C || (b && (b->ndim() != 1 || b->shape(0) != C))) {
    throw std::invalid_argument(std::string(what) + ": weight and bias must have shape (C,)");
  }
  std::vector<mx::array> inputs = {prepared(x, stream, what), prepared(y, stream, what), prepared(w, stream, what)};
  if (b) inputs.push_back(prepared(*b, stream, what));
  mx::Shape rows(x.shape().begin(), x.shape().end() - 1);
  auto outs = mx::array::make_arrays({x.shape(), x.shape(), rows, rows},
                                     {mx::float32, mx::float32, mx::float32, mx::float32},
                                     std::make_shared<AddNorm>(stream, eps, rms, b.has_value(), fault), inputs);
  return {outs[0], outs[1]};
}


// The row loops. The norm's expressions are loops.cpp's layer_norm / rms_norm ones, in the same order, so n
// is bit for bit those kernels' value on s (the tests check it). The sum is recomputed from x and y in each
// pass instead of read back from s: reading a row just stored stalls on store forwarding (perf: the first
// reduction's loads of s took most of the time, the fused pass ran slower than the add and norm apart).
// One function per pass, cloned per ISA like loops.cpp. `forget_y` (tests only): the norm of x alone.
TWL_SIMD void add_layer_norm_rows(const float* x, const float* y, const float* w, const float* b, float* s,
                                  float* n, float* mean, float* rstd, size_t C, float eps, bool forget_y,
                                  size_t r0, size_t r1) {
  const float inv_c = 1.0f / (float)C;
  const float ky = forget_y ? 0.0f : 1.0f;
  for (size_t r = r0; r < r1; r++) {
    const float* xr = x + r * C;
    const float* yr = y + r * C;
    float* sr = s + r * C;
    float* nr = n + r * C;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (size_t j = 0; j < C; j++) {
      sr[j] = xr[j] + yr[j];
      sum += xr[j] + ky * yr[j];
    }
    const float mu = sum / (float)C;
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (size_t j = 0; j < C; j++) {
      float d = (xr[j] + ky * yr[j]) - mu;
      v += d * d;
    }
    const float rs = 1.0f / std::sqrt(v * inv_c + eps);
    mean[r] = mu;
    rstd[r] = rs;
    if (b) {
#pragma omp simd
      for (size_t j = 0; j < C; j++) nr[j] = ((xr[j] + ky * yr[j]) - mu) * rs * w[j] + b[j];
    } else {
#pragma omp simd
      for (size_t j = 0; j < C; j++) nr[j] = ((xr[j] + ky * yr[j]) - mu) * rs * w[j];
    }
  }
}

TWL_SIMD void add_rms_norm_rows(const float* x, const float* y, const float* w, float* s, float* n, float* mean,
                                float* rstd, size_t C, float eps, bool forget_y, size_t r0, size_t r1) {
  const float inv_c = 1.0f / (float)C;
  const float ky = forget_y ? 0.0f : 1.0f;
  for (size_t r = r0; r < r1; r++) {
    const float* xr = x + r * C;
    const float* yr = y + r * C;
    float* sr = s + r * C;
    float* nr = n + r * C;
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (size_t j = 0; j < C; j++) {
      sr[j] = xr[j] + yr[j];
      float v = xr[j] + ky * yr[j];
      sq += v * v;
    }
    const float rs = 1.0f / std::sqrt(sq * inv_c + eps);
    mean[r] = 0.0f;
    rstd[r] = rs;
#pragma omp simd
    for (size_t j = 0; j < C; j++) nr[j] = (xr[j] + ky * yr[j]) * rs * w[j];
  }
}

// ds = gs + the norm's input gradient of gn (loops.cpp's layer_norm_bwd / rms_norm_bwd expressions);
// dw, db += this chunk's part. drop_gs (tests only) leaves the residual's own cotangent out.
TWL_SIMD void add_norm_bwd_rows(const float* s, const float* w, const float* mean, const float* rstd,
                                const float* gn, const float* gs, float* ds, float* dw, float* db, size_t C,
                                bool rms, bool drop_gs, size_t r0, size_t r1) {
  const float inv_c = 1.0f / (float)C;
  const float keep = drop_gs ? 0.0f : 1.0f;
  for (size_t r = r0; r < r1; r++) {
    const float* sr = s + r * C;
    const float* gr = gn + r * C;
    const float* hr = gs + r * C;
    float* dr = ds + r * C;
    const float rs = rstd[r];
    if (rms) {
      float c = 0.0f;
#pragma omp simd reduction(+ : c)
      for (size_t j = 0; j < C; j++) c += gr[j] * w[j] * sr[j];
      const float k = c * inv_c * rs * rs;
#pragma omp simd
      for (size_t j = 0; j < C; j++) {
        dr[j] = rs * (gr[j] * w[j] - sr[j] * k) + keep * hr[j];
        dw[j] += gr[j] * sr[j] * rs;
      }
    } else {
      const float mu = mean[r];
      float a = 0.0f, c = 0.0f;
#pragma omp simd reduction(+ : a, c)
      for (size_t j = 0; j < C; j++) {
        float xh = (sr[j] - mu) * rs;
        float gw = gr[j] * w[j];
        a += gw;
        c += gw * xh;
      }
      a *= inv_c;
      c *= inv_c;
#pragma omp simd
      for (size_t j = 0; j < C; j++) {
        float xh = (sr[j] - mu) * rs;
        dr[j] = rs * (gr[j] * w[j] - a - xh * c) + keep * hr[j];
        dw[j] += gr[j] * xh;
        db[j] += gr[j];
      }
    }
  }
}

}  // namespace

std::pair<mx::array, mx::array> add_layer_norm(const mx::array& x, const mx::array& y, const mx::array& w,
                                               const std::optional<mx::array>& b, float eps, int fault,
                                               mx::StreamOrDevice s) {
  return add_norm(x, y, w, b, eps, false, fault, s, "add_layer_norm");
}

std::pair<mx::array, mx::array> add_rms_norm(const mx::array& x, const mx::array& y, const mx::array& w, float eps,
                                             int fault, mx::StreamOrDevice s) {
  return add_norm(x, y, w, std::nullopt, eps, true, fault, s, "add_rms_norm");
}

// Row by row: the sum, then loops.cpp's norm of that row while it is still in L1, so n is bit for bit the
// layer_norm / rms_norm kernel's value on x + y.
void AddNorm::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t C = in[0].shape(-1), N = C ? in[0].size() / C : 0;
  launch(stream(), [x = in[0].data<float>(), y = in[1].data<float>(), w = in[2].data<float>(),
                    b = bias_ ? in[3].data<float>() : nullptr, s = out[0].data<float>(), n = out[1].data<float>(),
                    mean = out[2].data<float>(), rstd = out[3].data<float>(), N, C, eps = eps_, rms = rms_,
                    fault = fault_] {
    parallel_rows(N, 2 * C, [&](int, size_t r0, size_t r1) {
      if (rms) add_rms_norm_rows(x, y, w, s, n, mean, rstd, C, eps, fault == 2, r0, r1);
      else add_layer_norm_rows(x, y, w, b, s, n, mean, rstd, C, eps, fault == 2, r0, r1);
    });
  });
}

std::vector<mx::array> AddNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                    const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  const auto& w = primals[2];
  auto gs = prepared(cot[0], stream(), "add_norm vjp");
  auto gn = prepared(cot[1], stream(), "add_norm vjp");
  auto grads = mx::array::make_arrays({outputs[0].shape(), w.shape(), w.shape()},
                                      {mx::float32, mx::float32, mx::float32},
                                      std::make_shared<AddNormGrad>(stream(), rms_, fault_),
                                      {outputs[0], w, outputs[2], outputs[3], gn, gs});
  std::vector<mx::array> result;
  for (int a : argnums) result.push_back(a <= 1 ? grads[0] : grads[a - 1]);  // x and y get the same gradient
  return result;
}

bool AddNorm::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const AddNorm&>(other);
  return eps_ == o.eps_ && rms_ == o.rms_ && bias_ == o.bias_ && fault_ == o.fault_;
}

// ds = gs + the norm's input gradient of gn; dw (and db) as partial sums per chunk of rows, added in chunk
// order (the same result for the same thread count), exactly as the norm kernels do.
void AddNormGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t C = in[0].shape(-1), N = C ? in[0].size() / C : 0;
  launch(stream(), [s = in[0].data<float>(), w = in[1].data<float>(), mean = in[2].data<float>(),
                    rstd = in[3].data<float>(), gn = in[4].data<float>(), gs = in[5].data<float>(),
                    ds = out[0].data<float>(), dw = out[1].data<float>(), db = out[2].data<float>(), N, C,
                    rms = rms_, fault = fault_] {
    int chunks = row_chunks(N, 2 * C);
    std::vector<float> part(2 * C * chunks, 0.0f);
    parallel_rows(N, 2 * C, [&](int c, size_t r0, size_t r1) {
      add_norm_bwd_rows(s, w, mean, rstd, gn, gs, ds, &part[2 * C * c], &part[2 * C * c + C], C, rms, fault == 1,
                        r0, r1);
    });
    std::memset(dw, 0, C * sizeof(float));
    std::memset(db, 0, C * sizeof(float));
    for (int c = 0; c < chunks; c++) {
      for (size_t j = 0; j < C; j++) {
        dw[j] += part[2 * C * c + j];
        db[j] += part[2 * C * c + C + j];
      }
    }
  });
}

bool AddNormGrad::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const AddNormGrad&>(other);
  return rms_ == o.rms_ && fault_ == o.fault_;
}

}  // namespace twinlm
