"""Every command line in README.md's and docs/*.md's bash blocks runs, in order, in one temporary directory,
exactly as written, on generated files. The ones that cannot run as written here are in ADAPTED below, each
with the reason and the smallest change that makes it run; a line in neither way fails. A command that no
longer parses or exits non-zero fails the test, with its output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SLOW_STEPS = "--max-iters 20"


@dataclass(frozen=True)
class Adapted:
    reason: str
    append: str = ""  # the smallest change: these options appended (click takes the last of a repeated one)
    instead: str | None = None  # or this command instead
    run: bool = True  # False: not run here at all (the reason says where it is covered)

    def command(self, written: str) -> str | None:
        if not self.run:
            return None
        return self.instead if self.instead is not None else f"{written} {self.append}"


LONG = Adapted("2000 iterations (or 300 for finetune)", append="--max-iters 20")

# The documented command (its text before any `#` comment) -> why it cannot run as written, and what runs.
ADAPTED: dict[str, Adapted] = {
    "make demo": Adapted("sets up the checkout's .venv (CI's own job); its two commands run here",
                         instead="twinlm parity --quick && twinlm train --max-iters 100"),
    "make test": Adapted("this very suite: .ci/run runs it; here it would run itself", run=False),
    "TWINLM_BACKEND=tinygrad twinlm parity": Adapted(
        "every family on tinygrad takes minutes cold; .ci/run runs `twinlm parity` exactly as typed",
        append="--arch gpt --config tiny --steps 3"),
    "twinlm parity": Adapted("90 s or more; .ci/run runs it exactly as typed", append="--quick"),
    "twinlm parity --self-test": Adapted("minutes; .ci/run runs it exactly as typed", append="--quick"),
    "twinlm train": Adapted("2000 iterations (~75 s)", append="--max-iters 100"),
    "twinlm train --data input.txt --preset baby --max-iters 2000": LONG,
    "twinlm train --resume runs/input --max-iters 4000": Adapted("4000 iterations", append="--max-iters 40"),
    "twinlm train --arch llama --n-kv-head 2": LONG,
    "twinlm train --arch bert": LONG,
    "twinlm finetune runs/sort-bert": LONG,
    "twinlm finetune runs/input-bert --data reviews.csv --freeze-base": LONG,
    "twinlm train --init-from runs/gpt2 --data notes.txt --lora-rank 8 --block-size 256 "
    "--out runs/gpt2-notes": LONG,
    "twinlm train --ranks 2": LONG,
    "twinlm --backend tinygrad train --ranks 2": Adapted("2000 iterations on tinygrad",
                                                         append="--max-iters 5"),
    "twinlm --backend tinygrad train --preset baby --beam 2": Adapted(
        "BEAM searches every kernel of the step (1,309 s for baby here); tests/test_tinygrad_beam.py checks "
        "the search", run=False),
    "mlx.launch --hostfile hosts.json --backend ring -- twinlm train --data input.txt --preset medium":
        Adapted("needs the two Macs of hosts.json reachable by ssh; the same launcher runs 2 local ranks",
                instead="mlx.launch -n 2 --backend ring -- twinlm train --data input.txt --preset tiny "
                        "--max-iters 10"),
    "twinlm --backend mlx      train --data tinyshakespeare.txt --preset baby --batch-size 12 --lr 1e-3 "
    "--max-iters 2000 --out runs/shakes-mlx": LONG,
    "twinlm --backend tinygrad train --data tinyshakespeare.txt --preset baby --batch-size 12 --lr 1e-3 "
    "--max-iters 2000 --out runs/shakes-tg": Adapted("2000 iterations on tinygrad", append="--max-iters 3"),
    "twinlm experiment long-range --backend tinygrad": Adapted(
        "the full variant runs for hours on tinygrad here (its quick variant 12 min); "
        "tests/test_experiments.py runs the quick variants", run=False),
}

# Files and runs the documented commands assume the reader has, made before they run (generated text, a
# tiny random Hugging Face GPT-2 in ~/models/gpt2 and Qwen2.5 in ~/models/Qwen2.5-0.5B, runs the README only
# names).
SETUP = [
    "twinlm train --data input.txt --arch bert --max-iters 20",  # runs/input-bert
    "twinlm train --data input.txt --max-iters 20 --out runs/input-mlx",
    "twinlm --backend tinygrad train --data input.txt --preset tiny --max-iters 3 --out runs/input-tinygrad",
]


def commands(markdown: str) -> list[str]:
    """The commands of every ```bash block: a line each, with `\\` continuations and heredocs joined."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + lines[i]
            if (m := re.search(r"<<-?'?(\w+)'?", line)) is not None:  # heredoc: up to its end marker
                end = lines.index(m.group(1), i + 1)
                line = "\n".join(lines[i:end + 1])
                i = end
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(line.strip())
            i += 1
    return out


def without_comment(command: str) -> str:
    """The command before a trailing `  # comment` (a # after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i and command[i - 1].isspace() and "\n" not in command:
            return command[:i].strip()
    return command.strip()


