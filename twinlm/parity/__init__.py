"""Cross-backend parity: every primitive, composite, the whole model and the training loop,
compared across backends and against numpy, with negative controls that must be caught.

The pieces, bottom up (one module each):
- checks: `compare` turns two arrays and a `Tolerance` into a `Check` (max abs/rel diff, margin, pass).
- ops: `check_op` is the one helper for primitives and composites (like tinygrad's `helper_test_op`):
  forward against an independent float64 numpy reference, gradient of sum(f(x) * w) from
  `B.value_and_grad` against float64 central finite differences of that reference, each with
  its own tolerance; the backend is an argument. `override_checks`: fused kernels vs reference bodies.
- controls: each `Control` injects one known bug on one side (a backend mixin, a mask, an optimizer setting,
  a wrong constant or skipped step of the core graph, a change to the batch's loss mask).
- graph: `model_run`, `train_run`, `leakage_checks` and `fd_gradient_checks` cover the whole graph.
- suite: `Suite.run(control)` runs every phase; with a control it must fail, which `twinlm parity
  --self-test` and the tests verify. The family list comes from `core.models.FAMILIES`, plus `VARIANTS`:
  "lora", "modern" (every 2024-25 piece at once, on chat batches with an assistant-only loss mask) and
  "gemma3" (by --arch only).
"""

from twinlm.core.models.lstm import TanhGate
from twinlm.parity.checks import (
    FD64_STEP,
    FD64_TOL,
    FLOAT64_LOSS_TOL,
    FORWARD_TOL,
    GRAD_TOL,
    LEAK_TOL,
    LOGITS_TOL,
    LOSS_TOL,
    MODEL_GRAD_TOL,
    TRAIN_LOSS_TOL,
    TRAIN_PARAM_TOL,
    Check,
    Report,
    Tolerance,
    compare,
)
from twinlm.parity.controls import (
    CONTROLS,
    WRONG_LAYER_NORM_EPS,
    WRONG_RMS_NORM_EPS,
    Control,
    IgnorePadding,
    InterleavedRope,
    TanhGelu,
    TiledKV,
    UnscaledLora,
    WrongLayerNormEps,
    WrongRmsNormEps,
    control_named,
    shifted_causal_mask,
)
from twinlm.parity.graph import (
    Batch,
    ModelRun,
    Side,
    TrainRun,
    chat_batch,
    compare_model,
    compare_train,
    fd_gradient_checks,
    leakage_checks,
    model_run,
    parity_batch,
    side_logits,
    side_loss,
    suite_name,
    train_batches,
    train_opt,
    train_run,
    unit_scale_params,
)
from twinlm.parity.ops import (
    COMPOSITES,
    OpCase,
    _ReferenceComposites,
    check_op,
    fd_grads,
    op_cases,
    op_outputs,
    overridden_composites,
    override_checks,
    primitive_checks,
    with_mixin,
)
from twinlm.parity.suite import ARCHS, DEFAULT_ARCHS, PHASES, VARIANTS, Suite, Variant, arch_config

__all__ = [
    "ARCHS", "COMPOSITES", "CONTROLS", "DEFAULT_ARCHS", "FD64_STEP", "FD64_TOL", "FLOAT64_LOSS_TOL",
    "FORWARD_TOL", "GRAD_TOL", "LEAK_TOL", "LOGITS_TOL", "LOSS_TOL", "MODEL_GRAD_TOL", "PHASES",
    "TRAIN_LOSS_TOL", "TRAIN_PARAM_TOL", "VARIANTS", "WRONG_LAYER_NORM_EPS", "WRONG_RMS_NORM_EPS", "Batch",
    "Check", "Control", "IgnorePadding", "InterleavedRope", "ModelRun", "OpCase", "Report", "Side", "Suite",
    "TanhGate", "TanhGelu", "TiledKV", "Tolerance", "TrainRun", "UnscaledLora", "Variant",
    "WrongLayerNormEps", "WrongRmsNormEps", "_ReferenceComposites", "arch_config", "chat_batch", "check_op",
    "compare", "compare_model", "compare_train", "control_named", "fd_grads", "fd_gradient_checks",
    "leakage_checks", "model_run", "op_cases", "op_outputs", "overridden_composites", "override_checks",
    "parity_batch", "primitive_checks", "shifted_causal_mask", "side_logits", "side_loss", "suite_name",
    "train_batches", "train_opt", "train_run", "unit_scale_params", "with_mixin",
]
