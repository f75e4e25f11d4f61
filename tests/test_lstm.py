"""The recurrent baselines (`--arch lstm`, `--arch rnn`): the graph against a hand-written numpy LSTM/RNN
(forward, and the gradient by float64 finite differences of that reference), across backends through the
parity suite (forward, every gradient, AdamW steps, causality) with its negative control, generation from
the recurrent state, and training through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backend_or_skip, run_cli

from twinlm import parity
from twinlm.core import model
from twinlm.core.config import ConfigError, ModelConfig
from twinlm.core.params import init_params
from twinlm.parity import Side


def cfg_of(arch: str) -> ModelConfig:
    return parity.arch_config(arch, "tiny", 32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b


def reference_logits(cfg: ModelConfig, p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """A plain numpy LSTM / RNN written from the textbook equations, one time step at a time (float64)."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    C = cfg.d_model
    seq = p["wte.weight"][x]  # (B, T, C)
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}.{cfg.arch}"
        h, c = np.zeros((x.shape[0], C)), np.zeros((x.shape[0], C))
        outs = []
        for t in range(x.shape[1]):
            z = seq[:, t] @ p[f"{pre}.w_ih"] + h @ p[f"{pre}.w_hh"] + p[f"{pre}.bias"]
            if cfg.arch == "rnn":
                h = np.tanh(z)
            else:
                gi, gf, gg, go = np.split(z, 4, axis=-1)
                c = _sigmoid(gf) * c + _sigmoid(gi) * np.tanh(gg)
                h = _sigmoid(go) * np.tanh(c)
            outs.append(h)
        seq = np.stack(outs, axis=1)
    return _layer_norm(seq, p["ln_f.weight"], p["ln_f.bias"]) @ p["wte.weight"].T


def _reference_loss(cfg: ModelConfig, p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    lg = reference_logits(cfg, p, x)
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, y[..., None], -1).mean())


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
@pytest.mark.parametrize("name", ["numpy", "mlx"])
def test_forward_matches_hand_written_numpy(arch: str, name: str) -> None:
    cfg = cfg_of(arch)
    B = backend_or_skip(name)
    params = parity.unit_scale_params(cfg, 0)  # gates well away from their linear region
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.block_size)).astype(np.int32)
    got = B.to_numpy(model.logits(B, cfg, {k: B.from_numpy(v) for k, v in params.items()}, B.from_numpy(x)))
    want = reference_logits(cfg, params, x)
    np.testing.assert_allclose(got, want, atol=1e-4 if name == "mlx" else 1e-10, rtol=1e-4)
    assert np.abs(want).max() > 0.5  # not a vacuous comparison of near-zero logits


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_gradient_matches_finite_differences_of_the_numpy_reference(arch: str) -> None:
    cfg = cfg_of(arch)
    B = backend_or_skip("mlx")
    params = parity.unit_scale_params(cfg, 1)
    rng = np.random.default_rng(1)
    seq = rng.integers(0, cfg.vocab_size, (2, cfg.block_size + 1)).astype(np.int32)
    x, y = seq[:, :-1], seq[:, 1:]
    loss, grads = B.value_and_grad(lambda p: B.cross_entropy(model.logits(B, cfg, p, B.from_numpy(x)),
                                                             B.from_numpy(y)))(
        {k: B.from_numpy(v) for k, v in params.items()})
    assert float(B.to_numpy(loss)) == pytest.approx(_reference_loss(cfg, params, x, y), abs=1e-5)
    h = 1e-5
    for name, g in grads.items():  # the directional derivative along a random unit direction, per tensor
        d = rng.standard_normal(params[name].shape)
        d /= np.linalg.norm(d)
        plus, minus = dict(params), dict(params)
        plus[name] = params[name] + h * d
        minus[name] = params[name] - h * d
        numeric = (_reference_loss(cfg, plus, x, y) - _reference_loss(cfg, minus, x, y)) / (2 * h)
        assert float(np.sum(B.to_numpy(g) * d)) == pytest.approx(numeric, abs=2e-5, rel=1e-3), name


def test_options_a_recurrence_cannot_take() -> None:
    with pytest.raises(ConfigError, match="does not take pos_encoding 'learned'"):
        ModelConfig(arch="lstm", pos_encoding="learned")
    cfg = ModelConfig(arch="lstm", d_model=32, n_layer=2, vocab_size=10)
    assert cfg.kind == "decoder" and cfg.pos_encoding == "none"
    spec = model.param_spec(cfg)
    assert spec["blocks.0.lstm.w_hh"].shape == (32, 128) and spec["blocks.1.lstm.bias"].shape == (128,)
    assert model.param_spec(cfg.replace(arch="rnn"))["blocks.0.rnn.w_ih"].shape == (32, 32)


