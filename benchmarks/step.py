"""Time the real training step per backend, side by side with the PyTorch eager reference.

    python -m benchmarks.step --backend all --preset baby --out results/baby.json
    python -m benchmarks.step --backend torch,mlx,tinygrad --preset baby --ranks 1,2
    python -m benchmarks.step --compare results/baby.json results/medium.json
    python -m benchmarks.step --backend torch,mlx --preset gpt2 --lora-rank 8      # GPT-2 124M, LoRA

`--backend all` runs torch, mlx and tinygrad one after another, each in its own child process (so
peak RSS and imports are per backend) against one GEMM peak measured in the same run, then prints a
table whose `vs torch` column is the tokens/s ratio from that same run.

`--ranks 1,2` adds the data-parallel dimension: MLX runs N rank processes on mx.distributed (each with
cores // N BLAS threads, as `twinlm train --ranks N`), tinygrad N devices in one process; torch runs once
(its own threads use every core). The batch is the global batch, split over the ranks; `scaling` is
tokens/s over N x the same backend's 1-rank tokens/s from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import flops, report
from twinlm.core.errors import TwinlmError

BACKENDS = ("torch", "mlx", "tinygrad")
EXTRA_BACKENDS = ("mlx-ops",)  # MLX with twinlm's CPU kernels off (TWINLM_KERNELS=0)
BATCH = {"tiny": 4, "small": 8, "baby": 12, "medium": 64, "gpt2": 4}  # nanoGPT's for the first four
VOCAB = 65  # Tiny Shakespeare's character set
# Benchmark-only shapes: GPT-2 124M (its 50257-token vocabulary and tanh GELU) at block 256.
SHAPES = {"gpt2": dict(n_layer=12, n_head=12, d_model=768, block_size=256, vocab_size=50257,
                       activation="gelu_tanh")}


def bench_config(preset: str, lora_rank: int = 0) -> Any:
    """The model a benchmark row trains: a preset (or a SHAPES entry), optionally with LoRA adapters."""
    from twinlm.core.config import ModelConfig
    from twinlm.core.config import preset as make_preset

    cfg = ModelConfig(**SHAPES[preset]) if preset in SHAPES else make_preset(preset, vocab_size=VOCAB)
    return cfg.replace(lora_rank=lora_rank) if lora_rank else cfg
ENV_KEYS = ("BEAM", "DEV", "NUM_CPU_THREADS", "JIT", "CACHEDB", "OMP_", "OPENBLAS_", "MKL_", "TWINLM_",
            "MLX_")


def bench_one(backend: str, preset: str, batch: int, iters: int, warmup_iters: int, max_seconds: float,
              seed: int = 0, lora_rank: int = 0, ranks: int = 1, beam: int = 0,
              window: int = 0) -> dict[str, Any]:
    """Warm up (compile), then time `iters` steps (fewer if `max_seconds` runs out, at least 3) on windows
    of `window` positions (0: the model's block size), as `twinlm train --block-size` fine-tunes a
    long-context model: tokens/s and FLOPs count those positions, not the model's context."""
    import numpy as np

    from benchmarks.runner import make_trainer
    from twinlm.core.optim import AdamWConfig

    cfg = bench_config(preset, lora_rank)
    window = window or cfg.block_size
    if not 1 < window <= cfg.block_size:
        raise TwinlmError(f"--window {window}: the model reads 2 to {cfg.block_size} tokens")
    opt = AdamWConfig()
    if beam and backend == "tinygrad":  # the search happens during warm-up, reported there
        from twinlm.backends import tinygrad_beam

        tinygrad_beam.enable(beam)
    rng = np.random.default_rng(seed)
    batches = [rng.integers(0, cfg.vocab_size, (2, batch, window)).astype(np.int32) for _ in range(4)]

    t0 = time.perf_counter()
    # MLX ranks are processes (this is one of them); tinygrad's are devices of this process.
    trainer = make_trainer(backend, cfg, opt, seed, devices=ranks if backend == "tinygrad" else 1)
    setup_s = time.perf_counter() - t0
    losses, warm = [], []
    for it in range(warmup_iters):
        t = time.perf_counter()
        losses.append(trainer.step(*batches[it % 4], it))
        warm.append(time.perf_counter() - t)
    times: list[float] = []
    cpu: list[float] = []  # process CPU time (all threads): steadier than wall time on a shared machine
    t_start = time.perf_counter()
    for it in range(warmup_iters, warmup_iters + iters):
        t, c = time.perf_counter(), time.process_time()
        losses.append(trainer.step(*batches[it % 4], it))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if len(times) >= 3 and time.perf_counter() - t_start > max_seconds:
            break
    ms = report.summarize(times)
    tokens = batch * window
    return {
        "backend": backend, "preset": preset + (f"+lora{lora_rank}" if lora_rank else ""),
        "config": cfg.to_dict(), "batch": batch, "window": window, "ranks": ranks,
        "all_reduce": getattr(getattr(trainer, "B", None), "all_reduce", "") or None,  # MLX ranks: shm, ring
        "beam": beam if backend == "tinygrad" else 0,
        "tokens_per_iter": tokens, "setup_s": setup_s, "warmup_s": sum(warm), "warmup_iters_s": warm,
        "ms_per_iter": ms, "cpu_ms_per_iter": report.summarize(cpu),
        "tokens_per_s": tokens / (ms["median"] / 1e3),
        "flops_per_token": flops.train_flops_per_token(cfg, window),
        "peak_rss_mb": report.peak_rss_mb(),
        "loss_first": losses[0], "loss_last": losses[-1], "backend_info": trainer.info,
        **device_measurements(trainer),
    }


def device_measurements(trainer: Any) -> dict[str, Any]:
    """Off the host CPU, the device's own fp32 GEMM peak (MFU is against it, not numpy's CPU peak) and
    its peak memory where the framework tells (MLX); on the CPU, nothing (the numpy peak applies)."""
    B = getattr(trainer, "B", None)
    if B is None or str(B.device_info().get("device", "cpu")).lower().startswith("cpu"):
        return {}
    out: dict[str, Any] = {"device_gemm": device_gemm_peak(B)}
    if B.name == "mlx":
        import mlx.core as mx

        out["device_peak_memory_mb"] = mx.get_peak_memory() / 2**20
    return out


def wait(B: Any) -> None:
    """Until the device has finished: tinygrad's realize only queues work on GPU and OpenCL devices."""
    if B.name == "tinygrad":
        from tinygrad import Device

        Device[B.device].synchronize()


def device_gemm_peak(B: Any, n: int = 4096, repeats: int = 3) -> dict[str, Any]:
    """Best of `repeats` (n, n) @ (n, n) float32 matmuls on the backend's device, in FLOP/s."""
    import numpy as np

    rng = np.random.default_rng(0)
    b = B.from_numpy(rng.standard_normal((n, n), dtype=np.float32))
    best = float("inf")
    for i in range(repeats + 1):  # the first: warm-up (and, on tinygrad, the kernel's compile)
        # A fresh input each time, on the device before the clock starts: tinygrad dedupes an identical
        # graph and would hand back the realised result of the previous `a @ b` without computing it.
        a = B.from_numpy(rng.standard_normal((n, n), dtype=np.float32))
        B.sync(a)
        t = time.perf_counter()
        B.sync(a @ b)
        wait(B)
        if i:
            best = min(best, time.perf_counter() - t)
    return {"flops": 2.0 * n ** 3 / best, "n": n, "seconds": best, "device": B.device_info()["device"]}


def measure_gemm_peak(env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.gemm"], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout)


def finish(record: dict[str, Any], gemm: dict[str, Any]) -> dict[str, Any]:
    gemm = record.get("device_gemm") or gemm  # measured on the device under test where it is not the CPU
    record["gemm_peak_gflops"] = gemm["flops"] / 1e9
    record["gemm"] = gemm
    record["mfu"] = flops.mfu(record["flops_per_token"], record["tokens_per_s"], gemm["flops"])
    record["hardware"] = report.hardware()
    record["versions"] = report.versions()
    record["env"] = {k: v for k, v in os.environ.items() if k.startswith(ENV_KEYS)}
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment for children: with `threads`, every backend's pools (OpenMP for torch, OpenBLAS
    for MLX and numpy, tinygrad's CPU workers) get the same count."""
    env = dict(os.environ)
    if threads:
        for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUM_CPU_THREADS"):
            env[key] = str(threads)
    return env


def run(backends: list[str], preset: str, batch: int | None, iters: int, warmup_iters: int,
        max_seconds: float, threads: int | None = None, log=print,
        lora_rank: int = 0, ranks: tuple[int, ...] = (1,), beam: int = 0,
        window: int = 0) -> list[dict[str, Any]]:
    """Each backend in a child process, then one GEMM peak measured in the same run for all of them."""
    bench_config(preset, lora_rank)  # an unknown preset fails here, with the list of known ones
    batch = batch or BATCH.get(preset, 12)
    env = thread_env(threads)
    records = []
    for name, n in ((b, n) for b in backends for n in (ranks if b != "torch" else (1,))):
        label = f"{name} x{n}" if n > 1 else name
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            args = ["--child", tmp.name, "--backend", name, "--preset", preset, "--batch", str(batch),
                    "--iters", str(iters), "--warmup-iters", str(warmup_iters),
                    "--max-seconds", str(max_seconds), "--lora-rank", str(lora_rank), "--ranks", str(n),
                    "--beam", str(beam), "--window", str(window)]
            log(f"[{label}] {preset} batch {batch}" + (f" x window {window}" if window else "") + " ...")
            if name in ("mlx", "mlx-ops") and n > 1:
                code, err = _launch_ranks(n, args, env), ""
            else:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.step", *args], text=True,
                                      capture_output=True, env=env)
                code, err = proc.returncode, proc.stderr
            if code != 0 or not Path(tmp.name).stat().st_size:
                log(f"[{label}] failed:\n{err[-2000:]}")
                continue
            records.append(json.loads(Path(tmp.name).read_text()))
            r = records[-1]
            log(f"[{label}] {r['ms_per_iter']['median']:.1f} ms/iter, warm-up {r['warmup_s']:.1f} s, "
                f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    if not records:
        raise TwinlmError("every backend failed; see the messages above")
    gemm = measure_gemm_peak(env)
    log(f"GEMM peak {gemm['flops'] / 1e9:.1f} GFLOP/s ({gemm['blas']}, {gemm['n']}^2 fp32)")
    return [finish(r, gemm) for r in records]


def _launch_ranks(n: int, args: list[str], env: dict[str, str]) -> int:
    """MLX ranks as `twinlm train --ranks N` starts them (BLAS threads = cores // N); rank 0 writes the
    record."""
    from twinlm.trainer import distributed as D

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return D.launch(n, args, module="benchmarks.step")
    except D.RankFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="all",
                    help="mlx | mlx-ops (kernels off) | tinygrad | torch | all | comma-separated list")
    ap.add_argument("--preset", default="baby", help="a model preset, or gpt2 (GPT-2 124M at block 256)")
    ap.add_argument("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters on frozen weights")
    ap.add_argument("--batch", type=int, default=None, help="default: nanoGPT's batch for the preset")
    ap.add_argument("--iters", type=int, default=30, help="timed iterations (after warm-up)")
    ap.add_argument("--warmup-iters", type=int, default=3, help="untimed first steps (compile, JIT capture)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop timing after this (>= 3 iters)")
    ap.add_argument("--threads", type=int, default=None,
                    help="same thread count for every backend (default: each library's own)")
    ap.add_argument("--ranks", default="1",
                    help="data-parallel ranks to time, comma-separated (e.g. 1,2): MLX processes, tinygrad "
                         "devices")
    ap.add_argument("--beam", type=int, default=0,
                    help="tinygrad: BEAM search width, time-bounded per kernel (twinlm train --beam); its "
                         "cost shows in warm-up; run twice to see the cached warm-up")
    ap.add_argument("--window", type=int, default=0,
                    help="positions per example (default: the model's block size): a fine-tune's training "
                         "window, shorter than the context; tokens/s and MFU count these positions")
    ap.add_argument("--out", default=None, help="write the records to this JSON file")
    ap.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                    help="print a table of saved records")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.compare:
        print(report.table(report.load(args.compare)))
        return
    ranks = tuple(int(n) for n in args.ranks.split(","))
    if args.child:
        record = bench_one(args.backend, args.preset, args.batch, args.iters, args.warmup_iters,
                           args.max_seconds, lora_rank=args.lora_rank, ranks=ranks[0], beam=args.beam,
                           window=args.window)
        if os.environ.get("MLX_RANK", "0") == "0":  # rank 0 alone reports
            report.save(record, args.child)
        return
    backends = list(BACKENDS) if args.backend == "all" else args.backend.split(",")
    unknown = [b for b in backends if b not in BACKENDS + EXTRA_BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS + EXTRA_BACKENDS)} or all")
    records = run(backends, args.preset, args.batch, args.iters, args.warmup_iters, args.max_seconds,
                  args.threads, log=lambda m: print(m, file=sys.stderr, flush=True),
                  lora_rank=args.lora_rank, ranks=ranks, beam=args.beam, window=args.window)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report.save(records, args.out)  # type: ignore[arg-type]
    print(report.table(records))


if __name__ == "__main__":
    try:
        main()
    except TwinlmError as e:
        sys.exit(f"error: {e}")
