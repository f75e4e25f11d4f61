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
    "python -m twinlm.devcheck --dry-run --out /tmp/devcheck.json": Adapted(
        "every step of the device check, about 10 minutes here; .ci/run runs it (make devcheck-dry)",
        run=False),
    "twinlm cache clear tokens": Adapted("asks on a terminal first, and the test has none", append="--yes"),
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


def _scan(line: str, quote: str | None) -> tuple[str | None, int]:
    """The quote still open at the end of `line` (given the one open at its start), and where a `#` comment
    starts (len(line) if none)."""
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return quote, i
    return quote, len(line)


def split_commands(block: str) -> list[str]:
    """The commands of one bash block: a line each, joined over `\\` continuations, quotes left open (a
    multi-line `python -c '...'`) and heredocs."""
    out: list[str] = []
    lines, i = block.splitlines(), 0
    while i < len(lines):
        start, quote = i, None
        while True:
            quote, cut = _scan(lines[i], quote)
            code = lines[i][:cut].rstrip()
            if (m := re.search(r"<<-?'?(\w+)'?", code)) is not None and quote is None:
                i = lines.index(m.group(1), i + 1)  # the heredoc's end marker
                break
            if (quote is None and not code.endswith("\\")) or i + 1 == len(lines):
                break
            i += 1
        command = "\n".join(lines[start:i + 1]).strip()
        if command and not command.startswith("#"):
            out.append(command)
        i += 1
    return out


def blocks(markdown: str) -> list[list[str]]:
    """Every ```bash block's commands."""
    return [split_commands(b) for b in re.findall(r"```bash\n(.*?)```", markdown, re.S)]


def without_comment(command: str) -> str:
    """The command before a trailing `  # comment` (a # after whitespace, outside quotes)."""
    if "\n" in command:
        return command
    return command[:_scan(command, None)[1]].strip()


def documented() -> list[tuple[str, int, str]]:
    """(doc, block number, command) of every documented command, in order."""
    out = []
    for doc in DOCS:
        for b, commands in enumerate(blocks(doc.read_text("utf-8"))):
            out += [(doc.relative_to(ROOT).as_posix(), b, c) for c in commands]
    return out


def plan(documented_commands: list[tuple[str, int, str]]) -> list[tuple[str, int, str, str | None]]:
    """(doc, block, as written, what runs: the command itself, its adaptation, or None when not run)."""
    out = []
    for doc, block, command in documented_commands:
        adapted = ADAPTED.get(without_comment(command))
        out.append((doc, block, command,
                    command if adapted is None else adapted.command(without_comment(command))))
    return out


def script(commands: list[tuple[int, str]]) -> str:
    """One bash session for a block, as a reader types it in one terminal (background jobs, `kill %1`):
    each foreground command gets `y` on its standard input (the answer to a question) and, if it fails,
    names its index and ends the session; background jobs are stopped at the end."""
    lines = ["trap 'kill $(jobs -p) 2>/dev/null' EXIT"]
    for n, command in commands:
        if without_comment(command).endswith("&"):
            lines.append(command)
        else:
            on_failure = f'{{ code=$?; echo "::failed {n} $code" >&2; exit 97; }}'
            lines.append(f"{{\n{command}\n}} <<< y || {on_failure}")
    return "\n".join(lines) + "\n"


def _text(seed: int, n: int) -> str:
    """Lines of a play: a speaker (the README prompts with "ROMEO:") and ten words."""
    rng = np.random.default_rng(seed)
    words = "the cat dog owl sat ran on a mat by red big old and said to me you we it".split()
    speakers = ("ROMEO:", "JULIET:", "NURSE:")
    lines = (f"{rng.choice(speakers)} " + " ".join(rng.choice(words, 10)) + "." for _ in range(n))
    return "\n".join(lines) + "\n"


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
    shutil.copy(ROOT / "README.md", tmp / "README.md")  # the reader runs these in the checkout
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
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def test_every_adaptation_names_a_documented_command() -> None:
    written = {without_comment(c) for _, _, c in documented()}
    stale = sorted(set(ADAPTED) - written)
    assert not stale, f"ADAPTED names commands no doc shows any more: {stale}"
    assert all(a.reason for a in ADAPTED.values())


def test_commands_are_split_over_continuations_quotes_heredocs_and_comments() -> None:
    md = textwrap.dedent("""\
        ```bash
        twinlm train --a 1 \\
            --b 2   # the model's size
        # a comment line
        cat > f.json <<'JSON'
        [1, 2]
        JSON
        echo '#not a comment'
        python -c '
        print(1)'
        server &   # it's a background job
        ```
        ```python
        print("not bash")
        ```
        """)
    got = blocks(md)
    assert got == [["twinlm train --a 1 \\\n    --b 2   # the model's size",
                    "cat > f.json <<'JSON'\n[1, 2]\nJSON", "echo '#not a comment'", "python -c '\nprint(1)'",
                    "server &   # it's a background job"]]
    assert without_comment(got[0][4]) == "server &"
    assert without_comment(got[0][2]) == "echo '#not a comment'"


def test_a_failing_command_is_reported(tmp_path: Path) -> None:
    """The negative control: in a session, the command that exits non-zero (or no longer parses) is named,
    and a background job and `kill %1` work as in a terminal."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    ok = script([(0, "sleep 30 &"), (1, "read answer; test \"$answer\" = y"), (2, "kill %1")])
    assert run(ok, tmp_path, env)[0] == 0
    for broken in ("twinlm train --no-such-flag", "false  # documented but broken"):
        code, out = run(script([(0, "true"), (1, broken), (2, "true")]), tmp_path, env)
        assert code == 97 and "::failed 1 " in out


def test_every_documented_command_runs(tmp_path: Path) -> None:
    try:
        import transformers  # noqa: F401  (the [hf] extra: ~/models/gpt2 is made with it)
        hf = True
    except ImportError:
        hf = False
    env = workspace(tmp_path, hf)
    steps = plan(documented())
    failures, ran = [], 0
    for code_, out in (run(c, tmp_path, env) for c in SETUP):
        assert code_ == 0, f"set-up failed:\n{out}"
    for (doc, block) in dict.fromkeys((d, b) for d, b, _, _ in steps):
        commands = [(n, run_) for n, (d, b, _, run_) in enumerate(steps) if (d, b) == (doc, block) and run_]
        if not hf and any("gpt2" in c or "transformers" in c for _, c in commands):
            pytest.skip("the Hugging Face commands need the [hf] extra (transformers)")
        code, out = run(script(commands), tmp_path, env, timeout=1200)
        ran += len(commands)
        if code != 0:
            failed = re.search(r"::failed (\d+) (\d+)", out)
            n = int(failed.group(1)) if failed else commands[0][0]
            written, command = steps[n][2], steps[n][3]
            failures.append(f"{doc}: `{written}`" + (f" (ran `{command}`)" if command != written else "")
                            + f" exited {failed.group(2) if failed else code}:\n{out}")
    assert ran >= 50, f"only {ran} documented commands ran"
    assert not failures, "\n\n".join(failures)


@pytest.fixture(autouse=True)
def _no_shared_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented commands must not depend on anything but their own temporary directory.
    monkeypatch.delenv("TWINLM_BACKEND", raising=False)
    assert shutil.which("bash") is not None
