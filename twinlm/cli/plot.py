"""`twinlm plot` (placeholder; being written)."""

import click


@click.command("plot")
def command() -> None:
    """(being written)"""
    raise click.ClickException("not implemented yet")
