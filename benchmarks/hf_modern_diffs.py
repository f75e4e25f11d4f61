"""Max |twinlm - transformers| logits per modern Hugging Face class and backend, on the tiny random models of
tests/hf_models.py (the numbers of the issue's closing note; the tests assert < 1e-4).

    PYTHONPATH=. python -m benchmarks.hf_modern_diffs [--backends numpy,mlx,tinygrad]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    import torch
    import transformers as tf

    from tests import hf_models
    from twinlm.backends import get_backend
    from twinlm.core import model
    from twinlm.hf import read_hf

    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="numpy,mlx,tinygrad")
    backends = ap.parse_args().backends.split(",")
    ids = ((np.arange(48) * 7 + 3) % 250 + 2)[None, :]
    print(f"{'model':16} {'class':20} " + " ".join(f"{b:>9}" for b in backends))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (architecture, _) in hf_models.MODERN.items():
            folder = hf_models.build_modern(name, Path(tmp) / name)
            cfg, params, *_ = read_hf(folder)
            hf_model = getattr(tf, architecture).from_pretrained(folder).eval()
            with torch.no_grad():
                ref = hf_model(torch.tensor(ids)).logits.numpy()
            row = []
            for b in backends:
                B = get_backend(b)
                p = {k: B.from_numpy(v) for k, v in params.items()}
                got = B.to_numpy(model.logits(B, cfg, p, B.from_numpy(ids.astype(np.int32))))
                row.append(f"{float(np.abs(got - ref).max()):9.1e}")
            print(f"{name:16} {architecture:20} " + " ".join(row))


if __name__ == "__main__":
    main()
