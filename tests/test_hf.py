"""Hugging Face import/export checked against `transformers` itself (the `[hf]` extra): tiny random models
of every architecture, built and saved locally by the tests, imported, then logits within 1e-4 and
greedy tokens identical on both backends; export round trips; and a broken mapper the checks catch."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import transformers  # noqa: F401
except ImportError:  # the [hf] extra: make test installs it (on Python 3.11+, where its torch build exists)
    if sys.version_info < (3, 11):
        pytest.skip("the Hugging Face checks need Python 3.11+ (the [hf] extra)", allow_module_level=True)
    pytest.fail(
        "tests/test_hf.py needs the [hf] extra: pip install -e '.[hf]' (make test installs it)", pytrace=False
    )
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import run_cli  # noqa: E402

from tests import hf_models  # noqa: E402
from twinlm.backends import get_backend  # noqa: E402
from twinlm.cli.main import cli  # noqa: E402
from twinlm.core import model  # noqa: E402
from twinlm.core.layers import padding_mask  # noqa: E402
from twinlm.core.models import family  # noqa: E402
from twinlm.generate import generate  # noqa: E402
from twinlm.hf import HFError, archs, export_hf, import_hf, read_hf  # noqa: E402
from twinlm.run_dir import load_model  # noqa: E402

TOL = 1e-4
BACKENDS = ("mlx", "tinygrad")
TEXT = "the cat sat on the red mat and said catred."


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {a: hf_models.build(a, root / a) for a in hf_models.ARCHITECTURES}


def hf_output(folder: Path, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    m = getattr(tf, json.loads((folder / "config.json").read_text())["architectures"][0]).from_pretrained(
        folder
    )
    with torch.no_grad():
        out = m.eval()(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long),
        )
    return (out.last_hidden_state if isinstance(m, tf.BertModel) else out.logits).numpy()


def twin_output(B, cfg, params: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray | None = None):
    """What the same model class computes in twinlm: LM logits, class logits or (BertModel) hidden states."""
    p = {k: B.from_numpy(v) for k, v in params.items()}
    x = B.from_numpy(ids.astype(np.int32))
    kw = {} if mask is None else {"mask": B.from_numpy(padding_mask(mask.sum(1), ids.shape[1]))}
    if cfg.n_classes:
        pool = np.zeros(ids.shape, np.float32)
        pool[:, 0] = 1.0
        return B.to_numpy(model.classify(B, cfg, p, x, B.from_numpy(pool), **kw))
    return B.to_numpy(model.logits(B, cfg, p, x, **kw))


def encoded(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = [tok.encode(t)[:30] for t in texts]
    T = max(len(r) for r in rows)
    ids, mask = np.zeros((len(rows), T), np.int64), np.zeros((len(rows), T), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def compare(folder: Path, backend: str, params: dict | None = None) -> float:
    """Max |twinlm - transformers| over a padded batch of two texts (padding masked for encoders)."""
    cfg, imported, tok, record, _ = read_hf(folder)
    params = imported if params is None else params
    B = get_backend(backend)
    if cfg.kind == "decoder":
        ids, _ = encoded(tok, [TEXT])
        return float(np.abs(twin_output(B, cfg, params, ids) - hf_output(folder, ids)).max())
    ids, mask = encoded(tok, [TEXT, "the owl"])
    ref = hf_output(folder, ids, mask)
    if record["architecture"] == "BertModel":
        p = {k: B.from_numpy(v) for k, v in params.items()}
        h, _ = family("bert").hidden(
            B,
            cfg,
            p,
            B.from_numpy(ids.astype(np.int32)),
            mask=B.from_numpy(padding_mask(mask.sum(1), ids.shape[1])),
        )
        got = B.to_numpy(h)
    else:
        got = twin_output(B, cfg, params, ids, mask)
    keep = mask.astype(bool) if got.ndim == 3 else np.ones(got.shape[0], bool)
    return float(np.abs(got - ref)[keep].max())  # padded positions' outputs are not compared


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("architecture", hf_models.ARCHITECTURES)
def test_imported_model_matches_transformers(folders, architecture, backend):
    assert compare(folders[architecture], backend) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_greedy_generation_matches_transformers(folders, architecture, backend):
    folder = folders[architecture]
    cfg, params, tok, _, _ = read_hf(folder)
    prompt = tok.encode("the dog sat")[None, :].astype(np.int64)
    m = getattr(tf, architecture).from_pretrained(folder).eval()
    m.generation_config.eos_token_id = None  # 32 tokens, whatever they are
    with torch.no_grad():
        want = m.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False)[
            0, prompt.shape[1] :
        ].numpy()
    B = get_backend(backend)
    got = np.concatenate(
        list(generate(B, cfg, {k: B.from_numpy(v) for k, v in params.items()}, prompt, 32, temperature=0.0))
    )
    assert len(want) == 32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("architecture", hf_models.ARCHITECTURES)
def test_hf_to_twinlm_to_hf_is_bit_identical(folders, architecture, tmp_path):
    from safetensors.numpy import load_file

    run, _ = import_hf(folders[architecture], tmp_path / "run")
    out, _ = export_hf(run, tmp_path / "out")
    before, after = (
        load_file(folders[architecture] / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and np.array_equal(after[name], value), name
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == [architecture]


@pytest.mark.parametrize("arch", ["gpt", "llama", "bert"])
def test_a_twinlm_model_exports_to_transformers(arch, tmp_path):
    """A model twinlm trained (never seen by transformers) loads with no missing or unexpected weights and
    gives the same logits."""
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "train",
            "--backend",
            "mlx",
            "--arch",
            arch,
            "--max-iters",
            "3",
            "--eval-every",
            "3",
            "--out",
            str(tmp_path / "run"),
            "--tokenizer",
            "bpe",
            "--vocab-size",
            "300",
            "--data",
            str(_corpus(tmp_path)),
            "--block-size",
            "16",
            "--n-layer",
            "1",
            "--d-model",
            "32",
            "--batch-size",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    out, _ = export_hf(tmp_path / "run", tmp_path / "hf")
    cfg, params, tok, _ = load_model(tmp_path / "run")
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    m, info = getattr(tf, architecture).from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = np.array([[1, 5, 9, 200, 3, 7, 11, 100]])
    with torch.no_grad():
        ref = m.eval()(torch.tensor(ids)).logits.numpy()
    assert np.abs(twin_output(get_backend("mlx"), cfg, params, ids) - ref).max() < TOL
    if arch != "bert":
        assert (out / "tokenizer.json").exists()
        hf_tok = tf.AutoTokenizer.from_pretrained(out)
        assert hf_tok(TEXT)["input_ids"] == tok.encode(TEXT).tolist()


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(hf_models.TEXT * 20)
    return path


# ---- negative controls: a broken mapper is caught ------------------------------------------------


def _broken(monkeypatch, architecture: str, rewrite) -> None:
    arch = archs.ARCHS[architecture]
    links = arch.links
    monkeypatch.setitem(
        archs.ARCHS,
        architecture,
        dataclasses.replace(arch, links=lambda cfg, a: [rewrite(cfg, x) for x in links(cfg, a)]),
    )


def _transposed(suffix: str):
    return lambda cfg, link: (
        dataclasses.replace(link, transpose=not link.transpose) if link.twin.endswith(suffix) else link
    )


def _interleaved_rope(params: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """q and k columns in Meta's interleaved-pair order instead of HF's half-split one."""
    hs, out = cfg.head_dim, dict(params)
    perm = np.concatenate([np.arange(0, hs, 2), np.arange(1, hs, 2)])
    for i in range(cfg.n_layer):
        w = params[f"blocks.{i}.attn.qkv.weight"].copy()
        n_qk = (cfg.n_head + cfg.n_kv_head) * hs
        heads = w[:, :n_qk].reshape(w.shape[0], -1, hs)
        w[:, :n_qk] = heads[:, :, perm].reshape(w.shape[0], n_qk)
        out[f"blocks.{i}.attn.qkv.weight"] = w
    return out


@pytest.mark.parametrize(
    "architecture,suffix",
    [
        ("GPT2LMHeadModel", "attn.proj.weight"),
        ("BertForMaskedLM", "attn.proj.weight"),
        ("BertForSequenceClassification", "pooler.weight"),
    ],
)
def test_control_transposed_weight_is_caught(folders, monkeypatch, architecture, suffix):
    assert compare(folders[architecture], "mlx") < TOL
    _broken(monkeypatch, architecture, _transposed(suffix))
    assert compare(folders[architecture], "mlx") > 100 * TOL


def test_control_swapped_qk_is_caught(folders, monkeypatch):
    def swap(cfg, link):
        return (
            dataclasses.replace(link, hf=(link.hf[1], link.hf[0], link.hf[2])) if "qkv" in link.twin else link
        )

    _broken(monkeypatch, "LlamaForCausalLM", swap)
    with pytest.raises(HFError, match="shape"):  # grouped-query attention: k is narrower than q
        compare(folders["LlamaForCausalLM"], "mlx")


def test_control_swapped_kv_is_caught(folders, monkeypatch):
    def swap(cfg, link):
        return (
            dataclasses.replace(link, hf=(link.hf[0], link.hf[2], link.hf[1])) if "qkv" in link.twin else link
        )

    _broken(monkeypatch, "LlamaForCausalLM", swap)  # same shapes: only the logits can tell
    assert compare(folders["LlamaForCausalLM"], "mlx") > 100 * TOL


def test_control_wrong_rope_layout_is_caught(folders):
    cfg, params, *_ = read_hf(folders["LlamaForCausalLM"])
    assert compare(folders["LlamaForCausalLM"], "mlx", _interleaved_rope(params, cfg)) > 100 * TOL


# ---- what is refused ---------------------------------------------------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "architecture,changes,match",
    [
        (
            "LlamaForCausalLM",
            {"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}},
            "RoPE scaling",
        ),
        ("LlamaForCausalLM", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling"),
        ("LlamaForCausalLM", {"attention_bias": True}, "attention_bias"),
        ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act"),
        ("GPT2LMHeadModel", {"activation_function": "relu"}, "activation_function"),
        ("GPT2LMHeadModel", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("BertForMaskedLM", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("GPT2LMHeadModel", {"architectures": ["GPT2ForTokenClassification"]}, "architecture"),
    ],
)
def test_unsupported_settings_are_refused(folders, tmp_path, architecture, changes, match):
    folder = _copy(folders[architecture], tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(HFError, match=match):
        read_hf(folder)


def test_pickled_weights_are_refused_without_unpickling(tmp_path, folders, capsys, monkeypatch):
    folder = _copy(folders["GPT2LMHeadModel"], tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle to open")
    code, _, err = run_cli(["import-hf", str(folder), "--out", str(tmp_path / "run")], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and "never unpickles" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_unexpected_tensor_is_refused(tmp_path, folders):
    from safetensors.numpy import load_file, save_file

    folder = _copy(folders["GPT2LMHeadModel"], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(HFError, match="extra"):
        read_hf(folder)


def test_sharded_bf16_weights_import(tmp_path, folders):
    """Sharded files with an index, in bfloat16, load as those bf16 numbers, kept in bf16 (no float32 copy),
    and the import records the dtype; export-hf writes bfloat16 back, which transformers reads unchanged."""
    from twinlm.core import dtypes as D

    m = tf.LlamaForCausalLM.from_pretrained(folders["LlamaForCausalLM"]).to(torch.bfloat16)
    m.save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / name).write_bytes((folders["LlamaForCausalLM"] / name).read_bytes())
    assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    cfg, params, _, record, _ = read_hf(tmp_path / "bf16")
    assert record["dtype"] == "bfloat16" and all(D.is_bf16(v) for v in params.values())
    want = m.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(D.as_float32(params["blocks.1.mlp.proj.weight"]), want)
    qkv = D.as_float32(params["blocks.0.attn.qkv.weight"])  # three tensors fused, transposed, as bits
    q = m.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(qkv[:, :q.shape[1]], q)
    import_hf(tmp_path / "bf16", tmp_path / "run")
    _, stored, _, meta = load_model(tmp_path / "run")
    assert meta.dtype == "bfloat16" and all(D.is_bf16(v) for v in stored.values())
    assert sum(v.nbytes for v in stored.values()) == sum(p.numel() * 2 for p in m.parameters())
    export_hf(tmp_path / "run", tmp_path / "out")
    back = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert back.dtype == torch.bfloat16
    for (name, p), q in zip(m.named_parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q), name


# ---- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_import_sample_export(folders, tmp_path, backend):
    runner = CliRunner()
    run, out = tmp_path / "run", tmp_path / "out"
    res = runner.invoke(cli, ["import-hf", str(folders["LlamaForCausalLM"]), "--out", str(run)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        cli,
        [
            "sample",
            str(run),
            "--backend",
            backend,
            "--prompt",
            "the dog sat",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "the dog sat" in res.output
    res = runner.invoke(cli, ["export-hf", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert compare(out, backend) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_import_lora_merge_export_round_trip(folders, tmp_path, backend, capsys, monkeypatch):
    """The README's flow on each backend: import, LoRA fine-tune on a text file, merge, export, and
    transformers computes the fine-tuned model's logits."""
    corpus = _corpus(tmp_path)
    run, lora_run, merged, out = (tmp_path / n for n in ("run", "lora", "merged", "out"))
    steps = [
        ["import-hf", str(folders["GPT2LMHeadModel"]), "--out", str(run)],
        [
            "train",
            "--backend",
            backend,
            "--init-from",
            str(run),
            "--data",
            str(corpus),
            "--lora-rank",
            "4",
            "--max-iters",
            "4",
            "--eval-every",
            "4",
            "--batch-size",
            "4",
            "--block-size",
            "24",
            "--out",
            str(lora_run),
        ],
        ["merge-lora", str(lora_run), "--out", str(merged)],
        ["export-hf", str(merged), "--out", str(out)],
    ]
    for args in steps:
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, (args, err)
    cfg, params, tok, _ = load_model(lora_run)
    ids = tok.encode(TEXT)[None, :]
    ref = hf_output(out, ids)
    assert np.abs(twin_output(get_backend(backend), cfg, params, ids) - ref).max() < TOL
    _, base_params, _, _ = load_model(run)
    base_ref = twin_output(get_backend(backend), cfg.without_lora(), base_params, ids)
    assert np.abs(base_ref - ref).max() > 10 * TOL  # fine-tuning changed the model that was exported
