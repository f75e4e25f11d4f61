"""What a new user trips on (issue 12): default prompts, --backend everywhere, preset training defaults,
`twinlm cache`, a broken latest.json, the numpy backend in --help. All in process, none trains a model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli

from twinlm.cli import parity as parity_cli
from twinlm.cli import train as train_cli
from twinlm.cli.main import cli
from twinlm.core.checkpoint import save_checkpoint
from twinlm.core.config import preset
from twinlm.core.errors import TwinlmError
from twinlm.core.params import init_params
from twinlm.core.tokenizers import CharTokenizer


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWINLM_BACKEND", raising=False)


def make_run(run_dir: Path, chars: str, step: int = 10) -> None:
    tok = CharTokenizer(chars)
    cfg = preset("tiny", vocab_size=tok.vocab_size, block_size=16)
    params = init_params(cfg, 0)
    meta = {"model": cfg.to_dict(), "tokenizer": tok.to_dict(), "iter": step}
    save_checkpoint(run_dir, {f"param.{k}": v for k, v in params.items()}, meta, step=step)


# ---- sample: a default prompt the tokenizer knows ---------------------------------------------------

def test_sample_without_prompt_on_a_corpus_without_newline(tmp_path, capsys, monkeypatch) -> None:
    make_run(tmp_path / "nonl", "abcdef")
    code, out, err = run_cli(["sample", str(tmp_path / "nonl"), "-n", "5", "-t", "0", "--backend", "numpy"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith("a") and len(out.rstrip("\n")) == 6 and "error" not in err
    make_run(tmp_path / "nl", "\nabc")
    code, out, err = run_cli(["sample", str(tmp_path / "nl"), "-n", "5", "-t", "0", "--backend", "numpy"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith("\n")  # a tokenizer that knows a newline still starts from one


# ---- a broken latest.json: one warning line --------------------------------------------------------------

@pytest.mark.parametrize("damage, why", [
    (lambda run: (run / "latest.json").write_text("{half"), "is damaged"),
    (lambda run: (run / "latest.json").write_text('{"checkpoint": "ckpt-00000099", "step": 99}'),
     "names ckpt-00000099, which is missing or incomplete"),
    (lambda run: (run / "latest.json").unlink(), "is missing"),
])
def test_a_broken_pointer_is_one_warning_line(tmp_path, capsys, monkeypatch, damage, why) -> None:
    run = tmp_path / "run"
    make_run(run, "abc", step=3)
    make_run(run, "abc", step=7)
    damage(run)
    code, out, err = run_cli(["sample", str(run), "-n", "2", "--backend", "numpy"], capsys, monkeypatch)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {run / 'latest.json'} {why}; using ckpt-00000007, the complete checkpoint "
                        "with the highest step"], err
    assert "step 7" in err


# ---- --backend on every command ----------------------------------------------------------------------

def test_every_command_that_runs_a_model_takes_backend_and_numpy_is_shown(capsys, monkeypatch) -> None:
    code, out, _ = run_cli(["--help"], capsys, monkeypatch)
    assert code == 0 and "mlx|tinygrad|numpy" in out
    for name in sorted(cli.commands):
        code, out, _ = run_cli([name, "--help"], capsys, monkeypatch)
        assert code == 0
        # files in, files out
        runs_a_model = name not in ("cache", "import-hf", "export-hf", "merge-lora", "quantize")
        assert ("--backend" in out) == runs_a_model, name
        if name in ("sample", "eval"):
            assert "numpy" in out, name


class Stop(TwinlmError):
    pass


@pytest.fixture
def parity_backends(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The backends `twinlm parity` asks for, without running the suite."""
    asked: list[str] = []

    def fake_get_backend(name: str):
        asked.append(name)
        if len(asked) == 2:
            raise Stop("stop")
    monkeypatch.setattr(parity_cli, "get_backend", fake_get_backend)
    return asked


