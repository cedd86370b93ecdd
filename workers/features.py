"""Target features from the target replica straight to the draft replica (``Draft.Features``).

The features of the tokens a target replica verifies are the bulk of a round's bytes, and the
drafter is the only reader. So the target replica pushes them to the session's draft replica
itself, in chunks under the message cap, beside the draft stream it holds for the session
(workers/draft_stream.py); the router still decides placement, order and what happens when a
replica is lost.

- :class:`FeaturePush` (target side, one per session): rows in position order, queued so that a
  verdict never waits for them; held until the router says where the drafter is
  (``VerifyIn.draft``); a drafter that goes away costs a log line, never the session.
- :class:`FeatureInbox` (draft side, one per session): the rows received and not yet handed to
  the drafter. A draft step waits until its inbox holds every position before its anchor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import ClassVar

import grpc
import numpy as np
import torch

from tandem_proto.v1 import worker_pb2, worker_pb2_grpc
from workers.wire import MAX_MESSAGE_BYTES, raw_bytes, tensor_from_proto, tensor_proto

log = logging.getLogger(__name__)

CHUNK_BYTES = MAX_MESSAGE_BYTES // 16  # a prompt's features in chunks of at most this many bytes


def chunks(
    session_id: str, start: int, parts: torch.Tensor | list[torch.Tensor], max_bytes: int = CHUNK_BYTES
) -> Iterator[worker_pb2.FeatureChunk]:
    """The rows of ``parts`` (features of positions ``start, start + 1, ...``, one tensor or a
    run of them) as messages of at most ``max_bytes`` of tensor data each (at least one row a
    message). The rows are joined as bytes, with numpy: this runs on the replica's event loop,
    and a torch kernel on a thread other than the verifier's would start a second OpenMP pool
    beside the verifier's."""
    parts = [parts] if isinstance(parts, torch.Tensor) else parts
    first = parts[0]
    raw = np.concatenate([raw_bytes(p).reshape(len(p), -1) for p in parts])
    per_chunk = max(1, max_bytes // max(1, raw.shape[1]))
    for row in range(0, len(raw), per_chunk):
        part = raw[row : row + per_chunk]
        features = tensor_proto(part.tobytes(), first.dtype, [len(part), *first.shape[1:]])
        yield worker_pb2.FeatureChunk(session_id=session_id, start=start + row, features=features)


class FeaturePush:
    """One session's features on their way to its draft replica, in position order.

    ``add`` queues the rows of each pass (the whole prompt after a prefill, the anchor and the
    accepted drafts after a round) and returns at once; a task writes them to a ``Features``
    stream. Rows that come before the first :meth:`link` wait for it; after ``link("")`` (the
    session has no drafter now) they are dropped. Rows added with ``send=False`` (the gate left
    the session's next round undrafted: nothing reads them yet) wait for the next rows sent and
    go with them, a link in between included, so a session the gate keeps plain costs one
    message when it is drafted again, not one a round, and none while it never is. A failed
    stream (the draft replica died, or its session ended) drops what follows too: the session
    goes on without that drafter."""

    _writing: ClassVar[set[asyncio.Task]] = set()  # the streams still being written, out of the GC's reach

    def __init__(
        self, session_id: str, channel: Callable[[str], grpc.aio.Channel], chunk_bytes: int | None = None
    ) -> None:
        self.session_id = session_id
        self.position = 0  # the position of the next row
        self._channel, self._chunk_bytes = channel, chunk_bytes or CHUNK_BYTES
        self._waiting: list[tuple[int, torch.Tensor]] = []  # rows not queued yet: (first position, rows)
        self._linked = False  # told where the drafter is, at least once
        self._holding = False  # the last rows were added with send=False: nothing reads them yet
        self._queue: asyncio.Queue[worker_pb2.FeatureChunk | None] | None = None
        self._address: str | None = None

    def add(self, rows: torch.Tensor | None, count: int, send: bool = True) -> None:
        """The features of the next ``count`` positions (``None``: the target computes none);
        ``send=False``: keep them for the next rows sent."""
        if rows is not None and len(rows) and (self._queue is not None or not self._linked):
            self._waiting.append((self.position, rows))
        self.position += count
        self._holding = not send
        if send:
            self._send()

    def link(self, address: str) -> None:
        """Send to the draft replica at ``address`` from now on, what was held first; ``""``:
        the session has no drafter (any more)."""
        if address == self._address:
            return
        self.close()
        self._address, self._linked = address, True
        if not address:
            self._waiting = []
            return
        queue = self._queue = asyncio.Queue()
        task = asyncio.create_task(self._write(address, queue))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
        if not self._holding:
            self._send()

    def _send(self) -> None:
        """Queue the waiting rows: each run of consecutive positions in chunks under the cap."""
        if self._queue is None or not self._waiting:
            return
        runs: list[tuple[int, list[torch.Tensor]]] = []  # (first position, parts)
        end = None  # the position after the last run
        for start, rows in self._waiting:
            if start == end:
                runs[-1][1].append(rows)
            else:
                runs.append((start, [rows]))
            end = start + len(rows)
        self._waiting = []
        for start, parts in runs:
            for chunk in chunks(self.session_id, start, parts, self._chunk_bytes):
                self._queue.put_nowait(chunk)

    def close(self) -> None:
        """End the stream once what is queued is written (idempotent)."""
        if self._queue is not None:
            self._queue.put_nowait(None)
            self._queue = None

    async def _write(self, address: str, queue: asyncio.Queue) -> None:
        """The stream opens with the first chunk: a target that computes no features opens none."""
        chunk = await queue.get()
        if chunk is None:
            return
        call = worker_pb2_grpc.DraftStub(self._channel(address)).Features()
        try:
            while chunk is not None:
                await call.write(chunk)
                chunk = await queue.get()
            await call.done_writing()
            await call
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.info("session %s: features to %s stopped (%s)", self.session_id, address, exc)
            call.cancel()
        except asyncio.CancelledError:
            call.cancel()
            raise


class FeatureInbox:
    """A session's features on the draft replica: the rows ``[low, end)`` not yet handed over.

    Rows for positions already handed over are dropped; a chunk that starts past ``end`` (rows
    lost with a target replica) restarts the run there, and one that starts before ``end`` (a
    round replayed on another replica) replaces the rows from its start, so the inbox always
    holds one run of positions, the latest sent for each."""

    def __init__(self) -> None:
        self.low = self.end = 0
        self.closed = False  # the draft stream ended: rows that still come are dropped
        self._rows: list[torch.Tensor] = []
        self._arrived = asyncio.Event()

    def put(self, start: int, rows: torch.Tensor) -> None:
        if self.closed:
            return
        if start < self.low:
            rows, start = rows[self.low - start :], self.low
        if not len(rows):
            return
        if start > self.end:
            self._rows, self.low = [], start
        elif start < self.end:
            self._rows = [torch.cat(self._rows)[: start - self.low]] if self._rows else []
        self._rows.append(rows)
        self.end = start + len(rows)
        self._arrived.set()

    async def take(self, until: int) -> torch.Tensor | None:
        """The rows of positions up to ``until`` (exclusive) not handed over yet, once they have
        all come (``None``: none); rows past ``until`` are stale (a later round will send them
        again) and are dropped."""
        while self.end < until:
            self._arrived.clear()
            await self._arrived.wait()
        rows = torch.cat(self._rows)[: until - self.low] if self._rows and until > self.low else None
        self._rows, self.low, self.end = [], max(self.low, until), max(self.low, until)
        return rows


class Inboxes:
    """The draft replica's inboxes by session id, each kept while its draft stream or a target
    replica's feature stream holds it."""

    def __init__(self) -> None:
        self._boxes: dict[str, tuple[FeatureInbox, int]] = {}

    @contextlib.contextmanager
    def hold(self, session_id: str) -> Iterator[FeatureInbox]:
        """The session's inbox; a new one where its draft stream has ended (the session goes on
        from another target replica, which opens a draft stream of its own)."""
        inbox, holders = self._boxes.get(session_id, (None, 0))
        if inbox is None or inbox.closed:
            inbox = FeatureInbox()
        self._boxes[session_id] = (inbox, holders + 1)
        try:
            yield inbox
        finally:
            current, holders = self._boxes[session_id]
            if holders == 1:
                del self._boxes[session_id]
            else:
                self._boxes[session_id] = (current, holders - 1)

    def __len__(self) -> int:
        return len(self._boxes)

    async def receive(self, stream: AsyncIterator[worker_pb2.FeatureChunk], context: grpc.aio.ServicerContext) -> None:
        """A ``Features`` stream (one session's rows from one target replica) into the session's
        inbox, until it ends or the session's draft stream has (nothing reads the rows then)."""
        first = await anext(stream, None)
        if first is None:
            return
        with self.hold(first.session_id) as inbox:
            chunk = first
            while chunk is not None and not inbox.closed:
                if chunk.session_id != first.session_id:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a feature stream carries one session")
                inbox.put(chunk.start, tensor_from_proto(chunk.features))
                chunk = await anext(stream, None)
