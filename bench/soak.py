"""Soak: the real model's cluster under a bounded mixed load (the soak test's load, at full size).

``--streams`` concurrent clients run benchmark prompts back to back for ``--seconds`` with random
lengths, a share of them cancelled or aborted partway (cluster/loadgen.py). Reported: failed
streams (any the load did not cut on purpose), outputs equal to plain decoding by the in-process
engine (a cut stream: a prefix of it), throughput, and each replica's memory before and after.

    python bench/soak.py                      # 32 streams for 120 s after a 30 s warm-up
    python bench/soak.py --streams 8 --seconds 30 --warmup 10
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from decode import load_prompts, write_json
from serve import add_cluster_args, local_config
from tqdm import tqdm

from cluster.app import APP_NAME, start
from cluster.loadgen import Outcome, random_jobs, replica_rss, soak
from tandem.drafters import default_drafter
from tandem.engine import Engine, Request
from tandem.sampling import SamplingParams
from tandem.target import load_target

DEFAULT_OUT = Path(__file__).parent / "results" / "soak.json"


def _check(outcomes: list[Outcome], expected: dict[tuple[int, ...], list[int]]) -> dict[str, int]:
    """How many streams failed, and how many gave tokens other than plain decoding's."""
    wrong = 0
    for o in outcomes:
        reference = expected[tuple(o.job.prompt)][: o.job.max_tokens]
        full = o.job.action == "finish"
        wrong += o.token_ids != (reference if full else reference[: len(o.token_ids)])
    return {"failed": sum(o.failed for o in outcomes), "different_outputs": wrong}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_args(parser, "humaneval,mbpp,mt-bench", 4)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=96, help="each request asks for 1..this many")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    drafter = args.drafter = args.drafter or default_drafter(args.model)
    torch.set_num_threads(args.threads)

    target = load_target(args.model, args.dtype)
    prompts = [p.ids for p in load_prompts(target, args.benchmarks.split(","), args.limit)]
    engine = Engine(target.model, None, target.eos_token_ids)
    requests = [Request(p, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)) for p in prompts]
    expected = {tuple(p): r.token_ids for p, r in zip(prompts, engine.generate(requests))}
    del engine, target  # the replicas load their own copies

    config = local_config(args, args.streams)
    print("starting the cluster ...", file=sys.stderr)
    start(config)
    jobs = random_jobs(random.Random(0), prompts, args.max_tokens)
    soak(config.address, jobs, args.streams, args.warmup)
    before = replica_rss(APP_NAME)
    with tqdm(desc="streams", unit=" streams") as bar:
        started = time.monotonic()
        outcomes = soak(config.address, jobs, args.streams, args.seconds, on_outcome=lambda _: bar.update())
        wall = time.monotonic() - started
    after = replica_rss(APP_NAME)
    tokens = sum(len(o.token_ids) for o in outcomes)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {args.threads} target threads",
        "model": args.model,
        "dtype": args.dtype,
        "drafter": drafter,
        "streams": args.streams,
        "seconds": round(wall, 1),
        "requests": {a: sum(o.job.action == a for o in outcomes) for a in ("finish", "cancel", "abort")},
        **_check(outcomes, expected),
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(outcomes) / wall, 2),
        "median_request_s": round(sorted(o.seconds for o in outcomes)[len(outcomes) // 2], 2),
        "rss_mib": {name: [before[name] >> 20, after.get(name, 0) >> 20] for name in before},
    }
    write_json(args.out, results)
    print(json.dumps(results, indent=1))
    return 0 if results["failed"] == results["different_outputs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
