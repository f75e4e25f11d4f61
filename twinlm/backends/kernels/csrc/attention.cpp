// Fused attention (attention.h): per (batch, head) pair, on the kernels' pool, the scores, the masked softmax
// (softmax_row.h: the masked-softmax kernel's expressions) and the product with v, all in cache; the VJP
// recomputes nothing but reads the kept probabilities. The products are register-blocked tiles (R rows by
// one or two vector blocks of 16 floats) that the per-ISA clones turn into AVX-512 / AVX2+FMA / SSE2 code.
// Only each row's span of attended keys is computed (first to last True in the mask: half the work under a
// causal mask), and the transposed products (dk, dv) walk each key's span of queries the same way.
#include "attention.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"
#include "softmax_row.h"
#include "stream.h"
#include "vmath.h"

namespace twinlm {

namespace {

template <class F>
void launch(const mx::Stream& s, F&& f) {
  mx::cpu::get_command_encoder(s).dispatch(std::forward<F>(f));
}

constexpr size_t VW = 16;  // floats per vector block (one AVX-512 register, two AVX2 ones)

inline size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// (N, H, T, D) allocated dense in the (N, T, H, D) order: the heads' merge is then a view.
void allocate_merged(mx::array& a) {
  const auto& sh = a.shape();
  int64_t N = sh[0], H = sh[1], T = sh[2], D = sh[3];
  mx::Strides st = {T * H * D, D, H * D, 1};
  mx::array::Flags f{};
  f.contiguous = true;
  // Row-contiguous when the swapped axes make no difference (one head or one position).
  f.row_contiguous = H == 1 || T == 1;
  f.col_contiguous = a.size() <= 1;
  a.set_data(mx::allocator::malloc(a.nbytes()), a.size(), st, f);
}

// A 4-D float32 input read in place: element (n, h, i, d) at base + n s[0] + h s[1] + i s[2] + d s[3].
struct View {
  const float* base;
  int64_t s[4];
  const float* head(size_t n, size_t h) const { return base + (int64_t)n * s[0] + (int64_t)h * s[1]; }
};

View view_of(const mx::array& a) {
  const auto& st = a.strides();
  return View{a.data<float>(), {st[0], st[1], st[2], st[3]}};
}

// Each query row's span of attended keys [rlo, rhi) and each key's span of queries [clo, chi) for one
// (Tq, Tk) mask slice (empty spans are [0, 0)); no mask: everything.
struct Spans {
  std::vector<uint32_t> rlo, rhi, clo, chi;
};

Spans spans_of(const uint8_t* m, int64_t row_stride, size_t Tq, size_t Tk) {
  Spans s{std::vector<uint32_t>(Tq, 0), std::vector<uint32_t>(Tq, (uint32_t)Tk),
          std::vector<uint32_t>(Tk, 0), std::vector<uint32_t>(Tk, (uint32_t)Tq)};
  if (!m) return s;
  std::fill(s.clo.begin(), s.clo.end(), (uint32_t)Tq);
  std::fill(s.chi.begin(), s.chi.end(), 0u);
  for (size_t i = 0; i < Tq; i++) {
    const uint8_t* r = m + (int64_t)i * row_stride;
    size_t a = 0, b = Tk;
    while (a < Tk && !r[a]) a++;
    while (b > a && !r[b - 1]) b--;
    s.rlo[i] = a < b ? (uint32_t)a : 0;
    s.rhi[i] = a < b ? (uint32_t)b : 0;
    for (size_t j = a; j < b; j++) {
      if (r[j]) {
        s.clo[j] = std::min(s.clo[j], (uint32_t)i);
        s.chi[j] = (uint32_t)(i + 1);
      }
    }
  }
  for (size_t j = 0; j < Tk; j++) {
    if (s.clo[j] >= s.chi[j]) s.clo[j] = s.chi[j] = 0;
  }
  return s;
}

// ---- the tiles --------------------------------------------------------------------------------------
// Written with GCC/Clang vector types so that the accumulators stay in registers: a vf is 16 floats, one
// AVX-512 register in the x86-64-v4 clone, two AVX2 ones in the v3 clone, four SSE2 ones in the baseline.
typedef float vf __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4), may_alias));  // any float address

TWL_INLINE vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }

