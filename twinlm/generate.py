"""Autoregressive text generation on any backend, with sampling done in numpy.

    prompt (batch, t0) -> decoder: logits of the next token (batch, V) -> sample_next -> token column

Sampling happens in numpy on the last position's logits, with a numpy Generator seeded by `seed`, so
both backends draw the same tokens whenever their logits agree (they do to ~1e-6). Tokens are drawn by
inverse CDF over the vocabulary in id order (not sorted by probability), so a logit difference of 1e-6
moves a token boundary by ~1e-6 and changes the draw only with that probability.

How the next-token logits are computed (a "decoder"), per backend:
- "kv": a KV cache that grows by one token per step (`core.model.forward(..., cache=...)`): the prompt
  once, then one token per step. Used on eager backends (MLX, numpy), where a new shape costs nothing.
- "fixed": a KV cache of fixed shape (batch, Hkv, length, hs) per layer (`core.model.decode_step`):
  the new token's k/v go into its slot by a mask and attention masks the slots after it (both masks
  computed inside the graph from the position), so one compiled graph (`B.compile_step`, the cache as its
  state) serves every position; the prompt is fed through it token by token. Used on tinygrad, where every
  new shape is a new graph (a growing cache measured 3-30 s per token there). `length` follows the tokens,
  not the model's context: the power of two (at least MIN_CACHE) that holds prompt + new tokens, doubled
  (contents copied) if a history outgrows it (`cache_length`). The graphs are cached per (backend, config,
  batch, length) across calls.
- "full": no cache, the whole (cropped) context every step; the reference the others are tested against.

Context longer than `block_size`: every decoder looks only at the last `block_size` tokens. The window
then shifts every step and, with absolute positions, no cached key stays valid: "kv" drops its cache
and recomputes the window each step; "fixed" does the same through a second fixed-shape graph (the
window, no cache), built the first time a history passes block_size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from twinlm.core import model
from twinlm.core.backend import Array, Backend, Step
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.core.tokenizers import Tokenizer

STRATEGIES = ("kv", "fixed", "full")
# Backends that compile a new graph for every new shape: a growing KV cache would recompile each token.
_FIXED_SHAPE_BACKENDS = ("tinygrad",)
# The shortest fixed-shape KV cache (slots); longer ones double from it (`cache_length`).
MIN_CACHE = 64
# Compiled fixed-shape steps, reused across generate() calls (params are inputs, not baked in), per
# (backend, config, batch, cache length); and the shifted-window graphs, per (backend, config, batch).
_fixed_shape_steps: dict[tuple[int, ModelConfig, str, int, int], _FixedShapeSteps] = {}
_window_steps: dict[tuple[int, ModelConfig, int], Step] = {}


def default_strategy(B: Backend, use_cache: bool = True) -> str:
    if not use_cache:
        return "full"
    return "fixed" if B.name in _FIXED_SHAPE_BACKENDS else "kv"


class Decoder:
    """Next-token logits for a growing token history; subclasses choose how to compute them."""

    def __init__(self, B: Backend, cfg: ModelConfig, params: dict[str, Array]) -> None:
        self.B, self.cfg, self.params = B, cfg, params

    def next_logits(self, tokens: np.ndarray) -> np.ndarray:
        """Float32 logits (batch, V) of the token after `tokens` (batch, t), t >= 1."""
        raise NotImplementedError

    def _last_row(self, idx: np.ndarray,
                  cache: model.KVCache | None = None) -> tuple[np.ndarray, model.KVCache]:
        lg, cache = model.forward(self.B, self.cfg, self.params, self.B.from_numpy(idx), cache=cache)
        last = lg[:, -1, :]
        self.B.sync(last, *(t for kv in cache for t in kv))  # keep MLX's lazy graph from growing
        return self.B.to_numpy(last), cache


class FullDecoder(Decoder):
    def next_logits(self, tokens: np.ndarray) -> np.ndarray:
        return self._last_row(tokens[:, -self.cfg.block_size:])[0]


class KVDecoder(Decoder):
    """Feeds only the newest token while the history fits in block_size and grows by one per call."""

    def __init__(self, B: Backend, cfg: ModelConfig, params: dict[str, Array]) -> None:
        super().__init__(B, cfg, params)
        self.cache: model.KVCache | None = None
        self.n_cached = 0

    def next_logits(self, tokens: np.ndarray) -> np.ndarray:
        t = tokens.shape[1]
        if self.cache is not None and t == self.n_cached + 1 and t <= self.cfg.block_size:
            row, self.cache = self._last_row(tokens[:, -1:], self.cache)
        else:
            row, cache = self._last_row(tokens[:, -self.cfg.block_size:])
            self.cache = cache if t <= self.cfg.block_size else None  # a shifted window's cache is stale
        self.n_cached = t
        self.B.drop_cached_buffers()  # the last step's k/v, one token shorter than any later request
        return row


def cache_length(n: int, limit: int) -> int:
    """The length of a fixed-shape KV cache that holds `n` positions: the power of two >= n, at least
    `MIN_CACHE`, at most `limit` (the block size). One compiled graph per length, so a cache that must grow
    doubles: a generation of any length compiles O(log) graphs, and memory follows the tokens, not the
    model's context."""
    return min(limit, max(MIN_CACHE, 1 << max(n - 1, 0).bit_length()))


