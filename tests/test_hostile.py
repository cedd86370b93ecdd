"""Hostile input and strangers against one real cluster (local Ray, real grpcio and HTTP clients)
with TLS and bearer tokens on and tight limits: tokens and TLS guard both APIs (health stays open),
limits and bad values are refused with INVALID_ARGUMENT / RESOURCE_EXHAUSTED (400 / 413 / 429 over
HTTP), one client cannot abort, see or collide with another's request, and a fuzzer throwing
random, malformed and garbage requests at the gRPC API leaves the server up and a concurrent
well-formed session exactly as the in-process engine decodes it.

The target is a tiny random llama with SmolLM2's tokenizer, so text, chat and stop strings run."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cluster.client import Metadata, bearer, generate, stream
from cluster.config import ClusterConfig
from cluster.router import SERVICE
from tandem_proto.v1 import api_pb2, api_pb2_grpc
from tests.cluster_helpers import (
    config_for,
    engine_outputs,
    free_port,
    make_certificates,
    one_torch_thread,  # noqa: F401 - autouse
    request,
    running,
    tiny_chat_target,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONTEXT = 4096
LONG = 4000  # tokens: a stream that outlives what a test does beside it
VOCAB = 49152
PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 9]
LIMITS = {
    "max_request_bytes": 64 << 10,
    "max_prompt_tokens": 1000,
    "max_stop": 4,
    "max_stop_length": 32,
    "max_stop_token_ids": 8,
    "max_streams_per_client": 3,
}
TOKENS = {name: f"{name}-{os.urandom(12).hex()}" for name in ("alice", "bob", "carol")}
ALICE, BOB, CAROL = (bearer(TOKENS[name]) for name in ("alice", "bob", "carol"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_target(tmp_path_factory.mktemp("hostile") / "tiny-chat", CONTEXT)


@pytest.fixture(scope="module")
def config(model: Path, certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ClusterConfig:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("".join(f"{name}:{token}\n" for name, token in TOKENS.items()))
    return config_for(
        model,
        free_port(),
        max_model_len=CONTEXT,
        limits=LIMITS,
        tls={"cert_file": str(certs["server"]), "key_file": str(certs["server_key"])},
        auth={"tokens_file": str(tokens)},
    )


@pytest.fixture(scope="module")
def channel(config: ClusterConfig, certs: dict[str, Path]) -> Iterator[grpc.Channel]:
    with running(config, ca_file=certs["ca"]) as channel:
        yield channel


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    """The status a call ends with (OK when it returns; a stream is read to its end)."""
    try:
        result = call(*args, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _https(
    config: ClusterConfig, certs: dict[str, Path], method: str, path: str, body: object = None, token: str = ""
) -> tuple[int, dict]:
    """A raw HTTPS request (bytes are sent as they are): the status and the JSON body."""
    host, port = config.http_host_port
    connection = http.client.HTTPSConnection(host, port, timeout=120, context=_trust(certs))
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    connection.request(method, path, content, headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if response.getheader("content-type") == "application/json" else {}


def _trust(certs: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs["ca"]))


def test_grpc_needs_tls_and_a_token(channel: grpc.Channel, config: ClusterConfig) -> None:
    stub = api_pb2_grpc.TandemStub(channel)
    req = request(PROMPT, 4)
    assert _code(stub.Generate, req, timeout=60) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(stub.Generate, req, timeout=60, metadata=bearer("x" * 30)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(stub.Abort, api_pb2.AbortRequest(request_id="a"), metadata=()) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(config.address) as plain:
        assert _code(api_pb2_grpc.TandemStub(plain).Generate, req, timeout=30, metadata=ALICE) == (
            grpc.StatusCode.UNAVAILABLE
        )
    # Probes carry no token: health stays open.
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert generate(channel, req, 60, metadata=ALICE).finished.finish_reason == "length"


def test_refused_credentials_and_unparsable_bytes_are_counted(
    channel: grpc.Channel, config: ClusterConfig, certs: dict[str, Path]
) -> None:
    def failures(code: str) -> float:
        url = f"https://{config.http_address}/metrics"
        headers = {"authorization": f"Bearer {TOKENS['alice']}"}
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), context=_trust(certs)) as response:
            text = response.read().decode()
        series = f'tandem:request_failure_total{{code="{code}"}} '
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))

    before = {code: failures(code) for code in ("UNAUTHENTICATED", "INVALID_ARGUMENT")}
    stub = api_pb2_grpc.TandemStub(channel)
    assert _code(stub.Generate, request(PROMPT, 4), timeout=60) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(stub.Abort, api_pb2.AbortRequest(), metadata=bearer("x" * 30)) == grpc.StatusCode.UNAUTHENTICATED
    assert _https(config, certs, "GET", "/v1/models", token="wrong-token-0123456789")[0] == 401
    raw = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=lambda data: data)
    with pytest.raises(grpc.RpcError) as failure:
        list(raw(b"\x0a\xff", timeout=60, metadata=ALICE))  # field 1, a length that never ends
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details().startswith("the request does not parse")
    assert failures("UNAUTHENTICATED") == before["UNAUTHENTICATED"] + 3
    assert failures("INVALID_ARGUMENT") == before["INVALID_ARGUMENT"] + 1


def test_tandem_client_sends_its_token_over_tls(channel: grpc.Channel, config: ClusterConfig, certs: dict) -> None:
    def client(token: str | None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("TANDEM_API_KEY", None)
        env.update({"TANDEM_API_KEY": token} if token else {})
        command = ["client", "Hi", "--address", config.address, "--ca-file", str(certs["ca"]), "--max-tokens", "3"]
        return subprocess.run(
            [sys.executable, "-m", "tandem.cli", *command, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    done = client(TOKENS["carol"])
    assert done.returncode == 0 and json.loads(done.stdout)["completionTokens"] == 3, done.stderr
    done = client(None)
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr and "Traceback" not in done.stderr


def test_http_needs_tls_and_a_token(config: ClusterConfig, certs: dict[str, Path]) -> None:
    assert _https(config, certs, "GET", "/health") == (200, {"status": "ok"})
    for path in ("/v1/models", "/metrics"):
        status, body = _https(config, certs, "GET", path, token="wrong-token-0123456789")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert _https(config, certs, "GET", path)[0] == 401
    assert _https(config, certs, "GET", "/metrics", token=TOKENS["alice"])[0] == 200

    base_url = f"https://{config.http_address}/v1"
    client = openai.OpenAI(
        base_url=base_url, api_key=TOKENS["alice"], http_client=openai.DefaultHttpxClient(verify=_trust(certs))
    )
    completion = client.completions.create(model=config.model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4 and len(completion.id) == len("cmpl-") + 32
    stranger = openai.OpenAI(
        base_url=base_url, api_key="wrong-token-0123456789", http_client=openai.DefaultHttpxClient(verify=_trust(certs))
    )
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    host, port = config.http_host_port
    plain = http.client.HTTPConnection(host, port, timeout=30)
    with pytest.raises((OSError, http.client.HTTPException)):  # plain text to the TLS port
        plain.request("GET", "/health")
        plain.getresponse().read()


TOO_MANY_STOPS = ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(
    "req,code,message",
    [
        (api_pb2.GenerateRequest(text="word " * 20000), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        (request(list(range(1001)), 4), grpc.StatusCode.INVALID_ARGUMENT, "prompt has 1001 tokens; the limit is 1000"),
        (request([1, VOCAB], 4), grpc.StatusCode.INVALID_ARGUMENT, f"prompt token ids must lie in [0, {VOCAB})"),
        (request([-5, 1], 4), grpc.StatusCode.INVALID_ARGUMENT, f"prompt token ids must lie in [0, {VOCAB})"),
        (request(PROMPT, 4, temperature=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0"),
        (request(PROMPT, 4, temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0"),
        (request(PROMPT, 4, top_p=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
        (request(PROMPT, 4, top_k=10**6), grpc.StatusCode.INVALID_ARGUMENT, f"top_k must lie in [0, {VOCAB}]"),
        (request(PROMPT, CONTEXT + 1), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens 4097 is over the limit of 4096"),
        (request(PROMPT, 4, stop=TOO_MANY_STOPS), grpc.StatusCode.INVALID_ARGUMENT, "5 stop strings; the limit is 4"),
        (request(PROMPT, 4, stop=["x" * 33]), grpc.StatusCode.INVALID_ARGUMENT, "longer than the limit of 32"),
        (request(PROMPT, 4, stop_token_ids=range(9)), grpc.StatusCode.INVALID_ARGUMENT, "9 stop token ids"),
        (request(PROMPT, 4, stop_token_ids=[VOCAB]), grpc.StatusCode.INVALID_ARGUMENT, "stop token ids must lie in"),
        (request(PROMPT, 4, stop_token_ids=[-1]), grpc.StatusCode.INVALID_ARGUMENT, "stop token ids must be >= 0"),
        (request(PROMPT, 4, request_id="r" * 129), grpc.StatusCode.INVALID_ARGUMENT, "more than 128 characters"),
        (request(PROMPT, 4, drafter="d" * 20000), grpc.StatusCode.INVALID_ARGUMENT, "unknown drafter 'ddd"),
        (
            api_pb2.GenerateRequest(chat=api_pb2.ChatMessages(messages=[api_pb2.ChatMessage(content="hi " * 2000)])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "the limit is 1000",
        ),
    ],
    ids=[
        "message-size",
        "prompt-tokens",
        "prompt-id-too-big",
        "prompt-id-negative",
        "temperature-inf",
        "temperature-nan",
        "top-p-nan",
        "top-k",
        "max-tokens",
        "stops",
        "stop-length",
        "stop-ids",
        "stop-id-too-big",
        "stop-id-negative",
        "request-id",
        "long-echo",
        "chat-tokens",
    ],
)
def test_grpc_limits(channel: grpc.Channel, req: api_pb2.GenerateRequest, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        generate(channel, req, 60, metadata=ALICE)
    assert failure.value.code() == code and message in failure.value.details()
    assert len(failure.value.details()) < 1100  # a refusal that echoes a huge input is cut


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"prompt": "word " * 20000}, 413, "the body is larger than 65536 bytes"),
        ({"prompt": PROMPT, "temperature": float("nan")}, 400, "temperature"),
        ({"prompt": PROMPT, "temperature": float("inf")}, 400, "temperature"),
        ({"prompt": PROMPT, "top_p": float("nan")}, 400, "top_p"),
        ({"prompt": [1, 10**30]}, 400, f"prompt token ids must lie in [0, {VOCAB})"),
        ({"prompt": list(range(1001))}, 400, "the limit is 1000"),
        ({"prompt": PROMPT, "stop": TOO_MANY_STOPS}, 400, "5 stop strings"),
        ({"prompt": PROMPT, "stop_token_ids": [10**30]}, 400, "stop token ids must lie in"),
        ({"prompt": PROMPT, "top_k": 10**30}, 400, "top_k must lie in"),
        ({"prompt": PROMPT, "seed": 2**64}, 400, "seed"),
        ({"prompt": PROMPT, "max_tokens": 10**30}, 400, "over the limit of 4096"),
    ],
    ids=[
        "body-size",
        "temperature-nan",
        "temperature-inf",
        "top-p-nan",
        "prompt-id",
        "prompt-tokens",
        "stops",
        "stop-id",
        "top-k",
        "seed",
        "max-tokens",
    ],
)
def test_http_limits(
    config: ClusterConfig, certs: dict[str, Path], channel: grpc.Channel, body: dict, status: int, message: str
) -> None:
    code, reply = _https(config, certs, "POST", "/v1/completions", {"model": config.model, **body}, TOKENS["alice"])
    assert code == status and message in reply["error"]["message"], reply


def _long(channel: grpc.Channel, metadata: Metadata, request_id: str = "") -> Iterator[api_pb2.GenerateResponse]:
    """A stream of LONG tokens, once its first delta is out (the session is live)."""
    responses = stream(channel, request(PROMPT, LONG, ignore_eos=True, request_id=request_id), 300, metadata)
    assert next(responses).HasField("delta")
    return responses


def test_streams_per_client(channel: grpc.Channel, config: ClusterConfig, certs: dict[str, Path]) -> None:
    held = [_long(channel, BOB) for _ in range(LIMITS["max_streams_per_client"])]
    try:
        with pytest.raises(grpc.RpcError) as failure:
            generate(channel, request(PROMPT, 4), 60, metadata=BOB)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 requests of this client are running" in failure.value.details()
        body = {"model": config.model, "prompt": PROMPT, "max_tokens": 4}
        assert _https(config, certs, "POST", "/v1/completions", body, TOKENS["bob"])[0] == 429
        assert generate(channel, request(PROMPT, 4), 60, metadata=ALICE).finished  # another client is not held up
    finally:
        for responses in held:
            responses.cancel()
    wait_for(lambda: _code(generate, channel, request(PROMPT, 2), 60, metadata=BOB) == grpc.StatusCode.OK, 30, "bob")


def test_requests_belong_to_their_caller(channel: grpc.Channel) -> None:
    stub = api_pb2_grpc.TandemStub(channel)
    alices = _long(channel, ALICE, request_id="shared")
    try:
        assert _code(generate, channel, request(PROMPT, 2, request_id="shared"), 60, metadata=ALICE) == (
            grpc.StatusCode.ALREADY_EXISTS
        )
        with pytest.raises(grpc.RpcError) as failure:  # bob cannot see it, let alone abort it
            stub.Abort(api_pb2.AbortRequest(request_id="shared"), metadata=BOB)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND and "shared" not in failure.value.details()
        bobs = list(stream(channel, request(PROMPT, 3, request_id="shared"), 60, BOB))  # the same id, his own
        assert {r.request_id for r in bobs} == {"shared"} and bobs[-1].finished.finish_reason == "length"
        stub.Abort(api_pb2.AbortRequest(request_id="shared"), metadata=ALICE)
        last = list(alices)[-1]
        assert last.request_id == "shared" and last.finished.finish_reason == "abort"
    finally:
        alices.cancel()
    assigned = [next(stream(channel, request(PROMPT, 2), 60, ALICE)).request_id for _ in range(2)]
    assert assigned[0] != assigned[1] and all(len(i) == 32 and int(i, 16) >= 0 for i in assigned)


# ---- Fuzzing the gRPC API ----------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
HUGE_OR_NEGATIVE = st.integers(-(2**31), -1) | st.integers(2**20, 2**31 - 1)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
THOUSANDS = st.integers(1000, 300_000)  # list lengths: thousands of stops, up to 1.5 MB prompts


def requests(hostile: bool) -> st.SearchStrategy[bytes]:
    """Serialized GenerateRequests: well-formed ones (every one must stream to its end), or ones in
    which any field may also be hostile: huge, negative or non-finite numbers, thousands of stop
    strings or ids, megabyte prompts, out-of-vocabulary ids, unknown drafters, overlong ids."""

    def field(valid: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
        return valid | bad if hostile else valid

    params = st.builds(
        api_pb2.SamplingParams,
        temperature=field(st.just(0.0) | st.floats(0, 2), ANY_FLOAT),
        top_k=field(st.integers(0, 64), INT32),
        top_p=field(st.none() | st.floats(0.05, 1), ANY_FLOAT),
        max_tokens=field(st.none() | st.integers(1, 24), HUGE_OR_NEGATIVE),
        seed=st.none() | st.integers(0, 2**64 - 1),
        stop=field(
            st.lists(st.text(min_size=1, max_size=8), max_size=3),
            st.lists(st.text(max_size=40), max_size=6) | THOUSANDS.map(lambda n: ["x"] * n),
        ),
        stop_token_ids=field(
            st.lists(st.integers(0, VOCAB - 1), max_size=3),
            st.lists(INT32, max_size=20) | THOUSANDS.map(lambda n: list(range(n))),
        ),
        ignore_eos=st.booleans(),
    )
    message = st.builds(
        api_pb2.ChatMessage,
        role=field(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=20)),
        content=st.text(max_size=200),
    )
    text = field(
        st.text(min_size=1, max_size=200).filter(str.strip),
        st.text(max_size=3) | THOUSANDS.map(lambda n: "word " * n),
    )
    ids = field(
        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
        st.lists(INT32, max_size=40) | THOUSANDS.map(lambda n: [7] * n),
    )
    prompt = field(
        st.builds(dict, text=text)
        | st.builds(dict, chat=st.builds(api_pb2.ChatMessages, messages=st.lists(message, min_size=1, max_size=4)))
        | st.builds(dict, token_ids=st.builds(api_pb2.TokenIds, ids=ids)),
        st.just({}) | st.builds(dict, chat=st.just(api_pb2.ChatMessages())),
    )
    return st.builds(
        lambda prompt, **fields: api_pb2.GenerateRequest(**prompt, **fields).SerializeToString(),
        prompt,
        request_id=field(st.text(max_size=12), st.text(min_size=129, max_size=400)),
        params=params,
        drafter=field(st.sampled_from(["", "none", "ngram"]), st.text(max_size=30)),
    )


def _varint(value: int) -> bytes:
    out = b""
    while value > 0x7F:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def _unknown_fields(data: bytes) -> bytes:
    """``data`` with fields the schema lacks, at the top level and inside ``params`` (field 5:
    proto merges a repeated message field into the one already there)."""
    unknown = _varint(999 << 3) + _varint(2**63) + _varint(1000 << 3 | 2) + _varint(3) + b"abc"
    return data + unknown + _varint(5 << 3 | 2) + _varint(len(unknown)) + unknown


OK = {grpc.StatusCode.OK}
REFUSED = OK | {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
# Bytes that do not parse as a GenerateRequest get INVALID_ARGUMENT (cluster.security.DecodeGuard)
GARBLED = REFUSED
WIRE = st.one_of(  # (bytes on the wire, the answers allowed)
    requests(hostile=False).map(lambda data: (data, OK)),
    requests(hostile=False).map(lambda data: (_unknown_fields(data), OK)),  # unknown fields are ignored
    requests(hostile=True).map(lambda data: (data, REFUSED)),
    requests(hostile=True).map(lambda data: (_unknown_fields(data), REFUSED)),
    st.tuples(requests(hostile=True), st.integers(1, 200)).map(lambda t: (t[0][: -t[1]], GARBLED)),  # truncated
    st.binary(max_size=300).map(lambda data: (data, GARBLED)),
)


def test_fuzzed_requests_leave_the_server_and_other_sessions_intact(
    channel: grpc.Channel, config: ClusterConfig, model: Path
) -> None:
    [expected] = engine_outputs(model, [(PROMPT, LONG)], ignore_eos=True)
    started, done, outputs = threading.Event(), threading.Event(), []

    def decode_meanwhile() -> None:
        """Well-formed sessions back to back, from before the first fuzzed request to after the last."""
        while not done.is_set():
            req = request(PROMPT, LONG, ignore_eos=True)
            outputs.append(generate(channel, req, 300, on_delta=lambda _: started.set(), metadata=CAROL).token_ids)

    raw = channel.unary_stream(
        f"/{api_pb2.DESCRIPTOR.services_by_name['Tandem'].full_name}/Generate",
        request_serializer=lambda data: data,
        response_deserializer=api_pb2.GenerateResponse.FromString,
    )

    def finishes(data: bytes) -> None:
        assert list(raw(data, timeout=120, metadata=ALICE))[-1].HasField("finished")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(WIRE)
    @example((request(PROMPT, 8, temperature=5e-324).SerializeToString(), OK))  # greedy, not NaN
    @example((request([7] * 300_000, 8).SerializeToString(), REFUSED))  # 1.5 MB
    def answered(case: tuple[bytes, set[grpc.StatusCode]]) -> None:
        data, allowed = case
        code = _code(finishes, data)
        assert code in allowed, (code, data[:200])

    with ThreadPoolExecutor(1) as pool:
        meanwhile = pool.submit(decode_meanwhile)
        try:
            assert started.wait(120), "the well-formed session never started"
            answered()
            for port in (int(config.address.rpartition(":")[2]), config.http_host_port[1]):  # no protocol at all
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw_socket:
                    raw_socket.sendall(os.urandom(1 << 16))
        finally:
            done.set()
        meanwhile.result()
    assert outputs and all(token_ids == expected for token_ids in outputs)
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert generate(channel, request(PROMPT, 4), 60, metadata=ALICE).finished.finish_reason == "length"