// The first w floats of r's tile row to dst (w <= 16 NV).
template <int NV>
TWL_INLINE void store(float* dst, const vf* v, size_t w) {
  if (w == 16 * NV) {
    for (int i = 0; i < NV; i++) *reinterpret_cast<vf_u*>(dst + 16 * i) = v[i];
  } else {
    float tmp[16 * NV];
    for (int i = 0; i < NV; i++) *reinterpret_cast<vf_u*>(tmp + 16 * i) = v[i];
    for (size_t t = 0; t < w; t++) dst[t] = tmp[t];
  }
}

// C[r, j0 + t] = sum_{k0 <= k < k1} A(r, k) B[k, j0 + t] for r < R, t < 16 NV, stored for t < w;
// A(r, k) = A[r ars + k acs], B is (., ldb) and readable for 16 NV columns from j0 (zero-padded). Both
// products use it: S = q k^T over the whole head dimension, and P v (and the backward's) over a key span.
template <int R, int NV>
TWL_INLINE void tile(const float* A, int64_t ars, int64_t acs, size_t k0, size_t k1, const float* B, size_t ldb,
                     size_t j0, float* C, int64_t ldc, size_t w) {
  vf acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < NV; i++) acc[r][i] = vf{};
  }
  for (size_t k = k0; k < k1; k++) {
    const float* b = B + k * ldb + j0;
    vf bv[NV];
    for (int i = 0; i < NV; i++) bv[i] = load(b + 16 * i);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      const float a = A[r * ars + (int64_t)k * acs];
      for (int i = 0; i < NV; i++) acc[r][i] += bv[i] * a;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; r++) store<NV>(C + r * ldc + j0, acc[r], w);
}

template <int R>
TWL_INLINE void nt_block(const float* A, int64_t ars, int64_t acs, const float* BT, size_t ldb, size_t D, float* C,
                         size_t ldc, size_t ncols, size_t jl, size_t jh) {
  for (size_t j = jl; j < jh; j += 2 * VW) {
    if (jh - j > VW) {
      tile<R, 2>(A, ars, acs, 0, D, BT, ldb, j, C, (int64_t)ldc, std::min<size_t>(2 * VW, ncols - j));
    } else {
      tile<R, 1>(A, ars, acs, 0, D, BT, ldb, j, C, (int64_t)ldc, std::min<size_t>(VW, ncols - j));
    }
  }
}

// C (M, ncols) = A (M, D) BT, row i over its span [lo[i], hi[i]) rounded out to vector blocks (blocks of 4
// rows share the union of their spans); columns outside are left as they are.
TWL_INLINE void product_nt(const float* A, int64_t ars, int64_t acs, size_t M, const float* BT, size_t ldb,
                           size_t D, float* C, size_t ldc, size_t ncols, const uint32_t* lo, const uint32_t* hi) {
  for (size_t i = 0; i < M; i += 4) {
    const size_t R = std::min<size_t>(4, M - i);
    size_t jl = ncols, jh = 0;
    for (size_t r = 0; r < R; r++) {
      if (lo[i + r] < hi[i + r]) {
        jl = std::min<size_t>(jl, lo[i + r]);
        jh = std::max<size_t>(jh, hi[i + r]);
      }
    }
    if (jl >= jh) continue;
    jl = jl / VW * VW;
    jh = round_up(jh, VW);
    const float* a = A + (int64_t)i * ars;
    float* c = C + i * ldc;
    switch (R) {
      case 4: nt_block<4>(a, ars, acs, BT, ldb, D, c, ldc, ncols, jl, jh); break;
      case 3: nt_block<3>(a, ars, acs, BT, ldb, D, c, ldc, ncols, jl, jh); break;
      case 2: nt_block<2>(a, ars, acs, BT, ldb, D, c, ldc, ncols, jl, jh); break;
      default: nt_block<1>(a, ars, acs, BT, ldb, D, c, ldc, ncols, jl, jh); break;
    }
  }
}

template <int R>
TWL_INLINE void nn_block(const float* A, int64_t ars, int64_t acs, size_t c0, size_t c1, const float* B, size_t ldb,
                         size_t D, float* C, int64_t ldc) {
  size_t d = 0;
  for (; d + VW < D; d += 2 * VW) tile<R, 2>(A, ars, acs, c0, c1, B, ldb, d, C, ldc, std::min(2 * VW, D - d));
  for (; d < D; d += VW) tile<R, 1>(A, ars, acs, c0, c1, B, ldb, d, C, ldc, std::min(VW, D - d));
}

