"""Authentication, TLS, limits and binding without a cluster: token files and their constant-time
check, the config's limits, the HTTP gate (401 and 413 before any route), the gRPC server's TLS and
client-certificate credentials (a real grpc.aio server and clients), non-finite sampling values,
and `tandem serve` refusing an address off the loopback without auth (a real subprocess, no Ray)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cluster.config import ConfigError, TlsConfig, load_config
from cluster.openai_api import _Gate
from cluster.security import Caller, Tokens, is_loopback, parse_tokens, server_credentials
from tandem.errors import InvalidRequest
from tandem.sampling import SamplingParams, target_probs
from tests.cluster_helpers import make_certificates

ALICE, BOB = "alice-0123456789abcdef", "bob-0123456789abcdefgh"


def test_token_files_name_their_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# who may call\nalice:{ALICE}\n\n{BOB}\n")
    monkeypatch.setenv("EXTRA_TOKENS", "carol:carol-0123456789abcdef")
    tokens = Tokens.load(load_config(None, auth={"tokens_file": str(path), "tokens_env": "EXTRA_TOKENS"}).auth)
    assert tokens.name(f"Bearer {ALICE}") == "alice" and tokens.name(f"bearer {ALICE} ") == "alice"
    assert tokens.name("Bearer carol-0123456789abcdef") == "carol"
    assert tokens.name(f"Bearer {BOB}").startswith("token-") and BOB not in tokens.name(f"Bearer {BOB}")
    for wrong in (None, "", ALICE, f"Basic {ALICE}", f"Bearer {ALICE}x", "Bearer ", "Bearer alice"):
        assert tokens.name(wrong) is None
    assert Tokens.load(load_config(None).auth) is None  # auth off


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "no tokens"),
        ("# only a comment\n", "no tokens"),
        ("alice:short", "shorter than 16"),
        (f"alice:{ALICE}\nalice:{BOB}", "given twice"),
        (f"alice:{ALICE}\nbob:{ALICE}", "given twice"),
    ],
)
def test_bad_token_lists(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_tokens(text)


def test_unreadable_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_TOKENS", raising=False)
    with pytest.raises(ConfigError, match="cannot read it"):
        Tokens.load(load_config(None, auth={"tokens_file": str(tmp_path / "missing")}).auth)
    with pytest.raises(ConfigError, match="NO_SUCH_TOKENS is not set"):
        Tokens.load(load_config(None, auth={"tokens_env": "NO_SUCH_TOKENS"}).auth)


@pytest.mark.parametrize(
    "sections,message",
    [
        ({"limits": {"max_stop": 0}}, "limits.max_stop must be a positive integer"),
        ({"limits": {"max_request_bytes": -1}}, "limits.max_request_bytes must be a positive integer"),
        ({"limits": {"max_tokens": 1.5}}, "limits.max_tokens must be a positive integer"),
        ({"limits": {"max_streams": 3}}, "unknown keys in config.limits: max_streams"),
        ({"tls": {"cert_file": "server.pem"}}, "tls needs both cert_file and key_file"),
        ({"tls": {"client_ca_file": "ca.pem"}}, "client_ca_file needs cert_file"),
        ({"auth": {"tokens": "abc"}}, "unknown keys in config.auth"),
    ],
)
def test_bad_security_config(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, **sections)


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1:50051", "127.5.0.1:1", "localhost:8000", "[::1]:50051"]))
    assert not any(map(is_loopback, ["0.0.0.0:50051", "[::]:1", "10.0.0.2:8000", "example.com:443"]))


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_sampling_values_are_refused(field: str, value: float) -> None:
    with pytest.raises(InvalidRequest, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-6])
def test_a_vanishing_temperature_decodes_greedily(temperature: float) -> None:
    """The limit of sampling as the temperature goes to 0, and no NaN from dividing by it."""
    import torch

    params = SamplingParams(temperature=temperature)
    logits = torch.tensor([[1.0, 3.0, -2.0], [0.5, -1.0, 0.25]])
    assert params.greedy and target_probs(logits, params).tolist() == [[0, 1, 0], [1, 0, 0]]


def _health(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    """A health check's answer, or the status code of the call that failed."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.mark.parametrize("client_certificates", [False, True], ids=["tls", "mutual-tls"])
def test_grpc_tls_credentials(tmp_path: Path, client_certificates: bool) -> None:
    certs = {name: str(path) for name, path in make_certificates(tmp_path).items()}
    tls = TlsConfig(certs["server"], certs["server_key"], certs["ca"] if client_certificates else None)
    ca = Path(certs["ca"]).read_bytes()
    with_cert = grpc.ssl_channel_credentials(
        ca, Path(certs["client_key"]).read_bytes(), Path(certs["client"]).read_bytes()
    )
    without_cert = grpc.ssl_channel_credentials(ca)

    async def serve_and_ask() -> list[str]:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        address = f"127.0.0.1:{port}"
        loop = asyncio.get_running_loop()
        clients = (None, grpc.ssl_channel_credentials(), without_cert, with_cert)
        answers = [await loop.run_in_executor(None, _health, address, c) for c in clients]
        await server.stop(None)
        return answers

    plain, system_roots, ours, ours_with_cert = asyncio.run(serve_and_ask())
    assert plain == system_roots == "UNAVAILABLE"  # plain text, and a server the client does not trust
    assert ours == ("UNAVAILABLE" if client_certificates else "SERVING") and ours_with_cert == "SERVING"


