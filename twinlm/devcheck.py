"""`python -m twinlm.devcheck`: one command that checks twinlm on a machine's accelerator and writes one
JSON report. Each step runs in its own process under its own timeout and the check goes on past a failure:

  probe      which devices each framework opens (MLX: cpu/gpu and its build; tinygrad: its device list)
  doctor     `twinlm doctor --json` on the device under test (device rows, compiled-step smoke test)
  parity     `twinlm parity --backends B,numpy --arch A` per trainable backend and family, on the device
  bench      `python -m benchmarks.step` per backend (medium preset; GEMM peak and memory on the device)
  determinism  the same short train twice: are the losses bit-identical on this device?
  resume     train on one backend, resume on the other (cross-backend checkpoints)
  jit-cache  the same tinygrad train twice with a fresh JIT cache: the second must load, not capture

Sized for about 6 minutes on a GPU (not yet run on one); no network. `--dry-run` runs every step at tiny
sizes on the CPU (what CI runs; 11 minutes on a shared 2-core machine, mostly tinygrad's first compiles).
The device under test: `--device` (a `--device` spec), else MLX's GPU and tinygrad's first non-CPU device
where they open, else the CPU. Exit status 0 when every step passed, 1 otherwise; the report says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the checkout (benchmarks/ lives beside twinlm/)
FAMILIES = ("gpt", "llama", "bert")
TRAINABLE = ("mlx", "tinygrad")
TEXT = "".join(f"line {i}: the {['quick', 'lazy', 'brown'][i % 3]} fox jumps over {i * 7 % 13} dogs.\n"
               for i in range(400))


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    detail: str = ""  # what was seen: a verdict, or the tail of the output on failure
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    dry_run: bool
    device: str | None  # the --device spec every child gets (TWINLM_DEVICE); None: each framework's choice
    backends: tuple[str, ...]
    families: tuple[str, ...]
    preset: str  # bench
    bench_iters: int
    train: list[str]  # train flags shared by the train steps
    timeout: float  # per child process


def plan(dry_run: bool, device: str | None, backends: tuple[str, ...]) -> Plan:
    common = ["--eval-iters", "1", "--eval-every", "100", "--log-every", "1", "--warmup", "2",
              "--lr-decay-iters", "6"]
    if dry_run:
        return Plan(True, device or "cpu", backends, ("gpt",), "tiny", 2,
                    ["--preset", "tiny", "--block-size", "16", "--batch-size", "4", *common], 480.0)
    return Plan(False, device, backends, FAMILIES, "medium", 10,
                ["--preset", "small", "--block-size", "64", "--batch-size", "8", *common], 150.0)


def run(name: str, cmd: list[str], env: dict[str, str], timeout: float, cwd: Path) -> StepResult:
    """One child process under `timeout`; ok when it exits 0."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return StepResult(name, False, round(time.perf_counter() - t0, 2), cmd, None,
                          f"timed out after {timeout:.0f} s; " + _tail(out))
    seconds = round(time.perf_counter() - t0, 2)
    detail = "" if p.returncode == 0 else _tail(p.stdout + p.stderr)
    result = StepResult(name, p.returncode == 0, seconds, cmd, p.returncode, detail)
    result.data["stdout"] = p.stdout[-4000:]
    return result


def _tail(text: str, lines: int = 8) -> str:
    kept = [ln for ln in text.splitlines() if ln.strip() and "warning generated" not in ln]
    return "\n".join(kept[-lines:])


def probe() -> dict[str, Any]:
    """What opens here, each framework in a child process (a broken driver must not take this one down)."""
    code = ("import json\nfrom twinlm.backends import device as d\nout = {}\n"
            "try:\n import twinlm.backends.mlx as m\n mx = m.mx\n"
            " out['mlx'] = {'gpu': bool(mx.is_available(mx.gpu)), 'build': d.mlx_build()}\n"
            "except Exception as e:\n out['mlx'] = {'error': f'{type(e).__name__}: {e}'}\n"
            "try:\n out['tinygrad'] = {'devices': d.tinygrad_devices()}\n"
            "except Exception as e:\n out['tinygrad'] = {'error': f'{type(e).__name__}: {e}'}\n"
            "print(json.dumps(out))\n")
    env = dict(os.environ)
    env.pop("DEV", None)  # let tinygrad try every device
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       cwd=ROOT)
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else \
        {"error": _tail(p.stderr)}


