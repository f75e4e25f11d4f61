"""twinlm's MLX CPU kernels (twinlm/backends/kernels): each kernel's forward and gradient against
float64 numpy and against the core's reference body, at odd sizes (not multiples of the vector width),
sizes split over threads, padding masks and large magnitudes; a deliberately wrong kernel is caught by
the parity suite's override checks; mx.compile; the fallbacks (TWINLM_KERNELS=0, not built)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from twinlm import parity
from twinlm.backends import kernels

mx = pytest.importorskip("mlx.core")
from twinlm.backends.mlx import MLXBackend  # noqa: E402

K = kernels.load()
needs_kernels = pytest.mark.skipif(K is None, reason=f"kernels not active: {kernels.status().reason}")
B = MLXBackend()
REF = MLXBackend(kernels=False)  # MLX's own ops
BODY = parity.with_mixin(B, parity._ReferenceComposites, "Reference")  # the core's reference bodies


def rand(*shape, scale=1.0, seed=0):
    return (np.random.default_rng(seed + sum(shape)).standard_normal(shape) * scale).astype(np.float32)


def value_and_grads(fn, *xs, seed=1):
    """fn(*xs) and the gradients of sum(fn(*xs) * w) for a fixed random w, as float64 numpy."""
    arrays = [mx.array(x) for x in xs]
    out = fn(*arrays)
    w = mx.array(rand(*out.shape, seed=seed)) if out.ndim else mx.array(1.0)
    floats = [i for i, x in enumerate(xs) if x.dtype.kind == "f"]

    def loss(*diff):
        args = list(arrays)
        for i, d in zip(floats, diff, strict=True):
            args[i] = d
        return mx.sum(fn(*args) * w)

    grads = mx.grad(loss, argnums=tuple(range(len(floats))))(*[arrays[i] for i in floats])
    grads = grads if isinstance(grads, tuple) else (grads,)
    return [np.array(out, dtype=np.float64)] + [np.array(g, dtype=np.float64) for g in grads]


def assert_close(got, want, atol, rtol=1e-5):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (i, g.shape, w.shape)
        np.testing.assert_allclose(g, w, atol=atol, rtol=rtol, err_msg=f"output {i} (0 = value, then grads)")


def np_erf(x):
    return np.vectorize(math.erf)(x)


# ---- forward and gradient against float64 numpy and the reference body ---------------------------------

@needs_kernels
@pytest.mark.parametrize("shape", [(3, 5), (7, 13), (300, 257)])  # odd; the last is split over threads
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: deep in erf's clamp and exp's underflow
def test_gelu(shape, scale) -> None:
    x = rand(*shape, scale=scale)
    got = value_and_grads(B.gelu, x)
    assert_close(got, value_and_grads(BODY.gelu, x), atol=2e-6 * scale)
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1 + np_erf(x64 / math.sqrt(2)))
    np.testing.assert_allclose(got[0], x64 * cdf, atol=2e-6 * scale, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 5), (300, 257)])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_gelu_tanh(shape, scale) -> None:
    x = rand(*shape, scale=scale)
    got = value_and_grads(B.gelu_tanh, x)
    assert_close(got, value_and_grads(BODY.gelu_tanh, x), atol=3e-6 * scale)
    x64 = x.astype(np.float64)
    want = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    np.testing.assert_allclose(got[0], want, atol=3e-6 * scale, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 13), (5, 131), (400, 129)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(shape, bias) -> None:
    c = shape[-1]
    x, w, b = rand(*shape, scale=3.0) + 5.0, rand(c), rand(c, seed=3)  # an offset mean, like real activations
    if bias:
        got = value_and_grads(lambda x, w, b: B.layer_norm(x, w, b), x, w, b)
        want = value_and_grads(lambda x, w, b: BODY.layer_norm(x, w, b), x, w, b)
    else:
        got = value_and_grads(lambda x, w: B.layer_norm(x, w, None), x, w)
        want = value_and_grads(lambda x, w: BODY.layer_norm(x, w, None), x, w)
    assert_close(got, want, atol=5e-5, rtol=1e-4)
    x64 = x.astype(np.float64)
    mu, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    np.testing.assert_allclose(got[0], (x64 - mu) / np.sqrt(var + 1e-5) * w + (b if bias else 0), atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 13), (400, 129)])
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_layer_norm_eps_reaches_the_kernel(shape, eps) -> None:
    x, w, b = rand(*shape) * 1e-3, rand(shape[-1]), rand(shape[-1])
    got = value_and_grads(lambda x, w, b: B.layer_norm(x, w, b, eps), x, w, b)
    want = value_and_grads(lambda x, w, b: BODY.layer_norm(x, w, b, eps), x, w, b)
    assert_close(got, want, atol=5e-4, rtol=1e-3)


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 13), (400, 129)])
def test_rms_norm(shape) -> None:
    x, w = rand(*shape, scale=3.0), rand(shape[-1])
    got = value_and_grads(lambda x, w: B.rms_norm(x, w), x, w)
    assert_close(got, value_and_grads(lambda x, w: BODY.rms_norm(x, w), x, w), atol=5e-5, rtol=1e-4)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(got[0], x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * w, atol=1e-5)


def np_attention(q, k, v, mask):
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    with np.errstate(invalid="ignore"):  # a row with no key: NaN here, zeros from the kernel
        e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True) @ v


@needs_kernels
@pytest.mark.parametrize("mask_kind", ["causal", "padding", "none", "keys"])
@pytest.mark.parametrize("dims", [(2, 3, 7, 5), (3, 4, 67, 33)])  # odd T and head size; the last threads
def test_attention(mask_kind, dims) -> None:
    b, h, t, hs = dims
    q, k, v = (rand(b, h, t, hs, seed=i) for i in range(3))
    rng = np.random.default_rng(0)
    if mask_kind == "causal":
        mask = np.tril(np.ones((t, t), dtype=bool))
    elif mask_kind == "padding":  # (B, 1, T, T): causal and padded keys, every row keeps key 0
        keep = np.arange(t)[None, :] < rng.integers(1, t + 1, (b, 1))
        mask = (np.tril(np.ones((t, t), dtype=bool))[None] & keep[:, None, :])[:, None]
    elif mask_kind == "keys":  # (B, 1, 1, T): a key-padding mask broadcast over queries
        mask = (np.arange(t)[None, :] < rng.integers(1, t + 1, (b, 1)))[:, None, None, :]
    else:
        mask = None
    if mask is None:
        got = value_and_grads(lambda q, k, v: B.attention(q, k, v, None), q, k, v)
        want = value_and_grads(lambda q, k, v: BODY.attention(q, k, v, None), q, k, v)
    else:
        got = value_and_grads(lambda q, k, v, m: B.attention(q, k, v, m), q, k, v, mask)
        want = value_and_grads(lambda q, k, v, m: BODY.attention(q, k, v, m), q, k, v, mask)
    assert_close(got, want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got[0], np_attention(q, k, v, mask), atol=2e-5)


@needs_kernels
def test_attention_fully_masked_row_gives_zeros_not_nan() -> None:
    q, k, v = (rand(1, 2, 4, 3, seed=i) for i in range(3))
    mask = np.ones((1, 1, 4, 4), dtype=bool)
    mask[..., 2, :] = False  # a padding query that sees no key
    got = value_and_grads(lambda q, k, v, m: B.attention(q, k, v, m), q, k, v, mask)
    assert all(np.isfinite(g).all() for g in got)
    assert (got[0][:, :, 2] == 0).all()
    keep = [0, 1, 3]
    np.testing.assert_allclose(got[0][:, :, keep], np_attention(q, k, v, mask)[:, :, keep], atol=2e-5)


@needs_kernels
def test_attention_large_scores_and_dropout() -> None:
    q, k, v = (rand(2, 2, 9, 8, seed=i, scale=20.0) for i in range(3))  # saturated softmax rows
    mask = np.tril(np.ones((9, 9), dtype=bool))
    keep = (np.random.default_rng(0).random((2, 2, 9, 9)) > 0.2).astype(np.float32) / 0.8
    got = value_and_grads(lambda q, k, v, m, d: B.attention(q, k, v, m, d), q, k, v, mask, keep)
    want = value_and_grads(lambda q, k, v, m, d: BODY.attention(q, k, v, m, d), q, k, v, mask, keep)
    assert_close(got, want, atol=2e-3, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("n,vocab", [(7, 11), (2 * 67, 65), (600, 301)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy(n, vocab, scale, weighted) -> None:
    logits = rand(n, vocab, scale=scale)
    rng = np.random.default_rng(n)
    targets = rng.integers(0, vocab, n).astype(np.int32)
    if weighted:
        weights = (rng.random(n) > 0.3).astype(np.float32)
        got = value_and_grads(lambda x, t, w: B.cross_entropy(x, t, w), logits, targets, weights)
        want = value_and_grads(lambda x, t, w: BODY.cross_entropy(x, t, w), logits, targets, weights)
    else:
        weights = np.ones(n, dtype=np.float32)
        got = value_and_grads(lambda x, t: B.cross_entropy(x, t), logits, targets)
        want = value_and_grads(lambda x, t: BODY.cross_entropy(x, t), logits, targets)
    assert_close(got[:2], want[:2], atol=2e-6 * scale, rtol=1e-5)
    x = logits.astype(np.float64)
    lse = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
    nll = lse - x[np.arange(n), targets]
    assert got[0] == pytest.approx((nll * weights).sum() / weights.sum(), rel=1e-5)


@needs_kernels
def test_cross_entropy_three_dim_logits() -> None:
    logits, targets = rand(2, 5, 9), (np.arange(10).reshape(2, 5) % 9).astype(np.int32)
    got = value_and_grads(lambda x, t: B.cross_entropy(x, t), logits, targets)
    assert_close(got, value_and_grads(lambda x, t: BODY.cross_entropy(x, t), logits, targets), atol=1e-6)


# ---- threads, strides, dtypes, compile ---------------------------------------------------------------------

@needs_kernels
def test_results_do_not_depend_on_the_thread_count() -> None:
    x, w, b = rand(512, 131, scale=2.0), rand(131), rand(131)
    f = lambda x, w, b: B.gelu(B.layer_norm(x, w, b))  # noqa: E731
    before = K.threads()
    try:
        runs = []
        for n in (1, 2, 3):
            K.set_threads(n)
            runs.append(value_and_grads(f, x, w, b))
    finally:
        K.set_threads(before)
    for other in runs[1:]:
        assert_close(other, runs[0], atol=2e-5, rtol=1e-5)  # dw, db sum per-chunk partials
        np.testing.assert_array_equal(other[0], runs[0][0])  # row-wise results: bit for bit


@needs_kernels
def test_strided_inputs() -> None:
    x = rand(13, 7)
    xt = mx.transpose(mx.array(x))  # (7, 13), not row-contiguous
    np.testing.assert_allclose(np.array(B.gelu(xt)), np.array(BODY.gelu(mx.array(x.T.copy()))), atol=1e-6)
    w = mx.array(rand(13))
    got = np.array(B.layer_norm(xt, w, None))
    np.testing.assert_allclose(got, np.array(BODY.layer_norm(mx.array(x.T.copy()), w, None)), atol=1e-5)


@needs_kernels
def test_other_dtypes_take_the_reference_path() -> None:
    x = mx.array(rand(4, 6)).astype(mx.float64)
    np.testing.assert_array_equal(np.array(B.gelu(x)), np.array(BODY.gelu(x)))


@needs_kernels
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_low_precision_inputs_run_the_float32_kernel(dtype) -> None:
    """bfloat16/float16: widened, the float32 kernel, rounded back once (MLX's own ops in these dtypes are
    scalar-speed on x86); the result in the input's dtype, within its rounding of the reference body's."""
    x = mx.array(rand(4, 6)).astype(dtype)
    got = B.gelu(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)),
                                  np.array(K.gelu(x.astype(mx.float32)).astype(dtype).astype(mx.float32)))
    ulp = 2.0 ** -7 if dtype == mx.bfloat16 else 2.0 ** -10
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(BODY.gelu(x).astype(mx.float32)),
                               rtol=2 * ulp, atol=2 * ulp)
    s, n = B.add_rms_norm(x, x, mx.ones(6, dtype=dtype))  # a pair: both rounded back
    assert s.dtype == n.dtype == dtype
    assert B.cross_entropy(x, mx.zeros(4, dtype=mx.int32)).dtype == mx.float32  # the loss stays float32


@needs_kernels
def test_kernels_inside_mx_compile() -> None:
    x, w, b = rand(6, 33), rand(33), rand(33)
    t = (np.arange(6) % 33).astype(np.int32)

    def loss(x, w, b, t):
        return B.cross_entropy(B.gelu(B.layer_norm(x, w, b)), t)

    grad = mx.value_and_grad(loss, argnums=(0, 1, 2))
    args = [mx.array(a) for a in (x, w, b, t)]
    eager = grad(*args)
    compiled = mx.compile(grad)
    for _ in range(2):  # trace, then replay
        got = compiled(*args)
        assert float(got[0]) == pytest.approx(float(eager[0]), abs=1e-6)
        for g, e in zip(got[1], eager[1], strict=True):
            np.testing.assert_allclose(np.array(g), np.array(e), atol=1e-6)


# ---- registration, negative controls, fallbacks ----------------------------------------------------------

def test_kernels_are_registered_as_overrides() -> None:
    kernels_for = {"linear", "gelu", "gelu_tanh", "swiglu", "rope", "layer_norm", "rms_norm", "attention",
                   "cross_entropy", "add_layer_norm", "add_rms_norm"}
    assert kernels_for <= set(parity.overridden_composites(B))


@needs_kernels
def test_override_checks_pass() -> None:
    checks = parity.override_checks(B)
    assert {"gelu grad x0", "gelu_tanh grad x0", "rms_norm grad x1", "cross_entropy weighted forward",
            "attention padding grad x0", "swiglu grad x1", "rope grad x0", "linear grad x2",
            "linear no bias grad x1"} <= {c.name for c in checks}
    assert all(c.ok for c in checks), [c.label for c in checks if not c.ok]


class _Wrong:
    """The kernels module with one kernel made slightly wrong (value or gradient)."""

    def __init__(self, which: str) -> None:
        self.which = which

    def __getattr__(self, name):
        return getattr(K, name)

    def gelu(self, x, tanh_form=False):
        y = K.gelu(x, tanh_form)
        return y * 1.01 if self.which == "gelu value" and not tanh_form else y  # rtol is 1e-3

    def layer_norm(self, x, w, b, eps):
        return K.layer_norm(x, w, b, 1e-2 if self.which == "layer_norm eps" else eps)

    def masked_softmax(self, s, mask, scale):
        return K.masked_softmax(s, None if self.which == "mask dropped" else mask, scale)

    def attention(self, q, k, v, mask, scale):  # the fused kernel (short key axes)
        fault = {"attention scale dropped": 1, "attention no rowsum": 2}.get(self.which, 0)  # see attention.h
        if fault:
            return K._attention_faulty(q, k, v, mask, scale, fault)
        return K.attention(q, k, v, None if self.which == "mask dropped" else mask, scale)

    def rope(self, x, cos, sin):
        return K.rope(x, cos, -sin if self.which == "rope sign" else sin)

    def swiglu(self, gate, up):
        return K.swiglu(up, gate) if self.which == "swiglu swapped" else K.swiglu(gate, up)

    def linear(self, x, w, b):
        fault = {"linear beta 0": 1, "linear no db": 2}.get(self.which, 0)  # C++ faults, see primitives.h
        return K._linear_faulty(x, w, b, fault) if fault else K.linear(x, w, b)

    def linear_lowp(self, x, w, b):  # (MLX's float32 layers at <= 16 rows)
        fault = {"gemv no db": 3}.get(self.which, 0)  # see lowp.h
        return K._linear_lowp_faulty(x, w, b, fault) if fault else K.linear_lowp(x, w, b)

    def add_layer_norm(self, x, y, w, b, eps):
        fault = {"add_norm no residual grad": 1, "add_norm forgets y": 2}.get(self.which, 0)  # see fused.h
        return K._add_layer_norm_faulty(x, y, w, b, eps, fault)

    def add_rms_norm(self, x, y, w, eps):
        fault = {"add_rms_norm no residual grad": 1}.get(self.which, 0)
        return K._add_rms_norm_faulty(x, y, w, eps, fault)

    def adamw(self, *args):  # the last argument is the decay list; see optim.h for the faults
        fault = {"adamw no bias correction": 1, "adamw no decay": 2}.get(self.which, 0)
        return K._adamw_faulty(*args, fault) if fault else K.adamw(*args)

    def sum_squares(self, xs):
        return K._sum_squares_faulty(xs, 1) if self.which == "sum_squares drops one" else K.sum_squares(xs)

    def cross_entropy_rows(self, logits, targets):
        if self.which == "ce gradient":  # right value, doubled gradient
            nll = K.cross_entropy_rows(logits, targets)
            return nll + (nll - mx.stop_gradient(nll))
        return K.cross_entropy_rows(logits, targets)


@needs_kernels
@pytest.mark.parametrize("which,case", [
    ("gelu value", "gelu forward"), ("layer_norm eps", "layer_norm forward"),
    ("mask dropped", "attention causal forward"), ("ce gradient", "cross_entropy grad x0"),
    ("rope sign", "rope forward"), ("swiglu swapped", "swiglu forward"),
    ("linear beta 0", "linear forward"), ("linear no db", "linear grad x2"),
    ("gemv no db", "linear few rows grad x2"),
    ("add_norm no residual grad", "add_layer_norm grad x0"), ("add_norm forgets y", "add_layer_norm forward"),
    ("add_rms_norm no residual grad", "add_rms_norm grad x1"),
    ("attention scale dropped", "attention heads split forward"),
    ("attention no rowsum", "attention causal grad x0"),
    ("adamw no bias correction", "adamw forward"), ("adamw no decay", "adamw forward"),
    ("sum_squares drops one", "sum_squares forward")])
def test_a_wrong_kernel_is_caught_by_the_override_checks(which, case) -> None:
    broken = MLXBackend()
    broken.kernels = _Wrong(which)
    failed = {c.name for c in parity.override_checks(broken) if not c.ok}
    assert case in failed, failed


def test_a_replaced_gelu_derivative_bypasses_the_kernel() -> None:
    """The kernel computes the pinned maths only: a subclass with another _gelu_grad gets its own."""
    class OtherGrad:
        def _gelu_grad(self, x):
            return 0.5 * (1.0 + self.erf(x * (1.0 / math.sqrt(2.0))))

    broken = parity.with_mixin(B, OtherGrad, "OtherGrad")
    case = next(c for c in parity.op_cases(0) if c.name == "gelu")
    checks = {c.name: c.ok for c in parity.check_op(broken, case)}
    assert checks == {"gelu forward": True, "gelu grad x0": False}


def _loader_status(env: dict[str, str]) -> str:
    code = ("import twinlm.backends.mlx as m; from twinlm.backends import kernels as k; "
            "b = m.MLXBackend(); print(b.kernels is None, '|', k.status().reason)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.strip()


def test_twinlm_kernels_0_turns_them_off() -> None:
    out = _loader_status({"TWINLM_KERNELS": "0"})
    assert out.startswith("True |") and "TWINLM_KERNELS=0" in out


def test_not_built_falls_back_with_the_fix(tmp_path) -> None:
    out = _loader_status({"TWINLM_KERNELS": "1", "TWINLM_KERNELS_DIR": str(tmp_path)})
    assert out.startswith("True |") and "python -m twinlm.backends.kernels.build" in out


def test_build_failure_never_fails_setup(tmp_path) -> None:
    """No cmake on PATH: one warning, exit 0 (and 1 with --strict)."""
    env = {**os.environ, "PATH": str(tmp_path), "TWINLM_KERNELS_DIR": str(tmp_path / "lib")}
    cmd = [sys.executable, "-m", "twinlm.backends.kernels.build", "--no-install"]
    soft = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert soft.returncode == 0 and soft.stderr.count("warning:") == 1 and "cmake" in soft.stderr
    assert subprocess.run(cmd + ["--strict"], capture_output=True, text=True, env=env).returncode == 1


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 5), (2, 67, 131)])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_swiglu(shape, scale) -> None:
    g, u = rand(*shape, scale=scale), rand(*shape, seed=5)
    got = value_and_grads(B.swiglu, g, u)
    want = value_and_grads(BODY.swiglu, g, u)
    # Autodiff through x / (1 + exp(-x)) gives inf / inf = NaN for x < -88; the kernel's closed form does not.
    finite = [np.where(np.isfinite(w), w, g) for g, w in zip(got, want, strict=True)]
    assert_close(got, finite, atol=3e-6 * scale, rtol=1e-5)
    assert all(np.isfinite(a).all() for a in got)
    g64 = g.astype(np.float64)
    sig = 1 / (1 + np.exp(-g64))
    np.testing.assert_allclose(got[0], g64 * sig * u, atol=3e-6 * scale, rtol=1e-5)


@needs_kernels
def test_swiglu_of_slices_like_the_mlp() -> None:
    h = rand(2, 9, 2 * 21)
    f = lambda h: B.swiglu(h[..., :21], h[..., 21:])  # noqa: E731
    assert_close(value_and_grads(f, h), value_and_grads(lambda h: BODY.swiglu(h[..., :21], h[..., 21:]), h),
                 atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dims", [(1, 2, 5, 6), (3, 4, 67, 34)])
def test_rope(dims) -> None:
    from twinlm.core.layers import rope_tables

    b, h, t, hs = dims
    x = rand(*dims, scale=2.0)
    cos, sin = (a.astype(np.float32) for a in rope_tables(t, hs, 10000.0))
    got = value_and_grads(B.rope, x, cos, sin)
    assert_close(got, value_and_grads(BODY.rope, x, cos, sin), atol=2e-5, rtol=1e-5)  # x, cos and sin
    x1, x2 = x[..., : hs // 2].astype(np.float64), x[..., hs // 2:].astype(np.float64)
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    np.testing.assert_allclose(got[0], want, atol=1e-5)


@needs_kernels
def test_rope_of_transposed_heads() -> None:
    from twinlm.core.layers import rope_tables

    x = mx.transpose(mx.array(rand(2, 7, 3, 8)), (0, 2, 1, 3))  # (B, H, T, hs) view, as in attention
    cos, sin = (mx.array(a.astype(np.float32)) for a in rope_tables(7, 8, 10000.0))
    np.testing.assert_allclose(np.array(B.rope(x, cos, sin)), np.array(BODY.rope(x, cos, sin)), atol=1e-6)


# ---- the linear layer: one sgemm onto the bias, its VJP as two sgemm and a column sum ------------------

def np_linear_grads(x, w, b, seed=1):
    """x @ w + b and the gradients of sum(y * g) for value_and_grads' g, in float64."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y = x64 @ w64 + (0.0 if b is None else b.astype(np.float64))
    g = rand(*y.shape, seed=seed).astype(np.float64)
    g2, x2 = g.reshape(-1, w.shape[1]), x64.reshape(-1, w.shape[0])
    out = [y, (g @ w64.T).reshape(x.shape), x2.T @ g2]
    return out if b is None else out + [g2.sum(axis=0)]


