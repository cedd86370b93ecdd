"""One generation request in the cluster: its places on both pools and its decoding rounds.

Serve places the session (one long-lived streaming handle call per pool); the rounds run over a
bidirectional gRPC stream to the chosen target replica, which the router tells where the drafter
is: the replica asks the draft replica for each drafted round's tree itself, and the router sends
the first round and reads every verdict. The per-sequence logic (stops, lengths) is
:class:`tandem.sequence.SequenceState`, the very code the in-process engine runs, so both emit the
same tokens. A drafter that fails or goes silent is dropped and the session goes on target-only:
the same tokens under greedy decoding, the same distribution under sampling.

A target replica lost mid-stream (process, tp rank or node gone) costs the client nothing: the
session is placed again (on another replica or the restarted one), prefills everything up to its
anchor, and replays the round in flight. The target's draws depend only on (seed, position)
(:func:`tandem.sampling.round_seed`), so the stream goes on exactly as it would have.

A router lost mid-stream takes its sessions with it; the client opens a new one elsewhere with the
tokens it received (``continued``). That session prefills up to its last token and drafts from
there, so its first round has the anchor and the draws the lost one's next round would have had.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import grpc

from cluster.metrics import Metrics
from cluster.prefix_routing import prefix_hashes
from tandem.sampling import SamplingParams
from tandem.sequence import SequenceState
from tandem.tree import chain
from tandem_proto.v1 import worker_pb2, worker_pb2_grpc
from workers.wire import params_to_proto, step_from_proto, tree_to_proto

log = logging.getLogger(__name__)

# A target stream that ended with one of these lost its replica (or the replica lost a tp rank);
# a refusal of the request itself (INVALID_ARGUMENT, ...) is the client's to see.
LOST = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
}
RETRY_S = 0.5  # between attempts to place a session whose replica was lost


@dataclass
class Pools:
    """What every session shares: the pools' Serve handles and the router's settings."""

    target: object  # serve.handle.DeploymentHandle
    draft: object | None
    channel: Callable[[str], grpc.aio.Channel]  # one cached channel per replica address
    eos_token_ids: tuple[int, ...]
    decode: Callable[[list[int]], str] | None
    max_draft_nodes: int
    draft_timeout_s: float
    resume_timeout_s: float  # how long a session whose target replica was lost looks for another
    metrics: Metrics
    prefix_block_size: int | None = None  # the target's KV block size, where placement follows prefixes


class Link:
    """A session's place on one pool: the Serve call holding it and, with a ``stub``, the gRPC
    stream to the replica (the draft replica's stream is its target replica's to hold)."""

    def __init__(self, pool: str, handle: object, stub: type | None, pools: Pools) -> None:
        self._handle, self._stub, self._channel = handle, stub, pools.channel
        self._running = pools.metrics.running.labels(pool)
        self._waiting = pools.metrics.waiting.labels(pool)
        self._placement = None
        self._call = None
        self._placed = False
        self.address: str | None = None  # the replica's, once placed

    async def place(self, session_id: str, prefix: Sequence[int] = ()) -> None:
        """Wait for a replica (Serve queues the call while every replica is full), then connect;
        ``prefix``: the prompt's block hashes, for the target's prefix-aware request router."""
        from ray.serve.exceptions import RequestCancelledError

        hint = {"prefix": list(prefix)} if prefix else {}
        self._placement = self._handle.options(stream=True).session.remote(session_id, **hint)
        with self._waiting.track_inprogress():
            try:
                address = await self._placement.__anext__()
            except RequestCancelledError:  # close() while it waited: a cancellation, not a failure to report
                raise asyncio.CancelledError from None
        self._placed = True
        self._running.inc()
        self.address = address
        if self._stub is not None:
            self._call = self._stub(self._channel(address)).Session()

    async def send(self, message: object) -> None:
        await self._call.write(message)

    async def ask(self, message: object) -> object:
        try:
            await self._call.write(message)
        except asyncio.InvalidStateError as exc:  # the stream had already ended: its replica died or refused
            raise ConnectionError(f"the worker's stream ended ({(await self._call.code()).name})") from exc
        return await self.next()

    async def next(self) -> object:
        """The replica's next reply, unasked (it runs the round itself)."""
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise ConnectionError("the worker closed the session's stream")
        return reply

    def close(self) -> None:
        """Ends both the stream and the Serve call: the replica frees the session's state."""
        if self._call is not None:
            self._call.cancel()
        if self._placement is not None:
            self._placement.cancel()
        if self._placed:
            self._placed = False
            self._running.dec()


