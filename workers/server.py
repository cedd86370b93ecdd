"""What both pools' replicas share: their own grpc.aio server (Serve's proxy cannot carry
bidirectional streams), and the Serve streaming call that places a session on the replica.

The router opens :meth:`WorkerServer.session` through a Serve handle; the replica answers with its
gRPC address and holds the call open until the session's gRPC stream ends. So Serve's count of
ongoing requests is the count of live sessions: it drives autoscaling and caps sessions per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from workers.tls import InternalTls
from workers.wire import CHANNEL_OPTIONS

# A placement whose gRPC stream never comes (the router died in between) is given up after this.
CONNECT_TIMEOUT_S = 30.0


@dataclass
class _Placement:
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    group: int = 0  # the session's pipeline group (workers/batching.py)


class WorkerServer:
    address: str
    _server: grpc.aio.Server

    async def start_server(self, host: str, add_servicer: Callable[[grpc.aio.Server], None], tls: InternalTls) -> None:
        """Serve on an ephemeral port of ``host`` (mutual TLS when ``tls`` is on); ``0.0.0.0``
        advertises the node's IP."""
        self._placements: dict[str, _Placement] = {}
        self._server = grpc.aio.server(options=CHANNEL_OPTIONS)
        add_servicer(self._server)
        credentials = tls.server_credentials()
        listen = f"{host}:0"
        port = (
            self._server.add_secure_port(listen, credentials) if credentials else self._server.add_insecure_port(listen)
        )
        await self._server.start()
        if host in ("0.0.0.0", "[::]"):
            import ray

            host = ray.util.get_node_ip_address()
        self.address = f"{host}:{port}"

    async def session(self, session_id: str, prefix: Sequence[int] = ()) -> AsyncIterator[str]:
        """Serve streaming call: this replica's address, then open until the session ends.
        ``prefix``: the prompt's block hashes, read by the target's request router
        (cluster/prefix_routing.py) before the call gets here."""
        placement = self._placements.setdefault(session_id, _Placement())
        try:
            yield self.address
            await asyncio.wait_for(placement.opened.wait(), CONNECT_TIMEOUT_S)
            await placement.closed.wait()
        except asyncio.TimeoutError:
            pass
        finally:
            self._placements.pop(session_id, None)

    @contextlib.contextmanager
    def stream_of(self, session_id: str, group: int = 0) -> Iterator[None]:
        """Bracket a session's gRPC stream: its end also ends the Serve call that placed it."""
        placement = self._placements.setdefault(session_id, _Placement())
        placement.group = group
        placement.opened.set()
        try:
            yield
        finally:
            placement.closed.set()
            self._placements.pop(session_id, None)

    @staticmethod
    async def read_open(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        """A session stream's first message, which must open it (INVALID_ARGUMENT otherwise)."""
        first = await anext(requests, None)
        if first is None or not first.HasField("open"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a session stream starts with an open message")
        return first.open

    def live_sessions(self, group: int | None = None) -> int:
        """Sessions whose stream is open (of one pipeline group, or all)."""
        return sum(p.opened.is_set() and group in (None, p.group) for p in self._placements.values())