@needs_kernels
@pytest.mark.parametrize("x_shape,n_out", [((5,), 3), ((3, 5), 7), ((2, 67, 131), 33), ((600, 129), 65)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(x_shape, n_out, bias) -> None:
    """Batch dims, odd sizes, a 1-D x; the last shape splits the bias gradient over threads."""
    x, w = rand(*x_shape), rand(x_shape[-1], n_out, seed=3)
    args = (x, w) + ((rand(n_out, seed=4),) if bias else ())
    got = value_and_grads(lambda *a: B.linear(a[0], a[1], a[2] if bias else None), *args)
    assert_close(got, np_linear_grads(x, w, args[2] if bias else None), atol=2e-4, rtol=1e-5)
    want = value_and_grads(lambda *a: BODY.linear(a[0], a[1], a[2] if bias else None), *args)
    assert_close(got, want, atol=2e-4, rtol=1e-5)  # MLX's own matmul, add and sum


@needs_kernels
def test_linear_runs_the_kernel() -> None:
    """The adapter routes a float32 linear layer of more than 16 rows to the primitive (a wrong one is seen),
    others not (fewer rows: linear_lowp's GEMV, tests/test_kernels_lowp.py)."""
    x, w, b = (mx.array(a) for a in (rand(20, 6), rand(6, 3), rand(3)))
    broken = MLXBackend()
    broken.kernels = _Wrong("linear beta 0")
    np.testing.assert_allclose(np.array(broken.linear(x, w, b)), np.array(x @ w), atol=1e-6)  # bias dropped
    off = MLXBackend(kernels=False)
    np.testing.assert_allclose(np.array(off.linear(x, w, b)), np.array(x @ w + b), atol=1e-6)
    x16, w16, b16 = (a.astype(mx.float16) for a in (x, w, b))  # a float16 weight: linear_lowp, not linear
    got = np.array(broken.linear(x16, w16, b16))
    np.testing.assert_array_equal(got, np.array(K.linear_lowp(x16, w16, b16)))
    x64 = np.array(x16, np.float64) @ np.array(w16, np.float64) + np.array(b16, np.float64)
    np.testing.assert_allclose(got.astype(np.float64), x64, atol=4e-3)


@needs_kernels
def test_linear_strided_and_broadcast_inputs() -> None:
    """Views that are not row-contiguous (transposed x and weight, a broadcast bias) are copied first."""
    x, w, b = rand(9, 13), rand(7, 9, seed=3), rand(1, seed=4)
    xt, wt = mx.transpose(mx.array(x)), mx.transpose(mx.array(w))  # (13, 9) and (9, 7) views
    bb = mx.broadcast_to(mx.array(b), (7,))
    got = value_and_grads(lambda x, w, b: B.linear(x, w, b), np.array(xt), np.array(wt), np.array(bb))
    np.testing.assert_allclose(np.array(B.linear(xt, wt, bb)), x.T @ w.T + b, atol=1e-5)
    assert_close(got, np_linear_grads(x.T.copy(), w.T.copy(), np.broadcast_to(b, (7,))), atol=1e-4)
    # Through the transposes: d sum(x^T w^T) / dx[i, j] = sum_k w[k, i], / dw[k, i] = sum_j x[i, j].
    dx, dw = mx.grad(lambda x, w: mx.sum(B.linear(mx.transpose(x), mx.transpose(w), None)), argnums=(0, 1))(
        mx.array(x), mx.array(w))
    np.testing.assert_allclose(np.array(dx), np.broadcast_to(w.sum(0)[:, None], (9, 13)), atol=1e-4)
    np.testing.assert_allclose(np.array(dw), np.broadcast_to(x.sum(1)[None, :], (7, 9)), atol=1e-4)


@needs_kernels
def test_linear_empty_and_in_compile() -> None:
    y = B.linear(mx.zeros((0, 4)), mx.array(rand(4, 3)), mx.array(rand(3)))
    assert y.shape == (0, 3)
    b = rand(3)
    np.testing.assert_array_equal(np.array(B.linear(mx.zeros((2, 0)), mx.zeros((0, 3)), mx.array(b))),
                                  np.broadcast_to(b, (2, 3)))
    np.testing.assert_array_equal(np.array(B.linear(mx.zeros((2, 0)), mx.zeros((0, 3)), None)),
                                  np.zeros((2, 3)))
    x, w, bb = (mx.array(a) for a in (rand(5, 8), rand(8, 4), rand(4)))
    loss = lambda x, w, b: mx.sum(B.linear(B.gelu(x), w, b) ** 2)  # noqa: E731
    eager = mx.value_and_grad(loss, argnums=(0, 1, 2))(x, w, bb)
    compiled = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))
    for _ in range(2):
        got = compiled(x, w, bb)
        assert float(got[0]) == pytest.approx(float(eager[0]), rel=1e-6)
        for g, e in zip(got[1], eager[1], strict=True):
            np.testing.assert_allclose(np.array(g), np.array(e), atol=1e-5)


