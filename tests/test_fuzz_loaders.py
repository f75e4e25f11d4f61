"""Property-based fuzzing of the loaders: a checkpoint, a bare safetensors file, a manifest, a tokenizer file.

Each case damages a file that twinlm wrote (truncations, bit flips, overwritten bytes, oversized and
"negative" header lengths, another dtype, shape or offsets in a safetensors header, JSON values of the
wrong type) and loads it. The only outcomes allowed: a TwinlmError (the CLI prints it as one line), or
exactly what was saved. Any other exception fails the test, and so does a load that returns other values.

The default run is bounded and deterministic (derandomized); `-m slow` runs a longer, random one. Each
test prints how many cases it ran (`pytest -s`).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinlm.core import tensorfile
from twinlm.core.checkpoint import MANIFEST_FILE, META_FILE, STATE_FILE, load_checkpoint, save_checkpoint
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import load_tokenizer, save_tokenizer, train_tokenizer

MODES = {
    "default": settings(max_examples=200, deadline=None, derandomize=True, database=None,
                        suppress_health_check=list(HealthCheck)),
    "slow": settings(max_examples=5000, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck)),
}
MODE_PARAMS = [pytest.param("default"), pytest.param("slow", marks=pytest.mark.slow)]
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL",
          "F8_E4M3", "C64", "x", ""]


def saved_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 5), dtype=np.float32)
    w.flat[:3] = [np.nan, -0.0, np.float32(1e-45)]
    return {"param.w": w, "m.w": rng.standard_normal(30).astype(np.float16),
            "param.ids": rng.integers(-5, 5, (2, 3), dtype=np.int64), "param.flag": np.array([True, False]),
            "param.scalar": np.float32(3.5), "param.empty": np.zeros((0, 4), np.float32)}


META = {"model": {"vocab_size": 65}, "iter": 12, "tokenizer": {"kind": "char", "chars": "ab\u00e9"}}


def same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return set(got) == set(want) and all(got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
                                         and got[k].tobytes() == want[k].tobytes() for k in want)


# ---- mutations ---------------------------------------------------------------------------------------

def _header(data: bytes) -> tuple[dict[str, Any], int] | None:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        return json.loads(data[8:8 + n]), n
    except (struct.error, ValueError):
        return None


def _with_header(data: bytes, header: dict[str, Any], n: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@st.composite
def mutation(draw: st.DrawFn, safetensors: bool) -> Callable[[bytes], bytes]:
    """One way to damage a file's bytes (structure-aware for safetensors headers and JSON)."""
    kinds = ["truncate", "flip", "overwrite", "append", "json_value"]
    if safetensors:
        kinds += ["header_len", "dtype", "shape", "offsets"]
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        frac = draw(st.floats(0.0, 1.0, exclude_max=True))
        return lambda d: d[:int(len(d) * frac)]
    if kind == "flip":
        pos, bit = draw(st.integers(0, 2**32)), draw(st.integers(0, 7))
        return lambda d: d if not d else _flip(d, pos % len(d), bit)
    if kind == "overwrite":
        pos, junk = draw(st.integers(0, 2**32)), draw(st.binary(min_size=1, max_size=16))
        return lambda d: d if not d else d[:pos % len(d)] + junk + d[pos % len(d) + len(junk):]
    if kind == "append":
        junk = draw(st.binary(min_size=1, max_size=64))
        return lambda d: d + junk
    if kind == "header_len":  # oversized, "negative" (top bit set) or just wrong
        n = draw(st.sampled_from([2**64 - 1, 2**63, 2**63 - 1, 2**32, 0, 1]) | st.integers(0, 2**64 - 1))
        return lambda d: struct.pack("<Q", n) + d[8:]
    if kind == "json_value":
        value = draw(json_values)
        pick = draw(st.integers(0, 2**16))
        return lambda d: _replace_json_value(d, pick, value, safetensors)
    field = {"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[kind]
    new = (draw(st.sampled_from(DTYPES)) if kind == "dtype"
           else draw(st.lists(st.integers(-3, 2**40) | st.sampled_from([0, 1, 2, 5, 6, 30]), max_size=3)))
    pick = draw(st.integers(0, 2**16))
    return lambda d: _edit_tensor(d, pick, field, new)


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:]


def _edit_tensor(data: bytes, pick: int, field: str, new: Any) -> bytes:
    parsed = _header(data)
    if parsed is None or not isinstance(parsed[0], dict):
        return data
    header, n = parsed
    names = sorted(k for k in header if k != "__metadata__" and isinstance(header[k], dict))
    if not names:
        return data
    header[names[pick % len(names)]][field] = new
    return _with_header(data, header, n)


def _replace_json_value(data: bytes, pick: int, value: Any, safetensors: bool) -> bytes:
    """Replace one value (chosen by `pick`, anywhere in the nesting) of the JSON document or header."""
    if safetensors:
        parsed = _header(data)
        if parsed is None:
            return data
        doc, n = parsed
    else:
        try:
            doc = json.loads(data)
        except ValueError:
            return data
    slots = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            slots.append((node, key))
            walk(child)
    walk(doc)
    if not slots:
        return data
    node, key = slots[pick % len(slots)]
    node[key] = value
    if safetensors:
        return _with_header(data, doc, n)
    return json.dumps(doc).encode()


