"""Fine-tuning speed at a real size (issue #19): twinlm beside mlx-lm 0.32.2 on the same folder and data.

    pip install -e '.[hf,bench-serve]'                     # transformers + torch (folders), mlx-lm==0.32.2
    python -m benchmarks.finetune --small                  # seconds: proves the script runs
    python -m benchmarks.finetune --out benchmarks/results/finetune.json             # a quiet machine
    python -m benchmarks.finetune --tinygrad --out benchmarks/results/finetune.json  # + tinygrad (slow)

Cases (--cases picks; the default is the first two):
- `qwen-lora`: LoRA rank 8 (alpha 16, scale 2, no dropout) on every linear layer of every block
  (q/k/v/o, gate/up/down) of a Qwen2.5-0.5B-shaped Qwen2ForCausalLM (24 layers, 896 wide, 14 heads / 2 kv
  heads, 4,864 MLP, vocab 151,936, tied embeddings, q/k/v biases);
- `smol-full`: full fine-tuning (every weight, embeddings included) of a SmolLM2-135M-shaped Llama;
- issue #21's rows, `{smol,qwen,llama1b}-{lora32,lora-bf16,qlora,qlora-gc}`: LoRA rank 8 on every linear
  layer of a SmolLM2-135M, Qwen2.5-0.5B or Llama-3.2-1B shape, in float32; in bfloat16 (a bfloat16 folder,
  twinlm `--dtype bfloat16`, mlx-lm trains in the checkpoint's dtype); over a 4-bit group-64 base (twinlm
  `quantize --bits 4 --group-size 64`, mlx-lm `convert -q --q-bits 4 --q-group-size 64`: QLoRA); and QLoRA
  with gradient checkpointing (twinlm `--grad-checkpoint`, mlx-lm's `grad_checkpoint`).

Both are random weights saved by transformers with a word-level tokenizer (benchmarks.serve.build_folder),
one folder per case shared by every tool. The training data is one generated folder with train.jsonl and
valid.jsonl of {"text": ...} rows: each row is seq-1 random words, so mlx-lm (which appends EOS and pads to
one plus a multiple of 32) trains on exactly batch x seq positions per step, as twinlm does with
--block-size seq.

Each tool runs in its own subprocess, one after the other, on the same folder and data:
- `twinlm-mlx` (and `twinlm-tinygrad` with --tinygrad): `twinlm import-hf` once, then `twinlm train
  --init-from RUN --data DATA/train.jsonl [--lora-rank 8 --lora-targets all] --block-size seq --batch-size
  batch --log-every 1`; per-step times are read from the run's metrics.jsonl ("time" of each step);
- `mlx-lm` (system OpenBLAS preloaded with LD_PRELOAD: the library twinlm's MLX backend loads; mlx-lm's
  best case on Linux) and `mlx-lm-installed` (as installed: MLX's bundled reference BLAS): mlx-lm's own
  training loop (`mlx_lm.tuner.trainer.train`, what `mlx_lm lora` runs) through its Python API, a report
  every step, the time of each step taken in its report callback. For LoRA the adapters are mlx-lm's
  defaults (every Linear of every block); for full fine-tuning the whole model is unfrozen, because
  `mlx_lm lora --fine-tune-type full` leaves the embeddings and final norm frozen and would train fewer
  weights than twinlm. AdamW (weight decay 0.1, as twinlm) with a constant learning rate; no validation.

Steady-state tokens/s, the same way for every tool: batch x seq x N / (time after step W+N - time after
step W), where W = --warmup steps (compilation, first-call costs) and N = --steps; both tools read the loss
back to the host every step, so each step's time is taken after the step finished. Tokens are positions
trained (batch x seq), the same count for every tool. Peak RSS is each subprocess's own VmHWM.
Timings on a shared machine move; the ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.serve import SMALL as SMALL_LLAMA
from benchmarks.serve import SMOL, build_folder, openblas

QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=True, max_position_embeddings=32768)
SMALL_QWEN = dict(QWEN05, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
LLAMA1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, max_position_embeddings=131072,
               rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                 original_max_position_embeddings=8192, rope_type="llama3"))


@dataclass(frozen=True)
class Case:
    """arch, real shape, small shape; LoRA rank (None: full fine-tuning); the weights' precision (float32,
    bfloat16: the folder's dtype, trained in it; q4: 4-bit group-64 base, QLoRA); gradient checkpointing."""
    arch: str
    real: dict[str, Any]
    small: dict[str, Any]
    lora: int | None
    precision: str = "float32"
    grad_checkpoint: bool = False

    def key(self, small: bool) -> str:
        """The name of the folder this case shares with the other cases of its shape and dtype."""
        shape = self.small if small else self.real
        dtype = "bfloat16" if self.precision == "bfloat16" else "float32"
        return f"{'small' if small else 'real'}-{self.arch}-{shape['hidden_size']}-{dtype}"


