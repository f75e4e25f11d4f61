"""Peak memory of bringing a Hugging Face folder in (issue #19): `import-hf`, `twinlm.load` of the folder and
of the imported run, and `sample` from the run, on each backend, each stage in its own process.

    python -m benchmarks.import_memory FOLDER --work /var/tmp/x        # a real folder (read-only)
    python -m benchmarks.import_memory --small                         # seconds: a tiny folder it builds

Peak RSS is each child's VmHWM (it starts afresh at exec, unlike getrusage's maxrss, which carries the
parent's over), printed beside the folder's weight bytes: the target is at most the file plus one copy
(2.0x), and a stage that copies the weights to a backend cannot go under 1.0x. The run directory written
under --work is deleted at the end (--keep keeps it).
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The child reports its own peak at exit.
_PEAK = ("import atexit, runpy, sys\n"
         "def peak():\n"
         "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
         "    print(f'peak-kb {hwm}', file=sys.stderr)\n"
         "atexit.register(peak)\n"
         "if sys.argv[1] == 'load':\n"
         "    import twinlm\n"
         "    m = twinlm.load(sys.argv[2], backend=sys.argv[3])\n"
         "    print(m)\n"
         "else:\n"
         "    sys.argv = ['twinlm', *sys.argv[1:]]\n"
         "    runpy.run_module('twinlm.cli.main', run_name='__main__')\n")


def peak(args: list[str], timeout: float) -> dict[str, Any]:
    """Wall seconds, peak RSS MB and exit code of one child; its last output lines on failure."""
    env = {**os.environ, "DEV": os.environ.get("DEV", "CPU"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _PEAK, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("peak-kb ")]
    out = {"rc": p.returncode, "wall_s": round(wall, 1),
           "peak_rss_mb": round(int(lines[-1].split()[1]) / 1024) if lines else None}
    if p.returncode:
        out["tail"] = (p.stdout + p.stderr)[-800:]
    return out


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def small_folder(work: Path) -> Path:
    from benchmarks.serve import SMALL, build_folder

    return build_folder(work / "small-hf", SMALL)


def run(folder: Path, work: Path, backends: list[str], stages: list[str], timeout: float,
        keep: bool = False) -> dict[str, Any]:
    run_dir = work / "import-memory-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    size_mb = weight_bytes(folder) / 2**20
    rows: list[dict[str, Any]] = []
    try:
        if "import" in stages or "sample" in stages or "load-run" in stages:
            stage = peak(["import-hf", str(folder), "--out", str(run_dir)], timeout)
            rows.append({"stage": "import-hf", **stage})
        for b in backends:
            if "load" in stages:
                rows.append({"stage": f"twinlm.load(folder) {b}", **peak(["load", str(folder), b], timeout)})
            if "load-run" in stages:
                rows.append({"stage": f"twinlm.load(run) {b}", **peak(["load", str(run_dir), b], timeout)})
            if "sample" in stages:
                rows.append({"stage": f"sample -n 4 {b}", **peak(
                    ["sample", str(run_dir), "-n", "4", "--prompt", "t5 t6", "--temperature", "0",
                     "--backend", b], timeout)})
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    for r in rows:
        r["x_file"] = round(r["peak_rss_mb"] / size_mb, 2) if r.get("peak_rss_mb") else None
    return {"folder": str(folder), "weights_mb": round(size_mb), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", help="a Hugging Face folder (read only)")
    ap.add_argument("--small", action="store_true", help="build a tiny folder and measure it (seconds)")
    ap.add_argument("--work", help="where the imported run goes (default: a temp dir)")
    ap.add_argument("--backends", default="mlx,tinygrad")
    ap.add_argument("--stages", default="import,load,load-run,sample")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--keep", action="store_true", help="keep the imported run")
    ap.add_argument("--out", help="write the JSON record here")
    args = ap.parse_args(argv)
    if not args.small and not args.folder:
        ap.error("give a FOLDER or --small")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        folder = small_folder(work) if args.small else Path(args.folder)
        rec = run(folder, work, args.backends.split(","), args.stages.split(","), args.timeout, args.keep)
    print(f"{rec['folder']}: weights {rec['weights_mb']:,} MB")
    print(f"{'stage':<32} {'wall s':>7} {'peak RSS MB':>12} {'x file':>7}")
    for r in rec["rows"]:
        mb = f"{r['peak_rss_mb']:,}" if r["peak_rss_mb"] else "-"
        print(f"{r['stage']:<32} {r['wall_s']:>7} {mb:>12} {r['x_file'] or '-':>7}"
              + (f"  FAILED rc {r['rc']}: {r['tail']}" if r["rc"] else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")
    if any(r["rc"] for r in rec["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
