"""Who may use the public APIs and whom a request belongs to: bearer tokens (``auth``), TLS on the
public ports (``tls``), and the :class:`Caller` that per-client limits count and ``Abort`` checks.

gRPC health and reflection stay open (probes carry no token; reflection shows only the public
schema); so does HTTP ``/health``. Everything else needs a token once ``auth`` names some.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from cluster.config import AuthConfig, ConfigError, TlsConfig

MIN_TOKEN_LENGTH = 16  # a short token is guessable over the network


@dataclass(frozen=True)
class Caller:
    """``client`` is what per-client limits count: the token's name, else the peer's host.
    ``owner`` is who may abort a request or reuse its id: the token's name, else the connection
    (host and port), so without auth another connection cannot touch it."""

    client: str
    owner: str

    @classmethod
    def of(cls, name: str | None, host: str, port: str | int) -> Caller:
        return cls(name, name) if name else cls(host, f"{host}:{port}")


class Tokens:
    """The accepted bearer tokens and their names; a presented token is checked against all of them
    in constant time, so neither timing nor an early exit tells how close a guess came."""

    def __init__(self, named: dict[str, str]) -> None:
        self._digests = [(_digest(token), name) for name, token in named.items()]

    @classmethod
    def load(cls, config: AuthConfig) -> Tokens | None:
        """The tokens ``config`` names (None: auth off); ConfigError when they cannot be read."""
        if not config.enabled:
            return None
        text = ""
        if config.tokens_file:
            try:
                text += Path(config.tokens_file).read_text() + "\n"
            except OSError as exc:
                raise ConfigError(f"auth.tokens_file: cannot read it ({exc})") from None
        if config.tokens_env:
            if config.tokens_env not in os.environ:
                raise ConfigError(f"auth.tokens_env: the environment variable {config.tokens_env} is not set")
            text += os.environ[config.tokens_env]
        return cls(parse_tokens(text))

    def name(self, authorization: str | None) -> str | None:
        """The name of the token in an ``Authorization: Bearer TOKEN`` value; None if none matches."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        given, found = _digest(token.strip()), None
        for digest, name in self._digests:
            if hmac.compare_digest(given, digest):
                found = name
        return found


def parse_tokens(text: str) -> dict[str, str]:
    """``{name: token}`` from whitespace-separated ``NAME:TOKEN`` entries or bare tokens (named by
    a short hash, so logs and limits never show a token); ``#`` starts a comment line."""
    named: dict[str, str] = {}
    for line in text.splitlines():
        for entry in line.split() if not line.lstrip().startswith("#") else ():
            name, _, token = entry.rpartition(":")
            name = name or f"token-{_digest(token).hex()[:8]}"
            if len(token) < MIN_TOKEN_LENGTH:
                raise ConfigError(f"auth: the token of {name!r} is shorter than {MIN_TOKEN_LENGTH} characters")
            if name in named or token in named.values():
                raise ConfigError(f"auth: the name or the token of {name!r} is given twice")
            named[name] = token
    if not named:
        raise ConfigError("auth: no tokens found")
    return named


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def grpc_caller(tokens: Tokens | None, context: grpc.aio.ServicerContext) -> Caller:
    """The caller of a gRPC request (already authenticated by :class:`TokenGate`)."""
    name = tokens.name(dict(context.invocation_metadata()).get("authorization")) if tokens else None
    kind, _, address = context.peer().partition(":")  # ipv4:HOST:PORT, ipv6:[HOST]:PORT, unix:PATH
    host, _, port = address.rpartition(":") if kind in ("ipv4", "ipv6") else (context.peer(), "", "")
    return Caller.of(name, host.strip("[]"), port)


class TokenGate(grpc.aio.ServerInterceptor):
    """Refuses calls to ``service`` without a known token (UNAUTHENTICATED) before their request is
    even read, and calls ``refused`` (to count it); other services (health, reflection) pass."""

    def __init__(self, tokens: Tokens, service: str, refused: Callable[[], None]) -> None:
        self.tokens, self.prefix, self.refused = tokens, f"/{service}/", refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(self.prefix):
            if self.tokens.name(dict(details.invocation_metadata).get("authorization")) is None:
                self.refused()
                return grpc.unary_unary_rpc_method_handler(_unauthenticated)
        return await continuation(details)


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the method's request get INVALID_ARGUMENT with the parser's
    message (gRPC's own answer is UNKNOWN), and ``refused`` is called to count it. For the
    methods with one request message: every method of Tandem's public API."""

    def __init__(self, refused: Callable[[], None]) -> None:
        self.refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, refused = handler.request_deserializer, self.refused

        def parsed(data: bytes) -> object:
            try:
                return parse(data)
            except Exception as exc:  # protobuf's DecodeError and what a bad length gives
                return _Unparsable(f"the request does not parse: {exc}")

        if handler.response_streaming:
            streaming = handler.unary_stream

            async def stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
                if isinstance(request, _Unparsable):
                    refused()
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                async for response in streaming(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(stream, parsed, handler.response_serializer)
        unary = handler.unary_unary

        async def call(request: object, context: grpc.aio.ServicerContext) -> object:
            if isinstance(request, _Unparsable):
                refused()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(call, parsed, handler.response_serializer)


@dataclass(frozen=True)
class _Unparsable:
    message: str


async def _unauthenticated(_: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "send a valid token as `authorization: Bearer TOKEN`")


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """The gRPC server's TLS credentials (None: plain text); ConfigError for unreadable files."""
    if not tls.enabled:
        return None
    key, cert = _read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file")
    client_ca = _read(tls.client_ca_file, "client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], client_ca, require_client_auth=client_ca is not None)


def http_tls_options(tls: TlsConfig) -> dict[str, str]:
    """Serve's ``http_options`` for HTTPS (its proxy cannot require client certificates)."""
    return {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file} if tls.enabled else {}


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.{key}: cannot read it ({exc})") from None


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT listens on the loopback only (``localhost`` counts; any other name not)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
