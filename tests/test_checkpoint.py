"""Checkpoints: bit-exact round trips, damage detection, retention, leftovers.

Atomicity under faults and kills is proven in test_fault_injection.py (a fault at every operation)."""


import numpy as np
import pytest

from twinlm.core.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from twinlm.core.errors import TwinlmError


def make_state(version: int, n: int = 1000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(version)
    w = rng.standard_normal((n // 10, 10), dtype=np.float32)
    w.flat[:4] = [np.nan, np.inf, -0.0, np.float32(1e-45)]  # bit patterns a lossy path would change
    return {"param.w": w, "m.w": rng.standard_normal(n, dtype=np.float32) * 1e-3,
            "v.w": np.float16(rng.random(7)), "param.ids": rng.integers(0, 9, (3, 2), dtype=np.int32),
            "param.scalar": np.float32(version)}


META = {"model": {"vocab_size": 65}, "tokenizer": {"kind": "char", "chars": "aé🙂"}, "iter": 5,
        "backend": "mlx", "versions": {"numpy": np.__version__}, "seed": 1}


def assert_bit_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        w = np.asarray(w)
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert got[k].tobytes() == w.tobytes(), k


def hidden(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.is_dir())


def test_round_trip_is_bit_exact(tmp_path):
    path = save_checkpoint(tmp_path, make_state(1), META, step=5)
    assert path == tmp_path / "ckpt-00000005"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "meta.json", "state.safetensors"]
    assert latest_checkpoint(tmp_path) == path and best_checkpoint(tmp_path) is None
    for where in (tmp_path, path, path / "state.safetensors"):
        arrays, meta = load_checkpoint(where)
        assert_bit_identical(arrays, make_state(1))
        assert meta == META
    assert hidden(tmp_path) == []


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda c: flip_byte(c / "state.safetensors", 4000), "state.safetensors does not match its SHA-256"),
    (lambda c: flip_byte(c / "meta.json", 10), "meta.json does not match its SHA-256"),
    (lambda c: (c / "state.safetensors").write_bytes((c / "state.safetensors").read_bytes()[:-1]),
     "state.safetensors has .* bytes, expected .* \\(truncated\\?\\)"),
    (lambda c: (c / "state.safetensors").unlink(), "incomplete: state.safetensors is missing"),
    (lambda c: (c / "manifest.json").unlink(), "incomplete or damaged: manifest.json is missing"),
    (lambda c: (c / "manifest.json").write_text("{not json", encoding="utf-8"), "damaged manifest.json"),
])
def test_damage_is_detected(tmp_path, damage, message):
    ckpt = save_checkpoint(tmp_path, make_state(1), META, step=1)
    damage(ckpt)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


def test_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    assert latest_checkpoint(tmp_path / "nope") is None
    assert issubclass(CheckpointError, TwinlmError)


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path, make_state(1), {"x": object()}, step=1)
    with pytest.raises(CheckpointError, match="step must be a non-negative integer"):
        save_checkpoint(tmp_path, make_state(1), META, step=-1)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoint 1 in .*a_file"):
        save_checkpoint(tmp_path / "a_file", make_state(1), META, step=1)


def steps_on_disk(run_dir):
    return sorted(int(p.name[5:]) for p in run_dir.glob("ckpt-*"))


def test_keep_last_k_plus_best(tmp_path):
    for step in range(1, 7):
        save_checkpoint(tmp_path, make_state(step), {"step": step}, step=step, keep=2, best=step == 2)
    assert steps_on_disk(tmp_path) == [2, 5, 6]
    assert best_checkpoint(tmp_path) == tmp_path / "ckpt-00000002"
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000006"
    assert_bit_identical(load_checkpoint(best_checkpoint(tmp_path))[0], make_state(2))
    save_checkpoint(tmp_path, make_state(7), {"step": 7}, step=7, keep=2, best=True)
    assert steps_on_disk(tmp_path) == [6, 7]  # the old best is no longer protected
    assert best_checkpoint(tmp_path) == latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000007"
    assert hidden(tmp_path) == []


def test_same_step_is_replaced_whole(tmp_path):
    save_checkpoint(tmp_path, make_state(1), {"v": 1}, step=3)
    save_checkpoint(tmp_path, make_state(2), {"v": 2}, step=3)
    arrays, meta = load_checkpoint(tmp_path)
    assert meta == {"v": 2}
    assert_bit_identical(arrays, make_state(2))
    assert hidden(tmp_path) == [] and steps_on_disk(tmp_path) == [3]
    save_checkpoint(tmp_path, make_state(3), {"v": 3}, step=3, best=True)
    save_checkpoint(tmp_path, make_state(4), {"v": 4}, step=3)  # replaces the best: pointer dropped
    assert best_checkpoint(tmp_path) is None and load_checkpoint(tmp_path)[1] == {"v": 4}


def test_leftovers_of_interrupted_saves(tmp_path):
    save_checkpoint(tmp_path, make_state(1), {"v": 1}, step=1)
    save_checkpoint(tmp_path, make_state(3), {"v": 3}, step=3)
    junk = tmp_path / ".tmp-ckpt-00000004-deadbeef"
    junk.mkdir()
    (junk / "state.safetensors").write_bytes(b"half")
    # killed between the two renames of a same-step save: step 3 is set aside, not yet replaced
    (tmp_path / "ckpt-00000003").rename(tmp_path / ".old-ckpt-00000003-0badf00d")
    assert latest_checkpoint(tmp_path) == tmp_path / ".old-ckpt-00000003-0badf00d"
    assert load_checkpoint(tmp_path)[1] == {"v": 3}
    (tmp_path / "latest.json").unlink()  # a lost pointer falls back to the highest complete step
    with pytest.warns(CheckpointWarning, match="latest.json is missing; using ckpt-00000001"):
        assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000001"
    save_checkpoint(tmp_path, make_state(4), {"v": 4}, step=4, keep=None)
    assert hidden(tmp_path) == [] and steps_on_disk(tmp_path) == [1, 3, 4]
    assert_bit_identical(load_checkpoint(tmp_path / "ckpt-00000003")[0], make_state(3))
