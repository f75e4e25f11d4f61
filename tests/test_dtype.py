"""`--dtype`: bfloat16/float16 casts and composites on both backends against numpy, the statistics kept in
float32 (with the control that keeps them in the low dtype failing), and sampling end to end."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TRAINABLE, backend_or_skip, run_cli

from twinlm.core import dtypes as D
from twinlm.core.checkpoint import save_checkpoint
from twinlm.core.config import preset
from twinlm.core.params import init_params
from twinlm.core.tokenizers import ByteTokenizer

LOW = ("bfloat16", "float16")


# ---- core.dtypes (numpy only) -------------------------------------------------------------------------

def test_bf16_bits_round_to_nearest_even() -> None:
    x = np.array([1.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -2.5, np.inf, 3.0e38], np.float32)
    bits = D.bf16_bits(x)
    assert D.is_bf16(bits) and not D.is_bf16(bits.view(np.uint16))
    # 1 + 2^-8 is a tie: to even (1.0); 1 + 3 * 2^-8 rounds up to 1 + 2^-6; 3e38 rounds to bf16's max-ish.
    assert list(bits.view(np.uint16)[:4]) == [0x3F80, 0x3F80, 0x3F82, 0xC020]
    back = D.bf16_to_float32(bits)
    assert back[4] == np.inf and np.isfinite(back[5])
    assert np.isnan(D.bf16_to_float32(D.bf16_bits(np.array([np.nan], np.float32))))[0]
    r = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    rel = np.abs(D.round_to(r, "bfloat16") - r) / np.abs(r)
    assert rel.max() <= D.UNIT_ROUNDOFF["bfloat16"] and rel.max() > D.UNIT_ROUNDOFF["float16"]
    assert D.is_bf16(D.bf16_bits(r)[10:20].reshape(2, 5).copy())  # the tag survives views and copies


def test_dtype_names() -> None:
    assert D.check("bf16") == "bfloat16" and D.check("FP16") == "float16" and D.check("float32") == "float32"
    with pytest.raises(ValueError, match="choose float32, bfloat16 or float16"):
        D.check("int8")


# ---- the primitive and the composites on each backend -------------------------------------------------

@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("dtype", LOW)
def test_astype_round_trip_matches_numpy(name: str, dtype: str) -> None:
    B = backend_or_skip(name)
    x = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32)
    low = B.astype(B.from_numpy(x), dtype)
    B.sync(low)  # (a lazy cast folded into the next one would be no cast at all on tinygrad's emulation)
    assert B.dtype_name(low) == dtype
    assert np.array_equal(B.to_numpy(low).astype(np.float32), D.round_to(x, dtype))
    host = B.to_host(low)
    assert D.name_of(host) == dtype
    again = B.from_numpy(host)  # storage form back in: the same dtype and values
    assert B.dtype_name(again) == dtype and np.array_equal(B.to_numpy(again), B.to_numpy(low))


def _composites(B, x, w, b, t):
    return {"softmax": B.softmax(x), "log_softmax": B.log_softmax(x), "layer_norm": B.layer_norm(x, w, b),
            "rms_norm": B.rms_norm(x, w), "cross_entropy": B.cross_entropy(x, t)}


def _reference(x, w, b, t):
    from twinlm.backends.numpy_ref import NumpyBackend

    N = NumpyBackend()
    return {k: N.to_numpy(v) for k, v in _composites(N, *(N.from_numpy(a) for a in (x, w, b, t))).items()}


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("dtype", LOW)
def test_composites_keep_float32_statistics(name: str, dtype: str) -> None:
    """softmax, the norms and the loss of low-precision inputs: within a few units of the dtype's roundoff
    of the float64 reference on the same rounded inputs, returned in the input's dtype (the loss float32).
    Each row is 48 x 4000 and 16 x 4016 (exact in both dtypes): x * x overflows float16 (max 65504), and the
    mean, 4004, is not a bfloat16 (spacing 16 there): statistics kept in the low dtype (`stats_float32 =
    False`) are far off (the mean's error is half the spread), the negative control."""
    B = backend_or_skip(name)
    rng = np.random.default_rng(2)
    x = np.stack([rng.permutation(np.r_[np.full(48, 4000.0), np.full(16, 4016.0)]) for _ in range(4)])
    x = x.astype(np.float32)
    w = D.round_to(1.0 + 0.1 * rng.normal(size=64).astype(np.float32), dtype)
    b = D.round_to(0.1 * rng.normal(size=64).astype(np.float32), dtype)
    t = rng.integers(0, 64, 4).astype(np.int32)
    ref = _reference(x, w, b, t)
    tol = 8 * D.UNIT_ROUNDOFF[dtype]

    def run(stats_float32: bool) -> dict[str, np.ndarray]:
        B.stats_float32, fused = stats_float32, B.fused
        B.fused = False  # the reference bodies (MLX's fused norms keep float32 statistics themselves)
        try:
            args = [B.astype(B.from_numpy(a), dtype) for a in (x, w, b)]
            out = _composites(B, *args, B.from_numpy(t))
            if not stats_float32:  # (tinygrad's emulated bfloat16 cannot compile a bfloat16 max reduction)
                out = {k: out[k] for k in ("layer_norm", "rms_norm")}
            kinds = {k: B.dtype_name(v) for k, v in out.items()}
            assert kinds == {**dict.fromkeys(out, dtype), "cross_entropy": "float32"} or not stats_float32
            return {k: B.to_numpy(v).astype(np.float64) for k, v in out.items()}
        finally:
            vars(B).pop("stats_float32", None)
            B.fused = fused

    def err(got: dict[str, np.ndarray], k: str) -> float:
        scale = max(1.0, float(np.abs(ref[k]).max()))
        with np.errstate(invalid="ignore"):  # (inf - inf in the control's overflowed float16)
            return float(np.nan_to_num(np.abs(got[k] - ref[k]), nan=np.inf).max()) / scale

    good = run(True)
    for k in ref:
        assert err(good, k) <= tol, (k, err(good, k), tol)
    bad = run(False)  # negative control: statistics in the low dtype
    assert max(err(bad, k) for k in ("layer_norm", "rms_norm")) > 4 * tol


@pytest.mark.parametrize("name", TRAINABLE)
def test_take_from_a_large_bf16_table(name: str) -> None:
    """A Qwen-sized vocabulary: tinygrad's emulated-bfloat16 gather of 65,536+ rows failed to compile."""
    B = backend_or_skip(name)
    table = np.random.default_rng(0).standard_normal((65536, 8)).astype(np.float32)
    rows = B.take(B.from_numpy(D.to_host(table, "bfloat16")), B.from_numpy(np.array([[3, 65535]], np.int32)))
    assert B.dtype_name(rows) == "bfloat16"
    want = D.round_to(table[[3, 65535]], "bfloat16")[None]
    np.testing.assert_array_equal(B.to_numpy(B.astype(rows, "float32")), want)


@pytest.mark.parametrize("name", TRAINABLE)
def test_fused_norms_in_bf16(name: str) -> None:
    """The adapters' own norms (MLX's mx.fast, tinygrad's realised ones) agree with the reference body."""
    B = backend_or_skip(name)
    rng = np.random.default_rng(3)
    x = B.astype(B.from_numpy(rng.normal(size=(2, 5, 32)).astype(np.float32)), "bfloat16")
    w = B.astype(B.from_numpy(np.ones(32, np.float32)), "bfloat16")
    got = B.rms_norm(x, w)
    assert B.dtype_name(got) == "bfloat16"
    ref = _reference(B.to_numpy(x)[0], B.to_numpy(w), np.zeros(32, np.float32), np.zeros(5, np.int32))
    assert np.abs(B.to_numpy(got)[0] - ref["rms_norm"]).max() < 8 * D.UNIT_ROUNDOFF["bfloat16"] * 4


# ---- a model in a dtype ------------------------------------------------------------------------------

def _run(run_dir, dtype_meta: str | None = None) -> dict[str, np.ndarray]:
    tok = ByteTokenizer()
    cfg = preset("tiny", vocab_size=tok.vocab_size, block_size=16)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0.0, 0.3, v.shape).astype(np.float32) if v.ndim == 2 else v
              for k, v in init_params(cfg, 0).items()}
    meta = {"model": cfg.to_dict(), "tokenizer": tok.to_dict(), "iter": 10}
    if dtype_meta:
        meta["dtype"] = dtype_meta
    save_checkpoint(run_dir, {f"param.{k}": v for k, v in params.items()}, meta, step=10)
    return params


