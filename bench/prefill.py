"""Prefill: its throughput against this machine's compute bound, and what a long prompt does to the
streams already running on a target replica, with chunked prefill and without.

1. Throughput: a batch of chat prompts prefilled together (the engine's prefill: rows of similar
   length share a pass, :func:`tandem.verifier.prefill_groups`), prompt tokens/s and the tokens
   the passes compute (padding included) per second, against the bound: the dot-product rate
   the exact kernels reach on the model's own weights at a prefill's width, over the FLOPs a
   prompt token needs (2 per weight, plus attention).
2. Gap: ``--streams`` sessions decode on a real target replica (its gRPC Verify service, as the
   router drives it, no Ray) when a ``--prompt-tokens`` prompt arrives; the longest gap between
   two tokens of a running stream while it is prefilled, for each ``--chunks`` setting (0: the
   whole prompt in one pass), and the long prompt's time to first token.

    python bench/prefill.py                      # 8 streams, a 2,000-token prompt, chunks 0 512 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import grpc
import torch
from decode import load_prompts, machine_info, write_json

from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.sampling import SamplingParams
from tandem.target import Target, load_target
from tandem.tree import chain
from tandem.verifier import PREFILL_PASS_TOKENS, prefill_groups
from tandem_proto.v1 import worker_pb2, worker_pb2_grpc
from workers.target_worker import TargetSpec, TargetWorker
from workers.tp import ShardSpec
from workers.wire import params_to_proto, tree_to_proto

OUT = Path(__file__).parent / "results" / "prefill.json"


def throughput(target: Target, prompts: list[list[int]], repeats: int = 3) -> dict:
    """Prompt tokens per second of one batched prefill (best of ``repeats``), and the bound."""
    engine = Engine(target.model, prefill_chunk=None)
    params = SamplingParams(max_tokens=1)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        engine.generate([Request(p, params) for p in prompts])
        seconds.append(time.perf_counter() - start)
    tokens = sum(len(p) for p in prompts)
    pass_tokens = PREFILL_PASS_TOKENS if target.model.exact else math.inf  # the engine's verifier's
    groups = prefill_groups([len(p) for p in prompts], pass_tokens)
    padded = sum(len(g) * max(len(prompts[i]) for i in g) for g in groups)  # what the passes compute
    rate = dot_product_rate(target, padded)
    cfg = target.model.config
    weights = sum(p.numel() for n, p in target.model.named_parameters() if not n.startswith(("embed", "lm_head")))
    mean_context = statistics.mean(len(p) for p in prompts) / 2  # a prompt token attends to half its prompt
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_context
    flops = 2 * weights + attention
    best = min(seconds[1:])
    return {
        "prompts": len(prompts),
        "prompt_tokens": tokens,
        "passes": len(groups),
        "padded_tokens": padded,
        "seconds": round(best, 3),
        "tok_s": round(tokens / best, 1),
        "padded_tok_s": round(padded / best, 1),
        "flops_per_token": flops,
        "dot_product_gflops": round(rate / 1e9, 1),
        "bound_tok_s": round(rate / flops, 1),
        "share_of_bound": round(padded / best / (rate / flops), 3),
        "prompt_share_of_bound": round(tokens / best / (rate / flops), 3),
    }


def dot_product_rate(target: Target, rows: int) -> float:
    """FLOP/s of the model's own MLP projections, ``rows`` tokens at once (the widest tiles)."""
    mlp = target.model.layers[0].mlp
    x = torch.randn(rows, target.model.config.hidden_size, dtype=target.model.dtype)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        mlp.w13(x)
        times.append(time.perf_counter() - start)
    return 2 * rows * mlp.w13.in_features * mlp.w13.out_features / min(times[1:])


async def gap(args: argparse.Namespace, chunk: int | None, short: list[list[int]], long: list[int]) -> dict:
    """Running streams' longest gap between tokens while ``long`` is prefilled in parts of ``chunk``."""
    shard = ShardSpec(
        str(args.model), args.dtype, rows=args.streams + 1, max_model_len=len(long) + 256,
        feature_layers=(), threads=torch.get_num_threads(),
    )  # fmt: skip
    spec = TargetSpec(shard, 1, float(torch.get_num_threads()), 0.0, 0.002, "127.0.0.1", False, chunk)
    worker = object.__new__(TargetWorker)
    await TargetWorker.__init__(worker, spec)
    params = params_to_proto(SamplingParams(max_tokens=10_000, seed=0))
    stamps: list[list[float]] = [[] for _ in short]
    stop = asyncio.Event()

    async def stream(i: int) -> None:
        call = worker_pb2_grpc.VerifyStub(grpc.aio.insecure_channel(worker.address)).Session()
        await call.write(
            worker_pb2.VerifyIn(open=worker_pb2.VerifyOpen(session_id=f"s{i}", prompt_ids=short[i], params=params))
        )
        step = await call.read()
        while not stop.is_set() and step.room > 1:
            if not step.continues:  # else the replica runs the next round itself
                await call.write(worker_pb2.VerifyIn(tree=tree_to_proto(chain(step.tokens[-1], []))))
            step = await call.read()
            stamps[i].append(time.perf_counter())
        call.cancel()

    try:
        running = [asyncio.create_task(stream(i)) for i in range(len(short))]
        await asyncio.sleep(args.settle_s)
        arrived = time.perf_counter()
        call = worker_pb2_grpc.VerifyStub(grpc.aio.insecure_channel(worker.address)).Session()
        opening = worker_pb2.VerifyOpen(session_id="long", prompt_ids=long, params=params)
        await call.write(worker_pb2.VerifyIn(open=opening))
        await call.read()
        first_token = time.perf_counter()
        await asyncio.sleep(args.settle_s)
        stop.set()
        await asyncio.gather(*running)
        call.cancel()
    finally:
        with contextlib.suppress(Exception):
            await worker._server.stop(None)

    def gaps(lo: float, hi: float) -> list[float]:
        return [b - a for s in stamps for a, b in zip(s, s[1:]) if lo <= b and a <= hi]

    before = gaps(arrived - args.settle_s / 2, arrived)
    during = gaps(arrived, first_token)
    return {
        "prefill_chunk": chunk,
        "long_prompt_ttft_s": round(first_token - arrived, 3),
        "median_gap_before_ms": round(statistics.median(before) * 1000, 1) if before else None,
        "longest_gap_during_ms": round(max(during) * 1000, 1) if during else None,
        "tokens_during_prefill": sum(1 for s in stamps for t in s if arrived <= t <= first_token),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 128])
    parser.add_argument("--batch", type=int, default=16, help="chat prompts prefilled together")
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    target = load_target(args.model, args.dtype)
    prompts = [p.ids for p in load_prompts(target, ("mt-bench", "humaneval", "mbpp"), args.batch)]
    record = {"throughput": throughput(target, prompts[: args.batch])}
    print(json.dumps(record["throughput"], indent=2), file=sys.stderr)
    pool = [t for p in prompts for t in p]
    long = (pool * (args.prompt_tokens // len(pool) + 1))[: args.prompt_tokens]
    record["gap"] = []
    for chunk in args.chunks:
        record["gap"].append(asyncio.run(gap(args, chunk or None, prompts[: args.streams], long)))
        print(json.dumps(record["gap"][-1]), file=sys.stderr)
    record["meta"] = {
        **machine_info(torch.get_num_threads(), args.dtype),
        "model": str(args.model),
        "streams": args.streams,
        "prompt_tokens": args.prompt_tokens,
        "command": " ".join(["python", "bench/prefill.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    out = Path(args.out)
    write_json(out, record)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
