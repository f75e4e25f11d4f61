"""The Python API, for notebooks and scripts; the CLI is built on the same pieces.

import twinlm
m = twinlm.load("runs/shakespeare")            # a run dir, a checkpoint dir or a Hugging Face folder
m.generate("ROMEO:", max_new_tokens=50)         # text in, text out (ids in, ids out)
m.logits("To be")                               # numpy (1, T, V)
m = twinlm.train(data="input.txt", max_iters=200, out="runs/mine")   # any `twinlm train` setting
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core import model as core_model
from twinlm.core.backend import Backend
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer


class Model:
    """A model on a backend: `.config`, `.tokenizer`, `.logits(...)`, `.generate(...)`."""

    def __init__(
        self,
        config: ModelConfig,
        params: dict[str, np.ndarray],
        tokenizer: Tokenizer,
        backend: Backend,
        path: Path | None = None,
        labels: list[str] | None = None,
        stop: frozenset[int] | None = None,
        dtype: str | None = None,
        consume: bool = False,
    ) -> None:
        from twinlm.generate import params_dtype, stop_ids
        from twinlm.run_dir import to_backend

        self.config, self.tokenizer, self.backend, self.path = config, tokenizer, backend, path
        self.labels = labels or []
        self.stop = stop_ids(tokenizer) if stop is None else stop  # ids that end `generate`
        # consume: `params` is emptied as it is copied (load's own dict of a folder's host copies)
        self.params = to_backend(backend, params, dtype, consume)
        self.dtype = params_dtype(backend, self.params) if params else "float32"

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model(arch={c.arch!r}, n_layer={c.n_layer}, d_model={c.d_model}, vocab={c.vocab_size}, "
            f"backend={self.backend.name!r}, dtype={self.dtype!r}, path={str(self.path)!r})"
        )

    def _ids(self, x: str | Any) -> np.ndarray:
        ids = self.tokenizer.prompt_ids(x) if isinstance(x, str) else np.asarray(x)
        ids = ids[None, :] if ids.ndim == 1 else ids
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise TwinlmError(
                f"expected text or integer ids of shape (T,) or (N, T), got {ids.dtype} {ids.shape}"
            )
        try:
            core_model.check_token_ids(ids, self.config.vocab_size)
        except ValueError as e:
            raise TwinlmError(str(e)) from None
        return ids.astype(np.int32)

    def logits(self, x: str | Any) -> np.ndarray:
        """float32 logits (N, T, V): next-token logits of a decoder, masked-token logits of an encoder."""
        B = self.backend
        return B.to_numpy(core_model.logits(B, self.config, self.params, B.from_numpy(self._ids(x))))

    def generate(
        self,
        prompt: str | Any,
        max_new_tokens: int = 100,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> Any:
        """The continuation of `prompt`: text for a text prompt, else the new ids (N, max_new_tokens, or
        fewer where every row reached an end token in `self.stop`). temperature 0 is greedy decoding."""
        from twinlm.generate import generate

        ids = self._ids(prompt)
        new = list(
            generate(
                self.backend,
                self.config,
                self.params,
                ids,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop=self.stop,
            )
        )
        out = np.stack(new, axis=1) if new else np.zeros((ids.shape[0], 0), np.int32)
        if isinstance(prompt, str):
            return self.tokenizer.decode([i for i in out[0] if int(i) not in self.stop])
        return out


def load(path: str | Path, backend: str | Backend | None = None, dtype: str | None = None) -> Model:
    """The model in `path`: a run dir (its latest checkpoint), a checkpoint dir, or a Hugging Face model
    folder (config.json + model.safetensors + tokenizer.json, read from disk, never downloaded).
    `backend`: "mlx", "tinygrad", "numpy", a Backend, or None ($TWINLM_BACKEND, else mlx).
    `dtype`: "float32", "bfloat16" or "float16" for the weights and activations (None: the run's own,
    a Hugging Face folder's stored dtype)."""
    from twinlm.backends import get_backend
    from twinlm.core import dtypes

    if dtype is not None:
        try:
            dtype = dtypes.check(dtype)
        except ValueError as e:
            raise TwinlmError(str(e)) from None

    B = backend if isinstance(backend, Backend) else get_backend(backend)
    path = Path(path)
    if (path / "config.json").exists():
        from twinlm.generate import stop_ids
        from twinlm.hf import labels_of, read_hf

        cfg, params, tok, record, _ = read_hf(path)
        labels = labels_of(record["config"], cfg.n_classes) if cfg.n_classes else []
        return Model(cfg, params, tok, B, path, labels, stop_ids(tok, record), dtype, consume=True)
    from twinlm.generate import stop_ids
    from twinlm.run_dir import load_model

    cfg, params, tok, meta = load_model(path)
    return Model(cfg, params, tok, B, path, meta.labels, stop_ids(tok, meta.hf), dtype or meta.dtype)


def train(
    backend: str | Backend | None = None,
    resume: str | Path | None = None,
    progress: bool = False,
    **settings: Any,
) -> Model:
    """Train as `twinlm train` does, with its settings as keyword arguments (data=, arch=, max_iters=,
    out=, init_from=, lora_rank=, ...); returns the trained model, its `.result` the run's summary."""
    from twinlm.backends import get_backend
    from twinlm.trainer import Progress, TrainConfig, Trainer

    B = backend if isinstance(backend, Backend) else get_backend(backend)
    if "init_from" in settings:  # the CLI flag's name for the setting `base`
        settings["base"] = settings.pop("init_from")
    trainer = Trainer(TrainConfig(**settings), B, resume=resume, log=lambda m: None)
    bar = None
    if progress:
        from rich.console import Console

        bar = Progress(Console(), every=trainer.tc.log_every * 10, eval_every=trainer.tc.eval_every)
    result = trainer.fit(bar)
    out = load(trainer.out, B)
    out.result = result  # type: ignore[attr-defined]
    return out
