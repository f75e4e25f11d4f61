"""The fused attention kernel of twinlm's MLX CPU kernels (issue #23, `csrc/attention.cpp`): forward and every
gradient against float64 numpy and against the path it replaces (BLAS products around the masked-softmax
kernel), on odd sizes, query and key axes of different lengths, every mask shape the layers pass (causal,
padding, key padding broadcast over queries, sliding window, none) and rows with no key; q, k, v read in place
from the head split's views; thread counts; the fallbacks; and deliberately wrong kernels that the float64
check catches (the negative controls)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from twinlm.backends import kernels
from twinlm.core.backend import Backend

mx = pytest.importorskip("mlx.core")
from twinlm.backends.mlx import MLXBackend  # noqa: E402

K = kernels.load()
pytestmark = pytest.mark.skipif(K is None or not hasattr(K, "attention"),
                                reason=f"kernels not active: {kernels.status().reason}")
B = MLXBackend()


def rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def np_attention_vjp(q, k, v, mask, g, scale):
    """(o, dq, dk, dv) in float64: p = softmax(where(mask, scale q k^T, -inf)), zeros for a row with no
    key."""
    q, k, v, g = (a.astype(np.float64) for a in (q, k, v, g))
    s = scale * q @ np.swapaxes(k, -1, -2)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    d = e.sum(-1, keepdims=True)
    p = np.where(d > 0, e / np.where(d > 0, d, 1.0), 0.0)
    dp = g @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return p @ v, scale * ds @ k, scale * np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ g


def run(fn, q, k, v, g):
    """fn(q, k, v) and its VJP with cotangent g, as float64 numpy."""
    o, grads = mx.vjp(lambda q, k, v: [fn(q, k, v)], [mx.array(q), mx.array(k), mx.array(v)], [mx.array(g)])
    return [np.array(a, dtype=np.float64) for a in (o[0], *grads)]


def masks(kind, n, tq, tk, seed=0):
    rng = np.random.default_rng(seed)
    causal = np.tril(np.ones((tq, tk), bool), tk - tq)  # bottom-right aligned when tq < tk (a cache)
    if kind == "causal":
        return causal
    if kind == "padding":  # (N, 1, Tq, Tk): causal and padded keys; some query rows see no key
        keep = np.arange(tk)[None, :] >= rng.integers(0, tk // 2 + 1, (n, 1))  # left padding
        return (causal[None] & keep[:, None, :])[:, None]
    if kind == "keys":  # (N, 1, 1, Tk) broadcast over queries
        return (np.arange(tk)[None, :] < rng.integers(1, tk + 1, (n, 1)))[:, None, None, :]
    if kind == "window":  # sliding window of 5 keys
        return causal & ~np.tril(np.ones((tq, tk), bool), tk - tq - 5)
    return None


SHAPES = [(2, 3, 7, 7, 5), (2, 2, 67, 67, 33), (1, 2, 20, 45, 40), (1, 1, 33, 33, 128)]


@pytest.mark.parametrize("kind", ["causal", "padding", "keys", "window", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_against_float64_and_the_blas_path(shape, kind) -> None:
    n, h, tq, tk, d = shape
    q, k, v, g = rand(n, h, tq, d, seed=1), rand(n, h, tk, d, seed=2), rand(n, h, tk, d, seed=3), \
        rand(n, h, tq, d, seed=4)
    mask = masks(kind, n, tq, tk)
    scale = 1.0 / math.sqrt(d)
    m = None if mask is None else mx.array(mask)
    got = run(lambda q, k, v: K.attention(q, k, v, m, scale), q, k, v, g)
    want = np_attention_vjp(q, k, v, mask, g, scale)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4, err_msg=f"output {i} (o, dq, dk, dv)")
    blas = run(lambda q, k, v: K.masked_softmax(q @ mx.swapaxes(k, -1, -2), m, scale) @ v, q, k, v, g)
    for i, (a, b) in enumerate(zip(got, blas, strict=True)):
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4, err_msg=f"output {i} against the BLAS path")


def test_rows_with_no_key_give_zeros_and_finite_gradients() -> None:
    q, k, v, g = (rand(2, 2, 9, 6, seed=i) for i in range(4))
    mask = np.tril(np.ones((9, 9), bool))[None, None].repeat(2, 0)
    mask[0, 0, 3, :] = False  # one query sees nothing
    mask[1, 0, :, 4] = False  # one key is seen by no query
    got = run(lambda q, k, v: K.attention(q, k, v, mx.array(mask), 0.4), q, k, v, g)
    assert all(np.isfinite(a).all() for a in got)
    assert (got[0][0, :, 3] == 0).all() and (got[1][0, :, 3] == 0).all()
    for a, b in zip(got, np_attention_vjp(q, k, v, mask, g, 0.4), strict=True):
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4)


def test_saturated_scores() -> None:
    q, k, v, g = (rand(1, 2, 19, 8, seed=i, scale=20.0 if i < 2 else 1.0) for i in range(4))
    mask = np.tril(np.ones((19, 19), bool))
    got = run(lambda q, k, v: K.attention(q, k, v, mx.array(mask), 0.35), q, k, v, g)
    for a, b in zip(got, np_attention_vjp(q, k, v, mask, g, 0.35), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-4)


def test_head_split_views_and_the_merge() -> None:
    """q, k, v as the layers make them (transposed views of one qkv projection's slices), and a transposed
    input whose head dimension is not unit-strided: read in place, the same numbers as contiguous copies."""
    n, t, H, hs = 3, 21, 4, 12
    qkv = rand(n, t, 3 * H * hs, seed=5)
    g = rand(n, t, H * hs, seed=6)
    mask = mx.array(np.tril(np.ones((t, t), bool)))

    def layer(qkv, copy):
        def heads(z):
            z = mx.transpose(mx.reshape(z, (n, t, H, hs)), (0, 2, 1, 3))
            return mx.contiguous(z) if copy else z
        q, k, v = heads(qkv[..., :H * hs]), heads(qkv[..., H * hs:2 * H * hs]), heads(qkv[..., 2 * H * hs:])
        o = K.attention(q, k, v, mask, 0.3)
        return mx.reshape(mx.transpose(o, (0, 2, 1, 3)), (n, t, H * hs))

    res = {}
    for copy in (False, True):
        o, (dqkv,) = mx.vjp(lambda x, c=copy: [layer(x, c)], [mx.array(qkv)], [mx.array(g)])
        res[copy] = (np.array(o[0]), np.array(dqkv))
    np.testing.assert_array_equal(res[False][0], res[True][0])
    np.testing.assert_array_equal(res[False][1], res[True][1])
    q4 = qkv.reshape(n, t, 3, H, hs).transpose(2, 0, 3, 1, 4).astype(np.float64)
    o64 = np_attention_vjp(q4[0], q4[1], q4[2], np.tril(np.ones((t, t), bool)),
                           np.zeros((n, H, t, hs)), 0.3)[0]
    np.testing.assert_allclose(res[False][0], o64.transpose(0, 2, 1, 3).reshape(n, t, H * hs), atol=3e-5)
    kt = mx.swapaxes(mx.array(rand(2, 2, 8, 9, seed=7)), -1, -2)  # (2, 2, 9, 8) with head-dim stride 9
    q = rand(2, 2, 9, 8, seed=8)
    a = K.attention(mx.array(q), kt, kt, None, 0.5)
    b = K.attention(mx.array(q), mx.contiguous(kt), mx.contiguous(kt), None, 0.5)
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_the_same_bits_at_any_thread_count() -> None:
    q, k, v, g = (rand(3, 4, 40, 16, seed=i) for i in range(4))
    mask = mx.array(np.tril(np.ones((40, 40), bool)))
    before = K.threads()
    try:
        res = []
        for threads in (1, 2, 3):
            K.set_threads(threads)
            res.append(run(lambda q, k, v: K.attention(q, k, v, mask, 0.25), q, k, v, g))
    finally:
        K.set_threads(before)
    for other in res[1:]:
        for a, b in zip(res[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_inside_compile() -> None:
    q, k, v, g = (rand(2, 2, 17, 8, seed=i) for i in range(4))
    mask = mx.array(np.tril(np.ones((17, 17), bool)))

    def f(q, k, v, g):
        return mx.vjp(lambda q, k, v: [K.attention(q, k, v, mask, 0.3)], [q, k, v], [g])

    eager = f(*(mx.array(a) for a in (q, k, v, g)))
    comp = mx.compile(f)(*(mx.array(a) for a in (q, k, v, g)))
    for a, b in zip([*eager[0], *eager[1]], [*comp[0], *comp[1]], strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("fault,which", [(1, 0), (2, 1), (2, 2)])
def test_a_wrong_kernel_fails_the_float64_check(fault, which) -> None:
    """Negative controls: the scale dropped (forward), the softmax's row-sum term dropped (dq, dk)."""
    q, k, v, g = (rand(2, 2, 11, 6, seed=i) for i in range(4))
    mask = np.tril(np.ones((11, 11), bool))
    got = run(lambda q, k, v: K._attention_faulty(q, k, v, mx.array(mask), 0.4, fault), q, k, v, g)
    want = np_attention_vjp(q, k, v, mask, g, 0.4)
    assert not np.allclose(got[which], want[which], atol=3e-5, rtol=1e-4)
    right = run(lambda q, k, v: K._attention_faulty(q, k, v, mx.array(mask), 0.4, 0), q, k, v, g)
    np.testing.assert_allclose(right[which], want[which], atol=3e-5, rtol=1e-4)


class _Spy:
    """The kernels module, counting calls to the fused attention."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name):
        return getattr(K, name)

    def attention(self, *args):
        self.calls += 1
        return K.attention(*args)


def test_the_backend_uses_it_where_it_applies_and_falls_back_elsewhere() -> None:
    spy = _Spy()
    Bs = MLXBackend()
    Bs.kernels = spy
    q, k, v = (mx.array(rand(1, 2, 5, 4, seed=i)) for i in range(3))
    causal = mx.array(np.tril(np.ones((5, 5), bool)))
    Bs.attention(q, k, v, causal)
    assert spy.calls == 1
    keep = mx.array(np.ones((1, 2, 5, 5), np.float32))
    Bs.attention(q, k, v, causal, keep)  # dropout: the BLAS path (the kernel has no dropout input)
    Bs.attention(q, k, v, causal, softcap=2.0)  # soft-capped scores: the reference body
    long_k = mx.array(rand(1, 2, K.ATTENTION_MAX_KEYS + 1, 4, seed=9))
    o = Bs.attention(q, long_k, long_k, None)  # too many keys for one head's scores in cache
    Bs.attention_kernel = False
    Bs.attention(q, k, v, causal)
    assert spy.calls == 1
    lk = np.array(long_k)
    want = np_attention_vjp(np.array(q), lk, lk, None, np.zeros((1, 2, 5, 4)), 0.5)[0]
    np.testing.assert_allclose(np.array(o), want, atol=3e-5)


def test_bad_input_is_one_clear_error() -> None:
    q = mx.array(rand(1, 2, 5, 4))
    with pytest.raises(ValueError, match="float32"):
        K.attention(q.astype(mx.float16), q, q, None, 0.5)
    with pytest.raises(ValueError, match=r"\(N, H, T, D\)"):
        K.attention(q[0], q[0], q[0], None, 0.5)
    with pytest.raises(ValueError, match="more keys"):
        big = mx.zeros((1, 2, K.ATTENTION_MAX_KEYS + 1, 4))
        K.attention(q, big, big, None, 0.5)


# ---- the head split --------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [(4, 4, 32), (2, 1, 5), (3, 3, 7)])  # MHA, GQA, odd sizes
def test_split_heads_views_and_gradient(heads) -> None:
    H, Hkv, hs = heads
    n, t = 2, 9
    qkv = rand(n, t, (H + 2 * Hkv) * hs, seed=10)
    ws = [rand(n, h, t, hs, seed=11 + i) for i, h in enumerate((H, Hkv, Hkv))]

    def loss(x, split):
        return sum(mx.sum(a * mx.array(w)) for a, w in zip(split(x), ws, strict=True))

    splits = (lambda x: K.split_heads(x, H, Hkv, hs), lambda x: Backend.split_heads(B, x, H, Hkv, hs))
    got, want = (mx.value_and_grad(lambda x, f=f: loss(x, f))(mx.array(qkv)) for f in splits)
    np.testing.assert_array_equal(np.array(got[1]), np.array(want[1]))  # a gather: the same bits
    a, b = H * hs, (H + Hkv) * hs
    views = K.split_heads(mx.array(qkv), H, Hkv, hs)
    for view, part, h in zip(views, (qkv[..., :a], qkv[..., a:b], qkv[..., b:]), (H, Hkv, Hkv), strict=True):
        np.testing.assert_array_equal(np.array(view), part.reshape(n, t, h, hs).transpose(0, 2, 1, 3))
    dq = np.concatenate([w.transpose(0, 2, 1, 3).reshape(n, t, -1) for w in ws], axis=-1)
    np.testing.assert_array_equal(np.array(got[1]), dq)
    bad = mx.grad(lambda x: loss(x, lambda x: K._split_heads_faulty(x, H, Hkv, hs, 1)))(mx.array(qkv))
    assert Hkv * hs and not np.array_equal(np.array(bad), dq)  # the negative control: k and v swapped


def test_split_heads_of_a_strided_input_and_in_compile() -> None:
    qkv = mx.swapaxes(mx.array(rand(2, 24, 7, seed=12)), 1, 2)  # (2, 7, 24), not row-contiguous
    views = mx.compile(lambda x: K.split_heads(x, 2, 2, 4))(qkv)
    want = np.array(qkv)[..., 8:16].reshape(2, 7, 2, 4).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(np.array(views[1]), want)
    with pytest.raises(ValueError, match="split_heads"):
        K.split_heads(qkv, 2, 2, 5)


def test_a_mask_computed_in_the_same_graph() -> None:
    """The mask's values are read when the kernel's task runs, not when the graph is scheduled (a decoding
    step computes its mask from the position inside the graph; read early, the spans were garbage)."""
    q, k, v = rand(2, 2, 1, 16, seed=13), rand(2, 2, 8, 16, seed=14), rand(2, 2, 8, 16, seed=15)
    step = mx.compile(lambda q, k, v, pos: K.attention(q, k, v, (mx.arange(8) <= pos)[None], 0.25))
    for pos in range(8):
        m = (np.arange(8) <= pos)[None]
        got = np.array(step(mx.array(q), mx.array(k), mx.array(v), mx.array(pos)))
        want = np_attention_vjp(q, k, v, m, np.zeros_like(q), 0.25)[0]
        np.testing.assert_allclose(got, want, atol=3e-5, err_msg=f"position {pos}")
