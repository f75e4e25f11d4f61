"""The MLX graph a decoded token builds: no node that does nothing. A quantized layer adds no StopGradient
(only under `remat`, where a checkpoint asks for every input's gradient) and a kernel adds no Contiguous for
an input that already is row-contiguous: an evaluated array, or another kernel's fresh output. Control: the
head split's outputs are strided views, so the rotation after it still gets its Contiguous. Each node costs
~1 us of evaluation per token (a 4-bit SmolLM2-135M token: 1,995 nodes before, 937 after, 10.4 -> 9.2 ms)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from twinlm.backends import kernels

mx = pytest.importorskip("mlx.core")
from twinlm.backends.mlx import MLXBackend  # noqa: E402

K = kernels.load()
pytestmark = pytest.mark.skipif(K is None, reason=f"kernels not active: {kernels.status().reason}")


def nodes(tmp_path: Path, *outputs) -> Counter:
    dot = tmp_path / "g.dot"
    mx.export_to_dot(str(dot), *outputs)
    return Counter(re.findall(r'label ="([A-Za-z_]+)"', dot.read_text()))


def arr(*shape: int, seed: int = 0):
    x = mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    mx.eval(x)
    return x


def test_a_quantized_layer_after_a_norm_adds_no_idle_node(tmp_path: Path) -> None:
    B = MLXBackend()
    q, s, b = mx.quantize(arr(96, 64), group_size=32, bits=4)
    x, w = arr(1, 1, 64, seed=1), arr(64, seed=2)
    mx.eval(q, s, b)
    y = B.quantized_linear(B.rms_norm(x, w), q, s, b, None, 4, 32)
    got = nodes(tmp_path, y)
    assert got["TwinlmQuantizedMatmul"] == 1 and got["TwinlmRMSNorm"] == 1
    assert got["StopGradient"] == 0 and got["Contiguous"] == 0, got
    B.remat = True  # train --grad-checkpoint: the weights are gradient-stopped again
    assert nodes(tmp_path, B.quantized_linear(x, q, s, b, None, 4, 32))["StopGradient"] == 3


def test_the_head_splits_views_are_still_made_contiguous(tmp_path: Path) -> None:
    B = MLXBackend()
    qkv, cos, sin = arr(1, 3, 3 * 2 * 8), arr(3, 4, seed=1), arr(3, 4, seed=2)
    q, _, _ = B.split_heads(qkv, 2, 2, 8)
    got = nodes(tmp_path, B.rope(q, cos, sin))
    assert got["TwinlmSplitHeads"] == 1 and got["TwinlmRope"] == 1
    assert got["Contiguous"] == 1, got  # q's view; cos and sin are evaluated tables, used as they are


def test_attention_outputs_in_the_heads_merged_layout_are_copied_before_a_kernel(tmp_path: Path) -> None:
    """The fused attention writes o (N, H, T, D) strided in the (N, T, H D) layout: a kernel reading it must
    get it through a Contiguous, and read the right numbers (read as it is, they come out permuted)."""
    B = MLXBackend()
    q, k, v = arr(1, 2, 3, 8), arr(1, 2, 3, 8, seed=1), arr(1, 2, 3, 8, seed=2)
    o = B.attention(q, k, v, None)
    y = B.swiglu(o, o)
    assert nodes(tmp_path, y)["Contiguous"] >= 1
    o_np = np.array(o)
    np.testing.assert_allclose(np.array(y), o_np / (1 + np.exp(-o_np)) * o_np, rtol=1e-5, atol=1e-6)
