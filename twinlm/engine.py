"""Continuous batching for `twinlm serve` and `twinlm chat`: one thread owns the backend and decodes every
active request together, one token each per step.

    slots (S rows) x a fixed-shape KV cache (S, Hkv, length, hs) per layer    (decoder.decode_step)

The cache's length starts short and doubles (up to the context) when the longest history outgrows it
(`generate.cache_length`), so memory follows the tokens in flight, not the model's context.

Each step feeds every busy slot one token at that slot's own position (a prompt token while it
prefills, then the token it sampled last) through one compiled graph of fixed shape; free slots ride
along masked. A request joins a free slot at the next step and leaves it the step it finishes (its
token budget, a stop token, the context's end, or cancellation: a client that went away), so requests
start and end independently. Sampling is `generate.sample_next` on the request's own numpy generator,
so a seed gives the same tokens whatever else is being decoded (every row of the fixed-shape graph is
computed the same way whichever slots are busy).

Prefill goes one token per step (the graph has one shape); a long prompt delays its own first token by
its length in steps, not the other requests' tokens.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinlm.core import model
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.generate import (
    _FIXED_SHAPE_BACKENDS,
    cache_length,
    check_generates,
    check_sampling,
    grow_cache,
    params_dtype,
    sample_next,
    zeros,
)
from twinlm.run_dir import to_backend


@dataclass
class Request:
    """One generation: prompt ids, sampling settings, and the queue its tokens arrive on.

    `tokens` (anything with `put`, called from the engine thread) receives each new token id (int), then a
    `Finish`."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    tokens: Any = field(default_factory=queue.Queue)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop at the next step and free the slot (a client that went away, a stop string seen)."""
        self.cancelled = True


@dataclass
class Finish:
    reason: str  # "stop" (a stop token, or cancelled), "length" (max_tokens or the context's end)
    n_tokens: int


@dataclass
class _Slot:
    req: Request
    ids: list[int]
    pos: int = 0  # the position of the token fed next
    made: int = 0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)


