"""`twinlm eval` (placeholder; being written)."""

import click


@click.command("eval")
def command() -> None:
    """(being written)"""
    raise click.ClickException("not implemented yet")
