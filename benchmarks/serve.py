"""Serving throughput: `twinlm serve` (MLX and tinygrad) beside `mlx_lm.server` on the same model folder.

    pip install -e '.[serve,bench-serve]'                      # mlx-lm==0.32.2, openai, httpx
    python -m benchmarks.serve --small                          # seconds: proves the script runs
    python -m benchmarks.serve --out benchmarks/results/serve.json   # SmolLM2-135M shape; a quiet machine

The model is a Llama with SmolLM2-135M's shape (30 layers, 576 wide, 9 heads / 3 kv heads, vocab 49,152,
tied embeddings) and random weights, saved by transformers itself with a word-level tokenizer that has a
token for every id (random weights draw any id; every server must be able to decode it). Each server runs
in its own process on 127.0.0.1, one after the other (mlx_lm.server with the system OpenBLAS preloaded, its
best case on Linux, as MLX in twinlm loads it), and is measured with greedy requests over HTTP:

- single stream: one streamed completion of --tokens tokens; decode tokens/s = (tokens - 1) / (time of the
  last token - time of the first), so prefill and the first token are left out;
- aggregate: --clients streamed completions at once, --tokens each; tokens/s = all tokens / wall time.

Requests ask for exactly --tokens tokens; a server that stops early (an end-of-sequence token drawn by the
random weights) is counted by the tokens it streamed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, max_position_embeddings=2048)
SMALL = dict(SMOL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
PROMPT = "t1 t2 t3 t4 t5 t6 t7 t8"


def build_folder(out: Path, shape: dict[str, Any], arch: str = "llama", dtype: str = "float32") -> Path:
    """A random model of `shape` saved by transformers in `dtype`, with a word-level tokenizer
    ("t0".."t{V-1}"); arch "llama" (LlamaForCausalLM) or "qwen2" (Qwen2ForCausalLM: q/k/v biases)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    cfg = config_cls(**shape, bos_token_id=0, eos_token_id=1)
    model = model_cls(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t1",
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))
    return out


OPENBLAS_GLOBS = ("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3", "/usr/lib64/libopenblas*.so*",
                  "/usr/lib/*-linux-gnu/libopenblas.so.0")


def openblas() -> str | None:
    """The system OpenBLAS twinlm's MLX backend loads (the same search), for mlx-lm's LD_PRELOAD."""
    import glob

    for pattern in OPENBLAS_GLOBS:
        for path in sorted(glob.glob(pattern)):
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, folder: Path, port: int, context: int, slots: int) -> subprocess.Popen:
    env = {**os.environ, "DEV": os.environ.get("DEV", "CPU")}
    if kind == "mlx_lm" and openblas():  # mlx-lm's best case on Linux: the OpenBLAS twinlm's MLX loads
        env["LD_PRELOAD"] = openblas()
    if kind == "mlx_lm":
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port", str(port),
               "--log-level", "WARNING", "--decode-concurrency", str(slots)]
    else:
        backend = kind.split("-")[1]
        cmd = [sys.executable, "-m", "twinlm.cli.main", "serve", str(folder), "--port", str(port),
               "--backend", backend, "--slots", str(slots), "--context", str(context), "--model-id", "bench"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start in time")


def stream(url: str, model: str, tokens: int) -> tuple[int, float, float, float]:
    """(tokens streamed, start, first token time, last token time) of one greedy streamed completion."""
    import httpx

    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "stream": True}
    n, t0, first, last = 0, time.perf_counter(), 0.0, 0.0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices", [])):
                n += 1  # one chunk per token on both servers (text pieces may hold back, rarely)
                last = time.perf_counter()
                first = first or last
    return n, t0, first, last


def measure(kind: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(kind, folder, port, args.context, args.clients)
    try:
        wait_ready(proc, url, args.start_timeout)
        model = "bench" if kind != "mlx_lm" else str(folder)
        stream(url, model, 4)  # warm-up: compile / first-call costs are not what is measured
        n, _, first, last = stream(url, model, args.tokens)
        single = (n - 1) / (last - first) if n > 1 and last > first else 0.0
        results: list[tuple[int, float, float, float]] = []
        threads = [threading.Thread(target=lambda: results.append(stream(url, model, args.tokens)))
                   for _ in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        total = sum(r[0] for r in results)
        return {"server": kind, "single_stream_tok_s": round(single, 2), "single_tokens": n,
                "aggregate_tok_s": round(total / wall, 2), "aggregate_tokens": total, "clients": args.clients,
                "aggregate_wall_s": round(wall, 2)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true",
                   help="A 2-layer model and few tokens: proves the script runs.")
    p.add_argument("--servers", default="twinlm-mlx,mlx_lm,twinlm-tinygrad")
    p.add_argument("--tokens", type=int, default=None, help="Tokens per request (default 128; --small 16).")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--context", type=int, default=256, help="twinlm serve --context (prompt + answer).")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--model", default=None, help="An existing model folder instead of building one.")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="The built folder's dtype (each server runs a folder in its own dtype).")
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = p.parse_args()
    args.tokens = args.tokens or (16 if args.small else 128)
    with tempfile.TemporaryDirectory() as tmp:
        shape = SMALL if args.small else SMOL
        folder = Path(args.model) if args.model else build_folder(Path(tmp) / "model", shape,
                                                                          dtype=args.dtype)
        rows = []
        for kind in args.servers.split(","):
            try:
                rows.append(measure(kind, folder, args))
            except Exception as e:  # one server failing must not hide the others' numbers
                rows.append({"server": kind, "error": f"{type(e).__name__}: {e}"[:500]})
            print(json.dumps(rows[-1]), flush=True)
    record = {"machine": platform.processor() or platform.machine(), "cpu": _cpu(), "small": args.small,
              "dtype": args.dtype,
              "tokens": args.tokens, "clients": args.clients, "context": args.context, "results": rows,
              "load_average": os.getloadavg()}
    print(f"\n| server | single-stream decode tok/s | aggregate tok/s ({args.clients} clients) |")
    print("|---|---:|---:|")
    for r in rows:
        agg = r.get("aggregate_tok_s", r.get("error"))
        print(f"| {r['server']} | {r.get('single_stream_tok_s', '-')} | {agg} |")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
