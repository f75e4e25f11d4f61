"""Speed of twinlm's int8/int4 quantized matmul kernel (`K.quantized_matmul`, twinlm/backends/kernels)
against MLX's own `mx.quantized_matmul(..., transpose=True)` and the float32 `x @ W`, in one process.

    python -m benchmarks.qmatmul                       # GEMV (M = 1) and M = 256, 4- and 8-bit, group 64
    python -m benchmarks.qmatmul --rows 1 --bits 4     # one case; --shapes 576x1536,2048x8192 picks shapes

MLX's quantized matmul on an x86 CPU is scalar: at M = 256 one call takes seconds, so a warm-up call
longer than --slow seconds is its only sample (marked *).

Shapes (n_in x n_out) of the linear layers of SmolLM2-135M (576->1536, 1536->576), Qwen2.5-0.5B (896->4864)
and Llama-3.2-1B (2048->8192, 8192->2048), random weights quantized with mx.quantize. Each case runs the
three implementations interleaved (one call each per round, each call evaluated on its own as decoding
does) until --seconds have passed (at least --min-calls rounds) and reports the median per call, the
speed-up against MLX's quantized matmul and against float32, and the weight traffic in GB/s (packed
weights + scales + biases, or the float32 weight, over the median time). Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import numpy as np

SHAPES = ((576, 1536), (1536, 576), (896, 4864), (2048, 8192), (8192, 2048))
NAMES = {(576, 1536): "SmolLM2-135M up", (1536, 576): "SmolLM2-135M down", (896, 4864): "Qwen2.5-0.5B up",
         (2048, 8192): "Llama-3.2-1B up", (8192, 2048): "Llama-3.2-1B down"}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown"
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    extra = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni") if f in flags]
    return f"{model} ({', '.join(extra) or 'no AVX-512'})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.qmatmul", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,256", help="comma-separated M (rows of x)")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES), help="n_inxn_out,...")
    ap.add_argument("--seconds", type=float, default=0.4, help="time per case (all three implementations)")
    ap.add_argument("--min-calls", type=int, default=3)
    ap.add_argument("--slow", type=float, default=0.5, help="a warm-up call longer than this is the only one")
    ap.add_argument("--isa", default="auto", help="the kernel's GEMV loops: auto, avx512, avx2, portable")
    args = ap.parse_args(argv)

    from twinlm.backends import mlx_native

    blas = mlx_native.load_system_blas()  # before mlx.core, as twinlm does: the BLAS the kernels' sgemm uses
    import mlx.core as mx

    from twinlm.backends import kernels

    K = kernels.load()
    if K is None or not hasattr(K, "quantized_matmul"):
        print(f"error: kernels not active or without quantized_matmul: {kernels.status().reason}")
        return 1
    K._set_quant_isa(args.isa)
    print(f"cpu: {cpu_model()}; kernel threads {K.threads()}, GEMV loops {K.quant_isa()}; blas: {blas}; "
          f"mlx {mx.__version__}")
    rng = np.random.default_rng(0)
    g = args.group_size
    rows = [int(r) for r in args.rows.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    head = (f"{'shape':>24} {'bits':>4} {'M':>4} | {'twinlm ms':>9} {'mx.q ms':>9} {'fp32 ms':>9} | "
            f"{'vs mx.q':>7} {'vs fp32':>7} | {'GB/s tw':>7} {'mx.q':>6} {'fp32':>6} | {'GFLOP/s':>7}")
    print(head)
    print("-" * len(head))
    for n_in, n_out in shapes:
        w = mx.array((rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32))
        w_f32 = mx.contiguous(w.T)  # twinlm's (n_in, n_out) float weight
        mx.eval(w_f32)
        for bits in bits_list:
            q, s, b = mx.quantize(w, group_size=g, bits=bits)
            mx.eval(q, s, b)
            qbytes = q.nbytes + s.nbytes + b.nbytes
            for m in rows:
                x = mx.array(rng.standard_normal((m, n_in)).astype(np.float32))
                mx.eval(x)
                fns = {
                    "twinlm": lambda x=x, q=q, s=s, b=b, bits=bits: K.quantized_matmul(x, q, s, b, g, bits),
                    "mx.q": lambda x=x, q=q, s=s, b=b, bits=bits: mx.quantized_matmul(
                        x, q, s, b, transpose=True, group_size=g, bits=bits),
                    "fp32": lambda x=x, w_f32=w_f32: x @ w_f32,
                }
                times: dict[str, list[float]] = {k: [] for k in fns}
                slow = set()
                for name, f in fns.items():  # warm-up; a call over --slow seconds is timed once, by it
                    t0 = time.perf_counter()
                    mx.eval(f())
                    if time.perf_counter() - t0 > args.slow:
                        times[name].append(time.perf_counter() - t0)
                        slow.add(name)
                t_end = time.perf_counter() + args.seconds
                calls = 0
                while calls < args.min_calls or time.perf_counter() < t_end:
                    for name, f in fns.items():
                        if name in slow:
                            continue
                        t0 = time.perf_counter()
                        mx.eval(f())
                        times[name].append(time.perf_counter() - t0)
                    calls += 1
                med = {k: statistics.median(v) for k, v in times.items()}
                gbs = {k: (qbytes if k != "fp32" else w_f32.nbytes) / med[k] / 1e9 for k in med}
                label = f"{NAMES.get((n_in, n_out), '')} {n_in}x{n_out}"
                once = "*" if "mx.q" in slow else " "
                tw, mq, f32 = med["twinlm"], med["mx.q"], med["fp32"]
                # Weight traffic says something only where the weights dominate (a few rows of x).
                traffic = (f"{gbs['twinlm']:7.1f} {gbs['mx.q']:6.1f} {gbs['fp32']:6.1f}" if m <= 8
                           else f"{'-':>7} {'-':>6} {'-':>6}")
                print(f"{label:>24} {bits:>4} {m:>4} | {tw * 1e3:9.3f} {mq * 1e3:8.1f}{once} "
                      f"{f32 * 1e3:9.3f} | {mq / tw:6.2f}x {f32 / tw:6.2f}x"
                      f" | {traffic} | "
                      f"{2 * m * n_in * n_out / med['twinlm'] / 1e9:7.1f}", flush=True)
    print("* timed by one call (over --slow seconds). GB/s (M <= 8): weight bytes read per second (packed + "
          "scales + biases, or float32). GFLOP/s: 2 M n_in n_out per second, twinlm.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
