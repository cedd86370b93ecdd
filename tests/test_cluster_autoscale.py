"""Autoscaling on a real local Ray: each pool scales on its own live sessions. Target-only load
grows the target pool and leaves the draft pool alone; drafted load then grows the draft pool."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from cluster.app import APP_NAME
from tests.cluster_helpers import (
    PROMPTS,
    config_for,
    free_port,
    one_torch_thread,  # noqa: F401 - autouse
    request,
    run,
    running,
    tiny_target,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Scale up on one live session per replica, after half a second; never scale down in the test.
FAST = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 1.0,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 600,
}


def _running_replicas(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[APP_NAME].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


@contextmanager
def _load(channel: grpc.Channel, drafter: str, streams: int = 2) -> Iterator[None]:
    """``streams`` clients generating back to back until the block ends."""
    stop = threading.Event()

    def client(index: int) -> None:
        while not stop.is_set():
            run(channel, request(PROMPTS[index], 400, drafter=drafter, ignore_eos=True))

    with ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(client, i) for i in range(streams)]
        try:
            yield
        finally:
            stop.set()
            for future in futures:
                future.result()


def test_pools_scale_separately(tmp_path: Path) -> None:
    model = tiny_target(tmp_path / "tiny")
    pools = {"autoscaling_config": FAST, "max_ongoing_requests": 4}
    config = config_for(model, free_port(), draft=pools, target=pools)
    with running(config) as channel:
        assert _running_replicas("Target") == _running_replicas("Draft") == 1
        with _load(channel, drafter="none"):
            wait_for(lambda: _running_replicas("Target") == 2, 180, "the target pool to scale up")
            assert _running_replicas("Draft") == 1
        with _load(channel, drafter="ngram"):
            wait_for(lambda: _running_replicas("Draft") == 2, 180, "the draft pool to scale up")
