"""`train --grad-checkpoint` (issue #21): each decoder block runs through `Backend.checkpoint`, which on MLX
keeps only the block's inputs and recomputes the rest in the backward pass. Same loss and gradients,
less memory; a checkpoint that hides the block's weights from the transform is caught; tinygrad and the
families that do not checkpoint refuse in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import backend_or_skip, run_cli

from twinlm.core import model, quant
from twinlm.core.config import ModelConfig
from twinlm.core.models import family
from twinlm.core.params import init_params

CFG = ModelConfig(arch="llama", vocab_size=256, block_size=128, n_layer=6, n_head=4, d_model=128)


def _grads(B, remat: bool) -> tuple[float, dict[str, np.ndarray], int]:
    """Loss, gradients and MLX's peak memory of one backward pass of CFG on a fixed batch."""
    import mlx.core as mx

    B = copy.copy(B)
    B.remat = remat
    rng = np.random.default_rng(0)
    x, y = (B.from_numpy(rng.integers(0, 256, (4, 128)).astype(np.int32)) for _ in range(2))
    p = {k: B.from_numpy(v) for k, v in init_params(CFG, 0).items()}
    vg = B.value_and_grad(lambda p, x, y: model.loss(B, CFG, p, x, y))
    mx.eval(p)
    mx.clear_cache()
    mx.reset_peak_memory()
    loss, g = vg(p, x, y)
    mx.eval(loss, g)
    return float(loss), {k: np.array(v) for k, v in g.items()}, mx.get_peak_memory()


def test_checkpointed_blocks_give_the_same_gradients_in_less_memory() -> None:
    B = backend_or_skip("mlx")
    loss, grads, peak = _grads(B, remat=False)
    loss_r, grads_r, peak_r = _grads(B, remat=True)
    assert loss_r == loss
    for k in grads:
        np.testing.assert_allclose(grads_r[k], grads[k], rtol=0, atol=1e-6, err_msg=k)
    # the activations of 6 blocks are not all kept (measured: 302 -> 128 MB at 8 layers x 256 positions)
    assert peak_r < 0.7 * peak, (peak_r, peak)


def test_control_a_checkpoint_that_closes_over_the_weights_is_caught() -> None:
    """The block's weights must be explicit inputs of mx.checkpoint: closed over, the transform treats them
    as constants and their gradients through the recomputation are lost."""
    import mlx.core as mx

    B = backend_or_skip("mlx")

    class ClosedOver(type(B)):  # type: ignore[misc]
        def checkpoint(self, fn, params, x):
            return mx.checkpoint(lambda x: fn(params, x))(x) if self.remat else fn(params, x)

    wrong = copy.copy(B)
    wrong.__class__ = ClosedOver
    _, grads, _ = _grads(B, remat=False)
    _, bad, _ = _grads(wrong, remat=True)
    worst = max(float(np.abs(bad[k] - grads[k]).max()) for k in grads if k.startswith("blocks."))
    assert worst > 1e-3, worst


# QLoRA on a wide block: a 4-bit base (embedding and tied head too), rank-8 adapters on every linear layer
WIDE = ModelConfig(arch="llama", vocab_size=256, block_size=128, n_layer=1, n_head=4, d_model=512, d_ff=1536,
                   lora_rank=8, quant_bits=4, quant_group_size=64, quant_embedding=True)


