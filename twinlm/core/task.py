"""The built-in task: sort a string of digits.

    "51940>01459\\n"    the digits of 51940 in ascending order

Each output digit is the next smallest input digit of the line, which attention finds by content,
so a small transformer learns it within a couple of minutes on a CPU. (Reversed-digit addition was
tried first and measured: its modular digit sums need far more steps than that budget allows.)
Every prompt has the same length, so evaluation runs as one batch. The success measure is exact
match of the whole completion: all sorted digits and the closing newline.

A fixed hash of each input string holds out 1/16 of all strings: the training corpus never contains
them and `eval_examples` draws only from them, so accuracy measures generalisation, not recall.
Everything here is generated from fixed seeds; no outside text is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

DIGITS = 5  # digits per string
CORPUS_LINES = 60_000
CORPUS_SEED = 1234
NAME = "sort"


def _values(digits: np.ndarray) -> np.ndarray:
    return digits.astype(np.uint64) @ (np.uint64(10) ** np.arange(DIGITS - 1, -1, -1, dtype=np.uint64))


def _held_out(digits: np.ndarray) -> np.ndarray:
    """True for held-out strings (rows of `digits`): the top 4 bits of a multiplicative (Knuth) hash are 0."""
    h = (_values(digits) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    return (h >> np.uint64(28)) == 0


def _line(digits: Sequence[int]) -> tuple[str, str]:
    """(prompt, completion) for one string; the prompt starts with the newline that ends the line before."""
    return "\n" + "".join(map(str, digits)) + ">", "".join(map(str, sorted(digits))) + "\n"


def _strings(n: int, seed: int, held_out: bool, distinct: bool = False) -> list[tuple[int, ...]]:
    """n digit strings from one side of the split, drawn uniformly with a fixed seed."""
    rng = np.random.default_rng(seed)
    out: dict[tuple[int, ...], None] | list[tuple[int, ...]] = {} if distinct else []
    while len(out) < n:
        d = rng.integers(0, 10, size=(4 * n + 64, DIGITS))
        rows = map(tuple, d[_held_out(d) == held_out].tolist())
        if isinstance(out, dict):
            out.update(dict.fromkeys(rows))
        else:
            out.extend(rows)
    return list(out)[:n]


@lru_cache(maxsize=1)
def builtin_corpus() -> str:
    """The training text: CORPUS_LINES sorted strings, one per line, none of them held out."""
    lines = (_line(d) for d in _strings(CORPUS_LINES, CORPUS_SEED, held_out=False))
    return "".join(p[1:] + c for p, c in lines)


def is_held_out(digits: Sequence[int]) -> bool:
    return bool(_held_out(np.array([digits]))[0])


def eval_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct held-out (prompt, expected completion) pairs; every prompt has PROMPT_LEN chars."""
    pool = 10 ** DIGITS // 16
    if not 0 < n <= pool // 2:
        raise ValueError(f"the number of evaluation examples must be in [1, {pool // 2}], got {n}")
    return [_line(d) for d in _strings(n, seed, held_out=True, distinct=True)]


PROMPT_LEN = len(_line([0] * DIGITS)[0])
COMPLETION_LEN = len(_line([0] * DIGITS)[1])


def is_correct(completion: str, expected: str) -> bool:
    """Exact match of the first len(expected) generated characters."""
    return completion[:len(expected)] == expected


def accuracy(completions: Sequence[str], examples: Sequence[tuple[str, str]]) -> float:
    """Fraction of completions that exactly match their example's expected completion."""
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
    if not examples:
        return 0.0
    return sum(is_correct(c, e) for c, (_, e) in zip(completions, examples, strict=True)) / len(examples)
