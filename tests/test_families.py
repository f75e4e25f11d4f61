"""Model families: the layer library against golden values, each registered family (core.models.FAMILIES)
across backends (forward, every gradient, AdamW steps, float64 finite differences), the invariants
(no future leakage, padding never leaks into real positions, KV cache equals recomputation with GQA),
the spec driving init/decay/freezing, and masked-LM batches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_BACKENDS, TRAINABLE, backend_or_skip

from twinlm import parity
from twinlm.core import layers, model
from twinlm.core import spec as SP
from twinlm.core import step as S
from twinlm.core.backend import Backend
from twinlm.core.config import ConfigError, ModelConfig
from twinlm.core.models import FAMILIES as REGISTRY
from twinlm.core.params import init_params
from twinlm.core.tokenizers import CharTokenizer
from twinlm.parity import Side
from twinlm.tasks.mlm import SPECIALS, encoder_tokenizer, mask_tokens

# Every registered family: adding one to core.models.FAMILIES puts it through every test below.
FAMILIES = tuple(REGISTRY)


def cfg_of(arch: str) -> ModelConfig:
    """The parity suite's model of the family (llama: 4 heads, 2 kv heads), at most 16 positions."""
    cfg = parity.arch_config(arch, "tiny", 32)
    return cfg.replace(block_size=min(16, cfg.block_size))


# ---- golden values, computed by hand in float64 and pasted ----------------------------------------

# x = [1, 2, 3, 4] at position 1, theta 10000: angles (1, 0.01); pairs (x[i], x[i + 2]) rotate.
GOLDEN_ROPE = [-1.9841106485555495, 1.959900667496664, 2.4623779024123156, 4.019799668334994]
# x = [1, 2, 3, 4], weight [1, 0.5, 2, -1], eps 1e-5: x / sqrt(7.5 + 1e-5) * weight.
GOLDEN_RMS_NORM = [0.3651481282381064, 0.3651481282381064, 2.1908887694286383, -1.4605925129524255]


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_golden_rope_and_rms_norm(name: str) -> None:
    B = backend_or_skip(name)
    cos, sin = layers.rope_tables(2, 4, 10000.0)
    x = np.array([1, 2, 3, 4], np.float32).reshape(1, 1, 1, 4)
    got = B.to_numpy(B.rope(B.from_numpy(x), B.from_numpy(cos[1:2]), B.from_numpy(sin[1:2])))
    atol = 1e-6  # float32 tables: cos and sin rounded by up to 6e-8
    np.testing.assert_allclose(got.ravel(), GOLDEN_ROPE, rtol=0, atol=atol)
    w = np.array([1, 0.5, 2, -1], np.float32)
    got = B.to_numpy(B.rms_norm(B.from_numpy(x.reshape(1, 4)), B.from_numpy(w)))
    np.testing.assert_allclose(got.ravel(), GOLDEN_RMS_NORM, rtol=0, atol=atol)
    # Negative controls: the interleaved layout and tinygrad's eps give other numbers.
    wrong = parity.with_mixin(B, parity.InterleavedRope, "Rope")
    bad = B.to_numpy(wrong.rope(B.from_numpy(x), B.from_numpy(cos[1:2]), B.from_numpy(sin[1:2])))
    assert np.abs(bad.ravel() - GOLDEN_ROPE).max() > 0.1
    eps = parity.with_mixin(B, parity.WrongRmsNormEps, "Eps")
    small = np.array([[1e-3, -2e-3, 1e-3, 0.0]], np.float32)  # eps matters only for small activations
    a, b = (B.to_numpy(be.rms_norm(be.from_numpy(small), be.from_numpy(w))) for be in (B, eps))
    assert np.abs(a - b).max() > 1e-2


def test_rope_rotates_by_relative_position() -> None:
    # <rope(q, m), rope(k, n)> depends on m - n only: the property rotary positions exist for.
    B = backend_or_skip("numpy")
    cos, sin = layers.rope_tables(12, 8, 10000.0)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 1, 1, 8)), rng.standard_normal((1, 1, 1, 8))

    def dot(m: int, n: int) -> float:
        return float((B.rope(q, cos[m], sin[m]) * B.rope(k, cos[n], sin[n])).sum())

    # float32 tables: equal to ~1e-7 (a different offset moves it by ~1)
    assert dot(5, 2) == pytest.approx(dot(10, 7), abs=1e-6)
    assert dot(5, 2) != pytest.approx(dot(5, 3), abs=1e-3)


