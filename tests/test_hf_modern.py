"""The modern Hugging Face families (Llama 3.x, Qwen2.5, Qwen3, Mistral, Phi-3, Gemma 2 and 3) checked
`transformers`: tiny random models built from each real model's config.json (sizes shrunk, every other
field kept), then logits within 1e-4 on numpy, MLX and tinygrad on a sequence past RoPE scaling's
pre-training context and the sliding window, greedy tokens equal to `generate`, the export round trip
bit-identical and loadable, and a negative control per mapper."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import transformers  # noqa: F401
except ImportError:  # the [hf] extra (see tests/test_hf.py)
    if sys.version_info < (3, 11):
        pytest.skip("the Hugging Face checks need Python 3.11+ (the [hf] extra)", allow_module_level=True)
    pytest.fail("tests/test_hf_modern.py needs the [hf] extra: pip install -e '.[hf]'", pytrace=False)
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from tests import hf_models  # noqa: E402
from twinlm.backends import get_backend  # noqa: E402
from twinlm.core import layers as L  # noqa: E402
from twinlm.core import model  # noqa: E402
from twinlm.generate import generate, stop_ids  # noqa: E402
from twinlm.hf import HFError, archs, export_hf, import_hf, read_hf  # noqa: E402

TOL = 1e-4
NAMES = tuple(hf_models.MODERN)
T = 48  # > 3x the 16-position pre-training context of the Llama 3 RoPE scaling


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_modern")
    return {n: hf_models.build_modern(n, root / n) for n in NAMES}


def _ids() -> np.ndarray:
    return ((np.arange(T) * 7 + 3) % 250 + 2)[None, :].astype(np.int64)


def hf_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    m = getattr(tf, arch).from_pretrained(folder).eval()
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.numpy()


def twin_logits(backend: str, cfg, params: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    B = get_backend(backend)
    p = {k: B.from_numpy(v) for k, v in params.items()}
    return B.to_numpy(model.logits(B, cfg, p, B.from_numpy(ids.astype(np.int32))))


def diff(folder: Path, backend: str = "numpy", cfg=None, params=None) -> float:
    read_cfg, read_params, *_ = read_hf(folder)
    ids = _ids()
    got = twin_logits(backend, cfg or read_cfg, read_params if params is None else params, ids)
    return float(np.abs(got - hf_logits(folder, ids)).max())


@pytest.mark.parametrize("backend", ("numpy", "mlx", "tinygrad"))
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(folders, name, backend):
    assert diff(folders[name], backend) < TOL


@pytest.mark.parametrize("backend", ("mlx", "tinygrad"))
@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(folders, name, backend):
    folder = folders[name]
    cfg, params, tok, _, _ = read_hf(folder)
    prompt = tok.encode("the dog sat")[None, :].astype(np.int64)
    m = getattr(tf, hf_models.MODERN[name][0]).from_pretrained(folder).eval()
    m.generation_config.eos_token_id = None  # 32 tokens, whatever they are
    with torch.no_grad():
        out = m.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False)
    want = out[0, prompt.shape[1]:].numpy()
    B = get_backend(backend)
    got = np.concatenate(list(generate(B, cfg, {k: B.from_numpy(v) for k, v in params.items()}, prompt, 32,
                                       temperature=0.0)))
    assert len(want) == 32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip_is_bit_identical_and_loads(folders, name, tmp_path):
    from safetensors.numpy import load_file

    run, _ = import_hf(folders[name], tmp_path / "run")
    out, _ = export_hf(run, tmp_path / "out")
    before, after = load_file(folders[name] / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and np.array_equal(after[key], value), key
    architecture = hf_models.MODERN[name][0]
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    _, info = getattr(tf, architecture).from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert diff(out) < TOL  # the exported config (RoPE scaling, head_dim, ...) means the same model


def test_rope_inv_freq_matches_transformers():
    """The pinned llama3 and linear tables against transformers' own functions, at Llama 3.2's values."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    c = tf.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=rope)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
    got = L.rope_inv_freq(64, 500000.0, ("llama3", 32.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-6)
    assert not np.allclose(got, L.rope_inv_freq(64, 500000.0), rtol=1e-3)  # the scaling changes something
    c = tf.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(
        rope_type="linear", rope_theta=1e4, factor=4.0))
    want, _ = ROPE_INIT_FUNCTIONS["linear"](c, "cpu")
    np.testing.assert_allclose(L.rope_inv_freq(16, 1e4, ("linear", 4.0)), want.double().numpy(), rtol=1e-6)


