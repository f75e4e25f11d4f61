"""Generation and loading whose cost follows the tokens and the weights, not the model's context (issues #19,
#21): a model declaring 32,768 positions samples its first token in seconds and small memory on both
backends; a memory-mapped checkpoint is held once, not twice, once copied to a backend."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from twinlm.backends import BackendUnavailable, get_backend
from twinlm.core import tensorfile
from twinlm.core.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# Report the child's own peak: VmHWM starts afresh at exec (getrusage's maxrss carries the parent's over).
_PEAK = ("import atexit, runpy, sys\n"
         "def peak():\n"
         "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
         "    print(f'peak-kb {hwm}', file=sys.stderr)\n"
         "atexit.register(peak)\n"
         "sys.argv = ['twinlm', *sys.argv[1:]]\n"
         "runpy.run_module('twinlm.cli.main', run_name='__main__')\n")


def twinlm_peak(*args: str) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of one `twinlm` command in its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _PEAK, *args], env=env, capture_output=True, text=True,
                       timeout=300)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    peak = [line for line in p.stderr.splitlines() if line.startswith("peak-kb ")]
    return wall, int(peak[-1].split()[1]) / 1024, p.stdout


def test_a_32k_context_samples_its_first_token_fast_and_small(tmp_path: Path) -> None:
    """Llama-3.2-1B's config at a tiny width with max_position_embeddings 32,768, imported. Before issue #19
    tinygrad built a (1, 32768) attention mask and a (1, 1, 32768, 1) write mask for every position
    (2 GB, minutes) and both decoders sized their KV cache to the whole context; now the cache holds
    prompt + new tokens and grows. Bounds are far from what a run takes here (~5 s, ~100-200 MB)."""
    pytest.importorskip("transformers")  # the [hf] extra builds the folder
    from tests import hf_models

    folder = hf_models.build_modern("Llama-3.2-1B", tmp_path / "hf", max_position_embeddings=32768)
    from twinlm.hf import import_hf

    run, (summary, *_) = import_hf(folder, tmp_path / "run")
    assert "block 32768" in summary
    for backend in ("mlx", "tinygrad"):
        try:
            get_backend(backend)
        except BackendUnavailable:
            continue
        wall, peak_mb, text = twinlm_peak("sample", str(run), "-n", "4", "--prompt", "the cat",
                                          "--temperature", "0", "--backend", backend)
        print(f"{backend}: sample -n 4 at 32768 positions: {wall:.1f} s, peak RSS {peak_mb:.0f} MB")
        assert text.startswith("the cat")
        assert wall < 90, (backend, wall)
        assert peak_mb < 1024, (backend, peak_mb)


def _file_mb() -> float:
    """This process's resident pages of mapped files (RssFile: where a memory-mapped checkpoint counts)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("name", ["numpy", "mlx", "tinygrad"])
def test_a_loaded_checkpoint_sits_in_memory_once(name: str, tmp_path: Path, monkeypatch) -> None:
    """A 64 MB checkpoint: hashing it on load (its manifest's SHA-256 and the tensors' digest) and copying it
    to a backend leave none of the mapped file resident, only the backend's copy (MLX copies a large mapped
    tensor in chunks, here of 1 MB). Negative control: reading the same mapped tensors without `release`
    does leave them resident, so the measure can fail."""
    from tests.conftest import backend_or_skip
    from twinlm.run_dir import to_backend

    B = backend_or_skip(name)
    if name == "mlx":
        monkeypatch.setattr("twinlm.backends.mlx._CHUNK_BYTES", 2**20)
    monkeypatch.setattr(tensorfile, "COPY_CHUNK", 2**20)  # (tinygrad's chunked copy of a mapped tensor)

    rng = np.random.default_rng(0)
    arrays = {f"param.w{i}": rng.standard_normal((1024, 1024), np.float32) for i in range(16)}  # 64 MB
    size_mb = sum(a.nbytes for a in arrays.values()) / 2**20
    save_checkpoint(tmp_path, arrays, {"x": 1}, step=0)
    B.to_numpy(B.from_numpy(np.zeros(1)))  # (its imports done before measuring)

    before = _file_mb()
    loaded, _ = load_checkpoint(tmp_path)  # both hashes read every byte of the map
    assert _file_mb() - before < 0.25 * size_mb
    params = to_backend(B, loaded)
    assert _file_mb() - before < 0.25 * size_mb
    assert all(np.array_equal(B.to_numpy(params[k]), arrays[k]) for k in arrays)  # pages read back intact
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)  # (this reads the map again)
    for a in loaded.values():
        tensorfile.release(a)

    before = _file_mb()
    total = sum(float(a[::64].sum()) for a in loaded.values())  # touch every page, no release
    assert np.isfinite(total) and _file_mb() - before > 0.75 * size_mb
    for a in loaded.values():
        tensorfile.release(a)
    assert _file_mb() - before < 0.25 * size_mb


def test_release_leaves_other_arrays_alone(tmp_path: Path) -> None:
    """`release` drops pages only of a read-only file mapping: a heap array, or a writable map's, keeps its
    contents (MADV_DONTNEED would zero an anonymous one)."""
    import mmap

    heap = np.arange(1 << 20, dtype=np.float32)
    tensorfile.release(heap)
    assert heap[-1] == (1 << 20) - 1
    anon = mmap.mmap(-1, 1 << 20)
    view = np.frombuffer(anon, np.uint8)
    view[:] = 7
    tensorfile.release(view)
    assert int(view.sum()) == 7 << 20
    del view
    anon.close()
