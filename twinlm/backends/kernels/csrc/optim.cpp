// The optimizer's elementwise work (optim.h): AdamW over every parameter in one pass per element, and the
// global norm's sum of squares, split over the kernels' pool by fixed blocks of elements.
#include "optim.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"
#include "stream.h"
#include "vmath.h"

namespace twinlm {

namespace {

constexpr size_t BLOCK = 4096;  // elements per unit of work (and per partial sum): fixed, not per thread count

// No mx::contiguous node per input (the other kernels' way): the optimizer takes hundreds of tensors, and each
// such node cost ~4 us of scheduling (208 of them: 0.9 ms of a 2.8 ms update). A strided input (rare: the
// step's tensors are row-contiguous) is gathered into a temporary inside the task instead (Source).
const mx::array& checked(const mx::array& x, const char* what) {
  if (x.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + ": float32 only");
  return x;
}

const mx::array& scalar(const mx::array& x, mx::Dtype dtype, const char* what) {
  if (x.size() != 1 || x.dtype() != dtype) {
    throw std::invalid_argument(std::string("adamw: ") + what + " must be one " +
                                (dtype == mx::bool_ ? "bool" : "float32") + " value");
  }
  return x;
}

// An input's elements in row-major order: its own buffer when row-contiguous, else a gathered copy.
struct Source {
  const float* data;
  size_t size;
  mx::Shape shape;
  mx::Strides strides;  // empty: contiguous
  std::shared_ptr<std::vector<float>> copy;

  explicit Source(const mx::array& x) : data(x.data<float>()), size(x.size()) {
    if (!x.flags().row_contiguous) {
      shape = x.shape();
      strides = x.strides();
    }
  }
  // Inside the task (the input's values exist only once the tasks before it have run).
  const float* get() {
    if (strides.empty()) return data;
    copy = std::make_shared<std::vector<float>>(size);
    std::vector<int64_t> idx(shape.size(), 0);
    for (size_t i = 0; i < size; i++) {
      int64_t off = 0;
      for (size_t d = 0; d < shape.size(); d++) off += idx[d] * strides[d];
      (*copy)[i] = data[off];
      for (size_t d = shape.size(); d-- > 0;) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
    return copy->data();
  }
};

void allocate(mx::array& a) { a.set_data(mx::allocator::malloc(a.nbytes())); }

template <class F>
void launch(const mx::Stream& s, F&& f) {
  mx::cpu::get_command_encoder(s).dispatch(std::forward<F>(f));
}

// The update's expressions in core.optim.adamw_update's order (g scaled first, as core.step clips it).
TWL_SIMD void adamw_span(const float* p, const float* g, const float* m, const float* v, float* po, float* mo,
                         float* vo, size_t n, float lr, float bc1, float bc2, float scale, float b1, float c1,
                         float b2, float c2, float eps, bool decay, float shrink) {
#pragma omp simd
  for (size_t j = 0; j < n; j++) {
    float gj = g[j] * scale;
    float mj = b1 * m[j] + c1 * gj;
    float vj = b2 * v[j] + c2 * (gj * gj);
    float u = (mj / bc1) / (std::sqrt(vj / bc2) + eps);
    float pj = decay ? p[j] * shrink : p[j];
    po[j] = pj - lr * u;
    mo[j] = mj;
    vo[j] = vj;
  }
}

TWL_SIMD float squares(const float* x, size_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (size_t j = 0; j < n; j++) s += x[j] * x[j];
  return s;
}

struct Span {  // one block of one tensor
  size_t tensor, begin, end;
};

std::vector<Span> blocks_of(const std::vector<size_t>& sizes) {
  std::vector<Span> spans;
  for (size_t t = 0; t < sizes.size(); t++) {
    for (size_t b = 0; b < sizes[t]; b += BLOCK) spans.push_back({t, b, std::min(sizes[t], b + BLOCK)});
  }
  return spans;
}

}  // namespace

std::vector<mx::array> adamw(const std::vector<mx::array>& ps, const std::vector<mx::array>& gs,
                             const std::vector<mx::array>& ms, const std::vector<mx::array>& vs,
                             const mx::array& lr, const mx::array& bc1, const mx::array& bc2,
                             const mx::array& scale, const mx::array& keep, double beta1, double beta2, double eps,
                             const std::vector<double>& decay, int fault, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  size_t n = ps.size();
  if (gs.size() != n || ms.size() != n || vs.size() != n || decay.size() != n) {
    throw std::invalid_argument("adamw: params, grads, m, v and decay must have one length");
  }
  std::vector<mx::array> inputs = {scalar(lr, mx::float32, "lr"), scalar(bc1, mx::float32, "bc1"),
                                   scalar(bc2, mx::float32, "bc2"), scalar(scale, mx::float32, "scale"),
                                   scalar(keep, mx::bool_, "keep")};
  std::vector<mx::Shape> shapes(3 * n);
  for (size_t i = 0; i < n; i++) {
    if (gs[i].shape() != ps[i].shape() || ms[i].shape() != ps[i].shape() || vs[i].shape() != ps[i].shape()) {
      throw std::invalid_argument("adamw: tensor " + std::to_string(i) + ": p, g, m and v must have one shape");
    }
    for (const auto* a : {&ps[i], &gs[i], &ms[i], &vs[i]}) inputs.push_back(checked(*a, "adamw"));
    shapes[i] = shapes[n + i] = shapes[2 * n + i] = ps[i].shape();
  }
  if (n == 0) return {};
  return mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(3 * n, mx::float32),
                                std::make_shared<AdamW>(stream, beta1, beta2, eps, decay, fault), inputs);
}

void AdamW::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  size_t n = decay_.size();
  // The new p, m, v overwrite the old ones where nothing else holds them (the trainer's step drops its old
  // state before evaluating): each element is read before it is written, at the same index.
  for (size_t i = 0; i < n; i++) {
    const size_t from[3] = {5 + 4 * i, 7 + 4 * i, 8 + 4 * i};
    for (size_t k = 0; k < 3; k++) {
      const auto& a = in[from[k]];
      auto& o = out[k * n + i];
      if (a.is_donatable() && a.flags().row_contiguous && a.itemsize() == o.itemsize()) o.copy_shared_buffer(a);
      else allocate(o);
    }
  }
  std::vector<Source> src;
  std::vector<float*> dst(3 * n);
  std::vector<size_t> sizes(n);
  for (size_t i = 0; i < n; i++) {
    for (size_t k = 0; k < 4; k++) src.emplace_back(in[5 + 4 * i + k]);
    for (size_t k = 0; k < 3; k++) dst[k * n + i] = out[k * n + i].data<float>();
    sizes[i] = in[5 + 4 * i].size();
  }
  launch(stream(), [lr = in[0].data<float>(), bc1 = in[1].data<float>(), bc2 = in[2].data<float>(),
                    scale = in[3].data<float>(), keep = in[4].data<bool>(), sources = std::move(src),
                    dst = std::move(dst), sizes = std::move(sizes), n, b1d = beta1_, b2d = beta2_, eps = eps_,
                    decay = decay_, fault = fault_]() mutable {
    std::vector<const float*> src(sources.size());
    for (size_t i = 0; i < sources.size(); i++) src[i] = sources[i].get();
    auto spans = blocks_of(sizes);
    // Scalars as the reference body forms them: Python floats (double) rounded to float32 where they meet
    // the float32 arrays; 1 - lr * wd in float32, as lr is a float32 array there.
    const float L = *lr, B1 = fault == 1 ? 1.0f : *bc1, B2 = fault == 1 ? 1.0f : *bc2, S = *scale;
    const bool ok = *keep;
    const float b1 = (float)b1d, c1 = (float)(1.0 - b1d), b2 = (float)b2d, c2 = (float)(1.0 - b2d), e = (float)eps;
    parallel_rows(spans.size(), BLOCK, [&](int, size_t r0, size_t r1) {
      for (size_t r = r0; r < r1; r++) {
        const Span& sp = spans[r];
        size_t t = sp.tensor, len = sp.end - sp.begin;
        const float* p = src[4 * t] + sp.begin;
        const float* g = src[4 * t + 1] + sp.begin;
        const float* m = src[4 * t + 2] + sp.begin;
        const float* v = src[4 * t + 3] + sp.begin;
        float* po = dst[t] + sp.begin;
        float* mo = dst[n + t] + sp.begin;
        float* vo = dst[2 * n + t] + sp.begin;
        if (!ok) {  // a non-finite step keeps the old state (in place: nothing to copy)
          if (po != p) std::memcpy(po, p, len * sizeof(float));
          if (mo != m) std::memcpy(mo, m, len * sizeof(float));
          if (vo != v) std::memcpy(vo, v, len * sizeof(float));
          continue;
        }
        bool dec = decay[t] != 0.0 && fault != 2;
        float shrink = 1.0f - L * (float)decay[t];
        adamw_span(p, g, m, v, po, mo, vo, len, L, B1, B2, S, b1, c1, b2, c2, e, dec, shrink);
      }
    });
  });
}

