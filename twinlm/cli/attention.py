"""`twinlm attention RUN_DIR --text ...`: a trained model's attention maps for a text, and per head its mean
attention distance and entropy."""

from __future__ import annotations

from pathlib import Path

import click

from twinlm._version import __version__
from twinlm.cli.common import backend, backend_option
from twinlm.core.errors import TwinlmError


@click.command("attention")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--text", required=True, help="The input whose attention to show (cut to the last block_size "
                                            "tokens).")
@click.option("-o", "--out", default="attention.png", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@backend_option
def command(run_dir: Path, text: str, out: Path, backend_name: str | None) -> None:
    """Draw the attention map of every layer and head of RUN_DIR's model on TEXT (one PNG), and print each
    head's mean attention distance (tokens) and entropy (nats)."""
    from twinlm.experiments.attention_maps import attention_maps, head_stats, plot_maps
    from twinlm.run_dir import load_model

    B = backend(backend_name)
    cfg, params, tok, _ = load_model(run_dir)
    ids = tok.encode(text)[-cfg.block_size:]
    if len(ids) == 0:
        raise TwinlmError("--text is empty")
    maps = attention_maps(B, cfg, params, ids[None, :])
    pieces = [tok.decode([int(i)]) for i in ids]
    plot_maps(maps[:, 0], pieces, out, f"attention of {run_dir} on {text[:40]!r}",
              f"twinlm {__version__} | backend {B.name} | {cfg.arch}, {cfg.n_layer} layers x "
              f"{cfg.n_head} heads")
    stats = head_stats(maps)
    click.echo(f"{'layer':>5} {'head':>4} {'mean distance (tokens)':>23} {'entropy (nats)':>15}")
    for layer in range(cfg.n_layer):
        for h in range(cfg.n_head):
            click.echo(f"{layer:5d} {h:4d} {stats['mean_distance'][layer, h]:23.2f} "
                       f"{stats['entropy'][layer, h]:15.2f}")
    click.echo(f"wrote {out}")
