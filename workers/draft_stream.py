"""A session's draft stream, held by its target replica (``Draft.Session``).

The target replica runs a session's rounds, the drafted ones too: for each round its gate drafts,
it sends the session's draft replica the tokens verified since the last drafted round and reads
back the tree (the features of those tokens go beside it, workers/features.py). So a drafted round
costs two messages between the pools and none through the router. A drafter that fails, or stays
silent past the router's timeout, is given up: the session goes on plain, which changes no token.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from tandem.tree import TokenTree
from tandem_proto.v1 import worker_pb2, worker_pb2_grpc
from workers.wire import tree_from_proto

FAILURES = (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.TimeoutError, ConnectionError)


class DraftLost(Exception):
    """The session's drafter failed or went silent; its stream is closed."""


class DraftStream:
    def __init__(self, channel: grpc.aio.Channel, opening: worker_pb2.DraftOpen, timeout_s: float) -> None:
        self._call = worker_pb2_grpc.DraftStub(channel).Session()
        self._opening = opening
        self._timeout_s = timeout_s or None  # 0: no limit
        self._sent = 0  # tokens the drafter has seen

    async def open(self) -> None:
        """Open the session on the draft replica now, which ends Serve's wait for its stream,
        however long the gate leaves the session undrafted."""
        await self._guarded(self._call.write(worker_pb2.DraftIn(open=self._opening)))

    async def propose(self, token_ids: list[int], max_nodes: int, catch_up_rows: int = 0) -> tuple[TokenTree, float]:
        """The drafter's tree for the anchor ``token_ids[-1]`` (every token before it verified),
        and the seconds drafting it took, less the catch-up's: the drafter taking in the first
        ``catch_up_rows`` of the features it is sent (workers/draft_worker.py)."""
        started = time.perf_counter()
        new = token_ids[self._sent :]
        step = worker_pb2.DraftStep(new_token_ids=new, max_nodes=max_nodes, catch_up_rows=catch_up_rows)
        reply = await self._guarded(self._ask(worker_pb2.DraftIn(step=step)))
        self._sent = len(token_ids)
        return tree_from_proto(reply.tree), time.perf_counter() - started - reply.catch_up_seconds

    def close(self) -> None:
        """End the stream: the draft replica frees the session's drafter state."""
        self._call.cancel()

    async def _ask(self, message: worker_pb2.DraftIn) -> worker_pb2.DraftOut:
        await self._call.write(message)
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise ConnectionError("the draft replica ended the session's stream")
        return reply

    async def _guarded(self, call: object) -> object:
        """``call`` within the timeout; any failure closes the stream and raises DraftLost."""
        try:
            return await asyncio.wait_for(call, self._timeout_s)
        except FAILURES as exc:
            self.close()
            raise DraftLost(f"{type(exc).__name__}: {exc}") from exc
