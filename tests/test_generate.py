"""Generation: fast decoders equal the no-cache reference; sampling rules; equal tokens on both backends."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backend_or_skip

from twinlm import generate as gen
from twinlm.core import model
from twinlm.core.config import preset
from twinlm.core.errors import TwinlmError
from twinlm.core.params import init_params
from twinlm.generate import cache_length, generate, make_decoder, sample_next

ATOL = RTOL = 1e-4
CFG = preset("tiny", vocab_size=32, block_size=8)


@pytest.fixture(scope="module")
def params() -> dict[str, np.ndarray]:
    """Weights large enough that greedy decoding does not just repeat one token."""
    rng = np.random.default_rng(2)
    return {k: rng.normal(0.0, 0.3, v.shape).astype(np.float32) if v.ndim == 2 else v
            for k, v in init_params(CFG, 0).items()}


def prompt(batch: int, t0: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, CFG.vocab_size, (batch, t0)).astype(np.int32)


def greedy_run(B, p, strategy: str, tokens: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(new tokens (batch, n), logits (n, batch, V)) of greedy decoding with one decoder."""
    dec = make_decoder(B, CFG, p, tokens.shape[0], strategy)
    logits = []
    for _ in range(n):
        lg = dec.next_logits(tokens)
        logits.append(lg)
        tokens = np.concatenate([tokens, lg.argmax(-1).astype(np.int32)[:, None]], axis=1)
    return tokens[:, -n:], np.stack(logits)


@pytest.mark.parametrize("name", ["mlx", "numpy"])
def test_cached_equals_uncached_and_crops(name: str, params) -> None:
    B = backend_or_skip(name)
    p = {k: B.from_numpy(v) for k, v in params.items()}
    x = prompt(2, 5)
    n = 12  # 5 + 12 > block_size 8: the crop path runs for most steps
    ref_tokens, ref_logits = greedy_run(B, p, "full", x, n)
    assert len(np.unique(ref_tokens)) > 3, "greedy output too repetitive to test anything"
    for strategy in ("kv", "fixed"):
        tokens, logits = greedy_run(B, p, strategy, x, n)
        np.testing.assert_array_equal(tokens, ref_tokens, err_msg=strategy)
        np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=RTOL, err_msg=strategy)
    # generate() itself, greedy, with and without the cache
    cached = np.stack(list(generate(B, CFG, p, x, n, temperature=0.0)), axis=1)
    uncached = np.stack(list(generate(B, CFG, p, x, n, temperature=0.0, use_cache=False)), axis=1)
    np.testing.assert_array_equal(cached, ref_tokens)
    np.testing.assert_array_equal(uncached, ref_tokens)


def test_kv_cache_state_and_negative_control(params) -> None:
    """The cache really carries the past (dropping it changes the logits) and is dropped after a crop."""
    B = backend_or_skip("mlx")
    p = {k: B.from_numpy(v) for k, v in params.items()}
    x = prompt(1, 6)
    dec = make_decoder(B, CFG, p, 1, "kv")
    dec.next_logits(x)
    nxt = np.concatenate([x, [[3]]], axis=1).astype(np.int32)
    with_cache = dec.next_logits(nxt)
    assert dec.cache is not None and dec.cache[0][0].shape[2] == 7
    no_past = make_decoder(B, CFG, p, 1, "full").next_logits(nxt[:, -1:])
    assert np.abs(with_cache - no_past).max() > 1e-2
    dec.next_logits(np.concatenate([nxt, [[4]]], axis=1).astype(np.int32))  # t = 8 = block_size
    assert dec.cache is not None
    dec.next_logits(np.concatenate([nxt, [[4, 5]]], axis=1).astype(np.int32))  # t = 9: cropped
    assert dec.cache is None