@pytest.mark.parametrize("args, env, want", [
    (["parity"], None, ["mlx", "tinygrad", "numpy"]),
    (["parity"], "tinygrad", ["tinygrad", "numpy"]),
    (["--backend", "mlx", "parity"], "tinygrad", ["mlx", "numpy"]),
    (["parity", "--backend", "tinygrad"], "mlx", ["tinygrad", "numpy"]),
    (["--backend", "mlx", "parity", "--backends", "tinygrad,numpy"], None, ["tinygrad", "numpy"]),
    (["parity", "--quick"], None, None),  # the default backend (what train would use) against numpy
])
def test_parity_backends_follow_the_chosen_backend(args, env, want, parity_backends, capsys,
                                                   monkeypatch) -> None:
    from twinlm.backends import default_name

    if env:
        monkeypatch.setenv("TWINLM_BACKEND", env)
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and err == "error: stop\n"
    assert parity_backends == (want or [default_name(), "numpy"])[:2]


def test_doctor_and_plot_take_backend(tmp_path, capsys, monkeypatch) -> None:
    from twinlm.cli import doctor

    monkeypatch.setattr(doctor, "check_backend", lambda name: doctor.BackendReport(name, name != "tinygrad"))
    monkeypatch.setattr(doctor, "mlx_blas_rows", lambda: [])
    code, out, _ = run_cli(["doctor", "--backend", "tinygrad"], capsys, monkeypatch)
    assert code == 1 and "the chosen backend tinygrad does not work here" in out
    monkeypatch.setenv("TWINLM_BACKEND", "mlx")
    code, out, _ = run_cli(["doctor"], capsys, monkeypatch)
    assert code == 0 and "ready" in out
    code, _, err = run_cli(["--backend", "pytorch", "doctor"], capsys, monkeypatch)
    assert code == 2 and err == "error: unknown backend 'pytorch'; choose from mlx, tinygrad, numpy\n"

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"iter": 1, "loss": 2.0}\n{"iter": 2, "loss": 1.5}\n')
    code, _, err = run_cli(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "a.png"), "--backend", "mlx"],
                           capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["plot", str(tmp_path / "run"), "--backend", "jax"], capsys, monkeypatch)
    assert code == 2 and "unknown backend 'jax'" in err


# ---- presets carry training defaults ------------------------------------------------------------------

@pytest.fixture
def train_config(monkeypatch: pytest.MonkeyPatch) -> list:
    """The TrainConfig `twinlm train` builds, without training."""
    seen = []

    def fake_trainer(tc, B, **kwargs):
        seen.append(tc)
        raise Stop("stop")
    monkeypatch.setattr(train_cli, "Trainer", fake_trainer)
    alone = SimpleNamespace(name="mlx", world=lambda: (0, 1))  # one process, no framework loaded
    monkeypatch.setattr(train_cli, "backend", lambda name: alone)
    return seen


@pytest.mark.parametrize("args, toml, want", [
    (["--preset", "baby"], None, (12, 1e-3, 2000)),
    (["--preset", "medium"], None, (64, 1e-3, 5000)),
    (["--preset", "baby", "--batch-size", "5", "--lr", "2e-3"], None, (5, 2e-3, 2000)),
    (["--preset", "tiny"], None, (32, 3e-3, 2000)),
    ([], None, (32, 3e-3, 2000)),
    (["--config", "c.toml"], 'preset = "baby"\nmax-iters = 300\n', (12, 1e-3, 300)),
    (["--config", "c.toml", "--max-iters", "50"], 'preset = "medium"\nbatch_size = 7\n', (7, 1e-3, 50)),
])
def test_presets_carry_training_defaults(args, toml, want, train_config, tmp_path, capsys,
                                         monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if toml:
        (tmp_path / "c.toml").write_text(toml)
    code, _, err = run_cli(["train", *args], capsys, monkeypatch)
    assert code == 2 and err == "error: stop\n"
    tc = train_config[0]
    assert (tc.batch_size, tc.lr, tc.max_iters) == want


def test_a_resumed_run_keeps_its_settings(train_config, tmp_path, capsys, monkeypatch) -> None:
    code, _, _ = run_cli(["train", "--resume", str(tmp_path), "--preset", "baby"], capsys, monkeypatch)
    assert code == 2
    assert train_config[0].batch_size == 32  # the default, which the resume replaces by the checkpoint's


# ---- twinlm cache --------------------------------------------------------------------------------------

@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    tokens, jit, runs = tmp_path / "tokens", tmp_path / "jit", tmp_path / "runs"
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tokens))
    monkeypatch.setenv("TWINLM_JIT_CACHE", str(jit))
    monkeypatch.chdir(tmp_path)
    for folder in (tokens, jit):
        folder.mkdir()
    key = "ab" * 16  # core.data names token files by 32 hex digits of a SHA-256
    (tokens / f"{key}.bin").write_bytes(b"\0" * 4000)
    (tokens / f"{key}.json").write_text("{}")
    (tokens / "notes.txt").write_text("not twinlm's")  # a folder shared with other things keeps them
    (jit / "step-1234.jit").write_bytes(b"\0" * 2500)
    (jit / "other.pkl").write_text("not twinlm's")
    make_run(runs / "one", "abc")
    (runs / "one" / "metrics.jsonl").write_text(json.dumps({"iter": 1}) + "\n")
    (runs / "not-a-run").mkdir()
    return {"tokens": tokens, "jit": jit, "runs": runs}


