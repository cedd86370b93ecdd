"""The exact kernels: speculative output against plain decoding at batch 4 (and 1), and the
first-token (prefill) latency on the exact and the stock kernels, on bench/decode.py's prompts.

    python bench/exact.py                   # bf16; 7 prompts each of humaneval, mbpp, mt-bench; 128 tokens
    python bench/exact.py --dtype float32 --batch 1 --out bench/results/exact-float32-batch1.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from decode import DEFAULT_BENCHMARKS, Prompt, load_prompts, write_json
from tqdm import tqdm

from tandem.drafters import make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.profile import scheduled_drafter
from tandem.sampling import SamplingParams
from tandem.target import Target, load_target

DRAFTERS = ("ngram-tree", "suffix+sched", "dspark:4,6,16", "eagle3:4,6,16", "dflash:4,6,16")


def outputs(engine: Engine, prompts: list[Prompt], max_tokens: int, batch: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens)
    results = []
    for i in range(0, len(prompts), batch):
        results += engine.generate([Request(p.ids, params) for p in prompts[i : i + batch]])
    return [r.token_ids for r in results]


def first_token_ms(target: Target, prompts: list[Prompt]) -> dict[str, float]:
    engine = Engine(target.model, eos_token_ids=target.eos_token_ids)
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        for _ in engine.stream([Request(prompt.ids, SamplingParams(max_tokens=1))]):
            pass
        times.append(1000 * (time.perf_counter() - start))
    return {"median": statistics.median(times), "max": max(times)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--limit", type=int, default=7, help="prompts per benchmark")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "exact.json")
    args = p.parse_args(argv)
    target = load_target(args.model, args.dtype, exact=True)
    prompts = load_prompts(target, DEFAULT_BENCHMARKS, args.limit)
    plain = outputs(Engine(target.model, eos_token_ids=target.eos_token_ids), prompts, args.max_tokens, 1)
    equal = {}
    for name in tqdm(DRAFTERS, desc="drafters", file=sys.stderr):
        drafter = make_drafter(name.removesuffix("+sched"), target.model, args.model)
        if name.endswith("+sched"):
            drafter = scheduled_drafter(drafter, target.model, args.model)
        engine = Engine(target.model, drafter, target.eos_token_ids, max_draft_nodes=16)
        spec = outputs(engine, prompts, args.max_tokens, args.batch)
        equal[name] = sum(a == b for a, b in zip(spec, plain, strict=True))
    stock = load_target(args.model, args.dtype, exact=False)
    report = {
        "model": args.model,
        "dtype": args.dtype,
        "kernels": target.model.kernels,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "batch": args.batch,
        "equal_to_plain": equal,
        "first_token_ms": {"exact": first_token_ms(target, prompts), "stock": first_token_ms(stock, prompts)},
        "prompt_tokens": {
            "median": statistics.median(len(p.ids) for p in prompts),
            "max": max(len(p.ids) for p in prompts),
        },
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
