"""benchmarks/finetune_profile.py: the parsing of tinygrad's DEBUG=2 kernel lines and the step's GEMM shapes
(the measurements themselves run in `python -m benchmarks.finetune_profile --small`)."""

from __future__ import annotations

import pytest

from benchmarks.finetune_profile import gemm_shapes, kernel_classes, model_config

# tinygrad prints times under 10 ms in us, under 10 s in ms, and above in s ("s /": a space before the slash).
_LINES = """\
*** CPU    1 r_1_2_3 arg  2 mem   0.01 GB tm      5.00us/     0.01ms (   99 GFLOPS    1|1      GB/s)
@@profiled-step-start
*** CPU  186 r_128_16384_2_3_4_144_4 arg  3 mem   0.91 GB tm     10.67s /125832.36ms (  5 GFLOPS    0|6  GB/s)
*** CPU  187 \x1b[33mr_64_8_64_4\x1b[0m arg  2 mem   0.91 GB tm   1500.00ms/  1.00ms (  1 GFLOPS  2|2  GB/s)
*** CPU  188 E_64_128_4 arg  3 mem   0.91 GB tm    250.00us/     1.00ms (     11 GFLOPS   20|20     GB/s)
*** CPU  189 copy  256 B,  CPU <- NPY arg  2 mem   0.91 GB tm     10.00us/  1.00ms (  0 GFLOPS  0|0  GB/s)
@@profiled-step-end
*** CPU  190 r_9_9_9 arg  2 mem   0.91 GB tm      9.00s /     1.00ms (    999 GFLOPS    1|1      GB/s)
"""


def test_kernel_lines_are_classed_in_every_time_unit_and_only_inside_the_step() -> None:
    k = kernel_classes(_LINES)
    c = k["classes"]
    assert c["matmul"]["kernels"] == 1 and c["matmul"]["seconds"] == pytest.approx(10.67)  # "s /"
    assert c["reduce"]["seconds"] == pytest.approx(1.5)  # 1 FLOP/byte: not a matmul; colours stripped
    assert c["elementwise"]["kernels"] == 1 and c["elementwise"]["seconds"] < 1e-3  # (rounded to ms)
    assert c["copy"]["kernels"] == 1
    assert k["total_s"] == pytest.approx(10.67 + 1.5 + 250e-6 + 10e-6, abs=1e-3)
    assert all(t["name"] not in ("r_1_2_3", "r_9_9_9") for t in k["top"])  # outside the markers
    # negative control: without the markers every line counts, and the totals change
    unmarked = _LINES.replace("@@profiled-step-start\n", "").replace("@@profiled-step-end\n", "")
    assert kernel_classes(unmarked)["total_s"] == pytest.approx(k["total_s"] + 9.0, abs=1e-3)


def test_gemm_shapes_follow_the_case() -> None:
    """Full fine-tuning has dW for every linear; LoRA (frozen base) only forward and dX. SmolLM2's q|k|v is
    (9 + 2 x 3) heads of 64 = 960 wide; Qwen2.5-0.5B's head is its 151,936-word vocabulary."""
    smol = gemm_shapes(model_config("smol-full", 1, small=False), 1024)
    assert {(r["gemm"], r["m"], r["k"], r["n"]) for r in smol} >= {("qkv fwd", 1024, 576, 960),
                                                                  ("head dW", 576, 1024, 49152)}
    assert len(smol) == 15
    qwen = gemm_shapes(model_config("qwen-lora", 24, small=False), 1024)
    assert len(qwen) == 10 and not any(r["gemm"].endswith("dW") for r in qwen)
    rows = {(r["gemm"], r["m"], r["k"], r["n"], r["count"]) for r in qwen}
    assert ("head fwd", 1024, 896, 151936, 1) in rows
    assert {r["count"] for r in qwen if not r["gemm"].startswith("head")} == {24}
