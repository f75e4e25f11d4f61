"""`twinlm train` (placeholder; being written)."""

import click


@click.command("train")
def command() -> None:
    """(being written)"""
    raise click.ClickException("not implemented yet")
