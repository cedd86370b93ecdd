"""The OpenAI-compatible HTTP API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``),
``/health`` and ``/metrics``: a FastAPI app the router serves through Serve's HTTP proxy.

Requests run through the router's :class:`~cluster.frontend.Frontend`, as gRPC ones do. A streamed
response starts only once the first tokens are out, so a request the workers refuse (prompt too
long, cluster full) still gets an HTTP status and OpenAI's error JSON, never a broken stream.
Extensions, as in vLLM: ``top_k``, ``ignore_eos``, ``stop_token_ids``, ``return_token_ids``,
``drafter``, and τ / rounds / drafted and accepted tokens in ``usage``. Tandem's own:
``continue_token_ids`` goes on after the output a broken stream delivered (with ``return_token_ids``
each response carries the ``seed`` to send with it), as gRPC's ``continue_token_ids`` does.

Before any route, :class:`_Gate` checks the bearer token (401; ``/health`` stays open for probes)
and the body's size (413); the frontend checks the rest (400, or 429 past a client's streams).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.frontend import Chunk, Frontend, Refused
from cluster.security import Caller, Tokens
from cluster.session import Session
from tandem.errors import InvalidRequest
from tandem.sampling import SamplingParams

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# Options whose non-default values would change the output in ways Tandem does not implement.
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "echo",
    "suffix",
    "best_of",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "functions",
    "response_format",
)
STATUS = {  # gRPC status of a refusal -> (HTTP status, OpenAI error type)
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    """What both endpoints take; unknown fields are ignored, as OpenAI's own API does."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)  # -1 or 0: no top-k cut
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[NonNegativeInt] = []
    return_token_ids: bool = False
    drafter: str = ""  # "" : the cluster's; "none": target-only
    continue_token_ids: list[NonNegativeInt] = []  # the output a broken stream of this request delivered

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            temperature=self.temperature,
            top_k=max(0, self.top_k),
            top_p=self.top_p,
            max_tokens=max_tokens,
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
        )

    def check(self) -> None:
        if self.n != 1:
            raise InvalidRequest(f"n must be 1 (Tandem samples one choice per request), got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options needs stream: true")
        for name in UNSUPPORTED:
            if (self.model_extra or {}).get(name) not in (None, False, 0, {}, []):
                raise InvalidRequest(f"{name} is not supported")


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def build_http_app(frontend: Frontend) -> FastAPI:
    app = FastAPI(title="Tandem", docs_url=None, redoc_url=None)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InvalidRequest, _invalid)
    app.add_exception_handler(Refused, _refusal)
    app.add_exception_handler(Exception, _internal)
    unauthenticated = frontend.metrics.failures.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc
    app.add_middleware(
        _Gate, tokens=frontend.tokens, max_body=frontend.limits.max_request_bytes, refused=unauthenticated
    )

    @app.get("/health")
    async def health() -> Response:
        if frontend.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await frontend.metrics.exposition(), media_type=frontend.metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(frontend)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        _check_model(frontend, model)
        return JSONResponse(_model_card(frontend))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request) -> Response:
        _accept(frontend, request)
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise InvalidRequest(f"one prompt per request, got {len(prompt)}")
            prompt = prompt[0]
        prompt_ids = await frontend.encode(prompt)
        max_tokens = request.max_tokens or min(COMPLETIONS_MAX_TOKENS, frontend.max_output)
        return await _respond(frontend, request, http.state.caller, prompt_ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request) -> Response:
        _accept(frontend, request)
        if frontend.tokenizer is None or not frontend.tokenizer.has_chat_template:
            raise InvalidRequest("this model has no chat template: use /v1/completions")
        prompt_ids = await frontend.encode([m.as_dict() for m in request.messages], chat=True)
        max_tokens = request.max_completion_tokens or request.max_tokens  # None: to the end of the context
        return await _respond(frontend, request, http.state.caller, prompt_ids, max_tokens, chat=True)

    return app


async def _respond(
    frontend: Frontend, request: _Generation, caller: Caller, prompt_ids: list[int], max_tokens: int | None, chat: bool
) -> Response:
    """Run the request; the whole response, or a stream of server-sent events."""
    sampling = request.sampling(max_tokens or frontend.max_output)
    session = frontend.open(prompt_ids, sampling, request.drafter, request.continue_token_ids)
    reply = _Reply(frontend.model_name, chat, session.params.seed if request.return_token_ids else None)
    limit = frontend.max_model_len
    if max_tokens and len(prompt_ids) + max_tokens > limit:  # OpenAI's rule: what is asked for must fit
        raise InvalidRequest(
            f"the context holds {limit} tokens: {len(prompt_ids)} in the prompt leave room for "
            f"{limit - len(prompt_ids)}, not max_tokens {max_tokens}"
        )
    chunks = frontend.stream(session, caller, reply.id)
    try:
        first = await anext(chunks)  # refusals surface here, before any byte is sent
        if request.stream:
            usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(_events(reply, session, first, chunks, usage), media_type="text/event-stream")
        token_ids, text = list(first.token_ids), first.text
        async for chunk in chunks:
            token_ids += chunk.token_ids
            text += chunk.text
        return JSONResponse(reply.whole(session, text, token_ids))
    except BaseException:
        await _close(session, chunks)
        raise


