"""scaling: at a fixed budget of steps, a bigger model reaches a lower validation loss, along a power law.

GPTs of growing width (and, in the full sweep, depth) train for the same steps and batches on the built-in
sort corpus. Its loss has a known floor: 5 of every 12 characters are random digits (ln 10 nats each) and
the rest follow from them, so the floor is 5 ln(10) / 12 = 0.959 nats per character. The reducible part,
val loss - floor, is fitted to a N^-b over the parameter count N (least squares in log-log).
"""

from __future__ import annotations

import math

import numpy as np

from twinlm.core import task as sort_task
from twinlm.experiments import common as E

CLAIM = "Quality scales with model size (at a fixed budget of steps and data)."
ABOUT = ("Val loss vs parameter count of GPTs from ~4k to ~0.8M parameters on the built-in corpus, with a "
         "fitted power law. Measured here (2-core CPU shared with other jobs, MLX): quick (3 sizes) 8-55 "
         "s (22 min on tinygrad), full 5 min.")
FLOOR = sort_task.DIGITS * math.log(10) / (2 * sort_task.DIGITS + 2)


def run(ctx: E.Context) -> E.Outcome:
    shapes = ctx.pick([(1, 16), (2, 32), (2, 64)], [(1, 16), (2, 32), (2, 64), (3, 96), (4, 128)])
    sizes = [dict(n_layer=n, d_model=d) for n, d in shapes]
    steps = ctx.pick(150, 1000)
    settings = dict(block_size=32, n_head=4, batch_size=16, max_iters=steps, lr=3e-3,
                    warmup=ctx.pick(15, 100), eval_iters=ctx.pick(8, 20))
    corpus = E.write_corpus(ctx, "corpus", sort_task.builtin_corpus())
    rows = []
    for shape in sizes:
        r = E.train(ctx, f"gpt-{shape['n_layer']}x{shape['d_model']}", data=corpus, **shape, **settings)
        val = r.result.val_loss if r.result else float("nan")
        rows.append(dict(shape, params=E.n_params(r.cfg), val_loss=val, diverged=r.diverged is not None))
        ctx.log(f"  {shape['n_layer']} x {shape['d_model']:3d}: {rows[-1]['params']:9,d} params  "
                f"val loss {val:.4f}")
    n = np.array([r["params"] for r in rows], float)
    excess = np.array([r["val_loss"] for r in rows]) - FLOOR
    ok = np.isfinite(excess) & (excess > 0)
    slope, intercept = np.polyfit(np.log(n[ok]), np.log(excess[ok]), 1) if ok.sum() >= 2 else (np.nan, np.nan)
    b, a = -float(slope), float(np.exp(intercept))
    with E.figure(ctx, "scaling.png", "Validation loss vs model size at a fixed budget") as ax:
        ax.loglog(n, excess, "o", color="C0", label="measured: val loss - floor")
        if np.isfinite(b):
            grid = np.geomspace(n.min(), n.max(), 50)
            ax.loglog(grid, a * grid ** -b, "--", color="C3", label=f"fit: {a:.3g} N^-{b:.3f}")
        ax.set_xlabel("parameters N")
        ax.set_ylabel(f"val loss - floor {FLOOR:.3f} (nats / char)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    monotone = bool(np.all(np.diff([r["val_loss"] for r in rows]) < 0))
    headline = (f"val loss falls from {rows[0]['val_loss']:.3f} ({rows[0]['params']:,} params) to "
                f"{rows[-1]['val_loss']:.3f} ({rows[-1]['params']:,}) after {steps} steps; reducible loss "
                f"~ N^-{b:.2f}")
    return E.Outcome(CLAIM, headline, reproduced=monotone and b > 0,
                     numbers=dict(rows=rows, floor=FLOOR, power_law=dict(a=a, b=b), monotone=monotone),
                     config=dict(sizes=sizes, **settings, corpus="built-in sort corpus"))
