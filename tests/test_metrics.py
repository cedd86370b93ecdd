"""``/metrics`` on a real local Ray, scraped after requests through both APIs: every metric is there
in Prometheus text format, in the ``tandem:`` namespace, and its value agrees with the usage the
requests reported (rounds, drafted, accepted and emitted tokens, acceptance by position, one τ /
TTFT / TPOT observation per request, per-round timings, prefix-cache hits), and the gauges are back at 0. Two
router replicas serve it: a scrape that lands on either sums both."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import ClusterConfig
from cluster.metrics import Metrics, merge
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


def test_merge_sums_every_series_of_every_registry() -> None:
    one, two = Metrics(), Metrics()
    one.record_round(4, 2, 0.01, 0.02, 0.001)
    two.record_round(6, 3, None, 0.5, 0.002)
    two.record_round(1, 0, 0.03, 0.01, 0.001)
    one.running.labels("target").inc(2)
    two.running.labels("target").inc()
    two.failures.labels("UNAVAILABLE").inc()  # a series only one registry has
    merged = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merge([one.snapshot(), two.snapshot()]).decode())
        for s in family.samples
    }
    assert merged[("tandem:spec_decode_num_rounds_total", ())] == 3
    assert merged[("tandem:spec_decode_num_draft_tokens_total", ())] == 11
    assert merged[("tandem:spec_decode_num_accepted_tokens_per_pos_total", (("position", "2"),))] == 1
    assert merged[("tandem:round_verify_seconds_count", ())] == 3
    assert merged[("tandem:round_verify_seconds_sum", ())] == pytest.approx(0.53)
    assert merged[("tandem:round_verify_seconds_bucket", (("le", "0.02"),))] == 2
    assert merged[("tandem:round_draft_seconds_count", ())] == 2  # not asked: not observed
    assert merged[("tandem:num_sessions_running", (("pool", "target"),))] == 3
    assert merged[("tandem:request_failure_total", (("code", "UNAVAILABLE"),))] == 1


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ClusterConfig:
    model = tiny_target(tmp_path_factory.mktemp("metrics") / "tiny")
    # a scrape must sum both routers; blocks of 4 tokens: PROMPTS[0], sent twice, hits the prefix cache
    return config_for(model, free_port(), router={"num_replicas": 2}, target={"block_size": 4})


@pytest.fixture(scope="module")
def channel(config: ClusterConfig) -> Iterator[grpc.Channel]:
    with running(config) as channel:
        yield channel


def _scrape(config: ClusterConfig) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The content type, and every sample by (name, labels)."""
    with urllib.request.urlopen(f"http://{config.http_address}/metrics", timeout=30) as response:
        content_type, text = response.headers["content-type"], response.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return content_type, samples


def test_metrics_add_up_to_the_requests(config: ClusterConfig, channel: grpc.Channel) -> None:
    client = openai.OpenAI(base_url=f"http://{config.http_address}/v1", api_key="unused", max_retries=0, timeout=120)
    usages = [
        client.completions.create(
            model=config.model, prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
        ).usage
        for prompt in PROMPTS[:2]
    ]
    grpc_usages = [run(channel, request(p, 30, ignore_eos=True)).finished.usage for p in PROMPTS[2:]]
    grpc_usages.append(run(channel, request(PROMPTS[0], 10, drafter="none", ignore_eos=True)).finished.usage)
    rounds = sum(u.rounds for u in usages) + sum(u.rounds for u in grpc_usages)
    drafted = sum(u.drafted_tokens for u in usages) + sum(u.drafted_tokens for u in grpc_usages)
    accepted = sum(u.accepted_tokens for u in usages) + sum(u.accepted_tokens for u in grpc_usages)
    emitted = sum(u.completion_tokens for u in usages) + sum(u.completion_tokens for u in grpc_usages)
    assert accepted > 0  # the prompts repeat themselves: the n-gram drafter has something to propose

    def value(name: str, **labels: str) -> float:
        return samples[(f"tandem:{name}", tuple(sorted(labels.items())))]

    wait_for(lambda: _scrape(config)[1][("tandem:kv_rows_in_use", ())] == 0, 30, "the sessions to be closed")
    content_type, samples = _scrape(config)
    assert content_type.startswith("text/plain") and all(name.startswith("tandem:") for name, _ in samples)
    requests = 5
    assert value("spec_decode_num_rounds_total") == rounds
    assert value("spec_decode_num_draft_tokens_total") == drafted
    assert value("spec_decode_num_accepted_tokens_total") == accepted
    # Every round emits its accepted drafts plus one bonus token; the prefill emits the first token.
    assert value("spec_decode_num_emitted_tokens_total") == accepted + rounds == emitted - requests
    assert value("generation_tokens_total") == emitted
    prompt_tokens = sum(u.prompt_tokens for u in usages + grpc_usages)
    cached = [u.prompt_tokens_details.cached_tokens for u in usages] + [u.cached_tokens for u in grpc_usages]
    assert value("prompt_tokens_total") == value("prefix_cache_queries_total") == prompt_tokens
    assert value("prefix_cache_hits_total") == sum(cached) and cached[-1] == 8  # PROMPTS[0] again: 2 blocks
    by_position = {
        int(dict(labels)["position"]): count
        for (name, labels), count in samples.items()
        if name == "tandem:spec_decode_num_accepted_tokens_per_pos_total"
    }
    per_position = [by_position[i] for i in range(len(by_position))]  # positions 0.. with no gap
    assert sum(per_position) == accepted and per_position == sorted(per_position, reverse=True)
    assert value("request_success_total", finished_reason="length") == requests
    assert value("request_tau_count") == requests - 1  # the target-only request drafted nothing
    assert value("request_tau_sum") == pytest.approx(sum(u.tau for u in usages + grpc_usages[:-1]))
    assert value("time_to_first_token_seconds_count") == value("time_per_output_token_seconds_count") == requests
    assert value("round_verify_seconds_count") == value("round_router_seconds_count") == rounds
    assert 0 < value("round_draft_seconds_count") <= rounds
    assert value("time_to_first_token_seconds_sum") > 0 and value("round_verify_seconds_sum") > 0
    assert value("time_to_first_token_seconds_bucket", le="+Inf") == requests
    for pool in ("draft", "target"):
        assert value("num_sessions_running", pool=pool) == value("num_sessions_waiting", pool=pool) == 0
    assert value("kv_blocks_in_use") == 0


def test_refusals_are_counted(config: ClusterConfig, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError):
        run(channel, request([1, 2], 8, temperature=-1))
    with pytest.raises(grpc.RpcError):
        run(channel, request([1, 99], 8))  # refused by the target worker: outside the vocabulary
    _, samples = _scrape(config)
    assert samples[("tandem:request_failure_total", (("code", "INVALID_ARGUMENT"),))] == 2


def test_live_sessions_show_in_the_gauges(config: ClusterConfig, channel: grpc.Channel) -> None:
    from cluster.client import stream

    responses = stream(channel, request(PROMPTS[1], 4000, ignore_eos=True), timeout=120)
    assert next(responses).HasField("delta")
    _, samples = _scrape(config)
    assert samples[("tandem:kv_rows_in_use", ())] == 1
    assert samples[("tandem:kv_blocks_in_use", ())] >= 1  # the prompt's block at least, held alone
    assert samples[("tandem:num_sessions_running", (("pool", "target"),))] == 1
    assert samples[("tandem:num_sessions_running", (("pool", "draft"),))] == 1
    responses.cancel()
    wait_for(lambda: _scrape(config)[1][("tandem:kv_rows_in_use", ())] == 0, 30, "the cancelled session to close")
