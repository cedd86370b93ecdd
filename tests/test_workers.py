"""The workers without Ray: a target replica's gRPC Verify service batches sessions into shared
passes and refuses a session when every KV row is taken; a draft replica proposes what its
drafter proposes. (Serve constructs replicas the same way: ``__new__`` then ``await __init__``.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch

from tandem.drafters import DraftRequest, NgramDrafter, make_drafter, new_draft_model
from tandem.drafters.neural import DraftConfig
from tandem.engine import Engine, Request
from tandem.models.exact import apply_exact
from tandem.models.loading import load_model
from tandem.profile import profile_path
from tandem.sampling import SamplingParams
from tandem.scheduler import PassCost
from tandem.tree import chain
from tandem.verifier import Verifier
from tandem_proto.v1 import worker_pb2, worker_pb2_grpc
from tests.cluster_helpers import (
    PROMPTS,
    one_torch_thread,  # noqa: F401 - autouse
    tiny_target,
)
from workers import features as features_module
from workers.batching import Batcher, BusyClock
from workers.draft_worker import DraftSpec, DraftWorker
from workers.target_worker import TargetSpec, TargetWorker
from workers.tp import ShardSpec
from workers.wire import params_from_proto, params_to_proto, tree_from_proto, tree_to_proto

PARAMS = params_to_proto(SamplingParams(max_tokens=16, seed=0))
# Two tokens: the prefill's and one round's, so the replica runs no round of its own and every
# round after the first is the test's to send.
SENT_ROUNDS = params_to_proto(SamplingParams(max_tokens=2, seed=0))


@contextlib.asynccontextmanager
async def _replica(cls: type, spec: object) -> AsyncIterator[object]:
    replica = object.__new__(cls)
    await cls.__init__(replica, spec)
    try:
        yield replica
    finally:  # a grpc.aio server left running past asyncio.run corrupts the interpreter's state
        await replica._server.stop(None)


async def _open_verify(
    address: str, index: int, params: worker_pb2.SamplingParams = SENT_ROUNDS
) -> tuple[grpc.aio.StreamStreamCall, worker_pb2.VerifyOut]:
    call = worker_pb2_grpc.VerifyStub(grpc.aio.insecure_channel(address)).Session()
    opening = worker_pb2.VerifyOpen(session_id=f"s{index}", prompt_ids=PROMPTS[index], params=params)
    await call.write(worker_pb2.VerifyIn(open=opening))
    return call, await call.read()


def test_target_worker_batches_sessions_and_refuses_when_full(tmp_path: Path) -> None:
    model = str(tiny_target(tmp_path / "tiny"))
    shard = ShardSpec(model, "float32", rows=2, max_model_len=64, feature_layers=(), threads=1)

    async def scenario() -> None:
        async with _replica(TargetWorker, TargetSpec(shard, 1, 1.0, 0.0, 0.05, "127.0.0.1", False)) as worker:
            await _two_sessions_then_a_third(worker)

    asyncio.run(scenario())


async def _two_sessions_then_a_third(worker: TargetWorker) -> None:
    (first, step0), (second, step1) = await asyncio.gather(*[_open_verify(worker.address, i) for i in (0, 1)])
    assert step0.capacity == 64 and step0.room == 64 - len(PROMPTS[0]) - 1 and len(step0.tokens) == 1
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await _open_verify(worker.address, 2)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    batches = worker.verifies.batches
    for call, step in ((first, step0), (second, step1)):
        await call.write(worker_pb2.VerifyIn(tree=tree_to_proto(chain(step.tokens[-1], [1, 2]))))
    replies = await asyncio.gather(first.read(), second.read())
    assert worker.verifies.batches == batches + 1  # both trees in one verification pass
    assert all(1 <= len(r.tokens) <= 3 for r in replies)
    first.cancel()
    await second.done_writing()
    await asyncio.sleep(0.2)
    assert worker.live_sessions() == 0
    _, reopened = await _open_verify(worker.address, 2)  # the rows came back
    assert len(reopened.tokens) == 1


def test_a_session_that_cannot_grow_is_preempted_and_the_others_go_on(tmp_path: Path) -> None:
    """The paged cache holds 5 blocks of 4 tokens for 4 rows: sessions get in by their prompts'
    blocks; one whose round needs a block no longer free ends ABORTED (its router resumes it),
    the other goes on, and the freed blocks admit a new session."""
    model = str(tiny_target(tmp_path / "tiny"))
    shard = ShardSpec(
        model, "float32", rows=4, max_model_len=64, feature_layers=(), threads=1, kv_blocks=5, block_size=4
    )

    async def round_of(call: grpc.aio.StreamStreamCall, anchor: int) -> worker_pb2.VerifyOut:
        await call.write(worker_pb2.VerifyIn(tree=tree_to_proto(chain(anchor, [1, 2, 3]))))
        return await call.read()

    async def scenario() -> None:
        async with _replica(TargetWorker, TargetSpec(shard, 1, 1.0, 0.0, 0.0, "127.0.0.1", False)) as worker:
            first, step0 = await _open_verify(worker.address, 0)  # 10 tokens: 3 blocks
            second, step1 = await _open_verify(worker.address, 1)  # 3 tokens: 1 block
            assert (step0.kv_blocks, step1.kv_blocks) == (3.0, 1.0)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await _open_verify(worker.address, 2)  # 10 tokens: 3 blocks, 1 free
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "more blocks" in full.value.details()
            step1 = await round_of(second, step1.tokens[-1])  # 3 + 4 tokens: the last free block
            assert step1.kv_blocks == 2.0
            with pytest.raises(grpc.aio.AioRpcError) as preempted:
                await round_of(first, step0.tokens[-1])  # 10 + 4 tokens: a 4th block
            assert preempted.value.code() == grpc.StatusCode.ABORTED and "preempted" in preempted.value.details()
            step1 = await round_of(second, step1.tokens[-1])
            assert len(step1.tokens) >= 1
            third, step2 = await _open_verify(worker.address, 2)  # the preempted session's blocks came back
            assert len(step2.tokens) == 1
            for call in (second, third):
                call.cancel()

    asyncio.run(scenario())


@pytest.mark.parametrize("schedule", [False, True])
def test_target_worker_schedules_the_trees_it_batches(tmp_path: Path, monkeypatch, schedule: bool) -> None:
    """The target's own greedy continuation, drafted with low predicted survival, on a machine
    whose profile prices every draft token at a whole pass: the scheduler verifies none of it,
    and its gate leaves the next round undrafted: the replica runs it itself, the bare anchor."""
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    model = str(tiny_target(tmp_path / "tiny"))
    target = load_model(model, torch.float32)[0]
    apply_exact(target)  # as the worker's shard does (auto): the profile is keyed by the kernels
    path = profile_path(model, torch.float32, kernels=target.kernels)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pass_seconds": PassCost((1,), (1, 4), ((1.0, 4.0),)).to_json()}))
    greedy = Engine(target).generate([Request(PROMPTS[0], SamplingParams(max_tokens=4))])[0].token_ids
    shard = ShardSpec(model, "float32", rows=2, max_model_len=64, feature_layers=(), threads=1)
    params = params_to_proto(SamplingParams(max_tokens=4, seed=0))

    async def scenario() -> list[int]:
        async with _replica(TargetWorker, TargetSpec(shard, 1, 1.0, 0.0, 0.0, "127.0.0.1", schedule)) as worker:
            call, step = await _open_verify(worker.address, 0, params)
            assert list(step.tokens) == greedy[:1]
            assert not step.skip_draft  # nothing known yet: draft
            tree = chain(greedy[0], greedy[1:3], survival=[0.5, 0.25])
            if schedule:  # an earlier round paid the drafter's set-up (its first is no sample)
                worker.gate.draft_cost.observe(1, 5.0)
            await call.write(worker_pb2.VerifyIn(tree=tree_to_proto(tree), draft_seconds=0.5))
            reply = await call.read()
            # The gate: that offer, drafted in half a pass, never pays for itself here, so the
            # replica runs the next round itself, the bare anchor (unscheduled, the whole tree
            # was verified: max_tokens is reached, and the next round is the router's again).
            assert reply.skip_draft == reply.continues == schedule
            assert reply.drafted == 2 and reply.draft_seconds == 0.5  # the tree as sent
            if schedule:
                unasked = await asyncio.wait_for(call.read(), 30)
                assert list(unasked.tokens) == greedy[2:3] and unasked.accepted == unasked.drafted == 0
            # A session opened now is judged by that offer from its first round on.
            second, step = await _open_verify(worker.address, 1, params)
            assert step.skip_draft == schedule
            for c in (call, second):
                c.cancel()
            return list(reply.tokens)

    assert asyncio.run(scenario()) == (greedy[1:2] if schedule else greedy[1:4])


def test_a_session_without_drafter_runs_its_plain_rounds_on_the_target_replica(tmp_path: Path) -> None:
    """After the first round (the router's: its anchor need not be the prefill's token), a plain
    session's rounds run on the replica by themselves, until its max_tokens; the tokens are
    plain decoding's, and a message the router sends meanwhile waits for the next tree."""
    model = str(tiny_target(tmp_path / "tiny"))
    target = load_model(model, torch.float32)[0]
    apply_exact(target)  # as the worker's shard does
    greedy = Engine(target).generate([Request(PROMPTS[0], SamplingParams(max_tokens=5))])[0].token_ids
    shard = ShardSpec(model, "float32", rows=2, max_model_len=64, feature_layers=(), threads=1)
    params = params_to_proto(SamplingParams(max_tokens=5, seed=0))

    async def scenario() -> None:
        async with _replica(TargetWorker, TargetSpec(shard, 1, 1.0, 0.0, 0.0, "127.0.0.1", False)) as worker:
            call = worker_pb2_grpc.VerifyStub(grpc.aio.insecure_channel(worker.address)).Session()
            opening = worker_pb2.VerifyOpen(session_id="p", prompt_ids=PROMPTS[0], params=params, plain=True)
            await call.write(worker_pb2.VerifyIn(open=opening))
            step = await call.read()
            assert list(step.tokens) == greedy[:1] and not step.continues
            await call.write(worker_pb2.VerifyIn(tree=tree_to_proto(chain(greedy[0], []))))
            tokens = []
            for _ in range(4):  # one asked, three run by the replica
                step = await asyncio.wait_for(call.read(), 30)
                tokens += step.tokens
                if len(tokens) < 4:
                    assert step.continues
            assert tokens == greedy[1:] and not step.continues  # max_tokens: the router's turn again
            await call.write(worker_pb2.VerifyIn(draft=worker_pb2.DraftLink(address="")))
            await call.write(worker_pb2.VerifyIn(tree=tree_to_proto(chain(greedy[-1], []))))
            step = await asyncio.wait_for(call.read(), 30)  # asked past max_tokens: still answered
            assert len(step.tokens) == 1 and not step.continues
            call.cancel()

    asyncio.run(scenario())


