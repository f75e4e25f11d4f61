"""parallelism: a transformer trains in parallel over the window, an LSTM steps through it.

A GPT and an LSTM of about the same parameter count are trained for a few steps each by the real trainer
at growing block sizes; the first step (trace + compile) is reported apart from the steady state, whose
step time is the median of the per-step times the trainer logs. The LSTM's recurrence is unrolled in the
graph (`core/models/lstm.py`), so its compile time grows with the block too, which is recorded as well.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twinlm.core import task as sort_task
from twinlm.experiments.common import (
    Context,
    Outcome,
    figure,
    matched_width,
    n_params,
    read_curve,
    train,
    write_corpus,
)
from twinlm.trainer import model_config

CLAIM = "Transformers train in parallel over the sequence, where RNNs must step through time."
ABOUT = ("GPT vs LSTM of equal parameter count: training tokens/s and step time as the block grows 16 -> "
         "512 (quick: 16, 64; 16 steps each). Measured here (2-core CPU shared with other jobs, MLX): "
         "full 2.5 min, quick 4-7 s. On tinygrad the LSTM stops at block 64: compiling its unrolled "
         "graph takes minutes.")
GPT = dict(n_layer=2, n_head=4, d_model=64)
# tinygrad compiles every unrolled step's kernels: past 64 the LSTM's compile alone takes many minutes.
TINYGRAD_LSTM_MAX_BLOCK = 64


def run(ctx: Context) -> Outcome:
    blocks = ctx.pick([16, 64], [16, 32, 64, 128, 256, 512])
    steps = 16  # quick too: the median of more steps resists other jobs' bursts, and costs ~1 s more
    batch = 8
    corpus = write_corpus(ctx, "corpus", sort_task.builtin_corpus())
    rows: list[dict[str, Any]] = []
    skipped = []
    for T in blocks:
        for arch in ("gpt", "lstm"):
            if arch == "lstm" and ctx.B.name == "tinygrad" and T > TINYGRAD_LSTM_MAX_BLOCK:
                skipped.append(T)
                continue
            shape = dict(GPT)
            if arch == "lstm":
                ref = model_config_of(corpus, dict(GPT, block_size=T))
                shape = dict(n_layer=2, n_head=4, d_model=matched_width(ref, "lstm", n_params(ref)))
            r = train(ctx, f"{arch}-{T}", data=corpus, arch=arch, block_size=T, batch_size=batch,
                      max_iters=steps, eval_iters=1, **shape)
            res = r.result
            assert res is not None and res.tokens_per_s  # a few steps at lr 3e-3 never diverge
            # The median step (from the per-step log) resists other jobs' bursts on a shared CPU.
            times = [t for _, t in read_curve(r.trainer.out, "time")]
            step_s = float(np.median(np.diff(times))) if len(times) > 2 else batch * T / res.tokens_per_s
            rows.append(dict(arch=arch, block=T, params=n_params(r.cfg), d_model=r.cfg.d_model,
                             tokens_per_s=batch * T / step_s, step_ms=1000 * step_s,
                             mean_tokens_per_s=res.tokens_per_s, compile_s=res.compile_s))
            ctx.log(f"  {arch:4s} block {T:4d}: {rows[-1]['tokens_per_s']:10,.0f} tok/s  step "
                    f"{rows[-1]['step_ms']:8.1f} ms  first step {res.compile_s:6.2f} s")

    def series(arch: str, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["block"], r[key]) for r in rows if r["arch"] == arch]
        return [p[0] for p in pts], [p[1] for p in pts]

    with figure(ctx, "parallelism.png", "Training throughput: transformer vs LSTM of equal size",
                ncols=3, size=(13, 4.2)) as axes:
        for ax, key, label in zip(axes[0], ("tokens_per_s", "step_ms", "compile_s"),
                                  ("training throughput (tokens / s)", "steady step time (ms)",
                                   "first step: trace + compile (s)"), strict=True):
            for arch, colour in (("gpt", "C0"), ("lstm", "C3")):
                ax.plot(*series(arch, key), "o-", color=colour, label=arch)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("block size (tokens)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend()
    common = [T for T in blocks if T not in skipped]
    top = max(common)
    by = {(r["arch"], r["block"]): r for r in rows}
    ratio = by[("gpt", top)]["tokens_per_s"] / by[("lstm", top)]["tokens_per_s"]
    growth = {a: by[(a, top)]["step_ms"] / by[(a, min(common))]["step_ms"] for a in ("gpt", "lstm")}
    headline = (f"at block {top} the transformer trains {ratio:.1f}x the LSTM's tokens/s "
                f"({by[('gpt', top)]['tokens_per_s']:,.0f} vs {by[('lstm', top)]['tokens_per_s']:,.0f}); "
                f"from block {min(common)} to {top} its step time grows {growth['gpt']:.1f}x, the LSTM's "
                f"{growth['lstm']:.1f}x; the LSTM's first step (compile) takes "
                f"{by[('lstm', top)]['compile_s']:.1f} s vs {by[('gpt', top)]['compile_s']:.1f} s")
    note = ("timings on a shared, loaded CPU: compare ratios, not absolute numbers"
            + ("; a quick run's step-time growth over two blocks is noisy under load, its tokens/s ratio "
               "much less so" if ctx.quick else "")
            + (f"; LSTM skipped at blocks {skipped} on tinygrad (compile time)" if skipped else ""))
    return Outcome(CLAIM, headline, reproduced=ratio > 1.0,
                   numbers=dict(rows=rows, tokens_per_s_ratio_at_top=ratio, step_time_growth=growth,
                                lstm_skipped_blocks=skipped),
                   config=dict(gpt=GPT, blocks=blocks, steps=steps, batch=batch,
                               corpus="built-in sort corpus"),
                   note=note)


def model_config_of(corpus: str, shape: dict[str, Any]) -> Any:
    """The GPT config the trainer would build on `corpus` (for its parameter count)."""
    from twinlm.core.data import prepare
    from twinlm.trainer import TrainConfig

    vocab = prepare(corpus).tokenizer.vocab_size
    return model_config(TrainConfig(**shape), vocab)
