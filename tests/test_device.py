"""`--device` / $TWINLM_DEVICE: the spec, its errors, and the device recorded where a run is described.

Runs on the CPU: the CL cases (pocl) are in `make test-cl`, which runs this suite's tinygrad tests with
DEV=CL. A device that exists elsewhere (a GPU) is asked for only in the error cases, and those skip where
the device does exist."""

from __future__ import annotations

import json
import os

import pytest
from conftest import backend_or_skip, run_cli
from test_cli_train import TINY, corpus, twinlm  # noqa: F401  (corpus: a fixture)

from twinlm.backends import device as dev
from twinlm.backends import get_backend
from twinlm.core.checkpoint import load_checkpoint


def test_spec_parses_one_device_or_pairs() -> None:
    assert dev.parse("gpu") == {None: "gpu"}
    assert dev.parse("mlx=gpu, tinygrad=CUDA:1") == {"mlx": "gpu", "tinygrad": "CUDA:1"}
    assert dev.for_backend("tinygrad", "mlx=gpu,tinygrad=CL") == "CL"
    assert dev.for_backend("mlx", "tinygrad=CL") is None  # not named: MLX's own choice
    assert dev.for_backend("numpy", "cpu") == "cpu"
    for bad in ("", "torch=gpu", "mlx=", "gpu,cpu", "mlx=cpu,mlx=gpu"):
        with pytest.raises(dev.DeviceUnavailable, match="bad device"):
            dev.parse(bad)


def test_environment_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dev.DEVICE_ENV, "tinygrad=CPU")
    dev.request(None)
    assert dev.requested() == "tinygrad=CPU" and dev.for_backend("tinygrad") == "CPU"
    dev.request("cpu")  # the CLI's --device wins over the environment
    try:
        assert dev.for_backend("tinygrad") == "cpu"
    finally:
        dev.request(None)


def test_suite_pins_tinygrad_to_its_device() -> None:
    # conftest sets DEV=CPU unless the run chose one (make test-cl: DEV=CL): an installed OpenCL runtime
    # must not move the CPU suite.
    B = backend_or_skip("tinygrad")
    assert B.device.split(":")[0] == os.environ["DEV"].split(":")[0]
    info = B.device_info()
    assert info["device"] == B.device and info["name"] and info["tf32"] is False
    assert info["float64"] is B.supports_float64


def test_mlx_device_info_names_the_build() -> None:
    B = backend_or_skip("mlx")
    info = B.device_info()
    assert info["device"] in ("cpu", "gpu") and info["build"] != "none" and info["float64"] is False
    assert info["tf32"] is False or info["device"] == "gpu"  # TF32 exists only on a GPU's matmuls


def test_tinygrad_float64_is_asked_of_the_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    B = backend_or_skip("tinygrad")
    from tinygrad import Device, dtypes

    renderer = type(Device[B.device].renderer)
    without = renderer.supported_dtypes
    # Negative control: a renderer without double (Metal's, or OpenCL's without cl_khr_fp64) must say so.
    monkeypatch.setattr(renderer, "supported_dtypes", lambda self: without(self) - {dtypes.float64})
    assert B.supports_float64 is False and B.device_info()["float64"] is False
    monkeypatch.undo()
    assert B.supports_float64 is (dtypes.float64 in Device[B.device].renderer.supported_dtypes())


def _absent(name: str, device: str) -> None:
    """Skip where `device` exists for backend `name` (then it is not an error case)."""
    try:
        get_backend(name, device=device)
    except dev.DeviceUnavailable:
        return
    pytest.skip(f"{name} has {device} here")


@pytest.mark.parametrize(("backend", "device", "says"), [
    ("mlx", "gpu", "MLX has no GPU here"),
    ("mlx", "CL", "MLX has no device 'CL'; its devices are cpu and gpu"),
    ("tinygrad", "NV", "tinygrad device 'NV' does not open here"),
    ("tinygrad", "BOGUS", "tinygrad has no device 'BOGUS'; its devices are"),
])
def test_a_missing_device_is_one_error_line(backend: str, device: str, says: str,
                                            capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    backend_or_skip(backend)
    _absent(backend, device)
    monkeypatch.setenv(dev.DEVICE_ENV, "")  # restored afterwards: the CLI exports --device to children
    code, out, err = run_cli(["parity", "--quick", "--backend", backend, "--device", device],
                             capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and says in err, err
    assert "Traceback" not in err


def test_bad_spec_is_a_usage_error(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dev.DEVICE_ENV, "")
    code, _, err = run_cli(["--device", "torch=gpu", "doctor"], capsys, monkeypatch)
    assert code == 2 and "bad device 'torch=gpu'" in err and err.count("\n") == 1, err


def test_train_records_the_device(tmp_path, corpus) -> None:  # noqa: F811
    backend_or_skip("mlx")
    r = twinlm(tmp_path, "--device", "cpu", "train", "--data", str(corpus), "--out", "run", *TINY,
               "--max-iters", "2", "--eval-every", "2")
    assert r.returncode == 0, r.stderr
    assert "backend mlx on cpu (" in r.stdout  # with the CPU's name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["device"] == "cpu" for row in rows)
    _, meta = load_checkpoint(tmp_path / "run")
    assert meta["device"]["device"] == "cpu" and meta["device"]["float64"] is False


# ---- doctor -----------------------------------------------------------------------------------------

def test_doctor_json_has_a_device_row_per_backend(capsys, monkeypatch) -> None:
    backend_or_skip("mlx")
    monkeypatch.delenv("TWINLM_BACKEND", raising=False)
    code, out, err = run_cli(["doctor", "--json"], capsys, monkeypatch)
    assert code == 0, err
    record = json.loads(out)
    rows = {r["backend"]: r for r in record["backends"]}
    assert set(rows) == {"mlx", "tinygrad", "numpy"} and "mlx" in record["ready"]
    mlx = rows["mlx"]
    assert mlx["ok"] and mlx["compiled"] == "ok" and mlx["device"]["build"] == record["mlx_build"]
    assert mlx["device"]["device"] in ("cpu", "gpu") and mlx["device"]["name"]
    if rows["tinygrad"]["ok"]:
        assert rows["tinygrad"]["compiled"] == "ok" and rows["tinygrad"]["device"]["device"]
        assert rows["tinygrad"]["device"]["device"] in record["tinygrad_devices"]


def test_doctor_compiled_smoke_test_catches_a_broken_compiler(capsys, monkeypatch) -> None:
    from twinlm.cli import doctor

    B = backend_or_skip("mlx")
    assert doctor.compiled_smoke(B) == "ok"

    def no_state_update(fn, state):  # negative control: a compiler that drops the state update
        return type(B).compile_step(B, lambda st, *xs: (fn(st, *xs)[0], st), state)

    monkeypatch.setattr(B, "compile_step", no_state_update)
    assert doctor.compiled_smoke(B).startswith("wrong values")
    code, out, _ = run_cli(["doctor", "--json", "--backend", "mlx"], capsys, monkeypatch)
    row = next(r for r in json.loads(out)["backends"] if r["backend"] == "mlx")
    assert code == 1 and not row["ok"] and row["compiled"].startswith("wrong values")
