"""LoRA: the spec freezes every pretrained weight, adapters start as a no-op, the adapted forward equals
the merged weights', a LoRA run's checkpoint holds only what it trains and refuses a changed base, resume
is bit-identical, and the CLI (train --init-from --lora-rank, finetune --lora-rank, merge-lora) works.
Cross-backend parity of LoRA steps, with its negative control, is the parity suite's "lora" suite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from twinlm.backends import get_backend
from twinlm.core import lora, model
from twinlm.core import spec as S
from twinlm.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from twinlm.core.config import ConfigError, ModelConfig, lora_targets, preset
from twinlm.core.errors import TwinlmError
from twinlm.run_dir import load_model
from twinlm.trainer import TrainConfig, Trainer

CORPUS = (
    "".join(
        f"{w} and {v} went up the hill; {v} came down.\n"
        for w in ("jack", "jill", "bob")
        for v in ("ann", "tom", "sue", "max")
    )
    * 20
)
SMALL = dict(batch_size=4, eval_iters=2, warmup=2, log_every=1, eval_every=4, lr=3e-3)


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture
def base_run(tmp_path, corpus) -> Path:
    """A small pretrained GPT (a few steps on the corpus)."""
    Trainer(
        TrainConfig(
            data=str(corpus), out=str(tmp_path / "base"), preset="tiny", block_size=16, max_iters=4, **SMALL
        ),
        get_backend("mlx"),
        log=lambda m: None,
    ).fit()
    return tmp_path / "base"


def lora_cfg(**kw) -> ModelConfig:
    return preset("tiny", vocab_size=40, lora_rank=4, **kw)


# ---- config and spec ----------------------------------------------------------------------------


def test_targets_aliases_and_errors():
    assert lora_targets(None) == lora_targets("all") == ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    assert lora_targets("fc, qkv") == ("attn.qkv", "mlp.fc")
    with pytest.raises(ConfigError, match="attn.proj or mlp.proj"):
        lora_targets("proj")
    with pytest.raises(ConfigError, match="unknown LoRA target"):
        lora_targets("q_proj")
    with pytest.raises(ConfigError, match="need lora_rank"):
        preset("tiny", lora_alpha=4.0)
    assert lora_cfg().lora_alpha == 8.0 and lora_cfg().lora_scale == 2.0


@pytest.mark.parametrize("arch,n_classes", [("gpt", 0), ("llama", 0), ("bert", 3)])
def test_spec_trains_only_adapters_and_head(arch, n_classes):
    cfg = lora_cfg(arch=arch, n_classes=n_classes, lora_targets=("attn.qkv", "mlp.proj"))
    spec = model.param_spec(cfg)
    trainable = sorted(k for k, s in spec.items() if s.trainable)
    head = {"cls.weight", "cls.bias", "pooler.weight", "pooler.bias"} if n_classes else set()
    adapters = {
        f"blocks.{i}.{layer}.lora_{x}"
        for i in range(cfg.n_layer)
        for layer in ("attn.qkv", "mlp.proj")
        for x in "ab"
    }
    assert set(trainable) == adapters | (head & set(spec))
    base = model.param_spec(cfg.without_lora())
    assert all(spec[k].shape == base[k].shape for k in base)  # the pretrained weights, unchanged in shape


def test_fresh_adapters_are_a_no_op_and_forward_equals_merged():
    B = get_backend("numpy")
    cfg = lora_cfg(dropout=0.0)
    params = S.init_params(model.param_spec(cfg), 0)
    base = {k: v for k, v in params.items() if not k.endswith(lora.SUFFIXES)}
    x = B.from_numpy(np.random.default_rng(0).integers(0, 40, (2, 12)).astype(np.int32))
    np.testing.assert_array_equal(
        model.logits(B, cfg, params, x), model.logits(B, cfg.without_lora(), base, x)
    )
    trained = {
        k: (v + np.random.default_rng(1).normal(0, 0.2, v.shape)).astype(np.float32)
        if k.endswith("lora_b")
        else v
        for k, v in params.items()
    }
    adapted = model.logits(B, cfg, trained, x)
    plain_cfg, plain = lora.merged(cfg, trained)
    assert plain_cfg == cfg.without_lora() and set(plain) == set(base)
    merged_logits = model.logits(B, plain_cfg, plain, x)
    assert np.abs(adapted - model.logits(B, cfg.without_lora(), base, x)).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(merged_logits, adapted, atol=2e-5)


# ---- training -----------------------------------------------------------------------------------


def _lora_trainer(base: Path, out: Path, corpus: Path, **kw) -> Trainer:
    settings = {**SMALL, "max_iters": 6, "lr_decay_iters": 6, **kw}
    tc = TrainConfig(data=str(corpus), out=str(out), base=str(base), lora_rank=2, block_size=12, **settings)
    return Trainer(tc, get_backend("mlx"), log=lambda m: None)


def test_lora_run_trains_adapters_only_and_stores_only_them(base_run, tmp_path, corpus):
    _, base_params, _, _ = load_model(base_run)
    t = _lora_trainer(base_run, tmp_path / "lora", corpus)
    assert t.cfg.block_size == 16 and t.task.batcher.block_size == 12  # the base's model, a shorter window
    t.fit()
    arrays, meta = load_checkpoint(latest_checkpoint(tmp_path / "lora"))
    stored = {k.split(".", 1)[1] for k in arrays if k.startswith("param.")}
    assert stored and all(k.endswith(lora.SUFFIXES) for k in stored)
    assert {k for k in arrays if k.startswith("m.")} == {f"m.{k}" for k in stored}  # no AdamW state if frozen
    assert meta["base"]["run"] == str(base_run.resolve())
    cfg, params, _, _ = load_model(tmp_path / "lora")
    assert cfg.lora_rank == 2
    for name, value in base_params.items():
        np.testing.assert_array_equal(params[name], value)  # frozen: bit-identical to the base
    assert any(np.abs(params[k]).max() > 0 for k in params if k.endswith("lora_b"))  # adapters learnt


def test_lora_resume_is_bit_identical(base_run, tmp_path, corpus):
    whole = _lora_trainer(base_run, tmp_path / "whole", corpus, lora_dropout=0.1)
    whole.fit()
    half = _lora_trainer(base_run, tmp_path / "half", corpus, lora_dropout=0.1, max_iters=3)
    half.fit()
    resumed = Trainer(
        TrainConfig(max_iters=6), get_backend("mlx"), resume=str(tmp_path / "half"), log=lambda m: None
    )
    resumed.fit()
    a, _ = load_checkpoint(latest_checkpoint(tmp_path / "whole"))
    b, _ = load_checkpoint(latest_checkpoint(tmp_path / "half"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_changed_or_missing_base_is_refused(base_run, tmp_path, corpus, capsys, monkeypatch):
    _lora_trainer(base_run, tmp_path / "lora", corpus, max_iters=2).fit()
    arrays, meta = load_checkpoint(latest_checkpoint(base_run))
    arrays["param.ln_f.weight"] = arrays["param.ln_f.weight"] + 1e-3
    save_checkpoint(base_run, arrays, meta, step=99)  # the base moves on
    code, _, err = run_cli(["sample", str(tmp_path / "lora"), "--max-new-tokens", "2"], capsys, monkeypatch)
    assert code == 2 and "has changed since" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(TwinlmError, match="has changed since"):
        Trainer(
            TrainConfig(max_iters=4), get_backend("mlx"), resume=str(tmp_path / "lora"), log=lambda m: None
        )
    import shutil

    shutil.rmtree(base_run)
    code, _, err = run_cli(["sample", str(tmp_path / "lora"), "--max-new-tokens", "2"], capsys, monkeypatch)
    assert code == 2 and "is missing" in err


# ---- the command line ---------------------------------------------------------------------------


def test_cli_lora_merge_sample_and_errors(base_run, tmp_path, corpus, capsys, monkeypatch):
    run, merged_run = tmp_path / "lora", tmp_path / "merged"
    on_base = ["train", "--init-from", str(base_run), "--data", str(corpus)]
    code, out, err = run_cli(
        [*on_base, "--lora-rank", "4", "--lora-targets", "qkv,mlp.proj", "--max-iters", "5",
         "--eval-every", "5", "--batch-size", "4", "--out", str(run)],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    assert "trained)" in out
    code, out, err = run_cli(["merge-lora", str(run), "--out", str(merged_run)], capsys, monkeypatch)
    assert code == 0, err
    assert "merged 4 adapters" in out, out
    meta = json.loads((latest_checkpoint(merged_run) / "meta.json").read_text())
    assert meta["model"]["lora_rank"] == 0 and meta["base"] is None
    samples = []
    for r in (run, merged_run):
        code, out, err = run_cli(
            ["sample", str(r), "--prompt", "jack", "--max-new-tokens", "20", "--temperature", "0"],
            capsys,
            monkeypatch,
        )
        assert code == 0, err
        samples.append(out)
    assert samples[0] == samples[1]  # merged weights generate exactly what the adapters do
    for args, message in [
        (["train", "--data", str(corpus), "--lora-rank", "4"], "--init-from"),
        ([*on_base, "--lora-rank", "4", "--lora-targets", "proj"], "attn.proj or mlp.proj"),
        ([*on_base, "--n-layer", "3"], "keeps the base"),
        (["train", "--init-from", str(base_run)], "--data"),
        (["train", "--init-from", str(run), "--data", str(corpus), "--lora-rank", "2"], "merge it first"),
        (["merge-lora", str(merged_run), "--out", str(tmp_path / "x")], "no LoRA adapters"),
    ]:
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and message in err and err.startswith("error: "), (args, err)


def test_cli_finetune_classifier_with_lora(tmp_path, corpus, capsys, monkeypatch):
    base = tmp_path / "bert"
    code, _, err = run_cli(
        [
            "train",
            "--arch",
            "bert",
            "--data",
            str(corpus),
            "--preset",
            "tiny",
            "--max-iters",
            "3",
            "--batch-size",
            "4",
            "--eval-every",
            "3",
            "--out",
            str(base),
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    data = tmp_path / "labels.csv"
    data.write_text(
        "text,label\n"
        + "".join(
            f"{w} went up,{'a' if w < 'k' else 'b'}\n"
            for w in ("jack", "jill", "bob", "ann", "tom", "sue") * 4
        )
    )
    code, out, err = run_cli(
        [
            "finetune",
            str(base),
            "--data",
            str(data),
            "--lora-rank",
            "2",
            "--max-iters",
            "3",
            "--eval-every",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "cls"),
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    _, meta = load_checkpoint(latest_checkpoint(tmp_path / "cls"))
    cfg, params, _, _ = load_model(tmp_path / "cls")
    assert cfg.n_classes == 2 and cfg.lora_rank == 2
    arrays, _ = load_checkpoint(latest_checkpoint(tmp_path / "cls"))
    stored = {k.split(".", 1)[1] for k in arrays if k.startswith("param.")}
    assert {"cls.weight", "cls.bias", "pooler.weight"} <= stored
    assert all(k.endswith(lora.SUFFIXES) or k.startswith(("cls.", "pooler.")) for k in stored)
