"""`twinlm experiment NAME`: the transformer's claims, reproduced on this machine with the real trainer and
model code, each as a number, a figure and a verdict in DIR/result.json.

Each experiment is one module exporting CLAIM (one line), ABOUT (what it runs and how long, full and
quick) and `run(ctx) -> Outcome` (`common`), and a line in EXPERIMENTS below.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from twinlm.core.errors import TwinlmError

EXPERIMENTS = {
    "parallelism": "twinlm.experiments.parallelism",
    "long-range": "twinlm.experiments.long_range",
    "heads": "twinlm.experiments.heads",
    "positional": "twinlm.experiments.positional",
    "norm-residual": "twinlm.experiments.norm_residual",
    "scaling": "twinlm.experiments.scaling",
    "pretrain-finetune": "twinlm.experiments.pretrain_finetune",
}


class UnknownExperiment(TwinlmError):
    pass


def experiment(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise UnknownExperiment(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} "
                                "(twinlm experiment --list)")
    return importlib.import_module(EXPERIMENTS[name])


def run(name: str, B: Any, out: Path, *, quick: bool, log: Any = print, seed: int = 0) -> Any:
    """Run experiment `name` on backend B into `out`; returns its Outcome (also in out/result.json)."""
    from twinlm.experiments.common import Context, write_result

    module = experiment(name)
    ctx = Context(B=B, out=Path(out), quick=quick, log=log, seed=seed)
    ctx.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    outcome = module.run(ctx)
    write_result(ctx, name, outcome, time.perf_counter() - start)
    return outcome
