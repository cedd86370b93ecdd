"""Shared by the cluster tests: a tiny random target, a lean config for it, and a local Ray running
the application (one per test module: starting Ray and the replicas is the slow part)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from cluster.app import APP_NAME, start
from cluster.client import Output, generate, prompt_request
from cluster.config import ClusterConfig, load_config
from tandem.drafters import make_drafter
from tandem.engine import Engine, Request
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem_proto.v1 import api_pb2
from tests.tiny_models import build_tiny

VOCAB = 64
# Prompts with repeats, so the n-gram drafter has something to propose.
PROMPTS = [[3, 14, 15, 9, 2, 6, 5, 35, 14, 15], [27, 18, 28], [1, 1, 2, 3, 5, 8, 13, 21, 34, 55 % VOCAB], [7, 7, 7, 7]]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The reference engine runs beside a cluster on 2 shared cores: with 2 torch threads it is
    ~30x slower there (OpenMP oversubscription). Import this fixture into a module to apply it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_target(folder: Path) -> Path:
    """A float32 llama with a long context, so sessions can run long enough to be killed or scaled."""
    build_tiny("llama", folder, vocab=VOCAB, max_position_embeddings=4096)
    return folder


def config_for(model: Path, port: int, **sections: Any) -> ClusterConfig:
    """Fractional CPUs everywhere: the machine has 2 cores, and each replica gets one torch thread."""
    base: dict[str, Any] = {
        "model": str(model),
        "dtype": "float32",
        "max_model_len": 4096,
        "address": f"127.0.0.1:{port}",
        "http_address": f"127.0.0.1:{free_port()}",  # never the default 8000: tests run side by side
        "ray": {"num_cpus": 4},
        "router": {"num_cpus": 0.1, "draft_timeout_s": 10.0},
        "draft": {"num_cpus": 0.1, "max_ongoing_requests": 8, "drafter": "ngram"},
        "target": {"num_cpus": 0.2, "max_ongoing_requests": 8},
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values} if isinstance(values, dict) else values
    return load_config(None, **base)


@contextlib.contextmanager
def running(config: ClusterConfig) -> Iterator[grpc.Channel]:
    """The application on a fresh local Ray; a channel to its public API."""
    import ray
    from ray import serve

    start(config)
    try:
        with grpc.insecure_channel(config.address) as channel:
            yield channel
    finally:
        serve.shutdown()
        ray.shutdown()


def request(
    prompt: list[int], max_tokens: int, drafter: str = "", request_id: str = "", **params: Any
) -> api_pb2.GenerateRequest:
    sampling = api_pb2.SamplingParams(max_tokens=max_tokens, **params)
    return prompt_request(prompt, params=sampling, drafter=drafter, request_id=request_id)


def run(channel: grpc.Channel, req: api_pb2.GenerateRequest, timeout: float = 120.0) -> Output:
    return generate(channel, req, timeout)


def engine_outputs(
    model: Path, jobs: list[tuple[list[int], int]], drafter: str = "ngram", **params: Any
) -> list[list[int]]:
    """The in-process reference for (prompt, max_tokens) jobs, greedy."""
    target, _ = load_model(model, torch.float32)
    engine = Engine(target, make_drafter(drafter), target.config.eos_token_ids, max_draft_nodes=16)
    results = engine.generate([Request(p, SamplingParams(max_tokens=n, **params)) for p, n in jobs])
    return [r.token_ids for r in results]


def deployment_stats(name: str) -> dict[str, int]:
    """The worker replica's own count of live sessions (one replica per pool in these tests)."""
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP_NAME).stats.remote().result(timeout_s=30)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+) and above Ray's worker ports
    (10002-19999): the servers under test bind it seconds later, while Ray's processes keep
    taking ephemeral ports, which made an OS-chosen port collide now and then."""
    import random
    import socket

    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")
