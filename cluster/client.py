"""A small synchronous client of the public API (``tandem client``, tests, the benchmark)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tandem_proto.v1 import api_pb2, api_pb2_grpc


@dataclass
class Output:
    """A finished stream: its token ids and text, and the final message."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: api_pb2.Finished | None = None
    reconnects: int = 0  # times the stream broke (its router was lost) and went on from a new call
    seed: int | None = None  # the sampling seed the server ran it with


def prompt_request(prompt: str | list[int], raw: bool = False, **fields: object) -> api_pb2.GenerateRequest:
    """Token ids, raw text, or (the default for text) one user message in the chat template."""
    if isinstance(prompt, list):
        return api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=prompt), **fields)
    if raw:
        return api_pb2.GenerateRequest(text=prompt, **fields)
    chat = api_pb2.ChatMessages(messages=[api_pb2.ChatMessage(role="user", content=prompt)])
    return api_pb2.GenerateRequest(chat=chat, **fields)


Metadata = Sequence[tuple[str, str]]
RECONNECTS = 3  # a broken stream is continued this many times at most
RECONNECT_WAIT_S = 0.2  # before the first new call; doubled each time


def connect(address: str, tls: bool = False, ca_file: str | None = None) -> grpc.Channel:
    """A channel to the public API: plain text, or TLS when ``tls`` or ``ca_file`` (a PEM CA
    certificate to trust instead of the system's) is given."""
    if not (tls or ca_file):
        return grpc.insecure_channel(address)
    root = Path(ca_file).read_bytes() if ca_file else None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root))


def bearer(token: str | None) -> Metadata:
    """The metadata that carries an API token (none without one)."""
    return [("authorization", f"Bearer {token}")] if token else []


def stream(
    channel: grpc.Channel, request: api_pb2.GenerateRequest, timeout: float | None = None, metadata: Metadata = ()
) -> Iterator:
    """The raw response stream (``GenerateResponse`` messages)."""
    return api_pb2_grpc.TandemStub(channel).Generate(request, timeout=timeout, metadata=metadata)


def generate(
    channel: grpc.Channel,
    request: api_pb2.GenerateRequest,
    timeout: float | None = None,
    on_delta: Callable[[api_pb2.Delta], None] | None = None,
    metadata: Metadata = (),
    reconnects: int = RECONNECTS,
) -> Output:
    """Run a stream to its end; raises ``grpc.RpcError`` with the server's status.

    A stream that breaks with UNAVAILABLE (its router replica was lost, or is shutting down) is
    continued, up to ``reconnects`` times, by a new call on the same channel, which gRPC connects
    to a live replica: the same request and seed, with the tokens received so far as
    ``continue_token_ids``. The server streams only what follows them."""
    out = Output()
    deadline = None if timeout is None else time.monotonic() + timeout
    seed = request.params.seed if request.params.HasField("seed") else None
    done = list(request.continue_token_ids)
    for attempt in itertools.count():
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            for response in stream(channel, _continued(request, done + out.token_ids, seed), left, metadata):
                seed = out.seed = response.seed
                if response.HasField("delta"):
                    out.token_ids.extend(response.delta.token_ids)
                    out.text += response.delta.text
                    if on_delta is not None:
                        on_delta(response.delta)
                else:
                    out.finished = response.finished
            return out
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= reconnects:
                raise
            out.reconnects += 1
            time.sleep(RECONNECT_WAIT_S * 2**attempt)


def _continued(request: api_pb2.GenerateRequest, received: list[int], seed: int | None) -> api_pb2.GenerateRequest:
    """``request`` going on after ``received`` output tokens, with the seed it ran with."""
    if not received and seed is None:
        return request
    again = api_pb2.GenerateRequest()
    again.CopyFrom(request)
    if seed is not None:
        again.params.seed = seed
    again.ClearField("continue_token_ids")
    again.continue_token_ids.extend(received)
    return again
