"""Shared by the cluster tests: tiny random targets, a lean config for them, a local Ray running
the application (one per test module: starting Ray and the replicas is the slow part), and a test
certificate authority for TLS."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from cluster.app import APP_NAME, start
from cluster.client import Output, connect, generate, prompt_request, stream
from cluster.config import ClusterConfig, load_config
from cluster.router import ROUTER_HEADER
from tandem.drafters import make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL, resolve_model_path
from tandem.models.loading import load_model, resolve_model_dir
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


def tiny_chat_target(folder: Path, context: int) -> Path:
    """A tiny random llama over SmolLM2's vocabulary, with its tokenizer and chat template, so text,
    chat and stop-string requests work as on a real model."""
    source = resolve_model_dir(resolve_model_path(DEFAULT_MODEL))
    build_tiny("llama", folder, vocab=49152, max_position_embeddings=context)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, folder / name)
    return folder


def make_certificates(folder: Path) -> dict[str, Path]:
    """A self-signed CA, and a server and a client certificate it signed (the server's for
    127.0.0.1 and localhost): PEM files ``ca``, ``server``, ``server_key``, ``client``, ``client_key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple | None, *extensions: tuple) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        signer_name, signer_key = issuer or (subject, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(signer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(signer_key, hashes.SHA256())

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (folder / f"{name}.key").write_bytes(private)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("Tandem test CA", ca_key, None, (x509.BasicConstraints(ca=True, path_length=None), True))
    write("ca", ca, ca_key)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    for name, extensions in (("server", [(names, False)]), ("client", [])):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, issue(f"tandem {name}", key, (ca.subject, ca_key), *extensions), key)
    return {
        "ca": folder / "ca.pem",
        "server": folder / "server.pem",
        "server_key": folder / "server.key",
        "client": folder / "client.pem",
        "client_key": folder / "client.key",
    }


def config_for(model: Path, port: int, **sections: Any) -> ClusterConfig:
    """Fractional CPUs everywhere: the machine has 2 cores, and each replica gets one torch thread."""
    base: dict[str, Any] = {
        "model": str(model),
        "dtype": "float32",
        "max_model_len": 4096,
        "address": f"127.0.0.1:{port}",
        "http_address": f"127.0.0.1:{free_port()}",  # never the default 8000: tests run side by side
        "ray": {"num_cpus": 4},
        "router": {"num_replicas": 1, "num_cpus": 0.1, "draft_timeout_s": 10.0},
        "draft": {"num_cpus": 0.1, "max_ongoing_requests": 8, "drafter": "ngram"},
        "target": {"num_cpus": 0.2, "torch_threads": 1, "max_ongoing_requests": 8},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return load_config(None, **base)


@contextlib.contextmanager
def running(config: ClusterConfig, ca_file: Path | None = None) -> Iterator[grpc.Channel]:
    """The application on a fresh local Ray; a channel to its public API (TLS, trusting ``ca_file``)."""
    import ray
    from ray import serve

    start(config)
    try:
        with connect(config.address, ca_file=ca_file and str(ca_file)) as channel:
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


def pool_state_held() -> int:
    """Sessions, KV rows, calibration counts and drafter states both pools still hold (0 when idle)."""
    target, draft = deployment_stats("Target"), deployment_stats("Draft")
    return sum(
        (target["sessions"], target["rows"], target["calibrated_rows"], draft["sessions"], draft["drafter_states"])
    )


class Stream:
    """A generation (ignoring EOS) running in a thread, for tests that break something under it;
    ``started`` once it has streamed a few tokens."""

    def __init__(self, channel: grpc.Channel, prompt: list[int], max_tokens: int, **params: object) -> None:
        self.token_ids: list[int] = []
        self.finished = None
        self.error: grpc.RpcError | None = None
        self.ended_at = 0.0
        self._responses = stream(channel, request(prompt, max_tokens, ignore_eos=True, **params), timeout=300)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._responses:
                self.token_ids += response.delta.token_ids
                if response.HasField("finished"):
                    self.finished = response.finished
        except grpc.RpcError as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    def started(self) -> bool:
        return len(self.token_ids) >= 20

    def router(self) -> str:
        """The router replica serving the stream (its actor's name), from the initial metadata."""
        return dict(self._responses.initial_metadata())[ROUTER_HEADER]

    def result(self) -> list[int]:
        self._thread.join(300)
        assert self.error is None, self.error
        return self.token_ids


def replica_actors(deployment: str = "") -> list[object]:
    """Ray actor handles of the application's Serve replicas (of ``deployment``, or all of them)."""
    import ray

    return [
        ray.get_actor(actor["name"], namespace=actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::") and (not deployment or f"#{deployment}#" in actor["name"])
    ]


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
