"""tinygrad's BEAM kernel search with a time budget per kernel (`twinlm train --beam N`).

tinygrad 0.14 searches each kernel's optimisations (upcast, unroll, local, ...) breadth-first, BEAM
candidates wide, until a round stops improving; it bounds only the compile of one candidate
(BEAM_TIMEOUT_SEC) and its run (BEAM_DEV_TIMEOUT), not the search. Here, once `seconds` have passed
in one kernel's search, no new round starts and the rest of the round under way is not timed (only
compiled, in tinygrad's worker pool), so the search ends soon after with the best found so far.
Results go to tinygrad's disk cache (CACHEDB, per machine: ~/.cache/tinygrad), and the captured step
with its searched kernels to twinlm's JIT cache, so a second run skips both.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

DEFAULT_SECONDS = 10.0  # per kernel


def enable(width: int, seconds: float = DEFAULT_SECONDS) -> None:
    """Turn BEAM search on for kernels compiled from now on in this process (and children)."""
    from tinygrad import helpers
    from tinygrad.codegen.opt import search

    os.environ["BEAM"] = str(width)  # also in the JIT cache's key, and inherited by child processes
    os.environ["BEAM_KERNEL_SECONDS"] = str(seconds)
    helpers.BEAM.value = width
    if getattr(search.beam_search, "twinlm_bounded", False):
        _deadline["seconds"] = seconds
        return
    _deadline["seconds"] = seconds
    beam_search, kernel_actions = search.beam_search, search.get_kernel_actions
    time_program = search._time_program

    def bounded_search(*args: Any, **kwargs: Any) -> Any:
        _deadline["at"] = time.perf_counter() + _deadline["seconds"]
        try:
            return beam_search(*args, **kwargs)
        finally:
            _deadline["at"] = math.inf

    def bounded_actions(*args: Any, **kwargs: Any) -> Any:
        # No new candidates past the deadline: beam_search then keeps its best and returns.
        return {} if time.perf_counter() > _deadline["at"] else kernel_actions(*args, **kwargs)

    def bounded_time(*args: Any, **kwargs: Any) -> Any:
        if time.perf_counter() > _deadline["at"]:
            raise RuntimeError("twinlm: BEAM budget of this kernel spent")  # beam_search skips the candidate
        return time_program(*args, **kwargs)

    bounded_search.twinlm_bounded = True  # type: ignore[attr-defined]
    search.beam_search, search.get_kernel_actions = bounded_search, bounded_actions
    search._time_program = bounded_time


_deadline: dict[str, float] = {"at": math.inf, "seconds": DEFAULT_SECONDS}