// C (M, D) = A (M, K) B (K, ldb >= round_up(D, VW), zero-padded), row i of A nonzero only on its span
// [lo[i], hi[i]); every row of C is written (zeros for an empty span). C's rows are ldc apart.
TWL_INLINE void product_nn(const float* A, int64_t ars, int64_t acs, size_t M, const uint32_t* lo, const uint32_t* hi,
                           const float* B, size_t ldb, size_t D, float* C, int64_t ldc) {
  for (size_t i = 0; i < M; i += 4) {
    const size_t R = std::min<size_t>(4, M - i);
    size_t cl = SIZE_MAX, ch = 0;
    for (size_t r = 0; r < R; r++) {
      if (lo[i + r] < hi[i + r]) {
        cl = std::min<size_t>(cl, lo[i + r]);
        ch = std::max<size_t>(ch, hi[i + r]);
      }
    }
    if (cl >= ch) cl = ch = 0;
    const float* a = A + (int64_t)i * ars;
    float* c = C + (int64_t)i * ldc;
    switch (R) {
      case 4: nn_block<4>(a, ars, acs, cl, ch, B, ldb, D, c, ldc); break;
      case 3: nn_block<3>(a, ars, acs, cl, ch, B, ldb, D, c, ldc); break;
      case 2: nn_block<2>(a, ars, acs, cl, ch, B, ldb, D, c, ldc); break;
      default: nn_block<1>(a, ars, acs, cl, ch, B, ldb, D, c, ldc); break;
    }
  }
}

// dst[d, j] = x(j, d) (D, ld), zeros for j in [T, ld).
TWL_INLINE void pack_transposed(const float* x, int64_t si, int64_t sd, size_t T, size_t D, float* dst, size_t ld) {
  for (size_t d = 0; d < D; d++) {
    float* row = dst + d * ld;
    for (size_t j = 0; j < T; j++) row[j] = x[(int64_t)j * si + (int64_t)d * sd];
    for (size_t j = T; j < ld; j++) row[j] = 0.0f;
  }
}

// dst[j, d] = x(j, d) (T, ld), zeros for d in [D, ld).
TWL_INLINE void pack_rows(const float* x, int64_t si, int64_t sd, size_t T, size_t D, float* dst, size_t ld) {
  for (size_t j = 0; j < T; j++) {
    const float* r = x + (int64_t)j * si;
    float* row = dst + j * ld;
    if (sd == 1) {  // a plain loop: a libc call per row of 32-128 floats costs more than the copy
#pragma omp simd
      for (size_t d = 0; d < D; d++) row[d] = r[d];
    } else {
      for (size_t d = 0; d < D; d++) row[d] = r[(int64_t)d * sd];
    }
    for (size_t d = D; d < ld; d++) row[d] = 0.0f;
  }
}

TWL_INLINE void zero_outside(float* row, size_t n, size_t lo, size_t hi) {
  if (lo >= hi) lo = hi = n;
  for (size_t j = 0; j < lo; j++) row[j] = 0.0f;
  for (size_t j = hi; j < n; j++) row[j] = 0.0f;
}

struct Dims {
  size_t N, H, Tq, Tk, D;
};

// One (batch, head): o = softmax(scale q k^T, mask) v, p kept (Tq, Tk), zero outside each row's span.
TWL_SIMD void head_forward(const float* q, const int64_t* qs, const float* k, const int64_t* ks, const float* v,
                           const int64_t* vs, const uint8_t* mask, int64_t ms, const Spans& sp, float* o,
                           int64_t os, float* p, size_t Tq, size_t Tk, size_t D, float scale, float* scratch) {
  const size_t Tkp = round_up(Tk, VW), Dp = round_up(D, VW);
  float* kt = scratch;          // (D, Tkp)
  float* vp = kt + D * Tkp;     // (Tk, Dp)
  pack_transposed(k, ks[2], ks[3], Tk, D, kt, Tkp);
  pack_rows(v, vs[2], vs[3], Tk, D, vp, Dp);
  product_nt(q, qs[2], qs[3], Tq, kt, Tkp, D, p, Tk, Tk, sp.rlo.data(), sp.rhi.data());  // the scores, in p
  for (size_t i = 0; i < Tq; i++) {
    float* pr = p + i * Tk;
    size_t lo = sp.rlo[i], hi = sp.rhi[i];
    if (lo < hi) {  // the span rounded out to whole vector blocks (masked there): no scalar tail loops
      lo = lo / VW * VW;
      hi = std::min(round_up(hi, VW), Tk);
      masked_softmax_row(pr + lo, mask ? mask + (int64_t)i * ms + lo : nullptr, pr + lo, hi - lo, scale);
    }
    zero_outside(pr, Tk, lo, hi);
  }
  product_nn(p, (int64_t)Tk, 1, Tq, sp.rlo.data(), sp.rhi.data(), vp, Dp, D, o, os);
}

