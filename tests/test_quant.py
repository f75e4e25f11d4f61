"""Quantized weights (issue #21): core.quant's format against MLX's own, the dequantize primitive and the
quantized linear layer on every backend, quantized models on both backends, `twinlm quantize`, QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import backend_or_skip, run_cli

from twinlm.core import model, quant
from twinlm.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from twinlm.core.config import ConfigError, ModelConfig
from twinlm.core.spec import unit_scale_params
from twinlm.run_dir import load_model

CORPUS = "the quick brown fox jumps over the lazy dog. jack and jill went up the hill to fetch water.\n" * 20
SETTINGS = ["--batch-size", "4", "--eval-every", "4", "--eval-iters", "2", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))


def _pack_big_end_first(q: np.ndarray, bits: int) -> np.ndarray:
    """The negative control: element j of a word at the other end (bits [32 - (j+1) bits, 32 - j bits))."""
    per = 32 // bits
    return quant.pack(q.reshape(q.shape[0], -1, per)[..., ::-1].reshape(q.shape), bits)


# ---- the format ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
def test_format_is_mlx_affine_bit_for_bit(bits, group_size):
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(bits * group_size)
    w = rng.standard_normal((256, 24)).astype(np.float32)  # (n_in, n_out), as twinlm stores a linear weight
    # MLX's quantize, read by ours: unpack/pack round-trips its words; our dequantize is its own, bit for bit.
    wq, s, b = (np.array(a) for a in mx.quantize(mx.array(w.T), group_size=group_size, bits=bits))
    np.testing.assert_array_equal(quant.pack(quant.unpack(wq, bits), bits), wq)
    theirs = np.array(mx.dequantize(mx.array(wq), mx.array(s), mx.array(b), group_size=group_size, bits=bits))
    np.testing.assert_array_equal(quant.dequantize(wq, s, b, bits, group_size).view(np.uint32),
                                  theirs.view(np.uint32))
    # Ours, read by MLX: the same bits again, and close to the float weight (half a level per group).
    q, s, b = quant.quantize(w, bits, group_size)
    assert q.dtype == np.uint32 and q.shape == (24, 256 * bits // 32) and s.shape == (24, 256 // group_size)
    mine = quant.dequantize(q, s, b, bits, group_size)
    theirs = np.array(mx.dequantize(mx.array(q), mx.array(s), mx.array(b), group_size=group_size, bits=bits))
    np.testing.assert_array_equal(mine, theirs)
    assert np.all(np.abs(mine - w.T) <= 0.5 * np.repeat(s, group_size, axis=1) + 1e-6)
    # The control: the same integers packed in the other bit order are a different weight to MLX.
    wrong = _pack_big_end_first(quant.unpack(q, bits), bits)
    theirs = np.array(mx.dequantize(mx.array(wrong), mx.array(s), mx.array(b), group_size=group_size,
                                    bits=bits))
    assert not np.array_equal(mine, theirs)


def test_quantize_in_blocks_of_rows_and_from_bfloat16(monkeypatch):
    """`quantize` works through a weight a block of output rows at a time (a 1B embedding's float64
    temporaries would be 2 GB each): the same words, scales and biases as in one block, from a linear
    weight (n_in, n_out) or a table's transposed view, and from a bfloat16 model's tagged bits."""
    from twinlm.core import dtypes

    rng = np.random.default_rng(5)
    w = rng.standard_normal((128, 37)).astype(np.float32)  # (n_in, n_out); 37 rows: a ragged last block
    table = np.ascontiguousarray(w.T)  # the same weight as an embedding's rows
    whole = quant.quantize(w, 4, 32)
    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 128 * 5)  # blocks of 5 rows
    for got in (quant.quantize(w, 4, 32), quant.quantize(table.T, 4, 32)):
        for a, b in zip(got, whole, strict=True):
            assert a.flags.c_contiguous
            np.testing.assert_array_equal(a, b)
    bf16 = dtypes.to_host(w, "bfloat16")
    for a, b in zip(quant.quantize(bf16, 8, 32), quant.quantize(dtypes.as_float32(bf16), 8, 32), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(quant.quantize(w, 8, 32)[1], quant.quantize(bf16, 8, 32)[1])  # (bf16 values)


def test_format_errors_and_config():
    with pytest.raises(ValueError, match="bits"):
        quant.check_format(64, 3, 64)
    with pytest.raises(ValueError, match="group size"):
        quant.check_format(64, 4, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        quant.check_format(96, 4, 64)
    for bad in (dict(quant_bits=4), dict(quant_group_size=64), dict(quant_bits=2, quant_group_size=64),
                dict(arch="lstm", quant_bits=4, quant_group_size=32), dict(quant_embedding=True),
                dict(quant_bits=4, quant_group_size=32, quant_embedding="yes")):
        with pytest.raises(ConfigError):
            ModelConfig(**bad)
    with pytest.raises(ConfigError, match="blocks.0.attn.qkv has 32 inputs"):
        model.param_spec(ModelConfig(d_model=32, n_head=2, quant_bits=4, quant_group_size=64))


# ---- the primitive and the layer on each backend ------------------------------------------------


def _case(bits: int, group_size: int = 32, n_in: int = 128, n_out: int = 40):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
    x = rng.standard_normal((2, 3, n_in)).astype(np.float32)
    bias = 0.1 * rng.standard_normal(n_out).astype(np.float32)
    return x, quant.quantize(w, bits, group_size), bias


class _SwappedNibbles:
    """Negative control: dequantize reading each word's elements in the other order."""

    def dequantize(self, qweight, scales, biases, bits, group_size):
        return quant.dequantize(_pack_big_end_first(quant.unpack(np.asarray(qweight), bits), bits),
                                np.asarray(scales), np.asarray(biases), bits, group_size, np.float64)