def _step_peak(B, budget: int, monkeypatch) -> tuple[float, list[np.ndarray]]:
    """MLX's peak memory above the step's start (MiB) and the outputs (loss, the adapters' gradients) of one
    compiled QLoRA step of WIDE under `remat` with a transient budget of `budget` bytes."""
    import mlx.core as mx

    from twinlm.backends import mlx as mlx_backend

    monkeypatch.setattr(mlx_backend, "REMAT_TRANSIENT_BYTES", budget)
    B = copy.copy(B)
    B.remat = True
    rng = np.random.default_rng(0)
    x, y = (B.from_numpy(rng.integers(0, 256, (4, 128)).astype(np.int32)) for _ in range(2))
    floats = init_params(WIDE.without_quant(), 0)
    p = {k: B.from_numpy(v) for k, v in quant.quantize_params(floats, family("llama").param_spec(WIDE), 4,
                                                                 64).items()}
    adapters = sorted(k for k in p if k.endswith((".lora_a", ".lora_b")))
    vg = B.value_and_grad(lambda a, base, x, y: model.loss(B, WIDE, {**base, **a}, x, y))

    def fn(state, x, y):
        loss, g = vg({k: state[k] for k in adapters}, {k: v for k, v in state.items() if k not in adapters},
                     x, y)
        return (loss, *(g[k] for k in adapters)), state

    step = B.compile_step(fn, p)
    mx.eval(p)
    mx.clear_cache()
    limit = mx.get_memory_limit()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    out = step(x, y)
    assert mx.get_memory_limit() == limit  # the process's limit is back after the step
    return (mx.get_peak_memory() - start) / 2**20, [np.array(o) for o in out]


def test_a_recomputing_step_bounds_what_mlx_queues_at_once(monkeypatch) -> None:
    """Under remat a step's evaluation waits for queued ops once it holds the transient budget, so their
    outputs are not allocated side by side; the ops and results are the same (QLoRA's loss and adapter
    gradients bit for bit). The unbounded step is the control: MLX queues ahead and holds more (measured 88-92
    MiB, bounded 45-48)."""
    B = backend_or_skip("mlx")
    free, out = _step_peak(B, 1 << 40, monkeypatch)
    bounded, out_b = _step_peak(B, 0, monkeypatch)
    assert bounded < 0.7 * free, (bounded, free)
    assert len(out) == 1 + 2 * 4 and np.abs(out[-1]).max() > 0  # loss, a and b of 4 layers; b's gradient
    for a, b in zip(out, out_b, strict=True):
        np.testing.assert_array_equal(a, b)


TINY = ["--arch", "llama", "--preset", "tiny", "--block-size", "16", "--batch-size", "4", "--max-iters", "4",
        "--eval-every", "4", "--eval-iters", "1", "--log-every", "1", "--tokenizer", "char"]


def test_train_with_grad_checkpoint_matches_the_run_without(tmp_path: Path, capsys, monkeypatch) -> None:
    backend_or_skip("mlx")
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of the little corpus\n" for i in range(200)))
    losses = {}
    for flag in ([], ["--grad-checkpoint"]):
        out = tmp_path / ("gc" if flag else "plain")
        code, _, err = run_cli(["train", "--backend", "mlx", "--data", str(corpus), "--out", str(out), *TINY,
                                *flag], capsys, monkeypatch)
        assert code == 0, err
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        losses[bool(flag)] = [r["loss"] for r in rows if r["event"] == "train"]
    assert len(losses[True]) == 4
    np.testing.assert_allclose(losses[True], losses[False], rtol=0, atol=1e-6)


def test_the_trainer_turns_recomputation_on_for_its_own_steps_only(tmp_path: Path) -> None:
    from twinlm.trainer import TrainConfig, Trainer

    B = backend_or_skip("mlx")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a few words to train on\n" * 50)
    tc = TrainConfig(data=str(corpus), arch="llama", preset="tiny", block_size=16, batch_size=4, max_iters=1,
                     out=str(tmp_path / "r"), grad_checkpoint=True)
    trainer = Trainer(tc, B, log=lambda m: None)
    assert trainer.B.remat and trainer.B is not B and not B.remat


@pytest.mark.parametrize(("backend", "arch", "says"), [
    ("tinygrad", "llama", "backend tinygrad cannot recompute activations"),
    ("mlx", "bert", "--arch bert does not checkpoint its blocks"),
])
def test_refusals_are_one_line(tmp_path: Path, capsys, monkeypatch, backend: str, arch: str,
                               says: str) -> None:
    backend_or_skip(backend)
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to train on\n" * 50)
    args = [a if a != "llama" else arch for a in TINY]
    code, _, err = run_cli(["train", "--backend", backend, "--data", str(corpus), "--out",
                            str(tmp_path / "r"), *args, "--grad-checkpoint"], capsys, monkeypatch)
    assert code != 0 and says in err and err.strip().count("\n") == 0, err