// One (batch, head) of the VJP: dp = do v^T, ds = scale p (dp - rowsum(dp p)), dq = ds k, dk = ds^T q,
// dv = p^T do. `no_rowsum` (tests only) drops the row-sum term.
TWL_SIMD void head_backward(const float* q, const int64_t* qs, const float* k, const int64_t* ks, const float* v,
                            const int64_t* vs, const float* p, const float* g, const int64_t* gs, const Spans& sp,
                            float* dq, float* dk, float* dv, int64_t os, size_t Tq, size_t Tk, size_t D, float scale,
                            bool no_rowsum, float* scratch) {
  const size_t Tkp = round_up(Tk, VW), Dp = round_up(D, VW);
  float* vt = scratch;          // (D, Tkp)
  float* kp = vt + D * Tkp;     // (Tk, Dp)
  float* qp = kp + Tk * Dp;     // (Tq, Dp)
  float* gp = qp + Tq * Dp;     // (Tq, Dp)
  float* ds = gp + Tq * Dp;     // (Tq, Tk)
  pack_transposed(v, vs[2], vs[3], Tk, D, vt, Tkp);
  pack_rows(k, ks[2], ks[3], Tk, D, kp, Dp);
  pack_rows(q, qs[2], qs[3], Tq, D, qp, Dp);
  pack_rows(g, gs[2], gs[3], Tq, D, gp, Dp);
  product_nt(gp, (int64_t)Dp, 1, Tq, vt, Tkp, D, ds, Tk, Tk, sp.rlo.data(), sp.rhi.data());  // dp
  for (size_t i = 0; i < Tq; i++) {
    const float* pr = p + i * Tk;
    float* dr = ds + i * Tk;
    size_t lo = sp.rlo[i], hi = sp.rhi[i];
    if (lo < hi) {  // rounded out as in the forward (p is zero there)
      lo = lo / VW * VW;
      hi = std::min(round_up(hi, VW), Tk);
      if (no_rowsum) {
#pragma omp simd
        for (size_t j = lo; j < hi; j++) dr[j] = scale * (pr[j] * dr[j]);
      } else {
        softmax_bwd_row(pr + lo, dr + lo, dr + lo, hi - lo, scale);
      }
    }
    zero_outside(dr, Tk, lo, hi);
  }
  product_nn(ds, (int64_t)Tk, 1, Tq, sp.rlo.data(), sp.rhi.data(), kp, Dp, D, dq, os);   // dq = ds k
  product_nn(ds, 1, (int64_t)Tk, Tk, sp.clo.data(), sp.chi.data(), qp, Dp, D, dk, os);   // dk = ds^T q
  product_nn(p, 1, (int64_t)Tk, Tk, sp.clo.data(), sp.chi.data(), gp, Dp, D, dv, os);    // dv = p^T do
}

// The mask's spans, one per distinct (Tq, Tk) slice of the broadcast (N, H, Tq, Tk) view, and each head's slice.
struct MaskPlan {
  const uint8_t* base = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  std::vector<Spans> spans;
  size_t slice(size_t n, size_t h, size_t H) const {
    return (s[0] ? n : 0) * (s[1] ? H : 1) + (s[1] ? h : 0);
  }
  const uint8_t* rows(size_t n, size_t h) const {
    return base ? base + (int64_t)n * s[0] + (int64_t)h * s[1] : nullptr;
  }
};

// Where the mask is (at eval_cpu time: its buffer exists, its contents may not be computed yet).
MaskPlan locate_mask(const mx::array* m) {
  MaskPlan plan;
  if (!m) return plan;
  plan.base = reinterpret_cast<const uint8_t*>(m->data<bool>());
  for (int d = 0; d < 4; d++) plan.s[d] = m->strides()[d];
  return plan;
}