@pytest.mark.parametrize("name", ["mlx", "numpy"])
def test_decode_step_matches_forward_and_negative_controls(name: str, params) -> None:
    """decode_step fed token by token gives forward's logits at every position; writing the new k/v into
    the wrong slot, or letting attention see one slot too few, does not."""
    B = backend_or_skip(name)
    p = {k: B.from_numpy(v) for k, v in params.items()}
    x = prompt(2, CFG.block_size)
    want = B.to_numpy(model.logits(B, CFG, p, B.from_numpy(x)))
    shape = (2, CFG.n_head, CFG.block_size, CFG.head_dim)

    def run(corrupt: str = "") -> np.ndarray:
        cache = [(B.from_numpy(np.zeros(shape, np.float32)),) * 2 for _ in range(CFG.n_layer)]
        rows = []
        for pos in range(CFG.block_size):
            pos_ids, write, attn = model.decode_inputs(pos, CFG.block_size)
            if corrupt == "write":
                write = np.roll(write, 1, axis=2)
            if corrupt == "attn":
                attn = np.arange(CFG.block_size)[None, :] < max(pos, 1)
            lg, cache = model.decode_step(B, CFG, p, B.from_numpy(x[:, pos:pos + 1]), B.from_numpy(pos_ids),
                                          B.from_numpy(write), B.from_numpy(attn), cache)
            rows.append(B.to_numpy(lg)[:, 0])
        return np.stack(rows, axis=1)

    np.testing.assert_allclose(run(), want, atol=ATOL, rtol=RTOL)
    for corrupt in ("write", "attn"):
        assert np.abs(run(corrupt) - want).max() > 1e-2, corrupt


def test_fixed_kv_decoders_share_the_compiled_step_safely(params) -> None:
    """Two interleaved generations use one compiled step (one cache): each re-prefills when the other
    has overwritten it, so both still equal the uncached reference."""
    B = backend_or_skip("mlx")
    p = {k: B.from_numpy(v) for k, v in params.items()}
    a, b = prompt(1, 3), prompt(1, 5)[:, ::-1].copy()
    want_a = np.stack(list(generate(B, CFG, p, a, 7, temperature=0.0, use_cache=False)), axis=1)
    want_b = np.stack(list(generate(B, CFG, p, b, 7, temperature=0.0, use_cache=False)), axis=1)
    assert not np.array_equal(want_a, want_b)
    dec_a, dec_b = make_decoder(B, CFG, p, 1, "fixed"), make_decoder(B, CFG, p, 1, "fixed")
    got_a, got_b = [], []
    for _ in range(7):
        for dec, hist, got in ((dec_a, a, got_a), (dec_b, b, got_b)):
            got.append(int(dec.next_logits(np.concatenate([hist, [got]], axis=1).astype(np.int32)
                                           if got else hist).argmax()))
    assert dec_a.steps is not None and dec_a.steps is dec_b.steps
    np.testing.assert_array_equal(got_a, want_a[0])
    np.testing.assert_array_equal(got_b, want_b[0])


@pytest.mark.parametrize("name", ["mlx", "numpy", "tinygrad"])
def test_in_graph_masks_equal_decode_inputs(name: str) -> None:
    """decode_masks (computed from the position on the backend) equals decode_inputs (built on the host), with
    and without a sliding window, and per row (the engine's (N, 1) positions)."""
    B = backend_or_skip(name)
    for pos in (0, 3, 7):
        for window in (0, 3):
            _, write, attn = model.decode_inputs(pos, 8, window)
            got = model.decode_masks(B, B.from_numpy(np.array([pos], np.int32)), 8, window)
            np.testing.assert_array_equal(B.to_numpy(got[0]), write)
            np.testing.assert_array_equal(B.to_numpy(got[1]), attn)
    rows = np.array([[0], [5], [2]], np.int32)
    write, attn = (B.to_numpy(t) for t in model.decode_masks(B, B.from_numpy(rows), 8))
    assert write.shape == (3, 1, 8, 1) and attn.shape == (3, 8)
    for r, (pos,) in enumerate(rows):
        np.testing.assert_array_equal(write[r:r + 1], model.decode_inputs(int(pos), 8)[1])
        np.testing.assert_array_equal(attn[r:r + 1], model.decode_inputs(int(pos), 8)[2])


