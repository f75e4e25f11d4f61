"""`twinlm import-hf` and `twinlm export-hf`: Hugging Face model folders in and out."""

from __future__ import annotations

import click

from twinlm.hf import export_hf, import_hf


@click.command("import-hf")
@click.argument("folder", type=click.Path())
@click.option("--out", required=True, help="The run directory to create.")
def import_command(folder: str, out: str) -> None:
    """Turn a Hugging Face model FOLDER (config.json, model.safetensors, tokenizer.json) into a twinlm run
    that sample, eval, predict, finetune and `train --init-from` use. Reads disk only; never downloads."""
    run, (summary, *notes) = import_hf(folder, out)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"imported {summary} -> {run}")


@click.command("export-hf")
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, help="The Hugging Face folder to create.")
def export_command(run_dir: str, out: str) -> None:
    """Write the model in RUN_DIR (its latest checkpoint; LoRA adapters merged) as a Hugging Face folder
    that transformers' from_pretrained loads: config.json, model.safetensors and, where the run's
    tokenizer has a Hugging Face form, tokenizer.json."""
    folder, notes = export_hf(run_dir, out)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"exported {run_dir} -> {folder}")