def default_device(found: dict[str, Any]) -> str | None:
    """The accelerator each framework has here, as a --device spec (None: nothing but the CPU)."""
    parts = []
    if found.get("mlx", {}).get("gpu"):
        parts.append("mlx=gpu")
    gpu = next((d for d in found.get("tinygrad", {}).get("devices", []) if not d.startswith("CPU")), None)
    if gpu:
        parts.append(f"tinygrad={gpu}")
    return ",".join(parts) or None


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("event") == "train"]


def compile_seconds(stdout: str) -> float | None:
    m = re.search(r"first step \(compile\) ([0-9.]+) s", stdout)
    return float(m.group(1)) if m else None


class _Results(list):
    """The steps so far; each one added rewrites the report, so a check cut short still leaves one."""

    def __init__(self, write: Any) -> None:
        super().__init__()
        self.write = write

    def append(self, r: StepResult) -> None:
        super().append(r)
        self.write(self, finished=False)

    def __iadd__(self, rs: Any) -> _Results:
        for r in rs:
            self.append(r)
        return self


def check(p: Plan, out: Path, work: Path) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    found = probe()
    device = p.device if p.device is not None else default_device(found)

    def write(results: list[StepResult], finished: bool) -> dict[str, Any]:
        report = {"devcheck": 1, "dry_run": p.dry_run, "device": device, "started": started,
                  "finished": finished, "seconds": round(time.perf_counter() - t0, 1),
                  "host": platform.node(),
                  "machine": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
                  "ok": finished and all(r.ok for r in results), "passed": sum(r.ok for r in results),
                  "steps": len(results), "results": [asdict(r) for r in results]}
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return report

    results = _Results(write)
    results.append(StepResult("probe", "error" not in found, round(time.perf_counter() - t0, 2),
                              detail=json.dumps(found), data=found))
    env = dict(os.environ, COLUMNS="200", TWINLM_JIT_CACHE=str(work / "jit"),
               TWINLM_CACHE_DIR=str(work / "cache"), PYTHONPATH=os.pathsep.join(
                   [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("TWINLM_BACKEND", None)
    if device:
        env["TWINLM_DEVICE"] = device
    else:
        env.pop("TWINLM_DEVICE", None)
    if p.dry_run:
        env["DEV"] = "CPU"
    env.setdefault("MLX_ENABLE_TF32", "0")  # parity's tolerances are float32's (training children too)
    twinlm = [sys.executable, "-m", "twinlm.cli.main"]
    corpus = work / "corpus.txt"
    corpus.write_text(TEXT)

    doctor = run("doctor", [*twinlm, "doctor", "--json"], env, p.timeout, work)
    if doctor.ok or doctor.returncode == 1:
        try:
            doctor.data["report"] = json.loads(doctor.data.pop("stdout"))
        except (ValueError, KeyError):
            pass
    results.append(doctor)
    working = [b for b in p.backends if _works(doctor, b)]
    for b in (b for b in p.backends if b not in working):
        results.append(StepResult(f"{b}: usable", False, 0.0, detail="doctor says it does not work here"))

    for b in working:
        for fam in p.families:
            cmd = [*twinlm, "parity", "--backends", f"{b},numpy", "--arch", fam]
            cmd += ["--quick"] if p.dry_run else ["--config", "tiny", "--steps", "5"]
            results.append(run(f"parity {b} {fam}", cmd, env, p.timeout, work))
    for b in working:
        bench_out = work / f"bench-{b}.json"
        cmd = [sys.executable, "-m", "benchmarks.step", "--backend", b, "--preset", p.preset, "--iters",
               str(p.bench_iters), "--warmup-iters", "2", "--max-seconds", "60", "--out", str(bench_out)]
        r = run(f"bench {b} {p.preset}", cmd, env, p.timeout, ROOT)
        if bench_out.exists():
            r.data["records"] = json.loads(bench_out.read_text())
        results.append(r)

    train = [*twinlm, "train", "--data", str(corpus), *p.train]
    for b in working:
        a, c = (run(f"determinism {b} run {i}", [*train, "--backend", b, "--out", f"det-{b}-{i}",
                                                 "--max-iters", "4"], env, p.timeout, work) for i in (1, 2))
        results += [a, c]
        if a.ok and c.ok:
            la, lc = losses(work / f"det-{b}-1"), losses(work / f"det-{b}-2")
            same = la == lc
            diff = max((abs(x - y) for x, y in zip(la, lc, strict=True)), default=0.0)
            results.append(StepResult(f"determinism {b}", same or diff < 1e-4, 0.0,
                                      detail=f"bit-identical: {same}; max loss difference {diff:.3g}",
                                      data={"bit_identical": same, "losses": [la, lc]}))
    if len(working) == 2:
        first, second = working
        r1 = run(f"resume {first}->{second}: train",
                 [*train, "--backend", first, "--out", "xb", "--max-iters", "4"], env, p.timeout, work)
        r2 = run(f"resume {first}->{second}: resume",
                 [*twinlm, "--backend", second, "train", "--resume", "xb", "--max-iters", "6"], env,
                 p.timeout, work)
        results += [r1, r2]
        if r1.ok and r2.ok and (work / f"det-{first}-1").exists():
            ref, got = losses(work / f"det-{first}-1"), losses(work / "xb")
            # The first 4 steps are the determinism run's (to rounding where the device is not bitwise
            # deterministic); the 2 resumed on the other backend must be there and finite.
            ok = len(got) == 6 and all(abs(x - y) < 1e-4 for x, y in zip(got[:4], ref, strict=True)) \
                and all(abs(x) < float("inf") for x in got)
            results.append(StepResult(f"resume {first}->{second}", ok, 0.0,
                                      detail=f"losses {[round(x, 4) for x in got]}", data={"losses": got}))
    if "tinygrad" in working:
        jit = work / "jit-fresh"
        jenv = dict(env, TWINLM_JIT_CACHE=str(jit))
        runs = []
        for i in (1, 2):
            r = run(f"jit-cache run {i}", [*train, "--backend", "tinygrad", "--out", f"jit-{i}",
                                           "--max-iters", "2"], jenv, p.timeout, work)
            r.data["files"] = sorted(f.name for f in jit.glob("*.jit")) if jit.exists() else []
            r.data["compile_s"] = compile_seconds(r.data.get("stdout", ""))
            runs.append(r)
        results += runs
        if all(r.ok for r in runs):
            hit = bool(runs[0].data["files"]) and runs[1].data["files"] == runs[0].data["files"]
            n1, n2 = len(runs[0].data["files"]), len(runs[1].data["files"])
            c1, c2 = runs[0].data["compile_s"], runs[1].data["compile_s"]
            results.append(StepResult("jit-cache hit", hit, 0.0, detail=f"entries {n1} after run 1, {n2} "
                                      f"after run 2; first step {c1} s then {c2} s"))

    for r in results:  # the whole stdout only where it is the finding
        if r.ok and r.name != "doctor":
            r.data.pop("stdout", None)
    return write(results, finished=True)


def _works(doctor: StepResult, backend: str) -> bool:
    report = doctor.data.get("report")
    rows = report.get("backends", []) if isinstance(report, dict) else []
    return any(r.get("backend") == backend and r.get("ok") for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twinlm.devcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI)")
    ap.add_argument("--device", default=None, help="a --device spec (default: the accelerators found)")
    ap.add_argument("--backends", default="mlx,tinygrad", help="trainable backends to check")
    ap.add_argument("--out", default="devcheck-report.json", help="where to write the JSON report")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (runs, bench records)")
    args = ap.parse_args(argv)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if bad := [b for b in backends if b not in TRAINABLE]:
        print(f"error: --backends takes {', '.join(TRAINABLE)}, not {', '.join(bad)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="twinlm-devcheck-"))
    try:
        report = check(plan(args.dry_run, args.device, backends), Path(args.out).resolve(), work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for r in report["results"]:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']:<34} {r['seconds']:>7.1f} s  "
              f"{r['detail'].splitlines()[0] if r['detail'] else ''}"[:160])
    print(f"devcheck: {report['passed']}/{report['steps']} steps passed in {report['seconds']} s on "
          f"{report['device'] or 'each framework default'}; report: {args.out}"
          + (f" (work folder kept: {work})" if args.keep else ""))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