# ---- negative controls: each mapper's own piece, dropped or changed, is caught ---------------------------


@pytest.mark.parametrize(
    "name,change",
    [
        ("Llama-3.2-1B", dict(rope_type="default")),  # the llama3 scaling skipped
        ("Llama-3.2-1B", dict(rope_original_positions=32)),  # a wrong pre-training context
        ("Qwen3-0.6B", dict(qk_norm=False)),  # q/k norms skipped
        ("Qwen3-0.6B", dict(rope_theta=1e4)),  # a wrong RoPE base
        ("Mistral-7B-v0.1", dict(sliding_window=9)),  # the window off by one
        ("Mistral-7B-v0.1", dict(sliding_window=0)),  # no window
        ("Phi-3-mini-4k", dict(sliding_window=6)),  # Phi-3's window off by one
        ("Phi-4-mini", dict(rope_dim=0)),  # the whole head rotated, not its first 3/4
        ("Phi-4-mini", dict(rope_dim=8)),  # too few dimensions rotated
        ("Gemma-3-270M", dict(norm_offset=False)),  # RMSNorm x * w instead of Gemma's x * (1 + w)
        ("Gemma-3-270M", dict(embed_scale=False)),  # embeddings not scaled by sqrt(d_model)
        ("Gemma-3-270M", dict(post_norms=False)),  # the post-attention and post-MLP norms skipped
        ("Gemma-3-270M", dict(query_scale=0.0)),  # 1/sqrt(head_dim) instead of query_pre_attn_scalar
        ("Gemma-3-270M", dict(rope_local_theta=1e6)),  # the global RoPE base on the local layers
        ("Gemma-3-270M", dict(sliding_window=9)),  # the window off by one
        ("Gemma-2-2B", dict(attn_softcap=0.0)),  # the attention soft-cap dropped
        ("Gemma-2-2B", dict(final_softcap=0.0)),  # the final soft-cap dropped
        ("Gemma-2-2B", dict(layer_types=("full_attention", "sliding_attention"))),  # the pattern shifted
    ],
)
def test_control_config_change_is_caught(folders, name, change):
    cfg, params, *_ = read_hf(folders[name])
    params = {k: v for k, v in params.items() if not (change.get("qk_norm") is False and "_norm." in k)}
    assert diff(folders[name], "numpy", dataclasses.replace(cfg, **change), params) > 100 * TOL


def test_control_qwen2_bias_dropped_is_caught(folders):
    cfg, params, *_ = read_hf(folders["Qwen2.5-0.5B"])
    zeroed = {k: np.zeros_like(v) if k.endswith("qkv.bias") else v for k, v in params.items()}
    assert diff(folders["Qwen2.5-0.5B"], "numpy", cfg, zeroed) > 100 * TOL


def test_control_phi3_gate_up_halves_swapped_is_caught(folders):
    """gate_up_proj read as up|gate instead of gate|up (the fused tensor's halves in the wrong order)."""
    cfg, params, *_ = read_hf(folders["Phi-3-mini-4k"])
    swapped = dict(params)
    for i in range(cfg.n_layer):
        w = params[f"blocks.{i}.mlp.fc.weight"]
        swapped[f"blocks.{i}.mlp.fc.weight"] = np.concatenate([w[:, cfg.d_ff:], w[:, :cfg.d_ff]], axis=1)
    assert diff(folders["Phi-3-mini-4k"], "numpy", cfg, swapped) > 100 * TOL


def test_control_qwen2_kv_bias_swapped_is_caught(folders, monkeypatch):
    arch = archs.ARCHS["Qwen2ForCausalLM"]
    links = arch.links

    def swapped(cfg, a):
        return [dataclasses.replace(x, hf=(x.hf[0], x.hf[2], x.hf[1])) if x.twin.endswith("qkv.bias") else x
                for x in links(cfg, a)]

    monkeypatch.setitem(archs.ARCHS, "Qwen2ForCausalLM", dataclasses.replace(arch, links=swapped))
    assert diff(folders["Qwen2.5-0.5B"]) > 100 * TOL


