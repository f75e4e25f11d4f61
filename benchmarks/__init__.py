"""Benchmarks: the real twinlm training step per backend, side by side with a PyTorch eager reference.

Run `python -m benchmarks.step --backend all --preset baby` from the repository root (or `twinlm bench`);
`python -m benchmarks.quality` trains the baby preset on Tiny Shakespeare to a fixed iteration count.
Only `benchmarks.torch_ref` needs torch (the optional `[bench]` extra).
"""
