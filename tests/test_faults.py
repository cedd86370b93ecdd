"""Faults on a real local Ray (tiny target at tp = 2, n-gram draft pool, two routers): a target
replica, one of its tp ranks, or a rollout taking the replica away mid-stream costs the client
nothing (the session resumes on the restarted group and emits exactly what the in-process engine
emits, greedy and seeded sampling alike). A router killed mid-stream fails its streams at once,
both pools free them, and a client that continues them on the other router gets exactly the rest."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from cluster.client import Output, generate
from cluster.config import ClusterConfig
from tandem.sampling import SamplingParams
from tandem_proto.v1 import api_pb2
from tests.cluster_helpers import (
    PROMPTS,
    Stream,
    config_for,
    engine_outputs,
    free_port,
    one_torch_thread,  # noqa: F401 - autouse
    pool_state_held,
    replica_actors,
    request,
    run,
    running,
    tiny_target,
    wait_for,
)
from tests.tiny_models import build_tiny
from workers.tp import HEALTH, RANK_NAME, Rank, ShardSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LONG = 600  # tokens: a session stalls from the fault until it resumes, so it always outlives it
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
DRAFT_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_target(tmp_path_factory.mktemp("faults") / "tiny")


@pytest.fixture(scope="module")
def expected(model: Path) -> dict[str, list[int]]:
    """The engine's outputs: greedy and seeded sampling (the cluster's trees are the drafter's
    own with the scheduler off, so even the sampled tokens must match)."""
    [greedy] = engine_outputs(model, [(PROMPTS[0], LONG)], ignore_eos=True)
    [sampled] = engine_outputs(model, [(PROMPTS[1], LONG)], ignore_eos=True, **SAMPLED)
    return {"greedy": greedy, "sampled": sampled}


@pytest.fixture(scope="module")
def config(model: Path) -> ClusterConfig:
    return config_for(
        model,
        free_port(),
        grace_period_s=60.0,  # a rollout lets live streams finish
        router={"num_replicas": 2, "draft_timeout_s": DRAFT_TIMEOUT_S, "resume_timeout_s": 120.0},
        target={"tp": 2, "num_cpus": 0.2, "schedule": False, "health_check_period_s": 1.0},
    )


@pytest.fixture(scope="module")
def channel(config: ClusterConfig) -> Iterator[grpc.Channel]:
    with running(config) as channel:
        yield channel


def _kill_replica(deployment: str) -> None:
    import ray

    # a rollout's old replica may still be on its way out
    wait_for(lambda: len(replica_actors(deployment)) == 1, 120, f"a single {deployment} replica")
    [replica] = replica_actors(deployment)
    ray.kill(replica, no_restart=True)


def _kill_a_rank() -> None:
    """Kill rank 1 of the target's tp group, as a crash or the OOM killer would."""
    import ray

    [rank] = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"{RANK_NAME}1-")]
    ray.kill(ray.get_actor(rank["name"], namespace=rank["namespace"]), no_restart=True)


def _idle() -> bool:
    return pool_state_held() == 0


def _survives(
    channel: grpc.Channel, expected: dict[str, list[int]], fault: Callable[[], None], resumes: bool = True
) -> None:
    streams = {"greedy": Stream(channel, PROMPTS[0], LONG), "sampled": Stream(channel, PROMPTS[1], LONG, **SAMPLED)}
    wait_for(lambda: all(s.started() for s in streams.values()), 60, "both streams to start")
    fault()
    for name, s in streams.items():
        assert s.result() == expected[name], name  # nothing lost, nothing repeated, nothing changed
        assert s.finished.usage.completion_tokens == LONG, name
        assert s.finished.usage.target_resumes >= 1 or not resumes, name
    wait_for(_idle, 30, "both pools to free the sessions")


def test_a_killed_target_replica_loses_no_token(channel: grpc.Channel, expected: dict[str, list[int]]) -> None:
    _survives(channel, expected, lambda: _kill_replica("Target"))


def test_a_lost_tp_rank_replaces_the_group_and_loses_no_token(
    channel: grpc.Channel, expected: dict[str, list[int]]
) -> None:
    _survives(channel, expected, _kill_a_rank)


