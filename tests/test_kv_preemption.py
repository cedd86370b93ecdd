"""Two target replicas whose paged KV caches are too small for their sessions at once, on a real
local Ray: sessions that share a prefix are placed on the replica that holds it (prefix-aware
routing); sessions that cannot grow are preempted (ABORTED) and their routers resume them when
blocks are free, and every stream still emits exactly what the in-process engine emits, greedy and
seeded sampling alike."""

from __future__ import annotations

from collections.abc import Iterator
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
    request,
    run,
    running,
    tiny_target,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SHARED = [5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]  # a common "system prompt": 4 blocks of 4 tokens
TOKENS = 48  # per stream: with its prompt and a round's tree, up to 19 blocks of 4 tokens
BLOCKS = 24  # per replica: three streams on one would need about 50
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "seed": 3}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_target(tmp_path_factory.mktemp("preemption") / "tiny")


@pytest.fixture(scope="module")
def config(model: Path) -> ClusterConfig:
    target = {"schedule": False, "kv_blocks": BLOCKS, "block_size": 4, "num_replicas": 2}
    return config_for(model, free_port(), router={"resume_timeout_s": 120.0}, target=target)


@pytest.fixture(scope="module")
def channel(config: ClusterConfig) -> Iterator[grpc.Channel]:
    with running(config) as channel:
        yield channel


def test_sessions_preempted_for_blocks_resume_and_lose_nothing(channel: grpc.Channel, model: Path) -> None:
    """The three streams share a prefix, so all go to one replica, whose cache is short."""
    jobs = [(SHARED + PROMPTS[0], {}), (SHARED + PROMPTS[2], {}), (SHARED + PROMPTS[1], SAMPLED)]
    expected = [engine_outputs(model, [(p, TOKENS)], ignore_eos=True, **params)[0] for p, params in jobs]
    streams = [Stream(channel, p, TOKENS, **params) for p, params in jobs]
    for s, want in zip(streams, expected):
        assert s.result() == want  # nothing lost, nothing repeated, nothing changed
    assert sum(s.finished.usage.target_resumes for s in streams) >= 1, "the cache was never short"
    wait_for(lambda: pool_state_held() == 0, 30, "both pools to free the sessions")


def test_sessions_that_share_a_prefix_go_to_the_replica_that_holds_it(channel: grpc.Channel) -> None:
    """After the streams above, one replica holds the shared prefix: every later request that starts
    with it is served from there (placed at random, four would all hit with odds of 1 in 16)."""
    for tail in ([1, 2, 3], [4], [6, 6, 6, 6, 6], [7, 1]):
        usage = run(channel, request(SHARED + tail, 4)).finished.usage
        assert usage.cached_tokens >= len(SHARED), tail
