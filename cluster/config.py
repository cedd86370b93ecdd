"""The cluster's YAML config: model, public address, and one section per Serve deployment.

Every key has a default (configs/local.yaml spells them out); unknown keys are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tandem.drafters import default_drafter
from tandem.errors import TandemError
from tandem.models.catalog import DEFAULT_MODEL
from workers.tls import InternalTls

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_HTTP_ADDRESS = "127.0.0.1:8000"


class ConfigError(TandemError):
    """A config file that cannot be read or has wrong keys or values."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # an existing cluster; None: start a local one on the loopback
    num_cpus: float | None = None  # of the local cluster; None: every core


@dataclass(frozen=True)
class RouterConfig:
    # replicas serving the public API; on one node they share its port (SO_REUSEPORT), so losing
    # one costs its streams a reconnect (clients continue them: cluster/client.py), never the service
    num_replicas: int = 2
    num_cpus: float = 0.1
    draft_timeout_s: float = 5.0  # a drafter silent this long is dropped: the session goes on target-only
    # a session whose target replica is lost looks this long for another (or the restarted one)
    resume_timeout_s: float = 60.0
    resources: dict[str, float] = field(default_factory=dict)  # e.g. pin the router to the head node
    max_ongoing_requests: int = 1024  # HTTP requests in flight through Serve's proxy (gRPC ones are not capped)
    # sessions take turns in this many groups: a pool batches one group at a time, so with 2 one
    # group verifies while the other drafts (both pools busy at once); 1: every session in lockstep
    pipeline_groups: int = 1

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ConfigError(f"router.num_replicas must be >= 1, got {self.num_replicas}")
        if self.pipeline_groups < 1:
            raise ConfigError(f"router.pipeline_groups must be >= 1, got {self.pipeline_groups}")