def documented() -> list[tuple[str, str]]:
    return [(doc.relative_to(ROOT).as_posix(), c) for doc in DOCS for c in commands(doc.read_text("utf-8"))]


def plan(documented_commands: list[tuple[str, str]]) -> list[tuple[str, str, str | None]]:
    """(doc, as written, what runs: the command itself, its adaptation, or None when not run)."""
    out = []
    for doc, command in documented_commands:
        adapted = ADAPTED.get(without_comment(command))
        out.append((doc, command, command if adapted is None else adapted.command(without_comment(command))))
    return out


def _text(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    words = "the cat dog owl sat ran on a mat by red big old and said to me you we it".split()
    return "\n".join(" ".join(rng.choice(words, 10)) + "." for _ in range(n)) + "\n"


def workspace(tmp: Path, hf_gpt2: bool) -> dict[str, str]:
    """Make the files the documented commands read; return the environment they run in."""
    (tmp / "home").mkdir()
    (tmp / "docs").mkdir()
    (tmp / "old").mkdir()
    for name, seed, n in (("input.txt", 0, 4000), ("other.txt", 1, 400), ("notes.txt", 2, 1000),
                          ("tinyshakespeare.txt", 3, 4000)):
        (tmp / name).write_text(_text(seed, n), encoding="utf-8")
    rows = [f'"{line}",{"long" if len(line) > 40 else "short"}' for line in _text(4, 200).splitlines()]
    (tmp / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (tmp / "run.toml").write_text('data = "input.txt"\npreset = "tiny"\nmax-iters = 20\n', encoding="utf-8")
    if hf_gpt2:
        from hf_models import build, build_modern

        build("GPT2LMHeadModel", tmp / "home" / "models" / "gpt2", positions=256)
        build_modern("Qwen2.5-0.5B", tmp / "home" / "models" / "Qwen2.5-0.5B", max_position_embeddings=256)
    env = dict(os.environ, HOME=str(tmp / "home"), TWINLM_CACHE_DIR=str(tmp / "cache"), MPLBACKEND="Agg",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("TWINLM_BACKEND", None)
    return env


def run(command: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, input="y\n", capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, (proc.stdout + proc.stderr)[-2000:]


def test_every_adaptation_names_a_documented_command() -> None:
    written = {without_comment(c) for _, c in documented()}
    stale = sorted(set(ADAPTED) - written)
    assert not stale, f"ADAPTED names commands no doc shows any more: {stale}"
    assert all(a.reason for a in ADAPTED.values())


def test_commands_are_parsed_with_continuations_heredocs_and_comments() -> None:
    md = textwrap.dedent("""\
        ```bash
        twinlm train --a 1 \\
            --b 2   # a comment
        # a comment line
        cat > f.json <<'JSON'
        [1, 2]
        JSON
        echo '#not a comment'
        ```
        ```python
        print("not bash")
        ```
        """)
    got = commands(md)
    assert got == ["twinlm train --a 1     --b 2   # a comment", "cat > f.json <<'JSON'\n[1, 2]\nJSON",
                   "echo '#not a comment'"]
    assert without_comment(got[0]) == "twinlm train --a 1     --b 2"
    assert without_comment(got[2]) == "echo '#not a comment'"


def test_a_failing_command_is_reported(tmp_path: Path) -> None:
    """The negative control: a command that exits non-zero, or no longer parses, is caught by `run`."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert run("twinlm train --no-such-flag", tmp_path, env)[0] != 0
    assert run("false  # documented but broken", tmp_path, env)[0] != 0
    assert run("true", tmp_path, env)[0] == 0


def test_every_documented_command_runs(tmp_path: Path) -> None:
    try:
        import transformers  # noqa: F401  (the [hf] extra: ~/models/gpt2 is made with it)
        hf = True
    except ImportError:
        hf = False
    env = workspace(tmp_path, hf)
    steps = plan(documented())
    failures, ran = [], 0
    for i, (doc, written, command) in enumerate(steps):
        if command is None:
            continue
        if not hf and ("gpt2" in command or "transformers" in command):
            pytest.skip("the Hugging Face commands need the [hf] extra (transformers)")
        if i == 0 or steps[i - 1][0] != doc:
            for setup in SETUP if doc == "README.md" else []:
                code, out = run(setup, tmp_path, env)
                assert code == 0, f"set-up `{setup}` failed:\n{out}"
        code, out = run(command, tmp_path, env)
        ran += 1
        if code != 0:
            failures.append(f"{doc}: `{written}`" + (f" (ran `{command}`)" if command != written else "")
                            + f" exited {code}:\n{out}")
    assert ran >= 40, f"only {ran} documented commands ran"
    assert not failures, "\n\n".join(failures)


@pytest.fixture(autouse=True)
def _no_shared_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented commands must not depend on anything but their own temporary directory.
    monkeypatch.delenv("TWINLM_BACKEND", raising=False)
    assert shutil.which("bash") is not None
