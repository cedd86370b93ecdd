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
from collections.abc import Iterator

from cluster.app import APP_NAME

CALL_MARGIN_S = 30.0  # beyond the grace period, for the drain call itself


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
    """Drain the running application's router; returns the sessions still live after ``grace_s``."""
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name=APP_NAME)
    return router.drain.remote(grace_s).result(timeout_s=grace_s + CALL_MARGIN_S)
