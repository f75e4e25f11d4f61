#include "fused.h"

#include <cstring>
#include <stdexcept>
#include <vector>

#include "loops.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

namespace twinlm {

namespace {

mx::Stream cpu_stream(mx::StreamOrDevice s) {
  mx::Stream stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("twinlm kernels run on the CPU only");
  return stream;
}

mx::array prepared(const mx::array& x, const mx::Stream& s, const char* what) {
  if (x.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + ": float32 only");
  return mx::contiguous(x, false, s);
}

void allocate(mx::array& a) { a.set_data(mx::allocator::malloc(a.nbytes())); }

template <class F>
void launch(const mx::Stream& s, F&& f) {
  mx::cpu::get_command_encoder(s).dispatch(std::forward<F>(f));
}

std::pair<mx::array, mx::array> add_norm(const mx::array& x, const mx::array& y, const mx::array& w,
                                         const std::optional<mx::array>& b, float eps, bool rms, int fault,
                                         mx::StreamOrDevice s, const char* what) {
  auto stream = cpu_stream(s);
  if (x.shape() != y.shape() || x.ndim() < 1) throw std::invalid_argument(std::string(what) + ": x and y must have one shape (..., C)");
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
      for (size_t r = r0; r < r1; r++) {
        const float* xr = x + r * C;
        const float* yr = y + r * C;
        float* sr = s + r * C;
#pragma omp simd
        for (size_t j = 0; j < C; j++) sr[j] = xr[j] + yr[j];
        const float* src = fault == 2 ? x : s;  // fault 2 (tests only): the norm forgets y
        if (rms) {
          mean[r] = 0.0f;
          rms_norm_fwd(src, w, n, rstd, C, eps, r, r + 1);
        } else {
          layer_norm_fwd(src, w, b, n, mean, rstd, C, eps, r, r + 1);
        }
      }
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
      float* pw = &part[2 * C * c];
      float* pb = pw + C;
      for (size_t r = r0; r < r1; r++) {
        if (rms) {
          rms_norm_bwd(s, w, rstd, gn, ds, pw, C, r, r + 1);
        } else {
          layer_norm_bwd(s, w, mean, rstd, gn, ds, pw, pb, C, r, r + 1);
        }
        if (fault == 1) continue;  // tests only: the residual's own cotangent dropped
        float* dr = ds + r * C;
        const float* gr = gs + r * C;
#pragma omp simd
        for (size_t j = 0; j < C; j++) dr[j] += gr[j];
      }
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
