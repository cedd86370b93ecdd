"""Serving speed: the cluster (router, draft pool and target pool over gRPC on a local Ray) against
the in-process engine, in one run, on the same prompts, weights, drafter and thread count.

- single stream: tokens/s through the cluster vs the engine (prompts interleaved, so a busy spell
  of a shared machine slows both), and the router's overhead per target pass in ms;
- aggregate tokens/s at 1, 4 and 16 concurrent streams (continuous batching on one target replica).

    python bench/serve.py                                        # 2 prompts each, 64 tokens
    python bench/serve.py --limit 1 --max-tokens 16 --concurrency 1,4   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import grpc
import torch
from decode import MAX_DRAFT_NODES, Prompt, load_prompts

from cluster.app import start
from cluster.client import generate, prompt_request
from cluster.config import load_config
from tandem.drafters import make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.sampling import SamplingParams
from tandem.target import load_target
from tandem_proto.v1 import api_pb2

DEFAULT_OUT = Path(__file__).parent / "results" / "serve.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_request(prompt: Prompt, args: argparse.Namespace) -> api_pb2.GenerateRequest:
    params = api_pb2.SamplingParams(max_tokens=args.max_tokens)
    return prompt_request(prompt.ids, params=params, drafter=args.drafter)


def single_stream(engine: Engine, channel: grpc.Channel, prompts: list[Prompt], args: argparse.Namespace) -> dict:
    """Engine and cluster alternate prompt by prompt; a target pass is a round or the prefill."""
    totals = {"engine_s": 0.0, "cluster_s": 0.0, "tokens": 0, "passes": 0, "identical": 0}
    for prompt in prompts:
        start_s = time.perf_counter()
        [result] = engine.generate([Request(prompt.ids, SamplingParams(max_tokens=args.max_tokens))])
        totals["engine_s"] += time.perf_counter() - start_s
        start_s = time.perf_counter()
        out = generate(channel, _cluster_request(prompt, args), timeout=600)
        totals["cluster_s"] += time.perf_counter() - start_s
        totals["tokens"] += len(result.token_ids)
        totals["passes"] += result.stats.rounds + 1
        totals["identical"] += out.token_ids == result.token_ids
    return {
        "engine_tok_s": totals["tokens"] / totals["engine_s"],
        "cluster_tok_s": totals["tokens"] / totals["cluster_s"],
        "ratio": totals["engine_s"] / totals["cluster_s"],
        "router_overhead_ms_per_pass": 1000 * (totals["cluster_s"] - totals["engine_s"]) / totals["passes"],
        "identical_outputs": f"{totals['identical']}/{len(prompts)}",
    }


def aggregate(channel: grpc.Channel, prompts: list[Prompt], streams: int, args: argparse.Namespace) -> dict:
    """``streams`` clients at once, each running ``args.requests_per_stream`` requests back to back."""
    jobs = [prompts[i % len(prompts)] for i in range(streams * args.requests_per_stream)]
    start_s = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        outputs = list(pool.map(lambda p: generate(channel, _cluster_request(p, args), timeout=1800), jobs))
    seconds = time.perf_counter() - start_s
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"streams": streams, "requests": len(jobs), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single, runs = results["single_stream"], results["aggregate"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(["engine (in process)", "cluster (gRPC)"], [single["engine_tok_s"], single["cluster_tok_s"]])
    left.set_ylabel("tokens/s")
    left.set_title(f"single stream ({single['ratio']:.2f}x)")
    right.plot([r["streams"] for r in runs], [r["tok_s"] for r in runs], marker="o")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent streams")
    right.set_ylabel("aggregate tokens/s")
    right.set_title("cluster, one target replica")
    fig.suptitle(f"{results['model']} {results['dtype']}, {results['drafter']}, {results['max_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--drafter", default="dspark", help="as for tandem generate (shipped DSpark by default)")
    parser.add_argument("--benchmarks", default="humaneval,mt-bench")
    parser.add_argument("--limit", type=int, default=2, help="prompts per benchmark")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: the engine's and the target replica's")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    concurrency = [int(n) for n in args.concurrency.split(",")]
    torch.set_num_threads(args.threads)

    target = load_target(args.model, args.dtype)
    prompts = load_prompts(target, args.benchmarks.split(","), args.limit)
    drafter = make_drafter(args.drafter, target.model, args.model)
    engine = Engine(target.model, drafter, target.eos_token_ids, target.tokenizer.decode)
    config = load_config(
        None,
        model=args.model,
        dtype=args.dtype,
        address=f"127.0.0.1:{_free_port()}",
        ray={"num_cpus": 2},
        draft={"drafter": args.drafter, "num_cpus": 0.1, "max_draft_nodes": MAX_DRAFT_NODES},
        target={"num_cpus": args.threads, "max_ongoing_requests": max(concurrency)},
    )
    print("starting the cluster ...", file=sys.stderr)
    start(config)
    with grpc.insecure_channel(config.address) as channel:
        generate(channel, _cluster_request(prompts[0], args), timeout=600)  # warm up both paths
        engine.generate([Request(prompts[0].ids, SamplingParams(max_tokens=args.max_tokens))])
        single = single_stream(engine, channel, prompts, args)
        print(json.dumps(single, indent=1), file=sys.stderr)
        runs = []
        for streams in concurrency:
            runs.append(aggregate(channel, prompts, streams, args))
            print(json.dumps(runs[-1]), file=sys.stderr)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": args.model,
        "dtype": args.dtype,
        "drafter": args.drafter,
        "max_tokens": args.max_tokens,
        "prompts": len(prompts),
        "single_stream": single,
        "aggregate": runs,
        "scaling_vs_1_stream": {r["streams"]: r["tok_s"] / runs[0]["tok_s"] for r in runs},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png').name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
