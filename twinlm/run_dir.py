"""Reading a run: its checkpoint whole (`load_run`), or the model it holds (`load_model`).

A run fine-tuned from a base run (`train --init-from`, `finetune`) stores only what it trains (LoRA adapters,
a task head, ...); its frozen weights are the base's, named with the SHA-256 of the base's parameters, so a
base that changed since is refused, never mixed in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twinlm.core import dtypes as D
from twinlm.core import quant
from twinlm.core.backend import Array, Backend
from twinlm.core.checkpoint import load_checkpoint
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.core.params import check_params
from twinlm.core.tensorfile import content_digest, is_mapped, release, trim_heap
from twinlm.core.tokenizers import Tokenizer, tokenizer_from_dict
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


def load_model(run_dir: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer, RunMeta]:
    """(cfg, numpy params, tokenizer, run record) from a checkpoint dir or a run dir's latest checkpoint
    (frozen weights from its base run, where it has one)."""
    arrays, meta = load_run(run_dir)
    params = {k[len("param."):]: v for k, v in arrays.items() if k.startswith("param.")}
    try:
        check_params(meta.model, params)
    except ValueError as e:
        raise TwinlmError(f"checkpoint in {run_dir} does not match its model config: {e}") from None
    return meta.model, params, tokenizer_from_dict(meta.tokenizer), meta


def load_base(base: dict, path: str | Path) -> dict[str, np.ndarray]:
    """The base run's parameters, checked against the digest the fine-tuned run recorded."""
    run = base.get("run")
    if not isinstance(run, str) or not Path(run).exists():
        raise TwinlmError(f"{path} keeps only the weights it trains; its base run {run} is missing "
                          "(moved or deleted?)")
    _, params, _, _ = load_model(run)
    if content_digest(params) != base.get("sha256"):
        raise TwinlmError(f"the base run {run} has changed since {path} was trained from it (its weights' "
                          "SHA-256 differs); refusing to mix the adapters with other weights")
    return params


def to_backend(B: Backend, params: dict[str, np.ndarray], dtype: str | None = None,
               consume: bool = False) -> dict[str, Array]:
    """`params` as backend arrays, in sorted order (a compiled graph binds dict inputs by position), the
    float ones in `dtype` (None: as stored) but a quantized layer's, which keep their format. A checkpoint's
    arrays are views of its memory-mapped file: each one's pages are released as soon as it is copied, so a
    loaded model sits in memory once (the backend's copy), not twice. With `consume`, each array is also
    removed from `params` once copied: a Hugging Face folder's transposed weights are host copies, and
    freeing each as it goes keeps them from sitting beside the whole backend copy."""
    # The host memory loading freed (a parsed meta.json with its tokenizer's JSON, hashing buffers) goes back
    # before the weights arrive: malloc is set never to trim (`mlx_native.keep_freed_memory`), so otherwise it
    # stays resident under the model for the life of the process (90 MB of a Qwen2.5-0.5B-shaped run's).
    trim_heap()
    out = {}
    mapped = []
    for k in sorted(params):
        a = params.pop(k) if consume else params[k]
        out[k] = B.from_numpy(a)
        if dtype is not None and D.name_of(a) not in (None, dtype) and not k.endswith(quant.SUFFIXES):
            out[k] = B.astype(out[k], dtype)
        B.sync(out[k])  # the copy is made now, not when the lazy graph first runs (tinygrad realizes already)
        release(a)
        if is_mapped(a):
            if mapped:
                release(mapped[-1])  # (its last pages, mapped again by this one's first read: see below)
            mapped.append(a)
        if consume and a.nbytes >= 2**20:
            del a
            trim_heap()  # (a freed heap array otherwise stays resident: see trim_heap)
    # Each released again: a page fault maps a window of pages around it (the kernel's fault-around, 64 KB),
    # so reading a tensor's first pages mapped the last pages of the one before, already released: 12 MB of
    # a 4-bit Qwen2.5-0.5B-shaped run's ~500 tensors stayed resident beside the model.
    for a in mapped:
        release(a)
    trim_heap()  # what the copies freed (a dtype cast's float32 source, a small array's host copy)
    return out


def run_dtype(meta: RunMeta, asked: str | None) -> str:
    """The dtype a command computes in: `asked` (--dtype), else the one the run was trained or imported in."""
    try:
        return D.check(asked) if asked is not None else D.check(meta.dtype)
    except ValueError as e:
        raise TwinlmError(str(e)) from None
