"""End to end: `tandem serve` (its own local Ray) with the real SmolLM2-135M-Instruct at tp=2 (a
gloo group of two rank actors, 3 KV heads split 2 + 1) and its shipped DSpark drafter (target
features cross gRPC every round), `tandem client` and raw gRPC clients against it; outputs and
speculation counts equal the in-process engine's (float32, greedy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.client import generate, prompt_request
from tandem.drafters import make_drafter
from tandem.engine import Engine, Request, Result
from tandem.models.catalog import DEFAULT_MODEL
from tandem.sampling import SamplingParams
from tandem.target import Target
from tandem_proto.v1 import api_pb2
from tests.cluster_helpers import (
    free_port,
    one_torch_thread,  # noqa: F401 - autouse
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a haiku about caches.", "What is 2 + 2?", "List three prime numbers."]


@pytest.fixture(scope="module")
def address(default_target: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tandem serve` on configs/local-tp2.yaml, in float32 and on a free port."""
    config = yaml.safe_load((ROOT / "configs" / "local-tp2.yaml").read_text())
    config.update(address=f"127.0.0.1:{free_port()}", http_address=f"127.0.0.1:{free_port()}")
    config.update(dtype="float32", max_model_len=512)
    config["target"].update(
        num_cpus=0.5, max_ongoing_requests=4, schedule=False
    )  # counts equal the unscheduled engine's
    path = tmp_path_factory.mktemp("e2e") / "tp2.yaml"
    path.write_text(yaml.safe_dump(config))
    server = subprocess.Popen(
        [sys.executable, "-m", "tandem.cli", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = server.stdout.readline()  # blocks until the app is up (or the server died)
        assert line.startswith("tandem: serving gRPC on "), f"tandem serve failed: {line!r}"
        yield line.split()[-1]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)


def _reference(target: Target, jobs: list[tuple[str, int]]) -> list[Result]:
    drafter = make_drafter("dspark", target.model, DEFAULT_MODEL)
    engine = Engine(target.model, drafter, target.eos_token_ids, target.tokenizer.decode)
    requests = [Request(target.tokenizer.encode(p, chat=True), SamplingParams(max_tokens=n)) for p, n in jobs]
    return engine.generate(requests)


def test_client_command_streams_the_engines_output(address: str, default_target: Target) -> None:
    [reference] = _reference(default_target, [(PROMPTS[0], 24)])
    expected = reference.token_ids
    command = ["client", PROMPTS[0], "--address", address, "--max-tokens", "24", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", *command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["token_ids"] == expected
    assert out["text"] == default_target.tokenizer.decode(expected)
    assert out["completionTokens"] == len(expected)
    assert (out["rounds"], out.get("acceptedTokens", 0)) == (reference.stats.rounds, reference.stats.accepted)


def test_concurrent_streams_at_tp2_match_the_engine(address: str, default_target: Target) -> None:
    jobs = list(zip(PROMPTS, [6, 20, 12]))
    expected = [r.token_ids for r in _reference(default_target, jobs)]
    with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(len(jobs)) as pool:
        requests = [prompt_request(p, params=api_pb2.SamplingParams(max_tokens=n)) for p, n in jobs]
        outputs = list(pool.map(lambda r: generate(channel, r, timeout=300), requests))
    assert [o.token_ids for o in outputs] == expected


def test_health_and_reflection(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Tandem"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name for s in next(listing).list_services_response.service}
    assert {"tandem.v1.Tandem", "grpc.health.v1.Health"} <= services
