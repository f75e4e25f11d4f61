"""Hugging Face model folders in and out: `import_hf(folder, run_dir)` and `export_hf(run_dir, folder)`.

A folder is what `save_pretrained` writes: config.json, model.safetensors (or shards with
model.safetensors.index.json), tokenizer.json (+ tokenizer_config.json, generation_config.json).
Nothing is downloaded, and pickled weights (pytorch_model.bin, *.pt) are refused, never unpickled.
Weights are read through a read-only memory map and converted tensor by tensor ((out, in) to (in, out)),
each tensor's mapped pages released once it is copied (`tensorfile.release`), so importing holds the
parameters and the checkpoint being written, not the mapped file as well. They keep the folder's dtype
(bfloat16 as tagged bits, `core.dtypes`) where every weight has the same one (else float32), and the run
records it; `export_hf` writes the run's dtype.
Architectures and their mappings: `twinlm.hf.archs`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from twinlm._version import __version__
from twinlm.core import dtypes as D
from twinlm.core import model
from twinlm.core import spec as S
from twinlm.core.checkpoint import save_checkpoint
from twinlm.core.config import ModelConfig
from twinlm.core.errors import ConfigError
from twinlm.core.lora import merged
from twinlm.core.tensorfile import release
from twinlm.core.tokenizers import BPETokenizer, HFTokenizer, Tokenizer
from twinlm.hf.archs import ARCHS, HFError, Link, export_arch
from twinlm.run_meta import RunMeta

__all__ = ["HFError", "export_hf", "import_hf", "read_hf"]

PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
# tokenizer_config.json keys -> the roles twinlm's tasks use.
_ROLES = {
    "pad_token": "[PAD]",
    "mask_token": "[MASK]",
    "cls_token": "[CLS]",
    "bos_token": "bos",
    "eos_token": "eos",
}


# ---- reading -------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{path.parent} has no {path.name}: it is not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise HFError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise HFError(f"{path} is not a JSON object ({what})")
    return d


def _mapped_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only view into a memory map (bf16 as raw uint16)."""
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        n = int.from_bytes(mm[:8].tobytes(), "little")
        header = json.loads(mm[8 : 8 + n].tobytes())
    except (OSError, ValueError) as e:
        raise HFError(f"{path} is not a readable safetensors file: {e}") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = _NP[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            raw = mm[8 + n + start : 8 + n + end]
            out[name] = raw.view(dtype).reshape(shape) if raw.size else np.zeros(shape, dtype)
        except KeyError:
            raise HFError(
                f"{path}: tensor {name} has dtype {info.get('dtype')!r}; twinlm reads {', '.join(_NP)}"
            ) from None
        except (ValueError, TypeError) as e:
            raise HFError(f"{path}: tensor {name} is damaged ({e})") from None
        if info["dtype"] == "BF16":
            out[name] = out[name].view(D.BF16)
    return out


def _float32(a: np.ndarray) -> np.ndarray:
    return D.as_float32(a)  # float32 stays a view of the memory map


def _stored_dtype(tensors: dict[str, np.ndarray]) -> str:
    """The dtype the weights keep: the folder's, where every float tensor has the same one, else float32."""
    kinds = {D.name_of(a) for a in tensors.values() if D.name_of(a) or a.dtype.kind == "f"}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else "float32"


def _as(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` in `dtype`, and a view of it (no copy) where it already is."""
    return a if D.name_of(a) == dtype else D.to_host(a, dtype)


def _weight_files(src: Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted({src / f for f in _read_json(index, "a shard index").get("weight_map", {}).values()})
    elif (src / "model.safetensors").exists():
        files = [src / "model.safetensors"]
    else:
        pickled = sorted(p.name for pattern in PICKLED for p in src.glob(pattern))
        if pickled:
            raise HFError(
                f"{src} holds pickled PyTorch weights ({pickled[0]}); twinlm never unpickles a "
                "downloaded file: convert it to safetensors first (in transformers: "
                "model.save_pretrained(folder, safe_serialization=True))"
            )
        raise HFError(f"{src} has no model.safetensors (or model.safetensors.index.json)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        if not f.exists():
            raise HFError(f"shard {f.name} named by the index is missing from {src}")
        tensors.update(_mapped_tensors(f))
    return files, tensors


def _assemble(link: Link, tensors: dict[str, np.ndarray], want: tuple[int, ...],
              dtype: str = "float32") -> np.ndarray:
    """One twinlm parameter from its Hugging Face parts in `dtype`, every shape checked (never a silent
    reshape). bfloat16 is moved as its uint16 bits (numpy's concatenate would drop their tag)."""
    parts = []
    for j, name in enumerate(link.hf):
        if name not in tensors:
            raise HFError(f"the weights have no {name} (needed for {link.twin})")
        size = link.sizes[j] if link.sizes else want[-1]
        expect = (size, *want[:-1][::-1]) if link.transpose else (*want[:-1], size)
        if tuple(tensors[name].shape) != expect:
            raise HFError(f"{name} has shape {tuple(tensors[name].shape)}; config.json implies {expect}")
        a = _as(tensors[name], dtype)
        a = a.view(np.uint16) if dtype == "bfloat16" else a
        parts.append(a.T if link.transpose else a)
    out = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1))
    out = out.view(D.BF16) if dtype == "bfloat16" else out
    if not np.may_share_memory(out, tensors[link.hf[0]]):  # a copy: the mapped pages are no longer needed
        for name in link.hf:
            release(tensors[name])
    return out


def _tokenizer(src: Path, vocab_size: int) -> tuple[HFTokenizer, dict[str, Any]]:
    path = src / "tokenizer.json"
    if not path.exists():
        raise HFError(
            f"{src} has no tokenizer.json (a slow tokenizer's vocab files alone cannot be "
            "read; save the fast tokenizer with save_pretrained)"
        )
    tok_cfg = (
        _read_json(src / "tokenizer_config.json", "tokenizer settings")
        if (src / "tokenizer_config.json").exists()
        else {}
    )
    text = path.read_text(encoding="utf-8")
    plain, roles = HFTokenizer(text), {}
    for key, role in _ROLES.items():
        token = tok_cfg.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        token_id = plain.token_id(token) if isinstance(token, str) else None
        if token_id is not None:
            roles[role] = token_id
    tok = HFTokenizer(text, roles, bool(tok_cfg.get("add_bos_token", False)))
    if tok.vocab_size > vocab_size:
        raise HFError(
            f"tokenizer.json has {tok.vocab_size} tokens but the model only {vocab_size} embeddings"
        )
    return tok, tok_cfg


def read_hf(
    src: str | Path, seed: int = 0
) -> tuple[ModelConfig, dict[str, np.ndarray], HFTokenizer, dict[str, Any], list[str]]:
    """(config, params, tokenizer, the folder's record, notes) of a Hugging Face model folder; the params
    in the weights' own dtype (`_stored_dtype`; `record["dtype"]` names it).

    Parameters twinlm's model has but this architecture lacks (BERT's pooler under a masked-LM head,
    the masked-LM head of a BertModel) start from twinlm's own init (`seed`) and are named in the notes."""
    src = Path(src)
    if not src.is_dir():
        raise HFError(f"not a folder: {src} (import-hf reads a folder on disk; nothing is downloaded)")
    hf = _read_json(src / "config.json", "the model config")
    names = hf.get("architectures") or []
    hf_arch = names[0] if isinstance(names, list) and names else None
    if hf_arch not in ARCHS:
        raise HFError(f"config.json's architecture is {hf_arch!r}; twinlm imports {', '.join(ARCHS)}")
    arch = ARCHS[hf_arch]
    try:
        cfg = ModelConfig(**arch.config(hf))
    except (KeyError, TypeError) as e:
        raise HFError(f"config.json lacks or mistypes a field twinlm needs: {e}") from None
    except ConfigError as e:
        raise HFError(f"config.json describes a model twinlm cannot build: {e}") from None
    _, tensors = _weight_files(src)
    spec = model.param_spec(cfg)
    links = arch.links(cfg, hf_arch)
    dtype = _stored_dtype(tensors)
    params = {link.twin: _assemble(link, tensors, spec[link.twin].shape, dtype) for link in links}
    used = {n for link in links for n in link.hf}
    for name in sorted(set(tensors) - used):
        tied_copy = name == "lm_head.weight" and cfg.tie_embeddings
        if tied_copy and np.array_equal(_as(tensors[name], dtype).view(np.uint8),
                                        params["wte.weight"].view(np.uint8)):
            release(tensors[name])
            continue
        if not name.endswith(arch.ignored):
            raise HFError(
                f"the weights hold {name}, which {hf_arch} as twinlm implements it has no place "
                "for; twinlm refuses rather than drop it"
            )
    fresh = [k for k in spec if k not in params]
    if fresh:  # (drawn in the spec's order, so the values stay seed-exact: a whole model's worth, briefly)
        params.update({k: D.to_host(v, dtype) for k, v in S.init_params(spec, seed).items() if k in fresh})
    tok, tok_cfg = _tokenizer(src, cfg.vocab_size)
    record = {
        "architecture": hf_arch,
        "config": hf,
        "tokenizer_config": tok_cfg,
        "source": str(src.resolve()),
        "dtype": dtype,
    }
    if (src / "chat_template.jinja").exists():  # transformers >= 4.47 saves the chat template here
        record["chat_template"] = (src / "chat_template.jinja").read_text(encoding="utf-8")
    gen = src / "generation_config.json"
    if gen.exists():
        record["generation_config"] = _read_json(gen, "generation settings")
    missing = ", ".join(sorted({k.split(".")[0] for k in fresh}))
    notes = [f"{hf_arch} has no {missing} weights: twinlm initialised them (seed {seed})"] if fresh else []
    return cfg, params, tok, record, notes


def labels_of(hf: dict[str, Any], n: int) -> list[str]:
    id2label = hf.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def import_hf(src: str | Path, out: str | Path, seed: int = 0) -> tuple[Path, list[str]]:
    """Write the Hugging Face model folder `src` as a twinlm run dir `out` (a step-0 checkpoint of its
    weights, tokenizer and config) that sample, eval, predict, finetune and `train --init-from` read.
    The first line of the returned notes summarises the model."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFError(f"{out} exists and is not empty; choose a new run directory")
    cfg, params, tok, record, notes = read_hf(src, seed)
    labels = labels_of(record["config"], cfg.n_classes) if cfg.n_classes else []
    meta = RunMeta(
        model=cfg,
        tokenizer=tok.to_dict(),
        task="classify" if cfg.n_classes else None,
        labels=labels,
        versions={"twinlm": __version__},
        seed=seed,
        data_source=record["source"],
        hf=record,
        dtype=record["dtype"],
    )
    arrays = {f"param.{k}": v for k, v in params.items()}
    del params
    save_checkpoint(out, arrays, meta.to_dict(), step=0, keep=None, consume=True)  # each freed once written
    summary = (
        f"{record['architecture']} as --arch {cfg.arch}: {cfg.n_layer} layers, d_model {cfg.d_model}, "
        f"{cfg.n_head} heads ({cfg.n_kv_head} kv), block {cfg.block_size}, "
        f"{S.count(model.param_spec(cfg)):,} parameters, tokenizer {tok.vocab_size} ids"
    )
    return out, [summary, *notes]


# ---- writing -------------------------------------------------------------------------------------


def hf_tensors(cfg: ModelConfig, params: dict[str, np.ndarray], hf_arch: str,
               dtype: str = "float32") -> dict[str, np.ndarray]:
    """The Hugging Face tensors of twinlm parameters in `dtype`: each link split back (and transposed)."""
    out = {}
    for link in ARCHS[hf_arch].links(cfg, hf_arch):
        value = _as(params[link.twin], dtype)
        value = value.view(np.uint16) if dtype == "bfloat16" else value  # (see _assemble)
        cuts = np.cumsum(link.sizes)[:-1] if link.sizes else []
        for name, part in zip(link.hf, np.split(value, cuts, axis=-1), strict=True):
            part = np.ascontiguousarray(part.T if link.transpose else part)
            out[name] = part.view(D.BF16) if dtype == "bfloat16" else part
    return out


def _tokenizer_files(tok: Tokenizer, record: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json and tokenizer_config.json contents, or {} for a tokenizer with no HF form."""
    if isinstance(tok, HFTokenizer):
        tok_cfg = dict(record.get("tokenizer_config") or {})
        names = {role: tok.token(i) for role, i in tok.roles.items()}
        for key, role in _ROLES.items():
            if role in names and key not in tok_cfg:
                tok_cfg[key] = names[role]
        return {
            "tokenizer.json": tok.hf_json,
            "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", **tok_cfg},
        }
    if isinstance(tok, BPETokenizer):
        return {
            "tokenizer.json": tok.to_dict()["hf_json"],
            "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast"},
        }
    return {}


def export_hf(run: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """Write the run's model (latest checkpoint; LoRA adapters merged) as a Hugging Face folder that
    transformers' `from_pretrained` loads with no missing or unexpected weights."""
    from twinlm.core.tensorfile import dumps
    from twinlm.run_dir import load_model

    cfg, params, tok, meta = load_model(run)
    if cfg.lora_rank or cfg.quant_bits:  # adapters merged, quantized layers written dequantized
        cfg, params = merged(cfg, params)
    record = meta.hf or {}
    hf_arch = export_arch(cfg, record.get("architecture"))
    arch = ARCHS[hf_arch]
    hf_cfg = dict(record.get("config") or {}) if record.get("architecture") == hf_arch else {}
    hf_cfg.update(arch.hf_config(cfg), architectures=[hf_arch], dtype=meta.dtype)
    hf_cfg.pop("torch_dtype", None)  # (transformers' older name: one dtype, the one written)
    if cfg.n_classes:
        labels = meta.labels or [f"LABEL_{i}" for i in range(cfg.n_classes)]
        hf_cfg.update(
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            num_labels=cfg.n_classes,
            problem_type="single_label_classification",
        )
    if isinstance(tok, HFTokenizer):
        hf_cfg.update({f"{k}_token_id": tok.roles[k] for k in ("bos", "eos") if k in tok.roles})
    files: dict[str, Any] = {"config.json": hf_cfg, **_tokenizer_files(tok, record)}
    notes = (
        []
        if "tokenizer.json" in files
        else [f"no tokenizer.json written: the run's {tok.kind} tokenizer has no Hugging Face form"]
    )
    if record.get("generation_config"):
        files["generation_config.json"] = record["generation_config"]
    if record.get("chat_template") and "tokenizer.json" in files:  # it came as chat_template.jinja
        files["chat_template.jinja"] = record["chat_template"]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HFError(f"{out} exists and is not empty; choose a new folder")
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        # twinlm's writer: safetensors' numpy one has no bfloat16
        data = dumps(hf_tensors(cfg, params, hf_arch, meta.dtype), metadata={"format": "pt"})
        (tmp / "model.safetensors").write_bytes(data)
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2, sort_keys=True)
            (tmp / name).write_text(text, encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)  # the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, notes
