"""A bounded soak on a real local Ray (tiny target, n-gram draft pool): 32 concurrent streams of
random lengths, with cancels and aborts mixed in. No stream fails unless the test cut it, every
output is the in-process engine's (or a prefix of it, when cut), every piece of per-session state
comes back to zero afterwards, and no process's memory grows.

``TANDEM_SOAK_S`` sets the length of the measured load (default 60 s, after a 10 s warm-up).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.app import APP_NAME
from cluster.loadgen import random_jobs, replica_rss, soak
from tests.cluster_helpers import (
    VOCAB,
    config_for,
    engine_outputs,
    free_port,
    one_torch_thread,  # noqa: F401 - autouse
    pool_state_held,
    replica_actors,
    running,
    tiny_target,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STREAMS = 32
MAX_TOKENS = 96
SOAK_S = float(os.environ.get("TANDEM_SOAK_S", "60"))
WARMUP_S = 10.0
RSS_MARGIN = 64 << 20  # bytes a process may grow between the warm-up and the end of the load


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_target(tmp_path_factory.mktemp("soak") / "tiny")


@pytest.fixture(scope="module")
def address(model: Path) -> Iterator[str]:
    pools = {"max_ongoing_requests": STREAMS + 8}
    config = config_for(model, free_port(), draft=pools, target=pools)
    with running(config):
        yield config.address


def _ongoing_requests() -> list[int]:
    """Serve's own count of ongoing requests, per replica."""
    import ray

    return ray.get([replica.get_num_ongoing_requests.remote() for replica in replica_actors()], timeout=30)


def _router_sessions() -> int:
    from ray import serve

    return serve.get_deployment_handle("Router", app_name=APP_NAME).live_sessions.remote().result(timeout_s=30)


def _all_state_freed() -> bool:
    return pool_state_held() + _router_sessions() == 0 and not any(_ongoing_requests())


def test_soak_32_streams_with_cancels_and_aborts(address: str, model: Path) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 40))] for _ in range(12)]
    outputs = engine_outputs(model, [(p, MAX_TOKENS) for p in prompts], ignore_eos=True)
    expected = dict(zip(map(tuple, prompts), outputs))
    jobs = random_jobs(rng, prompts, MAX_TOKENS)

    outcomes = soak(address, jobs, STREAMS, WARMUP_S)
    wait_for(_all_state_freed, 30, "the warm-up's state to be freed")
    before = replica_rss(APP_NAME)
    outcomes += soak(address, jobs, STREAMS, SOAK_S)

    assert [o for o in outcomes if o.failed] == []
    for o in outcomes:
        reference = expected[tuple(o.job.prompt)][: o.job.max_tokens]
        if o.job.action == "finish":
            assert o.token_ids == reference and o.finish_reason == "length"
        else:  # cut partway, or finished before the cut landed
            assert o.token_ids == reference[: len(o.token_ids)]
    actions = {a: sum(o.job.action == a for o in outcomes) for a in ("finish", "cancel", "abort")}
    assert actions["abort"] and actions["cancel"] and any(o.finish_reason == "abort" for o in outcomes)
    assert len(outcomes) >= 2 * STREAMS, actions

    wait_for(_all_state_freed, 30, "KV rows, drafter states, Serve requests and router sessions to be freed")
    after = replica_rss(APP_NAME)
    grown = {name: after[name] - before[name] for name in before if name in after}
    assert len(grown) == 3 and all(g < RSS_MARGIN for g in grown.values()), grown
    tokens = sum(len(o.token_ids) for o in outcomes)
    print(f"soak: {len(outcomes)} streams {actions}, {tokens} tokens; RSS before / after (MiB):")
    print({name: (before[name] >> 20, after[name] >> 20) for name in grown})
