"""Which all-reduce MLX ranks use, and the shared-memory segment's name (framework-free: the launcher
imports it without MLX).

Ranks that `trainer.distributed.launch` started (`twinlm train --ranks N`, the benchmarks) are all on this
host, and the launcher gives them one random id per launch in $TWINLM_SHM_ID: they sum their gradients
through a POSIX shared-memory segment named from it (the kernels' `shm_all_sum`: copy, futex wait, sum in
rank order) instead of MLX's ring over TCP loopback, which spins a core. $TWINLM_ALLREDUCE picks:
`auto` (the default: shm when the ranks were started by twinlm's launcher and the kernels are active,
else the ring), `shm` (an error when it cannot be used) or `ring`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from twinlm.backends import BackendUnavailable  # a TwinlmError that get_backend passes on as it is

MODE_ENV = "TWINLM_ALLREDUCE"
ID_ENV = "TWINLM_SHM_ID"  # set by the launcher: one id per launch, so concurrent trainings never share
TIMEOUT_ENV = "TWINLM_SHM_TIMEOUT"
MODES = ("auto", "shm", "ring")
# How long a rank waits for the others before it gives up with an error. A peer that DIED is noticed at
# once (its pid); this only bounds a peer that stopped answering, and is longer than the launcher's own
# watchdog (300 s per step + 300 s for the first), which names the culprit better.
DEFAULT_TIMEOUT_S = 600.0
# The chunk each rank copies per round: 4 MB (the baby step's 3.2 MB gradient is one round), less with many
# ranks so the segment (2 x ranks x slot) stays within 32 MB of /dev/shm (a container's default is 64 MB).
MAX_SLOT_FLOATS = 1 << 20
SEGMENT_BYTES = 32 << 20


def mode() -> str:
    value = (os.environ.get(MODE_ENV) or "auto").strip().lower()
    if value not in MODES:
        raise BackendUnavailable(f"${MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def new_id() -> str:
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def segment_name(launch_id: str) -> str:
    return f"/twinlm-allreduce-{launch_id}"


def slot_floats(ranks: int) -> int:
    return max(1 << 14, min(MAX_SLOT_FLOATS, SEGMENT_BYTES // (2 * ranks * 4)))


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BackendUnavailable(f"${TIMEOUT_ENV}={raw!r}: expected seconds > 0")
    return value


def unlink(launch_id: str) -> None:
    """Remove the segment's name if a rank left it (the last rank to attach removes it; one that died
    before that leaves it to the launcher). Linux keeps POSIX shared memory under /dev/shm."""
    try:
        (Path("/dev/shm") / segment_name(launch_id).lstrip("/")).unlink()
    except OSError:
        pass
