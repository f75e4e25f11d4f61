"""`twinlm quantize RUN --bits 8|4 [--group-size 32|64|128] [--keep-embedding] --out DIR`: a run with 8- or
4-bit linear layers, embedding and LM head."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from twinlm.core import quant
from twinlm.core.checkpoint import save_checkpoint
from twinlm.core.config import ModelConfig
from twinlm.core.errors import ConfigError, TwinlmError
from twinlm.core.model import param_spec
from twinlm.run_dir import load_model


def quantize_run(run_dir: str | Path, out: str | Path, bits: int, group_size: int,
                 embedding: bool = True) -> tuple[Path, ModelConfig, int, int, int]:
    """Write RUN_DIR's model with its linear layers (and, with `embedding`, its token embedding and LM head)
    quantized as a new run in `out`; (checkpoint, its config, number of tensors quantized, their float
    bytes, their quantized bytes)."""
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
        qcfg = cfg.replace(quant_bits=bits, quant_group_size=group_size, quant_embedding=embedding)
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
    return ckpt, qcfg, len(layers), float_bytes, q_bytes


@click.command("quantize")
@click.argument("run_dir", type=click.Path())
@click.option("--bits", required=True, type=click.Choice(["8", "4"]), help="Bits per weight.")
@click.option("--group-size", default="64", show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Inputs sharing one scale and bias (must divide every linear layer's input width).")
@click.option("--keep-embedding", is_flag=True,
              help="Keep the token embedding and the LM head float (by default they are quantized too).")
@click.option("--out", required=True, help="The run directory to create.")
def command(run_dir: str, bits: str, group_size: str, keep_embedding: bool, out: str) -> None:
    """Write RUN_DIR's model with its attention and MLP linear layers, token embedding and LM head (tied or
    not) quantized to 8 or 4 bits (per-group affine, MLX's layout) as a new run that sample, predict, eval,
    chat, serve and `train --init-from ... --lora-rank R` (QLoRA) use on either backend. Norms, biases and
    learned position tables stay float; --keep-embedding keeps the embedding and the head float too."""
    _, cfg, n, before, after = quantize_run(run_dir, out, int(bits), int(group_size), not keep_embedding)
    extra = 1 + (not cfg.tie_embeddings) if cfg.quant_embedding else 0
    what = f"{n - extra} linear layers"
    if extra:
        what += " and the embedding" + (" (the tied head)" if cfg.tie_embeddings else " and the LM head")
    click.echo(f"quantized {what} of {run_dir} to {bits}-bit (group {group_size}): "
               f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB -> {out}")