class Engine:
    """`submit(request)`; the engine thread decodes all active requests together (module docstring)."""

    def __init__(self, B: Backend, cfg: ModelConfig, params: dict[str, np.ndarray], slots: int = 8,
                 context: int | None = None, dtype: str | None = None) -> None:
        check_generates(cfg)
        self.dtype = dtype  # the weights' (and the KV cache's) dtype; None: as stored
        if context is None:  # the model's, or its sliding window where that is shorter
            context = min(cfg.block_size, cfg.sliding_window or cfg.block_size)
        if not 1 < context <= cfg.block_size:
            raise TwinlmError(f"context must be in 2..{cfg.block_size} (the model's block size), "
                              f"got {context}")
        if slots < 1:
            raise TwinlmError(f"slots must be >= 1, got {slots}")
        if cfg.sliding_window and cfg.sliding_window < context:  # the decode step's one mask row per slot
            raise TwinlmError(f"--context {context}: the model attends through a sliding window of "
                              f"{cfg.sliding_window} tokens, which chat and serve do not apply; give "
                              f"--context {cfg.sliding_window} or less")
        self.B, self.cfg, self.n_slots, self.context = B, cfg, slots, context
        self.vocab_size = cfg.vocab_size
        # Eager backends run only the rows in use (`_rows`); fixed-shape ones (tinygrad: one compiled
        # graph per shape) always run all S rows with the cache as the step's state.
        self.bucketed = B.name not in _FIXED_SHAPE_BACKENDS
        # The cache spans `context` positions: a model config with that block size (positions < context).
        self._cfg = cfg.replace(block_size=context)
        self._numpy_params = params
        self._slots: list[_Slot | None] = [None] * slots
        self._pending: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self.steps = 0
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twinlm-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise TwinlmError(f"the model could not be set up on {B.name}: {self.error}")

    def _setup(self) -> None:
        """Backend set-up on the engine thread. tinygrad keeps its compile cache in one sqlite connection
        that by default only the thread that opened it may use: it is reopened here for any thread."""
        if self.B.name == "tinygrad":
            import sqlite3

            import tinygrad.helpers as th

            th._db_connection = sqlite3.connect(th.CACHEDB, timeout=60, isolation_level="IMMEDIATE",
                                                check_same_thread=False)
        params = self._numpy_params
        self._params = to_backend(self.B, params, self.dtype)  # sorted: TinyJit binds by order
        self._dtype = params_dtype(self.B, self._params)  # the KV cache's too
        self._steps: dict[int, Any] = {}
        self._length = 0
        self._grow(1)

    # ---- the graph ---------------------------------------------------------------------------
    def _grow(self, n: int) -> None:
        """Make the cache hold positions < n: its length is `generate.cache_length` of the longest history
        (it starts short and doubles, so memory follows the tokens, not the context), the cached slots
        copied into the longer one. One compiled step per length."""
        length = cache_length(n, self.context)
        if length <= self._length:
            return
        B, cfg = self.B, self._cfg.replace(block_size=length)
        shapes = [s for pair in model.decode_cache_shapes(cfg, self.n_slots) for s in pair]
        if self.bucketed:
            if self._length == 0:
                self._cache = [zeros(B, s, self._dtype) for s in shapes]
            else:
                self._cache = [grow_cache(B, c, s) for c, s in zip(self._cache, shapes, strict=True)]
            B.sync(*self._cache)
            self._steps[length] = self._compile_bucketed(cfg, len(shapes) // 2)
        else:
            old = self._steps.get(self._length)
            step = self._compile(cfg, shapes)
            if old is not None:
                step.state = {k: grow_cache(B, old.state[k], s)
                              for k, s in zip(step.state, shapes, strict=True)}
                B.sync(*step.state.values())
            self._steps = {length: step}  # the shorter cache's memory goes back
        self._length = length

    def _compile(self, cfg: ModelConfig, shapes: list[tuple[int, ...]]) -> Any:
        B, window = self.B, cfg.sliding_window
        names = [f"{kv}.{i}" for i in range(len(shapes) // 2) for kv in "kv"]
        state = {k: zeros(B, s, self._dtype) for k, s in zip(names, shapes, strict=True)}
        n_layer = len(shapes) // 2

        def step(state: dict, p: dict[str, Array], idx: Array, pos_ids: Array) -> tuple[tuple[Array], dict]:
            cache = [(state[f"k.{i}"], state[f"v.{i}"]) for i in range(n_layer)]
            write, attn = model.decode_masks(B, pos_ids, cfg.block_size, window)
            lg, cache = model.decode_step(B, cfg, p, idx, pos_ids, write, attn, cache)
            new = {f"{kv}.{i}": t for i, pair in enumerate(cache) for kv, t in zip("kv", pair, strict=True)}
            return (lg,), new

        return B.compile_step(step, state)

    def _compile_bucketed(self, cfg: ModelConfig, n_layer: int) -> Any:
        """Eager backends (MLX): the cache rides as inputs and outputs, so one step may run on only the
        first b rows (b a power of two covering the busy slots): a lone request costs one row, not S."""
        B, window = self.B, cfg.sliding_window

        def step(state: dict, p: dict[str, Array], idx: Array, pos_ids: Array,
                 *flat: Array) -> tuple[tuple[Array, ...], dict]:
            cache = [(flat[2 * i], flat[2 * i + 1]) for i in range(n_layer)]
            write, attn = model.decode_masks(B, pos_ids, cfg.block_size, window)
            lg, cache = model.decode_step(B, cfg, p, idx, pos_ids, write, attn, cache)
            return (lg, *(t for pair in cache for t in pair)), state

        return B.compile_step(step, {})

    def _rows(self) -> int:
        """How many leading rows a step computes: all of them on fixed-shape backends, else the power of
        two (at most S) that covers the highest busy slot (slots are taken lowest first)."""
        if not self.bucketed:
            return self.n_slots
        top = max(i for i, s in enumerate(self._slots) if s is not None) + 1
        return min(self.n_slots, 1 << (top - 1).bit_length())

    def _run_step(self, tokens: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Next-token logits (rows, V) of the first `rows` slots."""
        B, rows = self.B, len(tokens)
        self._grow(int(pos.max()) + 1)
        step = self._steps[self._length]
        inputs = [B.from_numpy(a.reshape(-1, 1).astype(np.int32)) for a in (tokens, pos)]
        if not self.bucketed:
            (lg,) = step(self._params, *inputs)
            return B.to_numpy(lg)[:, 0, :]
        flat = [c if rows == self.n_slots else c[:rows] for c in self._cache]
        lg, *new = step(self._params, *inputs, *flat)
        if rows < self.n_slots:
            new = [B.concat([t, c[rows:]], axis=0) for t, c in zip(new, self._cache, strict=True)]
        B.sync(*new)  # keep the lazy graph from growing step after step
        self._cache = new
        return B.to_numpy(lg)[:, 0, :]

    # ---- requests ----------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """Refuse a request the engine cannot run (TwinlmError, before it is queued)."""
        if not req.prompt:
            raise TwinlmError("the prompt is empty")
        try:
            model.check_token_ids(np.asarray(req.prompt), self.vocab_size)
        except ValueError as e:
            raise TwinlmError(f"prompt: {e}") from None
        if len(req.prompt) >= self.context:
            raise TwinlmError(f"the prompt has {len(req.prompt)} tokens; this server's context is "
                              f"{self.context} tokens, which must hold the prompt and at least one new token")
        check_sampling(req.temperature, req.top_k, req.top_p)

    def submit(self, req: Request) -> None:
        self.check(req)
        if self.error is not None or self._stop:
            raise TwinlmError("the engine has stopped")
        self._pending.put(req)
        self._wake.set()

    def busy(self) -> int:
        return sum(s is not None for s in self._slots) + self._pending.qsize()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- the loop ----------------------------------------------------------------------------
    def _admit(self) -> None:
        for i, s in enumerate(self._slots):
            if s is None:
                try:
                    req = self._pending.get_nowait()
                except queue.Empty:
                    return
                if req.cancelled:
                    req.tokens.put(Finish("stop", 0))
                    continue
                self._slots[i] = _Slot(req, list(req.prompt), rng=np.random.default_rng(req.seed))

    def _finish(self, i: int, reason: str) -> None:
        s = self._slots[i]
        assert s is not None
        s.req.tokens.put(Finish(reason, s.made))
        self._slots[i] = None

    def _run(self) -> None:
        try:
            self._setup()
        except BaseException as e:  # noqa: BLE001 - reported by __init__
            self.error = e
            return
        finally:
            self._ready.set()
        try:
            while not self._stop:
                self._admit()
                for i, s in enumerate(self._slots):
                    if s is not None and s.req.cancelled:
                        self._finish(i, "stop")
                if not any(self._slots):
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._one_step()
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear of it
            self.error = e
            for i, s in enumerate(self._slots):
                if s is not None:
                    s.req.tokens.put(Finish(f"error: {e}", s.made))
                    self._slots[i] = None
        finally:
            while not self._pending.empty():
                self._pending.get_nowait().tokens.put(Finish("stop", 0))

    def _one_step(self) -> None:
        rows = self._rows()
        tokens = np.zeros(rows, np.int64)
        pos = np.zeros(rows, np.int64)
        for i, s in enumerate(self._slots[:rows]):
            if s is not None:
                tokens[i], pos[i] = s.ids[s.pos], s.pos
        logits = self._run_step(tokens, pos)
        self.steps += 1
        for i, s in enumerate(self._slots):
            if s is None:
                continue
            s.pos += 1
            if s.pos < len(s.ids):  # still prefilling the prompt
                continue
            r = s.req
            nxt = int(sample_next(logits[i:i + 1], s.rng, temperature=r.temperature, top_k=r.top_k,
                                  top_p=r.top_p)[0])
            if nxt in r.stop_ids:
                self._finish(i, "stop")
                continue
            s.ids.append(nxt)
            s.made += 1
            r.tokens.put(nxt)
            if s.made >= r.max_tokens or len(s.ids) >= self.context:
                self._finish(i, "length")
