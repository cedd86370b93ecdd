"""Faults on a real local Ray (tiny target at tp = 2, n-gram draft pool): a target replica, one of
its tp ranks, or a rollout taking the replica away mid-stream costs the client nothing (the
session resumes on the restarted group and emits exactly what the in-process engine emits, greedy
and seeded sampling alike); a router lost fails its streams at once and both pools free them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from cluster.config import ClusterConfig
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
from workers.tp import RANK_NAME

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
        router={"draft_timeout_s": DRAFT_TIMEOUT_S, "resume_timeout_s": 120.0},
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


def test_a_lost_router_fails_its_streams_at_once_and_frees_both_pools(channel: grpc.Channel) -> None:
    """Last: it kills the router (Serve starts another)."""
    live = Stream(channel, PROMPTS[2], LONG)
    wait_for(live.started, 60, "the stream to start")
    killed = time.monotonic()
    _kill_replica("Router")
    live._thread.join(30)
    assert live.error is not None and live.error.code() == grpc.StatusCode.UNAVAILABLE
    assert live.ended_at - killed < 5.0  # never a hang
    wait_for(_idle, DRAFT_TIMEOUT_S, "both pools to free the session")
