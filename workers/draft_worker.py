"""The draft pool's replica: a drafter with per-session state, drafting for many sessions at once.

Per session, its target replica streams the tokens accepted since the last drafted round and gets
back a token tree rooted at the new anchor (workers/draft_stream.py); it pushes the features of
those tokens here too (``Features``, workers/features.py), and a step waits for them. Requests that
arrive together are proposed in one ``Drafter.propose`` call.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import grpc
import torch

from tandem.devices import field_to_host, resolve_device
from tandem.drafters import make_drafter, trained_folder
from tandem.drafters.base import Drafter, DraftRequest
from tandem.models.catalog import resolve_model_path
from tandem.models.loading import load_embeddings
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree
from tandem_proto.v1 import worker_pb2, worker_pb2_grpc
from workers.batching import Batcher
from workers.features import Inboxes
from workers.server import WorkerServer
from workers.tls import InternalTls
from workers.wire import params_from_proto, tree_to_proto


@dataclass(frozen=True)
class DraftSpec:
    drafter: str
    model: str  # the target: trained drafters borrow its embedding and LM head
    dtype: str
    feature_layers: tuple[int, ...]  # what the target pool computes; the drafter must read exactly these
    batch_wait_s: float
    threads: int
    host: str
    device: str = "cpu"  # "cuda" when the pool asks for a GPU
    tls: InternalTls = InternalTls()  # mutual TLS on its gRPC server


def build_drafter(spec: DraftSpec) -> Drafter:
    torch.set_num_threads(spec.threads)
    if trained_folder(spec.drafter, spec.model) is None:  # no target model needed next to it
        drafter = make_drafter(spec.drafter)
    else:
        from tandem.target import DTYPES

        # The drafter reads only the target's embedding and LM-head rows: nothing else is loaded.
        device = resolve_device(spec.device)
        target = load_embeddings(resolve_model_path(spec.model), DTYPES[spec.dtype], device)
        # Its target runs nothing: the drafter takes the packed kernels itself, where they run.
        drafter = make_drafter(spec.drafter, target=target, model_name=spec.model, exact=True)
    if drafter is None:
        raise ValueError("the draft pool needs a drafter; 'none' means no draft pool")
    if tuple(drafter.feature_layers) != tuple(spec.feature_layers):
        raise ValueError(
            f"drafter {spec.drafter!r} reads target layers {list(drafter.feature_layers)}, "
            f"but the target pool computes {list(spec.feature_layers)}"
        )
    return drafter


class DraftWorker(WorkerServer, worker_pb2_grpc.DraftServicer):
    async def __init__(self, spec: DraftSpec) -> None:
        # One thread: propose and release stay ordered, and the event loop keeps serving.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")
        self.drafter = await asyncio.get_running_loop().run_in_executor(self._thread, build_drafter, spec)
        self._seq_ids = itertools.count()
        self.reads_features = bool(self.drafter.feature_layers)
        self.inboxes = Inboxes()  # per session: the target features not yet handed to the drafter
        # A drafter may have absorbed a request's features before it raised: no call-by-call retry.
        self.batcher: Batcher[DraftRequest, TokenTree] = Batcher(
            self._propose, spec.batch_wait_s, self.live_sessions, isolate=False
        )
        await self.start_server(spec.host, partial(worker_pb2_grpc.add_DraftServicer_to_server, self), spec.tls)

    async def stats(self) -> dict[str, float]:
        held = await asyncio.get_running_loop().run_in_executor(self._thread, self.drafter.held)
        batcher = self.batcher
        return {
            "sessions": self.live_sessions(),
            "batches": batcher.batches,
            "drafter_states": held,
            "feature_inboxes": len(self.inboxes),
            "busy_s": batcher.busy.seconds,
        }

    async def _propose(self, requests: list[DraftRequest]) -> list[TokenTree]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._propose_on_host, requests)

    def _propose_on_host(self, requests: list[DraftRequest]) -> list[TokenTree]:
        """The batch's trees, their draft distributions brought to the host in one transfer."""
        return field_to_host(self.drafter.propose(requests), "draft_probs")

    async def Session(  # noqa: N802 - the gRPC method name
        self, requests: AsyncIterator[worker_pb2.DraftIn], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DraftOut]:
        opening = await self.read_open(requests, context)
        params = params_from_proto(opening.params)
        seq_id, token_ids = next(self._seq_ids), []
        with self.stream_of(opening.session_id, opening.group), self.inboxes.hold(opening.session_id) as inbox:
            try:
                async for message in requests:
                    step = message.step
                    token_ids.extend(step.new_token_ids)
                    # every position before the anchor: pushed by the target replica that verified it
                    features = await inbox.take(len(token_ids) - 1) if self.reads_features else None
                    features, catch_up_s = await self._catch_up(seq_id, token_ids, features, step, params, opening)
                    request = DraftRequest(seq_id, token_ids, step.max_nodes, params, features)
                    tree = await self.batcher.submit(request, opening.group)
                    yield worker_pb2.DraftOut(tree=tree_to_proto(tree), catch_up_seconds=catch_up_s)
            finally:
                inbox.closed = True
                self._thread.submit(self.drafter.release, seq_id)

    async def _catch_up(
        self,
        seq_id: int,
        token_ids: list[int],
        features: torch.Tensor | None,
        step: worker_pb2.DraftStep,
        params: SamplingParams,
        opening: worker_pb2.DraftOpen,
    ) -> tuple[torch.Tensor | None, float]:
        """The step's first ``step.catch_up_rows`` feature rows (the prefill's, and those of the
        rounds not drafted since) taken in first, by a call that drafts nothing; returns the rows
        left for the round and the seconds the catch-up took, which the target replica's gate,
        pricing rounds, leaves out (as the engine's does, tandem/scheduler.py)."""
        backlog = 0 if features is None else min(step.catch_up_rows, len(features))
        if backlog <= 0:
            return features, 0.0
        started = time.perf_counter()
        # the rows are the features of token_ids[-1 - n : -1]: the catch-up's end where the round's begin
        count = len(token_ids) - len(features) + backlog
        await self.batcher.submit(DraftRequest(seq_id, token_ids[:count], 0, params, features[:backlog]), opening.group)
        rest = features[backlog:]
        return (rest if len(rest) else None), time.perf_counter() - started

    async def Features(  # noqa: N802 - the gRPC method name
        self, chunks: AsyncIterator[worker_pb2.FeatureChunk], context: grpc.aio.ServicerContext
    ) -> worker_pb2.FeaturesDone:
        """A target replica's features of one session, kept until its draft steps take them."""
        await self.inboxes.receive(chunks, context)
        return worker_pb2.FeaturesDone()
