"""The OpenAI-compatible HTTP API on a real local Ray, driven by the official ``openai`` client: the
same tokens as through gRPC, streaming and not, chat and completions, errors as OpenAI's error JSON
with 4xx codes (the server keeps serving), a full cluster as 429, and a client that goes away
mid-stream freeing its session on both pools. The tiny random target carries SmolLM2's tokenizer
and chat template, so text and chat requests work as on a real model."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest

from cluster.client import generate, prompt_request
from cluster.config import ClusterConfig
from tandem_proto.v1 import api_pb2
from tests.cluster_helpers import (
    config_for,
    deployment_stats,
    free_port,
    one_torch_thread,  # noqa: F401 - autouse
    running,
    tiny_chat_target,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONTEXT = 512
ROWS = 2  # target KV rows: two long streams fill them, a third request waits, a fourth is refused
LONG = 400  # tokens: a stream that outlives what a test does next to it


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_target(tmp_path_factory.mktemp("openai") / "tiny-chat", CONTEXT)


@pytest.fixture(scope="module")
def config(chat_model: Path) -> ClusterConfig:
    return config_for(
        chat_model,
        free_port(),
        max_model_len=CONTEXT,
        target={"max_ongoing_requests": ROWS, "max_queued_requests": 1},
    )


@pytest.fixture(scope="module")
def channel(config: ClusterConfig) -> Iterator[grpc.Channel]:
    with running(config) as channel:
        yield channel


@pytest.fixture(scope="module")
def client(config: ClusterConfig, channel: grpc.Channel) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{config.http_address}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(config: ClusterConfig) -> str:
    return config.model


def _http(config: ClusterConfig, method: str, path: str, body: object = None) -> tuple[int, str, list[str]]:
    """A raw request (bytes are sent as they are): status, content type, the body's lines."""
    host, port = config.http_host_port
    connection = http.client.HTTPConnection(host, port, timeout=120)
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, content, {"content-type": "application/json"})
    response = connection.getresponse()
    lines = response.read().decode().splitlines()
    connection.close()
    return response.status, response.getheader("content-type", ""), lines


def _no_live_sessions() -> bool:
    return deployment_stats("Target")["sessions"] == 0 and deployment_stats("Draft")["sessions"] == 0


def test_models_and_health(client: openai.OpenAI, config: ClusterConfig, model: str) -> None:
    assert [m.id for m in client.models.list()] == [model]
    assert client.models.retrieve(model).id == model
    assert _http(config, "GET", "/health") == (200, "application/json", ['{"status":"ok"}'])


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 7}], ids=["greedy", "seeded"]
)
def test_http_and_grpc_give_the_same_tokens(
    client: openai.OpenAI, channel: grpc.Channel, model: str, sampling: dict
) -> None:
    text = "The cache holds the keys and the values, the keys and the values."
    completion = client.completions.create(
        model=model, prompt=text, max_tokens=24, extra_body={"return_token_ids": True}, **sampling
    )
    params = api_pb2.SamplingParams(max_tokens=24, **sampling)
    expected = generate(channel, prompt_request(text, raw=True, params=params), timeout=120)
    [choice] = completion.choices
    assert choice.token_ids == expected.token_ids and choice.text == expected.text
    usage = completion.usage
    assert usage.completion_tokens == 24 and usage.prompt_tokens == expected.finished.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + 24
    assert (usage.rounds, usage.drafted_tokens, usage.accepted_tokens) == (
        expected.finished.usage.rounds,
        expected.finished.usage.drafted_tokens,
        expected.finished.usage.accepted_tokens,
    )
    assert usage.tau == pytest.approx(expected.finished.usage.tau)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=16, extra_body={"return_token_ids": True}, **sampling
    )
    grpc_chat = api_pb2.GenerateRequest(
        chat=api_pb2.ChatMessages(messages=[api_pb2.ChatMessage(**m) for m in messages]),
        params=api_pb2.SamplingParams(max_tokens=16, **sampling),
    )
    expected = generate(channel, grpc_chat, timeout=120)
    assert chat.choices[0].token_ids == expected.token_ids
    assert chat.choices[0].message.content == expected.text and chat.choices[0].message.role == "assistant"