class Session:
    def __init__(
        self,
        pools: Pools,
        session_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        use_drafter: bool,
        continued: list[int] | None = None,
        group: int = 0,
    ) -> None:
        self.pools = pools
        self.session_id = session_id
        self.prompt_ids = prompt_ids
        self.continued = continued or []  # output a lost router's stream already delivered
        self.group = group  # its pipeline group: both pools batch it with its group's sessions
        self.params = params  # seed resolved: the target and the drafter share it
        self.state: SequenceState | None = None
        self.drafter_lost = False
        self.target_resumes = 0
        self._target: Link | None = None
        self._draft_link = Link("draft", pools.draft, None, pools) if use_drafter else None
        self._draft: Link | None = None  # the draft link once placed
        self._told: tuple[Link, str] | None = None  # the target link last told where the drafter is, and what
        self._placing: asyncio.Task | None = None
        self._aborted = False
        self._closed = False
        self._holds_row = False
        self._kv_blocks = 0.0  # its row's share of the replica's blocks, as the last verdict said

    def abort(self) -> None:
        """Stop after the round in flight; the stream ends with finish reason "abort"."""
        self._aborted = True

    def close(self) -> None:
        """Free the session's state on both pools (idempotent)."""
        self._closed = True
        if self._placing is not None:
            self._placing.cancel()
        if self._holds_row:
            self._holds_row = False
            self.pools.metrics.kv_rows.dec()
        self._hold_blocks(0.0)
        for link in (self._target, self._draft_link):
            if link is not None:
                link.close()

    async def run(self) -> AsyncIterator[tuple[list[int], str | None]]:
        """The new tokens after each target pass, with the finish reason on the last."""
        pools = self.pools
        try:
            reply = await self._connect_target()
            self._holds_row = True
            pools.metrics.kv_rows.inc()
            self._hold_blocks(reply.kv_blocks)
            state = self.state = SequenceState.start(
                0, self.prompt_ids, self.params, pools.eos_token_ids, reply.capacity, pools.decode, self.continued
            )
            step = step_from_proto(reply)
            if self.continued:  # the anchor is the client's last token: the prefill's is dropped
                state.advance(replace(step, tokens=[]))
            else:
                yield state.advance(step), state.finish_reason
            if self._placing is not None and state.finish_reason is None:
                await self._placing
            last_verdict = time.perf_counter()
            while state.finish_reason is None:
                if self._aborted:
                    state.finish_reason = "abort"
                    yield [], state.finish_reason
                    return
                asked = time.perf_counter()
                # the replica runs the round itself (drafted or not) unless it waits for one
                reply = await self._verify(ran=reply.continues)
                self._hold_blocks(reply.kv_blocks)
                verified = time.perf_counter()
                if reply.drafter_lost:
                    self._lose_drafter(ConnectionError("the target replica lost it"))
                draft_s = reply.draft_seconds if reply.HasField("draft_seconds") else None
                state.record_round(reply.drafted, reply.accepted)
                # Router time: the consumer's since the last verdict.
                verify_s = verified - asked - (draft_s or 0.0)
                pools.metrics.record_round(reply.drafted, reply.accepted, draft_s, verify_s, asked - last_verdict)
                last_verdict = verified
                yield state.advance(step_from_proto(reply)), state.finish_reason
        finally:
            self.close()

    def _hold_blocks(self, blocks: float) -> None:
        self.pools.metrics.kv_blocks.inc(blocks - self._kv_blocks)
        self._kv_blocks = blocks

    async def _verify(self, ran: bool) -> worker_pb2.VerifyOut:
        """The target's next verdict: of the round it runs itself (``ran``), or of the round sent
        to it now, the bare anchor, which it drafts as its gate decides. A lost replica is
        replaced and the round replayed."""
        while True:
            try:
                if ran:
                    return await self._target.next()
                await self._tell_target_of_drafter()
                anchor = chain(self.state.token_ids[-1], [])
                return await self._target.ask(worker_pb2.VerifyIn(tree=tree_to_proto(anchor)))
            except Exception as exc:
                if self._closed or not _lost(exc):
                    raise
                self.target_resumes += 1
                self.pools.metrics.resumes.inc()
                log.warning("session %s: target replica lost (%s); resuming on another", self.session_id, exc)
                await self._connect_target()
                ran = False  # a new replica runs no round before it is sent one

    async def _connect_target(self) -> worker_pb2.VerifyOut:
        """Place the session on a target replica and open it there: with its prompt, or (resuming)
        with its tokens up to the anchor. A lost replica is retried until ``resume_timeout_s``."""
        deadline = time.monotonic() + self.pools.resume_timeout_s
        while True:
            if self._target is not None:
                self._target.close()
            self._target = Link("target", self.pools.target, worker_pb2_grpc.VerifyStub, self.pools)
            try:
                opening, size = self._opening(), self.pools.prefix_block_size
                await self._target.place(self.session_id, prefix_hashes(opening.prompt_ids, size) if size else ())
                if self._draft_link is not None and self._placing is None:  # placed while the target prefills
                    self._placing = asyncio.create_task(self._open_draft(self._draft_link))
                return await self._target.ask(worker_pb2.VerifyIn(open=opening))
            except Exception as exc:
                resuming = self.state is not None
                if self._closed or not _lost(exc, resuming) or time.monotonic() > deadline:
                    raise
                log.info("session %s: no target replica yet (%s); retrying", self.session_id, exc)
            await asyncio.sleep(RETRY_S)

    async def _tell_target_of_drafter(self) -> None:
        """Tell the target replica where the session's drafter is, whenever that changes (placed,
        lost, or a new target replica): it asks that replica for its trees and sends it the
        features of what it verifies (those of the prefill it holds until then), or drafts no
        more. A replica lost meanwhile shows at the next verification, which resumes and tells
        the new one."""
        if self._draft_link is None or (self._placing is not None and not self._placing.done()):
            return
        told = (self._target, self._draft.address if self._draft is not None else "")
        if self._told != told:
            with contextlib.suppress(ConnectionError, asyncio.InvalidStateError, grpc.aio.AioRpcError):
                await self._target.send(worker_pb2.VerifyIn(draft=worker_pb2.DraftLink(address=told[1])))
                self._told = told

    def _opening(self) -> worker_pb2.VerifyOpen:
        state, features = self.state, self._draft_link is not None
        if state is None:  # continuing: all but the client's last token, which anchors the first round
            context = self.prompt_ids + self.continued
            prompt_ids, resume, generated = context[:-1] if self.continued else context, False, len(self.continued)
        else:  # everything but the anchor, which heads the round being replayed
            prompt_ids, resume, generated = state.token_ids[:-1], True, len(state.output)
        params = params_to_proto(self.params)
        return worker_pb2.VerifyOpen(
            session_id=self.session_id,
            prompt_ids=prompt_ids,
            params=params,
            want_features=features,
            resume=resume,
            group=self.group,
            plain=self._draft_link is None,
            max_draft_nodes=self.pools.max_draft_nodes,
            draft_timeout_s=self.pools.draft_timeout_s,
            generated=generated,
        )

    async def _open_draft(self, draft: Link) -> None:
        """Place the session on a draft replica (its stream is the target replica's to open)."""
        try:
            await asyncio.wait_for(draft.place(self.session_id), self.pools.draft_timeout_s)
            self._draft = draft
        except Exception as exc:  # any failure to place: decode without a drafter
            draft.close()
            self._lose_drafter(exc)

    def _lose_drafter(self, exc: BaseException) -> None:
        log.warning("session %s: drafter lost (%s); going on target-only", self.session_id, exc)
        self.drafter_lost = True
        if self._draft is not None:
            self._draft.close()
            self._draft = None


def _lost(exc: BaseException, resuming: bool = True) -> bool:
    """Whether ``exc`` says the target replica went away (worth placing the session again) rather
    than that the request is bad. A live session also waits out a full pool; a new one is refused."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, (ConnectionError, RayActorError)):
        return True
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in LOST or (resuming and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    return resuming and isinstance(exc, BackPressureError)
