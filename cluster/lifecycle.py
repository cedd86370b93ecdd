"""Stopping without cutting streams. ``tandem serve`` waits for SIGTERM (what Kubernetes sends) or
Ctrl-C, then drains the router: health turns NOT_SERVING, new requests are refused, live streams
get the grace period to finish. ``tandem drain`` does the same to a running cluster (a pod's
preStop hook). Serve stopping a replica on its own (scale-down, rollout) drains it the same way
(``Router.__del__``, the pools' ``graceful_shutdown_timeout_s``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

from cluster.app import APP_NAME

CALL_MARGIN_S = 30.0  # for one call to a router replica
POLL_S = 0.2  # how often a drain looks at the live sessions


def wait_for_stop_signal() -> str:
    """Block until SIGTERM or SIGINT; returns its name. Later signals are ignored: the drain is bounded."""
    caught: list[str] = []
    done = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        if not caught:
            caught.append(signal.Signals(signum).name)
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)  # also replaces Ray's handler, which dumps stacks on SIGTERM
    done.wait()
    return caught[0]


@contextlib.contextmanager
def children_ignore_interrupts() -> Iterator[None]:
    """Processes started inside (Ray's) ignore Ctrl-C, which the terminal sends to all of them:
    only this one decides when they stop, after draining."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def drain(grace_s: float) -> int:
    """Drain every router replica of the running application (a Serve handle would reach one);
    returns the sessions still live after ``grace_s``."""
    import ray

    from cluster.router import live_sessions, router_actors, start_draining

    routers = router_actors(APP_NAME)
    ray.get([actor.__ray_call__.remote(start_draining, name, grace_s) for name, actor in routers.items()])
    deadline = time.monotonic() + grace_s
    while True:
        calls = [actor.__ray_call__.remote(live_sessions, name) for name, actor in routers.items()]
        left = sum(ray.get(calls, timeout=CALL_MARGIN_S))
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_S)
