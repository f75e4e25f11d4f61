"""`twinlm predict`: what a trained run says about some text, whatever it was trained for."""

from __future__ import annotations

import click
import numpy as np

from twinlm.cli.common import backend, backend_option, dtype_option
from twinlm.core import model
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer


@click.command("predict")
@click.argument("run_dir", type=click.Path())
@click.argument("texts", nargs=-1, required=True)
@backend_option
@dtype_option
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=40, show_default=True,
              help="Decoders: how many tokens to continue each text with (greedy).")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True,
              help="Masked LMs: candidates shown per [MASK].")
def command(run_dir: str, texts: tuple[str, ...], backend_name: str | None, dtype: str | None,
            max_new_tokens: int, top: int) -> None:
    """For each TEXT: a classifier's label and probabilities; a masked LM's fill-in of every [MASK]
    (e.g. "1234>12[MASK]34"); a decoder's greedy continuation."""
    from twinlm.generate import generate
    from twinlm.run_dir import load_model, run_dtype, to_backend

    cfg, np_params, tok, meta = load_model(run_dir)
    B = backend(backend_name)
    params = to_backend(B, np_params, run_dtype(meta, dtype))
    if cfg.n_classes:
        _classify(B, cfg, params, tok, meta.labels, texts)
    elif cfg.kind == "encoder":
        for text in texts:
            _fill_masks(B, cfg, params, tok, text, top)
    else:
        for text in texts:
            ids = tok.encode(text)
            if ids.size == 0:
                raise TwinlmError("an empty text has nothing to continue")
            cols = list(generate(B, cfg, params, ids[None, :], max_new_tokens, temperature=0.0))
            click.echo(f"{text}{tok.decode(np.concatenate(cols))}")


def _classify(B: Backend, cfg: ModelConfig, params: dict[str, Array], tok: Tokenizer, labels: list[str],
              texts: tuple[str, ...]) -> None:
    from twinlm.tasks.classify import encode_examples

    if len(labels) != cfg.n_classes:
        raise TwinlmError(f"the run's meta names {len(labels)} labels for a {cfg.n_classes}-class head")
    batch = {k: B.from_numpy(v) for k, v in encode_examples(list(texts), tok, cfg).items()}
    logits = B.to_numpy(model.classify(B, cfg, params, batch["x"], batch["pool"], mask=batch.get("mask")))
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    for text, p in zip(texts, probs, strict=True):
        order = np.argsort(-p)
        shown = "  ".join(f"{labels[i]} {p[i]:.3f}" for i in order)
        click.echo(f"{labels[order[0]]}\t{text}\t({shown})")


def _fill_masks(B: Backend, cfg: ModelConfig, params: dict[str, Array], tok: Tokenizer, text: str,
                top: int) -> None:
    if not {"[MASK]", "[CLS]"} <= set(tok.specials):
        raise TwinlmError("this run's tokenizer has no [MASK] token")
    ids = np.concatenate([[tok.id_of("[CLS]")], tok.encode(text)]).astype(np.int32)
    if len(ids) > cfg.block_size:
        raise TwinlmError(f"the text is {len(ids) - 1} tokens; this model reads at most {cfg.block_size - 1}")
    where = np.flatnonzero(ids == tok.id_of("[MASK]"))
    if where.size == 0:
        raise TwinlmError(f"no [MASK] in {text!r}: write [MASK] where the model should fill in a token")
    logits = B.to_numpy(model.logits(B, cfg, params, B.from_numpy(ids[None, :])))[0].astype(np.float64)
    logits[:, tok.n_plain:] = -np.inf  # fill in ordinary tokens only
    logits[:, [tok.id_of(s) for s in tok.specials]] = -np.inf
    filled = ids.copy()
    notes = []
    for pos in where:
        z = np.exp(logits[pos] - logits[pos].max())
        p = z / z.sum()
        best = np.argsort(-p)[:top]
        filled[pos] = best[0]
        notes.append(" ".join(f"{tok.decode([int(i)])!r} {p[i]:.3f}" for i in best))
    click.echo(f"{tok.decode(filled[1:])}\t{text}\t" + " | ".join(notes))