def test_a_long_prefill_in_parts_lets_running_sessions_go_on(tmp_path: Path) -> None:
    """Chunked prefill in the target replica: a 60-token prompt goes in parts of 8, each a call
    of its own, and a running session's verification passes run between them; the new
    session's first token is the one a whole prefill gives."""
    model = str(tiny_target(tmp_path / "tiny"))
    long_prompt = [(7 * i) % 50 + 3 for i in range(60)]
    target = load_model(model, torch.float32)[0]
    apply_exact(target)  # as the worker's shard does
    first = Engine(target, prefill_chunk=None).generate([Request(long_prompt, SamplingParams(max_tokens=1))])
    shard = ShardSpec(model, "float32", rows=2, max_model_len=256, feature_layers=(), threads=1)

    async def scenario() -> tuple[list[str], list[int]]:
        spec = TargetSpec(shard, 1, 1.0, 0.0, 0.0, "127.0.0.1", False, prefill_chunk=8)
        async with _replica(TargetWorker, spec) as worker:
            calls: list[str] = []
            call_ranks = worker.ranks.call

            async def recorded(operation: str, *args: object) -> object:
                calls.append(operation)
                return await call_ranks(operation, *args)

            worker.ranks.call = recorded
            running, step = await _open_verify(worker.address, 0)
            prefilled = asyncio.Event()

            async def keep_verifying() -> None:
                nonlocal step
                while not prefilled.is_set() and step.room > 1:
                    await running.write(worker_pb2.VerifyIn(tree=tree_to_proto(chain(step.tokens[-1], []))))
                    step = await running.read()

            verifying = asyncio.create_task(keep_verifying())
            await asyncio.sleep(0.05)
            long = worker_pb2_grpc.VerifyStub(grpc.aio.insecure_channel(worker.address)).Session()
            opening = worker_pb2.VerifyOpen(session_id="long", prompt_ids=long_prompt, params=PARAMS)
            await long.write(worker_pb2.VerifyIn(open=opening))
            reply = await long.read()
            prefilled.set()
            await verifying
            running.cancel()
            long.cancel()
            return calls, list(reply.tokens)

    calls, tokens = asyncio.run(scenario())
    parts = [i for i, operation in enumerate(calls) if operation == "prefill_part"]
    assert len(parts) == 2 + 8  # the running session's 10-token prompt, then 60 tokens, in parts of 8
    assert "verify" in calls[parts[2] : parts[-1]], calls
    assert tokens == first[0].token_ids


