"""`twinlm serve`: an OpenAI-compatible HTTP API over the continuous-batching engine (`twinlm.engine`).

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true`
as server-sent events: `data: {chunk}` lines, then `data: [DONE]`). Errors are OpenAI's JSON shape
{"error": {"message", "type", "param", "code"}} with a 4xx status; the server keeps serving.

Built on Starlette + uvicorn: Starlette is the small ASGI toolkit FastAPI itself is built on; twinlm
validates every field itself (to refuse what changes an answer, with OpenAI's error shape), so FastAPI's
pydantic layer would add a dependency and a second error format without saving code.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from twinlm.chat_model import ChatModel, TextStream
from twinlm.core.chat import ChatError, check_messages
from twinlm.core.errors import TwinlmError
from twinlm.engine import Engine, Finish, Request

# Fields that would change the answer and are not implemented: refused, never ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
               "top_logprobs", "suffix", "audio", "modalities", "prediction")
MAX_STOP = 4
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict[str, Any], name: str, default: float | None, lo: float, hi: float,
            lo_open: bool = False) -> float | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
        raise ApiError(f"'{name}' must be a number", param=name, code="invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", param=name,
                       code="invalid_value")
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{name}' must be an integer", param=name, code="invalid_type")
    if lo is not None and v < lo:
        raise ApiError(f"'{name}' must be >= {lo}, got {v}", param=name, code="invalid_value")
    return v


class Server:
    """The API's state: one model, one engine; `app()` builds the Starlette application."""

    def __init__(self, cm: ChatModel, engine: Engine, model_id: str | None = None) -> None:
        self.cm, self.engine = cm, engine
        self.model_id = model_id or cm.name
        self.created = int(time.time())

    # ---- request parsing ---------------------------------------------------------------------
    def _common(self, body: dict[str, Any], prompt_len: int) -> dict[str, Any]:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError("'model' must be a string naming the model (GET /v1/models)", param="model",
                           code="invalid_type")
        if model != self.model_id:
            raise ApiError(f"the model {model!r} does not exist; this server has {self.model_id!r}", 404,
                           "model", "model_not_found")
        for name in UNSUPPORTED:
            if body.get(name) not in (None, [], {}):
                raise ApiError(f"'{name}' is not supported by twinlm serve", param=name, code="unsupported")
        n = _int(body, "n", 1)
        if n is not None and n != 1:
            raise ApiError("only n=1 is supported", param="n", code="unsupported")
        if body.get("logprobs") not in (None, False):
            raise ApiError("'logprobs' is not supported by twinlm serve", param="logprobs",
                           code="unsupported")
        if body.get("echo") not in (None, False):
            raise ApiError("'echo' is not supported by twinlm serve", param="echo", code="unsupported")
        if _int(body, "best_of", 1) not in (None, 1):
            raise ApiError("only best_of=1 is supported", param="best_of", code="unsupported")
        for pen in ("presence_penalty", "frequency_penalty"):
            if _number(body, pen, 0.0, -2.0, 2.0) != 0.0:
                raise ApiError(f"'{pen}' is not supported by twinlm serve", param=pen, code="unsupported")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError("'stream' must be a boolean", param="stream", code="invalid_type")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is None:
            stop = []
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError("'stop' must be a non-empty string or a list of them", param="stop",
                           code="invalid_type")
        if len(stop) > MAX_STOP:
            raise ApiError(f"'stop' takes at most {MAX_STOP} sequences", param="stop", code="invalid_value")
        room = self.engine.context - prompt_len
        if room < 1:
            raise ApiError(f"the prompt has {prompt_len} tokens; this model's context is "
                           f"{self.engine.context} tokens, which must hold the prompt and at least one new "
                           "token", param="messages", code="context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, key, 1)
        if max_tokens is not None and max_tokens > room:
            raise ApiError(f"'{key}' is {max_tokens}, but the prompt ({prompt_len} tokens) leaves room for "
                           f"{room} in this model's context of {self.engine.context}", param=key,
                           code="context_length_exceeded")
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise ApiError("'stream_options' must be an object", param="stream_options", code="invalid_type")
        return {
            "stream": stream, "stop": tuple(stop), "max_tokens": max_tokens, "room": room,
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "seed": _int(body, "seed"),
            "include_usage": bool((so or {}).get("include_usage", False)),
        }

    def parse_completion(self, body: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError("'prompt' must be a string (one prompt per request)", param="prompt",
                           code="invalid_type")
        if not prompt:
            raise ApiError("'prompt' is empty", param="prompt", code="invalid_value")
        ids = self._encode(lambda: self.cm.completion_ids(prompt), "prompt")
        opts = self._common(body, len(ids))
        if opts["max_tokens"] is None:
            opts["max_tokens"] = min(COMPLETIONS_DEFAULT_MAX_TOKENS, opts["room"])
        return ids, opts

    def parse_chat(self, body: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        try:
            messages = check_messages(body.get("messages"), "messages")
        except ChatError as e:
            raise ApiError(str(e), param="messages", code="invalid_value") from None
        ids = self._encode(lambda: self.cm.chat_ids(messages), "messages")
        opts = self._common(body, len(ids))
        if opts["max_tokens"] is None:
            opts["max_tokens"] = opts["room"]
        opts["stop"] = opts["stop"] + self.cm.template.stop
        return ids, opts

    @staticmethod
    def _encode(fn: Any, param: str) -> list[int]:
        try:
            ids = fn()
        except TwinlmError as e:
            raise ApiError(str(e), param=param, code="invalid_value") from None
        if not ids:
            raise ApiError("the prompt encodes to no tokens", param=param, code="invalid_value")
        return ids

    # ---- generation --------------------------------------------------------------------------
    async def _tokens(self, ids: list[int], opts: dict[str, Any]) -> AsyncIterator[int | Finish]:
        """The request's tokens as the engine makes them; leaving early (a client gone, a stop string)
        cancels the request, which frees its slot at the engine's next step."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[int | Finish] = asyncio.Queue()

        class Bridge:
            @staticmethod
            def put(item: int | Finish) -> None:
                loop.call_soon_threadsafe(q.put_nowait, item)

        req = Request(ids, opts["max_tokens"], temperature=opts["temperature"], top_p=opts["top_p"],
                      seed=opts["seed"], stop_ids=self.cm.stop_ids, tokens=Bridge())
        try:
            self.engine.submit(req)
        except TwinlmError as e:
            raise ApiError(str(e), 503 if "stopped" in str(e) else 400, code="engine") from None
        try:
            while True:
                item = await q.get()
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            req.cancel()

    async def generate(self, ids: list[int],
                       opts: dict[str, Any]) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text piece, finish reason or None, tokens so far) as the text becomes final."""
        text = TextStream(self.cm.tokenizer, opts["stop"])
        made = 0
        async for item in self._tokens(ids, opts):
            if isinstance(item, Finish):
                if item.reason.startswith("error"):
                    raise ApiError(f"generation failed: {item.reason}", 500, kind="server_error")
                yield text.flush(), item.reason, made
                return
            made += 1
            piece = text.push(item)
            if text.stopped:
                yield piece, "stop", made
                return
            if piece:
                yield piece, None, made

    # ---- the application ---------------------------------------------------------------------
    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.requests import Request as HttpRequest
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        def error(e: ApiError) -> JSONResponse:
            return JSONResponse(e.body(), status_code=e.status)

        async def body_of(request: HttpRequest) -> dict[str, Any]:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(body, dict):
                raise ApiError("the request body must be a JSON object", code="invalid_json")
            return body

        async def health(request: HttpRequest) -> JSONResponse:
            ok = self.engine.error is None
            return JSONResponse({"status": "ok" if ok else "error", "busy": self.engine.busy()},
                                status_code=200 if ok else 503)

        async def models(request: HttpRequest) -> JSONResponse:
            return JSONResponse({"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "twinlm"}]})

        async def completions(request: HttpRequest) -> Any:
            return await respond(request, chat=False)

        async def chat_completions(request: HttpRequest) -> Any:
            return await respond(request, chat=True)

        async def respond(request: HttpRequest, chat: bool) -> Any:
            try:
                body = await body_of(request)
                ids, opts = (self.parse_chat if chat else self.parse_completion)(body)
            except ApiError as e:
                return error(e)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            if opts["stream"]:
                return StreamingResponse(self._sse(rid, ids, opts, chat), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await self._whole(request, rid, ids, opts, chat)

        async def not_found(request: HttpRequest, exc: Exception) -> JSONResponse:
            status = getattr(exc, "status_code", 404)
            msg = "method not allowed" if status == 405 else f"no route {request.url.path}"
            return error(ApiError(f"{msg} ({request.method} {request.url.path})", status, code="not_found"))

        async def unexpected(request: HttpRequest, exc: Exception) -> JSONResponse:
            return error(ApiError(f"internal error: {type(exc).__name__}: {exc}", 500, kind="server_error"))

        routes = [Route("/health", health), Route("/v1/models", models),
                  Route("/v1/completions", completions, methods=["POST"]),
                  Route("/v1/chat/completions", chat_completions, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: unexpected})

    def _usage(self, ids: list[int], made: int) -> dict[str, int]:
        return {"prompt_tokens": len(ids), "completion_tokens": made, "total_tokens": len(ids) + made}

    async def _whole(self, request: Any, rid: str, ids: list[int], opts: dict[str, Any], chat: bool) -> Any:
        from starlette.responses import JSONResponse

        async def collect() -> tuple[list[str], str, int]:
            pieces, reason, made = [], "length", 0
            async for piece, fin, n in self.generate(ids, opts):
                pieces.append(piece)
                made = n
                if fin is not None:
                    reason = fin
                    break
            return pieces, reason, made

        task = asyncio.ensure_future(collect())
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done() and await request.is_disconnected():  # nobody to answer: free the slot
                task.cancel()
                return JSONResponse({}, status_code=499)
        try:
            pieces, reason, made = task.result()
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice |= {"text": text, "logprobs": None}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_id, "choices": [choice],
                             "usage": self._usage(ids, made)})

    async def _sse(self, rid: str, ids: list[int], opts: dict[str, Any], chat: bool) -> AsyncIterator[str]:
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                    {"content": piece} if piece else {})
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
            head = {"id": rid, "object": obj, "created": created, "model": self.model_id}
            return "data: " + json.dumps({**head, "choices": [choice]}) + "\n\n"

        made = 0
        if chat:
            yield chunk(None, None, first=True)
        try:
            async for piece, reason, n in self.generate(ids, opts):
                made = n
                if piece:
                    yield chunk(piece, None)
                if reason is not None:
                    yield chunk(None, reason)
        except ApiError as e:
            yield "data: " + json.dumps(e.body()) + "\n\n"
        if opts["include_usage"]:
            yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": self.model_id,
                                         "choices": [], "usage": self._usage(ids, made)}) + "\n\n"
        yield "data: [DONE]\n\n"


def serve(cm: ChatModel, engine: Engine, host: str, port: int, model_id: str | None = None,
          log_level: str = "warning", on_ready: Any = None) -> None:
    """Run the API until SIGTERM or Ctrl-C: uvicorn stops accepting, lets the requests in flight finish
    (up to 30 s), then the engine stops."""
    import uvicorn

    server = Server(cm, engine, model_id)
    config = uvicorn.Config(server.app(), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=30, lifespan="off")
    userver = uvicorn.Server(config)
    if on_ready is not None:
        original = userver.startup

        async def startup(sockets: Any = None) -> None:
            await original(sockets=sockets)
            on_ready()
        userver.startup = startup  # type: ignore[method-assign]
    try:
        userver.run()
    finally:
        engine.close()