@pytest.mark.parametrize("name", ["mlx", "tinygrad", "numpy"])
@pytest.mark.parametrize("bits", quant.BITS)
def test_dequantize_and_quantized_linear(name, bits):
    B = backend_or_skip(name)
    x, (q, s, b), bias = _case(bits)
    w64 = quant.dequantize(q, s, b, bits, 32, np.float64)  # (n_out, n_in)
    args = [B.from_numpy(a) for a in (q, s, b)]
    d = B.to_numpy(B.dequantize(*args, bits, 32))
    np.testing.assert_allclose(d, w64, rtol=0, atol=1e-6)
    want = x.astype(np.float64) @ w64.T + bias
    kernels = getattr(B, "kernels", None)
    # MLX: twinlm's kernel (where built), mx.quantized_matmul (kernels off), the reference body (fused off)
    for fused, k in ((True, kernels), (True, None), (False, kernels)):
        B.fused = fused
        if kernels is not None:
            B.kernels = k
        try:
            got = B.to_numpy(B.quantized_linear(B.from_numpy(x), *args, B.from_numpy(bias), bits, 32))
        finally:
            B.fused = True
            if kernels is not None:
                B.kernels = kernels
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    # The control: a swapped element order gives a layer the same check refuses.
    wrong = x.astype(np.float64) @ _SwappedNibbles().dequantize(q, s, b, bits, 32).T + bias
    assert not np.allclose(wrong, want, rtol=1e-5, atol=2e-5)
    if B.supports_grad:  # the gradient with respect to x (a frozen base), through the quantized weight
        def loss(p):
            y = B.quantized_linear(p["x"], *args, None, bits, 32)
            return B.sum(y * y)
        want_g = 2 * (x.astype(np.float64) @ w64.T) @ w64
        for k in ([kernels, None] if kernels is not None else [None]):  # (MLX: each VJP, the kernel's too)
            if kernels is not None:
                B.kernels = k
            try:
                _, g = B.value_and_grad(loss)({"x": B.from_numpy(x)})
                np.testing.assert_allclose(B.to_numpy(g["x"]), want_g, rtol=1e-4, atol=1e-4)
            finally:
                if kernels is not None:
                    B.kernels = kernels


