"""A mixed, bounded load on the public gRPC API, for the soak test and ``bench/soak.py``.

``streams`` client threads, each on its own connection, run random requests back to back for
``seconds``: random prompts and lengths, some cancelled by the client and some aborted through
``Abort`` partway. Every outcome is kept, so a caller can check each output and count failures.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from cluster.client import prompt_request, stream
from tandem_proto.v1 import api_pb2, api_pb2_grpc

ACTIONS = ("finish", "cancel", "abort")


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    max_tokens: int
    action: str  # finish: read to the end; cancel: drop the stream; abort: Abort it by its id
    cut_after: int  # tokens read before a cancel or abort


@dataclass
class Outcome:
    job: Job
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: grpc.StatusCode | None = None  # the stream's status when it failed (CANCELLED: the client cut it)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """A failure the client did not ask for."""
        return self.error is not None and not (self.job.action == "cancel" and self.error == grpc.StatusCode.CANCELLED)


def random_jobs(
    rng: random.Random, prompts: Sequence[list[int]], max_tokens: int, cut_share: float = 0.2
) -> Callable[[], Job]:
    """Jobs over ``prompts`` with 1..``max_tokens`` tokens; ``cut_share`` of them cancelled or aborted."""
    lock = threading.Lock()

    def next_job() -> Job:
        with lock:  # one rng for all threads: the job sequence depends on the seed alone
            action = ACTIONS[0] if rng.random() >= cut_share else rng.choice(ACTIONS[1:])
            n = rng.randint(1, max_tokens)
            return Job(rng.choice(prompts), n, action, rng.randint(1, n))

    return next_job


def soak(
    address: str,
    next_job: Callable[[], Job],
    streams: int,
    seconds: float,
    params: dict[str, object] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run the load until ``seconds`` have passed (requests in flight then finish); every outcome."""
    deadline = time.monotonic() + seconds
    outcomes: list[Outcome] = []

    def client() -> None:
        with grpc.insecure_channel(address) as channel:
            while time.monotonic() < deadline:
                outcome = _run(channel, next_job(), params or {})
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)

    with ThreadPoolExecutor(streams) as pool:
        for future in [pool.submit(client) for _ in range(streams)]:
            future.result()
    return outcomes


def _run(channel: grpc.Channel, job: Job, params: dict[str, object]) -> Outcome:
    request_id = secrets.token_hex(8)
    sampling = api_pb2.SamplingParams(max_tokens=job.max_tokens, ignore_eos=True, **params)
    responses = stream(channel, prompt_request(job.prompt, params=sampling, request_id=request_id), timeout=300)
    outcome, started, cut = Outcome(job), time.monotonic(), False
    try:
        for response in responses:
            outcome.token_ids += response.delta.token_ids
            if response.HasField("finished"):
                outcome.finish_reason = response.finished.finish_reason
            elif not cut and len(outcome.token_ids) >= job.cut_after and job.action != "finish":
                cut = True
                if job.action == "cancel":
                    responses.cancel()
                else:
                    _abort(channel, request_id)
    except grpc.RpcError as exc:
        outcome.error = exc.code()
    outcome.seconds = time.monotonic() - started
    return outcome


def _abort(channel: grpc.Channel, request_id: str) -> None:
    try:
        api_pb2_grpc.TandemStub(channel).Abort(api_pb2.AbortRequest(request_id=request_id), timeout=30)
    except grpc.RpcError as exc:  # the request may have finished in between
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise


def replica_rss(app: str) -> dict[str, int]:
    """Resident bytes of each Serve replica process of ``app`` on the local Ray this process
    started (its raylet's workers are our descendants), keyed ``Deployment-pid``."""
    import psutil  # a dev dependency: only the soak test and bench/soak.py measure memory

    rss = {}
    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline())
            if command.startswith(f"ray::ServeReplica:{app}:"):
                rss[f"{command.rsplit(':', 1)[1].strip()}-{process.pid}"] = process.memory_info().rss
        except psutil.Error:  # gone, or a zombie, since the listing
            continue
    return rss
