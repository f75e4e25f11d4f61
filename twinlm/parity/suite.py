"""The suite: every phase over a set of backends for one model, caching each side's results so that negative
controls re-run only the injected side; the suite's model of each family."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from twinlm.core.backend import Backend
from twinlm.core.config import ModelConfig, preset
from twinlm.core.models import FAMILIES, family, llama
from twinlm.core.params import init_params
from twinlm.parity import graph
from twinlm.parity.checks import Report
from twinlm.parity.controls import CONTROLS, Control
from twinlm.parity.graph import Side, suite_name
from twinlm.parity.ops import override_checks, primitive_checks

PHASES = ("primitives", "fused", "model", "causal", "train", "float64", "dtype")
# The models whose forward the dtype phase checks in each low dtype (checks.DTYPE_LOSS_ULPS says why).
# (lora too passes and catches the control, but after gpt's and llama's graphs were loaded from twinlm's
# tinygrad JIT cache, capturing its graph fails in tinygrad: "can't allocate already allocated buffer".)
DTYPE_ARCHS = ("gpt", "llama")
LOW_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class Variant:
    """A model the suite checks beside the families: a family's parity model with config changes (a dict,
    or a function of that model's config, declared in the family's module)."""

    family: str
    changes: dict[str, Any] | Callable[[ModelConfig], dict[str, Any]]
    masked: bool = False  # trained and compared on chat-style batches: loss on the assistant's tokens only
    default: bool = True  # in `twinlm parity`'s default run; else only by name (--arch), for CI's time
    dropout: bool = True  # also trained with dropout (a second training graph: tinygrad's costliest phase)


VARIANTS: dict[str, Variant] = {
    "lora": Variant("gpt", dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)),  # rank-4 adapters everywhere
    # every 2024-25 piece, on chat batches; dropout's sites are the families' (checked there), not new here
    "modern": Variant("llama", llama.modern_parity, masked=True, dropout=False),
    "gemma3": Variant("llama", llama.gemma3_parity, default=False),  # + linear RoPE scaling
}
ARCHS = (*FAMILIES, *VARIANTS)
DEFAULT_ARCHS = tuple(a for a in ARCHS if a not in VARIANTS or VARIANTS[a].default)  # `--arch all`


def arch_config(arch: str, preset_name: str = "small", vocab_size: int = 65) -> ModelConfig:
    """The parity suite's model of each family: the preset with the family's `parity_overrides` (so every
    option's code path runs), or a variant of a family ("lora": GPT with rank-4 adapters, scale 2, dropout
    0.1 on their input, on the frozen weights; "modern" and "gemma3": see core/models/llama.py)."""
    if arch in VARIANTS:
        v = VARIANTS[arch]
        cfg = arch_config(v.family, preset_name, vocab_size)
        return cfg.replace(**(v.changes(cfg) if callable(v.changes) else v.changes))
    cfg = preset(preset_name, vocab_size=vocab_size, arch=arch)
    overrides = getattr(family(arch), "parity_overrides", None)
    return cfg.replace(**overrides(cfg)) if overrides else cfg


class Suite:
    """The whole parity suite over `backends`, caching each side's results so that negative
    controls re-run only the injected side."""

    def __init__(self, backends: Sequence[Backend], cfg: ModelConfig, *, steps: int = 10, seed: int = 0,
                 dropout: float = 0.1, batch: int = 4, fd_cfg: ModelConfig | None = None,
                 progress: Callable[[str], None] | None = None, name: str | None = None,
                 masked: bool = False, dtypes: Sequence[str] = ()) -> None:
        # Sides with autograd first, so the float64 numpy reference is always the `want` side.
        self.backends = sorted(backends, key=lambda B: not B.supports_grad)
        self.cfg, self.steps, self.seed, self.dropout, self.batch = cfg, steps, seed, dropout, batch
        self.name, self.masked = name or suite_name(cfg), masked
        self.dtypes = tuple(dtypes)  # the low dtypes the dtype phase checks (none: skipped)
        self.fd_cfg = fd_cfg or arch_config("lora" if cfg.lora_rank else cfg.arch, "tiny", cfg.vocab_size)
        self.progress = progress or (lambda msg: None)
        self.params = init_params(cfg, seed)
        self.data = graph.parity_batch(cfg, np.random.default_rng([seed, 0]), batch, cfg.block_size, masked)
        self._cache: dict[tuple[str, str], Any] = {}

    @classmethod
    def of(cls, backends: Sequence[Backend], arch: str, preset_name: str = "small", vocab_size: int = 65,
           **kwargs: Any) -> Suite:
        """The suite of a family or variant by name (`ARCHS`): its model at the preset, its float64 model at
        tiny, its batches (chat-style for a masked variant)."""
        variant = VARIANTS.get(arch)
        if variant is not None and not variant.dropout:
            kwargs["dropout"] = 0.0
        return cls(backends, arch_config(arch, preset_name, vocab_size),
                   fd_cfg=arch_config(arch, "tiny", vocab_size), name=arch,
                   masked=variant is not None and variant.masked,
                   dtypes=LOW_DTYPES if arch in DTYPE_ARCHS else (), **kwargs)

    def controls(self) -> list[Control]:
        """The negative controls that touch a piece of this suite's model (and batches)."""
        return [c for c in CONTROLS if c.applies(self.cfg) and (c.batch_change is None or self.masked)
                and (not c.needs_dtypes or self.dtypes)]

    def _cached(self, side: Side, what: str, compute: Callable[[], Any]) -> Any:
        key = (side.label, what)
        if key not in self._cache:
            self.progress(f"{self.name} {what}: {side.label}")
            self._cache[key] = compute()
        return self._cache[key]

    def _train_configs(self) -> list[float]:
        return [0.0] + ([self.dropout] if self.dropout > 0 else [])

    def run(self, control: Control | None = None, phases: Sequence[str] = PHASES) -> Report:
        """Clean run: every side against every other. With `control`: the control is injected
        into the first backend with autograd, which is compared against every clean side."""
        report = Report()
        clean = [Side.clean(B) for B in self.backends]
        if control is None:
            sides, pairs = clean, [(a, b) for i, a in enumerate(clean) for b in clean[i + 1:]]
        else:
            target = next((B for B in self.backends if B.supports_grad), None)
            if target is None:
                raise ValueError("negative controls need a backend with autograd (mlx or tinygrad)")
            injected = Side.injected(target, control)
            sides, pairs = [injected], [(injected, other) for other in clean]
        for phase in phases:
            if control is not None and control.backend_free and phase in ("primitives", "fused"):
                continue  # the injected side's ops are the clean side's: nothing there can differ
            if control is not None and control.ops_only and phase not in ("primitives", "fused"):
                continue  # the suite's models do not use the piece: only the op cases can catch it
            getattr(self, f"_phase_{phase}")(sides, pairs, control, report)
        return report

    def _phase_primitives(self, sides: list[Side], pairs: list, control: Control | None,
                          report: Report) -> None:
        for side in sides:
            report.extend(self._cached(side, "primitives", lambda s=side: primitive_checks(
                s.backend, self.seed, f"ops {s.label} vs numpy float64")))

    def _phase_fused(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        for side in sides:
            report.extend(self._cached(side, "fused overrides", lambda s=side: override_checks(
                s.backend, self.seed, f"fused {s.label} vs reference body")))

    def _phase_model(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        weight_sets = {"init": self.params, "unit-scale": graph.unit_scale_params(self.cfg, self.seed)}
        for weights, params in weight_sets.items():
            for a, b in pairs:
                runs = [self._cached(s, f"model ({weights} weights)", lambda s=s, p=params: graph.model_run(
                    s, self.cfg, p, self.data)) for s in (a, b)]
                group = f"{self.name} model ({weights} weights) {a.label} vs {b.label}"
                report.extend(graph.compare_model(group, *runs))

    def _phase_causal(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        for side in sides:
            report.extend(self._cached(side, "causal", lambda s=side: graph.leakage_checks(
                s, self.cfg, self.params, self.data, self.seed, self.name)))

    def _phase_train(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        opt = graph.train_opt(self.steps)
        trainable = [(a, b) for a, b in pairs if a.backend.supports_grad and b.backend.supports_grad]
        if not trainable:
            report.notes.append("train: skipped (needs two backends with autograd)")
        for p in self._train_configs():
            cfg = self.cfg.replace(dropout=p)
            batches = graph.train_batches(cfg, self.batch, cfg.block_size, self.steps, self.seed, self.masked)
            for a, b in trainable:
                runs = [self._cached(s, f"train dropout {p:g}", lambda s=s, c=cfg, data=batches:
                                     graph.train_run(s, c, self.params, data, opt, self.seed))
                        for s in (a, b)]
                group = f"{self.name} train dropout {p:g} {a.label} vs {b.label}"
                report.extend(graph.compare_train(group, *runs))

    def _phase_float64(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        if control is not None:
            return  # self-consistency of fwd and grad: an injected maths change is consistent in both
        capable = [s for s in sides if s.backend.supports_float64 and s.backend.supports_grad]
        if not capable:
            report.notes.append("float64: skipped (no backend here supports float64 autograd)")
        for s in sides:  # say which device lacks it (tinygrad on Metal, OpenCL without cl_khr_fp64)
            if s.backend.supports_grad and not s.backend.supports_float64 and s.backend.name != "mlx":
                report.notes.append(f"float64: skipped for {s.label} (device "
                                    f"{s.backend.device_info()['device']} has no float64)")
        params = init_params(self.fd_cfg, self.seed)
        batch = graph.parity_batch(self.fd_cfg, np.random.default_rng([self.seed, 2]), 2,
                                   min(8, self.fd_cfg.block_size), self.masked)
        for side in capable:
            report.extend(self._cached(side, "float64 finite differences", lambda s=side: (
                graph.fd_gradient_checks(s.backend, self.fd_cfg, params, batch, self.seed, self.name))))

    def _phase_dtype(self, sides: list[Side], pairs: list, control: Control | None, report: Report) -> None:
        """The forward (logits, loss) with the weights in each low dtype, every pair of sides (the float64
        reference on the same rounded weights), within tolerances derived from the dtype (checks)."""
        for dt in self.dtypes:
            for a, b in pairs:
                runs = [self._cached(s, f"forward in {dt}", lambda s=s, d=dt: graph.dtype_run(
                    s, self.cfg, self.params, self.data, d)) for s in (a, b)]
                group = f"{self.name} {dt} {a.label} vs {b.label}"
                report.extend(graph.compare_dtype(group, *runs, dt, (a.backend, b.backend)))