@pytest.mark.parametrize("name", ["mlx", "tinygrad", "numpy"])
@pytest.mark.parametrize("bits", quant.BITS)
def test_quantized_embedding_lookup_and_tied_head(name, bits):
    """An embedding E (V, C) quantized as a table: the lookup (`quantized_take`) gives the rows of the
    dequantized table and the tied head (`quantized_linear` on the same tensors) gives h @ dequantized(E).T,
    as float64 numpy computes them from the dequantized table."""
    B = backend_or_skip(name)
    rng = np.random.default_rng(bits)
    V, C = 40, 128
    table = rng.standard_normal((V, C)).astype(np.float32) / np.sqrt(C)
    qcfg = ModelConfig(vocab_size=V, d_model=C, n_head=2, quant_bits=bits, quant_group_size=32,
                       quant_embedding=True)
    spec = {"wte.qweight": model.param_spec(qcfg)["wte.qweight"]}
    assert spec["wte.qweight"].table and spec["wte.qweight"].shape == (V, C * bits // 32)
    qp = quant.quantize_params({"wte.weight": table}, spec, bits, 32)
    q, s, b = qp["wte.qweight"], qp["wte.scales"], qp["wte.biases"]
    deq = quant.dequantize(q, s, b, bits, 32, np.float64)  # (V, C): the table's rows, not transposed
    assert np.abs(deq - table).max() <= 0.5 * s.max() + 1e-6
    np.testing.assert_array_equal(quant.dequantize_params(qp, spec, bits, 32)["wte.weight"],
                                  quant.dequantize(q, s, b, bits, 32))  # (V, C) as stored, in float32
    ids = rng.integers(0, V, size=(3, 7)).astype(np.int32)
    h = rng.standard_normal((3, 7, C)).astype(np.float32)
    args = [B.from_numpy(a) for a in (q, s, b)]
    rows = B.to_numpy(B.quantized_take(*args, B.from_numpy(ids), bits, 32))
    assert rows.shape == (3, 7, C)
    np.testing.assert_allclose(rows, deq[ids], rtol=0, atol=1e-6)
    logits = B.to_numpy(B.quantized_linear(B.from_numpy(h), *args, None, bits, 32))
    want = h.astype(np.float64) @ deq.T
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=2e-5)
    # The controls: a lookup reading the next row's scales and biases, a head using the float table.
    from twinlm.parity.controls import QuantTakeNextRowScales
    from twinlm.parity.ops import with_mixin

    W = with_mixin(B, QuantTakeNextRowScales, "NextRow")
    wrong = W.to_numpy(W.quantized_take(*args, W.from_numpy(ids), bits, 32))
    assert not np.allclose(wrong, deq[ids], rtol=0, atol=1e-6)
    assert not np.allclose(h.astype(np.float64) @ table.T, want, rtol=1e-5, atol=2e-5)


# ---- a quantized model on both backends ---------------------------------------------------------

QCFG = dict(vocab_size=48, block_size=16, n_layer=2, n_head=2, d_model=64, d_ff=128)


def _quantized(arch: str, bits: int, embedding: bool = True) -> tuple[ModelConfig, dict, ModelConfig, dict]:
    cfg = ModelConfig(arch=arch, **QCFG, **({"n_kv_head": 1} if arch == "llama" else {}))
    params = unit_scale_params(model.param_spec(cfg), 0)
    qcfg = cfg.replace(quant_bits=bits, quant_group_size=32, quant_embedding=embedding)
    return cfg, params, qcfg, quant.quantize_params(params, model.param_spec(qcfg), bits, 32)


