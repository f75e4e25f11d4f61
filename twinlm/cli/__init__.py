"""The `twinlm` command line."""