# ---- refusals and end tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,changes,match",
    [
        ("Llama-3.2-1B", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ("Llama-3.2-1B", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
         "low_freq_factor"),
        ("Qwen2.5-0.5B", {"use_sliding_window": True}, "use_sliding_window"),
        ("Qwen3-0.6B", {"attention_bias": True}, "attention_bias"),
        ("Qwen3-0.6B", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("Mistral-7B-v0.1", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ("Gemma-3-270M", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("Gemma-3-270M", {"hidden_activation": "gelu"}, "hidden_activation"),
        ("Gemma-2-2B", {"attention_bias": True}, "attention_bias"),
        ("Phi-3-mini-4k", {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
         "longrope"),
    ],
)
def test_unsupported_fields_are_refused_by_name(folders, tmp_path, name, changes, match):
    import shutil

    folder = Path(shutil.copytree(folders[name], tmp_path / "copy"))
    hf = json.loads((folder / "config.json").read_text())
    hf.pop("rope_parameters", None) if "rope_scaling" in changes else None
    hf.update(changes)
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(HFError, match=match):
        read_hf(folder)


def test_generation_stops_at_any_eos_of_generation_config(tmp_path):
    """generation_config.json's eos list and the tokenizer's end token are all stops (Llama 3.x style)."""
    folder = hf_models.build_modern("Llama-3.2-1B", tmp_path / "m")
    cfg, params, tok, record, _ = read_hf(folder)
    B = get_backend("numpy")
    p = {k: B.from_numpy(v) for k, v in params.items()}
    prompt = tok.encode("the dog sat")[None, :]
    free = np.concatenate(list(generate(B, cfg, p, prompt, 12, temperature=0.0)))
    end = int(free[5])  # a token greedy decoding reaches: make it an end token
    first = int(np.flatnonzero(free == end)[0])
    record["generation_config"] = {"eos_token_id": [7, end]}
    stop = stop_ids(tok, record)
    assert stop == {tok.roles["eos"], 7, end}
    got = np.concatenate(list(generate(B, cfg, p, prompt, 12, temperature=0.0, stop=stop)))
    np.testing.assert_array_equal(got, free[: first + 1])  # the end token is the last one produced
    record["generation_config"] = {"eos_token_id": end}  # an int, not a list
    assert stop_ids(tok, record) == {tok.roles["eos"], end}


@pytest.mark.parametrize("backend", ("numpy", "mlx", "tinygrad"))
def test_sliding_window_cache_matches_the_full_recompute(folders, backend):
    """Generation past the window: the KV-cache decoders (growing on MLX, fixed-shape on tinygrad) give the
    tokens of recomputing the whole context each step, and the window changes them (so it is applied)."""
    cfg, params, tok, _, _ = read_hf(folders["Mistral-7B-v0.1"])
    B = get_backend(backend)
    p = {k: B.from_numpy(v) for k, v in params.items()}
    prompt = tok.encode("the dog sat on the")[None, :]
    assert prompt.shape[1] < cfg.sliding_window < prompt.shape[1] + 24

    def run(c, use_cache):
        return np.concatenate(list(generate(B, c, p, prompt, 24, temperature=0.0, use_cache=use_cache)))

    cached = run(cfg, True)
    np.testing.assert_array_equal(cached, run(cfg, False))
    assert not np.array_equal(cached, run(dataclasses.replace(cfg, sliding_window=0), True))


def test_gemma_final_logit_softcap_matches_transformers(tmp_path):
    """Gemma 2's final soft-cap (cap * tanh(logits / cap)) on a Gemma 3 built with one; dropping it is
    caught."""
    folder = hf_models.build_modern("Gemma-3-270M", tmp_path / "g", final_logit_softcapping=5.0)
    cfg, params, *_ = read_hf(folder)
    assert cfg.final_softcap == 5.0
    assert diff(folder) < TOL
    assert diff(folder, "numpy", dataclasses.replace(cfg, final_softcap=0.0), params) > 100 * TOL
