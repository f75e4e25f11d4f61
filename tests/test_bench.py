"""Smoke tests of the benchmark harness's framework-free parts: FLOP counting, records, tables."""

from __future__ import annotations

import json

import pytest

# benchmarks/ is a top-level folder of the checkout, not part of the installed package.
from benchmarks import flops, report
from twinlm.core.config import preset


def test_flops_per_token_matches_hand_count_for_baby() -> None:
    cfg = preset("baby", vocab_size=65)
    # per block: qkv 128x384 + proj 128x128 + fc 128x512 + proj 512x128; head 128x65
    n = 4 * (128 * 384 + 128 * 128 + 128 * 512 + 512 * 128) + 128 * 65
    assert flops.matmul_params(cfg) == n == 794_752
    assert flops.train_flops_per_token(cfg) == 6 * n + 12 * 4 * 128 * 64
    assert flops.train_flops_per_token(cfg, seq_len=32) == 6 * n + 12 * 4 * 128 * 32
    # quantized (the embedding and tied head too), the same matmuls: QLoRA's base counts as frozen
    q = cfg.replace(quant_bits=4, quant_group_size=32, quant_embedding=True)
    assert flops.matmul_params(q) == n
    assert flops.matmul_params(q.replace(lora_rank=4), False) == n


def test_medium_flops_and_mfu() -> None:
    cfg = preset("medium", vocab_size=65)
    per_token = flops.train_flops_per_token(cfg)
    assert per_token == 6 * (6 * (4 * 384 ** 2 + 2 * 384 * 1536) + 384 * 65) + 12 * 6 * 384 * 256
    # 1,000 tokens/s against a 1 GFLOP/s peak
    assert flops.mfu(1e6, 1000.0, 1e9) == pytest.approx(1.0)
    assert flops.mfu(per_token, 1000.0, 2 * per_token * 1000.0) == pytest.approx(0.5)


def test_summarize_gives_median_and_quartiles_in_ms() -> None:
    s = report.summarize([0.004, 0.001, 0.003, 0.002, 0.005])
    assert s["median"] == pytest.approx(3.0)
    assert (s["min"], s["max"], s["n"]) == (pytest.approx(1.0), pytest.approx(5.0), 5)
    assert s["p25"] < s["median"] < s["p75"]


def _record(backend: str, tps: float, preset_name: str = "baby") -> dict:
    return {"backend": backend, "preset": preset_name, "tokens_per_s": tps, "mfu": tps / 1e4,
            "warmup_s": 1.5, "peak_rss_mb": 100.0, "cpu_ms_per_iter": {"median": 7.0},
            "ms_per_iter": {"median": 768e3 / tps, "p25": 1.0, "p75": 2.0}}


def test_table_ratios_are_against_torch_of_the_same_preset(tmp_path) -> None:
    records = [_record("torch", 2000.0), _record("mlx", 1000.0), _record("mlx", 500.0, "medium")]
    path = tmp_path / "r.json"
    report.save(records, path)
    assert json.loads(path.read_text()) == records
    lines = report.table(report.load([path])).splitlines()
    assert lines[0].split()[:4] == ["backend", "preset", "ranks", "ms/iter"]
    rows = {(line.split()[0], line.split()[1]): line for line in lines[2:]}
    assert "1.00x" in rows[("torch", "baby")]
    assert "0.50x" in rows[("mlx", "baby")]
    assert "-x" in rows[("mlx", "medium")]  # no torch record for medium: no ratio
    assert "10.0%" in rows[("mlx", "baby")]


def test_table_scaling_is_against_the_same_backends_one_rank() -> None:
    records = [_record("torch", 2000.0), _record("mlx", 1000.0), {**_record("mlx", 1700.0), "ranks": 2},
               {**_record("tinygrad", 300.0), "ranks": 2}]
    rows = [line.split() for line in report.table(records).splitlines()[2:]]
    by = {(r[0], r[2]): r for r in rows}
    assert "85%" in by[("mlx", "2")] and "0.85x" in by[("mlx", "2")]
    assert by[("tinygrad", "2")][8] == "-"  # no one-rank tinygrad record in the run: no scaling figure
    assert by[("mlx", "1")][8] == "-"  # one rank: no scaling figure


def test_hardware_and_versions_describe_this_machine() -> None:
    hw, ver = report.hardware(), report.versions()
    assert hw["cpus"] >= 1 and hw["machine"]
    assert ver["python"].count(".") == 2 and "numpy" in ver


def test_device_gemm_peak_and_peak_rss() -> None:
    from conftest import backend_or_skip

    from benchmarks import report
    from benchmarks.step import device_gemm_peak

    for name in ("mlx", "tinygrad"):
        B = backend_or_skip(name)
        r = device_gemm_peak(B, n=64, repeats=2)
        assert r["flops"] > 0 and r["n"] == 64 and r["device"] == B.device_info()["device"]
    assert 1 < report.peak_rss_mb() < 1e6  # MB, not KiB or bytes


def test_allreduce_benchmark_sums_across_two_ranks() -> None:
    """`benchmarks.allreduce` starts two ranks per all-reduce kind (ring, shm) and checks the sum really
    crossed them (else an error)."""
    import subprocess
    import sys

    pytest.importorskip("mlx.core")
    import twinlm.backends.mlx  # noqa: F401  (the system BLAS before the kernels load)
    from twinlm.backends import kernels

    K = kernels.load()
    kinds = ["ring", "shm"] if K is not None and hasattr(K, "shm_all_sum") else ["ring"]
    out = subprocess.run([sys.executable, "-m", "benchmarks.allreduce", "--preset", "tiny", "--iters", "2",
                          "--kind", ",".join(kinds)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for kind in kinds:  # each kind really ran (the line names the all-reduce the backend used)
        assert f"tiny {kind}: 2 ranks" in out.stdout and "ms CPU per call" in out.stdout, out.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.allreduce", "--ranks", "1"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--ranks must be at least 2" in bad.stderr


@pytest.mark.slow
def test_benchmark_ranks_skip_the_all_reduce_when_asked(tmp_path) -> None:
    """TWINLM_SKIP_ALLREDUCE=1 reaches the benchmark's ranks: rank 0 then reports its own share's loss."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mlx.core")
    losses = {}
    for skip in ("0", "1"):
        out = tmp_path / f"skip{skip}.json"
        run = subprocess.run([sys.executable, "-m", "benchmarks.step", "--backend", "mlx", "--preset", "tiny",
                              "--ranks", "2", "--iters", "3", "--warmup-iters", "1", "--out", str(out)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "TWINLM_SKIP_ALLREDUCE": skip})
        assert run.returncode == 0, run.stderr[-2000:]
        record = json.loads(out.read_text())
        losses[skip] = (record[0] if isinstance(record, list) else record)["loss_first"]
    assert losses["0"] != pytest.approx(losses["1"], rel=1e-3), losses


def test_benchmark_step_runs_the_torch_reference(tmp_path) -> None:
    """The PyTorch eager row every `vs torch` ratio divides by (it once failed on an MLX-only field)."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    out = tmp_path / "torch.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.step", "--backend", "torch", "--preset", "tiny",
                          "--iters", "3", "--warmup-iters", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "failed" not in run.stdout + run.stderr, run.stderr[-2000:]
    record = json.loads(out.read_text())
    record = record[0] if isinstance(record, list) else record
    assert record["backend"] == "torch" and record["all_reduce"] is None
    assert record["ms_per_iter"]["median"] > 0