def test_draft_worker_proposes_what_its_drafter_proposes() -> None:
    spec = DraftSpec("ngram", "unused", "float32", (), 0.001, 1, "127.0.0.1")
    history = [3, 4, 5, 6, 3, 4, 5]

    async def scenario() -> None:
        async with _replica(DraftWorker, spec) as worker:
            await _one_step(worker, history)

    asyncio.run(scenario())


async def _one_step(worker: DraftWorker, history: list[int]) -> None:
    call = worker_pb2_grpc.DraftStub(grpc.aio.insecure_channel(worker.address)).Session()
    await call.write(worker_pb2.DraftIn(open=worker_pb2.DraftOpen(session_id="d", params=PARAMS)))
    step = worker_pb2.DraftStep(new_token_ids=history, max_nodes=4)
    await call.write(worker_pb2.DraftIn(step=step))
    tree = tree_from_proto((await call.read()).tree)
    [expected] = NgramDrafter(depth=8).propose([DraftRequest(0, history, 4)])
    assert (tree.tokens, tree.parents) == (expected.tokens, expected.parents)
    call.cancel()


def test_the_target_worker_drafts_from_the_draft_worker_directly(tmp_path: Path, monkeypatch) -> None:
    """A session driven as the router drives it (the prompt, where the drafter is, the first
    anchor, then verdicts only): the target worker asks the draft worker for every round's tree
    and pushes it the features (the prompt's in chunks of 3 rows), never through the "router".
    Each tree equals the one the same drafter drafts in process from the same features, and each
    verdict the in-process verification of that tree, also after the session resumes on a new
    target stream (which opens a new draft stream: the drafter starts again from every feature
    of the prefix); a prefix's features go to the drafter in a call of their own, a catch-up
    that the round's draft time leaves out; the draft worker frees the session's inbox when all
    the streams end."""
    model = str(tiny_target(tmp_path / "tiny"))
    target = load_model(model, torch.float32)[0]
    cfg = DraftConfig.for_target("dspark", target, "tiny", draft_vocab=48, block_size=4)
    torch.manual_seed(0)
    new_draft_model(cfg, target, torch.arange(48)).save(tmp_path / "dspark")
    apply_exact(target)  # as the target worker's shard does
    reference = make_drafter(str(tmp_path / "dspark"), target, model)  # on the same kernels as the draft worker's
    layers = tuple(cfg.feature_layers)
    row_bytes = 4 * target.config.hidden_size * len(layers)
    monkeypatch.setattr(features_module, "CHUNK_BYTES", 3 * row_bytes)
    shard = ShardSpec(model, "float32", rows=1, max_model_len=128, feature_layers=layers, threads=1)
    draft_spec = DraftSpec(str(tmp_path / "dspark"), model, "float32", layers, 0.0, 1, "127.0.0.1")
    prompt = PROMPTS[0] * 4  # features of 40 positions: 14 chunks
    wire_params = params_to_proto(SamplingParams(max_tokens=64, seed=0))
    params = params_from_proto(wire_params)
    verifier = Verifier(target, 2, 128, feature_layers=layers)

    def opening(prompt_ids: list[int], **resumed: object) -> worker_pb2.VerifyIn:
        return worker_pb2.VerifyIn(
            open=worker_pb2.VerifyOpen(
                session_id="s",
                prompt_ids=prompt_ids,
                params=wire_params,
                want_features=True,
                max_draft_nodes=4,
                **resumed,
            )
        )

    async def scenario() -> None:
        target_spec = TargetSpec(shard, 1, 1.0, 0.0, 0.0, "127.0.0.1", False)
        async with _replica(TargetWorker, target_spec) as worker, _replica(DraftWorker, draft_spec) as drafts:
            assert drafts.drafter.model.kernels is not None  # its target is only embeddings: it packs its own
            trees = []  # every tree the draft worker sends, in order
            catch_ups = []  # the feature rows of each call that drafts nothing (a catch-up)
            propose = drafts.batcher.run

            async def recorded(requests: list[DraftRequest]) -> list:
                out = await propose(requests)
                for request, tree in zip(requests, out):
                    trees.extend([tree] if request.max_nodes else [])
                    catch_ups.extend([] if request.max_nodes else [len(request.features)])
                return out

            drafts.batcher.run = recorded
            verify = worker_pb2_grpc.VerifyStub(grpc.aio.insecure_channel(worker.address)).Session()
            await verify.write(opening(prompt))
            step = await verify.read()
            await verify.write(worker_pb2.VerifyIn(draft=worker_pb2.DraftLink(address=drafts.address)))
            await verify.write(worker_pb2.VerifyIn(tree=tree_to_proto(chain(step.tokens[-1], []))))
            row = verifier.open(prompt, params, 0)
            [local] = verifier.prefill_part([row])
            tokens = prompt + list(step.tokens)  # everything up to the anchor
            for _ in range(4):
                step = await asyncio.wait_for(verify.read(), 30)
                tree = trees.pop(0)
                [expected] = reference.propose([DraftRequest(0, tokens, 4, params, local.features)])
                assert (tree.tokens, tree.parents) == (expected.tokens, expected.parents)
                assert step.drafted == len(tree) - 1 == 4 and step.continues and step.draft_seconds > 0
                [local] = verifier.verify([row], [tree])
                assert list(step.tokens) == local.tokens
                tokens += step.tokens
            assert catch_ups == [len(prompt)]  # the prompt's rows, apart from the first round's own
            # The target replica lost (as if just after its last verdict): the session resumes with
            # its tokens up to the anchor, and the drafter, on a new stream, drafts from all of them.
            verify.cancel()
            verify = worker_pb2_grpc.VerifyStub(grpc.aio.insecure_channel(worker.address)).Session()
            await verify.write(opening(tokens[:-1], resume=True, generated=len(tokens) - len(prompt)))
            await verify.read()
            await verify.write(worker_pb2.VerifyIn(draft=worker_pb2.DraftLink(address=drafts.address)))
            await verify.write(worker_pb2.VerifyIn(tree=tree_to_proto(chain(tokens[-1], []))))
            step = await asyncio.wait_for(verify.read(), 30)
            resumed = verifier.open(tokens[:-1], params, 0)
            [prefilled] = verifier.prefill_part([resumed])
            [expected] = reference.propose([DraftRequest(1, tokens, 4, params, prefilled.features)])
            tree = trees[-1]
            assert (tree.tokens, tree.parents) == (expected.tokens, expected.parents)
            [local] = verifier.verify([resumed], [tree])
            assert list(step.tokens) == local.tokens
            assert catch_ups == [len(prompt), len(tokens) - 1]  # the new stream's prefix
            verify.cancel()
            for _ in range(100):
                await asyncio.sleep(0.02)
                if len(drafts.inboxes) == 0 and drafts.live_sessions() == 0:
                    break
            assert len(drafts.inboxes) == drafts.live_sessions() == 0

    asyncio.run(scenario())