CASES: dict[str, Case] = {
    "qwen-lora": Case("qwen2", QWEN05, SMALL_QWEN, 8),
    "smol-full": Case("llama", SMOL, SMALL_LLAMA, None),
    # issue #21's rows: LoRA in float32 and bfloat16, QLoRA 4-bit without and with gradient checkpointing
    **{f"{name}-{kind}": Case(arch, real, small, 8, precision, gc)
       for name, arch, real, small in (("smol", "llama", SMOL, SMALL_LLAMA),
                                       ("qwen", "qwen2", QWEN05, SMALL_QWEN),
                                       ("llama1b", "llama", LLAMA1B, SMALL_LLAMA))
       for kind, precision, gc in (("lora32", "float32", False), ("lora-bf16", "bfloat16", False),
                                   ("qlora", "q4", False), ("qlora-gc", "q4", True))},
}
GROUP = 64  # quantization group size, both tools
ROOT = Path(__file__).resolve().parent.parent


def write_data(out: Path, vocab: int, seq: int, rows: int, seed: int = 0) -> Path:
    """train.jsonl / valid.jsonl of {"text": seq-1 random words}, one token each for every tool: ids whose
    word starts "t0" or "t1" are left out, because transformers matches its special tokens ("t0" BOS, "t1"
    EOS) inside words, so mlx-lm would read "t16970" as "t1" + an unknown token."""
    rng = random.Random(seed)
    ids = [i for i in range(2, vocab) if str(i)[0] not in "01"]
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", rows), ("valid", max(8, rows // 8))):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                words = " ".join(f"t{rng.choice(ids)}" for _ in range(seq - 1))
                f.write(json.dumps({"text": words}) + "\n")
    return out


def run_child(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, float, float]:
    """(exit code, wall s, peak RSS MB) of one subprocess; its output goes to `log`. Peak RSS is the child's
    VmHWM, polled every 20 ms (os.wait4's ru_maxrss would count the parent's pages at fork: torch, here)."""
    t0 = time.perf_counter()
    hwm = 0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                return -9, time.perf_counter() - t0, hwm / 1024
            time.sleep(0.02)
    return proc.returncode, time.perf_counter() - t0, hwm / 1024  # VmHWM is in KiB


