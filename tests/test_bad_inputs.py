"""Bad input to every command, as a table. Each case must end with a non-zero exit, exactly one line on
stderr and it starts with `error:` (click's usage errors included: the CLI words them the same way), no
traceback anywhere, and no file of an existing run changed.

Cases run in process through the real entry point (`twinlm.cli.main.main`); a few also run as a
subprocess, to check what a user's shell sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import backend_or_skip, run_cli

from twinlm.core.data import default_cache_dir
from twinlm.trainer import TrainConfig, Trainer

TEXT = "".join(f"line {i}: the {['quick', 'lazy', 'brown'][i % 3]} fox jumps over {i * 7 % 13} dogs.\n"
               for i in range(200))


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # "{w}" stands for the world folder
    message: str  # a fragment of the one error line
    code: int = 2


CASES: dict[str, Case] = {
    # train
    "train_missing_data": Case(("train", "--data", "{w}/nope.txt"), "nope.txt"),
    "train_empty_data": Case(("train", "--data", "{w}/empty.txt"), "empty"),
    "train_binary_data": Case(("train", "--data", "{w}/blob.bin"), "binary"),
    "train_bad_preset": Case(("train", "--preset", "huge"), "unknown preset 'huge'"),
    "train_negative_batch": Case(("train", "--batch-size", "-3"), "batch-size must be a positive integer"),
    "train_zero_iters": Case(("train", "--max-iters", "0"), "max-iters must be a positive integer"),
    "train_negative_lr": Case(("train", "--lr", "-1"), "lr must be a positive number"),
    "train_zero_keep": Case(("train", "--keep", "0"), "keep must be a positive integer"),
    "train_bad_shape": Case(("train", "--n-head", "3", "--d-model", "64"), "divisible by n_head"),
    "train_bad_dropout": Case(("train", "--dropout", "1.5"), "dropout must be in [0, 1)"),
    "train_bpe_vocab": Case(("train", "--tokenizer", "bpe", "--vocab-size", "10"), "bpe vocab_size"),
    "train_char_vocab": Case(("train", "--vocab-size", "300"), "applies only to the bpe tokenizer"),
    "train_missing_toml": Case(("train", "--config", "{w}/none.toml"), "config file not found"),
    "train_bad_toml": Case(("train", "--config", "{w}/broken.toml"), "is not valid TOML"),
    "train_unknown_key": Case(("train", "--config", "{w}/unknown.toml"), "unknown keys in config file"),
    "train_toml_type": Case(("train", "--config", "{w}/wrongtype.toml"),
                            "batch-size must be a positive integer"),
    "train_bad_backend": Case(("train", "--backend", "pytorch"), "unknown backend 'pytorch'"),
    "train_numpy_backend": Case(("train", "--backend", "numpy"), "cannot train"),
    "train_resume_nowhere": Case(("train", "--resume", "{w}/nowhere"), "checkpoint not found"),
    "train_resume_corrupt": Case(("train", "--resume", "{w}/corrupt"), "does not match its SHA-256"),
    "train_resume_conflict": Case(("train", "--resume", "{w}/good", "--d-model", "64"), "conflicts with"),
    "train_resume_other_data": Case(("train", "--resume", "{w}/good", "--data", "{w}/other.txt"),
                                    "differs from the checkpoint's data"),
    "train_not_a_number": Case(("train", "--batch-size", "abc"), "Invalid value for '--batch-size'"),
    "train_unknown_flag": Case(("train", "--learning-rate", "1"), "No such option '--learning-rate'"),
    "train_unknown_arch": Case(("train", "--arch", "mamba"), "unknown arch 'mamba'"),
    "train_kv_heads": Case(("train", "--arch", "llama", "--n-kv-head", "3"), "must divide n_head"),
    "train_rope_odd_head": Case(("train", "--arch", "llama", "--d-model", "36"), "even head size"),
    "train_encoder_as_lm": Case(("train", "--arch", "bert", "--task", "lm"), "is an encoder"),
    "train_bad_activation": Case(("train", "--activation", "relu"), "Invalid value for '--activation'"),
    # finetune
    "finetune_nowhere": Case(("finetune", "{w}/nowhere"), "checkpoint not found"),
    "finetune_no_label_column": Case(("finetune", "{w}/bert", "--data", "{w}/nolabel.csv"),
                                     "no label column"),
    "finetune_not_csv": Case(("finetune", "{w}/bert", "--data", "{w}/corpus.txt"), "must be .csv"),
    "finetune_one_label": Case(("finetune", "{w}/bert", "--data", "{w}/onelabel.jsonl"),
                               "at least two labels"),
    "finetune_foreign_text": Case(("finetune", "{w}/bert", "--data", "{w}/greek.csv"),
                                  "does not fit the base run's tokenizer"),
    "finetune_bad_jsonl": Case(("finetune", "{w}/bert", "--data", "{w}/broken.jsonl"),
                               "is not a JSON object"),
    # Hugging Face folders and LoRA
    "import_hf_nowhere": Case(("import-hf", "{w}/nowhere", "--out", "{w}/imported"), "not a folder"),
    "import_hf_not_hf": Case(("import-hf", "{w}/good", "--out", "{w}/imported"), "has no config.json"),
    "import_hf_onto_run": Case(("import-hf", "{w}/hf", "--out", "{w}/good"), "is not empty"),
    "import_hf_short_config": Case(("import-hf", "{w}/hf", "--out", "{w}/imported"), "lacks or mistypes"),
    "import_hf_pickle": Case(("import-hf", "{w}/pickled", "--out", "{w}/imported"), "never unpickles"),
    "export_hf_nowhere": Case(("export-hf", "{w}/nowhere", "--out", "{w}/exported"), "checkpoint not found"),
    "export_hf_onto_run": Case(("export-hf", "{w}/good", "--out", "{w}/bert"), "is not empty"),
    "merge_lora_not_lora": Case(("merge-lora", "{w}/good", "--out", "{w}/merged"), "no LoRA adapters"),
    "quantize_nowhere": Case(("quantize", "{w}/nowhere", "--bits", "4", "--out", "{w}/q4"), "not found"),
    "quantize_onto_run": Case(("quantize", "{w}/good", "--bits", "4", "--out", "{w}/bert"), "is not empty"),
    "quantize_bad_bits": Case(("quantize", "{w}/good", "--bits", "2", "--out", "{w}/q2"), "'--bits'"),
    "train_lora_no_base": Case(("train", "--data", "{w}/corpus.txt", "--lora-rank", "2"), "--init-from"),
    "train_lora_bad_target": Case(("train", "--init-from", "{w}/good", "--data", "{w}/corpus.txt",
                                   "--lora-rank", "2", "--lora-targets", "proj"), "attn.proj or mlp.proj"),
    # predict
    "predict_nowhere": Case(("predict", "{w}/nowhere", "text"), "checkpoint not found"),
    "predict_no_text": Case(("predict", "{w}/good"), "Missing argument"),
    "predict_no_mask": Case(("predict", "{w}/bert", "line 1"), "no [MASK]"),
    # sample
    "sample_encoder": Case(("sample", "{w}/bert", "--prompt", "line"), "an encoder"),
    "sample_nowhere": Case(("sample", "{w}/nowhere"), "checkpoint not found"),
    "sample_not_a_run": Case(("sample", "{w}/notarun"), "no checkpoint in"),
    "sample_corrupt": Case(("sample", "{w}/corrupt"), "does not match its SHA-256"),
    "sample_unknown_char": Case(("sample", "{w}/good", "--prompt", "\u2603"), "not in the char tokenizer"),
    "sample_empty_prompt": Case(("sample", "{w}/good", "--prompt", ""), "the prompt is empty"),
    "sample_negative_n": Case(("sample", "{w}/good", "-n", "-5"), "Invalid value for '--max-new-tokens'"),
    "sample_zero_top_p": Case(("sample", "{w}/good", "--top-p", "0"), "Invalid value for '--top-p'"),
    "sample_bad_backend": Case(("--backend", "tpu", "sample", "{w}/good"), "unknown backend 'tpu'"),
    # eval
    "eval_nowhere": Case(("eval", "{w}/nowhere"), "run directory not found"),
    "eval_zero_batch": Case(("eval", "{w}/good", "--batch-size", "0"),
                            "batch-size must be a positive integer"),
    "eval_missing_data": Case(("eval", "{w}/good", "--data", "{w}/nope.txt"), "nope.txt"),
    "eval_foreign_text": Case(("eval", "{w}/good", "--data", "{w}/greek.txt"), "does not fit this model's"),
    "eval_corrupt": Case(("eval", "{w}/corrupt"), "does not match its SHA-256"),
    "eval_unseen_label": Case(("eval", "{w}/cls", "--data", "{w}/unseen.csv"), "never seen in training"),
    # parity
    "parity_one_backend": Case(("parity", "--backends", "mlx"), "at least two backends"),
    "parity_unknown_backend": Case(("parity", "--backends", "mlx,cuda"), "unknown backend 'cuda'"),
    "parity_bad_config": Case(("parity", "--config", "huge"), "Invalid value for '--config'"),
    "parity_zero_steps": Case(("parity", "--steps", "0"), "Invalid value for '--steps'"),
    # plot
    "plot_nowhere": Case(("plot", "{w}/nowhere"), "no metrics.jsonl"),
    "plot_bad_metrics": Case(("plot", "{w}/badmetrics", "-o", "{w}/x.png"), "is not valid JSON"),
    "plot_no_args": Case(("plot",), "Missing argument"),
    "plot_bad_axis": Case(("plot", "{w}/good", "--x", "time"), "Invalid value for '--x'"),
    "plot_bad_backend": Case(("plot", "{w}/good", "--backend", "jax"), "unknown backend 'jax'"),
    # doctor
    "doctor_bad_backend": Case(("doctor", "--backend", "tpu"), "unknown backend 'tpu'"),
    "doctor_unknown_flag": Case(("doctor", "--verbose"), "No such option '--verbose'"),
    # bench
    "bench_not_a_number": Case(("bench", "--iters", "many"), "Invalid value for '--iters'"),
    "bench_missing_compare": Case(("bench", "--compare", "{w}/none.json"), "does not exist"),
    # cache
    "cache_bad_target": Case(("cache", "clear", "everything"), "Invalid value for '{tokens|jit|all|runs}'"),
    "cache_unconfirmed": Case(("cache", "clear", "tokens"), "pass --yes to confirm"),
    "cache_runs_is_a_file": Case(("cache", "--runs", "{w}/empty.txt"), "is a file"),
    # experiment
    "experiment_unknown": Case(("experiment", "magic"), "unknown experiment 'magic'"),
    "experiment_no_name": Case(("experiment",), "name an experiment"),
    "experiment_bad_backend": Case(("experiment", "scaling", "--backend", "jax"), "unknown backend 'jax'"),
    # attention
    "attention_nowhere": Case(("attention", "{w}/nowhere", "--text", "12"), "checkpoint not found"),
    "attention_no_text": Case(("attention", "{w}/cls"), "Missing option '--text'"),
    # chat data, chat, serve (issue #20)
    "train_chat_bad_row": Case(("train", "--data", "{w}/chat.jsonl", "--preset", "tiny"), "chat.jsonl:2:"),
    "train_chat_mixed": Case(("train", "--data", "{w}/mixed.jsonl", "--preset", "tiny"),
                             "one format per file"),
    "chat_nowhere": Case(("chat", "{w}/nowhere"), "does not exist"),
    "chat_encoder": Case(("chat", "{w}/bert"), "an encoder"),
    "chat_bad_temperature": Case(("chat", "{w}/good", "-t", "-1"), "Invalid value for '--temperature'"),
    "serve_nowhere": Case(("serve", "{w}/nowhere"), "does not exist"),
    "serve_not_a_run": Case(("serve", "{w}/notarun"), "no checkpoint in"),
    "serve_big_context": Case(("serve", "{w}/good", "--context", "100000"), "context must be in 2..16"),
    "serve_bad_port": Case(("serve", "{w}/good", "--port", "70000"), "Invalid value for '--port'"),
    "serve_zero_slots": Case(("serve", "{w}/good", "--slots", "0"), "Invalid value for '--slots'"),
    # the group
    "unknown_command": Case(("frobnicate",), "No such command 'frobnicate'"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one real trained run (`good`), a damaged copy, and assorted bad files."""
    backend = backend_or_skip("mlx")
    w = tmp_path_factory.mktemp("bad-inputs")
    os.environ["TWINLM_CACHE_DIR"] = str(w / "cache")  # restored below; module-scoped, so no monkeypatch
    try:
        (w / "corpus.txt").write_text(TEXT)
        tc = TrainConfig(data=str(w / "corpus.txt"), preset="tiny", block_size=16, batch_size=4, max_iters=2,
                         eval_every=2, eval_iters=1, out=str(w / "good"))
        Trainer(tc, backend, log=lambda m: None).fit()
        tiny = dict(preset="tiny", block_size=16, batch_size=4, max_iters=2, eval_every=2, eval_iters=1)
        Trainer(TrainConfig(arch="bert", data=str(w / "corpus.txt"), out=str(w / "bert"), **tiny), backend,
                log=lambda m: None).fit()
        rows = "".join(f"line {i},{'ab'[i % 2]}\n" for i in range(40))
        (w / "labels.csv").write_text("text,label\n" + rows)
        tc = TrainConfig(task="classify", base=str(w / "bert"), data=str(w / "labels.csv"),
                         out=str(w / "cls"), **tiny)
        Trainer(tc, backend, log=lambda m: None).fit()
        key = next(default_cache_dir().glob("*.bin"))  # a token cache file, for `cache clear`
    finally:
        del os.environ["TWINLM_CACHE_DIR"]
    shutil.copytree(w / "good", w / "corrupt")
    state = next((w / "corrupt").glob("ckpt-*/state.safetensors"))
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10
    state.write_bytes(bytes(data))
    (w / "empty.txt").write_text("")
    (w / "hf").mkdir()
    (w / "hf" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    (w / "pickled").mkdir()
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 8,
            "vocab_size": 10}
    (w / "pickled" / "config.json").write_text(json.dumps(gpt2))
    (w / "pickled" / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    (w / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (w / "other.txt").write_text(TEXT[::-1])
    (w / "greek.txt").write_text("\u03b1\u03b2\u03b3 " * 100)
    (w / "broken.toml").write_text("lr = [1,\n")
    (w / "unknown.toml").write_text("learning_rate = 0.1\n")
    (w / "wrongtype.toml").write_text('batch_size = "big"\n')
    (w / "nolabel.csv").write_text("text,category\nline 1,a\nline 2,b\n")
    (w / "onelabel.jsonl").write_text('{"text": "line 1", "label": "a"}\n{"text": "line 2", "label": "a"}\n')
    (w / "broken.jsonl").write_text('{"text": "line 1", "label": "a"}\n{"text": \n')
    (w / "greek.csv").write_text("text,label\n\u03b1\u03b2,a\nline 2,b\nline 3,a\n")
    (w / "unseen.csv").write_text("text,label\nline 1,a\nline 2,maybe\n")
    user = {"role": "user", "content": "hi"}
    (w / "chat.jsonl").write_text(json.dumps({"messages": [user, {"role": "assistant", "content": "yo"}]})
                                  + '\n{"messages": [{"role": "narrator", "content": "x"}]}\n')
    (w / "mixed.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"messages": []}\n')
    (w / "notarun").mkdir()
    (w / "notarun" / "notes.txt").write_text("hello")
    (w / "badmetrics").mkdir()
    (w / "badmetrics" / "metrics.jsonl").write_text('{"iter": 1, "loss": 2}\nnot json\n{"iter": 2}\n')
    assert key.exists()
    return w


def run_files(w: Path) -> dict[str, str]:
    """Every file of the existing runs (and their neighbours), by content."""
    return {str(p.relative_to(w)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(w.rglob("*")) if p.is_file() and "cache" not in p.parts}


def check_output(case: Case, code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err
    assert code == case.code, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.message in lines[0], lines[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, world: Path, capsys, monkeypatch) -> None:
    case = CASES[name]
    monkeypatch.chdir(world)
    monkeypatch.delenv("TWINLM_BACKEND", raising=False)
    monkeypatch.delenv("TWINLM_DEBUG", raising=False)
    monkeypatch.setenv("TWINLM_CACHE_DIR", str(world / "cache"))
    before = run_files(world)
    code, out, err = run_cli([a.replace("{w}", str(world)) for a in case.args], capsys, monkeypatch)
    check_output(case, code, out, err)
    assert run_files(world) == before, "an existing run or file changed"


@pytest.mark.parametrize("name", ["sample_nowhere", "train_unknown_flag", "train_toml_type",
                                  "cache_bad_target"])
def test_bad_input_in_a_real_process(name: str, world: Path) -> None:
    case = CASES[name]
    env = {k: v for k, v in os.environ.items() if k not in ("TWINLM_BACKEND", "TWINLM_DEBUG")}
    env["TWINLM_CACHE_DIR"] = str(world / "cache")
    before = run_files(world)
    args = [a.replace("{w}", str(world)) for a in case.args]
    r = subprocess.run([sys.executable, "-m", "twinlm.cli.main", *args], capture_output=True, text=True,
                       env=env, cwd=world, timeout=120)
    check_output(case, r.returncode, r.stdout, r.stderr)
    assert run_files(world) == before


def test_the_table_covers_every_command() -> None:
    from twinlm.cli.main import cli

    covered = {c.args[0] if c.args[0] != "--backend" else c.args[2] for c in CASES.values()}
    assert set(cli.commands) <= covered and len(CASES) >= 30


@pytest.mark.parametrize("code, err", [
    (2, "Traceback (most recent call last):\n  File ...\nerror: it broke\n"),
    (2, "Usage: twinlm train [OPTIONS]\n\nError: it broke\n"),  # click's own wording: two lines and more
    (0, "error: it broke\n"),
    (2, "warning: something\nerror: it broke\n"),
])
def test_the_checks_catch_what_they_are_for(code: int, err: str) -> None:
    with pytest.raises(AssertionError):
        check_output(Case(("train",), "it broke"), code, "", err)
