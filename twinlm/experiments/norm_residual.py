"""norm-residual: layer normalisation and residual connections are what let a deep stack train.

The same deep GPT (quick: 6 layers; full: 12) trains on the built-in sort corpus four times: with both
LayerNorm and residual connections (the standard pre-norm block), with only one of them, and with neither
(`norm="none"`, `residual=False` in the model config). A run that diverges is recorded as diverged, with
the iteration it reached, not raised.
"""

from __future__ import annotations

from typing import Any

from twinlm.core import task as sort_task
from twinlm.experiments import common as E

CLAIM = "Layer normalisation and residual connections stabilise the training of deep stacks."
ABOUT = ("A deep GPT (quick: 6 layers, full: 12) with / without LayerNorm and residual connections: loss "
         "curves, divergence recorded. Measured here (2-core CPU shared with other jobs, MLX): quick 8-70 "
         "s, full 7 min.")
VARIANTS = {"norm + residual": dict(norm="layernorm", residual=True),
            "residual only": dict(norm="none", residual=True),
            "norm only": dict(norm="layernorm", residual=False),
            "neither": dict(norm="none", residual=False)}


def run(ctx: E.Context) -> E.Outcome:
    shape = dict(n_layer=ctx.pick(6, 12), n_head=2, d_model=ctx.pick(32, 64), block_size=32)
    steps = ctx.pick(120, 600)
    settings = dict(batch_size=ctx.pick(8, 16), max_iters=steps, lr=3e-3, warmup=ctx.pick(15, 100),
                    eval_iters=4)
    corpus = E.write_corpus(ctx, "corpus", sort_task.builtin_corpus())
    runs: dict[str, dict[str, Any]] = {}
    curves = {}
    for label, opts in VARIANTS.items():
        name = label.replace(" + ", "-").replace(" ", "-")
        r = E.train(ctx, name, data=corpus, **shape, **opts, **settings)
        curves[label] = r.curve
        last = r.curve[-1] if r.curve else (0, float("nan"))
        runs[label] = dict(final_loss=last[1], reached_iter=r.trainer.iter, diverged=r.diverged is not None,
                           divergence=r.diverged, skipped_steps=r.trainer.skipped,
                           val_loss=r.result.val_loss if r.result else None)
        state = (f"DIVERGED at iter {r.trainer.iter}" if r.diverged
                 else f"val loss {runs[label]['val_loss']:.3f}")
        ctx.log(f"  {label:16s} final train loss {last[1]:.3f}  {state}")
    with E.figure(ctx, "norm_residual.png",
                  f"A {shape['n_layer']}-layer GPT with and without LayerNorm / residual connections") as ax:
        for i, (label, curve) in enumerate(curves.items()):
            if curve:
                ax.plot(*zip(*curve, strict=True), color=f"C{i}", lw=1.2,
                        label=label + (" (diverged)" if runs[label]["diverged"] else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats / token)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    best, worst = runs["norm + residual"], runs["neither"]
    headline = (f"after {steps} steps a {shape['n_layer']}-layer GPT with LayerNorm and residuals reaches "
                f"train loss {best['final_loss']:.3f}; without both "
                + (f"it diverged at iter {worst['reached_iter']}" if worst["diverged"]
                   else f"{worst['final_loss']:.3f}")
                + f"; residual only {_state(runs['residual only'])}, norm only {_state(runs['norm only'])}")
    reproduced = worst["diverged"] or best["final_loss"] < worst["final_loss"] - 0.1
    return E.Outcome(CLAIM, headline, reproduced, numbers=dict(runs=runs, curves=curves),
                     config=dict(shape, **settings, corpus="built-in sort corpus"))


def _state(r: dict[str, Any]) -> str:
    return f"diverged at iter {r['reached_iter']}" if r["diverged"] else f"{r['final_loss']:.3f}"
