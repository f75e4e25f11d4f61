"""Trainer unit tests on tiny configs: the task, gradient accumulation, resume, non-finite steps."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from twinlm.backends import get_backend
from twinlm.core import model, optim, task
from twinlm.core import params as P
from twinlm.core import step as S
from twinlm.core.checkpoint import load_checkpoint
from twinlm.core.config import preset
from twinlm.core.errors import TwinlmError
from twinlm.trainer import TrainConfig, Trainer, TrainingDiverged, evaluate_loss, load_toml, task_loss

TINY = dict(preset="tiny", block_size=16, batch_size=4, eval_iters=2, warmup=2, log_every=1)


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def mlx():
    return get_backend("mlx")


def _run(B, out, **kw) -> tuple[Trainer, list[float]]:
    t = Trainer(TrainConfig(out=str(out), **{**TINY, **kw}), B, log=lambda m: None)
    return t, _losses(t)


def _losses(t: Trainer) -> list[float]:
    t.fit()
    rows = [line for line in (t.out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    import json

    return [json.loads(r)["loss"] for r in rows]


# ---- the built-in task ---------------------------------------------------------------------------
def test_task_corpus_is_deterministic_correct_and_excludes_held_out_strings():
    text = task.builtin_corpus()
    assert text == task.builtin_corpus.__wrapped__()  # regenerated from scratch: same text
    lines = text.splitlines()
    assert len(lines) == task.CORPUS_LINES and set(text) == set("0123456789>\n")
    for line in lines[:2000]:
        lhs, rhs = line.split(">")
        assert rhs == "".join(sorted(lhs)) and len(lhs) == task.DIGITS
    train = {line.split(">")[0] for line in lines}
    assert not any(task.is_held_out([int(c) for c in s]) for s in train)
    held = task.eval_examples(300, seed=0)
    assert len({p for p, _ in held}) == 300
    assert all(p.strip("\n>") not in train for p, _ in held)
    assert all(task.is_held_out([int(c) for c in p.strip("\n>")]) for p, _ in held)


def test_task_examples_have_fixed_lengths_and_the_scorer_is_exact():
    ex = task.eval_examples(50, seed=3)
    assert ex == task.eval_examples(50, seed=3) and ex != task.eval_examples(50, seed=4)
    assert {len(p) for p, _ in ex} == {task.PROMPT_LEN} and {len(c) for _, c in ex} == {task.COMPLETION_LEN}
    right = [c for _, c in ex]
    assert task.accuracy(right, ex) == 1.0
    one_wrong = ["x" + right[0][1:]] + right[1:]
    assert task.accuracy(one_wrong, ex) == pytest.approx(49 / 50)
    assert task.is_correct("0159\n123", "0159\n") and not task.is_correct("0159", "0159\n")
    with pytest.raises(ValueError):
        task.accuracy(right[:-1], ex)


# ---- gradient accumulation -----------------------------------------------------------------------
def test_grad_accumulation_matches_one_big_batch(mlx):
    cfg = preset("tiny", vocab_size=13, block_size=8)
    opt = optim.AdamWConfig(warmup=1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 13, (6, 8)).astype(np.int32)
    y = rng.integers(0, 13, (6, 8)).astype(np.int32)
    scal = [mlx.from_numpy(v) for v in S.step_scalars(0, opt)]
    state = S.init_state(P.init_params(cfg, 0))
    outs = []
    lm = SimpleNamespace(loss=lambda B, cfg, p, batch, drop: model.lm_loss_fn(B, cfg)(p, batch, drop))
    for A in (1, 3):
        train_step = S.make_train_step(mlx, model.param_spec(cfg), opt, task_loss(mlx, cfg, lm, A))
        step = mlx.compile_step(train_step, {k: mlx.from_numpy(v) for k, v in state.items()})
        shape = (6, 8) if A == 1 else (3, 2, 8)
        batch = {"x": mlx.from_numpy(x.reshape(shape)), "y": mlx.from_numpy(y.reshape(shape))}
        loss, _ = step(batch, {}, *scal)
        outs.append((float(mlx.to_numpy(loss)), {k: mlx.to_numpy(v) for k, v in step.state.items()}))
    (l1, s1), (l3, s3) = outs
    assert l1 == pytest.approx(l3, abs=1e-6)
    moved = max(float(np.abs(s1[k] - state[k]).max()) for k in state)
    assert moved > 1e-4  # the step did update: the comparison below means something
    assert max(float(np.abs(s1[k] - s3[k]).max()) for k in state) < 1e-6


# ---- training, resume ----------------------------------------------------------------------------
def test_training_lowers_the_loss_and_saves_best_and_final(mlx, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the cat sat on mat {i % 7}.\n" for i in range(400)))
    t, losses = _run(mlx, tmp_path / "run", data=str(corpus), max_iters=40, eval_every=20, lr=1e-2)
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    arrays, meta = load_checkpoint(tmp_path / "run")
    assert meta["iter"] == 40 and meta["backend"] == "mlx" and meta["task"] == "lm"
    assert meta["train"]["data"] == str(corpus.resolve())
    assert meta["best_val_loss"] is not None and meta["skipped"] == 0
    assert set(arrays) == set(S.init_state(P.init_params(t.cfg, 0)))
    assert (tmp_path / "run" / "best.json").exists()
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert len(evals) == 2 and not any("accuracy" in e for e in evals)  # a corpus has no accuracy


def test_resume_is_bit_identical_in_process(mlx, tmp_path):
    kw = dict(lr_decay_iters=12, eval_every=6, dropout=0.1, grad_accum=2)
    straight, l_straight = _run(mlx, tmp_path / "a", max_iters=12, **kw)
    _, l_first = _run(mlx, tmp_path / "b", max_iters=6, **kw)
    resumed = Trainer(TrainConfig(max_iters=12), mlx, resume=tmp_path / "b", log=lambda m: None)
    assert resumed.iter == 6 and resumed.cfg == straight.cfg
    l_all = _losses(resumed)
    assert l_all == l_straight  # exact float equality, every step
    a, _ = load_checkpoint(tmp_path / "a")
    b, _ = load_checkpoint(tmp_path / "b")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_conflicting_shape_and_missing_checkpoint(mlx, tmp_path):
    _run(mlx, tmp_path / "r", max_iters=2, eval_every=2)
    with pytest.raises(TwinlmError, match="n-layer 3 conflicts"):
        Trainer(TrainConfig(n_layer=3), mlx, resume=tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TwinlmError, match="no checkpoint"):
        Trainer(TrainConfig(), mlx, resume=tmp_path / "empty")


def test_non_finite_steps_are_skipped_then_the_run_stops_with_finite_weights(mlx, tmp_path):
    t = Trainer(TrainConfig(out=str(tmp_path / "nan"), **{**TINY, "warmup": 0}, lr=1e30, grad_clip=0.0,
                            max_iters=50), mlx, log=lambda m: None)
    with pytest.raises(TrainingDiverged, match="5 consecutive steps"):
        t.fit()
    assert t.skipped == 5 and t.iter == 6  # one applied (exploding) update, then five refused
    arrays, meta = load_checkpoint(tmp_path / "nan")
    assert meta["skipped"] == 5
    assert all(np.all(np.isfinite(v)) for v in arrays.values())


# ---- evaluation, config --------------------------------------------------------------------------
def test_evaluate_loss_matches_the_model_loss_and_refuses_bad_ids(mlx):
    cfg = preset("tiny", vocab_size=13, block_size=8)
    params = {k: mlx.from_numpy(v) for k, v in P.init_params(cfg, 1).items()}
    tokens = np.random.default_rng(0).integers(0, 13, 8 * 5 + 1).astype(np.int32)
    loss, n = evaluate_loss(mlx, cfg, params, tokens, batch_size=2)  # 5 windows: batches of 2, 2, 1 (padded)
    x, y = tokens[:-1].reshape(5, 8), tokens[1:].reshape(5, 8)
    want = float(mlx.to_numpy(model.loss(mlx, cfg, params, mlx.from_numpy(x), mlx.from_numpy(y))))
    assert n == 40 and loss == pytest.approx(want, abs=1e-5)
    tokens[3] = 13
    with pytest.raises(ValueError, match="token id 13 is outside"):
        evaluate_loss(mlx, cfg, params, tokens)


def test_toml_config_reads_known_keys_and_refuses_unknown(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('max-iters = 7\nlr = 0.01\npreset = "tiny"\n')
    assert load_toml(good) == {"max_iters": 7, "lr": 0.01, "preset": "tiny"}
    bad = tmp_path / "bad.toml"
    bad.write_text("max_iter = 7\n")
    with pytest.raises(TwinlmError, match="unknown keys in config file .*max_iter"):
        load_toml(bad)


# ---- the settings: never mutated, every field a `train` option ------------------------------------
def test_the_callers_config_is_never_mutated(mlx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("hello world, a small corpus of text.\n" * 200)
    tc = TrainConfig(data="c.txt", max_iters=2, **TINY)
    before = tc.to_dict()
    trainer = Trainer(tc, mlx, log=lambda m: None)
    assert tc.to_dict() == before  # the resolved paths and the run dir live in the trainer's own copy
    assert trainer.tc.data == str(tmp_path / "c.txt") and tc.data == "c.txt"
    assert trainer.tc.out is not None and tc.out is None
    first = trainer.tc.to_dict()
    Trainer(trainer.tc, mlx, resume=None, log=lambda m: None)
    assert trainer.tc.to_dict() == first


def test_every_train_setting_is_an_option_with_help():
    """Options are generated from TrainConfig's fields: a new plain field becomes a flag with its help."""
    import dataclasses

    import click

    from twinlm.cli.train import command

    flags = {o: p for p in command.params if isinstance(p, click.Option) for o in p.opts}
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = "--init-from" if f.name == "base" else f"--{f.name.replace('_', '-')}"
        assert flag in flags, f"TrainConfig.{f.name} has no `train` option"
        assert flags[flag].help, f"{flag} has no help"
    assert "--freeze-base" not in flags  # cli=False: finetune's, not train's
