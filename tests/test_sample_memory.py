"""Sampling's memory beyond the weights (issue #21: peak RSS within 1.2x the weights): what loading and
decoding leave behind, each pinned with a control that shows the measure can fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import backend_or_skip

from twinlm.core import layers as L
from twinlm.core import model
from twinlm.core.checkpoint import load_checkpoint, save_checkpoint
from twinlm.core.config import preset
from twinlm.core.params import init_params
from twinlm.generate import generate
from twinlm.run_dir import to_backend

# A llama-style model with a long context (a Qwen2.5's 32,768 positions) and tiny widths: seconds.
LONG = preset("tiny", vocab_size=64, block_size=32768).replace(
    arch="llama", pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False)


def _anon_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_position_tables_follow_the_tokens_not_the_context(monkeypatch) -> None:
    """A short generation from a 32,768-position model builds RoPE tables of 64 rows (the power of two that
    holds its positions), not 32,768, and its logits and tokens are bit-identical to those from tables of
    every position (the old way: the rows in use sliced from the whole-context table). Control: the
    position-id path (a compiled decoder's, any position) asks for the whole context, and the spy sees it."""
    from twinlm.core.models import decoder

    B = backend_or_skip("numpy")
    p = {k: B.from_numpy(v) for k, v in init_params(LONG, 0).items()}
    prompt = np.array([[3, 1, 4, 1, 5]], np.int32)
    built = L.rope_tables
    asked: list[int] = []

    def run(full: bool) -> list[np.ndarray]:
        def spy(n_pos: int, *args) -> tuple[np.ndarray, np.ndarray]:
            asked.append(n_pos)
            return built(LONG.block_size if full else n_pos, *args)

        monkeypatch.setattr(L, "rope_tables", spy)
        logits = np.asarray(model.forward(B, LONG, p, B.from_numpy(prompt))[0])
        tokens = [int(t[0]) for t in generate(B, LONG, p, prompt, 6, temperature=0.0, stop=())]
        return [logits, np.array(tokens)]

    new = run(full=False)
    assert asked and max(asked) == 64, asked
    for a, b in zip(new, run(full=True), strict=True):
        np.testing.assert_array_equal(a, b)
    asked.clear()
    decoder._positions(B, LONG, p, B.from_numpy(np.array([7], np.int32)), take=True)
    assert max(asked) == LONG.block_size  # (the control)
    # A longer history gets the next power of two: the tables grow with the tokens.
    asked.clear()
    model.forward(B, LONG, p, B.from_numpy(np.zeros((1, 100), np.int32)))
    assert max(asked) == 128


def test_rope_tables_are_prefixes_of_longer_ones() -> None:
    """Why the shorter tables change no bit: each row is computed alone (with and without Llama 3 scaling)."""
    for theta, scaling in ((1e6, ()), (5e5, LONG.replace(rope_type="llama3", rope_factor=32.0,
                                                           rope_original_positions=8192).rope_scaling)):
        big = L.rope_tables(32768, 64, theta, scaling)
        for n in (64, 1024):
            for a, b in zip(L.rope_tables(n, 64, theta, scaling), big, strict=True):
                assert np.array_equal(a.view(np.uint32), b[:n].view(np.uint32))


def test_kv_decoding_leaves_no_growing_buffer_cache(monkeypatch) -> None:
    """MLX keeps freed buffers for reuse, but only for a request of about their size; a KV cache that grows
    by a token each step frees buffers no later step fits, so without `drop_cached_buffers` the cache only
    grows with the tokens (the control below). With it, what MLX holds cached after decoding stays small."""
    B = backend_or_skip("mlx")
    import mlx.core as mx

    cfg = LONG.replace(block_size=512, d_model=256, n_head=4, n_kv_head=4, d_ff=512, n_layer=4)
    p = {k: B.from_numpy(v) for k, v in init_params(cfg, 0).items()}
    prompt = np.array([[3, 1, 4, 1, 5]], np.int32)

    def cached_after(n: int) -> tuple[int, list[int]]:
        mx.clear_cache()
        tokens = [int(t[0]) for t in generate(B, cfg, p, prompt, n, temperature=0.0, stop=())]
        return mx.get_cache_memory(), tokens

    kept, tokens = cached_after(96)
    keep = type(B).drop_cached_buffers
    monkeypatch.setattr(type(B), "drop_cached_buffers", lambda self: None)
    grown, same = cached_after(96)
    monkeypatch.setattr(type(B), "drop_cached_buffers", keep)
    assert same == tokens  # scheduling only: the same tokens
    assert grown > 4 * 2**20, grown  # control: 4 layers x (k, v) of every length up to 100 tokens, kept
    assert kept < grown / 8, (kept, grown)


def test_mapped_weights_reach_mlx_without_temporaries(tmp_path: Path, monkeypatch) -> None:
    """A large mapped tensor is copied into its MLX array's own buffer: MLX's peak while loading is the
    loaded weights, nothing beside them. Control: the chunked copy through `mx.array` chunks and slice
    updates (the previous way) peaks at least a chunk above them."""
    B = backend_or_skip("mlx")
    import mlx.core as mx

    import twinlm.backends.mlx as M

    w = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)  # 16 MB
    save_checkpoint(tmp_path, {"param.w": w}, {"x": 1}, step=0)
    B.sync(B.from_numpy(np.zeros(1)))

    def load_peak() -> int:
        """MLX's peak above what was alive while `to_backend` copies the checkpoint in (checked exact)."""
        mx.clear_cache()
        loaded, _ = load_checkpoint(tmp_path)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        params = to_backend(B, loaded)
        assert np.array_equal(B.to_numpy(params["param.w"]), w)
        return mx.get_peak_memory() - base

    peak = load_peak()
    assert peak <= w.nbytes + 2**16, (peak, w.nbytes)

    def old_from_mapped(a: np.ndarray):
        out = mx.zeros(a.shape, dtype=mx.float32)
        rows = max(1, M._CHUNK_BYTES // a[0].nbytes)
        for i in range(0, a.shape[0], rows):
            out[i:i + rows] = mx.array(a[i:i + rows], dtype=mx.float32)
            mx.eval(out)
        return out

    monkeypatch.setattr(M, "_from_mapped", old_from_mapped)
    assert load_peak() >= w.nbytes + M._CHUNK_BYTES


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_to_backend_gives_freed_host_memory_back() -> None:
    """With malloc set never to trim (MLX's set-up, `mlx_native.keep_freed_memory`), host memory freed while
    loading (a parsed meta.json, a tokenizer's JSON) stays resident (the control); `to_backend` gives it
    back before the weights arrive."""
    B = backend_or_skip("mlx")
    from twinlm.backends import mlx_native

    if mlx_native.MALLOC != "heap only, untrimmed":
        pytest.skip(f"malloc is {mlx_native.MALLOC!r} here: nothing is kept to give back")

    def garbage() -> None:
        blobs = [bytes([i]) * (1 << 20) for i in range(64)]  # 64 MB on the heap, every page touched
        assert len(blobs) == 64

    from twinlm.core.tensorfile import trim_heap

    trim_heap()  # (free pages earlier tests left would take the garbage below unseen)
    before = _anon_mb()
    garbage()
    kept = _anon_mb() - before
    assert kept > 48, kept  # control: freed, still resident
    to_backend(B, {"w": np.ones(4, np.float32)})
    assert _anon_mb() - before < 16, _anon_mb() - before


def test_a_runs_tokenizer_json_is_held_packed_once() -> None:
    """A loaded run's record and the tokenizer built from it share one packed (zlib) copy of a pretrained
    tokenizer's JSON, never the str (2 bytes a character for a byte-level vocabulary: 14 MB at Qwen2.5's
    size); the record writes back, and export reads back, the exact text."""
    pytest.importorskip("tokenizers")
    from hf_models import byte_bpe

    from twinlm.core.tokenizers import tokenizer_from_dict
    from twinlm.run_meta import RunMeta

    text = byte_bpe(300).to_str()
    record = {"kind": "hf", "hf_json": text, "roles": {"eos": 1}, "add_bos": False}
    meta = RunMeta.from_dict({"model": LONG.to_dict(), "tokenizer": record})
    packed = meta.tokenizer["hf_json"]
    assert isinstance(packed, bytes) and len(packed) < len(text) / 2
    tok = tokenizer_from_dict(meta.tokenizer)
    assert tok._packed is packed  # one copy, shared
    assert tok.hf_json == text and tok.to_dict()["hf_json"] == text
    assert meta.to_dict()["tokenizer"] == record  # what a checkpoint written from it stores
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_many_small_mapped_tensors_leave_no_pages_behind(tmp_path: Path, monkeypatch) -> None:
    """A page fault maps the pages around it too (fault-around), so copying tensor after tensor out of a
    mapped checkpoint maps the tail of each one already released; `to_backend` releases each again, and the
    file's pages do not stay resident beside the copy. Control: without that second release they do."""
    import twinlm.run_dir as R

    B = backend_or_skip("mlx")
    rng = np.random.default_rng(0)
    arrays = {f"param.t{i:04d}": rng.standard_normal(3000, np.float32) for i in range(2048)}  # 24 MB, ~12 KB
    save_checkpoint(tmp_path, arrays, {"x": 1}, step=0)

    def file_mb_after_copy() -> float:
        before = _file_mb()
        loaded, _ = load_checkpoint(tmp_path)  # (hashing it maps and releases every page once)
        params = to_backend(B, loaded)
        grew = _file_mb() - before
        assert all(np.array_equal(B.to_numpy(params[k]), arrays[k]) for k in list(arrays)[::97])
        return grew

    grew = file_mb_after_copy()
    monkeypatch.setattr(R, "is_mapped", lambda a: False)
    grew_without = file_mb_after_copy()
    assert grew_without > 1, (grew, grew_without)  # control (measured 1.55 MB): neighbours' pages mapped back
    assert grew < 0.5, grew  # (measured 0.06 MB)


def _file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")
