"""`twinlm sample`, `plot` and `doctor` through the real entry point (exit codes, one-line errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import backend_or_skip, run_cli

from twinlm.cli.sample import text_increments
from twinlm.core.checkpoint import save_checkpoint
from twinlm.core.config import preset
from twinlm.core.params import init_params
from twinlm.core.tokenizers import ByteTokenizer, CharTokenizer
from twinlm.generate import generate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- sample ------------------------------------------------------------------------------------------

def make_run(run_dir: Path, tokenizer) -> dict[str, np.ndarray]:
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, block_size=16)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0.0, 0.3, v.shape).astype(np.float32) if v.ndim == 2 else v
              for k, v in init_params(cfg, 0).items()}
    meta = {"model": cfg.to_dict(), "tokenizer": tokenizer.to_dict(), "iter": 10}
    save_checkpoint(run_dir, {f"param.{k}": v for k, v in params.items()}, meta, step=10)
    return params


def test_sample_streams_the_greedy_continuation(tmp_path, capsys, monkeypatch) -> None:
    B = backend_or_skip("mlx")
    tok = ByteTokenizer()
    params = make_run(tmp_path, tok)
    prompt = "héllo "
    cfg = preset("tiny", vocab_size=256, block_size=16)
    ids = tok.encode(prompt)[None, :]
    want = list(generate(B, cfg, {k: B.from_numpy(v) for k, v in params.items()}, ids, 24, temperature=0.0))
    want_text = prompt + tok.decode([int(c[0]) for c in want]) + "\n"
    for extra in ([], ["--no-cache"]):
        code, out, err = run_cli(["sample", str(tmp_path), "--prompt", prompt, "-n", "24", "-t", "0",
                                  "--backend", "mlx", *extra], capsys, monkeypatch)
        assert code == 0, err
        assert out == want_text
        assert "step 10" in err and "byte tokenizer" in err
    code, out, _ = run_cli(["sample", str(tmp_path), "--prompt", prompt, "-n", "24", "--seed", "1",
                            "--top-p", "0.9", "--backend", "mlx"], capsys, monkeypatch)
    assert code == 0 and out.startswith(prompt) and out != want_text


def test_sample_user_errors(tmp_path, capsys, monkeypatch) -> None:
    backend_or_skip("mlx")
    make_run(tmp_path, CharTokenizer("\n abcdefgh"))
    args = ["sample", str(tmp_path), "--prompt", "xyz", "--backend", "mlx"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "'x'" in err and err.count("\n") == 1
    code, _, err = run_cli(["sample", str(tmp_path / "missing"), "--backend", "mlx"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    code, _, err = run_cli(["sample", str(tmp_path), "--prompt", "", "--backend", "mlx"], capsys, monkeypatch)
    assert code == 2 and "empty" in err
    wrong = tmp_path / "wrong"  # params that do not fit the config in the meta
    cfg = preset("tiny", vocab_size=9, block_size=16)
    params = init_params(cfg.replace(n_layer=1), 0)
    meta = {"model": cfg.to_dict(), "tokenizer": {"kind": "byte"}}
    save_checkpoint(wrong, {f"param.{k}": v for k, v in params.items()}, meta, step=1)
    code, _, err = run_cli(["sample", str(wrong), "--backend", "mlx"], capsys, monkeypatch)
    assert code == 2 and "does not match its model config" in err


@pytest.mark.slow
def test_sample_on_tinygrad_matches_mlx(tmp_path, capsys, monkeypatch) -> None:
    backend_or_skip("tinygrad")
    backend_or_skip("mlx")
    make_run(tmp_path, ByteTokenizer())
    outs = []
    for name in ("mlx", "tinygrad"):
        args = ["sample", str(tmp_path), "--prompt", "to be", "-n", "40", "--seed", "4", "--backend", name]
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, err
        outs.append(out)
    assert outs[0] == outs[1] and len(outs[0]) > len("to be")


def test_text_increments_hold_back_split_utf8() -> None:
    tok = ByteTokenizer()
    text = "aé€😀b"
    columns = [np.array([i]) for i in tok.encode(text)]
    pieces = list(text_increments(tok, columns))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert any("\ufffd" in tok.decode([int(c[0])]) for c in columns)  # control: naive per-token decode breaks
    # a broken sequence at the very end is still printed (as U+FFFD), not swallowed
    assert "".join(text_increments(tok, [np.array([0x61]), np.array([0xE2])])) == "a\ufffd"


# ---- plot --------------------------------------------------------------------------------------------

def write_metrics(run_dir: Path, backend: str, n: int = 30, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for it in range(n):
        rec = {"iter": it, "tokens": it * 512, "loss": 4.0 - 0.05 * it, "backend": backend}
        if it % 10 == 0:
            rec["val_loss"] = 4.1 - 0.05 * it
        lines.append(json.dumps(rec))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)


def test_plot_writes_a_png(tmp_path, capsys, monkeypatch) -> None:
    import matplotlib.image

    write_metrics(tmp_path / "run-mlx", "mlx")
    write_metrics(tmp_path / "run-tg", "tinygrad", tail='{"iter": 30, "lo')  # a write cut short
    for x in ("step", "tokens"):
        out_png = tmp_path / f"plots/loss-{x}.png"
        args = ["plot", str(tmp_path / "run-mlx"), str(tmp_path / "run-tg"), "-o", str(out_png), "--x", x]
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, err
        assert out_png.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(out_png)
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_errors(tmp_path, capsys, monkeypatch) -> None:
    def plot(run_dir: Path) -> tuple[int, str, str]:
        return run_cli(["plot", str(run_dir), "-o", str(tmp_path / "a.png")], capsys, monkeypatch)

    code, _, err = plot(tmp_path / "nope")
    assert code == 2 and "no metrics.jsonl" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    code, _, err = plot(tmp_path / "empty")
    assert code == 2 and "no metrics" in err
    bad = tmp_path / "bad"
    write_metrics(bad, "mlx")
    (bad / "metrics.jsonl").write_text('{"iter": 1, "loss": 3}\nnot json\n{"iter": 2, "loss": 2}\n')
    code, _, err = plot(bad)
    assert code == 2 and "metrics.jsonl:2" in err
    assert not (tmp_path / "a.png").exists()


# ---- doctor ------------------------------------------------------------------------------------------

def test_doctor_reports_backends_and_blas(capsys, monkeypatch) -> None:
    backend_or_skip("mlx")
    monkeypatch.delenv("TWINLM_BACKEND", raising=False)
    code, out, err = run_cli(["doctor"], capsys, monkeypatch)
    assert code == 0, err
    for needle in ("mlx", "tinygrad", "numpy", "MLX BLAS", "GFLOP/s", "MLX memory", "MLX CPU kernels",
                   "clang", "python", "ready"):
        assert needle in out, needle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_mlx_keeps_freed_memory_unless_told_not_to() -> None:
    """The MLX adapter switches glibc to heap-only, untrimmed malloc at import; TWINLM_MALLOC=default
    leaves malloc alone (each in a fresh interpreter: mallopt is process-wide)."""
    backend_or_skip("mlx")
    code = "import twinlm.backends.mlx as m; print(m.MALLOC)"
    for env, want in (({}, "heap only, untrimmed"), ({"TWINLM_MALLOC": "default"}, "default")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.strip()
        assert out == want, (env, out)


def test_doctor_fails_without_a_trainable_backend(capsys, monkeypatch) -> None:
    from twinlm.cli import doctor

    def absent(name: str) -> doctor.BackendReport:
        return doctor.BackendReport(name, False, notes=["absent"])

    monkeypatch.setattr(doctor, "check_backend", absent)
    code, out, _ = run_cli(["doctor"], capsys, monkeypatch)
    assert code == 1
    assert "no trainable backend works" in out
