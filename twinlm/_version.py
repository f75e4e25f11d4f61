"""The package version, in a module of its own so that modules of twinlm can read it without importing
the package's `__init__` (which lazily loads the whole Python API)."""

__version__ = "0.1.0"
