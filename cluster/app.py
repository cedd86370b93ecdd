"""The Serve application: Router (ingress: gRPC itself, HTTP through Serve's proxy) -> Draft pool
and Target pool, built from a config.

``tandem serve`` calls :func:`start` (a local Ray on the loopback, or ``ray.address``); Serve
config files, as in the KubeRay manifests, name :func:`build` as their import path.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import ClusterConfig, ConfigError, load_config
from cluster.router import Router
from cluster.security import http_tls_options
from tandem.drafters import check_drafter_name, trained_folder
from tandem.drafters.formats import drafter_config, published_format
from tandem.drafters.neural import read_json_config
from tandem.errors import InvalidRequest
from tandem.models.catalog import resolve_model_path
from tandem.models.loading import read_model_config, resolve_model_dir
from workers.draft_worker import DraftSpec, DraftWorker
from workers.target_worker import TargetSpec, TargetWorker
from workers.tp import ShardSpec

APP_NAME = "tandem"
RELAY_CPUS = 0.05  # a tp > 1 replica only relays calls to its rank actors
ROUTER_STOP_S = 5.0  # beyond the grace period: the router's own drain and gRPC server stop


def build_app(config: ClusterConfig) -> Application:
    feature_layers = drafter_feature_layers(config)
    target = _target_deployment(config).bind(_target_spec(config, feature_layers))
    draft = None
    if config.has_draft_pool:
        pool = config.draft
        spec = DraftSpec(
            drafter=pool.drafter,
            model=config.model,
            dtype=config.dtype,
            feature_layers=feature_layers,
            batch_wait_s=pool.batch_wait_ms / 1000,
            threads=pool.threads,
            host=config.worker_host,
            device=pool.torch_device,
            tls=config.internal_tls,
        )
        options = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "resources": dict(pool.resources)}
        pool_options = pool.serve_options(config.grace_period_s)
        draft = serve.deployment(DraftWorker, name="Draft", ray_actor_options=options, **pool_options)
        draft = draft.bind(spec)
    router = serve.deployment(
        serve.ingress()(Router),  # its HTTP app is built in the replica (Router.__serve_build_asgi_app__)
        name="Router",
        num_replicas=config.router.num_replicas,  # they share the public gRPC port
        max_ongoing_requests=config.router.max_ongoing_requests,
        graceful_shutdown_timeout_s=config.grace_period_s + ROUTER_STOP_S,
        ray_actor_options={"num_cpus": config.router.num_cpus, "resources": dict(config.router.resources)},
    )
    return router.bind(config, draft, target)


def drafter_feature_layers(config: ClusterConfig) -> tuple[int, ...]:
    """The target layers the draft pool's drafter reads, from its config.json (untrained drafters
    read none): the target pool computes exactly these, without loading the drafter here."""
    if not config.has_draft_pool:
        return ()
    name = config.draft.drafter
    try:
        check_drafter_name(name)
        folder = trained_folder(name, config.model)
    except InvalidRequest as exc:
        raise ConfigError(f"draft.drafter {name!r}: {exc}") from None
    if folder is None:
        return ()
    target = None  # a published drafter's layer ids may default from the target's depth
    if published_format(read_json_config(folder)) is not None:
        target = read_model_config(resolve_model_path(config.model))
    return tuple(drafter_config(folder, target).feature_layers)


def _target_spec(config: ClusterConfig, feature_layers: tuple[int, ...]) -> TargetSpec:
    pool = config.target
    shard = ShardSpec(
        model=config.model,
        dtype=config.dtype,
        rows=pool.max_ongoing_requests,
        max_model_len=config.max_model_len,
        feature_layers=feature_layers,
        threads=pool.threads,
        device=pool.torch_device,
        exact=pool.exact,
        kv_blocks=pool.kv_blocks or 16 * -(-config.max_model_len // pool.block_size),
        block_size=pool.block_size,
        prefix_caching=pool.prefix_caching,
    )
    wait_s = pool.batch_wait_ms / 1000
    return TargetSpec(
        shard,
        pool.tp,
        pool.num_cpus,
        pool.num_gpus,
        wait_s,
        config.worker_host,
        pool.schedule,
        pool.prefill_chunk,
        config.internal_tls,
    )


def _target_deployment(config: ClusterConfig) -> serve.Deployment:
    pool = config.target
    rank = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {}), **pool.resources}
    if pool.tp == 1:
        actor = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "resources": dict(pool.resources)}
        options: dict[str, Any] = {"ray_actor_options": actor}
    else:  # bundle 0: the replica; bundles 1..tp: its ranks, all on one node
        options = {
            "ray_actor_options": {"num_cpus": RELAY_CPUS},
            "placement_group_bundles": [{"CPU": RELAY_CPUS}] + [rank] * pool.tp,
            "placement_group_strategy": "STRICT_PACK",
        }
    if pool.prefix_caching:  # sessions go where their prompt's blocks likely are
        router = RequestRouterConfig(request_router_class="cluster.prefix_routing:PrefixAwareRouter")
        options["request_router_config"] = router
    return serve.deployment(TargetWorker, name="Target", **options, **pool.serve_options(config.grace_period_s))


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``args`` may name a ``config`` file and override its top-level keys."""
    args = dict(args)
    return build_app(load_config(args.pop("config", None), **args))


def connect(config: ClusterConfig) -> None:
    """Start (or join) Ray: ``ray.address``, or a local cluster on the loopback."""
    start_ray(config.ray.address, config.ray.num_cpus)


def start_ray(address: str | None, num_cpus: float | None = None, dashboard: bool = False) -> None:
    """Join the Ray cluster at ``address``, or start a private one on the loopback (with the
    dashboard when asked: Ray Train's state API queries go through it)."""
    import ray

    if ray.is_initialized():
        return
    if address:  # an existing cluster keeps its own settings, authentication included
        ray.init(address=address)
        return
    # A private cluster on the loopback: this box's Ray needs both to start one.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, _node_ip_address="127.0.0.1")


def start(config: ClusterConfig) -> None:
    """Run the application (connecting to Ray first if needed); returns once every replica is up."""
    connect(config)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Tandem prints its own lines
    # Convert a GGUF model once here, rather than in every replica at the same time.
    resolve_model_dir(resolve_model_path(config.model))
    host, port = config.http_host_port
    # Serve logs every call (and every replica change) at INFO: noise next to Tandem's own lines.
    quiet = {"log_level": "WARNING"}
    http_options = {"host": host, "port": port, **http_tls_options(config.tls)}
    serve.start(proxy_location="HeadOnly", http_options=http_options, logging_config=quiet)
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", logging_config=quiet)