def grow_cache(B: Backend, old: Array, shape: tuple[int, ...]) -> Array:
    """`old` copied into zeros of `shape`, which is at least as large on every axis (a KV cache of more
    slots: the old slots keep their place; a recurrent state is the same shape and is copied as it is)."""
    if tuple(old.shape) == tuple(shape):
        return old
    pad = [(0, n - o) for o, n in zip(old.shape, shape, strict=True)]
    if sum(extra > 0 for _, extra in pad) != 1 or any(extra < 0 for _, extra in pad):
        raise ValueError(f"cannot grow a cache of shape {tuple(old.shape)} into {shape}")
    # Through the host, not B.concat: a compiled step (TinyJit) records the layout of its state inputs, and
    # a concatenation can come out as a permuted view of its buffer, which a graph captured on fresh zeros
    # (or loaded from the JIT cache) refuses. Growing is rare (each doubling), so the copy costs little.
    new = B.from_numpy(np.pad(B.to_numpy(old), pad))  # (a bfloat16 cache comes back as float32: recast)
    dt = B.dtype_name(old)
    return new if dt == "float32" else B.astype(new, dt)


def params_dtype(B: Backend, params: dict[str, Array]) -> str:
    """The dtype name a model's weights are held in (one for all of them: `run_dir.to_backend`)."""
    return B.dtype_name(params[min(params)]) if params else "float32"


def zeros(B: Backend, shape: tuple[int, ...], dtype: str) -> Array:
    """A zero-filled cache in `dtype` (a 16-bit one made from float16 zeros: no float32 copy on the way)."""
    z = B.from_numpy(np.zeros(shape, np.float32 if dtype == "float32" else np.float16))
    return z if B.dtype_name(z) == dtype else B.astype(z, dtype)


class _FixedShapeSteps:
    """The compiled one-token graph of one (backend, config, batch, cache length), shared by decoders
    (params are inputs): `kv_step` feeds one token through a KV cache of fixed shape (batch, Hkv, length,
    hs) per layer, kept as the step's state, with the write and attention masks computed inside the graph
    from the position (`decoder.decode_masks`), so a step's inputs are just the token and its position.
    `owner` marks the decoder whose history the cache holds."""

    def __init__(self, B: Backend, cfg: ModelConfig, batch: int, length: int, dtype: str = "float32") -> None:
        self.B, self.length = B, length
        # positions < length only: the position tables and cache shapes of a model this long
        self.cfg = cfg_len = cfg.replace(block_size=length)
        self.shapes = model.decode_cache_shapes(cfg_len, batch)  # the family's: a KV cache, or a state
        state = {f"{kv}.{i}": zeros(B, shape, dtype)  # the weights' dtype
                 for i, pair in enumerate(self.shapes) for kv, shape in zip("kv", pair, strict=True)}

        def kv_step(state: dict, p: dict[str, Array], idx: Array,
                    pos_ids: Array) -> tuple[tuple[Array], dict]:
            cache = [(state[f"k.{i}"], state[f"v.{i}"]) for i in range(len(self.shapes))]
            write, attn = model.decode_masks(B, pos_ids, length, cfg.sliding_window)
            lg, cache = model.decode_step(B, cfg_len, p, idx, pos_ids, write, attn, cache)
            new = {f"{kv}.{i}": t for i, pair in enumerate(cache) for kv, t in zip("kv", pair, strict=True)}
            return (lg,), new

        self.kv_step = B.compile_step(kv_step, state)
        self.owner: object = None

    def take_cache_from(self, other: _FixedShapeSteps) -> None:
        """Continue the history held in `other`'s (shorter) cache: copy it into this one's first slots."""
        state = self.kv_step.state
        for i, pair in enumerate(self.shapes):
            for kv, shape in zip("kv", pair, strict=True):
                state[f"{kv}.{i}"] = grow_cache(self.B, other.kv_step.state[f"{kv}.{i}"], shape)
        self.B.sync(*state.values())
        self.owner = other.owner