# ---- the embedding: row gather, scatter-add backward split over columns ------------------------------------

def np_take_grads(table, ids, seed=1):
    y = table.astype(np.float64)[ids]
    g = rand(*y.shape, seed=seed).astype(np.float64)
    d = np.zeros(table.shape)
    np.add.at(d, ids, g)  # repeated ids add up
    return [y, d]


@needs_kernels
@pytest.mark.parametrize("vocab,width,ids_shape", [(7, 5, (2, 4)), (65, 128, (12, 64)), (300, 129, (9,))])
def test_embedding(vocab, width, ids_shape) -> None:
    """Repeated and negative ids; (65, 128, (12, 64)) is baby's, its backward split over threads."""
    table = rand(vocab, width)
    ids = np.random.default_rng(2).integers(-vocab, vocab, ids_shape).astype(np.int32)
    got = value_and_grads(lambda t, i: B.take(t, i), table, ids)
    assert_close(got, np_take_grads(table, ids), atol=1e-5)
    assert_close(got, value_and_grads(lambda t, i: REF.take(t, i), table, ids), atol=1e-5)  # mx.take


@needs_kernels
def test_embedding_is_the_same_for_every_thread_count_and_catches_a_lost_repeat() -> None:
    table, ids = rand(65, 128), np.random.default_rng(3).integers(0, 65, (12, 64)).astype(np.int32)
    before = K.threads()
    try:
        runs = []
        for n in (1, 2, 3):
            K.set_threads(n)
            runs.append(value_and_grads(lambda t, i: B.take(t, i), table, ids))
    finally:
        K.set_threads(before)
    for other in runs[1:]:  # each column's sum runs over the ids in order, whoever runs it
        np.testing.assert_array_equal(other[1], runs[0][1])
    # Negative control: a backward that assigns instead of adding is caught by the same comparison.
    wrong = value_and_grads(lambda t, i: K._embedding_faulty(t, i, 1), table, ids)
    with pytest.raises(AssertionError):
        assert_close(wrong, np_take_grads(table, ids), atol=1e-5)


