"""twinlm: one transformer graph, run on MLX or tinygrad, with the two backends proven equal."""

__version__ = "0.1.0"