def test_cache_length() -> None:
    assert [cache_length(n, 4096) for n in (1, 64, 65, 200, 4096, 5000)] == [64, 64, 128, 256, 4096, 4096]
    assert cache_length(10, 8) == 8  # never past the block size


@pytest.mark.parametrize("name", ["mlx", "numpy", "tinygrad"])
def test_fixed_kv_cache_grows_and_keeps_the_past(name: str, params, monkeypatch) -> None:
    """With caches of 4 slots at first, one prompt token and 9 greedy steps go through caches of 4 and 8
    slots (the cached keys copied into the longer one), then past block_size through the window graph, and
    give the uncached reference's tokens. Negative control: a longer cache that starts empty instead (the
    copy skipped) changes the logits. (Batch 2, as the test below: tinygrad reuses the 8-slot graph.)"""
    monkeypatch.setattr(gen, "MIN_CACHE", 4)
    monkeypatch.setattr(gen, "_fixed_shape_steps", {})
    B = backend_or_skip(name)
    p = {k: B.from_numpy(v) for k, v in params.items()}
    ref = backend_or_skip("numpy")
    x = prompt(2, 1)
    ref_tokens, ref_logits = greedy_run(ref, {k: ref.from_numpy(v) for k, v in params.items()}, "full", x, 9)
    dec = make_decoder(B, CFG, p, 2, "fixed")
    tokens, lengths = x, []
    for i in range(9):
        lg = dec.next_logits(tokens)
        np.testing.assert_allclose(lg, ref_logits[i], atol=ATOL, rtol=RTOL, err_msg=f"step {i}")
        lengths.append(dec.steps.length)
        tokens = np.concatenate([tokens, lg.argmax(-1).astype(np.int32)[:, None]], axis=1)
    np.testing.assert_array_equal(tokens[:, 1:], ref_tokens)
    assert lengths == [4, 4, 4, 4, 8, 8, 8, 8, 8]  # (the 9th history, 9 > block_size, is the window graph's)
    if name != "mlx":
        return
    monkeypatch.setattr(gen, "_fixed_shape_steps", {})
    monkeypatch.setattr(gen, "grow_cache", lambda B, old, shape: B.from_numpy(np.zeros(shape, np.float32)))
    dec = make_decoder(B, CFG, p, 2, "fixed")
    lg = [dec.next_logits(tokens[:, :t]) for t in range(1, 6)]
    np.testing.assert_allclose(lg[3], ref_logits[3], atol=ATOL, rtol=RTOL)  # still in the first cache
    assert np.abs(lg[4] - ref_logits[4]).max() > 1e-2


def test_generate_sizes_the_cache_to_prompt_and_new_tokens(params, monkeypatch) -> None:
    """generate() tells the fixed-shape decoder how long the history will get: one cache of that length."""
    monkeypatch.setattr(gen, "MIN_CACHE", 2)
    monkeypatch.setattr(gen, "_fixed_shape_steps", {})
    monkeypatch.setattr(gen, "default_strategy", lambda B, use_cache=True: "fixed")
    B = backend_or_skip("mlx")
    p = {k: B.from_numpy(v) for k, v in params.items()}
    list(generate(B, CFG, p, prompt(1, 2), 3, temperature=0.0))  # 5 positions: a cache of 8
    assert [key[-1] for key in gen._fixed_shape_steps] == [8]
    monkeypatch.setattr(gen, "_fixed_shape_steps", {})
    list(generate(B, CFG, p, prompt(1, 1), 1, temperature=0.0))  # 2 positions
    assert [key[-1] for key in gen._fixed_shape_steps] == [2]


