"""The application's Prometheus metrics, kept by the routers and served on their ``/metrics``.

A router takes part in every round of each of its sessions (it sends the tree, reads the verdict),
so the router replicas together see every token, round and session of the application. Each keeps
one registry; a scrape, which lands on any one replica, sums them all (:func:`merge`): the whole
picture, with no exporter agent and names exactly as written (``tandem:``, as vLLM's are
``vllm:``). See docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

# A registry's samples as plain data, to pass between processes:
# (name, documentation, type, [(sample name, labels, value)]) per metric family.
Snapshot = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]

POOLS = ("draft", "target")
# Latency buckets (seconds) from a fraction of a CPU round to a slow first token.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 20)
TAU = (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10, 16)

disable_created_metrics()  # no *_created series: the router process exists for the metrics' whole life


class Metrics:
    """One registry per router: tests may run several routers in one process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # the other router replicas' snapshots (set by the router; none: this registry is all)
        self.peers: Callable[[], Awaitable[list[Snapshot]]] | None = None
        counter, gauge = self._bind(Counter), self._bind(Gauge)
        seconds = self._bind(Histogram, buckets=SECONDS)
        # Counters (exposed with the _total suffix)
        self.rounds = counter("tandem:spec_decode_num_rounds", "Verification rounds (target passes after prefill)")
        self.drafted = counter("tandem:spec_decode_num_draft_tokens", "Draft tokens sent to verification")
        self.accepted = counter("tandem:spec_decode_num_accepted_tokens", "Draft tokens the target accepted")
        self.emitted = counter("tandem:spec_decode_num_emitted_tokens", "Tokens rounds produced (accepted + bonus)")
        self.accepted_per_pos = counter(
            "tandem:spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by depth in the tree (0: the first draft token)",
            ["position"],
        )
        self.prompt_tokens = counter("tandem:prompt_tokens", "Prompt tokens of the requests run")
        self.prefix_queries = counter(
            "tandem:prefix_cache_queries", "Prompt tokens looked up in the target's prefix cache (finished requests)"
        )
        self.prefix_hits = counter(
            "tandem:prefix_cache_hits", "Of those, tokens the prefix cache served instead of a prefill"
        )
        self.generation_tokens = counter("tandem:generation_tokens", "Tokens streamed to clients")
        self.requests = counter("tandem:request_success", "Finished requests by finish reason", ["finished_reason"])
        self.resumes = counter(
            "tandem:session_resumes", "Sessions moved to another target replica after losing theirs (none failed)"
        )
        self.failures = counter("tandem:request_failure", "Requests refused or failed, by gRPC status", ["code"])
        # Histograms
        taus = self._bind(Histogram, buckets=TAU)
        self.tau = taus("tandem:request_tau", "τ per drafted request: (accepted + rounds) / rounds")
        self.ttft = seconds("tandem:time_to_first_token_seconds", "Time to first token")
        self.tpot = seconds(
            "tandem:time_per_output_token_seconds", "Per request: (last - first token time) / (output tokens - 1)"
        )
        self.draft_time = seconds("tandem:round_draft_seconds", "Draft call per round (when the drafter is asked)")
        self.verify_time = seconds("tandem:round_verify_seconds", "Verify call per round")
        self.router_time = seconds(
            "tandem:round_router_seconds",
            "Router time per round outside the draft and verify calls (state, detokenizing, streaming out)",
        )
        # Gauges
        self.running = gauge("tandem:num_sessions_running", "Sessions placed on a pool", ["pool"])
        self.waiting = gauge("tandem:num_sessions_waiting", "Sessions waiting for a replica of a pool", ["pool"])
        self.kv_rows = gauge("tandem:kv_rows_in_use", "Target KV cache rows held by live sessions")
        self.kv_blocks = gauge(
            "tandem:kv_blocks_in_use",
            "Target KV cache blocks held by live sessions (a block shared by n sessions counts 1/n each)",
        )
        for pool in POOLS:  # present from the first scrape, at 0
            self.running.labels(pool)
            self.waiting.labels(pool)

    def _bind(self, kind: type, **fixed: object) -> Callable[..., Any]:
        return lambda name, doc, labels=(): kind(name, doc, labels, registry=self.registry, **fixed)

    def record_round(
        self, drafted: int, accepted: int, draft_s: float | None, verify_s: float, router_s: float
    ) -> None:
        """One verification round; ``draft_s`` is None when the drafter was not asked."""
        self.rounds.inc()
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        self.emitted.inc(accepted + 1)
        for position in range(accepted):
            self.accepted_per_pos.labels(str(position)).inc()
        if draft_s is not None:
            self.draft_time.observe(draft_s)
        self.verify_time.observe(verify_s)
        self.router_time.observe(router_s)

    def snapshot(self) -> Snapshot:
        return [
            (m.name, m.documentation, m.type, [(x.name, x.labels, x.value) for x in m.samples])
            for m in self.registry.collect()
        ]

    async def exposition(self) -> bytes:
        """The text format of this registry summed with every other router replica's."""
        others = await self.peers() if self.peers is not None else []
        return merge([self.snapshot(), *others])


def merge(snapshots: Iterable[Snapshot]) -> bytes:
    """The text format of the samples of several registries, added up per series: counters and
    histograms count every replica's events, gauges (sessions, rows held) every replica's holdings."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for snapshot in snapshots:
        for name, documentation, kind, samples in snapshot:
            families.setdefault(name, Metric(name, documentation, kind))
            for sample, labels, value in samples:
                key = (name, sample, tuple(sorted(labels.items())))
                values[key] = values.get(key, 0.0) + value
    for (name, sample, labels), value in values.items():
        families[name].add_sample(sample, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(list(families.values())))
    return generate_latest(registry)


class _Collected:
    """A collector of metric families built elsewhere."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