@dataclass(frozen=True)
class PoolConfig:
    """Serve settings shared by both worker pools."""

    num_cpus: float = 0.5  # per replica (target: per TP rank); torch gets this many threads, at least 1
    num_gpus: float = 0.0  # per replica (target: per TP rank: 0 or 1, one GPU per NCCL rank)
    device: str = "auto"  # where its tensors live: auto (cuda when num_gpus > 0), cpu or cuda
    max_ongoing_requests: int = 16  # live sessions per replica (the target pool sets its own)
    max_queued_requests: int = -1  # sessions waiting for a replica before RESOURCE_EXHAUSTED; -1: no cap
    batch_wait_ms: float = 2.0  # continuous batching window
    num_replicas: int = 1  # without autoscaling_config
    autoscaling_config: dict[str, Any] | None = None  # Serve's AutoscalingConfig, as is
    # custom Ray resources per replica (target: per rank), e.g. {"gpu-node": 1} pins a pool to labelled nodes
    resources: dict[str, float] = field(default_factory=dict)
    max_replicas_per_node: int | None = None  # spread replicas over nodes, so one node lost takes one replica
    health_check_period_s: float = 5.0  # Serve probes each replica this often and replaces one that fails

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.num_gpus < 0:
            raise ConfigError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.device == "cuda" and not self.num_gpus:
            raise ConfigError("device cuda needs num_gpus > 0: Ray gives a replica only the GPUs it asks for")
        if self.device == "cpu" and self.num_gpus:
            raise ConfigError("device cpu with num_gpus > 0 would hold GPUs it never uses")
        if self.max_replicas_per_node is not None and self.max_replicas_per_node < 1:
            raise ConfigError(f"max_replicas_per_node must be >= 1, got {self.max_replicas_per_node}")
        if self.health_check_period_s <= 0:
            raise ConfigError(f"health_check_period_s must be > 0, got {self.health_check_period_s}")

    @property
    def threads(self) -> int | None:
        """Torch threads per replica (target: per rank): its CPU share, at least 1 (the target
        pool may leave it to the replica: None)."""
        return max(1, int(self.num_cpus))

    @property
    def torch_device(self) -> str:
        """``cuda`` (the replica's own GPU: Ray exposes it as device 0) or ``cpu``."""
        return "cuda" if self.num_gpus else "cpu"

    def serve_options(self, grace_period_s: float) -> dict[str, Any]:
        """Serve's deployment options; a replica being stopped lets its sessions finish first."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": grace_period_s,
            "health_check_period_s": self.health_check_period_s,
        }
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        if self.autoscaling_config:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas
        return options


@dataclass(frozen=True)
class DraftConfig(PoolConfig):
    # "default": the fastest shipped for the model (tandem.drafters.default_drafter); a name (dspark,
    # eagle3, dflash: shipped for the model, trees by default, NAME:TOPK,DEPTH,BUDGET or NAME:chain;
    # ngram, ngram-tree, suffix, hybrid), a folder, or "none"
    drafter: str = "default"
    max_draft_nodes: int = 16
    num_cpus: float = 0.25


@dataclass(frozen=True)
class TargetConfig(PoolConfig):
    tp: int = 1
    # the draft scheduler: verify only the draft nodes that pay on this hardware (profiled once)
    schedule: bool = True
    # batch-invariant kernels (tandem/kernels): null = on where they run (bf16 and float32 on AVX2
    # CPUs), true = required, false = the stock kernels
    exact: bool | None = None
    # prompt tokens per prefill pass; running sessions' rounds go between the parts (null: whole)
    prefill_chunk: int | None = 512
    # live sessions per replica: each takes KV-cache blocks as it grows, not a whole context
    max_ongoing_requests: int = 64
    # the paged KV cache per rank: blocks of block_size tokens, each block_size * layers * 2 *
    # kv_heads * head_dim values in the model's dtype; null: the memory 16 sessions of
    # max_model_len take (16 * max_model_len / block_size blocks: 0.75 GB for SmolLM2-135M bf16
    # at 2,048 tokens). A session is admitted when its prompt's blocks are free; one that cannot
    # grow is preempted (ABORTED), and its router resumes it when blocks are free again
    kv_blocks: int | None = None
    block_size: int = 16
    # prefix caching: full blocks stay indexed after their sessions (prompts, and whole sequences
    # once they end) until a session needs the room (LRU), so a prompt that starts like an earlier
    # one (a system prompt, a chat's earlier turns, a resumed session) shares them instead of
    # prefilling them again; sessions are placed where their prompt's blocks were placed before
    prefix_caching: bool = True
    # torch threads per rank; null: its CPU share (num_cpus), or, for a pool of one replica per node
    # (num_replicas 1 without autoscaling, or max_replicas_per_node 1), every core of the node / tp:
    # the pools take turns, so the target may use the whole machine while it verifies
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"target.prefill_chunk must be >= 1 or null, got {self.prefill_chunk}")
        if (self.kv_blocks is not None and self.kv_blocks < 1) or self.block_size < 1:
            raise ConfigError(
                f"target.kv_blocks must be >= 1 or null and target.block_size >= 1, "
                f"got {self.kv_blocks} and {self.block_size}"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"target.torch_threads must be >= 1 or null, got {self.torch_threads}")

    @property
    def threads(self) -> int | None:
        """``torch_threads``; None: every core of the rank's node / tp (resolved there)."""
        if self.torch_threads is not None:
            return self.torch_threads
        alone = self.max_replicas_per_node == 1 or (not self.autoscaling_config and self.num_replicas == 1)
        return None if alone and not self.num_gpus else super().threads


@dataclass(frozen=True)
class LimitsConfig:
    """What one request, or one client, may ask of the public APIs (gRPC and HTTP alike)."""

    max_request_bytes: int = 1 << 20  # a gRPC message or an HTTP body (RESOURCE_EXHAUSTED / 413)
    max_prompt_tokens: int | None = None  # None: what the context holds (max_model_len - 1)
    max_tokens: int | None = None  # a request's max_tokens; None: up to the end of the context
    max_stop: int = 16  # stop strings per request
    max_stop_length: int = 256  # characters of one stop string
    max_stop_token_ids: int = 64
    # requests streaming at once per client (its token's name, else its host): RESOURCE_EXHAUSTED / 429
    max_streams_per_client: int = 64

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"limits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the public ports: the gRPC API, and Serve's HTTP proxy where `tandem serve` starts it."""

    cert_file: str | None = None  # PEM certificate chain; with key_file, TLS is on
    key_file: str | None = None
    client_ca_file: str | None = None  # gRPC only: clients must present a certificate this CA signed

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("tls needs both cert_file and key_file")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("tls.client_ca_file needs cert_file and key_file")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class AuthConfig:
    """Bearer tokens for the public APIs, one per line (``NAME:TOKEN`` or a bare token); read by the
    router from a file or an environment variable, so they never appear on a command line or in
    the Serve application's arguments."""

    tokens_file: str | None = None
    tokens_env: str | None = None  # the name of an environment variable holding them (whitespace-separated)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file or self.tokens_env)


