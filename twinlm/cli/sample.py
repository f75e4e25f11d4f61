"""`twinlm sample` (placeholder; being written)."""

import click


@click.command("sample")
def command() -> None:
    """(being written)"""
    raise click.ClickException("not implemented yet")
