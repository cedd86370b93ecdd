"""Serving speed: the cluster (router, draft pool and target pool over gRPC on a local Ray) against
the in-process engine, in one run, on the same prompts, weights, drafter, kernels and threads.

Fair by construction: the engine and the cluster's target replica get the same torch thread count
(both share the same cores; the router and draft worker are extra processes on them), the two
sides alternate which goes first, each side's tokens/s counts its own tokens, and N concurrent
cluster streams are compared with the engine decoding the same N requests as one batch. Each
measurement gets a fresh cluster and a fresh engine, warmed up on a prompt outside the measured
set, and N streams decode N distinct prompts (while the benchmarks have that many): a drafter
that remembers what it served (the suffix drafter's shared trie) drafts neither from an earlier
measurement's outputs nor from a twin stream's.

- single stream: tokens/s of each side prompt by prompt, and the router's overhead per target pass;
- N streams (``--concurrency``): aggregate tokens/s of the cluster vs the engine at batch N, the
  share of the cluster run each pool spent running batches (busy: both at once is overlap), and
  the cores each process used on average on each side (``cores_target``, ``cores_router``,
  ``cores_draft``, ``cores_bench``: the clients or the engine, ``cores_other``: Ray's own).

``--config FILE`` runs the cluster from a config file as it is (ports aside), e.g.
``configs/local.yaml``: what a user gets out of the box, against the engine at ``--threads``.

Every figure is measured ``--repeats`` times and reported as min / median / max.

    python bench/serve.py                                        # 2 prompts each, 64 tokens
    python bench/serve.py --limit 1 --max-tokens 16 --concurrency 1,4 --repeats 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import grpc
import psutil
import torch
from decode import MAX_DRAFT_NODES, Prompt, load_prompts, warmup_prompt, write_json

from cluster.app import start
from cluster.client import generate, prompt_request
from cluster.config import ClusterConfig, load_config
from tandem.drafters import default_drafter, make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.profile import scheduled_drafter
from tandem.sampling import SamplingParams
from tandem.target import Target, load_target
from tandem_proto.v1 import api_pb2

DEFAULT_OUT = Path(__file__).parent / "results" / "serve.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_cluster_args(parser: argparse.ArgumentParser, benchmarks: str, limit: int) -> None:
    """The arguments bench/serve.py and bench/soak.py share: model, drafter, prompts, threads."""
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--drafter", default=None, help="as for tandem generate (default: the model's default)")
    parser.add_argument("--benchmarks", default=benchmarks)
    parser.add_argument("--limit", type=int, default=limit, help="prompts per benchmark")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the target replica (and the engine)")


def local_config(args: argparse.Namespace, sessions: int, prefix_caching: bool = True) -> ClusterConfig:
    """A cluster on free loopback ports: the target replica gets ``args.threads`` torch threads,
    each pool room for ``sessions`` live sessions."""
    room = {"max_ongoing_requests": sessions}
    return load_config(
        None,
        model=args.model,
        dtype=args.dtype,
        address=f"127.0.0.1:{_free_port()}",
        http_address=f"127.0.0.1:{_free_port()}",
        ray={"num_cpus": args.threads + 1},
        draft={"drafter": args.drafter, "num_cpus": 0.5, "max_draft_nodes": MAX_DRAFT_NODES, **room},
        target={"num_cpus": args.threads, "torch_threads": args.threads, "prefix_caching": prefix_caching, **room},
    )


@contextlib.contextmanager
def fresh(target: Target, config: ClusterConfig, args: argparse.Namespace) -> Iterator[tuple[Engine, grpc.Channel]]:
    """A new engine (with a new drafter) and a new cluster, both warmed up on a prompt outside
    the measured set; the cluster is shut down afterwards."""
    from ray import serve

    drafter = scheduled_drafter(make_drafter(args.drafter, target.model, args.model), target.model, args.model)
    engine = Engine(target.model, drafter, target.eos_token_ids, target.tokenizer.decode, MAX_DRAFT_NODES)
    warmup = warmup_prompt(target)
    print("starting a cluster ...", file=sys.stderr)
    start(config)
    try:
        with grpc.insecure_channel(config.address) as channel:
            generate(channel, _cluster_request(warmup, args), timeout=600)
            engine.generate([Request(warmup.ids, SamplingParams(max_tokens=args.max_tokens))])
            yield engine, channel
    finally:
        serve.shutdown()


def _cluster_request(prompt: Prompt, args: argparse.Namespace) -> api_pb2.GenerateRequest:
    params = api_pb2.SamplingParams(max_tokens=args.max_tokens)
    return prompt_request(prompt.ids, params=params, drafter=args.drafter)


def single_stream(engine: Engine, channel: grpc.Channel, prompts: list[Prompt], args: argparse.Namespace) -> dict:
    """One request at a time; the sides alternate which goes first; a target pass is a round or
    the prefill (the engine's count, the same for both sides when their tokens are equal)."""
    seconds, tokens = {"engine": 0.0, "cluster": 0.0}, {"engine": 0, "cluster": 0}
    passes = identical = 0
    for i, prompt in enumerate(prompts):
        outputs: dict[str, list[int]] = {}

        def engine_run(prompt: Prompt = prompt) -> list[int]:
            nonlocal passes
            [result] = engine.generate([Request(prompt.ids, SamplingParams(max_tokens=args.max_tokens))])
            passes += result.stats.rounds + 1
            return result.token_ids

        def cluster_run(prompt: Prompt = prompt) -> list[int]:
            return list(generate(channel, _cluster_request(prompt, args), timeout=600).token_ids)

        sides = [("engine", engine_run), ("cluster", cluster_run)]
        for side, run in sides if i % 2 == 0 else sides[::-1]:
            start_s = time.perf_counter()
            outputs[side] = run()
            seconds[side] += time.perf_counter() - start_s
            tokens[side] += len(outputs[side])
        identical += outputs["engine"] == outputs["cluster"]
    return {
        "engine_tok_s": tokens["engine"] / seconds["engine"],
        "cluster_tok_s": tokens["cluster"] / seconds["cluster"],
        "cluster_vs_engine": (tokens["cluster"] / seconds["cluster"]) / (tokens["engine"] / seconds["engine"]),
        "router_overhead_ms_per_pass": 1000 * (seconds["cluster"] - seconds["engine"]) / passes,
        "identical_outputs": identical,
        "prompts": len(prompts),
    }


def concurrent(
    engine: Engine,
    channel: grpc.Channel,
    prompts: list[Prompt],
    streams: int,
    args: argparse.Namespace,
    config: ClusterConfig,
) -> dict:
    """The same ``streams`` requests through ``streams`` concurrent cluster clients and through the
    engine as one batch (the order alternates with ``streams``)."""
    jobs = [prompts[i % len(prompts)] for i in range(streams)]
    params = SamplingParams(max_tokens=args.max_tokens)

    def engine_run() -> dict:
        cpu, start_s = cpu_seconds(), time.perf_counter()
        results = engine.generate([Request(p.ids, params) for p in jobs])
        seconds = time.perf_counter() - start_s
        return {"seconds": seconds, "outputs": [r.token_ids for r in results], **cores(cpu, seconds)}

    def cluster_run() -> dict:
        busy = pool_busy_seconds(config)
        cpu, start_s = cpu_seconds(), time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            outputs = list(pool.map(lambda p: generate(channel, _cluster_request(p, args), timeout=1800), jobs))
        seconds = time.perf_counter() - start_s
        used = cores(cpu, seconds)
        shares = {f"{name}_busy": (s - busy[name]) / seconds for name, s in pool_busy_seconds(config).items()}
        return {"seconds": seconds, "outputs": [list(o.token_ids) for o in outputs], **shares, **used}

    figures = {}
    for side, run in [("engine", engine_run), ("cluster", cluster_run)][:: 1 if streams % 2 else -1]:
        figures[side] = run()
        figures[side]["tok_s"] = sum(map(len, figures[side]["outputs"])) / figures[side]["seconds"]
    return {
        "streams": streams,
        "engine_tok_s": figures["engine"]["tok_s"],
        "cluster_tok_s": figures["cluster"]["tok_s"],
        "cluster_vs_engine": figures["cluster"]["tok_s"] / figures["engine"]["tok_s"],
        "draft_busy": figures["cluster"].get("draft_busy", 0.0),
        "target_busy": figures["cluster"]["target_busy"],
        **{f"engine_{k}": v for k, v in figures["engine"].items() if k.startswith("cores_")},
        **{f"cluster_{k}": v for k, v in figures["cluster"].items() if k.startswith("cores_")},
        "identical_outputs": sum(a == b for a, b in zip(figures["engine"]["outputs"], figures["cluster"]["outputs"])),
    }


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's role and CPU seconds so far (user + system, all its threads)."""
    from cluster.app import APP_NAME

    replica = f"ServeReplica:{APP_NAME}:"
    used = {}
    for process in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        command, times = " ".join(process.info["cmdline"] or []), process.info["cpu_times"]
        if times is None:
            continue
        if process.info["pid"] == os.getpid():
            role = "bench"  # the engine, or the cluster's clients
        elif replica in command:
            role = command.split(replica, 1)[1].split()[0].lower()  # target, draft, router
        else:
            role = "other"  # Ray's own processes (raylet, GCS, Serve's controller and proxy), the rest
        used[process.info["pid"]] = (role, times.user + times.system)
    return used


def cpu_used(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role used since ``before`` (a :func:`cpu_seconds`)."""
    totals: dict[str, float] = {}
    for pid, (role, now) in cpu_seconds().items():
        totals[role] = totals.get(role, 0.0) + now - before.get(pid, (role, 0.0))[1]
    return totals


def cores(before: dict[int, tuple[str, float]], seconds: float) -> dict[str, float]:
    """Cores each role used on average since ``before`` (a :func:`cpu_seconds`), over ``seconds``:
    on one machine, what the router, the clients and Ray take is what the target replica lacks."""
    return {f"cores_{role}": used / seconds for role, used in sorted(cpu_used(before).items())}


def pool_busy_seconds(config: ClusterConfig) -> dict[str, float]:
    """Seconds each pool's replica has spent running batches (one replica per pool here)."""
    from ray import serve

    from cluster.app import APP_NAME

    pools = {"target": "Target", **({"draft": "Draft"} if config.has_draft_pool else {})}
    stats = {pool: serve.get_deployment_handle(name, app_name=APP_NAME).stats.remote() for pool, name in pools.items()}
    return {pool: call.result(timeout_s=30)["busy_s"] for pool, call in stats.items()}


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(repeats: list[dict], key: str) -> dict[str, dict[str, float]]:
    """min / median / max over repeats of every numeric figure in ``repeats[i][key]``."""
    first = repeats[0][key]
    return {
        name: spread([r[key][name] for r in repeats])
        for name, value in first.items()
        if isinstance(value, float | int) and name not in ("prompts", "streams")
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single, runs = results["single_stream"], results["concurrent"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["engine (in process)", "cluster (gRPC)"]
    medians = [single["engine_tok_s"]["median"], single["cluster_tok_s"]["median"]]
    errors = [
        [m - single[k]["min"] for m, k in zip(medians, ("engine_tok_s", "cluster_tok_s"))],
        [single[k]["max"] - m for m, k in zip(medians, ("engine_tok_s", "cluster_tok_s"))],
    ]
    left.bar(names, medians, yerr=errors, capsize=4)
    left.set_ylabel("tokens/s")
    left.set_title(f"single stream (cluster {single['cluster_vs_engine']['median']:.2f}x engine)")
    streams = [r["streams"] for r in runs]
    for side in ("engine", "cluster"):
        figures = [r[f"{side}_tok_s"] for r in runs]
        label = "engine, batch N" if side == "engine" else "cluster, N streams"
        right.errorbar(
            streams,
            [f["median"] for f in figures],
            yerr=[[f["median"] - f["min"] for f in figures], [f["max"] - f["median"] for f in figures]],
            marker="o",
            capsize=3,
            label=label,
        )
    right.set_xscale("log", base=2)
    right.set_xlabel("N")
    right.set_ylabel("aggregate tokens/s")
    right.set_title("one target replica vs one engine")
    right.legend()
    fig.suptitle(
        f"{results['model']} {results['dtype']}, {results['drafter']}, {results['max_tokens']} tokens, "
        f"{results['threads']} threads each, {results['repeats']} repeats (min/median/max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_args(parser, "humaneval,mt-bench", 2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--config", type=Path, help="run the cluster from this config file as it is (ports aside)")
    args = parser.parse_args(argv)
    args.drafter = args.drafter or default_drafter(args.model)
    concurrency = [int(n) for n in args.concurrency.split(",")]
    torch.set_num_threads(args.threads)

    target = load_target(args.model, args.dtype)
    benchmarks = args.benchmarks.split(",")
    prompts = load_prompts(target, benchmarks, args.limit)
    per_benchmark = math.ceil(max(concurrency) / len(benchmarks))  # the streams' prompts, taking turns
    groups = [load_prompts(target, [name], per_benchmark) for name in benchmarks]
    stream_prompts = [p for group in itertools.zip_longest(*groups) for p in group if p is not None]
    if args.config:
        ports = {"address": f"127.0.0.1:{_free_port()}", "http_address": f"127.0.0.1:{_free_port()}"}
        config = load_config(args.config, **ports)
        args.drafter = config.draft.drafter if config.draft.drafter != "default" else args.drafter
    else:
        config = local_config(args, max(concurrency))
    repeats = []
    for r in range(args.repeats):
        with fresh(target, config, args) as (engine, channel):
            single = single_stream(engine, channel, prompts, args)
        runs = []
        for n in concurrency:
            with fresh(target, config, args) as (engine, channel):
                runs.append(concurrent(engine, channel, stream_prompts, n, args, config))
        print(json.dumps({"repeat": r + 1, "single": single, "concurrent": runs}), file=sys.stderr)
        repeats.append({"single": single, **{f"n{run['streams']}": run for run in runs}})
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": args.model,
        "dtype": args.dtype,
        "exact_kernels": target.model.exact,
        "drafter": args.drafter,
        "max_tokens": args.max_tokens,
        "prompts": len(prompts),
        "stream_prompts": min(len(stream_prompts), max(concurrency)),
        "threads": args.threads,
        "config": str(args.config) if args.config else "bench/serve.py's own: target threads = --threads",
        "repeats": args.repeats,
        "single_stream": summarize(repeats, "single"),
        "identical_outputs": f"{repeats[0]['single']['identical_outputs']}/{len(prompts)}",
        "concurrent": [{"streams": n, **summarize(repeats, f"n{n}")} for n in concurrency],
        "raw": repeats,
    }
    write_json(args.out, results)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png').name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
