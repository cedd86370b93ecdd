"""The target pool's replica: a tensor-parallel group verifying the token trees of many sessions.

Each session takes a row of the verifier's paged KV cache, with its prompt's blocks, when its
stream opens (RESOURCE_EXHAUSTED when no row or too few blocks are free) and gives them back when
the stream ends, however it ends. A session whose round needs a block the cache no longer has is
preempted (ABORTED): its router resumes it, from the prefix cache where its blocks are still there.

The replica runs a session's rounds itself once the router sent the first: each round, drafted
(its tree asked of the session's draft replica directly, workers/draft_stream.py) where the draft
gate finds it pays, else the bare anchor; the router reads the verdicts. Prefills and
verifications that arrive together run as one batched forward pass each (continuous batching),
through two batchers: a pass that fails is retried call by call, and a prefill never shares a
failure with a verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import grpc

from tandem.calibration import SurvivalCalibration
from tandem.errors import InvalidRequest, NoRoom
from tandem.scheduler import DraftGate, PassCost, schedule
from tandem.sequence import draft_budget
from tandem.tree import TokenTree, chain
from tandem.verifier import Step
from tandem_proto.v1 import worker_pb2, worker_pb2_grpc
from workers.batching import Batcher, BusyClock
from workers.draft_stream import DraftLost, DraftStream
from workers.features import FeaturePush
from workers.server import WorkerServer
from workers.tls import InternalTls
from workers.tp import LocalRanks, Ranks, RanksLost, RayRanks, ShardSpec
from workers.wire import params_from_proto, step_to_proto, tree_from_proto

log = logging.getLogger(__name__)

# A verification: (row, tree, greedy, draft seconds); greedy: the session's target is greedy, which
# frees the scheduler's ranking; draft seconds: what drafting the tree took (None: not drafted).
Job = tuple[int, TokenTree, bool, float | None]
# A verdict: the step, the row's room for drafts, and whether its next round is worth drafting.
Verdict = tuple[Step, int, bool]


@dataclass(frozen=True)
class TargetSpec:
    shard: ShardSpec
    tp: int
    num_cpus: float  # per rank
    num_gpus: float  # per rank
    batch_wait_s: float
    host: str
    schedule: bool = True  # cut the batch's trees to the width that pays (tandem.scheduler)
    prefill_chunk: int | None = 512  # prompt tokens per prefill pass (None: whole prompts)
    tls: InternalTls = InternalTls()  # mutual TLS on its gRPC server


class TargetWorker(WorkerServer, worker_pb2_grpc.VerifyServicer):
    async def __init__(self, spec: TargetSpec) -> None:
        self.ranks: Ranks = (
            LocalRanks(spec.shard) if spec.tp == 1 else RayRanks(spec.shard, spec.tp, spec.num_cpus, spec.num_gpus)
        )
        self.capacity: int = await self.ranks.call("capacity")
        self.prefill_chunk = spec.prefill_chunk
        self.cost: PassCost | None = await self.ranks.call("pass_cost", spec.shard.model) if spec.schedule else None
        self.calibration = SurvivalCalibration()  # per cache row: the scheduler's survival, calibrated
        self.gate = DraftGate(self.cost) if self.cost is not None else None  # per cache row: draft at all?
        self._room: dict[int, int] = {}  # per cache row: draft nodes that fit below its anchor
        self._plain: set[int] = set()  # cache rows of sessions without a drafter: never drafted
        self.busy = BusyClock()  # prefills and verifications queue for the same passes: counted once
        self._tls, self._channels = spec.tls, {}  # to the draft replicas its sessions' features go to
        wait_s, live = spec.batch_wait_s, self.live_sessions
        self.prefills: Batcher[int, tuple[Step, int]] = Batcher(self._prefill, wait_s, live, busy=self.busy)
        self.verifies: Batcher[Job, Verdict] = Batcher(self._verify, wait_s, live, busy=self.busy)
        await self.start_server(spec.host, partial(worker_pb2_grpc.add_VerifyServicer_to_server, self), spec.tls)

    async def stats(self) -> dict[str, float]:
        batches = self.prefills.batches + self.verifies.batches
        rows = await self.ranks.call("rows_in_use")
        return {
            "sessions": self.live_sessions(),
            "batches": batches,
            "busy_s": self.busy.seconds,
            "capacity": self.capacity,
            "rows": rows,
            "calibrated_rows": self.calibration.held(),
        }

    def channel(self, address: str) -> grpc.aio.Channel:
        """One cached channel per draft replica address."""
        if address not in self._channels:
            self._channels[address] = self._tls.channel(address)
        return self._channels[address]

    async def check_health(self) -> None:
        """Serve's periodic probe: a tp group that lost a rank fails it, so Serve replaces the
        replica with a whole new group (its sessions resume on other replicas meanwhile)."""
        await self.ranks.check()

    async def _prefill(self, rows: list[int]) -> list[tuple[Step, int]]:
        """The rows' prompts in parts of ``prefill_chunk`` tokens, each a call of its own, so the
        verification passes of running sessions go between them (chunked prefill): a long prompt
        delays their next tokens by a part, not by its whole prefill. A part that fails leaves
        the parts before it cached, and a retry goes on from there."""
        answers: dict[int, tuple[Step, int]] = {}
        while len(answers) < len(rows):
            pending = [row for row in rows if row not in answers]
            parts = await self.ranks.call("prefill_part", pending, self.prefill_chunk)
            answers.update((row, answer) for row, answer in zip(pending, parts) if answer is not None)
        self._room.update((row, room) for row, (_, room) in answers.items())
        return [answers[row] for row in rows]

    async def _verify(self, jobs: list[Job]) -> list[Verdict]:
        """One pass for the batch's trees, cut by the scheduler; each verdict also says whether
        the gate finds the session's next round worth drafting, at this batch's load, from the
        offers of its earlier trees and what drafting them took."""
        rows, trees = [row for row, *_ in jobs], [tree for _, tree, *_ in jobs]
        if self.cost is None or self.gate is None:
            return [(step, room, True) for step, room in await self.ranks.call("verify", rows, trees)]
        greedy = [g for _, _, g, _ in jobs]
        trees = [self.calibration.apply(row, tree, g) for row, tree, g, _ in jobs]
        waited = [seconds for *_, seconds in jobs if seconds is not None]
        if waited:  # the drafts of a batch come in parallel: the round waited for the slowest
            self.gate.draft_cost.observe(len(waited), max(waited))
        for row, tree, g, seconds in zip(rows, trees, greedy, (s for *_, s in jobs)):
            if seconds is not None:
                self.gate.offered(row, tree, g)
        context = self._longest_prefix(rows)
        # drafting ran elsewhere: only the pass's own cost counts
        trees = schedule(trees, greedy, self.cost, context=context)
        self.gate.kept([tree for tree, (*_, seconds) in zip(trees, jobs) if seconds is not None])
        results = await self.ranks.call("verify", rows, trees)
        for row, tree, (step, _) in zip(rows, trees, results):
            self.calibration.observe(row, tree, step.tokens)
        self._room.update((row, room) for row, (_, room) in zip(rows, results))
        chosen = self.gate.choose(rows, self._draft_rooms(rows), context)
        return [(step, room, i in chosen) for i, (step, room) in enumerate(results)]

    def _drafts_first(self, row: int) -> bool:
        """Whether a session just prefilled into ``row`` should draft its first round: the gate's
        verdict for a sequence without an offer of its own, in a batch of every live row (the
        pipeline groups' rows too: the pass it joins is at most that wide)."""
        if self.gate is None:
            return True
        rows = list(self._room)  # the prefill gave this row its room too
        return self.gate.first_round(row, rows, self._draft_rooms(rows), self._longest_prefix(rows))

    def _draft_rooms(self, rows: list[int]) -> list[int]:
        """The draft nodes each row may take, as the gate sees them: none for a session without
        a drafter, which the gate must never choose."""
        return [0 if row in self._plain else self._room[row] for row in rows]

    def _longest_prefix(self, rows: list[int]) -> int:
        """The longest cached prefix among ``rows``: the context a pass over them prices."""
        return max(self.capacity - self._room.get(row, 0) - 1 for row in rows)

    async def Session(  # noqa: N802 - the gRPC method name
        self, requests: AsyncIterator[worker_pb2.VerifyIn], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.VerifyOut]:
        opening = await self.read_open(requests, context)
        with self.stream_of(opening.session_id, opening.group):
            try:
                params = params_from_proto(opening.params)
                row = await self.ranks.call("open", list(opening.prompt_ids), params, params.seed)
            except InvalidRequest as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except NoRoom as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"target replica is full: {exc}")
            except RanksLost as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            push = FeaturePush(opening.session_id, self.channel) if opening.want_features else None
            drafts: DraftStream | None = None
            if opening.plain:
                self._plain.add(row)
            try:
                step, room = await self.prefills.submit(row, opening.group)
                # Resuming too: the draft replica keeps what it has not taken yet (the lost replica
                # may have died before it sent the last round's) and drops the rest.
                features, skip_draft = step.features, not self._drafts_first(row)
                verified = len(opening.prompt_ids)  # positions the pass added to the row
                # rows the drafter takes in apart, its round not priced with them: the prompt's,
                # and those of rounds not drafted since (tandem/scheduler.py, ScheduledDrafter._catch_up)
                catch_up = verified
                tokens = [*opening.prompt_ids, *step.tokens]  # the row's tokens, then the anchor
                emitted = opening.generated or len(step.tokens)  # the stream's output tokens so far
                # The first round is always the router's: its anchor is not the prefill's token
                # when the session resumes or continues a stream.
                continues, lost, tree, draft_s = False, False, None, None
                while True:
                    if push is not None:  # an undrafted next round reads none: they go with a later round's
                        push.add(features, verified, send=not skip_draft)
                    yield _verdict(step, room, self.capacity, skip_draft, continues, tree, draft_s, lost)
                    lost = False
                    if continues:  # the round the router would send: the bare anchor
                        tree, draft_s = chain(tokens[-1], []), None
                    else:
                        message = await anext(requests, None)
                        while message is not None and message.HasField("draft"):  # where the drafter is
                            drafts, lost = await self._link(opening, message.draft.address, push, drafts)
                            message = await anext(requests, None)
                        if message is None:
                            break
                        tree = tree_from_proto(message.tree)
                        draft_s = message.draft_seconds if message.HasField("draft_seconds") else None
                        tokens[-1] = tree.tokens[0]
                    budget = draft_budget(opening.max_draft_nodes, room, params.max_tokens, emitted)
                    budget = budget if self.gate is None else self.gate.ask(budget)
                    if drafts is not None and len(tree) == 1 and not skip_draft and budget > 0:
                        try:
                            tree, draft_s = await drafts.propose(tokens, budget, catch_up)
                            catch_up = 0
                        except DraftLost as exc:
                            log.warning("session %s: drafter lost (%s); going on plain", opening.session_id, exc)
                            drafts, lost = (await self._link(opening, "", push, drafts))[0], True
                            self._plain.add(row)
                    job: Job = (row, tree, params.greedy, draft_s)
                    step, room, draft = await self.verifies.submit(job, opening.group)
                    features, skip_draft, verified = step.features, not draft, len(step.tokens)
                    catch_up += verified if skip_draft else 0
                    tokens += step.tokens
                    emitted += verified
                    # Every round goes on here, not through the router, while the sequence has room
                    # and tokens left (past max_tokens or a stop the router just ends the stream).
                    continues = room > 0 and emitted < params.max_tokens
            except NoRoom as exc:  # preempted: its blocks go back (its full ones stay cached), and
                # the router resumes it (ABORTED is a lost replica to it) once blocks are free
                await context.abort(grpc.StatusCode.ABORTED, f"session preempted, the KV cache is full: {exc}")
            except RanksLost as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            finally:  # also on cancellation: the row must come back
                if push is not None:
                    push.close()
                if drafts is not None:
                    drafts.close()
                self.calibration.forget(row)
                self._room.pop(row, None)
                self._plain.discard(row)
                if self.gate is not None:
                    self.gate.forget(row)
                with contextlib.suppress(RanksLost):
                    await asyncio.shield(self.ranks.call("close", row))

    async def _link(
        self, opening: worker_pb2.VerifyOpen, address: str, push: FeaturePush | None, drafts: DraftStream | None
    ) -> tuple[DraftStream | None, bool]:
        """The session's drafter from now on: the draft replica at ``address`` (its stream open),
        or none (``""``); and whether one that was asked for is lost (it could not be opened)."""
        if drafts is not None:
            drafts.close()
        if push is not None:
            push.link(address)
        if not address:
            return None, False
        opened = worker_pb2.DraftOpen(session_id=opening.session_id, params=opening.params, group=opening.group)
        drafts = DraftStream(self.channel(address), opened, opening.draft_timeout_s)
        try:
            await drafts.open()
        except DraftLost as exc:
            log.warning("session %s: drafter at %s lost (%s); going on plain", opening.session_id, address, exc)
            return (await self._link(opening, "", push, None))[0], True
        return drafts, False


def _verdict(
    step: Step,
    room: int,
    capacity: int,
    skip_draft: bool,
    continues: bool,
    tree: TokenTree | None,
    draft_s: float | None,
    lost: bool,
) -> worker_pb2.VerifyOut:
    """A round's reply to the router: the step, what the replica does next, how it was drafted."""
    reply = step_to_proto(step, room, capacity)
    reply.skip_draft, reply.continues, reply.drafter_lost = skip_draft, continues, lost
    if tree is not None:
        reply.drafted = len(tree) - 1
    if draft_s is not None:
        reply.draft_seconds = draft_s
    return reply
