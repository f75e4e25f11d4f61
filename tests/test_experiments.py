"""`twinlm experiment` and `twinlm attention`: every experiment's --quick variant writes result.json and its
figures and asserts the direction of its claim where the quick run is strong enough to show it (said per
test); the listing, bad names, and the attention maps on their own.

Default run: the listing and errors, the attention tools, and `long-range --quick` (its claim shows clearly
even at that size). The other quick variants take 40-90 s each on a loaded 2-core machine: marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import backend_or_skip, run_cli

from twinlm.experiments import EXPERIMENTS


def quick(name: str, tmp_path: Path, capsys, monkeypatch, backend: str = "mlx") -> dict:
    """Run `twinlm experiment NAME --quick` through the real entry point; return its result.json."""
    backend_or_skip(backend)
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / name
    code, stdout, err = run_cli(["experiment", name, "--quick", "--backend", backend, "--out", str(out)],
                                capsys, monkeypatch)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == name and result["backend"] == backend and result["quick"] is True
    assert result["versions"]["twinlm"] and result["versions"].get(backend)
    assert result["config"] and result["numbers"] and result["claim"] and result["headline"]
    assert f"verdict: {result['verdict']}" in stdout
    assert result["figures"] and all((out / f).stat().st_size > 10_000 for f in result["figures"])
    return result


def test_list_shows_every_experiment(capsys, monkeypatch) -> None:
    code, out, _ = run_cli(["experiment", "--list"], capsys, monkeypatch)
    assert code == 0
    for name in ("parallelism", "long-range", "heads", "positional", "norm-residual", "scaling",
                 "pretrain-finetune"):
        assert name in EXPERIMENTS and out.count(f"\n{name} ") + out.startswith(f"{name} ") == 1


def test_unknown_experiment_is_one_line_and_exit_2(capsys, monkeypatch) -> None:
    code, _, err = run_cli(["experiment", "transformers-are-magic"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: unknown experiment 'transformers-are-magic'")
    assert err.count("\n") == 1
    code, _, err = run_cli(["experiment"], capsys, monkeypatch)
    assert code == 2 and "name an experiment" in err


def test_long_range_quick_transformer_beats_lstm_at_distance(tmp_path, capsys, monkeypatch) -> None:
    r = quick("long-range", tmp_path, capsys, monkeypatch)
    acc = r["numbers"]["accuracy"]
    far = str(max(r["config"]["distances"]))
    # Strong enough at quick size: the transformer reads the token directly, the LSTM has to carry it.
    assert acc["gpt"][far] > acc["lstm"][far] + 0.2, acc
    assert r["reproduced"] is True
    params = r["numbers"]["params"]
    assert abs(params["gpt"] - params["lstm"]) / params["gpt"] < 0.1  # equal size, as claimed


def test_attention_maps_and_cli(tmp_path, capsys, monkeypatch) -> None:
    from twinlm.experiments.attention_maps import attention_maps, head_stats

    B = backend_or_skip("mlx")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run_cli(["train", "--preset", "tiny", "--max-iters", "3", "--eval-every", "3",
                            "--eval-iters", "1", "--batch-size", "4", "--out", "run"], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(["attention", "run", "--text", "12345>12345\n531", "-o", "maps.png"], capsys,
                             monkeypatch)
    assert code == 0, err
    assert (tmp_path / "maps.png").stat().st_size > 10_000
    assert out.count("\n") == 1 + 2 * 2 + 1  # header, one row per (layer, head) of the tiny preset, "wrote"
    # The recorded maps are the model's: rows are causal probability distributions.
    from twinlm.generate import load_model

    cfg, params, tok, _ = load_model(tmp_path / "run")
    maps = attention_maps(B, cfg, params, tok.encode("12345>1234")[None, :])
    assert maps.shape == (cfg.n_layer, 1, cfg.n_head, 10, 10)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(maps[0, 0, 0], k=1) == 0)
    stats = head_stats(maps)
    assert stats["mean_distance"].shape == (cfg.n_layer, cfg.n_head) and np.all(stats["entropy"] >= 0)
    # One-hot attention on the previous token: distance 1, entropy 0.
    eye = np.eye(8, k=-1)[None, None, None]
    eye[..., 0, 0] = 1.0
    assert head_stats(eye)["mean_distance"][0, 0] == pytest.approx(1.0)
    assert head_stats(eye)["entropy"][0, 0] == pytest.approx(0.0)


def test_attention_refuses_a_recurrent_model(tmp_path, capsys, monkeypatch) -> None:
    backend_or_skip("mlx")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--preset", "tiny", "--block-size", "8", "--max-iters", "2", "--eval-every", "2",
            "--eval-iters", "1", "--batch-size", "4", "--out", "rnn"]
    code, _, err = run_cli(["train", "--arch", "rnn", *args], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["attention", "rnn", "--text", "123"], capsys, monkeypatch)
    assert code == 2 and err == "error: an --arch rnn model has no attention to show\n"


@pytest.mark.slow
def test_parallelism_quick(tmp_path, capsys, monkeypatch) -> None:
    r = quick("parallelism", tmp_path, capsys, monkeypatch)
    rows = r["numbers"]["rows"]
    assert {(row["arch"], row["block"]) for row in rows} == {(a, t) for a in ("gpt", "lstm")
                                                             for t in (16, 64)}
    assert all(row["tokens_per_s"] > 0 and row["compile_s"] > 0 for row in rows)
    # No timing direction is asserted: 8 steps at blocks 16 and 64 on a shared CPU are too few to rank
    # reliably (one loaded run here measured the transformer's step time growing 19x and the LSTM's 3.6x,
    # against 2.2x and 5.4x in a quieter one). The full version (to block 512) shows it; see the docs.
    assert r["reproduced"] in (True, False) and "loaded CPU" in r["note"]
    assert abs(rows[0]["params"] - rows[1]["params"]) / rows[0]["params"] < 0.1  # equal size, as claimed


@pytest.mark.slow
def test_heads_quick(tmp_path, capsys, monkeypatch) -> None:
    r = quick("heads", tmp_path, capsys, monkeypatch)
    n = r["numbers"]
    assert np.array(n["trained"]["mean_distance"]).shape == (2, 4)
    # At 200 steps the heads have not specialised yet: only the init baseline's uniformity is asserted.
    assert n["initial_distance_spread"] < 1.5
    assert r["reproduced"] in (None, True) and "heads_maps.png" in r["figures"]


@pytest.mark.slow
def test_positional_quick(tmp_path, capsys, monkeypatch) -> None:
    r = quick("positional", tmp_path, capsys, monkeypatch)
    digit = r["numbers"]["per_digit"]
    # Too short for exact match; per reversed digit, some positional encoding already beats none.
    assert max(digit[e] for e in ("learned", "sinusoidal", "rope")) > digit["none"], digit


@pytest.mark.slow
def test_norm_residual_quick(tmp_path, capsys, monkeypatch) -> None:
    r = quick("norm-residual", tmp_path, capsys, monkeypatch)
    runs = r["numbers"]["runs"]
    assert set(runs) == {"norm + residual", "residual only", "norm only", "neither"}
    best, worst = runs["norm + residual"], runs["neither"]
    assert worst["diverged"] or best["final_loss"] < worst["final_loss"] - 0.1, runs


@pytest.mark.slow
def test_scaling_quick(tmp_path, capsys, monkeypatch) -> None:
    r = quick("scaling", tmp_path, capsys, monkeypatch)
    losses = [row["val_loss"] for row in r["numbers"]["rows"]]
    assert losses == sorted(losses, reverse=True) and r["numbers"]["power_law"]["b"] > 0


@pytest.mark.slow
def test_pretrain_finetune_quick(tmp_path, capsys, monkeypatch) -> None:
    r = quick("pretrain-finetune", tmp_path, capsys, monkeypatch)
    final = r["numbers"]["final"]
    # 300 pretraining steps leave the base far from its own task: the gap is not asserted, only recorded.
    assert all(0.0 <= a <= 1.0 for a in final.values()) and r["numbers"]["curves"]["pretrained"]


@pytest.mark.slow
def test_scaling_quick_on_tinygrad(tmp_path, capsys, monkeypatch) -> None:
    r = quick("scaling", tmp_path, capsys, monkeypatch, backend="tinygrad")
    assert all(np.isfinite(row["val_loss"]) for row in r["numbers"]["rows"])