// The spans, read from the mask's values: inside the dispatched task only, after the tasks that compute
// the mask have run (reading them in eval_cpu raced with a mask computed in the same graph).
void plan_spans(MaskPlan& plan, const Dims& dm) {
  if (!plan.base) {
    plan.spans.push_back(spans_of(nullptr, 0, dm.Tq, dm.Tk));
    return;
  }
  size_t nn = plan.s[0] ? dm.N : 1, nh = plan.s[1] ? dm.H : 1;
  for (size_t n = 0; n < nn; n++) {
    for (size_t h = 0; h < nh; h++) plan.spans.push_back(spans_of(plan.rows(n, h), plan.s[2], dm.Tq, dm.Tk));
  }
}

std::vector<float>& scratch_for(size_t floats) {
  thread_local std::vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
  return buf;
}

int64_t merged_row_stride(const Dims& d) { return (int64_t)(d.H * d.D); }

}  // namespace

// ---- the op -------------------------------------------------------------------------------------------
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, const std::optional<mx::array>& mask,
                    float scale, int fault, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  for (const auto* a : {&q, &k, &v}) {
    if (a->dtype() != mx::float32) throw std::invalid_argument("attention: float32 only");
    if (a->ndim() != 4) throw std::invalid_argument("attention: q, k, v must be (N, H, T, D)");
  }
  if (k.shape() != v.shape() || k.shape(0) != q.shape(0) || k.shape(1) != q.shape(1) || k.shape(3) != q.shape(3)) {
    throw std::invalid_argument("attention: q (N, H, Tq, D) and k, v (N, H, Tk, D) of one batch, heads and D");
  }
  if (k.shape(2) > ATTENTION_MAX_KEYS) throw std::invalid_argument("attention: more keys than the kernel takes");
  std::vector<mx::array> inputs = {q, k, v};
  mx::Shape scores = {q.shape(0), q.shape(1), q.shape(2), k.shape(2)};
  if (mask) {
    auto m = mx::astype(*mask, mx::bool_, stream);
    if (m.ndim() > 4) throw std::invalid_argument("attention: the mask must broadcast to (N, H, Tq, Tk)");
    bool keys_broadcast = m.ndim() == 0 || m.shape(-1) != scores[3];
    m = mx::broadcast_to(mx::contiguous(m, false, stream), scores, stream);  // a strided view
    if (keys_broadcast) m = mx::contiguous(m, false, stream);               // the key axis must have stride 1
    inputs.push_back(m);
  }
  auto outs = mx::array::make_arrays({q.shape(), scores}, {mx::float32, mx::float32},
                                     std::make_shared<Attention>(stream, scale, mask.has_value(), fault), inputs);
  return outs[0];
}

void Attention::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  Dims dm{(size_t)in[0].shape(0), (size_t)in[0].shape(1), (size_t)in[0].shape(2), (size_t)in[1].shape(2),
          (size_t)in[0].shape(3)};
  allocate_merged(out[0]);
  out[1].set_data(mx::allocator::malloc(out[1].nbytes()));
  if (out[1].size() == 0 && out[0].size() == 0) return;
  launch(stream(), [q = view_of(in[0]), k = view_of(in[1]), v = view_of(in[2]),
                    plan = locate_mask(mask_ ? &in[3] : nullptr), o = out[0].data<float>(),
                    p = out[1].data<float>(), dm, scale = fault_ == 1 ? 1.0f : scale_]() mutable {
    if (dm.Tk == 0) {  // no key at all: every row is empty
      std::memset(o, 0, dm.N * dm.H * dm.Tq * dm.D * sizeof(float));
      return;
    }
    const size_t need = dm.D * round_up(dm.Tk, VW) + dm.Tk * round_up(dm.D, VW);
    const int64_t os = merged_row_stride(dm);
    plan_spans(plan, dm);
    parallel_rows(dm.N * dm.H, dm.Tq * dm.Tk * 4, [&](int, size_t b, size_t e) {
      float* scratch = scratch_for(need).data();
      for (size_t pair = b; pair < e; pair++) {
        const size_t n = pair / dm.H, h = pair % dm.H;
        head_forward(q.head(n, h), q.s, k.head(n, h), k.s, v.head(n, h), v.s, plan.rows(n, h), plan.s[2],
                     plan.spans[plan.slice(n, h, dm.H)], o + n * dm.Tq * dm.H * dm.D + h * dm.D, os,
                     p + pair * dm.Tq * dm.Tk, dm.Tq, dm.Tk, dm.D, scale, scratch);
      }
    });
  });
}