def test_streams_add_up_to_the_whole_response(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "Write a haiku about caches."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1]) and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.rounds == whole.usage.rounds

    completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    streamed = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_a_broken_stream_continues_with_the_same_text(client: openai.OpenAI, model: str) -> None:
    """A client whose stream broke after some chunks sends their token ids and the seed back: the
    text of the rest completes the text it has, exactly (sampled, target-only: the same draws)."""
    body = {"return_token_ids": True, "drafter": "none"}
    kwargs = {"model": model, "prompt": "Once upon a time", "max_tokens": 30, "temperature": 0.8, "top_p": 0.9}
    chunks = [c for c in client.completions.create(**kwargs, stream=True, extra_body=body) if c.choices]
    whole = "".join(c.choices[0].text for c in chunks)
    [seed] = {c.model_extra["seed"] for c in chunks}
    for cut in (1, len(chunks) // 2):
        received = [t for c in chunks[:cut] for t in c.choices[0].token_ids]
        text = "".join(c.choices[0].text for c in chunks[:cut])
        extra = {**body, "continue_token_ids": received}
        rest = client.completions.create(**kwargs, seed=seed, extra_body=extra)
        assert received + rest.choices[0].token_ids == [t for c in chunks for t in c.choices[0].token_ids]
        assert text + rest.choices[0].text == whole and rest.usage.completion_tokens == 30


def test_stop_strings_and_token_prompts(client: openai.OpenAI, model: str) -> None:
    first = client.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=12, temperature=0)
    text = first.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = client.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_sse_ends_with_done(config: ClusterConfig, model: str) -> None:
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "stream": True}
    status, content_type, lines = _http(config, "POST", "/v1/completions", body)
    assert status == 200 and content_type.startswith("text/event-stream")
    events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e.removeprefix("data: "))["object"] == "text_completion" for e in events[:-1])


USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": USER, "max_tokens": -1}, 400, "max_tokens"),
        ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": USER, "max_tokens": CONTEXT}, 400, "the context holds 512 tokens"),
        ({"messages": [{"role": "user", "content": "word " * CONTEXT}]}, 400, "the context holds 512"),
        ({"messages": USER, "model": "gpt-7"}, 404, "the model 'gpt-7' does not exist"),
        ({"messages": USER, "n": 2}, 400, "n must be 1"),
        ({"messages": USER, "temperature": -1}, 400, "temperature"),
        ({"messages": USER, "temperature": float("inf")}, 400, "temperature"),
        ({"messages": USER, "stop_token_ids": [60000]}, 400, "stop token ids must lie in [0, 49152)"),
        ({"messages": USER, "top_p": 0}, 400, "top_p"),
        ({"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options needs stream"),
        ({"messages": USER, "logprobs": True}, 400, "logprobs is not supported"),
        ({"messages": USER, "drafter": "eagle9"}, 400, "unknown drafter 'eagle9'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ],
    ids=[
        "no-messages",
        "max-tokens-negative",
        "max-tokens-zero",
        "max-tokens-oversized",
        "prompt-too-long",
        "unknown-model",
        "n",
        "temperature",
        "temperature-inf",
        "stop-id",
        "top-p",
        "stream-options",
        "logprobs",
        "drafter",
        "image",
    ],
)
def test_bad_chat_requests(config: ClusterConfig, model: str, body: dict, status: int, message: str) -> None:
    code, _, lines = _http(config, "POST", "/v1/chat/completions", {"model": model, **body})
    assert code == status, lines
    error = json.loads(lines[0])["error"]
    assert message in error["message"] and error["type"] and "param" in error


@pytest.mark.parametrize(
    "content,status,message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "dictionary"),
        (json.dumps({"prompt": "hi"}).encode(), 400, "model"),
        (json.dumps({"model": "M", "prompt": ""}).encode(), 400, "prompt is empty"),
        (json.dumps({"model": "M", "prompt": []}).encode(), 400, "prompt is empty"),
        (json.dumps({"model": "M", "prompt": ["a", "b"]}).encode(), 400, "one prompt per request"),
        (json.dumps({"model": "M", "prompt": [1, 60000]}).encode(), 400, "prompt token ids must lie in"),
        (json.dumps({"model": "M", "prompt": list(range(600))}).encode(), 400, "prompt has 600 tokens"),
    ],
    ids=["bad-json", "not-an-object", "no-model", "empty-text", "empty-ids", "batch", "vocab", "too-long"],
)
def test_bad_completion_requests(
    config: ClusterConfig, client: openai.OpenAI, model: str, content: bytes, status: int, message: str
) -> None:
    code, _, lines = _http(config, "POST", "/v1/completions", content.replace(b'"M"', json.dumps(model).encode()))
    assert code == status, lines
    assert message in json.loads(lines[0])["error"]["message"]
    assert client.completions.create(model=model, prompt="still serving", max_tokens=2).choices[0].text is not None


