"""Shared fixtures: the tiny model every parity test uses (one config, one batch shape, so tinygrad
builds each graph once per process), and backends that skip with the install hint when absent."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile

# Before any framework is imported (both read these once). tinygrad otherwise takes the first device that
# opens (an installed OpenCL runtime moves every test to CL); `make test-cl` sets DEV=CL itself. MLX on a
# GPU runs float32 matmuls in TF32 unless told not to, which the 1e-4/1e-5 tolerances are not for.
os.environ.setdefault("DEV", "CPU")
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import numpy as np
import pytest

from twinlm.backends import BackendUnavailable, get_backend
from twinlm.core.backend import Backend
from twinlm.core.config import ModelConfig, preset
from twinlm.core.params import init_params

TRAINABLE = ("mlx", "tinygrad")
ALL_BACKENDS = ("mlx", "tinygrad", "numpy")


def pytest_configure(config: pytest.Config) -> None:
    # A private tinygrad JIT cache per test process, so no test depends on what an earlier run left in
    # ~/.cache (child processes the tests start inherit it). Per xdist worker too, so workers stay
    # independent. (A shared folder once gave `test_model_parity` wrong tinygrad gradients: a worker loaded
    # the other's entry, whose buffer slot numbers collided with its own live buffers; fixed in
    # tinygrad_jitcache's loader, test_tinygrad_jitcache::test_loaded_entry_keeps_its_buffers_apart...)
    if "TWINLM_JIT_CACHE" not in os.environ or os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["TWINLM_JIT_CACHE"] = config._twinlm_jit_cache = tempfile.mkdtemp(prefix="twinlm-jit-")


# Started first: under `pytest -n 2`, tests run in collection order, and this one (every documented command,
# ~10 minutes on its worker) collected last would start when the other worker is nearly done, setting the
# wall time alone (measured: 1,161 s for the suite, 617 s of it this test).
FIRST = ("tests/test_readme.py::test_every_documented_command_runs",)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    items.sort(key=lambda item: item.nodeid not in FIRST)  # stable: the rest keep their order


def pytest_unconfigure(config: pytest.Config) -> None:
    if folder := getattr(config, "_twinlm_jit_cache", None):
        shutil.rmtree(folder, ignore_errors=True)
        del os.environ["TWINLM_JIT_CACHE"]


@pytest.fixture(autouse=True)
def _sigint_restored():
    """A command run in-process can leave SIGINT changed (an interrupted `train` ignores it on its way out, as
    the process is about to exit); restored after each test, since an ignored SIGINT is inherited by every
    child process a later test starts (a `twinlm chat` under a terminal then never saw Ctrl-C)."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)


def backend_or_skip(name: str) -> Backend:
    try:
        return get_backend(name)
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return preset("tiny", vocab_size=32, block_size=16)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg: ModelConfig) -> dict[str, np.ndarray]:
    return init_params(tiny_cfg, 0)


@pytest.fixture(scope="session")
def tiny_tokens(tiny_cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (2, block_size) batch of inputs and next-token targets."""
    seq = (np.arange(2 * (tiny_cfg.block_size + 1)).reshape(2, -1) * 7 % tiny_cfg.vocab_size).astype(np.int32)
    return seq[:, :-1], seq[:, 1:]


def run_cli(args: list[str], capsys: pytest.CaptureFixture,
            monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `twinlm ARGS` run in this process through the real entry point."""
    from twinlm.cli.main import main

    monkeypatch.setattr(sys, "argv", ["twinlm", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
