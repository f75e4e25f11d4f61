"""What every experiment shares: its context (backend, output folder, quick or full), training a model with
the real `Trainer`, generated corpora and their teacher-forced scoring, figures, and `result.json`."""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twinlm._version import __version__
from twinlm.core import model
from twinlm.core.backend import Backend
from twinlm.core.config import ModelConfig
from twinlm.core.models import family
from twinlm.core.spec import count
from twinlm.trainer import TrainConfig, Trainer, TrainingDiverged, TrainResult, versions


@dataclass
class Context:
    """Where and how an experiment runs."""

    B: Backend
    out: Path
    quick: bool
    log: Callable[[str], None] = print
    seed: int = 0
    figures: list[str] = field(default_factory=list)

    def pick(self, quick: Any, full: Any) -> Any:
        """The quick or the full value of a setting."""
        return quick if self.quick else full


@dataclass
class Outcome:
    """An experiment's answer: the claim, the headline number as a sentence, whether the run reproduced
    the claim (None: too small to tell, said in `note`), every number and the settings that made them."""

    claim: str
    headline: str
    reproduced: bool | None
    numbers: dict[str, Any]
    config: dict[str, Any]
    note: str = ""

    @property
    def verdict(self) -> str:
        word = {True: "reproduced", False: "NOT reproduced", None: "inconclusive at this size"}
        word = word[self.reproduced]
        return f"{word}: {self.headline}" + (f" ({self.note})" if self.note else "")


# ---- training ----------------------------------------------------------------------------------------

@dataclass
class Trained:
    trainer: Trainer
    result: TrainResult | None
    diverged: str | None  # the TrainingDiverged message, if the run diverged
    curve: list[tuple[int, float]]  # (iteration, train loss) as logged

    @property
    def params(self) -> dict[str, Any]:
        return self.trainer.params()

    @property
    def cfg(self) -> ModelConfig:
        return self.trainer.cfg


def train(ctx: Context, name: str, **settings: Any) -> Trained:
    """Train one model with the real trainer into ctx.out/runs/NAME; a diverging run is recorded, not raised.
    `settings` are TrainConfig fields; evaluation runs only at the end unless eval_every says otherwise."""
    run_dir = ctx.out / "runs" / name
    if run_dir.exists():  # an earlier run of this experiment here: start clean (metrics.jsonl appends)
        shutil.rmtree(run_dir)
    defaults = dict(eval_every=settings.get("max_iters", 1), eval_iters=2, log_every=1, keep=1, seed=ctx.seed,
                    warmup=10)
    tc = TrainConfig(out=str(run_dir), **{**defaults, **settings})
    trainer = Trainer(tc, ctx.B, log=lambda m: None)
    result, diverged = None, None
    try:
        result = trainer.fit()
    except TrainingDiverged as e:
        diverged = str(e)
    return Trained(trainer, result, diverged, read_curve(run_dir))


