"""``tandem serve``, ``tandem drain`` and ``tandem client``: registered with the ``tandem`` command
through the ``tandem.commands`` entry point group, so the core CLI never imports the cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.errors import TandemError

if TYPE_CHECKING:
    from cluster.config import ClusterConfig

TOKEN_ENV = "TANDEM_API_KEY"  # `tandem client`'s token, unless --token-file (never a flag: argv is public)


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="start a local Ray cluster serving the gRPC and OpenAI APIs (SIGTERM or Ctrl-C drains it)"
    )
    p.add_argument("--config", help="cluster YAML (default: all defaults, see configs/local.yaml)")
    p.add_argument("--address", help="public gRPC address (default: the config's, 127.0.0.1:50051)")
    p.add_argument("--http-address", help="OpenAI API, /health and /metrics (default: the config's, 127.0.0.1:8000)")
    p.add_argument("--model", help="target model (default: the config's)")
    p.add_argument(
        "--insecure", action="store_true", help="allow an address off the loopback without auth (anyone may use it)"
    )
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from cluster.config import load_config

    config = load_config(args.config, address=args.address, http_address=args.http_address, model=args.model)
    _check_exposure(config, args.insecure)
    if not config.ray.address:  # everything runs here: say now, not in a replica's traceback, what is wrong
        for key in ("address", "http_address"):
            _check_free(key, getattr(config, key))
        _check_secrets(config)
    import ray
    from ray import serve

    from cluster.app import connect, start
    from cluster.lifecycle import children_ignore_interrupts, drain, wait_for_stop_signal

    try:
        with children_ignore_interrupts():
            connect(config)
        start(config)
        tls, scheme = (" (TLS)", "https") if config.tls.enabled else ("", "http")
        print(f"tandem: serving gRPC on {config.address}{tls}", flush=True)
        print(f"tandem: OpenAI API on {scheme}://{config.http_address}/v1 (metrics: /metrics)", flush=True)
        name = wait_for_stop_signal()
        left = drain(config.grace_period_s)
    except KeyboardInterrupt:  # Ctrl-C before the application was up: nothing to drain
        print("tandem: interrupted while starting", file=sys.stderr)
        return 130
    finally:
        if config.ray.address:  # a cluster that outlives us: take the application off it
            serve.shutdown()
        ray.shutdown()  # a local cluster goes with every replica on it
    cut = f", {left} stream(s) cut after the {config.grace_period_s:g} s grace period" if left else ""
    print(f"tandem: {name}: drained and stopped{cut}", flush=True)
    return 0


def _check_exposure(config: ClusterConfig, insecure: bool) -> None:
    """Off the loopback, the APIs need tokens (or ``--insecure``); tokens need TLS to stay secret."""
    from cluster.config import ConfigError
    from cluster.security import is_loopback

    exposed = [address for address in (config.address, config.http_address) if not is_loopback(address)]
    if not exposed:
        return
    if not config.auth.enabled and not insecure:
        raise ConfigError(
            f"{exposed[0]} is reachable from other machines and auth is off: set auth.tokens_file or "
            "auth.tokens_env in the config (docs/operations.md), or pass --insecure to serve it to anyone"
        )
    if config.auth.enabled and not config.tls.enabled:
        print(f"tandem: warning: tokens cross the network to {exposed[0]} in clear text; set tls", file=sys.stderr)


def _check_secrets(config: ClusterConfig) -> None:
    """The token and certificate files the router will read (here, on a local cluster) are readable."""
    from cluster.config import ConfigError
    from cluster.security import Tokens, server_credentials

    Tokens.load(config.auth)
    server_credentials(config.tls)
    try:
        config.internal_tls.server_credentials()
    except OSError as exc:
        raise ConfigError(f"internal_tls: cannot read {exc.filename} ({exc.strerror})") from None


def _check_free(key: str, address: str) -> None:
    import socket

    from cluster.config import ConfigError

    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            probe.bind((host.strip("[]"), int(port)))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key} {address}: cannot listen there ({exc})") from None


def add_drain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drain", help="drain a running cluster's router (e.g. a Kubernetes preStop hook)")
    p.add_argument("--address", default="auto", help="Ray address (default: auto, the local node's cluster)")
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds live streams get to finish")
    p.set_defaults(run=run_drain)


def run_drain(args: argparse.Namespace) -> int:
    import ray

    from cluster.lifecycle import drain

    ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
    left = drain(args.grace_period)
    print(f"tandem: drained{f', {left} stream(s) still live' if left else ''}", flush=True)
    return 0


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="stream a generation from a running `tandem serve`")
    p.add_argument("prompt", help="the user message (or the raw text with --raw)")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--token-file", help=f"a file holding the API token (default: ${TOKEN_ENV}, if set)")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CA certificates")
    p.add_argument("--ca-file", help="connect with TLS, trusting this CA certificate (PEM)")
    p.add_argument("--raw", action="store_true", help="skip the chat template")
    p.add_argument("--drafter", default="", help="default: the cluster's; none: target-only")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(run=run_client)


def run_client(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from cluster.client import bearer, connect, generate, prompt_request
    from tandem_proto.v1 import api_pb2

    params = api_pb2.SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed, stop=args.stop
    )
    request = prompt_request(args.prompt, raw=args.raw, params=params, drafter=args.drafter)
    show = None if args.json else lambda delta: print(delta.text, end="", flush=True)
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get(TOKEN_ENV)
        channel = connect(args.address, args.tls, args.ca_file)
    except OSError as exc:
        raise TandemError(f"cannot read {exc.filename}: {exc.strerror}") from None
    with channel:
        try:
            out = generate(channel, request, args.timeout, show, bearer(token))
        except grpc.RpcError as exc:
            print(f"tandem: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    reason = out.finished.finish_reason
    usage = MessageToDict(out.finished.usage, always_print_fields_with_no_presence=True)
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": reason, **usage}))
    else:
        print(f"\n[{reason}, {json.dumps(usage)}]", file=sys.stderr)
    return 0