def test_one_failing_call_does_not_fail_its_batch() -> None:
    """The batch is retried call by call: only the bad call's caller sees its error."""

    async def run(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("a bad item")
        return [item.upper() for item in items]

    async def scenario() -> list:
        batcher = Batcher(run, 0.5, lambda _: 3)
        results = await asyncio.gather(*(batcher.submit(x) for x in ("a", "bad", "c")), return_exceptions=True)
        assert batcher.batches == 4  # the failed batch, then each call alone
        return results

    first, bad, third = asyncio.run(scenario())
    assert (first, third) == ("A", "C") and isinstance(bad, ValueError)


def test_a_batcher_counts_the_time_its_batches_run() -> None:
    """``busy_s``: the seconds inside ``run`` (failed runs too), not the seconds spent waiting."""

    async def run(items: list[float]) -> list[float]:
        await asyncio.sleep(max(items))
        if 0.0 in items:
            raise ValueError("no")
        return items

    async def scenario() -> float:
        batcher = Batcher(run, 0.0, lambda _: 1, isolate=False)
        await batcher.submit(0.05)
        await asyncio.sleep(1.0)  # idle: not counted
        await batcher.submit(0.05)
        with pytest.raises(ValueError):
            await batcher.submit(0.0)
        return batcher.busy.seconds

    assert 0.1 <= asyncio.run(scenario()) < 0.9


def test_a_shared_busy_clock_counts_overlapping_batches_once() -> None:
    clock = BusyClock()

    async def run(items: list[float]) -> list[float]:
        await asyncio.sleep(items[0])
        return items

    async def scenario() -> None:
        first, second = Batcher(run, 0.0, lambda _: 1, busy=clock), Batcher(run, 0.0, lambda _: 1, busy=clock)
        await asyncio.gather(first.submit(0.3), second.submit(0.3))  # at the same time

    asyncio.run(scenario())
    assert 0.3 <= clock.seconds < 0.55  # one stretch, not two


def test_pipeline_groups_batch_apart_and_wait_only_for_their_own() -> None:
    """Group 0's calls run together without waiting for group 1's sessions; group 1's follow."""
    ran: list[list[str]] = []

    async def run(items: list[str]) -> list[str]:
        ran.append(sorted(items))
        await asyncio.sleep(0.01)
        return items

    async def scenario() -> None:
        live = {0: 2, 1: 2}
        batcher = Batcher(run, 5.0, lambda group: live[group])  # a long window: only full groups start
        calls = [batcher.submit("a0", 0), batcher.submit("b1", 1), batcher.submit("c0", 0)]
        first = asyncio.gather(*calls)
        await asyncio.sleep(0.2)
        assert ran == [["a0", "c0"]]  # group 1 still waits for its second session
        live[1] = 1  # that session ended
        batcher._wake.set()
        await asyncio.wait_for(first, 10)
        assert ran == [["a0", "c0"], ["b1"]]

    asyncio.run(scenario())
