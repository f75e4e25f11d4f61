"""`--beam N`: tinygrad's BEAM search, bounded per kernel. Run in a child process, since BEAM is
process-wide tinygrad state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import backend_or_skip

CHILD = textwrap.dedent("""
    import json, os, sys
    os.environ["IGNORE_BEAM_CACHE"] = "1"  # search afresh, whatever this machine's cache holds
    import numpy as np
    from tinygrad import Tensor, helpers
    from tinygrad.codegen.opt import search
    from twinlm.backends import tinygrad_beam

    timed = []
    original = search._time_program
    search._time_program = lambda *a, **k: timed.append(1) or original(*a, **k)  # counts timed candidates
    tinygrad_beam.enable(2, float(sys.argv[1]))
    a, b = np.random.default_rng(0).standard_normal((2, 64, 64), dtype=np.float32)
    out = (Tensor(a) @ Tensor(b)).relu().sum(axis=0).numpy()
    print(json.dumps({"beam": helpers.BEAM.value, "env": os.environ["BEAM"], "timed": len(timed),
                      "err": float(np.max(np.abs(out - np.maximum(a @ b, 0).sum(axis=0))))}))
""")


def _run(seconds: float) -> dict:
    env = dict(os.environ, TWINLM_JIT_CACHE="0")
    r = subprocess.run([sys.executable, "-c", CHILD, str(seconds)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_beam_budget_stops_timing_candidates_and_keeps_results_right():
    backend_or_skip("tinygrad")
    spent = _run(0.0)  # budget spent at once: every candidate is skipped, the unsearched kernel runs
    assert spent["beam"] == 2 and spent["env"] == "2" and spent["timed"] == 0 and spent["err"] < 1e-3
    some = _run(10.0)  # control: with a budget, candidates are timed (so the counter above counts them)
    assert some["timed"] > 0 and some["err"] < 1e-3


@pytest.mark.parametrize("args", [["train", "--beam", "1", "--backend", "mlx"]])
def test_beam_is_refused_off_tinygrad(args, capsys, monkeypatch):
    from conftest import run_cli

    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and err.startswith("error: --beam is tinygrad's kernel search")
