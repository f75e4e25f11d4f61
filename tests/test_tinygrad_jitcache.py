"""The persistent TinyJit cache (`twinlm.backends.tinygrad_jitcache`): a step loaded from disk must
give bit-identical losses and state to a freshly traced one, in this process and in another one,
and the cache must never use an entry traced for another graph nor crash on a broken file."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import backend_or_skip

from twinlm.core import dropout, model, optim
from twinlm.core import step as S
from twinlm.core.config import ModelConfig, preset
from twinlm.core.params import init_params

STEPS = 4
Run = tuple[list[float], dict[str, np.ndarray], bool]  # losses, final state, loaded from the cache?


def _cfg() -> ModelConfig:
    # dropout on, so the masks are JIT inputs too; one layer, as tracing time grows with the graph
    return preset("tiny", vocab_size=32, block_size=16, n_layer=1, dropout=0.1)


def _run(cache: str, monkeypatch: pytest.MonkeyPatch | None = None, opt: optim.AdamWConfig | None = None,
         resume_at: int | None = None) -> Run:
    """STEPS training steps on tinygrad with the JIT cache at `cache`; (losses, final state, loaded?).
    With `resume_at`, the state is replaced by fresh tensors holding the same values at that step
    (as the trainer does on resume), so the steps after it must still update what `step.state` holds."""
    if monkeypatch is not None:
        monkeypatch.setenv("TWINLM_JIT_CACHE", cache)
    B = backend_or_skip("tinygrad")
    cfg, opt = _cfg(), opt or optim.AdamWConfig(warmup=2, max_iters=10)
    state = {k: B.from_numpy(v) for k, v in S.init_state(init_params(cfg, 0)).items()}
    step = B.compile_step(S.make_train_step(B, model.param_spec(cfg), opt, model.lm_loss_fn(B, cfg)), state)
    rng = np.random.default_rng(0)
    losses = []
    for it in range(STEPS):
        if it == resume_at:
            step.state = {k: B.from_numpy(B.to_numpy(v)) for k, v in step.state.items()}
        seq = rng.integers(0, cfg.vocab_size, (2, cfg.block_size + 1)).astype(np.int32)
        drop = {k: B.from_numpy(v) for k, v in dropout.masks(cfg, 2, cfg.block_size, 0, it).items()}
        scalars = (B.from_numpy(v) for v in S.step_scalars(it, opt))
        loss, _ = step({"x": B.from_numpy(seq[:, :-1]), "y": B.from_numpy(seq[:, 1:])}, drop, *scalars)
        losses.append(float(B.to_numpy(loss)))
    loaded = step._jit.fxn is None  # a JIT unpickled from the cache has no Python function
    return losses, {k: B.to_numpy(v) for k, v in step.state.items()}, loaded


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _run_in_another_process(folder: Path) -> tuple[list[float], bool]:
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_tinygrad_jitcache as t; "
            f"losses, _, loaded = t._run({str(folder)!r}); print(json.dumps([losses, loaded]))")
    env = {**os.environ, "TWINLM_JIT_CACHE": str(folder)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    losses, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    return losses, loaded


def test_cached_jit_is_bit_identical_to_a_fresh_trace(tmp_path, monkeypatch) -> None:
    """One test, so that (also under xdist) the graph is traced once: every check below loads it.
    The cached step must give the same losses and state bit for bit, update whatever tensors
    `step.state` holds, load in a fresh process, and survive a corrupt entry."""
    folder = tmp_path / "cache"
    losses, state, loaded = _run(str(folder), monkeypatch)
    assert not loaded and len(list(folder.glob("*.jit"))) == 1
    assert len(set(losses)) == STEPS  # the steps really train
    init = S.init_state(init_params(_cfg(), 0))
    assert not np.array_equal(state["param.wte.weight"], init["param.wte.weight"])

    got_losses, got_state, loaded = _run(str(folder), monkeypatch)
    assert loaded and got_losses == losses
    _assert_same(got_state, state)

    got_losses, got_state, loaded = _run(str(folder), monkeypatch, resume_at=2)
    assert loaded and got_losses == losses
    _assert_same(got_state, state)

    assert _run_in_another_process(folder) == (losses, True)

    # negative control: an entry truncated mid-write is not loaded; the step retraces and replaces it
    entry = next(folder.glob("*.jit"))
    broken = tmp_path / "broken" / entry.name
    broken.parent.mkdir()
    broken.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    got_losses, got_state, loaded = _run(str(broken.parent), monkeypatch)
    assert not loaded and got_losses == losses
    _assert_same(got_state, state)
    assert _run(str(broken.parent), monkeypatch)[2]

    # negative control: another optimizer setting is another graph, so another entry
    other, _, loaded = _run(str(folder), monkeypatch, opt=optim.AdamWConfig(warmup=2, max_iters=10,
                                                                            weight_decay=0.5))
    assert not loaded and len(list(folder.glob("*.jit"))) == 2
    assert other[0] == losses[0] and other[-1] != losses[-1]


def test_graph_key_follows_the_graph_not_the_process() -> None:
    """The key changes with the loss function or a shape, not with buffer identities."""
    B = backend_or_skip("tinygrad")
    from twinlm.backends.tinygrad_jitcache import graph_key

    cfg, opt = _cfg(), optim.AdamWConfig()

    def key(loss_scale: float = 1.0, t: int = cfg.block_size) -> str:
        def loss_fn(p, batch, drop):  # noqa: ANN001, ANN202
            return model.lm_loss_fn(B, cfg)(p, batch, drop) * loss_scale
        state = {k: B.from_numpy(v) for k, v in S.init_state(init_params(cfg, 0)).items()}
        x = B.from_numpy(np.zeros((2, t), np.int32))
        drop = {k: B.from_numpy(v) for k, v in dropout.masks(cfg, 2, t, 0, 0).items()}
        scalars = [B.from_numpy(v) for v in S.step_scalars(0, opt)]
        step = S.make_train_step(B, model.param_spec(cfg), opt, loss_fn)
        outputs, new = step(state, {"x": x, "y": x}, drop, *scalars)
        return graph_key([*state.values(), x, *drop.values(), *scalars], [*outputs, *new.values()])

    base = key()
    assert key() == base  # new buffers, same graph
    assert key(loss_scale=2.0) != base
    assert key(t=cfg.block_size // 2) != base


def test_cache_can_be_disabled(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TWINLM_JIT_CACHE", "0")
    B = backend_or_skip("tinygrad")
    step = B.compile_step(lambda state, x: ((x * 2,), state), {})
    (y,) = step(B.from_numpy(np.arange(3, dtype=np.float32)))
    np.testing.assert_array_equal(B.to_numpy(y), [0, 2, 4])
    assert not any(tmp_path.rglob("*.jit"))


def test_unwritable_cache_only_warns(tmp_path, monkeypatch) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("TWINLM_JIT_CACHE", str(not_a_dir))
    B = backend_or_skip("tinygrad")
    step = B.compile_step(lambda state, x: ((x * 2,), state), {})
    with pytest.warns(UserWarning, match="could not store"):
        (y,) = step(B.from_numpy(np.arange(3, dtype=np.float32)))
    np.testing.assert_array_equal(B.to_numpy(y), [0, 2, 4])


def test_cache_dir_honours_xdg(monkeypatch, tmp_path) -> None:
    from twinlm.backends import jit_cache_dir as cache_dir  # the module's cache_dir, without tinygrad

    monkeypatch.delenv("TWINLM_JIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "twinlm" / "tinygrad-jit"
    monkeypatch.setenv("TWINLM_JIT_CACHE", "0")
    assert cache_dir() is None


def test_key_does_not_change_with_what_the_process_ran() -> None:
    """A setting the adapter changed lazily (bfloat16 emulation on the CPU, before the first bf16 kernel)
    gave a float32 step one key after bf16 work and another in a fresh process, which missed the cache."""
    B = backend_or_skip("tinygrad")
    from twinlm.backends.tinygrad_jitcache import _environment_key

    before = _environment_key()
    x = B.astype(B.from_numpy(np.arange(4, dtype=np.float32)), "bfloat16")
    np.testing.assert_array_equal(B.to_numpy(B.astype(x * 2, "float32")), [0, 2, 4, 6])
    assert _environment_key() == before


SLOT_BASE = 10**12  # tinygrad's buffer counter in these runs: above any slot a test process holds
SLOT_X = np.arange(16, dtype=np.float32) / 8.0


def _slot_run(cache: str, start: int, monkeypatch: pytest.MonkeyPatch | None = None
               ) -> tuple[list[np.ndarray], bool]:
    """A small graph (same-sized outputs and intermediates) through the JIT cache at `cache`, with
    tinygrad's per-process buffer-slot counter starting at `start`: processes with different histories
    hold different slot numbers, and a stored entry must not take over buffers this process owns.
    Returns the outputs and whether the JIT was loaded from the cache."""
    from tinygrad.uop.ops import UOp

    if monkeypatch is not None:
        monkeypatch.setenv("TWINLM_JIT_CACHE", cache)
        monkeypatch.setattr(UOp, "unique_num", itertools.count(start))
    else:  # (a process of its own)
        os.environ["TWINLM_JIT_CACHE"] = cache
        UOp.unique_num = itertools.count(start)
    B = backend_or_skip("tinygrad")

    def fn(state: dict, x: object) -> tuple[tuple, dict]:
        a = B.exp(x * 0.5)
        return (a, a * 2.0 + x, B.tanh(a) - x * 3.0), state

    step = B.compile_step(fn, {})
    outs = step(B.from_numpy(SLOT_X))
    return [B.to_numpy(o) for o in outs], step._jit.fxn is None


def test_loaded_entry_keeps_its_buffers_apart_from_this_process(tmp_path, monkeypatch) -> None:
    """An entry saved by a process whose buffer counter stood elsewhere (here: one behind this one).
    Before the fix its stored buffers came back as this process's live ones (tinygrad interns a BUFFER
    UOp by its slot number) and a copied-out output overwrote another (the third output was 7.2 off),
    as test_model_parity's gradients were with two xdist workers sharing one cache folder."""
    folder = tmp_path / "cache"
    code = ("import sys; sys.path.insert(0, 'tests'); import test_tinygrad_jitcache as t; "
            f"print(t._slot_run({str(folder)!r}, t.SLOT_BASE)[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and out.stdout.split()[-1] == "False", out.stderr[-2000:]
    a = np.exp(SLOT_X * 0.5)
    want = [a, a * 2 + SLOT_X, np.tanh(a) - SLOT_X * 3]
    outs, loaded = _slot_run(str(folder), SLOT_BASE + 1, monkeypatch)
    assert loaded
    for got, w in zip(outs, want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