def read_curve(run_dir: Path, key: str = "loss", event: str = "train") -> list[tuple[int, float]]:
    """(iter, value) of `key` in run_dir/metrics.jsonl records of `event` (non-finite values skipped)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        value = rec.get(key)
        if rec.get("event") == event and isinstance(value, (int, float)) and math.isfinite(value):
            out.append((int(rec["iter"]), float(value)))
    return out


def n_params(cfg: ModelConfig) -> int:
    return count(model.param_spec(cfg))


def matched_width(cfg: ModelConfig, arch: str, target: int, multiple: int = 8) -> int:
    """The d_model (a multiple of `multiple`) of `arch` whose parameter count is closest to `target`."""
    widths = range(multiple, 8 * cfg.d_model + 1, multiple)
    return min(widths, key=lambda d: abs(n_params(cfg.replace(arch=arch, d_model=d, **_family_fixed(arch)))
                                         - target))


def _family_fixed(arch: str) -> dict[str, Any]:
    """Options a family does not take reset to its own defaults (e.g. no positions for a recurrence)."""
    return {k: v for k, v in family(arch).DEFAULTS.items() if k in ("pos_encoding",)}


def write_corpus(ctx: Context, name: str, text: str) -> str:
    path = ctx.out / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def teacher_forced(B: Backend, cfg: ModelConfig, params: dict[str, Any], tok: Any, windows: Sequence[str],
                   answer_len: int) -> np.ndarray:
    """Per window (each exactly block_size + 1 characters, the answer at its end), whether the model's
    greedy prediction is right at each of the last `answer_len` characters given the true ones before:
    (n, answer_len) bool. All right in a row = greedy decoding would write the whole answer."""
    ids = np.stack([tok.encode(w) for w in windows]).astype(np.int32)
    x, y = ids[:, :-1], ids[:, 1:]
    out = []
    for i in range(0, len(x), 64):  # modest batches: a forward of the whole set at once is memory-hungry
        lg = B.to_numpy(model.logits(B, cfg, params, B.from_numpy(x[i:i + 64])))
        out.append(lg[:, -answer_len:].argmax(-1) == y[i:i + 64, -answer_len:])
    return np.concatenate(out)


def classify_accuracy(B: Backend, cfg: ModelConfig, params: dict[str, Any], tok: Any, labels: list[str],
                      examples: Sequence[tuple[str, str]]) -> float:
    """Accuracy of a classification model (`twinlm finetune`) on (text, label) examples."""
    from twinlm.tasks.classify import encode_examples

    batch = encode_examples([t for t, _ in examples], tok, cfg)
    y = np.array([labels.index(lab) for _, lab in examples])
    preds = []
    for i in range(0, len(y), 128):
        lg = model.classify(B, cfg, params, B.from_numpy(batch["x"][i:i + 128]),
                            B.from_numpy(batch["pool"][i:i + 128]))
        preds.append(B.to_numpy(lg).argmax(-1))
    return float((np.concatenate(preds) == y).mean())


# ---- figures and result.json ---------------------------------------------------------------------------

@contextmanager
def figure(ctx: Context, filename: str, title: str, ncols: int = 1, nrows: int = 1,
           size: tuple[float, float] = (7.5, 4.8)) -> Iterator[Any]:
    """A matplotlib (Agg) figure saved as ctx.out/FILENAME, its title and footnote naming the backend, the
    twinlm version and whether this was the quick run. Yields the axes (an array when several)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=110, squeeze=nrows * ncols == 1)
    try:
        yield axes
        fig.suptitle(title, fontsize=11)
        fig.text(0.01, 0.005, f"twinlm {__version__} | backend {ctx.B.name} | "
                 f"{'--quick' if ctx.quick else 'full'} run | {platform.machine()}", fontsize=7, color="0.4")
        fig.tight_layout(rect=(0, 0.03, 1, 0.97))
        ctx.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(ctx.out / filename, format="png")
        ctx.figures.append(filename)
    finally:
        plt.close(fig)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else str(float(x))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def write_result(ctx: Context, name: str, outcome: Outcome, wall_s: float) -> Path:
    """ctx.out/result.json: the verdict, every number, the config, versions, backend and timing."""
    record = {"experiment": name, "backend": ctx.B.name, "quick": ctx.quick, "seed": ctx.seed,
              "claim": outcome.claim, "headline": outcome.headline, "reproduced": outcome.reproduced,
              "verdict": outcome.verdict, "note": outcome.note, "numbers": outcome.numbers,
              "config": outcome.config, "figures": list(ctx.figures), "versions": versions(ctx.B),
              "device": ctx.B.device_info(),
              "python": platform.python_version(), "machine": platform.machine(),
              "wall_s": round(wall_s, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = ctx.out / "result.json"
    path.write_text(json.dumps(_jsonable(record), indent=2) + "\n", encoding="utf-8")
    return path
