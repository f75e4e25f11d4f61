"""Chat data (issue #20): rows, chat templates against transformers' apply_chat_template, the sandbox,
the assistant-only loss mask (no gradient through masked targets), and the masked loss across backends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import backend_or_skip
from twinlm.core import chat
from twinlm.core.config import preset
from twinlm.core.params import init_params
from twinlm.core.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer
from twinlm.tasks.chat import chat_loss, encode_rows

# Meta-Llama-3-8B-Instruct's template and Qwen2's ChatML template, as published with those models.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour  "},
     {"role": "assistant", "content": " Blue\n"}],
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE tokenizer.json with the chat special tokens, trained here (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = " ".join(m["content"] for c in CONVERSATIONS for m in c) * 20 + " assistant user system helpful"
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def hf_pair(folder: Path, template: str, bos: str, eos: str) -> tuple[object, HFTokenizer, chat.ChatTemplate]:
    transformers = pytest.importorskip("transformers")
    cfg = {"bos_token": bos, "eos_token": eos, "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **{
        k: v for k, v in cfg.items()})
    tok = HFTokenizer((folder / "tokenizer.json").read_text(), {})
    return ref, tok, chat.run_template({"tokenizer_config": cfg})


def reference_ids(ref: object, messages: list, add_generation_prompt: bool = False) -> list[int]:
    out = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("template,bos,eos", [(LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
                                              (CHATML, "<|endoftext|>", "<|im_end|>")],
                         ids=["llama3", "chatml"])
def test_rendered_ids_equal_transformers(hf_folder: Path, template: str, bos: str, eos: str) -> None:
    ref, tok, tmpl = hf_pair(hf_folder, template, bos, eos)
    for messages in CONVERSATIONS:
        ids, weights = chat.encode_example({"messages": messages}, tmpl, tok, mask_prompt=True)
        assert ids.tolist() == reference_ids(ref, messages)
        # with the generation prompt too
        gen = tok.encode(tmpl.render(messages[:-1], add_generation_prompt=True)).tolist()
        assert gen == reference_ids(ref, messages[:-1], add_generation_prompt=True)
        # the learned tokens are exactly the assistant's contents and the end of their turns
        learned = tok.decode(ids[weights > 0])
        for m in messages:
            if m["role"] == "assistant":
                assert m["content"].strip() in learned
            else:
                assert m["content"].strip() not in learned
        assert learned.count(eos) == sum(m["role"] == "assistant" for m in messages)
    # negative control: another template gives other ids, which the comparison would catch
    other = chat.run_template({"tokenizer_config": {"chat_template": CHATML if template == LLAMA3 else LLAMA3,
                                                    "bos_token": bos}})
    ids, _ = chat.encode_example({"messages": CONVERSATIONS[0]}, other, tok, mask_prompt=True)
    assert ids.tolist() != reference_ids(ref, CONVERSATIONS[0])


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% include '/etc/passwd' %}",
    "{{ messages.__class__.__base__ }}x{{ ().__class__.__bases__[0].__subclasses__() }}",
    "{{ raise_exception('roles must alternate') }}",
])
def test_hostile_or_failing_template_is_one_line_error(source: str) -> None:
    tmpl = chat.run_template({"tokenizer_config": {"chat_template": source}})
    with pytest.raises(chat.ChatError) as e:
        tmpl.render(CONVERSATIONS[0])
    assert "\n" not in str(e.value) and str(e.value).startswith("the chat template")


@pytest.mark.parametrize("backend", ["mlx", pytest.param("tinygrad", marks=pytest.mark.slow)])
def test_train_on_chat_data_cli(tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    from tests.conftest import run_cli

    backend_or_skip(backend)
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS * 4) + "\n")
    assert chat.sniff(data) == "messages"
    code, out, err = run_cli(["--backend", backend, "train", "--data", str(data), "--preset", "tiny",
                              "--block-size", "96", "--batch-size", "4", "--max-iters", "4",
                              "--eval-every", "4",
                              "--out", str(tmp_path / "run")], capsys, monkeypatch)
    assert code == 0, err
    assert "task chat" in out and "messages rows for training" in out
    # a malformed row: one line naming it, exit 2
    data.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + '\n{"messages": [{"role": "bot"}]}\n')
    code, out, err = run_cli(["--backend", backend, "train", "--data", str(data), "--preset", "tiny",
                              "--out", str(tmp_path / "run2")], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and f"{data}:2:" in err and err.count("\n") == 1


def test_default_template_and_masks_for_own_tokenizers() -> None:
    tmpl = chat.run_template(None)
    assert tmpl.is_default and tmpl.stop == (chat.DEFAULT_STOP,)
    msgs = CONVERSATIONS[1]
    text = tmpl.render(msgs)
    assert text.startswith("<|system|>\nYou are terse.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n")
    for tok in (CharTokenizer.train(text), ByteTokenizer()):
        ids, w = chat.encode_example({"messages": msgs}, tmpl, tok, mask_prompt=True)
        assert tok.decode(ids) == text
        assert tok.decode(ids[w > 0]) == "Hello.<|end|>\n Blue\n<|end|>\n"
        ids2, w2 = chat.encode_example({"messages": msgs}, tmpl, tok, mask_prompt=False)
        assert (ids2 == ids).all() and w2.all()


BAD_ROWS = [
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "wizard", "content": "a"}]}', "unknown role 'wizard'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "string 'content'"),
    ('{"prompt": "a", "completion": "b"}', "one format per file"),
    ('{"prompt": "a"', "not valid JSON"),
    ('{"foo": 1}', "a row needs"),
    ('[1, 2]', "a row needs"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_malformed_rows_name_their_line(tmp_path: Path, bad: str, message: str) -> None:
    good = json.dumps({"messages": CONVERSATIONS[0]})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n\n{bad}\n{good}\n")
    with pytest.raises(chat.ChatError) as e:
        chat.read_rows(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_prompt_completion_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "2+2", "completion": "4"}\n{"prompt": "3+3", "completion": "6"}\n')
    assert chat.sniff(path) == "prompt"
    fmt, train, val = chat.load_splits(path, seed=0)
    assert fmt == "prompt" and len(train) == len(val) == 1
    assert train[0]["messages"][1]["role"] == "assistant"
    text_file = tmp_path / "t.jsonl"
    text_file.write_text('{"text": "plain"}\n')
    assert chat.sniff(text_file) is None  # plain-text rows stay with the corpus loader


def _batch() -> tuple[dict[str, np.ndarray], object]:
    tmpl = chat.run_template(None)
    rows = [{"messages": c} for c in CONVERSATIONS]
    text = "".join(tmpl.render(r["messages"]) for r in rows)
    tok = CharTokenizer.train(text)
    cfg = preset("tiny", vocab_size=tok.vocab_size, block_size=80).replace(
        arch="llama", pos_encoding="rope", norm="rmsnorm", activation="swiglu", n_layer=1)
    return encode_rows(rows, tmpl, tok, 80, mask_prompt=True), cfg


def test_masked_targets_carry_no_gradient() -> None:
    """Changing a target whose weight is 0 moves neither the loss nor any gradient; changing a weighted one
    does (the negative control). Padding after an example changes nothing either (causal mask)."""
    batch, cfg = _batch()
    assert 0 < batch["w"].sum() < (batch["x"] > -1).sum()
    B = backend_or_skip("mlx")
    params = {k: B.from_numpy(v) for k, v in init_params(cfg, 0).items()}
    vg = B.value_and_grad(lambda p, b: chat_loss(B, cfg, p, b))

    def run(b: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        loss, grads = vg(params, {k: B.from_numpy(v) for k, v in b.items()})
        return float(B.to_numpy(loss)), {k: B.to_numpy(g) for k, g in grads.items()}

    base_loss, base_grads = run(batch)
    masked = np.argwhere(batch["w"] == 0)
    changed = {k: v.copy() for k, v in batch.items()}
    for r, c in masked:
        changed["y"][r, c] = (changed["y"][r, c] + 1) % cfg.vocab_size
    last = [int(np.max(np.nonzero(batch["w"][r])[0])) for r in range(len(batch["w"]))]
    for r, c in enumerate(last):  # the inputs after each example's last learned target: padding
        changed["x"][r, c + 1:] = (changed["x"][r, c + 1:] + 3) % cfg.vocab_size
    loss, grads = run(changed)
    assert loss == base_loss
    for k in base_grads:
        np.testing.assert_array_equal(grads[k], base_grads[k])
    control = {k: v.copy() for k, v in batch.items()}
    r, c = np.argwhere(batch["w"] == 1)[0]
    control["y"][r, c] = (control["y"][r, c] + 1) % cfg.vocab_size
    assert run(control)[0] != base_loss


def test_masked_loss_and_gradients_match_across_backends() -> None:
    batch, cfg = _batch()
    out = {}
    for name in ("mlx", "tinygrad"):
        B = backend_or_skip(name)
        params = {k: B.from_numpy(v) for k, v in init_params(cfg, 0).items()}
        loss, grads = B.value_and_grad(lambda p, b, B=B: chat_loss(B, cfg, p, b))(
            params, {k: B.from_numpy(v) for k, v in batch.items()})
        out[name] = (float(B.to_numpy(loss)), {k: B.to_numpy(g) for k, g in grads.items()})
    (l1, g1), (l2, g2) = out["mlx"], out["tinygrad"]
    assert abs(l1 - l2) < 1e-5
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], atol=1e-5, rtol=1e-4)
    # negative control: the unmasked loss is a different number
    B = backend_or_skip("mlx")
    params = {k: B.from_numpy(v) for k, v in init_params(cfg, 0).items()}
    full = dict(batch, w=(batch["x"] >= 0).astype(np.float32))
    assert abs(float(B.to_numpy(chat_loss(B, cfg, params, {k: B.from_numpy(v) for k, v in full.items()})))
               - l1) > 1e-3


@pytest.mark.parametrize("where", ["tokenizer_config", "jinja_file"])
def test_imported_model_finetunes_with_its_own_template(tmp_path: Path, where: str) -> None:
    """A Hugging Face folder's template (in tokenizer_config.json or chat_template.jinja) travels through
    import-hf and `train --init-from` into the examples; its eos token is a stop token for chat/serve."""
    pytest.importorskip("transformers")
    from tests.hf_models import build
    from twinlm.backends import get_backend
    from twinlm.chat_model import load_chat_model
    from twinlm.hf import import_hf
    from twinlm.trainer import TrainConfig, Trainer

    template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    folder = build("LlamaForCausalLM", tmp_path / "hf")
    cfg_path = folder / "tokenizer_config.json"
    if where == "tokenizer_config":
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": template}))
    else:
        (folder / "chat_template.jinja").write_text(template)
    import_hf(folder, tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the {w}", "completion": "sat"}) + "\n"
                            for w in ("cat", "dog", "owl", "fox")))
    tc = TrainConfig(base=str(tmp_path / "base"), data=str(data), max_iters=1, batch_size=2, block_size=32,
                     out=str(tmp_path / "run"))
    trainer = Trainer(tc, get_backend("mlx"), log=lambda m: None)
    x, w = trainer.task.train["x"][0], trainer.task.train["w"][0]
    tok = trainer.tokenizer
    assert tok.decode(x[: int((x > 0).sum()) + 1]).startswith("<s>user: the ")
    learned = tok.decode(trainer.task.train["y"][0][w > 0])
    assert learned in ("sat</s>", " sat</s>")  # " sat" is one token of this byte-level BPE
    trainer.fit()
    cm = load_chat_model(tmp_path / "run")
    assert cm.template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == \
        "<s>user: hi</s><s>assistant: "
    assert tok.id_of("eos") in cm.stop_ids and not cm.template.is_default
    # export-hf hands the template on where it came from; transformers renders it the same
    from transformers import AutoTokenizer

    from twinlm.hf import export_hf

    out, _ = export_hf(tmp_path / "run", tmp_path / "export")
    assert (out / "chat_template.jinja").exists() == (where == "jinja_file")
    ref = AutoTokenizer.from_pretrained(out)
    assert ref.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<s>user: hi</s><s>assistant: "
