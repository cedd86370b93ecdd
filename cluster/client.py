"""A small synchronous client of the public API (``tandem client``, tests, the benchmark)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from tandem_proto.v1 import api_pb2, api_pb2_grpc


@dataclass
class Output:
    """A finished stream: its token ids and text, and the final message."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: api_pb2.Finished | None = None


def prompt_request(prompt: str | list[int], raw: bool = False, **fields: object) -> api_pb2.GenerateRequest:
    """Token ids, raw text, or (the default for text) one user message in the chat template."""
    if isinstance(prompt, list):
        return api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=prompt), **fields)
    if raw:
        return api_pb2.GenerateRequest(text=prompt, **fields)
    chat = api_pb2.ChatMessages(messages=[api_pb2.ChatMessage(role="user", content=prompt)])
    return api_pb2.GenerateRequest(chat=chat, **fields)


def stream(channel: grpc.Channel, request: api_pb2.GenerateRequest, timeout: float | None = None) -> Iterator:
    """The raw response stream (``GenerateResponse`` messages)."""
    return api_pb2_grpc.TandemStub(channel).Generate(request, timeout=timeout)


def generate(
    channel: grpc.Channel,
    request: api_pb2.GenerateRequest,
    timeout: float | None = None,
    on_delta: Callable[[api_pb2.Delta], None] | None = None,
) -> Output:
    """Run a stream to its end; raises ``grpc.RpcError`` with the server's status."""
    out = Output()
    for response in stream(channel, request, timeout):
        if response.HasField("delta"):
            out.token_ids.extend(response.delta.token_ids)
            out.text += response.delta.text
            if on_delta is not None:
                on_delta(response.delta)
        else:
            out.finished = response.finished
    return out
