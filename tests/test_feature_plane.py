"""Target features from the target replica straight to the draft replica (workers/features.py):
chunks under the message cap, the draft side's inbox, and the push over a real gRPC stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from tandem_proto.v1 import worker_pb2, worker_pb2_grpc
from workers.features import FeatureInbox, FeaturePush, Inboxes, chunks
from workers.wire import tensor_from_proto


def test_a_long_prompts_features_go_in_chunks_under_the_cap() -> None:
    rows = torch.randn(100, 64)  # 256 bytes a row
    sent = list(chunks("s", 7, rows, max_bytes=1000))
    assert [c.start for c in sent] == list(range(7, 107, 3))  # 3 rows (768 bytes) a chunk
    assert all(len(c.features.data) <= 1000 for c in sent)
    assert torch.equal(torch.cat([tensor_from_proto(c.features) for c in sent]), rows)
    assert len(list(chunks("s", 0, rows, max_bytes=10))) == 100  # a row wider than the cap goes alone
    parts = [torch.randn(n, 8).to(torch.bfloat16) for n in (2, 1, 4)]  # a run of passes, joined as bytes
    joined = list(chunks("s", 3, parts, max_bytes=48))  # 16 bytes a row: 3 rows a chunk
    assert [(c.start, c.features.shape[0]) for c in joined] == [(3, 3), (6, 3), (9, 1)]
    assert torch.equal(torch.cat([tensor_from_proto(c.features) for c in joined]), torch.cat(parts))


def test_the_inbox_hands_over_each_position_once_the_latest_sent() -> None:
    rows = torch.arange(40.0).reshape(20, 2)

    async def scenario() -> None:
        inbox = FeatureInbox()
        inbox.put(0, rows[:5])
        waiting = asyncio.create_task(inbox.take(8))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # positions 5-7 have not come
        inbox.put(5, rows[5:8])
        assert torch.equal(await waiting, rows[:8])
        inbox.put(8, rows[8:12])  # a round whose verdict was lost with its replica...
        inbox.put(8, rows[8:10] + 100)  # ...replayed on another, which accepted less
        assert torch.equal(await inbox.take(10), rows[8:10] + 100)
        inbox.put(9, rows[9:11])  # positions handed over already are not handed over again
        assert torch.equal(await inbox.take(11), rows[10:11])
        inbox.put(11, rows[11:14])
        assert torch.equal(await inbox.take(12), rows[11:12])  # 12-13 are stale: a later round resends them
        assert inbox.end == 12
        inbox.put(15, rows[15:17])  # rows lost: the run restarts where they start again
        assert torch.equal(await inbox.take(17), rows[15:17])
        assert await inbox.take(17) is None
        inbox.closed = True
        inbox.put(17, rows[17:])
        assert inbox.end == 17

    asyncio.run(scenario())


class Receiver(worker_pb2_grpc.DraftServicer):
    """A server with the draft replica's ``Features`` method (DraftWorker's, without a drafter)."""

    def __init__(self) -> None:
        self.inboxes = Inboxes()

    async def Features(self, stream, context):  # noqa: N802 - the gRPC method name
        await self.inboxes.receive(stream, context)
        return worker_pb2.FeaturesDone()


@pytest.fixture
def receiver_scenario():
    """Runs ``scenario(receiver, address, channel)`` against a real grpc.aio server."""

    def run(scenario) -> None:
        async def main() -> None:
            receiver = Receiver()
            server = grpc.aio.server()
            worker_pb2_grpc.add_DraftServicer_to_server(receiver, server)
            address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            await server.start()
            channel = grpc.aio.insecure_channel(address)
            try:
                await scenario(receiver, address, lambda _: channel)
            finally:
                await channel.close()
                await server.stop(None)

        asyncio.run(main())

    return run


def test_pushed_features_arrive_in_order_held_until_the_link(receiver_scenario) -> None:
    prompt, rounds = torch.randn(50, 16), [torch.randn(n, 16) for n in (1, 3, 2)]

    async def scenario(receiver: Receiver, address: str, channel) -> None:
        with receiver.inboxes.hold("s") as inbox:
            push = FeaturePush("s", channel, chunk_bytes=200)  # 3 rows a chunk
            push.add(prompt, len(prompt))  # before the router says where the drafter is: held
            push.add(None, 4)  # a pass whose target computes no features moves the position on
            push.link(address)
            assert torch.equal(await asyncio.wait_for(inbox.take(50), 10), prompt)
            for rows in rounds:
                push.add(rows, len(rows))
            assert torch.equal(await asyncio.wait_for(inbox.take(60), 10), torch.cat(rounds))
            assert push.position == 60
            push.close()
            await asyncio.wait_for(asyncio.gather(*FeaturePush._writing), 10)  # the stream ended cleanly
        assert len(receiver.inboxes) == 0

    receiver_scenario(scenario)


def test_features_of_undrafted_rounds_wait_and_go_as_one_message(receiver_scenario) -> None:
    """Rows added with ``send=False`` (the gate left the next round undrafted) stay on the target
    replica, a link in between too, and go with the next rows sent, joined into one chunk per
    run of positions."""
    prompt, rounds = torch.randn(6, 4), [torch.randn(n, 4) for n in (1, 2, 1)]

    async def scenario(receiver: Receiver, address: str, channel) -> None:
        with receiver.inboxes.hold("s") as inbox:
            push = FeaturePush("s", channel)
            push.add(prompt, 6, send=False)  # the gate leaves the first round undrafted
            push.link(address)  # where the drafter is: what is held stays held
            push.add(rounds[0], 1, send=False)
            assert push._queue.empty() and len(push._waiting) == 2  # nothing written yet
            push.add(None, 3, send=False)  # a gap: the run restarts after it
            push.add(rounds[1], 2, send=False)
            push.add(rounds[2], 1)  # the session is drafted next round: all of it goes now
            queued = [push._queue.get_nowait() for _ in range(push._queue.qsize())]
            assert [(c.start, c.features.shape[0]) for c in queued] == [(0, 7), (10, 3)]
            for chunk in queued:
                push._queue.put_nowait(chunk)
            assert torch.equal(await asyncio.wait_for(inbox.take(7), 10), torch.cat([prompt, rounds[0]]))
            assert torch.equal(await asyncio.wait_for(inbox.take(13), 10), torch.cat(rounds[1:]))
            push.close()
            await asyncio.wait_for(asyncio.gather(*FeaturePush._writing), 10)

    receiver_scenario(scenario)


def test_a_session_without_drafter_drops_its_features_and_a_closed_inbox_ends_the_stream(receiver_scenario) -> None:
    async def scenario(receiver: Receiver, address: str, channel) -> None:
        dropped = FeaturePush("d", channel)
        dropped.add(torch.randn(5, 4), 5)
        dropped.link("")  # the drafter was lost before it was placed
        dropped.add(torch.randn(2, 4), 2)
        assert dropped._waiting == [] and dropped._queue is None and dropped.position == 7

        with receiver.inboxes.hold("s") as inbox:
            push = FeaturePush("s", channel)
            push.link(address)
            push.add(torch.randn(3, 4), 3)
            await asyncio.wait_for(inbox.take(3), 10)
            inbox.closed = True  # the session's draft stream ended
        push.add(torch.randn(1, 4), 1)  # the receiver ends the stream at this chunk...
        push.add(torch.randn(1, 4), 1)
        push.close()
        await asyncio.wait_for(asyncio.gather(*FeaturePush._writing), 10)  # ...and the push stops quietly
        assert len(receiver.inboxes) == 0

    receiver_scenario(scenario)