def _window_step(B: Backend, cfg: ModelConfig, batch: int) -> Step:
    """The last block_size tokens without a cache, for a window that shifts every step (built once)."""
    key = (id(B), cfg, batch)
    if key not in _window_steps:
        def window_step(state: dict, p: dict[str, Array], idx: Array) -> tuple[tuple[Array], dict]:
            return (model.logits(B, cfg, p, idx)[:, -1:, :],), state
        _window_steps[key] = B.compile_step(window_step, {})
    return _window_steps[key]


def _steps(B: Backend, cfg: ModelConfig, batch: int, length: int, dtype: str = "float32") -> _FixedShapeSteps:
    """The compiled steps for a cache of at least `length` slots: the shortest one already built, if any
    (its graph is compiled and its cache already allocated), else a new one of exactly `length`."""
    built = [n for (b, c, d, m, n) in _fixed_shape_steps
             if (b, c, d, m) == (id(B), cfg, dtype, batch) and n >= length]
    n = min(built, default=length)
    key = (id(B), cfg, dtype, batch, n)
    if key not in _fixed_shape_steps:
        _fixed_shape_steps[key] = _FixedShapeSteps(B, cfg, batch, n, dtype)
    return _fixed_shape_steps[key]


class FixedKVDecoder(Decoder):
    """One compiled graph per token with a fixed-shape KV cache: the prompt goes in token by token
    (prefill), then the newest token each step. The cache holds `cache_length` of the expected history
    (`max_len`: prompt + new tokens, when the caller knows it) and doubles when the history outgrows it,
    its contents copied over. Once the history passes block_size the window shifts every step and no
    cached key stays valid, so the window is recomputed by one fixed-shape graph."""

    def __init__(self, B: Backend, cfg: ModelConfig, params: dict[str, Array], batch: int,
                 max_len: int = 0) -> None:
        # A compiled graph (TinyJit) binds dict inputs by position: fix the order so names bind right.
        super().__init__(B, cfg, {k: params[k] for k in sorted(params)})
        self.batch, self.max_len = batch, max_len
        self.steps: _FixedShapeSteps | None = None
        self.n_cached = 0
        self.token = object()  # marks a shared cache as ours, without keeping this decoder alive

    def next_logits(self, tokens: np.ndarray) -> np.ndarray:
        t, T = tokens.shape[1], self.cfg.block_size
        extends = self.steps is not None and self.steps.owner is self.token and t == self.n_cached + 1
        self.n_cached = t
        if t > T:
            window = _window_step(self.B, self.cfg, self.batch)
            (out,) = window(self.params, self.B.from_numpy(tokens[:, -T:]))
            return self.B.to_numpy(out)[:, 0, :]
        if self.steps is None or t > self.steps.length:
            bigger = _steps(self.B, self.cfg, self.batch, cache_length(max(t, min(self.max_len, T)), T),
                            params_dtype(self.B, self.params))
            if extends and self.steps is not None:
                bigger.take_cache_from(self.steps)
            self.steps = bigger
            extends = extends and bigger.owner is self.token
        # Prefill from slot 0 unless the cache holds all but the newest token (it does not on the first
        # call, or after another decoder used the shared cache).
        self.steps.owner = self.token
        for pos in range(t - 1 if extends else 0, t):
            (out,) = self.steps.kv_step(self.params, self.B.from_numpy(tokens[:, pos:pos + 1]),
                                        self.B.from_numpy(np.array([pos], np.int32)))
        return self.B.to_numpy(out)[:, 0, :]


