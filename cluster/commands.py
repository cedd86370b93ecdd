"""``tandem serve`` and ``tandem client``: registered with the ``tandem`` command through the
``tandem.commands`` entry point group, so the core CLI never imports the cluster."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start a local Ray cluster serving the gRPC API (Ctrl-C stops it)")
    p.add_argument("--config", help="cluster YAML (default: all defaults, see configs/local.yaml)")
    p.add_argument("--address", help="public gRPC address (default: the config's, 127.0.0.1:50051)")
    p.add_argument("--model", help="target model (default: the config's)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from cluster.config import load_config

    config = load_config(args.config, address=args.address, model=args.model)
    import ray
    from ray import serve

    from cluster.app import start

    start(config)
    print(f"tandem: serving gRPC on {config.address}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="stream a generation from a running `tandem serve`")
    p.add_argument("prompt", help="the user message (or the raw text with --raw)")
    p.add_argument("--address", default="127.0.0.1:50051")
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

    from cluster.client import generate, prompt_request
    from tandem_proto.v1 import api_pb2

    params = api_pb2.SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed, stop=args.stop
    )
    request = prompt_request(args.prompt, raw=args.raw, params=params, drafter=args.drafter)
    show = None if args.json else lambda delta: print(delta.text, end="", flush=True)
    with grpc.insecure_channel(args.address) as channel:
        try:
            out = generate(channel, request, args.timeout, show)
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
