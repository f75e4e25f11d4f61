"""Whole-model parity across mlx, tinygrad and float64 numpy: logits, loss, every gradient, 10
AdamW steps (with and without dropout), causality, float64 finite differences, golden values,
negative controls, and the `twinlm parity` command."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ALL_BACKENDS, TRAINABLE, backend_or_skip

import twinlm.backends
from twinlm import parity
from twinlm.cli import main as cli_main
from twinlm.cli.parity import command
from twinlm.core import dropout, model, optim
from twinlm.core.params import init_params
from twinlm.parity import Side

WEIGHTS = ("init", "unit-scale")


@pytest.fixture(scope="module")
def model_runs(tiny_cfg, tiny_params, tiny_tokens) -> dict[tuple[str, str], parity.ModelRun]:
    x, y = tiny_tokens
    weights = {"init": tiny_params, "unit-scale": parity.unit_scale_params(tiny_cfg, 0)}
    return {(name, w): parity.model_run(Side.clean(backend_or_skip(name)), tiny_cfg, weights[w],
                                        {"x": x, "y": y})
            for name in ALL_BACKENDS for w in WEIGHTS}


def test_model_parity(model_runs, tiny_params) -> None:
    # One test for every pair and weight set, so xdist builds the tinygrad graph in one worker only.
    failed = []
    for weights in WEIGHTS:
        for a, b in (("mlx", "tinygrad"), ("mlx", "numpy"), ("tinygrad", "numpy")):
            got, want = model_runs[(a, weights)], model_runs[(b, weights)]
            checks = parity.compare_model(f"{weights}: {a} vs {b}", got, want)
            assert len(checks) == 2 + (len(tiny_params) if want.grads is not None else 0)
            failed += [f"{c.label}: {c.max_abs:.3g} ({c.tol})" for c in checks if not c.ok]
            assert np.abs(got.logits).max() > 0.1  # not a comparison of two arrays of zeros
    assert not failed, failed


# Computed once with the float64 numpy_ref backend (tiny preset, vocab 32, block 16, seed 0,
# tokens (arange(34).reshape(2, 17) * 7) % 32) and pasted, so both backends cannot drift together.
GOLDEN_LOGITS_0_0 = [0.29393687265590707, -0.09734252627219062, 0.21671664867922502]
GOLDEN_LOGITS_1_15 = [-0.15641531221045177, 0.08686826373966519, 0.04788132666131745]
GOLDEN_LOSS = 3.4731557767125096


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_golden_logits(tiny_cfg, tiny_params, tiny_tokens, name: str) -> None:
    # Forward only, the same graph as the leakage test, so tinygrad builds no extra graph.
    B = backend_or_skip(name)
    p = {k: B.from_numpy(v) for k, v in tiny_params.items()}
    logits = B.to_numpy(model.logits(B, tiny_cfg, p, B.from_numpy(tiny_tokens[0])))
    loss = parity.ops._np_cross_entropy(logits.astype(np.float64), tiny_tokens[1])
    atol = 1e-10 if name == "numpy" else 2e-6
    np.testing.assert_allclose(logits[0, 0, :3], GOLDEN_LOGITS_0_0, rtol=0, atol=atol)
    np.testing.assert_allclose(logits[1, 15, -3:], GOLDEN_LOGITS_1_15, rtol=0, atol=atol)
    assert float(loss) == pytest.approx(GOLDEN_LOSS, abs=atol)


# One AdamW step (t = 3, lr 0.01, wd 0.1, betas 0.9/0.99, eps 1e-8) on known tensors, computed in
# plain Python float arithmetic from the formulas in core/optim.py's docstring and pasted.
ADAMW_P = [0.5, -1.0, 0.25, 2.0]
ADAMW_G = [0.1, -0.2, 0.03, -0.4]
ADAMW_M = [0.05, -0.1, 0.0, 0.2]
ADAMW_V = [0.01, 0.02, 0.001, 0.05]
GOLDEN_P_DECAY = [0.49600232923495435, -0.9940780948497359, 0.2491463923546637, 1.9940614729976638]
GOLDEN_P_NO_DECAY = [0.49650232923495435, -0.9950780948497359, 0.2493963923546637, 1.9960614729976638]
GOLDEN_M = [0.05500000000000001, -0.11000000000000001, 0.002999999999999999, 0.14]
GOLDEN_V = [0.01, 0.020200000000000003, 0.000999, 0.051100000000000007]


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_golden_adamw_step(name: str) -> None:
    B = backend_or_skip(name)
    cfg = optim.AdamWConfig(lr=0.01, weight_decay=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    atol = 1e-12 if name == "numpy" else 1e-6

    def run(shape: tuple[int, ...], bias_correction: bool = True) -> list[np.ndarray]:
        arrays = [B.from_numpy(np.array(a, dtype=np.float32).reshape(shape))
                  for a in (ADAMW_P, ADAMW_G, ADAMW_M, ADAMW_V)]
        bc1, bc2 = optim.bias_corrections(3, cfg) if bias_correction else (1.0, 1.0)
        out = optim.adamw_update(B, *arrays, lr=0.01, bc1=bc1, bc2=bc2, cfg=cfg, decay=len(shape) >= 2)
        return [B.to_numpy(o).ravel() for o in out]

    for shape, golden_p in (((2, 2), GOLDEN_P_DECAY), ((4,), GOLDEN_P_NO_DECAY)):
        p, m, v = run(shape)
        # float32 inputs: the golden values use the exact decimals, so allow float32 input rounding.
        np.testing.assert_allclose(p, golden_p, rtol=0, atol=max(atol, 1e-7))
        np.testing.assert_allclose(m, GOLDEN_M, rtol=0, atol=max(atol, 1e-8))
        np.testing.assert_allclose(v, GOLDEN_V, rtol=0, atol=max(atol, 1e-8))
    # Negative control: without bias correction the same step lands elsewhere.
    assert np.abs(run((2, 2), bias_correction=False)[0] - GOLDEN_P_DECAY).max() > 1e-3


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_no_future_token_leakage(tiny_cfg, tiny_params, tiny_tokens, name: str) -> None:
    checks = parity.leakage_checks(Side.clean(backend_or_skip(name)), tiny_cfg, tiny_params,
                                   {"x": tiny_tokens[0]})
    assert len(checks) == 3 and all(c.ok for c in checks), [c.label for c in checks if not c.ok]


@pytest.mark.parametrize("name", ("mlx", "numpy"))
def test_shifted_mask_breaks_causality(tiny_cfg, tiny_params, tiny_tokens, name: str) -> None:
    side = Side.injected(backend_or_skip(name), parity.control_named("shifted-mask"))
    checks = parity.leakage_checks(side, tiny_cfg, tiny_params, {"x": tiny_tokens[0]})
    assert len(checks) == 3 and not any(c.ok for c in checks)


def test_leakage_check_sees_changed_tokens(tiny_cfg, tiny_params, tiny_tokens) -> None:
    # Changing token t+1 does move the logits at t+1, so "unchanged at <= t" is not vacuous.
    B = backend_or_skip("numpy")
    p = {k: B.from_numpy(v) for k, v in tiny_params.items()}
    x = tiny_tokens[0]
    changed = x.copy()
    changed[:, 5] = (x[:, 5] + 1) % tiny_cfg.vocab_size
    a, b = (model.logits(B, tiny_cfg, p, B.from_numpy(t)) for t in (x, changed))
    assert np.array_equal(a[:, :5], b[:, :5]) and np.abs(a[:, 5:] - b[:, 5:]).min(axis=-1).max() > 0


@pytest.mark.parametrize("p_drop", [0.0, 0.1])
def test_ten_adamw_steps_match(tiny_cfg, tiny_params, p_drop: float) -> None:
    cfg = tiny_cfg.replace(dropout=p_drop)
    batches = parity.train_batches(cfg, 2, cfg.block_size, 10, seed=0)
    assert bool(dropout.masks(cfg, 2, cfg.block_size, 0, 0)) == (p_drop > 0)
    opt = parity.train_opt(10)
    sides = [Side.clean(backend_or_skip(n)) for n in TRAINABLE]
    runs = [parity.train_run(side, cfg, tiny_params, batches, opt, 0) for side in sides]
    checks = parity.compare_train("mlx vs tinygrad", *runs)
    assert len(checks) == 10 + len(tiny_params)
    assert all(c.ok for c in checks), [f"{c.label}: {c.max_abs:.3g}" for c in checks if not c.ok]
    # Not vacuous: the weights moved far beyond the tolerance, and the loss went down.
    moved = max(np.abs(runs[0].params[k] - tiny_params[k]).max() for k in tiny_params)
    assert moved > 50 * parity.TRAIN_PARAM_TOL.atol
    assert runs[0].losses[-1] < runs[0].losses[0]


def test_float64_finite_differences_tinygrad(tiny_cfg, tiny_tokens) -> None:
    # One layer has every kind of tensor (embeddings, norms, attention, MLP) at half the evaluations.
    cfg = tiny_cfg.replace(n_layer=1)
    params = init_params(cfg, 0)
    B = backend_or_skip("tinygrad")
    assert B.supports_float64
    checks = parity.fd_gradient_checks(B, cfg, params, dict(zip("xy", tiny_tokens, strict=True)))
    assert len(checks) == 1 + len(params)
    assert all(c.ok for c in checks), [f"{c.label}: {c.max_abs:.3g}" for c in checks if not c.ok]


@pytest.fixture(scope="module")
def mlx_suite(tiny_cfg) -> parity.Suite:
    return parity.Suite([backend_or_skip("mlx"), backend_or_skip("numpy")], tiny_cfg, steps=10, batch=2)


@pytest.fixture(scope="module")
def family_suites() -> dict[str, parity.Suite]:
    backends = [backend_or_skip("mlx"), backend_or_skip("numpy")]
    return {arch: parity.Suite(backends, parity.arch_config(arch, "tiny", 32), steps=10, batch=2)
            for arch in ("llama", "bert")}


def test_suite_passes_clean_and_skips_float64_without_support(mlx_suite) -> None:
    report = mlx_suite.run()
    assert report.ok, [c.label for c in report.failures]
    assert not backend_or_skip("mlx").supports_float64
    assert any(n.startswith("float64: skipped") for n in report.notes)
    assert 0 < report.worst.margin <= 1


# Each control, injected into MLX only, must fail these comparisons (against clean MLX and numpy).
CAUGHT_BY = {
    ("gpt", "tanh-gelu"): ("ops mlx+tanh-gelu vs numpy float64",
                           "gpt model (unit-scale weights) mlx+tanh-gelu vs mlx"),
    ("gpt", "no-bias-correction"): ("gpt train dropout 0 mlx+no-bias-correction vs mlx",),
    ("gpt", "layer-norm-eps"): ("gpt model (init weights) mlx+layer-norm-eps vs mlx",
                                "gpt model (init weights) mlx+layer-norm-eps vs numpy"),
    ("gpt", "shifted-mask"): ("gpt model (init weights) mlx+shifted-mask vs numpy",
                              "gpt causal mlx+shifted-mask"),
    ("llama", "no-bias-correction"): ("llama train dropout 0 mlx+no-bias-correction vs mlx",),
    ("llama", "shifted-mask"): ("llama model (init weights) mlx+shifted-mask vs numpy",
                                "llama causal mlx+shifted-mask"),
    ("llama", "rms-norm-eps"): ("llama model (init weights) mlx+rms-norm-eps vs numpy",
                                "llama train dropout 0 mlx+rms-norm-eps vs mlx"),
    ("llama", "rope-interleaved"): ("ops mlx+rope-interleaved vs numpy float64",
                                    "llama model (unit-scale weights) mlx+rope-interleaved vs numpy"),
    ("llama", "gqa-tiled"): ("ops mlx+gqa-tiled vs numpy float64",
                             "llama model (unit-scale weights) mlx+gqa-tiled vs numpy"),
    ("bert", "tanh-gelu"): ("bert model (unit-scale weights) mlx+tanh-gelu vs numpy",),
    ("bert", "no-bias-correction"): ("bert train dropout 0 mlx+no-bias-correction vs mlx",),
    # (with the training comparison's AdamW eps above float noise, graph.TRAIN_EPS, its 1e-12 vs 1e-5
    # no longer flips the sign of near-zero updates at dropout 0: the model phase catches it against numpy)
    ("bert", "layer-norm-eps"): ("bert model (init weights) mlx+layer-norm-eps vs mlx",
                                 "bert model (init weights) mlx+layer-norm-eps vs numpy"),
    ("gpt", "quant-element-order"): ("ops mlx+quant-element-order vs numpy float64",),  # ops only
    ("gpt", "quant-embedding-rows"): ("ops mlx+quant-embedding-rows vs numpy float64",),  # ops only
    ("bert", "padding-ignored"): ("ops mlx+padding-ignored vs numpy float64",
                                  "bert model (init weights) mlx+padding-ignored vs numpy",
                                  "bert padding mlx+padding-ignored"),
}


def test_every_applicable_control_has_expectations(mlx_suite, family_suites) -> None:
    suites = {"gpt": mlx_suite, **family_suites}
    applicable = {(arch, c.name) for arch, s in suites.items() for c in s.controls()}
    assert applicable == set(CAUGHT_BY)


@pytest.mark.parametrize(("arch", "name"), sorted(CAUGHT_BY), ids=lambda v: v)
def test_negative_control_is_caught(mlx_suite, family_suites, arch: str, name: str) -> None:
    suite = mlx_suite if arch == "gpt" else family_suites[arch]
    report = suite.run(parity.control_named(name), phases=("primitives", "model", "causal", "train"))
    failed_groups = {c.group for c in report.failures}
    assert set(CAUGHT_BY[(arch, name)]) <= failed_groups, sorted(failed_groups)


def test_layer_norm_eps_control_is_detected_at_init(tiny_cfg, tiny_params) -> None:
    # At GPT-2 init the residual stream has variance ~1e-3, so eps 1e-5 vs 1e-6 moves LayerNorm by
    # ~0.5%; check the control changes logits by far more than the tolerance.
    x = np.arange(16, dtype=np.int32).reshape(1, 16) % tiny_cfg.vocab_size
    B = backend_or_skip("numpy")
    wrong = parity.with_mixin(B, parity.WrongLayerNormEps, "Eps")
    p = {k: B.from_numpy(v) for k, v in tiny_params.items()}
    a, b = (model.logits(be, tiny_cfg, p, x) for be in (B, wrong))
    assert np.abs(a - b).max() > 10 * parity.LOGITS_TOL.atol


# ---- the command ----------------------------------------------------------------------------

FAST = ["--backends", "mlx,numpy", "--config", "tiny", "--steps", "3"]


def test_cli_parity_passes() -> None:
    result = CliRunner().invoke(command, FAST)
    assert result.exit_code == 0, result.output
    for arch in parity.DEFAULT_ARCHS:
        assert f"{arch} model (init weights) mlx vs numpy" in result.output
    assert "gemma3 model" not in result.output  # by --arch only
    assert "padding mlx" in result.output and "causal mlx" in result.output
    assert "worst margin:" in result.output and "checks pass" in result.output


def test_cli_self_test_catches_every_control() -> None:
    result = CliRunner().invoke(command, [*FAST, "--self-test"])
    assert result.exit_code == 0, result.output
    for control in parity.CONTROLS:
        assert control.name in result.output
    assert result.output.count("caught") >= len(parity.CONTROLS) and "MISSED" not in result.output


def test_cli_names_first_divergence_and_exits_1(monkeypatch) -> None:
    monkeypatch.setattr(parity.checks, "LOGITS_TOL", parity.Tolerance(0.0, 0.0))
    result = CliRunner().invoke(command, FAST)
    assert result.exit_code == 1
    assert "first divergence: gpt model (init weights) mlx vs numpy: logits" in result.output


def _run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["twinlm", "parity", *args])
    with pytest.raises(SystemExit) as exc:
        cli_main.main()
    return exc.value.code, capsys.readouterr().err


def test_cli_unavailable_backend_says_what_to_install(monkeypatch, capsys) -> None:
    monkeypatch.setitem(twinlm.backends._MODULES, "tinygrad", "twinlm_no_such_module")
    monkeypatch.delitem(twinlm.backends._cache, "tinygrad", raising=False)
    code, err = _run_main(monkeypatch, capsys, "--backends", "mlx,tinygrad")
    assert code == 2
    assert err.startswith("error: backend 'tinygrad' is unavailable") and "pip install tinygrad" in err
    assert err.count("\n") == 1


def test_cli_rejects_a_single_backend(monkeypatch, capsys) -> None:
    code, err = _run_main(monkeypatch, capsys, "--backends", "mlx")
    assert code == 2 and "at least two backends" in err


@pytest.mark.slow
def test_cli_default_run_and_self_test() -> None:
    result = CliRunner().invoke(command, ["--self-test"])
    assert result.exit_code == 0, result.output
    assert "gpt train dropout 0.1 mlx vs tinygrad" in result.output and "MISSED" not in result.output
