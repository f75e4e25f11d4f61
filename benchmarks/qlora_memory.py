"""Where a QLoRA step's memory goes (issue #21's 3 GB target): MLX's own counters around pieces of the step.

    python -m benchmarks.qlora_memory --run Q4_RUN --data DATA/train.jsonl --layers 2
    python -m benchmarks.qlora_memory --run Q4_RUN --data DATA/train.jsonl --layers 1 --batch 1 --seq 64

Q4_RUN is a 4-bit twinlm run (`twinlm quantize RUN --bits 4 --out Q4_RUN`); `--layers N` measures a proxy
made of its first N blocks (same vocabulary, embedding and head; written once under --out), so a step takes
seconds instead of a minute at the Llama-3.2-1B shape (the second line above: seconds, to see it run). The
trainer is built as `twinlm train --init-from PROXY --lora-rank 8 --lora-targets all --grad-checkpoint` builds
it. Every number is MLX's peak of live (active) memory above what was alive before the piece ran
(`mx.reset_peak_memory`), in MiB; the piece's outputs are evaluated, then dropped.

Rows: the pieces uncompiled, once as MLX schedules them and once with its memory limit at 1 byte (every op
waits for the ones before it: the least each piece needs); then the trainer's compiled step unbounded and
with `twinlm.backends.mlx.REMAT_TRANSIENT_BYTES` (the bound of a step under `--grad-checkpoint`), with the
process's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs before each) and the step's time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 2**20


def proxy(run: Path, layers: int, out: Path) -> Path:
    """The run's first `layers` blocks as a run of their own (made once)."""
    from twinlm.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    dest = out / f"proxy-L{layers}"
    if latest_checkpoint(dest) is not None:
        return dest
    arrays, meta = load_checkpoint(run)
    keep = {k: v for k, v in arrays.items()
            if not k.startswith("param.blocks.") or int(k.split(".")[2]) < layers}
    meta["model"]["n_layer"] = layers
    if meta.get("hf"):
        meta["hf"]["config"]["num_hidden_layers"] = layers
    save_checkpoint(dest, keep, meta, step=0)
    return dest


def hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a 4-bit twinlm run")
    ap.add_argument("--data", required=True, help="training text (what `twinlm train --data` takes)")
    ap.add_argument("--layers", type=int, default=2, help="blocks of the proxy (0: the whole model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default="/var/tmp/qlora_memory", help="where the proxy and the run go")
    args = ap.parse_args(argv)

    # the adapter first: it sets up OpenBLAS and malloc before mlx.core is imported
    # isort: off
    from twinlm.backends import mlx as MB
    import mlx.core as mx
    # isort: on

    from twinlm.core import layers as L
    from twinlm.core import model
    from twinlm.core.models import decoder
    from twinlm.trainer.config import TrainConfig
    from twinlm.trainer.loop import Trainer

    out = Path(args.out)
    run = proxy(Path(args.run), args.layers, out) if args.layers else Path(args.run)
    tc = TrainConfig(base=str(run), data=args.data, lora_rank=8, lora_targets="all", grad_checkpoint=True,
                     block_size=args.seq, batch_size=args.batch, max_iters=100, eval_iters=1,
                     out=str(out / "run"), log_every=1)
    tr = Trainer(tc, MB.create(), log=lambda s: None)
    B, cfg = tr.B, tr.cfg
    p = tr.params()
    batch = tr._batch(0)
    x, y = mx.array(batch["x"]), mx.array(batch["y"])
    h = mx.random.normal((args.batch, args.seq, cfg.d_model)) * 0.02
    g = mx.random.normal((args.batch, args.seq, cfg.d_model))
    adapters = {k: v for k, v in p.items() if k.endswith((".lora_a", ".lora_b"))}
    frozen = {k: v for k, v in p.items() if k not in adapters}
    mask = B.from_numpy(L.causal_mask(args.seq, args.seq))
    _, rope = decoder._positions(B, cfg, p, slice(0, args.seq), take=False)
    mx.eval(p, h, g, mask, rope)
    print(f"state on the backend: {mx.get_active_memory() / MiB:,.0f} MiB (layers {cfg.n_layer}, batch "
          f"{args.batch} x {args.seq}, vocab {cfg.vocab_size:,})")

    def loss(a: dict) -> Any:
        return model.lm_loss_fn(B, cfg)({**frozen, **a}, {"x": x, "y": y}, {})

    def hidden_dot(a: dict) -> Any:
        return mx.sum(decoder.hidden(B, cfg, {**frozen, **a}, x)[0] * g)

    def block() -> Any:
        return decoder._block(B, cfg, p, 0, h, L.attend_all(B, cfg, mask, {}, None, None)[0], {}, rope[0])

    pieces: list[tuple[str, Callable[[], Any]]] = [
        ("embedding lookup (quantized rows)", lambda: L.embed(B, cfg, p, "wte", x)),
        ("one block, forward", block),
        ("tied head, forward (the logits)", lambda: L.tied_head(B, cfg, p, "wte", h)),
        ("gradient of CE(head(h)) for h", lambda: mx.grad(
            lambda h: B.cross_entropy(L.tied_head(B, cfg, p, "wte", h), y))(h)),
        ("every block, forward", lambda: decoder.hidden(B, cfg, p, x)[0]),
        ("every block, adapters' gradients", lambda: mx.grad(hidden_dot)(adapters)),
        ("the loss, value and adapters' gradients", lambda: mx.value_and_grad(loss)(adapters)),
        ("the same, compiled", lambda: mx.compile(mx.value_and_grad(loss))(adapters)),
    ]

    def peak(fn: Callable[[], Any]) -> float:
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        return (mx.get_peak_memory() - base) / MiB

    unbounded = mx.get_memory_limit()
    print("\n| piece | peak MiB, as MLX schedules | peak MiB, every op waiting |\n|---|---:|---:|")
    for name, fn in pieces:
        free = peak(fn)
        mx.set_memory_limit(1)
        least = peak(fn)
        mx.set_memory_limit(unbounded)
        print(f"| {name} | {free:,.0f} | {least:,.0f} |", flush=True)

    print("\n| trainer step (compiled) | peak MiB above the state | VmHWM MiB | s |\n|---|---:|---:|---:|")
    tr.train_step()  # compiles
    budget = MB.REMAT_TRANSIENT_BYTES
    for name, b in (("unbounded", 1 << 50), (f"bounded: state + {budget / MiB:,.0f} MiB", budget)):
        MB.REMAT_TRANSIENT_BYTES = b
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        Path("/proc/self/clear_refs").write_text("5")
        t = time.perf_counter()
        tr.train_step()
        dt = time.perf_counter() - t
        used = (mx.get_peak_memory() - base) / MiB
        print(f"| {name} | {used:,.0f} | {hwm_mib():,.0f} | {dt:.1f} |", flush=True)
    MB.REMAT_TRANSIENT_BYTES = budget


if __name__ == "__main__":
    main()