# gpt: a tied head (the embedding's table serves both); llama: an untied head, quantized as a linear layer.
# embedding=False: the embedding and head stay float (--keep-embedding, and runs made before the choice).
@pytest.mark.parametrize("embedding", [True, pytest.param(False, marks=pytest.mark.slow)])  # (+5 s; the CLI
@pytest.mark.parametrize("arch", ["gpt", "llama"])  # tests below run float-embedding runs in CI)
def test_quantized_model_same_logits_on_both_backends(arch, embedding):
    from twinlm.run_dir import to_backend

    ids = np.random.default_rng(1).integers(0, 48, size=(2, 12)).astype(np.int32)
    for bits, close in ((8, 0.05), (4, 0.5)):
        cfg, params, qcfg, qparams = _quantized(arch, bits, embedding)
        heads = (1 if cfg.tie_embeddings else 2) if embedding else 0
        assert sum(k.endswith(".qweight") for k in qparams) == 4 * cfg.n_layer + heads
        assert ("wte.weight" in qparams) != embedding
        assert ("head.weight" in qparams) == (not cfg.tie_embeddings and not embedding)
        out = {}
        for name in ("mlx", "tinygrad", "numpy"):
            B = backend_or_skip(name)
            out[name] = B.to_numpy(model.logits(B, qcfg, to_backend(B, qparams), B.from_numpy(ids)))
        ref = out["numpy"]  # float64 through the same quantized weights
        for name in ("mlx", "tinygrad"):
            np.testing.assert_allclose(out[name], ref, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(out["mlx"], out["tinygrad"], rtol=1e-4, atol=1e-4)
        # The control: one backend reading the words in the other order is caught by the same tolerance.
        from twinlm.backends.numpy_ref import NumpyBackend

        class Wrong(_SwappedNibbles, NumpyBackend):
            pass

        W = Wrong()
        wrong = W.to_numpy(model.logits(W, qcfg, to_backend(W, qparams), W.from_numpy(ids)))
        assert not np.allclose(wrong, ref, rtol=1e-4, atol=1e-4)
        if embedding:  # the controls of the quantized embedding and head, caught by the same tolerance
            from twinlm.core.models import family
            from twinlm.parity.controls import QuantTakeNextRowScales
            from twinlm.parity.ops import with_mixin

            N = backend_or_skip("numpy")
            R = with_mixin(N, QuantTakeNextRowScales, "NextRow")  # lookup: the next row's scales
            wrong = R.to_numpy(model.logits(R, qcfg, to_backend(R, qparams), R.from_numpy(ids)))
            assert not np.allclose(wrong, ref, rtol=1e-4, atol=1e-4)
            h, _ = family(arch).hidden(N, qcfg, to_backend(N, qparams), N.from_numpy(ids))
            head = params["wte.weight"].T if cfg.tie_embeddings else params["head.weight"]
            assert not np.allclose(h @ head.astype(np.float64), ref, rtol=1e-4, atol=1e-4)  # the float head
        # Close to the float model's logits (unit-scale weights: a hard case for 4 bits).
        N = backend_or_skip("numpy")
        flt = N.to_numpy(model.logits(N, cfg, to_backend(N, params), N.from_numpy(ids)))
        rel = np.abs(ref - flt).max() / np.abs(flt).max()
        assert rel < close, (bits, rel)


@pytest.mark.parametrize("name", ["mlx", pytest.param("tinygrad", marks=pytest.mark.slow)])  # tinygrad: 25 s
def test_quantized_decoding_matches_the_full_forward(name):
    from twinlm.engine import Engine, Finish, Request
    from twinlm.generate import generate
    from twinlm.run_dir import to_backend

    _, _, qcfg, qparams = _quantized("llama", 4)
    prompt = np.array([[1, 2, 3]], np.int32)
    N = backend_or_skip("numpy")
    want = np.stack(list(generate(N, qcfg, to_backend(N, qparams), prompt, 6, temperature=0.0)), axis=1)
    B = backend_or_skip(name)
    p = to_backend(B, qparams)
    for cache in (True, False):  # the KV-cache decode step and the whole-context forward
        got = np.stack(list(generate(B, qcfg, p, prompt, 6, temperature=0.0, use_cache=cache)), axis=1)
        np.testing.assert_array_equal(got, want)  # the float64 reference's greedy tokens
    # chat's and serve's engine (its own compiled decode step) decodes the same tokens
    engine = Engine(B, qcfg, qparams, slots=2)
    try:
        req = Request([1, 2, 3], 6, temperature=0.0)
        engine.submit(req)
        tokens = []
        while not isinstance(item := req.tokens.get(timeout=120), Finish):
            tokens.append(item)
    finally:
        engine.close()
    assert tokens == list(want[0])


# ---- the command line ---------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture
def base_run(tmp_path, corpus, capsys, monkeypatch) -> Path:
    """A small GPT trained a few steps (d_model 64: every linear layer's width divides by 32 and 64)."""
    run = tmp_path / "base"
    code, _, err = run_cli(["train", "--data", str(corpus), "--preset", "small", "--block-size", "16",
                            "--max-iters", "4", *SETTINGS, "--out", str(run)], capsys, monkeypatch)
    assert code == 0, err
    return run


@pytest.mark.parametrize("everywhere", [False, pytest.param(True, marks=pytest.mark.slow)])  # tinygrad: +10 s
def test_cli_quantize_runs_everywhere_and_refuses_bad_input(everywhere, base_run, tmp_path, corpus, capsys,
                                                            monkeypatch):
    import twinlm

    BACKENDS = ("mlx", "numpy", "tinygrad") if everywhere else ("mlx", "numpy")

    q4 = tmp_path / "q4"
    code, out, err = run_cli(["quantize", str(base_run), "--bits", "4", "--out", str(q4)], capsys,
                             monkeypatch)
    assert code == 0, err
    assert "quantized 8 linear layers and the embedding (the tied head)" in out and "4-bit (group 64)" in out
    cfg, params, _, meta = load_model(q4)
    assert (cfg.quant_bits, cfg.quant_group_size, cfg.quant_embedding) == (4, 64, True)
    assert meta.task_state is None
    assert params["blocks.0.attn.qkv.qweight"].dtype == np.uint32 and "blocks.0.attn.qkv.weight" not in params
    assert params["wte.qweight"].dtype == np.uint32 and "wte.weight" not in params  # the tied embedding too
    assert params["wpe.weight"].dtype == np.float32  # (learned positions stay float)
    texts = []
    for name in BACKENDS:
        code, out, err = run_cli(["sample", str(q4), "--backend", name, "--prompt", "jack", "-n", "12",
                                  "-t", "0"], capsys, monkeypatch)
        assert code == 0, err
        texts.append(out)
        code, out, err = run_cli(["eval", str(q4), "--backend", name], capsys, monkeypatch)
        assert code == 0 and "perplexity" in out, err
        code, out, err = run_cli(["predict", str(q4), "jack", "--backend", name, "-n", "5"], capsys,
                                 monkeypatch)
        assert code == 0 and "jack" in out, err
    assert len(set(texts)) == 1, texts
    lm = {b: twinlm.load(q4, backend=b).logits("jack and") for b in BACKENDS}
    for b in BACKENDS[1:]:
        np.testing.assert_allclose(lm[b], lm["mlx"], rtol=1e-4, atol=1e-4)
    flt = twinlm.load(base_run, backend="mlx").logits("jack and")
    assert np.abs(lm["mlx"] - flt).max() < 0.1 * np.abs(flt).max()
    # --keep-embedding: the embedding stays float, as in a run quantized before the choice existed (no
    # quant_embedding in its record), which loads and runs as before
    keep, old = tmp_path / "q4-keep", tmp_path / "q4-old"
    code, out, err = run_cli(["quantize", str(base_run), "--bits", "4", "--keep-embedding", "--out",
                              str(keep)], capsys, monkeypatch)
    assert code == 0 and "quantized 8 linear layers of" in out, err
    arrays, record = load_checkpoint(latest_checkpoint(keep))
    assert record["model"].pop("quant_embedding") is False
    save_checkpoint(old, arrays, record, step=record["iter"], keep=None)
    kept = {}
    for run in (keep, old):
        cfg, params, _, _ = load_model(run)
        assert not cfg.quant_embedding and "wte.qweight" not in params
        assert params["wte.weight"].dtype == np.float32
        kept[run] = twinlm.load(run, backend="mlx").logits("jack and")
        code, out, err = run_cli(["sample", str(run), "--prompt", "jack", "-n", "12", "-t", "0"], capsys,
                                 monkeypatch)
        assert code == 0, err
    np.testing.assert_array_equal(kept[keep], kept[old])
    assert not np.allclose(kept[keep], lm["mlx"], rtol=1e-4, atol=1e-4)  # the quantized table is not float
    size = {run: sum(f.stat().st_size for f in latest_checkpoint(run).glob("*.safetensors"))
            for run in (q4, keep)}
    assert size[q4] < size[keep], size
    for args, message in [
        (["quantize", str(base_run), "--bits", "4", "--out", str(q4)], "not empty"),
        (["quantize", str(base_run), "--bits", "3", "--out", str(tmp_path / "x")], "'--bits'"),
        (["quantize", str(base_run), "--bits", "4", "--group-size", "48", "--out", str(tmp_path / "x")],
         "'--group-size'"),
        (["quantize", str(q4), "--bits", "8", "--out", str(tmp_path / "x")], "already quantized"),
        (["quantize", str(tmp_path / "nope"), "--bits", "8", "--out", str(tmp_path / "x")], "not found"),
    ]:
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and message in err and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_cli_quantize_refuses_a_group_that_does_not_divide(tmp_path, corpus, capsys, monkeypatch):
    run = tmp_path / "tiny"
    code, _, err = run_cli(["train", "--data", str(corpus), "--preset", "tiny", "--block-size", "16",
                            "--max-iters", "1", *SETTINGS, "--out", str(run)], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["quantize", str(run), "--bits", "8", "--out", str(tmp_path / "x")], capsys,
                           monkeypatch)
    assert code == 2 and "32 inputs, not a multiple of the group size 64" in err, err
    code, _, err = run_cli(["quantize", str(run), "--bits", "8", "--group-size", "32", "--out",
                            str(tmp_path / "x")], capsys, monkeypatch)
    assert code == 0, err


# tinygrad: 45 s here (compiling its training step), so not in CI
@pytest.mark.parametrize("backend", ["mlx", pytest.param("tinygrad", marks=pytest.mark.slow)])
def test_qlora_trains_adapters_over_a_frozen_quantized_base(backend, base_run, tmp_path, corpus, capsys,
                                                           monkeypatch):
    backend_or_skip(backend)
    q4, run, merged, hf = (tmp_path / n for n in ("q4", "qlora", "merged", "hf"))
    code, _, err = run_cli(["quantize", str(base_run), "--bits", "4", "--group-size", "32", "--out", str(q4)],
                           capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(["train", "--backend", backend, "--init-from", str(q4), "--data", str(corpus),
                              "--lora-rank", "4", "--max-iters", "4", *SETTINGS, "--out", str(run)],
                             capsys, monkeypatch)
    assert code == 0, err
    arrays, meta = load_checkpoint(latest_checkpoint(run))
    stored = {k.split(".", 1)[1] for k in arrays if k.startswith("param.")}
    assert stored and all(k.endswith((".lora_a", ".lora_b")) for k in stored), stored  # not the base
    assert {k for k in arrays if k.startswith("m.")} == {f"m.{k}" for k in stored}  # no AdamW state for it
    assert meta["model"]["quant_bits"] == 4
    cfg, params, _, _ = load_model(run)
    _, base_params, _, _ = load_model(q4)
    for k in base_params:
        np.testing.assert_array_equal(params[k], base_params[k])  # frozen: the same words, scales, biases
    assert any(np.abs(params[k]).max() > 0 for k in params if k.endswith("lora_b"))  # the adapters learnt
    code, out, err = run_cli(["merge-lora", str(run), "--out", str(merged)], capsys, monkeypatch)
    assert code == 0, err
    mcfg, mparams, _, _ = load_model(merged)
    assert (mcfg.quant_bits, mcfg.lora_rank, mcfg.quant_embedding) == (0, 0, False)
    assert mparams["blocks.0.attn.qkv.weight"].dtype == np.float32
    # the quantized table comes back as the embedding (V, C), not transposed: the lookup's rows
    assert "wte.weight" in base_params or mparams["wte.weight"].shape == (cfg.vocab_size, cfg.d_model)
    if "wte.qweight" in base_params:
        np.testing.assert_array_equal(mparams["wte.weight"], quant.dequantize(
            base_params["wte.qweight"], base_params["wte.scales"], base_params["wte.biases"], 4, 32))
    import twinlm

    a = twinlm.load(run, backend="mlx").logits("jack and jill")
    b = twinlm.load(merged, backend="mlx").logits("jack and jill")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # the dequantized merge computes the same function
    if backend == "mlx":  # gradient checkpointing recomputes each block: the same adapters (bit for bit here)
        code, _, err = run_cli(["train", "--init-from", str(q4), "--data", str(corpus), "--lora-rank", "4",
                                "--max-iters", "4", *SETTINGS, "--grad-checkpoint", "--out",
                                str(tmp_path / "gc")], capsys, monkeypatch)
        assert code == 0, err
        remat, _ = load_checkpoint(latest_checkpoint(tmp_path / "gc"))
        for k in arrays:
            if k.startswith("param."):
                np.testing.assert_allclose(remat[k], arrays[k], rtol=1e-5, atol=1e-6, err_msg=k)
        code, _, err = run_cli(["train", "--init-from", str(q4), "--data", str(corpus), "--lora-rank", "4",
                                "--max-iters", "2", *SETTINGS, "--dtype", "bfloat16", "--grad-checkpoint",
                                "--out", str(tmp_path / "bf16")], capsys, monkeypatch)
        assert code == 0, err  # QLoRA in bfloat16: the quantized embedding's rows come out in bfloat16
        code, _, err = run_cli(["train", "--init-from", str(q4), "--data", str(corpus), "--out",
                                str(tmp_path / "full")], capsys, monkeypatch)
        assert code == 2 and "only through adapters" in err and len(err.splitlines()) == 1, err
        pytest.importorskip("safetensors")
        code, _, err = run_cli(["export-hf", str(merged), "--out", str(hf)], capsys, monkeypatch)
        assert code == 0, err
        assert json.loads((hf / "config.json").read_text())["architectures"]


@pytest.mark.parametrize("name", ["mlx", "tinygrad"])
def test_quantized_embedding_rows_come_in_the_models_dtype(name):
    """In a bfloat16 model the looked-up rows are bfloat16 (the float weights' dtype), though the table's
    scales stay float32; its logits stay close to float32's."""
    from twinlm.core import layers as L
    from twinlm.run_dir import to_backend

    B = backend_or_skip(name)
    _, _, qcfg, qparams = _quantized("llama", 4)
    ids = B.from_numpy(np.array([[1, 2, 3]], np.int32))
    for dtype in ("float32", "bfloat16"):
        p = to_backend(B, qparams, dtype)
        assert B.dtype_name(p["wte.scales"]) == "float32" and B.dtype_name(p["ln_f.weight"]) == dtype
        rows = L.embed(B, qcfg, p, "wte", ids)
        assert B.dtype_name(rows) == dtype
        if dtype == "float32":
            f32 = B.to_numpy(rows)
    np.testing.assert_allclose(B.to_numpy(rows), f32, rtol=1e-2, atol=1e-2)  # (bfloat16's 8 bits)
    if name == "mlx":  # (tinygrad compiles a bfloat16 model for ~30 s)
        f32, bf16 = (B.to_numpy(model.logits(B, qcfg, to_backend(B, qparams, d), ids))
                     for d in ("float32", "bfloat16"))
        assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()


def test_cli_quantized_untied_head_round_trip(tmp_path, corpus, capsys, monkeypatch):
    """A Llama-style run with an untied head: quantize (embedding and head) -> sample -> QLoRA -> merge-lora
    -> export-hf; the merged model computes what the adapted quantized one does."""
    import twinlm

    run, q4, qlora, merged = (tmp_path / n for n in ("llama", "q4", "qlora", "merged"))
    code, _, err = run_cli(["train", "--data", str(corpus), "--arch", "llama", "--preset", "small",
                            "--untie-embeddings", "--d-ff", "128", "--block-size", "16", "--max-iters", "2",
                            *SETTINGS, "--out", str(run)], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(["quantize", str(run), "--bits", "8", "--group-size", "32", "--out", str(q4)],
                             capsys, monkeypatch)
    assert code == 0 and "and the embedding and the LM head" in out, err
    cfg, params, _, _ = load_model(q4)
    assert not cfg.tie_embeddings and {"wte.qweight", "head.qweight"} <= set(params)
    assert params["head.qweight"].shape == (cfg.vocab_size, cfg.d_model * 8 // 32)
    code, _, err = run_cli(["sample", str(q4), "--prompt", "jack", "-n", "8", "-t", "0"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["train", "--init-from", str(q4), "--data", str(corpus), "--lora-rank", "4",
                            "--max-iters", "2", *SETTINGS, "--out", str(qlora)], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["merge-lora", str(qlora), "--out", str(merged)], capsys, monkeypatch)
    assert code == 0, err
    mcfg, mparams, _, _ = load_model(merged)
    assert mparams["head.weight"].shape == (cfg.d_model, cfg.vocab_size)  # (n_in, n_out), a linear weight
    assert mparams["wte.weight"].shape == (cfg.vocab_size, cfg.d_model)
    a = twinlm.load(qlora, backend="mlx").logits("jack and")
    b = twinlm.load(merged, backend="mlx").logits("jack and")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    pytest.importorskip("safetensors")
    code, _, err = run_cli(["export-hf", str(merged), "--out", str(tmp_path / "hf")], capsys, monkeypatch)
    assert code == 0, err


def test_quantized_bert_embedding_and_mlm_head():
    """BERT's masked-LM head is the tied embedding too (plus a bias): quantized, MLX gives the float64
    reference's logits, which are those of the dequantized float model."""
    from twinlm.run_dir import to_backend

    cfg, params, qcfg, qparams = _quantized("bert", 4)
    spec = model.param_spec(qcfg)
    assert spec["wte.qweight"].table and "wte.weight" not in qparams and "tte.weight" in qparams
    ids = np.random.default_rng(2).integers(0, 48, size=(2, 12)).astype(np.int32)
    N, M = backend_or_skip("numpy"), backend_or_skip("mlx")
    ref = N.to_numpy(model.logits(N, qcfg, to_backend(N, qparams), N.from_numpy(ids)))
    got = M.to_numpy(model.logits(M, qcfg, to_backend(M, qparams), M.from_numpy(ids)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    flt = quant.dequantize_params(qparams, spec, 4, 32)
    deq = N.to_numpy(model.logits(N, cfg, to_backend(N, flt), N.from_numpy(ids)))
    np.testing.assert_allclose(deq, ref, rtol=1e-4, atol=1e-4)
    # the control: the same check refuses a model whose table is another (its values in reverse order)
    wrong = {**flt, "wte.weight": np.ascontiguousarray(flt["wte.weight"].reshape(-1)[::-1].reshape(48, 64))}
    bad = N.to_numpy(model.logits(N, cfg, to_backend(N, wrong), N.from_numpy(ids)))
    assert not np.allclose(bad, ref, rtol=1e-4, atol=1e-4)
