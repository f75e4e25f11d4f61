"""The README's Python API example, run as written (in a temporary directory with a notes.txt)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))
    Path("notes.txt").write_text("The cat sat on the mat. The dog ate the log.\n" * 200)
    scope: dict = {}
    exec(compile(api_example(), "README.md", "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert len(out) >= 3 and out[1].startswith("gpt ")
    m, tuned = scope["m"], scope["tuned"]
    assert m.backend.name == "tinygrad" and m.logits("The cat").shape == (1, 7, m.config.vocab_size)
    assert tuned.config.lora_rank == 4 and np.isfinite(tuned.result.val_loss)
    ids = tuned.generate([[1, 2, 3]], max_new_tokens=5, temperature=0)
    assert ids.shape == (1, 5)
    twin = __import__("twinlm").load("runs/notes-lora", backend="mlx")
    np.testing.assert_allclose(twin.logits("The dog"), tuned.logits("The dog"), atol=1e-5)