def test_a_rollout_drains_live_streams_and_takes_new_ones(
    channel: grpc.Channel, config: ClusterConfig, expected: dict[str, list[int]]
) -> None:
    """A redeploy replaces every replica (the router's too: Serve versions an application as a
    whole). The old ones finish their live streams within the grace period, while the new router,
    on the same port, takes every new request."""
    from ray import serve

    from cluster.app import APP_NAME, build_app

    rollout = build_app(replace(config, target=replace(config.target, batch_wait_ms=3.0)))
    late: dict[str, list[int]] = {}

    def redeploy() -> None:
        serve.run(rollout, name=APP_NAME, route_prefix="/")
        with grpc.insecure_channel(config.address) as fresh:  # while the old replicas still drain
            late["greedy"] = run(fresh, request(PROMPTS[0], LONG, ignore_eos=True)).token_ids

    _survives(channel, expected, redeploy, resumes=False)
    assert late["greedy"] == expected["greedy"]


def test_a_rank_answers_its_health_check_during_a_long_pass(channel: grpc.Channel, tmp_path: Path) -> None:
    """Serve's probe of a tp > 1 replica asks every rank ``alive``: it must not queue behind a pass
    (a busy group would look dead and be replaced). A rank of its own here, with a long prefill."""
    import ray

    folder = tmp_path / "wide"
    build_tiny("llama", folder, vocab=64, hidden_size=512, intermediate_size=1024, max_position_embeddings=4096)
    spec = ShardSpec(str(folder), "float32", rows=1, max_model_len=4096, feature_layers=(), threads=1)
    rank = ray.remote(concurrency_groups={HEALTH: 1})(Rank).options(num_cpus=0)
    actor = rank.remote(spec, 0, 1, f"tcp://127.0.0.1:{free_port()}")
    row = ray.get(actor.call.remote("open", list(range(1, 64)) * 63, SamplingParams(), 0), timeout=120)
    prefill = actor.call.remote("prefill_part", [row], None)  # 3969 tokens in one pass
    time.sleep(0.2)
    assert ray.get(actor.alive.options(concurrency_group=HEALTH).remote(), timeout=60)
    assert not ray.wait([prefill], timeout=0)[0], "the health check waited for the pass"
    assert ray.get(prefill, timeout=300)[0] is not None
    ray.kill(actor)


def test_metrics_count_every_router(channel: grpc.Channel, config: ClusterConfig) -> None:
    """A scrape lands on either router replica and sums both: the same numbers from each."""
    tokens = sum(len(run(channel, request(p, 9, ignore_eos=True)).token_ids) for p in PROMPTS)
    host, port = config.http_host_port
    scrapes = {_counter(f"http://{host}:{port}/metrics", "tandem:generation_tokens_total") for _ in range(8)}
    assert len(scrapes) == 1 and scrapes.pop() >= tokens


def _counter(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_killed_router_loses_no_token_for_a_client_that_continues(
    channel: grpc.Channel, expected: dict[str, list[int]]
) -> None:
    """Last: SIGKILL the router replica serving the streams (Serve starts another). A bare stream
    fails at once with UNAVAILABLE; the client's own streams continue on the other router with
    the tokens they had and their seed, and end exactly as the in-process engine does."""
    bare = Stream(channel, PROMPTS[2], LONG)
    progress = {name: 0 for name in expected}

    def client(name: str, prompt: list[int], **params: object) -> Output:
        def on_delta(delta: api_pb2.Delta) -> None:
            progress[name] += len(delta.token_ids)

        return generate(channel, request(prompt, LONG, ignore_eos=True, **params), 300, on_delta)

    with ThreadPoolExecutor(2) as pool:
        greedy = pool.submit(client, "greedy", PROMPTS[0])
        sampled = pool.submit(client, "sampled", PROMPTS[1], **SAMPLED)
        wait_for(lambda: bare.started() and min(progress.values()) >= 20, 60, "the streams to start")
        killed = time.monotonic()
        _sigkill(bare.router())  # one channel, one connection: the replica serving all three
        outputs = {"greedy": greedy.result(), "sampled": sampled.result()}
    bare._thread.join(30)
    assert bare.error is not None and bare.error.code() == grpc.StatusCode.UNAVAILABLE
    assert bare.ended_at - killed < 5.0  # never a hang
    for name, out in outputs.items():
        assert out.token_ids == expected[name], name  # nothing lost, nothing repeated, nothing changed
        assert out.reconnects >= 1 and out.finished.usage.completion_tokens == LONG, name
    wait_for(_idle, DRAFT_TIMEOUT_S, "both pools to free the lost router's sessions")


def _sigkill(replica: str) -> None:
    """Kill a Serve replica's process, as the OOM killer would."""
    import ray

    [namespace] = [a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == replica]
    actor = ray.get_actor(replica, namespace=namespace)
    os.kill(ray.get(actor.__ray_call__.remote(lambda _: os.getpid())), signal.SIGKILL)
