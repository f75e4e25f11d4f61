"""Reading a run's checkpoint whole. A run fine-tuned from a base run (`train --init-from`, `finetune`)
stores only what it trains (LoRA adapters, a task head, ...); its frozen weights are the base's, named
with the SHA-256 of the base's parameters, so a base that changed since is refused, never mixed in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twinlm.core.checkpoint import load_checkpoint
from twinlm.core.errors import TwinlmError
from twinlm.core.tensorfile import content_digest
from twinlm.run_meta import RunMeta


def load_run(path: str | Path) -> tuple[dict[str, np.ndarray], RunMeta]:
    """(every state array, frozen weights from the base included; the run's record) of a run or
    checkpoint dir."""
    arrays, raw = load_checkpoint(Path(path))
    meta = RunMeta.from_dict(raw, f"checkpoint in {path}")
    if meta.base is None:
        return arrays, meta
    base_params = load_base(meta.base, path)
    for name, value in base_params.items():
        arrays.setdefault(f"param.{name}", value)
    return arrays, meta


def load_base(base: dict, path: str | Path) -> dict[str, np.ndarray]:
    """The base run's parameters, checked against the digest the fine-tuned run recorded."""
    from twinlm.generate import load_model

    run = base.get("run")
    if not isinstance(run, str) or not Path(run).exists():
        raise TwinlmError(f"{path} keeps only the weights it trains; its base run {run} is missing "
                          "(moved or deleted?)")
    _, params, _, _ = load_model(run)
    if content_digest(params) != base.get("sha256"):
        raise TwinlmError(f"the base run {run} has changed since {path} was trained from it (its weights' "
                          "SHA-256 differs); refusing to mix the adapters with other weights")
    return params
