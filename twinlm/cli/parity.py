"""`twinlm parity` (placeholder; being written)."""

import click


@click.command("parity")
def command() -> None:
    """Cross-backend parity checks."""
    raise click.ClickException("not implemented yet")