def test_openai_client_raises_its_own_errors(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=model, messages=USER, n=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-7", prompt="hi")


def test_a_client_gone_mid_stream_frees_both_pools(client: openai.OpenAI, model: str) -> None:
    def read_and_leave(index: int) -> int:
        # Serve's count of the earlier tests' calls may lag their end by a moment; until it catches up
        # the one queue place (max_queued_requests: 1) may be taken: admission is not what this tests.
        patient = client.with_options(max_retries=5)  # the openai client backs off on 429
        stream = patient.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Count to a thousand, {index}."}],
            max_tokens=LONG,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = 0
        for _ in stream:
            chunks += 1
            if chunks == 5:
                break
        stream.close()  # the connection goes away; the server never finishes this stream
        return chunks

    with ThreadPoolExecutor(ROWS) as pool:
        assert list(pool.map(read_and_leave, range(ROWS))) == [5] * ROWS
    wait_for(_no_live_sessions, 30, "the abandoned sessions' state to be freed on both pools")
    assert client.completions.create(model=model, prompt="after", max_tokens=3).usage.completion_tokens == 3


def test_a_full_cluster_answers_429(client: openai.OpenAI, config: ClusterConfig, model: str) -> None:
    """Every target row taken and the one queue place too (max_queued_requests: 1): refused. Last in
    the module: Serve's count of a replica's calls may lag the streams' end by a moment."""
    streams = [
        client.completions.create(
            model=model, prompt=[9, 10, 11], max_tokens=LONG, stream=True, extra_body={"ignore_eos": True}
        )
        for _ in range(ROWS)
    ]
    with ThreadPoolExecutor(1) as pool:
        try:
            for stream in streams:
                next(iter(stream))  # both are decoding
            queued = pool.submit(client.completions.create, model=model, prompt="waits", max_tokens=3)
            wait_for(lambda: _waiting(config, "target") == 1, 30, "a session to queue for the target pool")
            with pytest.raises(openai.RateLimitError, match="the cluster is full"):
                client.completions.create(model=model, prompt="one more", max_tokens=4)
        finally:
            for stream in streams:
                stream.close()
        assert queued.result().usage.completion_tokens == 3  # served once a row was free
    wait_for(_no_live_sessions, 30, "the streams' sessions to be freed")


def _waiting(config: ClusterConfig, pool: str) -> float:
    _, _, lines = _http(config, "GET", "/metrics")
    [value] = [line.split()[-1] for line in lines if line.startswith(f'tandem:num_sessions_waiting{{pool="{pool}"}}')]
    return float(value)
