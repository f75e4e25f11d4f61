"""One training-step interface over twinlm's backends and the PyTorch reference.

`make_trainer(name, cfg, opt, seed)` returns an object with `step(x, y, it) -> loss` and
`eval_loss(x, y) -> loss`. For twinlm backends `step` is the REAL compiled step the trainer uses
(`core.step.make_train_step` + `B.compile_step`, dropout masks and schedule scalars from the host),
and it returns only after the backend has finished (the loss is read back as a Python float).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from twinlm.backends import get_backend
from twinlm.core import model
from twinlm.core import params as P
from twinlm.core import step as S
from twinlm.core.config import ModelConfig
from twinlm.core.optim import AdamWConfig
from twinlm.trainer import distributed as D


class Trainer(Protocol):
    info: dict[str, Any]

    def step(self, x: np.ndarray, y: np.ndarray, it: int) -> float: ...

    def eval_loss(self, x: np.ndarray, y: np.ndarray) -> float: ...


class TwinlmTrainer:
    """With `devices` > 1, tinygrad's data-parallel form; in a process started as an MLX rank (MLX_RANK),
    that rank's slice of each global batch with the fused all-reduce, as `twinlm train --ranks N` runs."""

    def __init__(self, backend: str, cfg: ModelConfig, opt: AdamWConfig, seed: int = 0,
                 devices: int = 1) -> None:
        self.B = get_backend(backend, devices)
        self.cfg, self.opt, self.seed = cfg, opt, seed
        self.rank, self.ranks = self.B.world()
        self.heartbeat = D.Heartbeat(self.rank)
        spec = model.param_spec(cfg)
        state = {k: self.B.from_numpy(v) for k, v in S.init_state(P.init_params(cfg, seed), spec).items()}
        loss_fn = model.lm_loss_fn(self.B, cfg)
        if self.ranks > 1:
            def shared(p: dict, batch: dict, drop: dict) -> Any:
                return loss_fn(p, {k: v for k, v in batch.items() if k != "share"}, drop) * batch["share"]
            # TWINLM_SKIP_ALLREDUCE=1 (as in the trainer): the ranks skip the collective, which times the
            # step without it (issue #23's attribution of the two-rank loss; the losses then differ).
            all_sum = (lambda x: x) if D.skip_all_reduce() else self.B.all_sum
            step = S.make_train_step(self.B, spec, opt, shared, all_sum=all_sum)
        else:
            step = S.make_train_step(self.B, spec, opt, loss_fn)
        self.compiled = self.B.compile_step(step, state)
        self.info = {"blas": getattr(self.B, "blas", None), "malloc": getattr(self.B, "malloc", None),
                     "device": self.B.device_info(), "ranks": self.ranks, "devices": devices}
        if backend == "mlx":
            from twinlm.backends import kernels

            st = kernels.status()
            self.info["kernels"] = f"{st.simd}, {st.threads} threads" if st.active else f"off ({st.reason})"

    def step(self, x: np.ndarray, y: np.ndarray, it: int) -> float:
        kw: dict[str, Any] = {}
        if self.ranks > 1:
            kw = dict(shard=D.sharder(self.rank, self.ranks, accum=False), flag=0.0)
        loss = S.drive(self.B, self.compiled, self.cfg, self.opt, {"x": x, "y": y}, it, self.seed, **kw)[0]
        self.heartbeat.beat(it + 1)
        return loss

    def eval_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        B = self.B
        params = S.params_of(self.compiled.state)
        return float(B.to_numpy(model.loss(B, self.cfg, params, B.from_numpy(x), B.from_numpy(y))))


def make_trainer(name: str, cfg: ModelConfig, opt: AdamWConfig, seed: int = 0, devices: int = 1) -> Trainer:
    if name == "mlx-ops":  # MLX on its own ops: twinlm's CPU kernels off (the "before" of the kernels)
        os.environ["TWINLM_KERNELS"] = "0"
        name = "mlx"
    if name == "torch":
        import torch

        from benchmarks.torch_ref import TorchTrainer

        trainer = TorchTrainer(cfg, opt, P.init_params(cfg, seed))
        trainer.info = {"blas": "torch " + torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0],
                        "threads": torch.get_num_threads()}
        return trainer
    return TwinlmTrainer(name, cfg, opt, seed, devices)
