"""The optimizer's kernels (issue #23): AdamW over every parameter in one MLX primitive and the global norm's
sum of squares, against float64 numpy and against the core's reference bodies; the same bits at any thread
count; a non-finite step keeps the old state bit for bit; the in-place update (donated buffers) inside the
real compiled step; the step's losses with the kernels on and off; bad input as one error."""

from __future__ import annotations

import numpy as np
import pytest

from twinlm import parity
from twinlm.backends import kernels
from twinlm.core import model, optim
from twinlm.core import params as P
from twinlm.core import step as S
from twinlm.core.config import preset

mx = pytest.importorskip("mlx.core")
from twinlm.backends.mlx import MLXBackend  # noqa: E402

K = kernels.load()
pytestmark = pytest.mark.skipif(K is None, reason=f"kernels not active: {kernels.status().reason}")
B = MLXBackend()
BODY = parity.with_mixin(B, parity._ReferenceComposites, "Reference")  # the core's reference bodies
# Sizes around the kernels' 4096-element blocks (split over threads) and odd ones.
SHAPES = [(7, 5), (3,), (4097,), (130, 129), (1,)]
HYPER = dict(beta1=0.9, beta2=0.99, eps=1e-8)


def tensors(seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    f = lambda s, k=1.0: (rng.standard_normal(s) * k).astype(np.float32)  # noqa: E731
    return [[f(s) for s in SHAPES], [f(s) for s in SHAPES], [f(s, 0.1) for s in SHAPES],
            [np.abs(f(s, 0.01)) for s in SHAPES]]


def run(backend, ps, gs, ms, vs, *, keep=True, scale=0.5):
    arr = lambda xs: [mx.array(x) for x in xs]  # noqa: E731
    out = backend.adamw(arr(ps), arr(gs), arr(ms), arr(vs), lr=mx.array(0.01), bc1=mx.array(0.271),
                        bc2=mx.array(0.029701), decay=[0.1, 0.0, 0.1, 0.1, 0.0], scale=mx.array(scale),
                        keep=mx.array(keep), **HYPER)
    mx.eval(out)
    return [np.array(x) for x in out[0] + out[1] + out[2]]


def np_adamw(ps, gs, ms, vs, scale=0.5):
    out_p, out_m, out_v = [], [], []
    for p, g, m, v, wd in zip(ps, gs, ms, vs, [0.1, 0.0, 0.1, 0.1, 0.0], strict=True):
        p, g, m, v = (x.astype(np.float64) for x in (p, g, m, v))
        g = g * scale
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        out_p.append(p * (1 - 0.01 * wd) - 0.01 * (m / 0.271) / (np.sqrt(v / 0.029701) + 1e-8))
        out_m.append(m)
        out_v.append(v)
    return out_p + out_m + out_v


def test_adamw_against_numpy_and_the_reference_body() -> None:
    ps, gs, ms, vs = tensors()
    got, body, want = run(B, ps, gs, ms, vs), run(BODY, ps, gs, ms, vs), np_adamw(ps, gs, ms, vs)
    for g, b, w in zip(got, body, want, strict=True):
        assert g.shape == w.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, b, rtol=1e-6, atol=1e-7)
    # negative control: the clip factor reaches the kernel (scale 1 lands elsewhere)
    unclipped = run(B, ps, gs, ms, vs, scale=1.0)
    assert max(np.abs(a - b).max() for a, b in zip(unclipped, got, strict=True)) > 1e-4


def test_adamw_negative_controls_are_seen_directly() -> None:
    ps, gs, ms, vs = tensors()
    arr = lambda xs: [mx.array(x) for x in xs]  # noqa: E731
    args = (arr(ps), arr(gs), arr(ms), arr(vs), mx.array(0.01), mx.array(0.271), mx.array(0.029701),
            mx.array(0.5), mx.array(True), 0.9, 0.99, 1e-8, [0.1, 0.0, 0.1, 0.1, 0.0])
    want = np_adamw(ps, gs, ms, vs)
    for fault in (1, 2):
        bad = [np.array(x) for x in K._adamw_faulty(*args, fault)]
        assert max(np.abs(b - w).max() for b, w in zip(bad, want, strict=True)) > 1e-4, fault