def test_family_configs_and_their_errors() -> None:
    llama = ModelConfig(arch="llama", d_model=64, n_head=4, n_kv_head=2)
    assert (llama.norm, llama.activation, llama.pos_encoding) == ("rmsnorm", "swiglu", "rope")
    assert not llama.bias
    assert llama.d_ff == 176 and llama.norm_eps == 1e-5  # 8/3 * 64 rounded up to a multiple of 16
    bert = ModelConfig(arch="bert")
    assert (bert.kind, bert.norm_eps, bert.type_vocab_size) == ("encoder", 1e-12, 2)
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()  # old GPT configs load as GPT
    for bad, match in ((dict(arch="mamba"), "unknown arch"), (dict(n_head=4, n_kv_head=3), "must divide"),
                       (dict(arch="llama", d_model=36, n_head=4), "even head size"),
                       (dict(pos_encoding="alibi"), "pos_encoding")):
        with pytest.raises(ConfigError, match=match):
            ModelConfig(**bad)


def test_spec_drives_init_decay_and_freezing() -> None:
    cfg = cfg_of("bert")
    spec = model.param_spec(cfg)
    params = init_params(cfg, 0)
    assert list(params) == list(spec)
    assert all(np.all(params[k] == 0) for k, s in spec.items() if s.init == "zeros")
    assert all(np.all(params[k] == 1) for k, s in spec.items() if s.init == "ones")
    assert not spec["pooler.weight"].trainable  # masked-LM pretraining never reads the pooler
    assert model.param_spec(cfg.replace(n_classes=3))["pooler.weight"].trainable
    assert {k for k, s in spec.items() if not s.decay} == {k for k, v in params.items() if v.ndim < 2}
    state = S.init_state(params, spec)
    assert "param.pooler.weight" in state and "m.pooler.weight" not in state


@pytest.mark.parametrize("name", TRAINABLE)
def test_frozen_parameters_do_not_move(name: str) -> None:
    B = backend_or_skip(name)
    cfg = cfg_of("llama")
    spec = model.param_spec(cfg)
    keep = ["head.weight"]
    frozen = SP.frozen_except(spec, keep)
    params = init_params(cfg, 0)
    step = B.compile_step(S.make_train_step(B, frozen, parity.train_opt(3), model.lm_loss_fn(B, cfg)),
                          {k: B.from_numpy(v) for k, v in S.init_state(params, frozen).items()})
    for it, batch in enumerate(parity.train_batches(cfg, 2, cfg.block_size, 3, 0)):
        scalars = (B.from_numpy(v) for v in S.step_scalars(it, parity.train_opt(3)))
        step({k: B.from_numpy(v) for k, v in batch.items()}, {}, *scalars)
    after = {k: B.to_numpy(v) for k, v in S.params_of(step.state).items()}
    assert np.abs(after["head.weight"] - params["head.weight"]).max() > 1e-4
    assert all(np.array_equal(after[k], params[k]) for k in params if k not in keep)


# ---- each family across backends --------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_runs() -> dict[tuple[str, str, str], parity.ModelRun]:
    out = {}
    for arch in FAMILIES:
        cfg = cfg_of(arch)
        batch = parity.parity_batch(cfg, np.random.default_rng(0), 2, cfg.block_size)
        weights = {"init": init_params(cfg, 0), "unit-scale": parity.unit_scale_params(cfg, 0)}
        for name in ALL_BACKENDS:
            for w, p in weights.items():
                out[(arch, name, w)] = parity.model_run(Side.clean(backend_or_skip(name)), cfg, p, batch)
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_model_parity(family_runs, arch: str) -> None:
    failed = []
    n_trainable = sum(s.trainable for s in model.param_spec(cfg_of(arch)).values())
    for w in ("init", "unit-scale"):
        for a, b in (("mlx", "tinygrad"), ("mlx", "numpy"), ("tinygrad", "numpy")):
            got, want = family_runs[(arch, a, w)], family_runs[(arch, b, w)]
            checks = parity.compare_model(f"{arch} {w}: {a} vs {b}", got, want)
            assert len(checks) == 2 + (n_trainable if want.grads is not None else 0)
            failed += [f"{c.label}: {c.max_abs:.3g}" for c in checks if not c.ok]
            assert np.abs(got.logits).max() > 0.1
    assert not failed, failed


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_ten_adamw_steps_match(arch: str) -> None:
    cfg = cfg_of(arch).replace(dropout=0.1)
    params = init_params(cfg, 0)
    batches = parity.train_batches(cfg, 2, cfg.block_size, 10, seed=0)
    sides = [Side.clean(backend_or_skip(n)) for n in TRAINABLE]
    runs = [parity.train_run(side, cfg, params, batches, parity.train_opt(10), 0) for side in sides]
    checks = parity.compare_train(f"{arch} mlx vs tinygrad", *runs)
    assert all(c.ok for c in checks), [f"{c.label}: {c.max_abs:.3g}" for c in checks if not c.ok]
    moved = max(np.abs(runs[0].params[k] - params[k]).max() for k in params)
    assert moved > 50 * parity.TRAIN_PARAM_TOL.atol  # not vacuous: the weights moved far past the tolerance


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_float64_finite_differences_tinygrad(arch: str) -> None:
    cfg = cfg_of(arch).replace(n_layer=1)
    B = backend_or_skip("tinygrad")
    if not B.supports_float64:  # asked of the device: Metal has none, OpenCL only with cl_khr_fp64
        pytest.skip(f"tinygrad's device {B.device_info()['device']} has no float64")
    batch = parity.parity_batch(cfg, np.random.default_rng(2), 2, min(8, cfg.block_size))
    checks = parity.fd_gradient_checks(B, cfg, init_params(cfg, 0), batch)
    assert len(checks) == 1 + sum(s.trainable for s in model.param_spec(cfg).values())
    assert all(c.ok for c in checks), [f"{c.label}: {c.max_abs:.3g}" for c in checks if not c.ok]


