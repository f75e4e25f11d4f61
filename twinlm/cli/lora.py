"""`twinlm merge-lora`: fold a LoRA run's adapters into its base weights, as a plain run."""

from __future__ import annotations

import dataclasses

import click

from twinlm.core.checkpoint import save_checkpoint
from twinlm.core.errors import TwinlmError
from twinlm.core.lora import merged
from twinlm.run_dir import load_model


@click.command("merge-lora")
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, help="The run directory to create.")
def command(run_dir: str, out: str) -> None:
    """Write RUN_DIR's model with its LoRA adapters merged (W + alpha/r a b) as a standalone run that needs
    no base run: sample, eval, export-hf and further fine-tuning read it like any other."""
    from pathlib import Path

    cfg, params, tok, meta = load_model(run_dir)
    if not cfg.lora_rank:
        raise TwinlmError(f"{run_dir} has no LoRA adapters to merge")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise TwinlmError(f"{out} exists and is not empty; choose a new run directory")
    plain, weights = merged(cfg, params)
    record = dataclasses.replace(meta, model=plain, base=None, task_state=None, optimizer={}, train={})
    save_checkpoint(
        Path(out), {f"param.{k}": v for k, v in weights.items()}, record.to_dict(), step=meta.iter, keep=None
    )
    n = sum(1 for k in params if k.endswith(".lora_a"))
    base = f", onto its {cfg.quant_bits}-bit base dequantized to float32" if cfg.quant_bits else ""
    click.echo(f"merged {n} adapters (rank {cfg.lora_rank}, scale {cfg.lora_scale:g}{base}) of {run_dir} "
               f"-> {out}")
