"""`twinlm quantize RUN --bits 8|4 [--group-size 32|64|128] --out DIR`: a run with 8- or 4-bit linear
layers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from twinlm.core import quant
from twinlm.core.checkpoint import save_checkpoint
from twinlm.core.errors import ConfigError, TwinlmError
from twinlm.core.model import param_spec
from twinlm.run_dir import load_model


def quantize_run(run_dir: str | Path, out: str | Path, bits: int,
                 group_size: int) -> tuple[Path, int, int, int]:
    """Write RUN_DIR's model with its linear layers quantized as a new run in `out`; (checkpoint, number of
    layers quantized, float bytes, quantized bytes of those layers)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TwinlmError(f"{out} exists and is not empty; choose a new run directory")
    if not Path(run_dir).exists():
        raise TwinlmError(f"run directory not found: {run_dir}")
    cfg, params, tok, meta = load_model(run_dir)
    if cfg.quant_bits:
        raise TwinlmError(f"{run_dir} is already quantized ({cfg.quant_bits}-bit)")
    if cfg.lora_rank:
        raise TwinlmError(f"{run_dir} is a LoRA run: merge it first (twinlm merge-lora)")
    try:
        qcfg = cfg.replace(quant_bits=bits, quant_group_size=group_size)
        spec = param_spec(qcfg)
    except ConfigError as e:
        raise TwinlmError(f"cannot quantize {run_dir}: {e}") from None
    qparams = quant.quantize_params(params, spec, bits, group_size)
    layers = [k[:-len(".qweight")] for k in spec if k.endswith(".qweight")]
    float_bytes = sum(params[f"{k}.weight"].nbytes for k in layers)
    q_bytes = sum(qparams[f"{k}{s}"].nbytes for k in layers for s in quant.SUFFIXES)
    # The training settings stay (eval scores the run's validation split, in its window); no optimizer or
    # task state: a quantized run is not resumed, only run or fine-tuned with adapters (QLoRA).
    record = dataclasses.replace(meta, model=qcfg, base=None, task_state=None, optimizer={})
    ckpt = save_checkpoint(out, {f"param.{k}": v for k, v in qparams.items()}, record.to_dict(),
                           step=meta.iter, keep=None)
    return ckpt, len(layers), float_bytes, q_bytes


@click.command("quantize")
@click.argument("run_dir", type=click.Path())
@click.option("--bits", required=True, type=click.Choice(["8", "4"]), help="Bits per weight.")
@click.option("--group-size", default="64", show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Inputs sharing one scale and bias (must divide every linear layer's input width).")
@click.option("--out", required=True, help="The run directory to create.")
def command(run_dir: str, bits: str, group_size: str, out: str) -> None:
    """Write RUN_DIR's model with its attention and MLP linear layers quantized to 8 or 4 bits (per-group
    affine, MLX's layout) as a new run that sample, predict, eval, chat, serve and `train --init-from ...
    --lora-rank R` (QLoRA) use on either backend. The embedding, the LM head and the norms stay float32."""
    _, n, before, after = quantize_run(run_dir, out, int(bits), int(group_size))
    click.echo(f"quantized {n} linear layers of {run_dir} to {bits}-bit (group {group_size}): "
               f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB -> {out}")
