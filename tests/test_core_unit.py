"""Unit tests of twinlm.core on numpy alone: config, parameters, masks, schedule, dropout, golden
constants, and the rule that the core never imports a framework."""

from __future__ import annotations

import ast
import importlib.util
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import twinlm.core
from twinlm.core import dropout, model, optim
from twinlm.core.config import ConfigError, ModelConfig, preset
from twinlm.core.params import check_params, count_params, init_params, param_shapes

CORE_DIR = pathlib.Path(twinlm.core.__file__).parent
FRAMEWORKS = ("mlx", "tinygrad", "torch", "jax")


def test_sinusoidal_table_golden() -> None:
    # sin/cos(pos / 10000^(2i/d)) written out by hand for d = 16 (the original paper's convention).
    table = model.sinusoidal_table(8, 16)
    assert table.shape == (8, 16) and table.dtype == np.float32
    assert table[3, 4] == pytest.approx(0.29552020666133955, abs=1e-7)  # sin(3 / 10000^(4/16)) = sin(0.3)
    assert table[5, 1] == pytest.approx(0.28366218546322625, abs=1e-7)  # cos(5 / 10000^0) = cos(5)
    assert table[7, 8] == pytest.approx(0.06994284733753277, abs=1e-7)  # sin(7 / 10000^(8/16))
    assert table[7, 9] == pytest.approx(0.9975510002532796, abs=1e-7)  # cos(7 / 10000^(8/16))
    assert np.all(table[0, 0::2] == 0.0) and np.all(table[0, 1::2] == 1.0)


def test_causal_mask_convention() -> None:
    np.testing.assert_array_equal(model.causal_mask(3, 3), np.tril(np.ones((3, 3), dtype=bool)))
    # With 2 cached positions, the 2 new queries sit at absolute positions 2 and 3.
    np.testing.assert_array_equal(model.causal_mask(2, 4), [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_config_validation() -> None:
    assert ModelConfig(d_model=64).d_ff == 256
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({"n_layers": 2})
    cfg = preset("tiny", vocab_size=11)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_params_are_deterministic_and_named() -> None:
    cfg = preset("tiny", vocab_size=11)
    a, b, c = init_params(cfg, 0), init_params(cfg, 0), init_params(cfg, 1)
    assert list(a) == list(param_shapes(cfg))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["wte.weight"], c["wte.weight"])
    assert all(v.dtype == np.float32 for v in a.values())
    assert np.all(a["ln_f.weight"] == 1.0) and np.all(a["blocks.0.attn.qkv.bias"] == 0.0)
    # Residual projections are scaled down by 1/sqrt(2 * n_layer).
    assert a["blocks.0.mlp.proj.weight"].std() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    C, V = cfg.d_model, cfg.vocab_size
    assert count_params(a) == V * C + cfg.block_size * C + 2 * C + cfg.n_layer * (12 * C * C + 13 * C)
    check_params(cfg, a)
    with pytest.raises(ValueError, match="missing"):
        check_params(cfg, {k: v for k, v in a.items() if k != "ln_f.bias"})


def test_token_ids_are_validated() -> None:
    model.check_token_ids(np.array([0, 10]), 11)
    with pytest.raises(ValueError, match="token id 11"):
        model.check_token_ids(np.array([0, 11]), 11)
    with pytest.raises(ValueError, match="token id -1"):
        model.check_token_ids(np.array([-1, 3]), 11)


def test_lr_schedule_and_bias_corrections() -> None:
    cfg = optim.AdamWConfig(lr=1e-3, min_lr=1e-4, warmup=10, max_iters=110)
    assert optim.lr_at(0, cfg) == pytest.approx(1e-4)
    assert optim.lr_at(9, cfg) == pytest.approx(1e-3)
    assert optim.lr_at(60, cfg) == pytest.approx(0.55e-3)  # cosine midpoint
    assert optim.lr_at(110, cfg) == optim.lr_at(500, cfg) == pytest.approx(1e-4)
    assert optim.bias_corrections(1, cfg) == pytest.approx((0.1, 0.01))
    assert optim.bias_corrections(3, cfg) == pytest.approx((0.271, 0.029701))


def test_dropout_masks_are_reproducible_per_step() -> None:
    cfg = preset("tiny", vocab_size=11, dropout=0.25)
    m1, m2 = dropout.masks(cfg, 2, 8, 0, 5), dropout.masks(cfg, 2, 8, 0, 5)
    m3 = dropout.masks(cfg, 2, 8, 0, 6)
    assert list(m1) == list(dropout.sites(cfg, 2, 8))
    assert all(np.array_equal(m1[k], m2[k]) for k in m1)
    assert not np.array_equal(m1["emb"], m3["emb"])
    values = np.concatenate([m.ravel() for m in m1.values()])
    assert set(np.unique(values)) == {0.0, np.float32(1 / 0.75)}
    assert (values == 0).mean() == pytest.approx(0.25, abs=0.03)
    assert dropout.masks(cfg.replace(dropout=0.0), 2, 8, 0, 5) == {}


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_source_never_imports_a_framework() -> None:
    files = sorted(CORE_DIR.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        assert not _imported_modules(path) & set(FRAMEWORKS), f"{path.name} imports a framework"
        # importlib.import_module("mlx") would dodge the AST scan: forbid the names outright.
        assert not any(f'"{fw}' in path.read_text() or f"'{fw}" in path.read_text() for fw in FRAMEWORKS[:2])


def test_importing_core_loads_no_framework() -> None:
    modules = sorted(f"twinlm.core.{p.stem}" for p in CORE_DIR.glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    # The same probe sees a framework once one is imported, so it can fail.
    if importlib.util.find_spec("mlx") is not None:
        leaky = code.replace(f"for m in {modules!r}", f"for m in {modules + ['twinlm.backends.mlx']!r}")
        out = subprocess.run([sys.executable, "-c", leaky], capture_output=True, text=True, check=True)
        assert "mlx" in out.stdout


@pytest.mark.parametrize("name", ["numpy", "mlx", "tinygrad"])
def test_compact_dropout_masks_expand_to_the_float_masks_bit_for_bit(name: str) -> None:
    from conftest import backend_or_skip

    B = backend_or_skip(name)
    cfg = preset("tiny", vocab_size=11, dropout=0.2, lora_rank=2, lora_dropout=0.3)
    want = dropout.masks(cfg, 2, 8, 0, 5)
    keep = dropout.keep_masks(cfg, 2, 8, 0, 5)
    assert any(k.endswith(".lora") for k in keep)
    assert not any(k.endswith(".lora") for k in dropout.sites(cfg, 2, 8))  # the rule `expand` relies on
    assert all(m.dtype == np.bool_ for m in keep.values())  # one byte per unit on the way to the device
    sent = {k: B.from_numpy(m) for k, m in keep.items()}
    sent |= {k: B.from_numpy(v) for k, v in dropout.scales(cfg).items()}
    got = {k: B.to_numpy(v) for k, v in dropout.expand(B, sent).items()}
    assert list(got) == list(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert name == "numpy" or all(got[k].dtype == np.float32 for k in want)  # numpy computes in float64
    # Negative control: the two groups' scales swapped must change the LoRA sites' masks.
    swapped = sent | {dropout.SCALE: sent[dropout.LORA_SCALE], dropout.LORA_SCALE: sent[dropout.SCALE]}
    bad = {k: B.to_numpy(v) for k, v in dropout.expand(B, swapped).items()}
    assert not all(np.array_equal(bad[k], want[k]) for k in want)