bool AdamW::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const AdamW&>(other);
  return beta1_ == o.beta1_ && beta2_ == o.beta2_ && eps_ == o.eps_ && decay_ == o.decay_ && fault_ == o.fault_;
}

mx::array sum_squares(const std::vector<mx::array>& xs, int fault, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  std::vector<mx::array> inputs;
  for (const auto& x : xs) inputs.push_back(checked(x, "sum_squares"));
  if (inputs.empty()) return mx::zeros({}, mx::float32, stream);
  return mx::array({}, mx::float32, std::make_shared<SumSquares>(stream, fault), inputs);
}

void SumSquares::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t n = in.size() - (fault_ == 1 ? 1 : 0);
  std::vector<Source> sources;
  std::vector<size_t> sizes(n);
  for (size_t i = 0; i < n; i++) {
    sources.emplace_back(in[i]);
    sizes[i] = in[i].size();
  }
  launch(stream(), [sources = std::move(sources), sizes = std::move(sizes), o = out[0].data<float>()]() mutable {
    std::vector<const float*> src(sources.size());
    for (size_t i = 0; i < sources.size(); i++) src[i] = sources[i].get();
    auto spans = blocks_of(sizes);
    std::vector<float> part(spans.size());
    parallel_rows(spans.size(), BLOCK, [&](int, size_t r0, size_t r1) {
      for (size_t r = r0; r < r1; r++) part[r] = squares(src[spans[r].tensor] + spans[r].begin, spans[r].end - spans[r].begin);
    });
    // Each tensor's blocks in order, then the tensors in order (the reference: one sum per tensor, added).
    float total = 0.0f;
    for (size_t r = 0; r < spans.size();) {
      float t = 0.0f;
      size_t tensor = spans[r].tensor;
      for (; r < spans.size() && spans[r].tensor == tensor; r++) t += part[r];
      total += t;
    }
    *o = total;
  });
}

std::vector<mx::array> SumSquares::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                       const std::vector<int>& argnums, const std::vector<mx::array>&) {
  std::vector<mx::array> result;
  auto two = mx::multiply(cot[0], mx::array(2.0f), stream());
  for (int a : argnums) result.push_back(mx::multiply(primals[a], two, stream()));
  return result;
}

bool SumSquares::is_equivalent(const mx::Primitive& other) const {
  return fault_ == static_cast<const SumSquares&>(other).fault_;
}

}  // namespace twinlm