# ---- invariants -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("arch", FAMILIES)
def test_no_leakage_future_or_padding(arch: str, name: str) -> None:
    cfg = cfg_of(arch)
    batch = parity.parity_batch(cfg, np.random.default_rng(0), 2, cfg.block_size)
    checks = parity.leakage_checks(Side.clean(backend_or_skip(name)), cfg, init_params(cfg, 0), batch)
    assert checks and all(c.ok for c in checks), [c.label for c in checks if not c.ok]
    if arch == "bert":  # the check has something to check: row 1 really has padding
        assert not batch["mask"][1].all()
        ignored = Side.injected(backend_or_skip(name), parity.control_named("padding-ignored"))
        assert not any(c.ok for c in parity.leakage_checks(ignored, cfg, init_params(cfg, 0), batch))


def _greedy(B: Backend, cfg: ModelConfig, p: dict, strategy: str, tokens: np.ndarray, n: int) -> np.ndarray:
    from twinlm.generate import make_decoder

    dec, logits = make_decoder(B, cfg, p, tokens.shape[0], strategy), []
    for _ in range(n):
        lg = dec.next_logits(tokens)
        logits.append(lg)
        tokens = np.concatenate([tokens, lg.argmax(-1).astype(np.int32)[:, None]], axis=1)
    return np.stack(logits)


@pytest.mark.parametrize("name", ["mlx", "tinygrad"])
def test_llama_kv_cache_with_gqa_equals_recomputation(name: str) -> None:
    cfg = cfg_of("llama").replace(block_size=8)
    assert cfg.n_kv_head < cfg.n_head
    B = backend_or_skip(name)
    rng = np.random.default_rng(2)
    p = {k: B.from_numpy(rng.normal(0.0, 0.3, v.shape).astype(np.float32) if v.ndim == 2 else v)
         for k, v in init_params(cfg, 0).items()}
    x = rng.integers(0, cfg.vocab_size, (2, 3)).astype(np.int32)
    ref = _greedy(B, cfg, p, "full", x, 10)  # 3 + 10 > 8: the window shifts too
    strategies = ("kv",) if name == "mlx" else ("fixed",)
    for strategy in strategies:
        np.testing.assert_allclose(_greedy(B, cfg, p, strategy, x, 10), ref, atol=1e-4, rtol=1e-4)


# ---- masked-LM batches ----------------------------------------------------------------------------

def test_mask_tokens_follows_bert_and_is_reproducible() -> None:
    tok = encoder_tokenizer(CharTokenizer("abcdefghij"))
    assert tok.vocab_size == 10 + len(SPECIALS)
    x = np.random.default_rng(0).integers(0, 10, (64, 128)).astype(np.int32)
    x[:, 0] = tok.id_of("[CLS]")
    b = mask_tokens(x, tok, np.random.default_rng([1, 2]))
    again = mask_tokens(x, tok, np.random.default_rng([1, 2]))
    assert all(np.array_equal(b[k], again[k]) for k in b)
    sel = b["w"] > 0
    assert not sel[:, 0].any() and sel.any(axis=1).all()
    assert 0.13 < sel.mean() < 0.17
    masked = b["x"] == tok.id_of("[MASK]")
    assert not (masked & ~sel).any() and np.array_equal(b["x"][~sel], x[~sel])
    assert 0.75 < masked[sel].mean() < 0.85
    kept = (b["x"] == x) & sel
    assert 0.07 < kept[sel].mean() < 0.15  # 10% kept + random draws that hit the same token
    assert np.array_equal(b["y"], x)


def test_classify_head_pools_the_right_position() -> None:
    B = backend_or_skip("numpy")
    h = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)
    pool = np.array([[0, 0, 1], [1, 0, 0]], np.float32)
    np.testing.assert_array_equal(layers.pool_at(B, h, pool), [h[0, 2], h[1, 0]])