@pytest.fixture(scope="module")
def recurrent_suites() -> dict[str, parity.Suite]:
    backends = [backend_or_skip("mlx"), backend_or_skip("numpy")]
    return {arch: parity.Suite(backends, cfg_of(arch), steps=5, batch=2) for arch in ("lstm", "rnn")}


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_parity_suite_passes_and_only_fitting_controls_apply(recurrent_suites, arch: str) -> None:
    suite = recurrent_suites[arch]
    report = suite.run(phases=("model", "causal", "train"))
    assert report.ok, [c.label for c in report.failures]
    assert any(c.group == f"{arch} causal mlx" for c in report.checks)  # a recurrence is causal too
    expected = {"no-bias-correction", "layer-norm-eps"} | ({"lstm-tanh-gate"} if arch == "lstm" else set())
    assert {c.name for c in suite.controls()} == expected  # no attention: no mask, GELU or RoPE control


@pytest.mark.parametrize("name", ["lstm-tanh-gate", "no-bias-correction", "layer-norm-eps"])
def test_lstm_negative_controls_are_caught(recurrent_suites, name: str) -> None:
    report = recurrent_suites["lstm"].run(parity.control_named(name), phases=("model", "train"))
    failed = {c.group for c in report.failures}
    assert "lstm train dropout 0 mlx+" + name + " vs mlx" in failed, sorted(failed)
    if name == "lstm-tanh-gate":
        assert "lstm model (unit-scale weights) mlx+lstm-tanh-gate vs numpy" in failed
        # The primitives phase catches it too, on the sigmoid op case itself.
        wrong = parity.with_mixin(backend_or_skip("mlx"), parity.TanhGate, "TanhGate")
        case = next(c for c in parity.op_cases() if c.name == "sigmoid")
        assert not any(c.ok for c in parity.check_op(wrong, case))


@pytest.mark.slow  # ~1-3 min: tinygrad compiles every unrolled step's kernels (forward and backward)
def test_tinygrad_matches_numpy_forward_and_mlx_gradients() -> None:
    cfg = cfg_of("lstm")
    batch = parity.parity_batch(cfg, np.random.default_rng(0), 2, cfg.block_size)
    params = parity.unit_scale_params(cfg, 0)
    runs = {n: parity.model_run(Side.clean(backend_or_skip(n)), cfg, params, batch)
            for n in ("tinygrad", "mlx", "numpy")}
    checks = (parity.compare_model("tinygrad vs numpy", runs["tinygrad"], runs["numpy"])
              + parity.compare_model("tinygrad vs mlx", runs["tinygrad"], runs["mlx"]))
    assert len(checks) > 4 and all(c.ok for c in checks), [c.label for c in checks if not c.ok]


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_generation_from_the_state_equals_recomputation(arch: str) -> None:
    from twinlm.generate import make_decoder

    cfg = cfg_of(arch)
    B = backend_or_skip("mlx")
    p = {k: B.from_numpy(v) for k, v in parity.unit_scale_params(cfg, 2).items()}
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 3)).astype(np.int32)
    rows = {}
    for strategy in ("full", "kv", "fixed"):  # 3 + 8 > block 4: the window shifts too
        dec, out, toks = make_decoder(B, cfg, p, 2, strategy), [], tokens
        for _ in range(8):
            out.append(dec.next_logits(toks))
            toks = np.concatenate([toks, out[-1].argmax(-1).astype(np.int32)[:, None]], axis=1)
        rows[strategy] = np.stack(out)
    np.testing.assert_allclose(rows["kv"], rows["full"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(rows["fixed"], rows["full"], atol=1e-4, rtol=1e-4)


def test_train_and_sample_lstm_through_the_cli(tmp_path, capsys, monkeypatch) -> None:
    backend_or_skip("mlx")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = run_cli(["train", "--arch", "lstm", "--preset", "tiny", "--block-size", "16",
                              "--max-iters", "40", "--eval-every", "40", "--eval-iters", "2", "--batch-size",
                              "8", "--out", "run"], capsys, monkeypatch)
    assert code == 0, err
    assert "model lstm" in out
    code, out, err = run_cli(["sample", "run", "-n", "8", "-t", "0"], capsys, monkeypatch)
    assert code == 0, err
    assert init_params(cfg_of("lstm"), 0)  # the spec initialises without a transformer field
