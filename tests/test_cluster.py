"""The cluster on a real local Ray with real gRPC clients (tp=1, n-gram draft pool, tiny target, two
pipeline groups):
it emits what the in-process engine emits, refuses bad requests clearly, and frees both workers'
state however a session ends, even when its drafter dies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cluster.client import stream
from tandem_proto.v1 import api_pb2, api_pb2_grpc
from tests.cluster_helpers import (
    PROMPTS,
    config_for,
    deployment_stats,
    engine_outputs,
    free_port,
    one_torch_thread,  # noqa: F401 - autouse
    replica_actors,
    request,
    run,
    running,
    tiny_target,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LONG = 4000  # tokens (the context is 4096): a session that outlives what a test does to it


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_target(tmp_path_factory.mktemp("cluster") / "tiny")


@pytest.fixture(scope="module")
def channel(model: Path):
    # two pipeline groups: sessions batch with their group, and outputs must not change
    with running(config_for(model, free_port(), router={"pipeline_groups": 2})) as channel:
        yield channel


def _continuing(req: api_pb2.GenerateRequest, received: list[int]) -> api_pb2.GenerateRequest:
    req.continue_token_ids.extend(received)
    return req


def _no_live_sessions() -> bool:
    return deployment_stats("Target")["sessions"] == 0 and deployment_stats("Draft")["sessions"] == 0


def test_concurrent_streams_match_the_engine(channel: grpc.Channel, model: Path) -> None:
    jobs = list(zip(PROMPTS, [12, 60, 33, 90]))
    expected = engine_outputs(model, jobs)
    drafters = ["", "none", "ngram", ""]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(lambda j: run(channel, request(*j[0], drafter=j[1])), zip(jobs, drafters)))
    assert [o.token_ids for o in outputs] == expected
    for out, (_, max_tokens), drafter in zip(outputs, jobs, drafters):
        usage = out.finished.usage
        assert out.finished.finish_reason == "length" and usage.completion_tokens == max_tokens
        if drafter == "none":
            assert usage.drafted_tokens == 0
    # the others may each be left out by the gate (it learns from one session first), not all
    assert any(o.finished.usage.drafted_tokens > 0 for o, d in zip(outputs, drafters) if d != "none")
    assert any(o.finished.usage.accepted_tokens > 0 for o in outputs)  # the drafter did speed things up
    wait_for(_no_live_sessions, 30, "sessions to end")


@pytest.mark.parametrize(
    "req,message",
    [
        (request([], 8), "prompt is empty"),
        (api_pb2.GenerateRequest(params=api_pb2.SamplingParams(max_tokens=8)), "prompt is empty"),
        (request([1, 2], 8, drafter="eagle9"), "unknown drafter 'eagle9'"),
        (request([1, 2], 0), "max_tokens must be > 0"),
        (request([1, 2], -3), "max_tokens must be > 0"),
        (request([1, 2], 8, temperature=-0.5), "temperature must be >= 0"),
        (request([1, 2], 8, temperature=float("inf")), "temperature must be >= 0 and finite"),
        (request([1, 2], 8, stop_token_ids=[64]), "stop token ids must lie in [0, 64)"),
        (request([1, 2] * 2500, 8), "prompt has 5000 tokens"),
        (request([1, 99], 8), "prompt token ids must lie in [0, 64)"),
        (api_pb2.GenerateRequest(text="hello"), "no tokenizer"),
        (_continuing(request([1, 2], 8), [3, 64]), "continue_token_ids must lie in [0, 64)"),
        (_continuing(request([1, 2], 3), [3, 4, 5]), "3 tokens to continue after, but max_tokens is 3"),
        (_continuing(request([1, 2], 8, stop_token_ids=[5]), [5, 4]), "hold a stop token"),
        (_continuing(request([1, 2] * 2000, 200), [3] * 96), "fill the context of 4096 tokens"),
    ],
    ids=[
        "empty",
        "no-prompt",
        "drafter",
        "max-tokens-0",
        "max-tokens-neg",
        "temperature",
        "temperature-inf",
        "stop-id",
        "too-long",
        "vocab",
        "text",
        "continue-vocab",
        "continue-max-tokens",
        "continue-stopped",
        "continue-context",
    ],
)
def test_invalid_requests(channel: grpc.Channel, req: api_pb2.GenerateRequest, message: str) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        run(channel, req)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()


@pytest.mark.parametrize("drafter,params", [("", {}), ("none", {"temperature": 0.9, "top_p": 0.95})])
def test_a_continued_stream_gives_exactly_the_rest(channel: grpc.Channel, drafter: str, params: dict) -> None:
    """A client whose router was lost sends the prompt again with the output it received and the
    seed the server reported (drawn by the server here): it gets exactly the rest of the stream."""
    whole = run(channel, request(PROMPTS[2], 70, drafter, ignore_eos=True, **params))
    assert len(whole.token_ids) == 70 and whole.seed is not None
    for cut in (1, 29, 69):
        again = request(PROMPTS[2], 70, drafter, ignore_eos=True, seed=whole.seed, **params)
        rest = run(channel, _continuing(again, whole.token_ids[:cut]))
        assert rest.token_ids == whole.token_ids[cut:], cut
        assert rest.seed == whole.seed and rest.finished.usage.completion_tokens == 70


def test_errors_leave_other_sessions_streaming(channel: grpc.Channel, model: Path) -> None:
    [expected] = engine_outputs(model, [(PROMPTS[0], 300)])
    with ThreadPoolExecutor(1) as pool:
        long_run = pool.submit(run, channel, request(PROMPTS[0], 300))
        for bad in (request([], 8), request([1], 8, temperature=-1)):
            with pytest.raises(grpc.RpcError):
                run(channel, bad)
        with pytest.raises(grpc.RpcError) as failure:
            api_pb2_grpc.TandemStub(channel).Abort(api_pb2.AbortRequest(request_id="no-such-request"))
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert long_run.result().token_ids == expected


def test_abort_ends_the_stream_and_frees_the_workers(channel: grpc.Channel) -> None:
    responses = stream(channel, request(PROMPTS[1], LONG, ignore_eos=True, request_id="to-abort"), timeout=120)
    assert next(responses).HasField("delta")
    api_pb2_grpc.TandemStub(channel).Abort(api_pb2.AbortRequest(request_id="to-abort"))
    last = list(responses)[-1]
    assert last.request_id == "to-abort" and last.finished.finish_reason == "abort"
    assert last.finished.usage.completion_tokens < LONG
    wait_for(_no_live_sessions, 30, "the aborted session's state to be freed")


def test_cancel_and_deadline_free_the_workers(channel: grpc.Channel) -> None:
    responses = stream(channel, request(PROMPTS[2], LONG, ignore_eos=True), timeout=120)
    assert next(responses).HasField("delta")
    responses.cancel()
    with pytest.raises(grpc.RpcError) as failure:
        run(channel, request(PROMPTS[3], LONG, ignore_eos=True), timeout=0.5)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(_no_live_sessions, 30, "cancelled sessions' state to be freed")


def test_killed_draft_replica_leaves_the_output_unchanged(channel: grpc.Channel, model: Path) -> None:
    """Last in the module: it kills the draft pool's replica (Serve starts another)."""
    import ray

    max_tokens = LONG
    [expected] = engine_outputs(model, [(PROMPTS[0], max_tokens)], ignore_eos=True)
    [replica] = replica_actors("Draft")
    responses = stream(channel, request(PROMPTS[0], max_tokens, ignore_eos=True), timeout=120)
    token_ids: list[int] = []
    while len(token_ids) < 20:  # rounds are running: the draft stream is up
        token_ids += next(responses).delta.token_ids
    ray.kill(replica, no_restart=True)
    finished = None
    for response in responses:
        token_ids += response.delta.token_ids
        finished = response.finished if response.HasField("finished") else finished
    assert token_ids == expected
    assert finished.usage.drafter_lost and finished.usage.completion_tokens == max_tokens


def test_joining_a_cluster_leaves_its_authentication_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a private loopback cluster gets Ray's authentication turned off; joining ``ray.address``
    keeps the cluster's own setting (an authenticated cluster is what we cannot start here)."""
    import os

    import ray

    from cluster.app import connect
    from cluster.config import load_config

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    joined: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: joined.update(kw, auth=os.environ.get("RAY_AUTH_MODE")))
    connect(load_config(None, ray={"address": "10.0.0.1:6379"}))
    assert joined == {"address": "10.0.0.1:6379", "auth": None}