REFUSED: list[str] = []  # the paths the gate counted a 401 for


def _call(tokens: Tokens | None, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, dict, object]:
    """One request through the gate (10-byte bodies at most; chunks: the body as the client streams
    it): the status, the JSON body, and the caller and body the app behind it saw (None if it never ran)."""
    seen: dict = {}

    async def app(scope: dict, receive, send) -> None:
        seen["caller"], seen["body"] = scope["state"]["caller"], (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("10.1.2.3", 5555),
    }
    asyncio.run(_Gate(app, tokens, max_body=10, refused=lambda: REFUSED.append(path))(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), seen or None


def test_http_gate_checks_the_token_then_the_body_size() -> None:
    tokens = Tokens({"alice": ALICE})
    status, body, seen = _call(tokens, "/v1/models", {}, [b""])
    assert status == 401 and body["error"]["type"] == "authentication_error" and seen is None
    assert _call(tokens, "/v1/models", {"authorization": f"Bearer {BOB}"}, [b""])[0] == 401
    assert _call(tokens, "/health", {}, [b""])[:1] == (200,)  # probes carry no token
    assert REFUSED[-2:] == ["/v1/models", "/v1/models"] and len(REFUSED) == 2  # both 401s counted

    auth = {"authorization": f"Bearer {ALICE}"}
    status, _, seen = _call(tokens, "/v1/completions", auth, [b"0123", b"456789"])
    assert status == 200 and seen == {"caller": Caller("alice", "alice"), "body": b"0123456789"}
    status, body, seen = _call(tokens, "/v1/completions", {**auth, "content-length": "11"}, [b"0123456789x"])
    assert status == 413 and "larger than 10 bytes" in body["error"]["message"] and seen is None
    assert _call(tokens, "/v1/completions", auth, [b"012345", b"6789x"])[0] == 413  # chunked: no length given

    status, _, seen = _call(None, "/v1/models", {}, [b""])
    assert status == 200 and seen["caller"] == Caller("10.1.2.3", "10.1.2.3:5555")  # no auth: the peer


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", "serve", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("flag", ["--address", "--http-address"])
def test_serve_refuses_an_open_address_without_auth(flag: str) -> None:
    done = _serve(flag, "0.0.0.0:29999")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "0.0.0.0:29999 is reachable from other machines and auth is off" in done.stderr
    assert "--insecure" in done.stderr


def test_serve_says_when_its_tokens_cannot_be_read(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(f"auth:\n  tokens_file: {tmp_path / 'missing'}\n")
    done = _serve("--config", str(config), "--address", "127.0.0.1:29998", "--http-address", "127.0.0.1:29997")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "auth.tokens_file: cannot read it" in done.stderr


def test_client_says_when_its_token_file_cannot_be_read(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "client", "hi", "--token-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and "cannot read" in done.stderr