def child_env(preload: str | None = None) -> dict[str, str]:
    env = {**os.environ, "DEV": os.environ.get("DEV", "CPU"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    return env


def steady(times: dict[int, float], warmup: int, steps: int, tokens_per_step: int) -> dict[str, Any]:
    """tokens/s between the end of step `warmup` and the end of step `warmup + steps`."""
    a, b = times.get(warmup), times.get(warmup + steps)
    if a is None or b is None or b <= a:
        raise RuntimeError(f"step times missing: have steps {sorted(times)[:3]}..{sorted(times)[-3:]}")
    return {"tok_s": round(tokens_per_step * steps / (b - a), 1), "step_ms": round(1000 * (b - a) / steps, 1),
            "warmup_s": round(a, 2)}


def measure_twinlm(backend: str, run: Path, data: Path, case: Case, args: argparse.Namespace,
                   work: Path) -> dict[str, Any]:
    out = work / f"{args.case}-twinlm-{backend}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resumed one
    total = args.warmup + args.steps
    cmd = [sys.executable, "-m", "twinlm.cli.main", "train", "--backend", backend, "--init-from", str(run),
           "--data", str(data / "train.jsonl"), "--block-size", str(args.seq),
           "--batch-size", str(args.batch),
           "--max-iters", str(total), "--log-every", "1", "--eval-every", str(total), "--eval-iters", "1",
           "--lr", "1e-4", "--warmup", "0", "--out", str(out)]
    if case.lora:
        cmd += ["--lora-rank", str(case.lora), "--lora-targets", "all"]
    if case.precision == "bfloat16":
        cmd += ["--dtype", "bfloat16"]
    if case.grad_checkpoint:
        cmd += ["--grad-checkpoint"]
    rc, wall, rss = run_child(cmd, child_env(), out.with_suffix(".log"), args.timeout)
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {out.with_suffix('.log').read_text()[-1500:]}")
    times = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "train":
            times[rec["iter"]] = rec["time"]
    # the run's header line: "N parameters (M trained)" with LoRA, "N parameters" when every weight trains
    m = re.search(r"([\d,]+) parameters(?: \(([\d,]+) trained\))?", out.with_suffix(".log").read_text())
    trainable = int((m.group(2) or m.group(1)).replace(",", "")) if m else None
    return {**steady(times, args.warmup, args.steps, args.batch * args.seq), "peak_rss_mb": round(rss),
            "wall_s": round(wall, 1), "trainable_params": trainable}


def measure_mlx_lm(folder: Path, data: Path, case: Case, args: argparse.Namespace, work: Path,
                   preload: str | None, name: str) -> dict[str, Any]:
    times_file = work / f"{name}.times.json"
    cmd = [sys.executable, "-m", "benchmarks.finetune", "--child-mlx-lm", str(folder), "--data", str(data),
           "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--lora-rank", str(case.lora or 0), "--times-out", str(times_file)]
    if case.grad_checkpoint:
        cmd += ["--grad-checkpoint"]
    times_file.unlink(missing_ok=True)
    timeout = args.peer_timeout or args.timeout
    rc, wall, rss = run_child(cmd, child_env(preload), work / f"{name}.log", timeout)
    if rc == -9 and wall >= timeout and times_file.exists():
        return unfinished(json.loads(times_file.read_text()), time.time(), args, rss)
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {(work / f'{name}.log').read_text()[-1500:]}")
    rec = json.loads(times_file.read_text())
    times = {int(k): v for k, v in rec["times"].items()}
    return {**steady(times, args.warmup, args.steps, args.batch * args.seq), "peak_rss_mb": round(rss),
            "wall_s": round(wall, 1), "trainable_params": rec["trainable"]}


def unfinished(rec: dict[str, Any], killed_epoch: float, args: argparse.Namespace,
               rss: float) -> dict[str, Any]:
    """A peer stopped at --peer-timeout. Past its warm-up: tokens/s over the steps it finished. Else the step
    it was in had run `open_s` seconds without finishing, so that step ran under tokens_per_step / open_s
    tokens/s (a bound on one step; the first also holds the peer's compilation of its step, seconds against
    these steps' minutes). Its peak RSS so far is a floor."""
    times = {int(k): v for k, v in rec["times"].items()}
    done = max(times)
    if done > args.warmup:  # timed steps finished: measured over those, as a finished run
        timed = done - args.warmup
        return {**steady(times, args.warmup, timed, args.batch * args.seq), "steps_timed": timed,
                "peak_rss_mb": round(rss), "trainable_params": rec["trainable"]}
    open_s = killed_epoch - rec["clock_start_epoch"] - times[done]
    return {"unfinished_step": done + 1, "open_s": round(open_s, 1),
            "tok_s_below": round(args.batch * args.seq / open_s, 2), "peak_rss_mb_so_far": round(rss),
            "trainable_params": rec["trainable"]}


def folder_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer.json as a transformers tokenizer, for mlx-lm's datasets. Not AutoTokenizer:
    transformers 5 maps model_type qwen2 to Qwen2Tokenizer whatever tokenizer_class says, and that turns the
    word-level tokenizer into one that encodes these rows as nothing."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token=cfg["bos_token"],
                                  eos_token=cfg["eos_token"])


def child_mlx_lm(args: argparse.Namespace) -> None:
    """Inside the mlx-lm subprocess: mlx-lm's own loader, adapters and training loop."""
    from types import SimpleNamespace

    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(args.child_mlx_lm)  # a quantized folder (mlx_lm convert -q) loads quantized: QLoRA
    tokenizer = folder_tokenizer(Path(args.child_mlx_lm))
    mx.random.seed(0)
    model.freeze()
    if args.lora_rank:  # keys=None: mlx-lm's default, every Linear of every block
        linear_to_lora_layers(model, len(model.layers),
                              {"rank": args.lora_rank, "scale": 2.0, "dropout": 0.0})
    else:
        model.unfreeze()  # every weight, as twinlm's full fine-tuning
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    train_set = CacheDataset(load_local_dataset(Path(args.data), tokenizer, SimpleNamespace())[0])
    t0 = time.perf_counter()
    times: dict[int, float] = {0: 0.0}  # "after step 0" is the start: --warmup 0 times the first step whole

    start_epoch = time.time() - (time.perf_counter() - t0)

    def save() -> None:  # after every step: a run stopped at --peer-timeout still tells how far it got
        Path(args.times_out).write_text(json.dumps({"times": times, "trainable": trainable,
                                                    "clock_start_epoch": start_epoch}))

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            times[info["iteration"]] = time.perf_counter() - t0
            save()

    save()
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArgs(batch_size=args.batch, iters=total, steps_per_report=1, steps_per_eval=10**9,
                             steps_per_save=10**9, max_seq_length=args.seq + 1,
                             adapter_file=str(Path(tmp) / "adapters.safetensors"),
                             grad_checkpoint=args.grad_checkpoint)
        train(model, optim.AdamW(learning_rate=1e-4, weight_decay=0.1), train_set, None, targs,
              training_callback=Clock())
    save()


def prepare_twinlm(folder: Path, run: Path, case: Case, args: argparse.Namespace, work: Path) -> Any:
    """A callable giving twinlm's run of `folder` for `case` (imported, and quantized for q4), made once on
    first use: a failure belongs to the tool's row."""
    def make() -> Path:
        steps = [(run, ["import-hf", str(folder), "--out", str(run)])]
        if case.precision == "q4":
            q4 = run.with_name(run.name + "-q4")
            steps.append((q4, ["quantize", str(run), "--bits", "4", "--group-size", str(GROUP),
                               "--out", str(q4)]))
        for out, cmd in steps:
            if not out.exists():
                log = work / f"{out.name}.log"
                rc, _, _ = run_child([sys.executable, "-m", "twinlm.cli.main", *cmd], child_env(), log,
                                     args.timeout)
                if rc != 0:
                    raise RuntimeError(log.read_text()[-1500:])
        return steps[-1][0]
    return make


def prepare_mlx_lm(folder: Path, case: Case, args: argparse.Namespace, work: Path) -> Any:
    """A callable giving mlx-lm's model folder for `case`: the folder itself, or for q4 its `mlx_lm convert
    -q` (4 bits, group 64), made once on first use."""
    def make() -> Path:
        if case.precision != "q4":
            return folder
        out = folder.with_name(folder.name + "-mlx-q4")
        if not out.exists():
            log = work / f"{out.name}.log"
            rc, _, _ = run_child([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(folder),
                                  "--mlx-path", str(out), "-q", "--q-bits", "4",
                                  "--q-group-size", str(GROUP)],
                                 child_env(openblas()), log, args.timeout)
            if rc != 0:
                raise RuntimeError(log.read_text()[-1500:])
            # convert rewrites the tokenizer through transformers' class for the model type, which turns the
            # Qwen folders' word-level one into one that encodes these rows as nothing: keep the folder's own
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(folder / name, out / name)
        return out
    return make


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="Tiny shapes, batch 2 x 32, a few steps: seconds.")
    p.add_argument("--cases", default="qwen-lora,smol-full", help=f"Comma-separated: {', '.join(CASES)}.")
    p.add_argument("--tools", default="twinlm-mlx,mlx-lm,mlx-lm-installed",
                   help="Comma-separated: twinlm-mlx, twinlm-tinygrad, mlx-lm, mlx-lm-installed.")
    p.add_argument("--tinygrad", action="store_true", help="Add twinlm-tinygrad (slow to compile).")
    p.add_argument("--batch", type=int, default=None, help="Rows per step (default 4; --small 2).")
    p.add_argument("--seq", type=int, default=None,
                   help="Tokens per row, a multiple of 32 (default 256; --small 32).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 3; --small 2).")
    p.add_argument("--steps", type=int, default=None, help="Timed steps (default 10; --small 3).")
    p.add_argument("--timeout", type=float, default=3600, help="Seconds allowed to each subprocess.")
    p.add_argument("--peer-timeout", type=float, default=None,
                   help="Seconds allowed to an mlx-lm run (default --timeout); one stopped there reports the "
                        "bound its unfinished step sets (tok_s_below) and its peak RSS so far.")
    p.add_argument("--work", default=None, help="Keep folders, data and logs here (default: a temp dir).")
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    p.add_argument("--child-mlx-lm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--lora-rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--times-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch = args.batch or (2 if args.small else 4)
    args.seq = args.seq or (32 if args.small else 256)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.small else 3)
    args.steps = args.steps or (3 if args.small else 10)
    if args.child_mlx_lm:
        child_mlx_lm(args)
        return
    if args.seq % 32:
        p.error("--seq must be a multiple of 32 (mlx-lm pads rows to one plus a multiple of 32)")
    tools = args.tools.split(",") + (["twinlm-tinygrad"] if args.tinygrad else [])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for case in args.cases.split(","):
            c = CASES[case]
            args.case = case
            shape = c.small if args.small else c.real
            key = c.key(args.small)
            folder = work / f"{key}-hf"  # shared by the cases of one shape and dtype
            if not (folder / "config.json").exists():
                build_folder(folder, shape, c.arch, "bfloat16" if c.precision == "bfloat16" else "float32")
            data = write_data(work / f"{case}-data", shape["vocab_size"], args.seq,
                              rows=max(64, args.batch * (args.warmup + args.steps)))
            run = prepare_twinlm(folder, work / f"{key}-run", c, args, work)
            peer = prepare_mlx_lm(folder, c, args, work)
            for tool in tools:
                row: dict[str, Any] = {"case": case, "tool": tool}
                try:
                    if tool.startswith("twinlm-"):
                        row.update(measure_twinlm(tool.split("-", 1)[1], run(), data, c, args, work))
                    elif tool in ("mlx-lm", "mlx-lm-installed"):
                        preload = openblas() if tool == "mlx-lm" else None
                        row["ld_preload"] = preload
                        row.update(measure_mlx_lm(peer(), data, c, args, work, preload, f"{case}-{tool}"))
                    else:
                        raise ValueError(f"unknown tool {tool!r}")
                except Exception as e:  # one tool failing must not hide the others' numbers
                    row["error"] = f"{type(e).__name__}: {e}"[:1500]
                rows.append(row)
                print(json.dumps(row), flush=True)
    record = {"cpu": lscpu_model(), "small": args.small, "batch": args.batch, "seq": args.seq,
              "warmup": args.warmup, "steps": args.steps, "load_average": os.getloadavg(),
              "nproc": os.cpu_count(), "results": rows}
    print(f"\nlscpu model name: {record['cpu']}; load average {record['load_average']}")
    print(f"batch {args.batch} x {args.seq} tokens; {args.steps} timed steps after {args.warmup}")
    print("\n| case | tool | tokens/s | ms/step | peak RSS MB | twinlm-mlx / this |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        ref = next((x.get("tok_s") for x in rows if x["case"] == r["case"] and x["tool"] == "twinlm-mlx"),
                   None)
        if "tok_s_below" in r:  # stopped at --peer-timeout: bounds, not measurements
            ratio = f"> {ref / r['tok_s_below']:.2f}x" if ref else "-"
            speed = f"< {r['tok_s_below']} (step {r['unfinished_step']} unfinished after {r['open_s']} s)"
            rss = f">= {r['peak_rss_mb_so_far']}"
        else:
            ratio = f"{ref / r['tok_s']:.2f}x" if ref and r.get("tok_s") else "-"
            speed = r.get("tok_s", str(r.get("error", "-"))[:80])
            rss = r.get("peak_rss_mb", "-")
        print(f"| {r['case']} | {r['tool']} | {speed} | {r.get('step_ms', '-')} | {rss} | {ratio} |")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
