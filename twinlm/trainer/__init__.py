"""Training: `TrainConfig` (config), assembling a run from it (setup), the `Trainer` loop (loop), evaluation
(evaluate), the progress display (progress) and data-parallel ranks (distributed).

    from twinlm.trainer import TrainConfig, Trainer
    trainer = Trainer(TrainConfig(data="input.txt", max_iters=200), get_backend("mlx"))
    result = trainer.fit()
"""

from twinlm.trainer.config import (
    DEFAULT_MODEL,
    MODEL_FIELDS,
    TASKS,
    TrainConfig,
    config_keys,
    default_out_dir,
    load_toml,
    model_config,
    optimizer_config,
)
from twinlm.trainer.evaluate import eval_step, evaluate_loss, evaluate_task
from twinlm.trainer.loop import MAX_BAD_STEPS, Trainer, TrainingDiverged, TrainResult, task_loss, versions
from twinlm.trainer.progress import Progress
from twinlm.trainer.setup import RunSetup, assemble, classify_examples

__all__ = ["DEFAULT_MODEL", "MAX_BAD_STEPS", "MODEL_FIELDS", "TASKS", "Progress", "RunSetup", "TrainConfig",
           "TrainResult", "Trainer", "TrainingDiverged", "assemble", "classify_examples", "config_keys",
           "default_out_dir", "eval_step", "evaluate_loss", "evaluate_task", "load_toml", "model_config",
           "optimizer_config", "task_loss", "versions"]
