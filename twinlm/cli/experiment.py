"""`twinlm experiment NAME`: reproduce one of the transformer's claims (see twinlm/experiments/)."""

from __future__ import annotations

from pathlib import Path

import click

from twinlm.cli.common import backend, backend_option
from twinlm.experiments import EXPERIMENTS, experiment, run


@click.command("experiment")
@click.argument("name", required=False)
@backend_option
@click.option("--quick", is_flag=True, help="The small version (well under a minute; what the tests run).")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for result.json and the figures. Default: experiments/NAME-BACKEND[-quick].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every model and dataset.")
@click.option("--list", "list_them", is_flag=True, help="List the experiments and what each shows.")
def command(name: str | None, backend_name: str | None, quick: bool, out: Path | None, seed: int,
            list_them: bool) -> None:
    """Run experiment NAME: train the models it compares, write DIR/result.json (every number, the config,
    versions, backend) and PNG figures, and print a verdict with the headline number."""
    if list_them:
        for key in EXPERIMENTS:
            module = experiment(key)
            click.echo(f"{key:18s} {module.CLAIM}\n{'':18s} {module.ABOUT}")
        return
    if name is None:
        raise click.UsageError("name an experiment (twinlm experiment --list shows them)")
    experiment(name)  # an unknown name fails before any backend loads
    B = backend(backend_name)
    out = out or Path("experiments") / f"{name}-{B.name}{'-quick' if quick else ''}"
    click.echo(f"experiment {name} on {B.name} ({'quick' if quick else 'full'}) -> {out}")
    outcome = run(name, B, out, quick=quick, log=click.echo, seed=seed)
    click.echo(f"claim: {outcome.claim}")
    click.echo(f"verdict: {outcome.verdict}")
    click.echo(f"wrote {out / 'result.json'}")