def test_cache_lists_sizes(disk, capsys, monkeypatch) -> None:
    code, out, err = run_cli(["cache"], capsys, monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("runs") and "1 runs" in lines[0]
    assert lines[1].split()[:4] == ["tokens", "4.0", "KB", "2"] and str(disk["tokens"]) in lines[1]
    assert lines[2].split()[:4] == ["jit", "2.5", "KB", "1"] and str(disk["jit"]) in lines[2]
    assert lines[3].split()[0] == "one" and "1 checkpoints" in lines[3]
    monkeypatch.setenv("TWINLM_JIT_CACHE", "0")
    code, out, _ = run_cli(["cache", "list"], capsys, monkeypatch)
    assert code == 0 and "off: $TWINLM_JIT_CACHE=0" in out


def test_cache_clear(disk, capsys, monkeypatch) -> None:
    code, _, err = run_cli(["cache", "clear", "all"], capsys, monkeypatch)  # no terminal to confirm on
    assert code == 2 and err.startswith("error: would delete 3 files") and "--yes" in err
    assert len(list(disk["tokens"].iterdir())) == 3
    code, out, err = run_cli(["cache", "clear", "all", "--yes"], capsys, monkeypatch)
    assert code == 0, err
    assert "deleted 3 files" in out
    assert sorted(p.name for p in disk["tokens"].iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in disk["jit"].iterdir()) == ["other.pkl"]
    assert (disk["runs"] / "one" / "latest.json").exists()  # `all` never touches runs
    code, out, _ = run_cli(["cache", "clear", "tokens", "--yes"], capsys, monkeypatch)
    assert code == 0 and out == "nothing to clear (tokens)\n"
    code, out, err = run_cli(["cache", "clear", "runs", "--yes"], capsys, monkeypatch)
    assert code == 0 and "deleted 1 run directories" in out, err
    assert sorted(p.name for p in disk["runs"].iterdir()) == ["not-a-run"]


def test_cache_clear_asks_on_a_terminal(disk, monkeypatch) -> None:
    from click.testing import CliRunner

    from twinlm.cli import cache

    monkeypatch.setattr(cache, "can_ask", lambda: True)
    result = CliRunner().invoke(cache.command, ["clear", "jit"], input="n\n")
    assert result.exit_code == 1 and "delete 1 files" in result.output  # click's Abort
    assert (disk["jit"] / "step-1234.jit").exists()
    result = CliRunner().invoke(cache.command, ["clear", "jit"], input="y\n")
    assert result.exit_code == 0 and not (disk["jit"] / "step-1234.jit").exists()


def test_numpy_backend_still_cannot_train(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", "--backend", "numpy", "--max-iters", "1"], capsys, monkeypatch)
    assert code == 2 and "cannot train" in err