@needs_kernels
def test_embedding_out_of_range_ids_give_nan_not_zeros() -> None:
    got = np.array(K.embedding(mx.array(rand(4, 3)), mx.array(np.array([4, -5, 1], np.int32))))
    assert np.isnan(got[:2]).all() and np.isfinite(got[2]).all()


# ---- fused residual add + norm (issue #23) -----------------------------------------------------------------

def np_add_norm(x, y, w, b, gs, gn, rms, eps=1e-5):
    """float64 (s, n) = (x + y, norm(x + y)) and the analytic gradients of sum(s gs + n gn): ds (= dx = dy),
    dw, db."""
    s = x.astype(np.float64) + y
    c = s.shape[-1]
    if rms:
        r = 1.0 / np.sqrt((s * s).mean(-1, keepdims=True) + eps)
        xh = s * r
    else:
        r = 1.0 / np.sqrt(s.var(-1, keepdims=True) + eps)
        xh = (s - s.mean(-1, keepdims=True)) * r
    n = xh * w + (0.0 if b is None else b)
    gw = gn * w
    if rms:
        dn = r * (gw - xh * (gw * xh).sum(-1, keepdims=True) / c)
    else:
        dn = r * (gw - gw.mean(-1, keepdims=True) - xh * (gw * xh).mean(-1, keepdims=True))
    rows = tuple(range(s.ndim - 1))
    return s, n, gs + dn, (gn * xh).sum(rows), gn.sum(rows)


