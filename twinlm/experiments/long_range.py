"""long-range: attention reaches a token d positions back as easily as the one before; an LSTM must carry it
through d steps of its state.

Each generated example is `block_size` random letters (8 of them); its label is the letter d positions
before the last. Nothing marks that letter, so a recurrence must keep the last d letters in its state,
while attention can read the position directly. For each distance, a GPT and an LSTM of about the same
parameter count are trained on the same examples, steps and batches through the trainer's classification
task (`twinlm finetune --from-scratch`: the one-step base run only fixes the model and tokenizer), reading
the last token's hidden state; each is scored on fresh examples. Chance is 1/8.
"""

from __future__ import annotations

import csv
import string
from typing import Any

import numpy as np

from twinlm.experiments import common as E

CLAIM = "Attention captures long-range dependencies that RNNs/LSTMs struggle with."
ABOUT = ("Recall of the token d positions back (quick: d = 2, 12; full: 2, 16, 48), GPT vs LSTM at equal "
         "parameter count and steps: accuracy vs distance. Measured here (2-core CPU shared with other "
         "jobs, MLX): full 20 min, quick 8-13 s.")
LETTERS = string.ascii_lowercase[:8]
GPT = dict(n_layer=2, n_head=4, d_model=64)


def examples(n: int, d: int, block: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(text, label): `block` random letters, labelled with the one d positions before the last."""
    ids = rng.integers(len(LETTERS), size=(n, block))
    return [("".join(LETTERS[i] for i in row), LETTERS[row[block - 1 - d]]) for row in ids]


def run(ctx: E.Context) -> E.Outcome:
    distances = ctx.pick([2, 12], [2, 16, 48])
    block = ctx.pick(16, 50)
    steps = ctx.pick(60, 600)
    settings = dict(batch_size=32, max_iters=steps, lr=3e-3, warmup=ctx.pick(15, 100))
    rng = np.random.default_rng([ctx.seed, 11])
    alphabet = E.write_corpus(ctx, "alphabet", "\n".join(t for t, _ in examples(200, 1, block, rng)))
    acc: dict[str, dict[int, float]] = {"gpt": {}, "lstm": {}}
    info: dict[str, Any] = {"gpt": {}, "lstm": {}}
    shapes: dict[str, dict[str, Any]] = {"gpt": dict(GPT)}
    bases = {}
    for arch in ("gpt", "lstm"):
        # The base run fixes model and tokenizer only (one step); every recall run starts from fresh weights.
        bases[arch] = E.train(ctx, f"{arch}-base", data=alphabet, arch=arch, block_size=block, batch_size=4,
                              max_iters=1, **shapes[arch])
        if arch == "gpt":
            ref = bases["gpt"].cfg
            shapes["lstm"] = dict(n_layer=2, d_model=E.matched_width(ref, "lstm", E.n_params(ref)))
    for d in distances:
        data = write_examples(ctx, f"recall-{d}.csv", examples(ctx.pick(3000, 20_000), d, block, rng))
        test = examples(ctx.pick(200, 1000), d, block, rng)
        for arch in ("gpt", "lstm"):
            r = E.train(ctx, f"{arch}-d{d}", task="classify", base=str(bases[arch].trainer.out), data=data,
                        from_scratch=True, **settings)
            acc[arch][d] = E.classify_accuracy(ctx.B, r.cfg, r.params, r.trainer.tokenizer, r.trainer.labels,
                                               test)
            info[arch][d] = dict(params=E.n_params(r.cfg), final_loss=r.curve[-1][1], diverged=r.diverged,
                                 compile_s=r.result.compile_s if r.result else None)
        ctx.log(f"  d={d:3d}: gpt {acc['gpt'][d]:6.1%}  lstm {acc['lstm'][d]:6.1%}")
    params = {a: info[a][distances[0]]["params"] for a in acc}
    with E.figure(ctx, "long_range.png", "Recall of the token d positions back: transformer vs LSTM") as ax:
        for arch, colour in (("gpt", "C0"), ("lstm", "C3")):
            ax.plot(distances, [100 * acc[arch][d] for d in distances], "o-", color=colour,
                    label=f"{arch} ({params[arch]:,} params, {steps} steps per distance)")
        ax.axhline(100 / len(LETTERS), color="0.5", ls=":", label="chance (1/8)")
        ax.set_xlabel("dependency distance d (tokens)")
        ax.set_ylabel("accuracy on fresh examples (%)")
        ax.set_ylim(0, 105)
        ax.grid(True, alpha=0.3)
        ax.legend()
    far, near = max(distances), min(distances)
    gap = acc["gpt"][far] - acc["lstm"][far]
    headline = (f"at distance {far} the transformer recalls the token {acc['gpt'][far]:.0%} of the time, "
                f"the LSTM {acc['lstm'][far]:.0%} (at d={near}: {acc['gpt'][near]:.0%} vs "
                f"{acc['lstm'][near]:.0%}); {steps} steps each, chance 12.5%")
    # Too short a run leaves both near chance at the longest distance: then it shows nothing either way.
    learned = max(acc["gpt"][far], acc["lstm"][far]) > 0.5
    return E.Outcome(CLAIM, headline, reproduced=(gap > 0.1) if learned else None,
                     numbers=dict(accuracy=acc, models=info, params=params, gap_at_longest=gap),
                     config=dict(distances=distances, block_size=block, gpt=GPT, lstm=shapes["lstm"],
                                 letters=len(LETTERS), **settings),
                     note="" if learned else "neither model learned the longest distance in this budget")


def write_examples(ctx: E.Context, name: str, rows: list[tuple[str, str]]) -> str:
    path = ctx.out / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)
