"""Start-up and memory of importing and sampling a Hugging Face model (issues #19 and #21).

    python -m benchmarks.memory --shape long --positions 32768   # time to first token, 32K context
    python -m benchmarks.memory --shape smollm2-135m --dtype float32,bfloat16  # peak RSS / weights

For each shape a random model is built with transformers (the real config's fields, random weights) and
saved as a Hugging Face folder; then each command runs in its own process, timed by the wall clock, its
peak RSS read from the kernel (`os.wait4`):
- `twinlm import-hf FOLDER --out RUN`: peak RSS / the safetensors file's size;
- `twinlm sample RUN -n 1 --backend B` per backend: the run's start-up to its first token (imports,
  loading, compiling or loading the decode graph, prefill) and its peak RSS / the float32 weights' size.
`--twinlm DIR` runs another checkout's twinlm (e.g. a worktree of the commit before a change) on the
same folders. Needs the [hf] extra (transformers, torch) to build the folders. Prints one table.

`--folder DIR` measures an existing folder instead (read only; its imported run is deleted afterwards), e.g.
a 4.9 GB float32 Llama-3.2-1B-shaped one; `--load` adds `twinlm.load(FOLDER)` and `twinlm.load(RUN)` per
backend (the Python API: a folder's weights converted in memory, a run's read through its memory map).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each shape: the transformers class and the real config.json's fields (sizes of SmolLM2-135M and
# Qwen2.5-0.5B; "long" is Llama-3.2-1B's fields at a tiny width, its context set by --positions).
SHAPES: dict[str, tuple[str, dict]] = {
    "long": ("LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=300, rms_norm_eps=1e-05, rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3"))),
    "tiny": ("LlamaForCausalLM", dict(  # seconds: proves a benchmark runs
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-05,
        rope_theta=10000.0, tie_word_embeddings=True)),
    "smollm2-135m": ("LlamaForCausalLM", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-05,
        rope_theta=100000.0, tie_word_embeddings=True)),
    # 4.9 GB in float32: issue #21's shape (not run on the shared 2-core machine)
    "llama3.2-1b": ("LlamaForCausalLM", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-05, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3"))),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-06,
        rope_theta=1000000.0, tie_word_embeddings=True, sliding_window=32768, use_sliding_window=False)),
}


def build(shape: str, folder: Path, dtype: str, positions: int) -> Path:
    """Save a random `shape` model in `dtype` with a small byte-level tokenizer (nothing downloaded)."""
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT))
    from tests.hf_models import byte_bpe

    torch.manual_seed(0)
    architecture, fields = SHAPES[shape]
    if shape == "long":
        rope = {**fields["rope_scaling"], "original_max_position_embeddings": min(8192, positions // 2)}
        fields = {**fields, "max_position_embeddings": positions, "rope_scaling": rope}
    cfg = getattr(tf, architecture.replace("ForCausalLM", "Config"))(**fields, bos_token_id=0, eos_token_id=1)
    model = getattr(tf, architecture)(cfg).to(getattr(torch, dtype)).eval()
    model.save_pretrained(folder)
    lib = byte_bpe()
    # every id the model can sample must decode: fill the vocabulary with plain added tokens
    lib.add_tokens([f"<x{i}>" for i in range(cfg.vocab_size - lib.get_vocab_size())])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=lib, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return folder


_LOAD = "import sys, twinlm; print(twinlm.load(sys.argv[1], backend=sys.argv[2]))"


def run(cmd: list[str], twinlm_root: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one twinlm command in its own process (["load", PATH,
    BACKEND]: `twinlm.load`). Linux carries a process's peak RSS across fork and exec, so the parent must
    stay small (it never imports torch)."""
    env = {**os.environ, "PYTHONPATH": str(twinlm_root), "DEV": os.environ.get("DEV", "CPU")}
    argv = ["-c", _LOAD, *cmd[1:]] if cmd[0] == "load" else ["-m", "twinlm.cli.main", *cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *argv], env=env, cwd=twinlm_root,
                                stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its own peak RSS is ours to read
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(), err.read().decode()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{errors[-2000:]}")
    return wall, usage.ru_maxrss * 1024, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="long", choices=sorted(SHAPES))
    ap.add_argument("--positions", type=int, default=32768, help="max_position_embeddings of --shape long")
    ap.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--backend", default="mlx,tinygrad")
    ap.add_argument("--twinlm", type=Path, default=ROOT, help="the checkout whose twinlm runs")
    ap.add_argument("--work", type=Path, default=None, help="where the folders go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--folder", type=Path, default=None,
                    help="measure this existing folder (read only) instead of building --shape")
    ap.add_argument("--load", action="store_true", help="also twinlm.load of the folder and of the run")
    ap.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)  # the child that builds
    args = ap.parse_args()
    if args.build:
        build(args.shape, args.build, args.dtype, args.positions)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="twinlm-memory-"))
    rows = []
    for dtype in ["folder"] if args.folder else args.dtype.split(","):
        folder = args.folder or work / f"{args.shape}-{dtype}"
        if not (folder / "config.json").exists():  # in a child: the parent stays small (see `run`)
            subprocess.run([sys.executable, "-m", "benchmarks.memory", "--shape", args.shape, "--positions",
                            str(args.positions), "--build", str(folder), "--dtype", dtype], check=True,
                           cwd=ROOT)
        file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        out = work / f"run-{folder.name if args.folder else args.shape}-{dtype}-{os.getpid()}"
        wall, rss, _ = run(["import-hf", str(folder), "--out", str(out)], args.twinlm)
        rows.append(dict(command="import-hf", dtype=dtype, wall_s=wall, peak_rss=rss, ref_bytes=file_bytes))
        state = next(out.glob("ckpt-*/state.safetensors"))
        weights = state.stat().st_size  # float32 after import
        for backend in args.backend.split(","):
            wall, rss, _ = run(["sample", str(out), "-n", "1", "--prompt", "the cat", "--backend", backend],
                               args.twinlm)
            rows.append(dict(command=f"sample -n 1 --backend {backend}", dtype=dtype, wall_s=wall,
                             peak_rss=rss, ref_bytes=weights))
            for what, path in (("folder", folder), ("run", out)) if args.load else ():
                wall, rss, _ = run(["load", str(path), backend], args.twinlm)
                rows.append(dict(command=f"twinlm.load({what}) {backend}", dtype=dtype, wall_s=wall,
                                 peak_rss=rss, ref_bytes=weights))
        if args.folder:  # (a real folder's run is as large as its weights)
            shutil.rmtree(out)
    what = f"folder {args.folder}" if args.folder else f"shape {args.shape}" + (
        f", {args.positions} positions" if args.shape == "long" else "")
    print(f"{what}, twinlm from {args.twinlm}")
    print(f"{'command':32} {'dtype':9} {'wall s':>7} {'peak RSS MB':>12} {'file/weights MB':>16} "
          f"{'ratio':>6}")
    for r in rows:
        print(f"{r['command']:32} {r['dtype']:9} {r['wall_s']:7.1f} {r['peak_rss'] / 2**20:12.0f} "
              f"{r['ref_bytes'] / 2**20:16.0f} {r['peak_rss'] / r['ref_bytes']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
