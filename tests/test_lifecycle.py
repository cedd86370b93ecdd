"""Stopping `tandem serve` (a real subprocess with its own local Ray, tiny target): SIGTERM drains
it (health NOT_SERVING on both APIs, new requests refused, live gRPC and HTTP streams run to their
end), then it exits 0 with one line and no stack dump. Ctrl-C (SIGINT to the whole process group,
Ray's processes included) drains the same way, and a stream longer than the grace period is cut."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import stream
from tests.cluster_helpers import PROMPTS, free_port, request, tiny_target, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    process: subprocess.Popen
    address: str  # gRPC
    client: openai.OpenAI
    model: str

    def finish(self) -> tuple[int, str, str]:
        """Exit code, stdout after the startup lines, stderr."""
        out, err = self.process.communicate(timeout=180)
        return self.process.returncode, out, err


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_target(tmp_path_factory.mktemp("lifecycle") / "tiny")


@pytest.fixture
def serve(model: Path, tmp_path: Path) -> Iterator[Callable[[float], Server]]:
    started: list[subprocess.Popen] = []

    def start(grace_period_s: float) -> Server:
        address, http_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config = {
            "model": str(model),
            "dtype": "float32",
            "max_model_len": 4096,
            "address": address,
            "http_address": http_address,
            "grace_period_s": grace_period_s,
            "ray": {"num_cpus": 4},
            "router": {"num_cpus": 0.1},
            "draft": {"drafter": "ngram", "num_cpus": 0.1},
            "target": {"num_cpus": 0.2, "max_ongoing_requests": 4},
        }
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "serve", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TANDEM_TEST_THREADS": "1"},
            start_new_session=True,  # its own process group, as under a terminal or in a container
        )
        started.append(process)
        lines = [process.stdout.readline(), process.stdout.readline()]  # blocks until the app is up
        assert lines[0].startswith("tandem: serving gRPC on ") and "OpenAI API on" in lines[1], lines
        client = openai.OpenAI(base_url=f"http://{http_address}/v1", api_key="unused", max_retries=0, timeout=300)
        return Server(process, address, client, str(model))

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_sigterm_lets_live_streams_finish_then_exits_0(serve: Callable[[float], Server]) -> None:
    server = serve(grace_period_s=120)
    tokens = 1200
    with grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(2) as pool:
        by_grpc = stream(channel, request(PROMPTS[0], tokens, ignore_eos=True), timeout=300)
        first = next(by_grpc)  # both streams are live before the signal
        by_http = server.client.completions.create(
            model=server.model,
            prompt=PROMPTS[1],
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        grpc_rest, http_chunks = pool.submit(list, by_grpc), pool.submit(list, by_http)
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _health(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "NOT_SERVING")
        with pytest.raises(openai.InternalServerError, match="shutting down"):  # 503
            server.client.completions.create(model=server.model, prompt=[1, 2, 3], max_tokens=2)
        assert not grpc_rest.done() and not http_chunks.done()  # the drain is waiting for them
        responses = [first, *grpc_rest.result()]
        assert sum(len(r.delta.token_ids) for r in responses) == tokens
        assert responses[-1].finished.finish_reason == "length"
        assert http_chunks.result()[-1].usage.completion_tokens == tokens
    code, out, err = server.finish()
    assert code == 0, err
    assert out.splitlines() == ["tandem: SIGTERM: drained and stopped"]
    assert "Traceback" not in err and "SIGTERM received" not in err, err


def test_ctrl_c_drains_and_cuts_streams_past_the_grace_period(serve: Callable[[float], Server]) -> None:
    server = serve(grace_period_s=2)
    with grpc.insecure_channel(server.address) as channel:
        endless = stream(channel, request(PROMPTS[2], 4000, ignore_eos=True), timeout=300)
        assert next(endless).HasField("delta")
        os.killpg(server.process.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        code, out, err = server.finish()
        with pytest.raises(grpc.RpcError):
            list(endless)
    assert code == 0, err
    assert out.splitlines() == ["tandem: SIGINT: drained and stopped, 1 stream(s) cut after the 2 s grace period"]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
