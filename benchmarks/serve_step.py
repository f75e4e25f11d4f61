"""The serving engine's decode step without HTTP: `twinlm.engine.Engine` on a SmolLM2-135M-shaped Llama
(random weights from twinlm's own init; no transformers needed), one request alone and --rows at once.

    python -m benchmarks.serve_step --small                    # seconds: proves the script runs
    python -m benchmarks.serve_step --tokens 64                # the shape of `benchmarks.serve`'s run
    python -m benchmarks.serve_step --profile                  # + the batched step's parts, timed alone

What `benchmarks.serve` measures over HTTP, minus the server: --rows greedy requests (the same 8-token
prompt, --tokens new tokens each) submitted together; ms per engine step = the wall time of the batch /
the engine's step count, tokens/s = all new tokens / wall time. Single stream: one request, the decode
tokens/s from its first token to its last. Both run once untimed first (compiling each cache length).

--profile times one batched step (`decoder.decode_step` compiled, as the engine runs it) at --rows rows and
a cache of --cache-len slots, then its pieces over every layer, each evaluated alone (mx.eval, best of
--repeat): the linear layers, the tied head, attention as `decode_step` computes it (cache write, repeat_kv,
scores, softmax, values), the norms, SwiGLU and RoPE; ms per step; MLX only.

The script uses only the engine's public API, so the same file times another checkout of twinlm:
`PYTHONPATH=/path/to/other python -m benchmarks.serve_step` (an A/B of two trees on a shared machine:
interleave the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

SMOL = dict(arch="llama", pos_encoding="rope", norm="rmsnorm", activation="swiglu", vocab_size=49152,
            block_size=2048, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
            rope_theta=100000.0, tie_embeddings=True, bias=False, norm_eps=1e-5)
SMALL = dict(SMOL, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, block_size=256)
PROMPT = [3, 4, 5, 6, 7, 8, 9, 10]


def model(small: bool, dtype: str) -> tuple[Any, dict[str, np.ndarray]]:
    from twinlm.core.config import ModelConfig
    from twinlm.core.params import init_params

    cfg = ModelConfig(**(SMALL if small else SMOL))
    return cfg, init_params(cfg, 0)


def run_batch(engine: Any, rows: int, tokens: int) -> dict[str, float]:
    from twinlm.engine import Finish, Request

    reqs = [Request(list(PROMPT), tokens, temperature=0.0) for _ in range(rows)]
    steps0, t0 = engine.steps, time.perf_counter()
    times: list[list[float]] = [[] for _ in reqs]
    for r in reqs:
        engine.submit(r)
    outs: list[list[int]] = []
    for r, ts in zip(reqs, times, strict=True):  # each queue is drained after the fact: times of arrival
        got = []              # are not needed for the batch (wall time), only for the single stream below
        while not isinstance(item := r.tokens.get(timeout=600), Finish):
            got.append(item)
            ts.append(time.perf_counter())
        outs.append(got)
    wall = time.perf_counter() - t0
    steps = engine.steps - steps0
    n = sum(len(o) for o in outs)
    return {"tok_s": n / wall, "ms_per_step": 1000 * wall / max(steps, 1), "steps": steps, "tokens": n,
            "same_tokens": all(o == outs[0] for o in outs)}


def single(engine: Any, tokens: int) -> float:
    from twinlm.engine import Finish, Request

    r = Request(list(PROMPT), tokens, temperature=0.0)
    engine.submit(r)
    ts = []
    while not isinstance(r.tokens.get(timeout=600), Finish):
        ts.append(time.perf_counter())
    return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 else 0.0


def profile(B: Any, cfg: Any, params: dict[str, np.ndarray], rows: int, cache_len: int,
            repeat: int) -> dict[str, float]:
    """ms per decode step of each piece of one batched step (MLX), each over every layer (each layer's own
    weights and cache, so the weights stream from memory as in the real step), evaluated alone."""
    import mlx.core as mx

    from twinlm.core import layers as L
    from twinlm.core import model as M
    from twinlm.core.models import decoder as D

    p = {k: B.from_numpy(v) for k, v in params.items()}
    rng = np.random.default_rng(0)
    n, C, H, Hkv, hs, F = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff

    def arr(*shape: int) -> Any:
        return B.from_numpy(rng.standard_normal(shape).astype(np.float32))

    x, h = arr(rows, 1, C), arr(rows, 1, F)
    q, kn = arr(rows, H, 1, hs), arr(rows, Hkv, 1, hs)
    cache = [(arr(rows, Hkv, cache_len, hs), arr(rows, Hkv, cache_len, hs)) for _ in range(n)]
    pos = B.from_numpy(np.full((rows, 1), cache_len // 2, np.int32))
    write, attn = D.decode_masks(B, pos, cache_len)
    m4 = B.reshape(attn, (rows, 1, 1, cache_len))
    rep = H // Hkv
    cfg_len = cfg.replace(block_size=cache_len)
    cos, sin = (B.from_numpy(t[:rows].reshape(rows, 1, 1, -1))
                for t in L.rope_tables(cache_len, cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling))
    mx.eval(x, h, q, kn, pos, write, m4, cos, sin, *p.values(), *(t for kv in cache for t in kv))

    def best(fn: Any) -> float:
        mx.eval(fn())
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            mx.eval(fn())
            ts.append(time.perf_counter() - t)
        return 1000 * min(ts)

    def linears() -> list:
        return [L.linear(B, cfg, p, f"blocks.{i}.{name}", h if name == "mlp.proj" else x)
                for i in range(n) for name in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]

    def writes() -> list:
        return [B.where(write, kn, c) for kv in cache for c in kv]

    grouped = hasattr(B, "grouped_attention")  # this tree reads k, v unrepeated (else: repeat_kv, as before)

    def attention() -> list:  # decoder.decode_step's attend(), every layer (its cache write included)
        out = []
        for kc, vc in cache:
            k, v = B.where(write, kn, kc), B.where(write, kn, vc)
            kr, vr = (k, v) if grouped else (B.repeat_kv(k, rep), B.repeat_kv(v, rep))
            out += [L.attention(B, cfg, q, kr, vr, m4), k, v]
        return out

    step = mx.compile(lambda p, idx, pos, *flat: M.decode_step(
        B, cfg_len, p, idx, pos, *D.decode_masks(B, pos, cache_len),
        [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]))
    idx = B.from_numpy(np.full((rows, 1), 5, np.int32))
    flat = [t for kv in cache for t in kv]
    out = {
        "whole step (decoder.decode_step, compiled)": best(lambda: step(p, idx, pos, *flat)),
        "linear layers (4 per block)": best(linears),
        "tied head": best(lambda: L.tied_head(B, cfg, p, "wte", x)),
        "attention (cache write, [repeat_kv,] softmax(q k^T) v)": best(attention),
        "  cache write alone (where, k and v)": best(writes),
        "  repeat_kv alone (k and v; this tree calls it: %s)" % (not grouped):
            best(lambda: [B.repeat_kv(c, rep) for kv in cache for c in kv]),
        "norms, SwiGLU, RoPE": best(lambda: [
            t for i in range(n) for t in (B.rms_norm(x, p[f"blocks.{i}.ln_1.weight"]),
                                          B.add_rms_norm(x, x, p[f"blocks.{i}.ln_2.weight"])[1],
                                          B.swiglu(h, h), B.rope(q, cos, sin), B.rope(kn, cos, sin))]),
    }
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="A 2-layer model: proves the script runs.")
    p.add_argument("--backend", default="mlx")
    p.add_argument("--rows", type=int, default=8, help="Requests decoded together (the engine's slots).")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=256, help="The engine's context (twinlm serve --context).")
    p.add_argument("--dtype", default=None, help="Hold the weights in this dtype (default: float32).")
    p.add_argument("--rounds", type=int, default=1, help="Timed batches (the best is reported).")
    p.add_argument("--profile", action="store_true", help="Also time the batched step's parts (MLX).")
    p.add_argument("--cache-len", type=int, default=128, help="The cache length --profile times.")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    import twinlm
    from twinlm.backends import get_backend
    from twinlm.cli.common import leave_after_engine
    from twinlm.engine import Engine

    B = get_backend(args.backend)
    cfg, params = model(args.small, args.dtype or "float32")
    engine = Engine(B, cfg, params, slots=args.rows, context=args.context, dtype=args.dtype)
    try:
        run_batch(engine, args.rows, args.tokens)  # warm-up: every cache length compiled
        batch = max((run_batch(engine, args.rows, args.tokens) for _ in range(args.rounds)),
                    key=lambda r: r["tok_s"])
        one = max(single(engine, args.tokens) for _ in range(args.rounds))
    finally:
        engine.close()
    rec: dict[str, Any] = {"tree": os.path.dirname(os.path.dirname(twinlm.__file__)), "backend": B.name,
                           "rows": args.rows, "tokens": args.tokens, "single_tok_s": round(one, 2),
                           "batch_tok_s": round(batch["tok_s"], 2),
                           "batch_ms_per_step": round(batch["ms_per_step"], 2),
                           "batch_over_single": round(batch["tok_s"] / one, 2) if one else None,
                           "same_tokens": batch["same_tokens"], "load": os.getloadavg()[0]}
    if args.profile and B.name == "mlx":
        rec["profile_ms"] = profile(B, cfg, params, args.rows, args.cache_len, args.repeat)
    print(json.dumps(rec, indent=1), flush=True)
    leave_after_engine()  # MLX used from the engine's thread can abort at interpreter exit (its docstring)


if __name__ == "__main__":
    main()
