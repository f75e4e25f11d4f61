"""`import-hf` streams a folder's weights into the checkpoint (issue #19: a 4.9 GB fp32 Llama-3.2-1B folder
peaked at 13.7 GB; the target is at most the file plus one copy). Measured in a child process as the growth
of its peak RSS (VmHWM, reset just before the import) relative to the folder's weight bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# argv: folder, work dir. A first import warms every lazy import and the page cache; then the import is
# measured as it is ("stream"), and with each tensor copied into the checkpoint in one piece, as before the
# fix ("whole"), the peak reset before each.
_CHILD = """
import json, sys
from pathlib import Path
from twinlm.core import tensorfile
from twinlm.hf import import_hf

def status(key):
    return int([l for l in open('/proc/self/status') if l.startswith(key + ':')][0].split()[1]) * 1024

def whole(dst, src):
    dst[:] = src
    tensorfile.release(src)

def growth(out):
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # VmHWM := the current RSS
    base = status('VmRSS')
    import_hf(folder, out)
    return status('VmHWM') - base

tensorfile.COPY_CHUNK = 2**20
folder, work = Path(sys.argv[1]), Path(sys.argv[2])
import_hf(folder, work / 'warm')
stream = growth(work / 'stream')
tensorfile.copy_releasing = whole
print(json.dumps({'stream': stream, 'whole': growth(work / 'whole')}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads and resets VmHWM (Linux)")
def test_import_hf_holds_the_weights_about_once(tmp_path: Path) -> None:
    """A 35 MB Llama folder whose embedding is 92% of it (as the 1B model's is the largest tensor). The
    embedding is not transposed, so it is copied from the memory map straight into the checkpoint buffer;
    copied whole, its mapped pages and the filled buffer were resident together (file + embedding, ~1.9x).
    Streamed in chunks: ~1.0x. Negative control: the whole-tensor copy, measured the same way, exceeds the
    bound. Measured here: stream ~1.05x, whole ~1.9x."""
    pytest.importorskip("transformers")  # the [hf] extra builds the folder
    from tests import hf_models

    folder = hf_models.build_modern("Llama-3.2-1B", tmp_path / "hf", vocab_size=16384, hidden_size=512,
                                    intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
                                    num_key_value_heads=2, head_dim=64)
    size = (folder / "model.safetensors").stat().st_size
    assert size > 30 * 2**20
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    growth = json.loads(p.stdout.strip().splitlines()[-1])
    stream, whole = growth["stream"] / size, growth["whole"] / size
    print(f"import-hf peak growth / weight bytes: streamed {stream:.2f}x, whole-tensor copy {whole:.2f}x")
    assert stream < 1.4, stream
    assert whole > 1.6, whole  # the measure can fail


def test_to_backend_consume_empties_the_host_dict_and_keeps_the_values() -> None:
    """`twinlm.load(FOLDER)` converts a folder's transposed host copies with consume=True, so each is freed
    once on the backend; without it (a caller's own dict) nothing is taken away."""
    import numpy as np

    from twinlm.backends import get_backend
    from twinlm.run_dir import to_backend

    B = get_backend("numpy")
    rng = np.random.default_rng(0)
    host = {f"w{i}": rng.standard_normal((512, 512), np.float32) for i in range(3)}  # 1 MB each
    want = {k: v.copy() for k, v in host.items()}
    kept = to_backend(B, host)
    assert set(host) == set(want)
    out = to_backend(B, host, consume=True)
    assert host == {}
    for k, v in want.items():
        assert np.array_equal(B.to_numpy(out[k]), v) and np.array_equal(B.to_numpy(kept[k]), v)