def add_norm_value_and_grads(fn, x, y, w, b, gs, gn):
    """fn's (s, n) and the gradients of sum(s gs + n gn) for x, y, w (and b)."""
    ins = [mx.array(a) for a in (x, y, w) + (() if b is None else (b,))]
    out = fn(*ins)

    def loss(*a):
        s, n = fn(*a)
        return mx.sum(s * mx.array(gs)) + mx.sum(n * mx.array(gn))

    grads = mx.grad(loss, argnums=tuple(range(len(ins))))(*ins)
    return [np.array(o, np.float64) for o in out], [np.array(g, np.float64) for g in grads]


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 13), (5, 131), (400, 129)])  # odd; the last is split over threads
@pytest.mark.parametrize("kind", ["layernorm", "layernorm no bias", "rmsnorm"])
def test_add_norm_against_numpy(shape, kind) -> None:
    c, rms, bias = shape[-1], kind == "rmsnorm", kind == "layernorm"
    x, y = rand(*shape, scale=3.0) + 2.0, rand(*shape, seed=5)  # an offset mean, like a residual stream
    w, b = rand(c, seed=6), (rand(c, seed=7) if bias else None)
    gs, gn = rand(*shape, seed=8), rand(*shape, seed=9)
    if rms:
        fn = lambda x, y, w: B.add_rms_norm(x, y, w)  # noqa: E731
    else:
        fn = lambda x, y, w, *b: B.add_layer_norm(x, y, w, b[0] if b else None)  # noqa: E731
    (s, n), grads = add_norm_value_and_grads(fn, x, y, w, b, gs, gn)
    ws, wn, wd, wdw, wdb = np_add_norm(x, y, w, b, gs, gn, rms)
    np.testing.assert_array_equal(s, (x + y).astype(np.float64))  # the float32 sum, exactly
    np.testing.assert_allclose(n, wn, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(grads[0], wd, atol=5e-5, rtol=1e-4)  # dx = gs + the norm's input gradient
    np.testing.assert_allclose(grads[1], wd, atol=5e-5, rtol=1e-4)  # dy, the same
    np.testing.assert_allclose(grads[2], wdw, atol=2e-4, rtol=1e-4)
    if bias:
        np.testing.assert_allclose(grads[3], wdb, atol=2e-4, rtol=1e-4)
    # The norm kernels' own value on the sum, bit for bit (the fused loops keep their expressions).
    xs, ys, wm = mx.array(x), mx.array(y), mx.array(w)
    bm = None if b is None else mx.array(b)
    alone = K.rms_norm(xs + ys, wm, 1e-5) if rms else K.layer_norm(xs + ys, wm, bm, 1e-5)
    np.testing.assert_array_equal(n, np.array(alone, np.float64))
    # And the kernel really ran: the same through the core's reference body, and a broken kernel differs.
    body = (lambda x, y, w: BODY.add_rms_norm(x, y, w)) if rms else (  # noqa: E731
        lambda x, y, w, *b: BODY.add_layer_norm(x, y, w, b[0] if b else None))
    (bs, bn), bgrads = add_norm_value_and_grads(body, x, y, w, b, gs, gn)
    np.testing.assert_array_equal(s, bs)
    np.testing.assert_allclose(n, bn, atol=2e-5, rtol=1e-5)
    for g, bg in zip(grads, bgrads, strict=True):
        np.testing.assert_allclose(g, bg, atol=2e-4, rtol=1e-4)


@needs_kernels
def test_add_norm_negative_controls_are_seen_directly() -> None:
    """Each fault changes what the fused path returns (so the tests above could fail)."""
    x, y, w, b = rand(6, 33, scale=2.0), rand(6, 33, seed=2), rand(33, seed=3), rand(33, seed=4)
    gs, gn = rand(6, 33, seed=5), rand(6, 33, seed=6)
    _, _, wd, _, _ = np_add_norm(x, y, w, b, gs, gn, rms=False)
    for which in ("add_norm no residual grad", "add_norm forgets y"):
        broken = MLXBackend()
        broken.kernels = _Wrong(which)
        (s, n), grads = add_norm_value_and_grads(
            lambda x, y, w, b, B=broken: B.add_layer_norm(x, y, w, b), x, y, w, b, gs, gn)
        assert not np.allclose(grads[0], wd, atol=1e-3), which  # forgetting y also changes dx


@needs_kernels
def test_add_norm_thread_count_compile_and_strides() -> None:
    x, y, w, b = rand(512, 131, scale=2.0), rand(512, 131, seed=2), rand(131, seed=3), rand(131, seed=4)
    gs, gn = rand(512, 131, seed=5), rand(512, 131, seed=6)
    fn = lambda x, y, w, b: B.add_layer_norm(x, y, w, b)  # noqa: E731
    before = K.threads()
    try:
        runs = []
        for t in (1, 2, 3):
            K.set_threads(t)
            runs.append(add_norm_value_and_grads(fn, x, y, w, b, gs, gn))
    finally:
        K.set_threads(before)
    for other in runs[1:]:
        for a, r in zip(other[0], runs[0][0], strict=True):
            np.testing.assert_array_equal(a, r)  # row-wise: bit for bit
        for a, r in zip(other[1], runs[0][1], strict=True):
            np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-5)  # dw, db: per-chunk partial sums
    compiled = mx.compile(lambda x, y: B.add_layer_norm(x, y, mx.array(w), mx.array(b)))
    for _ in range(2):  # trace, then replay
        got = compiled(mx.array(x), mx.array(y))
        np.testing.assert_array_equal(np.array(got[1]), runs[0][0][1])
    xt = mx.transpose(mx.array(np.ascontiguousarray(x[:131, :131].T)))  # a transposed view of x's block
    s, n = B.add_rms_norm(xt, mx.array(y[:131, :131]), mx.array(w))
    bs, bn = BODY.add_rms_norm(mx.array(x[:131, :131]), mx.array(y[:131, :131]), mx.array(w))
    np.testing.assert_array_equal(np.array(s), np.array(bs))
    np.testing.assert_allclose(np.array(n), np.array(bn), atol=1e-5)


def test_add_norm_falls_back_without_the_kernel() -> None:
    """Kernels off (TWINLM_KERNELS=0's backend), another dtype or mismatched shapes: the reference body."""
    x, y, w = mx.array(rand(4, 6)), mx.array(rand(4, 6, seed=2)), mx.array(rand(6, seed=3))
    off = MLXBackend(kernels=False)
    s, n = off.add_layer_norm(x, y, w, None)
    np.testing.assert_array_equal(np.array(s), np.array(x + y))
    np.testing.assert_allclose(np.array(n), np.array(mx.fast.layer_norm(x + y, w, None, 1e-5)), atol=1e-6)
    s, n = B.add_rms_norm(x, y[:1], w)  # y broadcast over rows: not the kernel's contract
    np.testing.assert_array_equal(np.array(s), np.array(x + y[:1]))
    s16, n16 = B.add_rms_norm(x.astype(mx.float16), y.astype(mx.float16), w.astype(mx.float16))
    assert s16.dtype == mx.float16 and n16.dtype == mx.float16