def make_decoder(B: Backend, cfg: ModelConfig, params: dict[str, Array], batch: int,
                 strategy: str, max_len: int = 0) -> Decoder:
    """A decoder of `strategy`; `max_len` (prompt + new tokens, 0: unknown) sizes a fixed-shape cache."""
    if strategy == "kv":
        return KVDecoder(B, cfg, params)
    if strategy == "fixed":
        return FixedKVDecoder(B, cfg, params, batch, max_len)
    if strategy == "full":
        return FullDecoder(B, cfg, params)
    raise TwinlmError(f"unknown decoding strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def check_generates(cfg: ModelConfig) -> None:
    if cfg.kind != "decoder":
        raise TwinlmError(f"this is an --arch {cfg.arch} model, an encoder: it fills in masked tokens but "
                          "does not generate text (use twinlm predict)")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0.0:  # also refuses NaN
        raise TwinlmError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise TwinlmError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise TwinlmError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: np.ndarray, rng: np.random.Generator, *, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """Token ids (batch,) int32 drawn from logits (batch, V).

    - temperature 0: greedy argmax (no random number is drawn).
    - otherwise probabilities are softmax(logits / temperature), in float64, then filtered:
      top_k keeps the tokens whose logit is >= the k-th largest (ties at the k-th value all stay);
      top_p (nucleus) keeps the most probable tokens whose total probability first reaches top_p
      (always at least the most probable one; ties with the last one kept also stay).
      What is kept is renormalised and one uniform per row picks a token by inverse CDF in id order.
    So top_k=1, or a tiny top_p, equals greedy (barring exact ties).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0.0:
        return np.argmax(logits, axis=-1).astype(np.int32)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        desc = -np.sort(-probs, axis=-1)
        mass_before = np.cumsum(desc, axis=-1) - desc
        n_keep = np.maximum((mass_before < top_p).sum(axis=-1), 1)
        cutoff = np.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
        probs = np.where(probs >= cutoff, probs, 0.0)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(cdf.shape[0]) * cdf[:, -1]
    picks = [np.searchsorted(row, x, side="right") for row, x in zip(cdf, u, strict=True)]
    return np.minimum(np.array(picks), cdf.shape[-1] - 1).astype(np.int32)


def generate(B: Backend, cfg: ModelConfig, params: dict[str, Array], prompt: np.ndarray, max_new_tokens: int,
             *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, use_cache: bool = True, stop: Iterable[int] = ()) -> Iterator[np.ndarray]:
    """Yield `max_new_tokens` new token columns (batch,) int32, each as soon as it is produced; or fewer,
    ending with the column in which every row has produced one of the `stop` ids (see `stop_ids`).

    `params` are backend arrays; `prompt` int ids (batch, t0), t0 >= 1. `use_cache=False` recomputes the
    whole context each step (the reference); True uses the backend's fast decoder (see module docstring),
    which gives the same tokens. Arguments are checked here, before the first token is asked for.
    """
    check_generates(cfg)
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise TwinlmError(f"prompt must be a non-empty (batch, time) array of ids, got shape {prompt.shape}")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise TwinlmError(f"prompt ids must be integers, got {prompt.dtype}")
    try:
        model.check_token_ids(prompt, cfg.vocab_size)
    except ValueError as e:
        raise TwinlmError(f"prompt: {e}") from None
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise TwinlmError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    decoder = make_decoder(B, cfg, params, prompt.shape[0], default_strategy(B, use_cache),
                           max_len=prompt.shape[1] + max_new_tokens)
    return _stream(decoder, prompt.astype(np.int32), max_new_tokens, np.random.default_rng(seed),
                   dict(temperature=temperature, top_k=top_k, top_p=top_p),
                   np.array(sorted(set(stop)), np.int64))


def stop_ids(tok: Tokenizer, hf_record: dict[str, Any] | None = None) -> frozenset[int]:
    """The ids that end generation: the union of the tokenizer's end token and generation_config.json's
    `eos_token_id` (an int or a list: Llama 3.x and Qwen2.5 end chat turns with a token that is not the
    tokenizer's eos)."""
    out = {tok.roles["eos"]} if "eos" in getattr(tok, "roles", {}) else set()
    eos = ((hf_record or {}).get("generation_config") or {}).get("eos_token_id")
    for i in eos if isinstance(eos, list) else [eos]:
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i:
            out.add(i)
    return frozenset(out)


def _stream(decoder: Decoder, tokens: np.ndarray, n: int, rng: np.random.Generator,
            sampling: dict[str, Any], stop: np.ndarray) -> Iterator[np.ndarray]:
    done = np.zeros(tokens.shape[0], bool)
    for _ in range(n):
        nxt = sample_next(decoder.next_logits(tokens), rng, **sampling)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        yield nxt
        done |= np.isin(nxt, stop)
        if done.all():
            return