def test_adamw_same_bits_at_any_thread_count_and_keep_false_is_the_old_state() -> None:
    ps, gs, ms, vs = tensors(1)
    before = K.threads()
    try:
        runs = []
        for n in (1, 2, 3):
            K.set_threads(n)
            runs.append(run(B, ps, gs, ms, vs))
    finally:
        K.set_threads(before)
    for other in runs[1:]:
        for a, b in zip(other, runs[0], strict=True):
            np.testing.assert_array_equal(a, b)
    gs[2][5] = np.nan  # a non-finite step: the caller passes keep=False; every tensor keeps its old bits
    for a, b in zip(run(B, ps, gs, ms, vs, keep=False), ps + ms + vs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sum_squares_against_numpy_threads_and_gradient() -> None:
    xs = tensors(2)[0]
    want = sum(float(np.sum(x.astype(np.float64) ** 2)) for x in xs)
    before = K.threads()
    try:
        got = []
        for n in (1, 2, 3):
            K.set_threads(n)
            got.append(np.array(B.sum_squares([mx.array(x) for x in xs])))
    finally:
        K.set_threads(before)
    assert got[0].shape == () and abs(float(got[0]) - want) <= 1e-5 * want
    assert all(np.array_equal(g, got[0]) for g in got[1:])
    four = sum(float(np.sum(x.astype(np.float64) ** 2)) for x in xs[:4])  # the last of these: 16,770 floats
    assert abs(float(np.array(K._sum_squares_faulty([mx.array(x) for x in xs[:4]], 1))) - four) > 0.1 * four
    grads = mx.grad(lambda ys: B.sum_squares(ys))([mx.array(x) for x in xs])
    for g, x in zip(grads, xs, strict=True):
        np.testing.assert_allclose(np.array(g), 2 * x, rtol=1e-6)


def test_bad_input_is_one_error() -> None:
    a, b = mx.zeros((3, 2)), mx.zeros((2, 3))
    one = mx.array(1.0)
    with pytest.raises(ValueError, match="one shape"):
        K.adamw([a], [b], [a], [a], one, one, one, one, mx.array(True), 0.9, 0.99, 1e-8, [0.0])
    with pytest.raises(ValueError, match="one length"):
        K.adamw([a], [a], [a], [a], one, one, one, one, mx.array(True), 0.9, 0.99, 1e-8, [0.0, 0.1])
    with pytest.raises(ValueError, match="float32 only"):
        K.sum_squares([a.astype(mx.float16)])
    with pytest.raises(ValueError, match="at least one"):
        B.sum_squares([])


def _losses(backend: MLXBackend, steps: int = 4) -> tuple[list[float], dict[str, np.ndarray]]:
    cfg = preset("tiny", vocab_size=17)
    opt = optim.AdamWConfig(warmup=1)
    spec = model.param_spec(cfg)
    state = {k: backend.from_numpy(v) for k, v in S.init_state(P.init_params(cfg, 0), spec).items()}
    step = S.make_train_step(backend, spec, opt, model.lm_loss_fn(backend, cfg))
    compiled = backend.compile_step(step, state)
    rng = np.random.default_rng(0)
    losses = []
    for it in range(steps):
        x, y = (rng.integers(0, 17, (2, cfg.block_size)).astype(np.int32) for _ in range(2))
        losses.append(S.drive(backend, compiled, cfg, opt, {"x": x, "y": y}, it, 0)[0])
    return losses, {k: np.array(v) for k, v in compiled.state.items()}


def test_the_compiled_step_with_the_kernels_matches_the_reference_bodies() -> None:
    """The real step (state dropped before it is evaluated, so the update runs in place on donated buffers)
    against the same step on the reference bodies of every composite."""
    got, got_state = _losses(B)
    want, want_state = _losses(BODY)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    init = P.init_params(preset("tiny", vocab_size=17), 0)
    assert max(np.abs(got_state[f"param.{k}"] - v).max() for k, v in init.items()) > 1e-3  # the update ran
    for k, v in want_state.items():
        np.testing.assert_allclose(got_state[k], v, rtol=1e-3, atol=1e-5, err_msg=k)


def test_strided_and_broadcast_inputs_are_read_as_their_values() -> None:
    """No contiguous copy node per input: a transposed or broadcast view is gathered inside the kernel."""
    rng = np.random.default_rng(3)
    p, m = (rng.standard_normal((6, 5)).astype(np.float32) for _ in range(2))
    v = np.abs(rng.standard_normal((6, 5))).astype(np.float32)
    g_t = rng.standard_normal((5, 6)).astype(np.float32)  # used transposed
    row = rng.standard_normal((5,)).astype(np.float32)  # broadcast over the rows
    lists = lambda g: ([mx.array(p)], [g], [mx.array(m)], [mx.array(v)])  # noqa: E731
    kw = dict(lr=0.01, bc1=0.271, bc2=0.029701, decay=[0.1], **HYPER)
    views = ((mx.array(g_t).T, g_t.T), (mx.broadcast_to(mx.array(row), (6, 5)), np.tile(row, (6, 1))))
    for view, value in views:
        got = [np.array(x[0]) for x in B.adamw(*lists(view), **kw)]
        want = [np.array(x[0]) for x in BODY.adamw(*lists(mx.array(np.ascontiguousarray(value))), **kw)]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        want_sq = np.sum(value.astype(np.float64) ** 2) + np.sum(p.astype(np.float64) ** 2)
        np.testing.assert_allclose(float(B.sum_squares([view, mx.array(p)])), want_sq, rtol=1e-5)
