"""`twinlm doctor` (placeholder; being written)."""

import click


@click.command("doctor")
def command() -> None:
    """(being written)"""
    raise click.ClickException("not implemented yet")