@pytest.mark.parametrize("name", TRAINABLE)
def test_sample_in_bfloat16(tmp_path, capsys, monkeypatch, name: str) -> None:
    """`sample --dtype bfloat16` gives the greedy continuation of the model with bf16 weights (its KV cache
    in bf16 too), on each backend; the run's recorded dtype is the default."""
    from twinlm.generate import generate, make_decoder
    from twinlm.run_dir import to_backend

    B = backend_or_skip(name)
    params = _run(tmp_path)
    cfg = preset("tiny", vocab_size=256, block_size=16)
    tok = ByteTokenizer()
    ids = tok.encode("to be")[None, :]
    p = to_backend(B, params, "bfloat16")
    assert {B.dtype_name(v) for v in p.values()} == {"bfloat16"}
    want = "to be" + tok.decode([int(c[0]) for c in generate(B, cfg, p, ids, 12, temperature=0.0)]) + "\n"
    code, out, err = run_cli(["sample", str(tmp_path), "--prompt", "to be", "-n", "12", "-t", "0",
                              "--backend", name, "--dtype", "bfloat16"], capsys, monkeypatch)
    assert code == 0, err
    assert out == want and "bfloat16" in err
    dec = make_decoder(B, cfg, p, 1, "fixed" if name == "tinygrad" else "kv", 8)
    dec.next_logits(ids)
    caches = dec.steps.kv_step.state.values() if name == "tinygrad" else [c for kv in dec.cache for c in kv]
    assert {B.dtype_name(c) for c in caches} == {"bfloat16"}
    # the run's recorded dtype is the default; an unknown one is a one-line error
    _run(tmp_path / "rec", "float16")
    code, out, err = run_cli(["sample", str(tmp_path / "rec"), "-n", "2", "--backend", name],
                             capsys, monkeypatch)
    assert code == 0 and "float16" in err
    _run(tmp_path / "bad", "int4")
    code, out, err = run_cli(["sample", str(tmp_path / "bad"), "-n", "2", "--backend", name],
                             capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and "int4" in err and err.count("\n") == 1


def test_api_load_in_a_dtype(tmp_path) -> None:
    import twinlm
    from twinlm.core.errors import TwinlmError

    backend_or_skip("mlx")
    _run(tmp_path)
    m = twinlm.load(tmp_path, "mlx", dtype="bf16")
    assert m.dtype == "bfloat16" and {m.backend.dtype_name(v) for v in m.params.values()} == {"bfloat16"}
    ref = twinlm.load(tmp_path, "mlx")
    assert ref.dtype == "float32"
    a, b = m.logits("to be"), ref.logits("to be")
    assert a.dtype == np.float32 and 0 < np.abs(a - b).max() < 0.05 * np.abs(b).max()
    with pytest.raises(TwinlmError, match="unknown dtype"):
        twinlm.load(tmp_path, "mlx", dtype="int8")


# ---- parity in bfloat16 / float16 ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_parity_dtype_phase_and_its_control(arch: str) -> None:
    """The parity suite's dtype phase passes clean (MLX vs the float64 reference on the same rounded
    weights, both low dtypes) and fails with softmax, norm statistics and loss kept in the low dtype."""
    from twinlm import parity

    backends = [backend_or_skip("mlx"), backend_or_skip("numpy")]
    suite = parity.Suite(backends, parity.arch_config(arch, "tiny", 32), batch=2, dtypes=LOW)
    clean = suite.run(phases=("dtype",))
    assert clean.ok and len(clean.checks) == 4, [c.label for c in clean.failures]
    assert {c.group.split()[1] for c in clean.checks} == {"bfloat16", "float16"}
    control = parity.control_named("low-precision-stats")
    assert control in suite.controls()
    assert control not in parity.Suite(backends, suite.cfg, batch=2).controls()  # no dtype phase, no control
    caught = suite.run(control, phases=("dtype",))
    assert not caught.ok and any(c.name == "loss" for c in caught.failures)


def test_dtype_tolerances_follow_the_unit_roundoff() -> None:
    from twinlm.parity import checks

    bf_logits, bf_loss = checks.dtype_tolerances("bfloat16", 10.0, 4.0)
    fp_logits, fp_loss = checks.dtype_tolerances("float16", 10.0, 4.0)
    assert bf_logits.atol == 8 * fp_logits.atol == checks.DTYPE_LOGITS_ULPS * 2.0 ** -8 * 10.0
    assert bf_loss.atol == checks.DTYPE_LOSS_ULPS * 2.0 ** -8 * 4.0


# ---- mixed-precision training ---------------------------------------------------------------------------

TRAIN = dict(preset="tiny", block_size=16, batch_size=4, eval_iters=2, warmup=2, log_every=1, eval_every=100)


def _train(B, out, resume=None, **kw):
    import json

    from twinlm.trainer import TrainConfig, Trainer

    t = Trainer(TrainConfig(out=str(out), **{**TRAIN, **kw}) if resume is None else TrainConfig(**kw), B,
                resume=resume, log=lambda m: None)
    t.fit()
    rows = [json.loads(r) for r in (t.out / "metrics.jsonl").read_text().splitlines() if '"train"' in r]
    return t, [r["loss"] for r in rows]


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_train_in_a_low_dtype_tracks_float32_and_resumes_exactly(tmp_path, monkeypatch, dtype: str) -> None:
    """A bf16/fp16 run: float32 master weights and moments, the forward and backward in the dtype; its
    losses stay close to the float32 run's; the dtype (and float16's loss scale) is in the checkpoint,
    resume continues bit for bit, and resuming with another --dtype is a one-line error."""
    from twinlm.core.checkpoint import load_checkpoint
    from twinlm.core.errors import TwinlmError
    from twinlm.run_dir import load_model

    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    B = backend_or_skip("mlx")
    _, ref = _train(B, tmp_path / "f32", max_iters=12, dropout=0.1)
    straight, low = _train(B, tmp_path / "low", max_iters=12, dropout=0.1, dtype=dtype)
    assert len(low) == len(ref) == 12 and low != ref
    assert max(abs(a - b) for a, b in zip(low, ref, strict=True)) < 0.05 * ref[0]
    assert low[-1] < low[0] - 0.02  # it learns
    masters = {B.dtype_name(v) for k, v in straight.step.state.items() if not k.startswith("amp.")}
    assert masters == {"float32"}
    assert {B.dtype_name(v) for v in straight.params().values()} == {dtype}
    arrays, meta = load_checkpoint(tmp_path / "low")
    assert meta["dtype"] == dtype and ("amp.scale" in arrays) == (dtype == "float16")
    _, _, _, m = load_model(tmp_path / "low")
    assert m.dtype == dtype  # sample/eval default to it
    _, first = _train(B, tmp_path / "half", max_iters=6, dropout=0.1, dtype=dtype, lr_decay_iters=12)
    _, full = _train(B, tmp_path / "full", max_iters=12, dropout=0.1, dtype=dtype, lr_decay_iters=12)
    _, resumed = _train(B, None, resume=tmp_path / "half", max_iters=12)  # (its metrics file: all 12)
    assert resumed[:6] == first and resumed == full  # exact, every step
    with pytest.raises(TwinlmError, match="keeps its dtype"):
        _train(B, None, resume=tmp_path / "half", max_iters=14, dtype="float32")


def test_float16_loss_scale_overflow_halves_and_skips() -> None:
    """A loss scale so large that the float16 backward overflows: the step is skipped (state unchanged,
    non-finite gradient norm) and the scale halves; a finite step counts towards growth."""
    from twinlm.core import model as M
    from twinlm.core import optim
    from twinlm.core import step as S
    from twinlm.core.spec import init_params as spec_init

    B = backend_or_skip("mlx")
    cfg = preset("tiny", vocab_size=32, block_size=8)

    spec = M.param_spec(cfg)
    state = {**S.init_state(spec_init(spec, 0), spec), "amp.scale": np.asarray(2.0 ** 40, np.float32),
             "amp.good": np.asarray(0.0, np.float32)}
    opt = optim.AdamWConfig(lr=1e-3)
    step = B.compile_step(S.make_train_step(B, spec, opt, M.lm_loss_fn(B, cfg), dtype="float16"),
                          {k: B.from_numpy(v) for k, v in state.items()})
    x = (np.arange(16).reshape(2, 8) % 32).astype(np.int32)
    batch = {"x": x, "y": (x + 1) % 32}
    loss, gnorm = S.drive(B, step, cfg, opt, batch, 0, 0)
    assert np.isfinite(loss) and not np.isfinite(gnorm)
    got = {k: B.to_numpy(v) for k, v in step.state.items()}
    assert got["amp.scale"] == 2.0 ** 39 and got["amp.good"] == 0
    assert all(np.array_equal(got[k], state[k]) for k in state if not k.startswith("amp."))
    step.state["amp.scale"] = B.from_numpy(np.asarray(1024.0, np.float32))
    loss, gnorm = S.drive(B, step, cfg, opt, batch, 1, 0)
    got = {k: B.to_numpy(v) for k, v in step.state.items()}
    assert np.isfinite(gnorm) and got["amp.scale"] == 1024.0 and got["amp.good"] == 1
    assert not np.array_equal(got["param.wte.weight"], state["param.wte.weight"])


@pytest.mark.parametrize("name", ["mlx", pytest.param("tinygrad", marks=pytest.mark.slow)])
def test_engine_serves_in_bfloat16(name: str) -> None:
    """chat/serve's engine: weights and KV cache in bf16, the same greedy tokens as `generate` with the same
    bf16 weights."""
    from twinlm.engine import Engine, Finish, Request
    from twinlm.generate import generate
    from twinlm.run_dir import to_backend

    B = backend_or_skip(name)
    cfg = preset("tiny", vocab_size=50, block_size=32).replace(arch="llama", pos_encoding="rope",
                                                               norm="rmsnorm", activation="swiglu")
    params = init_params(cfg, 0)
    engine = Engine(B, cfg, params, slots=2, dtype="bfloat16")
    try:
        req = Request([1, 2, 3], 6, temperature=0.0)
        engine.submit(req)
        tokens = []
        while not isinstance(item := req.tokens.get(timeout=120), Finish):
            tokens.append(item)
        caches = engine._cache if engine.bucketed else list(engine._steps[engine._length].state.values())
        assert {B.dtype_name(c) for c in caches} == {"bfloat16"}
        assert {B.dtype_name(v) for v in engine._params.values()} == {"bfloat16"}
    finally:
        engine.close()
    want = [int(c[0]) for c in generate(B, cfg, to_backend(B, params, "bfloat16"), np.array([[1, 2, 3]]), 6,
                                        temperature=0.0)]
    assert tokens == want


@pytest.mark.parametrize("name", TRAINABLE)
def test_float32_tables_do_not_promote_the_model(name: str) -> None:
    """Sinusoidal positions and a classifier's one-hot pooling are float32 host tables: the model still
    computes in bf16 (the logits come out bf16) and agrees with the float64 reference on the same weights."""
    from twinlm.backends.numpy_ref import NumpyBackend
    from twinlm.core import model
    from twinlm.core.config import ModelConfig
    from twinlm.run_dir import to_backend

    B, N = backend_or_skip(name), NumpyBackend()
    cfg = ModelConfig(arch="gpt", vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32,
                      pos_encoding="sinusoidal", n_classes=3)
    params = init_params(cfg, 0)
    ids = np.random.default_rng(0).integers(0, 50, (2, 12)).astype(np.int32)
    pool = np.zeros((2, 12), np.float32)
    pool[:, -1] = 1
    out = {}
    for X in (B, N):
        p = to_backend(X, params, "bfloat16")
        lg = model.logits(X, cfg, p, X.from_numpy(ids))
        c = model.classify(X, cfg, p, X.from_numpy(ids), X.from_numpy(pool))
        out[X.name] = (X.dtype_name(lg), X.dtype_name(c), X.to_numpy(lg), X.to_numpy(c))
    assert out[name][:2] == ("bfloat16", "bfloat16")
    for i in (2, 3):
        ref = out["numpy"][i]
        assert np.abs(out[name][i] - ref).max() <= 8 * D.UNIT_ROUNDOFF["bfloat16"] * np.abs(ref).max()


def test_lora_keeps_its_frozen_base_in_the_low_dtype(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    B = backend_or_skip("mlx")
    text = tmp_path / "notes.txt"
    text.write_text("the cat sat on the mat. " * 200, encoding="utf-8")
    _train(B, tmp_path / "base", max_iters=4, data=str(text), tokenizer="byte")
    from twinlm.trainer import TrainConfig, Trainer

    settings = {k: v for k, v in TRAIN.items() if k != "preset"}  # (a run from a base keeps its model)
    t = Trainer(TrainConfig(out=str(tmp_path / "lora"), max_iters=4, base=str(tmp_path / "base"), lora_rank=2,
                            data=str(text), dtype="bfloat16", **settings), B, log=lambda m: None)
    t.fit()
    losses = [t.val_loss()]
    kinds = {k: B.dtype_name(v) for k, v in t.step.state.items() if k.startswith("param.")}
    frozen = {f"param.{k}" for k, s in t.spec.items() if not s.trainable}
    assert frozen and {kinds[k] for k in frozen} == {"bfloat16"}
    assert {kinds[k] for k in kinds if k not in frozen} == {"float32"} and all(np.isfinite(losses))