@dataclass(frozen=True)
class ClusterConfig:
    address: str = DEFAULT_ADDRESS  # the public gRPC API
    http_address: str = DEFAULT_HTTP_ADDRESS  # Serve's HTTP proxy: the OpenAI API, /health, /metrics
    grace_period_s: float = 30.0  # on shutdown or scale-down, live sessions get this long to finish
    model: str = DEFAULT_MODEL
    dtype: str = "bfloat16"
    max_model_len: int = 2048  # tokens per session (prompt + output); sizes the KV cache rows
    worker_host: str = "127.0.0.1"  # where workers' gRPC servers bind; 0.0.0.0 on multi-node clusters
    ray: RayConfig = field(default_factory=RayConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    # mutual TLS on the router's streams to both pools (cert_file, key_file, ca_file, server_name):
    # for a multi-node cluster whose worker_host is reachable from other machines
    internal_tls: InternalTls = field(default_factory=InternalTls)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.target.tp < 1 or self.max_model_len < 2 or self.draft.max_draft_nodes < 0:
            raise ConfigError("need target.tp >= 1, max_model_len >= 2 and draft.max_draft_nodes >= 0")
        if self.target.tp > 1 and self.target.max_replicas_per_node is not None:
            raise ConfigError(
                "target.max_replicas_per_node needs tp = 1: a tp group is one placement group, "
                "packed on one node; pin groups to nodes with target.resources instead"
            )
        if self.target.num_gpus not in (0, 1):
            raise ConfigError(
                f"target.num_gpus is per tensor-parallel rank and must be 0 or 1 (one GPU per NCCL rank), "
                f"got {self.target.num_gpus}; use target.tp for more GPUs per replica"
            )
        if self.target.exact not in (None, True, False):
            raise ConfigError(f"target.exact must be true, false or null (auto), got {self.target.exact!r}")
        if self.grace_period_s < 0:
            raise ConfigError(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        files = (self.internal_tls.cert_file, self.internal_tls.key_file, self.internal_tls.ca_file)
        if any(files) and not all(files):
            raise ConfigError("internal_tls needs cert_file, key_file and ca_file, or none of them")
        host, _, port = self.http_address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"http_address must be HOST:PORT, got {self.http_address!r}")
        if self.draft.drafter == "default":  # frozen: resolved once, here
            object.__setattr__(self, "draft", dataclasses.replace(self.draft, drafter=default_drafter(self.model)))

    @property
    def http_host_port(self) -> tuple[str, int]:
        host, _, port = self.http_address.rpartition(":")
        return host, int(port)

    @property
    def has_draft_pool(self) -> bool:
        return self.draft.drafter != "none"


def load_config(path: str | Path | None = None, **overrides: Any) -> ClusterConfig:
    """The config at ``path`` (None: all defaults), top-level keys replaced by ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {str(path)!r}: {exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse(ClusterConfig, data, "config")


def parse(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a YAML mapping, recursing into nested sections."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown keys in {where}: {', '.join(unknown)}; known: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        kind = fields[name].type
        if dataclasses.is_dataclass(_nested.get(kind)):
            value = parse(_nested[kind], value, f"{where}.{name}")
        elif kind.startswith("tuple"):
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


# Field types are strings (postponed annotations); the sections that are dataclasses themselves.
_nested = {
    c.__name__: c
    for c in (RayConfig, RouterConfig, DraftConfig, TargetConfig, LimitsConfig, TlsConfig, AuthConfig, InternalTls)
}