async def _events(
    reply: _Reply, session: Session, first: Chunk, chunks: AsyncIterator[Chunk], include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events; a client that goes away cancels this and frees the session on both pools."""
    try:
        if reply.chat:  # OpenAI's first chat chunk carries the role alone
            yield _event(reply.chunk(Chunk([], "", None), include_usage, role=True))
        yield _event(reply.chunk(first, include_usage))
        async for chunk in chunks:
            yield _event(reply.chunk(chunk, include_usage))
        if include_usage:
            yield _event({**reply.header(chunk=True), "choices": [], "usage": _usage(session)})
    except Refused as exc:  # a worker failed mid-stream: the status line is long gone
        yield _event(_error_body(*STATUS.get(exc.code, (500, "internal_error")), exc.message))
    finally:
        await _close(session, chunks)
    yield "data: [DONE]\n\n"


async def _close(session: Session, chunks: AsyncIterator[Chunk]) -> None:
    session.close()  # at once, even when cancelled: both pools free the session's state
    await chunks.aclose()


class _Reply:
    """The ids, names and shapes of one response's JSON (completion or chat, whole or chunked)."""

    def __init__(self, model: str, chat: bool, seed: int | None) -> None:
        """``seed``: with token ids asked for, the request's seed (to continue it with), else None."""
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(16)}"
        self.model, self.chat, self.seed, self.with_token_ids = model, chat, seed, seed is not None
        self.created = int(time.time())

    def header(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        seed = {"seed": self.seed} if self.with_token_ids else {}
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **seed}

    def _choice(self, text: str, token_ids: list[int], finish_reason: str | None, delta: bool) -> dict[str, Any]:
        if not self.chat:
            body: dict[str, Any] = {"text": text}
        elif delta:
            body = {"delta": {"content": text} if text else {}}
        else:
            body = {"message": {"role": "assistant", "content": text}}
        extra = {"token_ids": token_ids} if self.with_token_ids else {}
        return {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason, **extra}

    def whole(self, session: Session, text: str, token_ids: list[int]) -> dict[str, Any]:
        choice = self._choice(text, token_ids, session.state.finish_reason, delta=False)
        return {**self.header(chunk=False), "choices": [choice], "usage": _usage(session)}

    def chunk(self, chunk: Chunk, include_usage: bool, role: bool = False) -> dict[str, Any]:
        choice = self._choice(chunk.text, chunk.token_ids, chunk.finish_reason, delta=True)
        if role:
            choice["delta"] = {"role": "assistant", "content": ""}
        return {**self.header(chunk=True), "choices": [choice], **({"usage": None} if include_usage else {})}


def _usage(session: Session) -> dict[str, Any]:
    """OpenAI's usage plus the speculation counters (τ as in the DSpark paper)."""
    state = session.state
    stats, completion = state.stats, len(state.output)
    return {
        "prompt_tokens": state.prompt_len,
        "completion_tokens": completion,
        "total_tokens": state.prompt_len + completion,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
        "tau": stats.tau,
        "rounds": stats.rounds,
        "drafted_tokens": stats.drafted,
        "accepted_tokens": stats.accepted,
    }


def _model_card(frontend: Frontend) -> dict[str, Any]:
    return {
        "id": frontend.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "tandem",
        "max_model_len": frontend.max_model_len,
    }


def _accept(frontend: Frontend, request: _Generation) -> None:
    """Refuse what this server cannot do before any tokenizing."""
    _check_model(frontend, request.model)
    request.check()


def _check_model(frontend: Frontend, model: str) -> None:
    if model != frontend.model_name:
        message = f"the model {model!r} does not exist; this server serves {frontend.model_name!r}"
        raise Refused(grpc.StatusCode.NOT_FOUND, message)


class _Gate:
    """ASGI middleware: the caller's bearer token (401 without a known one, except ``/health``) and
    the body, read whole up to ``max_body`` bytes (413 beyond) before any route parses it. The
    caller lands in ``request.state.caller``; ``refused`` counts a 401."""

    def __init__(self, app: ASGIApp, tokens: Tokens | None, max_body: int, refused: Callable[[], None]) -> None:
        self.app, self.tokens, self.max_body, self.refused = app, tokens, max_body, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        name = None
        if self.tokens is not None and scope["path"] != "/health":
            name = self.tokens.name(headers.get("authorization"))
            if name is None:
                self.refused()
                message = "send a valid API key as `Authorization: Bearer KEY`"
                refusal = JSONResponse(
                    _error_body(401, "authentication_error", message),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await refusal(scope, receive, send)
        body = await self._body(headers, receive)
        if body is None:
            return await _error(413, f"the body is larger than {self.max_body} bytes")(scope, receive, send)
        host, port = scope.get("client") or ("unknown", 0)
        scope.setdefault("state", {})["caller"] = Caller.of(name, host, port)
        await self.app(scope, _replay(body, receive), send)

    async def _body(self, headers: Headers, receive: Receive) -> bytes | None:
        """The whole body; None when it is (or says it is) over the limit."""
        declared = headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.max_body:
            return None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return None
            if not message.get("more_body"):
                return body


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app: the body read already, then the client's own messages (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _error_body(status: int, kind: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "internal_error"
    return JSONResponse(_error_body(status, kind, message, param), status_code=status)


async def _refusal(_: Request, exc: Refused) -> JSONResponse:
    status, kind = STATUS.get(exc.code, (500, "internal_error"))
    return JSONResponse(_error_body(status, kind, exc.message), status_code=status)


async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
    return _error(400, str(exc))


async def _internal(_: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error: {exc}")


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Bad JSON or fields: 400 with the first problem, as OpenAI answers (FastAPI's default is 422)."""
    problem = exc.errors()[0]
    where = [str(part) for part in problem.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    if problem.get("type") == "json_invalid":
        return _error(400, f"the body is not valid JSON: {problem.get('msg', '')}")
    return _error(400, f"{param}: {problem['msg']}" if param else problem["msg"], param)
