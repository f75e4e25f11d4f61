"""`twinlm parity` (placeholder; being written)."""

import click


@click.command()
def parity() -> None:
    """Cross-backend parity checks."""
    raise click.ClickException("not implemented yet")