std::vector<mx::array> Attention::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                      const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  if (cot[0].dtype() != mx::float32) throw std::invalid_argument("attention vjp: float32 only");
  std::vector<mx::array> inputs(primals.begin(), primals.end());
  inputs.push_back(outputs[1]);
  inputs.push_back(cot[0]);
  auto grads = mx::array::make_arrays({primals[0].shape(), primals[1].shape(), primals[2].shape()},
                                      {mx::float32, mx::float32, mx::float32},
                                      std::make_shared<AttentionGrad>(stream(), scale_, mask_, fault_), inputs);
  std::vector<mx::array> result;
  for (int a : argnums) result.push_back(a < 3 ? grads[a] : mx::zeros_like(primals[a], stream()));
  return result;
}

bool Attention::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const Attention&>(other);
  return scale_ == o.scale_ && mask_ == o.mask_ && fault_ == o.fault_;
}

void AttentionGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  Dims dm{(size_t)in[0].shape(0), (size_t)in[0].shape(1), (size_t)in[0].shape(2), (size_t)in[1].shape(2),
          (size_t)in[0].shape(3)};
  for (auto& o : out) allocate_merged(o);
  const size_t at = mask_ ? 4 : 3;
  launch(stream(), [q = view_of(in[0]), k = view_of(in[1]), v = view_of(in[2]),
                    plan = locate_mask(mask_ ? &in[3] : nullptr), p = in[at].data<float>(), g = view_of(in[at + 1]),
                    dq = out[0].data<float>(), dk = out[1].data<float>(), dv = out[2].data<float>(), dm,
                    scale = scale_, no_rowsum = fault_ == 2]() mutable {
    if (dm.Tq == 0 || dm.Tk == 0) {  // no product at all: zero gradients
      std::memset(dq, 0, dm.N * dm.H * dm.Tq * dm.D * sizeof(float));
      std::memset(dk, 0, dm.N * dm.H * dm.Tk * dm.D * sizeof(float));
      std::memset(dv, 0, dm.N * dm.H * dm.Tk * dm.D * sizeof(float));
      return;
    }
    const size_t Dp = round_up(dm.D, VW);
    const size_t need = dm.D * round_up(dm.Tk, VW) + dm.Tk * Dp + 2 * dm.Tq * Dp + dm.Tq * dm.Tk;
    const int64_t os = merged_row_stride(dm);
    plan_spans(plan, dm);
    parallel_rows(dm.N * dm.H, dm.Tq * dm.Tk * 8, [&](int, size_t b, size_t e) {
      float* scratch = scratch_for(need).data();
      for (size_t pair = b; pair < e; pair++) {
        const size_t n = pair / dm.H, h = pair % dm.H;
        head_backward(q.head(n, h), q.s, k.head(n, h), k.s, v.head(n, h), v.s, p + pair * dm.Tq * dm.Tk,
                      g.head(n, h), g.s, plan.spans[plan.slice(n, h, dm.H)], dq + n * dm.Tq * os + h * dm.D,
                      dk + n * dm.Tk * os + h * dm.D, dv + n * dm.Tk * os + h * dm.D, os, dm.Tq, dm.Tk, dm.D, scale,
                      no_rowsum, scratch);
      }
    });
  });
}

bool AttentionGrad::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const AttentionGrad&>(other);
  return scale_ == o.scale_ && mask_ == o.mask_ && fault_ == o.fault_;
}