def mutations(safetensors: bool = False) -> st.SearchStrategy[list[Callable[[bytes], bytes]]]:
    return st.lists(mutation(safetensors), min_size=1, max_size=4)


def apply(data: bytes, muts: list[Callable[[bytes], bytes]]) -> bytes:
    for m in muts:
        data = m(data)
    return data


def fuzz(mode: str, strategy: st.SearchStrategy, check: Callable[..., None]) -> int:
    """Run `check` on hypothesis examples from `strategy` with the mode's settings; return the count."""
    count = [0]

    @MODES[mode]
    @given(strategy)
    def run(example: Any) -> None:
        count[0] += 1
        check(example)
    run()
    return count[0]


def report(name: str, mode: str, n: int) -> None:
    print(f"\nfuzz {name} ({mode}): {n} cases")
    assert n >= (150 if mode == "default" else 1000), n  # hypothesis ran about as many as asked


# ---- the loaders -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_fuzz_bare_safetensors(mode: str) -> None:
    want = saved_arrays()
    original = tensorfile.dumps(want)
    assert same_arrays(tensorfile.loads(original), want)

    def check(muts: list[Callable[[bytes], bytes]]) -> None:
        data = apply(original, muts)
        try:
            got = tensorfile.loads(data, "fuzzed.safetensors")
        except TwinlmError:
            return
        assert same_arrays(got, want), "a damaged file loaded as other values"
    report("safetensors", mode, fuzz(mode, mutations(safetensors=True), check))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fuzz-template")
    save_checkpoint(run, saved_arrays(), META, step=12)
    return run / "ckpt-00000012"


def _check_checkpoint(template: Path, which: str, muts: list[Callable[[bytes], bytes]]) -> None:
    with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
        ckpt = Path(scratch) / template.name
        shutil.copytree(template, ckpt)
        target = ckpt / which
        target.write_bytes(apply(target.read_bytes(), muts))
        try:
            arrays, meta = load_checkpoint(ckpt)
        except TwinlmError:
            return
    assert same_arrays(arrays, saved_arrays()) and meta == META, "a damaged checkpoint loaded as other values"


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_fuzz_checkpoint(mode: str, template: Path) -> None:
    files = st.sampled_from([STATE_FILE, META_FILE, MANIFEST_FILE])
    strategy = files.flatmap(lambda f: st.tuples(st.just(f), mutations(safetensors=f == STATE_FILE)))
    report("checkpoint", mode, fuzz(mode, strategy, lambda ex: _check_checkpoint(template, *ex)))


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_fuzz_manifest(mode: str, template: Path) -> None:
    n = fuzz(mode, mutations(), lambda muts: _check_checkpoint(template, MANIFEST_FILE, muts))
    report("manifest", mode, n)


TOKENIZER_TEXT = "to be, or not to be: that is the question. \u00e9t\u00e9 \U0001f642\n" * 20


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("fuzz-tokenizers")
    out = {}
    for kind, vocab in (("char", None), ("byte", None), ("bpe", 270)):
        tok = train_tokenizer(kind, TOKENIZER_TEXT, vocab)
        save_tokenizer(tok, folder / f"{kind}.json")
        out[kind] = ((folder / f"{kind}.json").read_bytes(), tok.to_dict())
    return out


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_fuzz_tokenizer_file(mode: str, tokenizer_files: dict[str, tuple[bytes, dict[str, Any]]],
                             tmp_path: Path) -> None:
    def check(example: tuple[str, list[Callable[[bytes], bytes]]]) -> None:
        kind, muts = example
        original, want = tokenizer_files[kind]
        path = tmp_path / f"{kind}.json"
        path.write_bytes(apply(original, muts))
        try:
            got = load_tokenizer(path)
        except TwinlmError:
            return
        assert got.to_dict() == want, "a damaged tokenizer file loaded as another tokenizer"
    strategy = st.tuples(st.sampled_from(sorted(tokenizer_files)), mutations())
    report("tokenizer", mode, fuzz(mode, strategy, check))


def test_the_mutations_do_damage() -> None:
    """Control: the bare library loads wrong values from the same kinds of damage, so the properties
    above do not pass vacuously; the digest is what turns them into errors."""
    from safetensors.numpy import load

    want = saved_arrays()
    data = tensorfile.dumps(want)
    header, n = _header(data)
    flipped = data[:-1] + bytes([data[-1] ^ 1])  # in the last tensor's data
    header["param.w"]["dtype"] = "I32"  # same size, other dtype
    retyped = _with_header(data, header, n)
    for damaged in (flipped, retyped):
        assert not same_arrays(load(bytes(damaged)), want)
        with pytest.raises(TwinlmError, match="do not match their recorded SHA-256"):
            tensorfile.loads(damaged)
    del header["__metadata__"]
    header["param.w"]["dtype"] = "F32"
    anonymous = _with_header(data, header, n)
    with pytest.raises(TwinlmError, match="no twinlm.sha256 digest"):
        tensorfile.loads(anonymous)
    assert same_arrays(tensorfile.loads(anonymous, require_digest=False), want)  # a file from elsewhere