def test_tinygrad_fixed_kv_equals_uncached_and_samples_like_mlx(params) -> None:
    """One test, so one process builds the tinygrad graphs: fixed KV (a one-token graph, then the window
    graph once past block_size) vs full (2 shapes), then sampled tokens on tinygrad equal MLX's for the
    same seed (reusing both graphs)."""
    tg = backend_or_skip("tinygrad")
    p_tg = {k: tg.from_numpy(v) for k, v in params.items()}
    x = prompt(2, 7)  # t = 7 (prefill), 8 (one token), 9 (past block_size 8: window)
    ref_tokens, ref_logits = greedy_run(tg, p_tg, "full", x, 3)
    tokens, logits = greedy_run(tg, p_tg, "fixed", x, 3)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=RTOL)

    mx = backend_or_skip("mlx")
    p_mx = {k: mx.from_numpy(v) for k, v in params.items()}
    kw = dict(temperature=1.0, top_k=20, seed=7)
    # params in another order reuse the compiled graphs: names, not positions, must bind them
    p_tg = dict(reversed(p_tg.items()))
    on_tg = np.stack(list(generate(tg, CFG, p_tg, x, 6, **kw)), axis=1)
    on_mx = np.stack(list(generate(mx, CFG, p_mx, x, 6, **kw)), axis=1)
    np.testing.assert_array_equal(on_tg, on_mx)
    other_seed = np.stack(list(generate(mx, CFG, p_mx, x, 6, **{**kw, "seed": 8})), axis=1)
    assert not np.array_equal(other_seed, on_mx)


# ---- sampling rules (numpy only) ---------------------------------------------------------------------

def random_logits(batch: int = 64, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(3).normal(0.0, 2.0, (batch, vocab)).astype(np.float32)


def test_greedy_limits() -> None:
    lg = random_logits()
    greedy = sample_next(lg, np.random.default_rng(0), temperature=0.0)
    np.testing.assert_array_equal(greedy, lg.argmax(-1))
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
        got = sample_next(lg, np.random.default_rng(0), **{"temperature": 1.0, **kw})
        np.testing.assert_array_equal(got, greedy, err_msg=str(kw))
    plain = sample_next(lg, np.random.default_rng(0), temperature=1.0)
    assert not np.array_equal(plain, greedy)  # control: unfiltered sampling is not greedy


def test_same_seed_same_tokens() -> None:
    lg = random_logits()
    a = sample_next(lg, np.random.default_rng(5), temperature=1.0, top_p=0.9)
    b = sample_next(lg, np.random.default_rng(5), temperature=1.0, top_p=0.9)
    c = sample_next(lg, np.random.default_rng(6), temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_distributions() -> None:
    n = 40_000
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    lg = np.tile(np.log(probs), (n, 1))
    rng = np.random.default_rng(0)

    def freq(**kw) -> np.ndarray:
        return np.bincount(sample_next(lg, rng, **kw), minlength=4) / n

    np.testing.assert_allclose(freq(temperature=1.0), probs, atol=0.015)
    np.testing.assert_allclose(freq(temperature=1.0, top_k=2), [4 / 7, 3 / 7, 0, 0], atol=0.015)
    # nucleus 0.5: 0.4 alone is short of it, 0.4 + 0.3 reaches it -> the first two
    np.testing.assert_allclose(freq(temperature=1.0, top_p=0.5), [4 / 7, 3 / 7, 0, 0], atol=0.015)
    np.testing.assert_allclose(freq(temperature=1.0, top_p=0.75), [4 / 9, 3 / 9, 2 / 9, 0], atol=0.015)
    hot = probs**0.5 / (probs**0.5).sum()  # temperature 2 flattens: p^(1/2), renormalised
    np.testing.assert_allclose(freq(temperature=2.0), hot, atol=0.015)


def test_bad_arguments_fail_before_generating(params) -> None:
    B = backend_or_skip("numpy")
    p = {k: B.from_numpy(v) for k, v in params.items()}
    x = prompt(1, 3)
    bad = [dict(prompt=x + CFG.vocab_size), dict(prompt=np.zeros((1, 0), np.int32)), dict(temperature=-1.0),
           dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-1),
           dict(prompt=x.astype(np.float32))]
    for kw in bad:
        args = {"prompt": x, "max_new_tokens": 2, **kw}
        with pytest.raises(TwinlmError):
            generate(B, CFG, p, args.pop("prompt"), args.pop("max_new_tokens"), **args)
    assert len(list(generate(B, CFG, p, x, 0))) == 0