// ---- the head split: views forward, one gather backward ------------------------------------------------
std::vector<mx::array> split_heads(const mx::array& qkv, int n_head, int n_kv_head, int head_dim, int fault,
                                   mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (qkv.dtype() != mx::float32) throw std::invalid_argument("split_heads: float32 only");
  if (qkv.ndim() != 3 || n_head < 1 || n_kv_head < 1 || head_dim < 1 ||
      qkv.shape(2) != (int64_t)(n_head + 2 * n_kv_head) * head_dim) {
    throw std::invalid_argument("split_heads: qkv must be (N, T, (n_head + 2 n_kv_head) head_dim)");
  }
  int N = qkv.shape(0), T = qkv.shape(1);
  return mx::array::make_arrays({{N, n_head, T, head_dim}, {N, n_kv_head, T, head_dim}, {N, n_kv_head, T, head_dim}},
                                {mx::float32, mx::float32, mx::float32},
                                std::make_shared<SplitHeads>(stream, n_head, n_kv_head, head_dim, fault),
                                {row_contiguous(qkv, stream)});
}

void SplitHeads::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const auto& x = in[0];  // row-contiguous (N, T, C)
  const int64_t T = x.shape(1), C = x.shape(2), D = d_;
  const int64_t first[3] = {0, (int64_t)h_ * D, (int64_t)(h_ + hkv_) * D};
  for (int i = 0; i < 3; i++) {
    auto& o = out[i];
    const auto& sh = o.shape();
    mx::Strides st = {T * C, D, C, 1};
    // The elements the view can reach, from its first: 1 + sum (shape - 1) stride (0 for an empty view).
    int64_t reach = o.size() ? 1 : 0;
    for (int d = 0; d < 4 && o.size(); d++) reach += (sh[d] - 1) * st[d];
    mx::array::Flags f{};
    f.row_contiguous = o.size() <= 1 || (sh[1] == 1 && sh[2] == 1 && sh[0] == 1);
    f.contiguous = f.row_contiguous;
    f.col_contiguous = o.size() <= 1;
    o.copy_shared_buffer(x, st, f, (size_t)reach, first[i]);
  }
}

std::vector<mx::array> SplitHeads::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                       const std::vector<int>& argnums, const std::vector<mx::array>&) {
  for (const auto& c : cot) {
    if (c.dtype() != mx::float32) throw std::invalid_argument("split_heads vjp: float32 only");
  }
  std::vector<mx::array> result;
  for (int a : argnums) {
    (void)a;
    result.push_back(mx::array(primals[0].shape(), mx::float32, std::make_shared<MergeHeadsGrad>(stream(), fault_),
                               {cot[0], cot[1], cot[2]}));
  }
  return result;
}

bool SplitHeads::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const SplitHeads&>(other);
  return h_ == o.h_ && hkv_ == o.hkv_ && d_ == o.d_ && fault_ == o.fault_;
}

namespace {

// Row (n, t) of the gradient: each head's D values of dq, then dk, then dv, read through their strides.
TWL_SIMD void gather_heads(const View* g, const size_t* heads, float* out, size_t T, size_t C, size_t D,
                           size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    const size_t n = r / T, t = r % T;
    float* o = out + r * C;
    for (int i = 0; i < 3; i++) {
      const View& v = g[i];
      for (size_t h = 0; h < heads[i]; h++) {
        const float* src = v.head(n, h) + (int64_t)t * v.s[2];
        if (v.s[3] == 1) {
#pragma omp simd
          for (size_t d = 0; d < D; d++) o[d] = src[d];
        } else {
          for (size_t d = 0; d < D; d++) o[d] = src[(int64_t)d * v.s[3]];
        }
        o += D;
      }
    }
  }
}

}  // namespace

void MergeHeadsGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  out[0].set_data(mx::allocator::malloc(out[0].nbytes()));
  const size_t N = in[0].shape(0), T = in[0].shape(2), D = in[0].shape(3);
  const size_t C = out[0].shape(2);
  std::array<View, 3> g = {view_of(in[0]), view_of(in[1]), view_of(in[2])};
  if (fault_ == 1) std::swap(g[1], g[2]);
  std::array<size_t, 3> heads = {(size_t)in[0].shape(1), (size_t)in[1].shape(1), (size_t)in[2].shape(1)};
  launch(stream(), [g, heads, o = out[0].data<float>(), N, T, C, D] {
    parallel_rows(N * T, C, [&](int, size_t r0, size_t r1) {
      gather_heads(g.data(), heads.data(), o, T, C, D, r0, r1);
    });
  });
}

bool MergeHeadsGrad::is_equivalent(const mx::Primitive& other) const {
  return fault_ == static_cast<const MergeHeadsGrad&>(other).fault_;
}

}  // namespace twinlm
