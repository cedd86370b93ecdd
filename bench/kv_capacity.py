"""Sessions a target replica holds with the paged KV cache, in the memory that 16 dense rows of a
2,048-token context took before it (issue 24): sessions of a mix of prompt lengths are opened
until the cache refuses one, then every held session is prefilled and decoded together for a few
rounds, to show that they run.

Two counts per mix: ``admitted`` (each session takes its prompt's blocks, as the target replica
admits; the rest come as it grows, and a session that cannot grow is preempted) and ``reserved``
(each session also holds the blocks of its whole reply, ``--max-tokens``, up front: none can ever
be preempted). Mixes: ``chat`` (the benchmark prompts through the chat template, 5 sets) and
``long`` (prompt lengths uniform up to the context less the reply, cut from the same text).

    python bench/kv_capacity.py            # 2,048-token context, 16 rows' memory, 256-token replies
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from decode import load_prompts, machine_info, write_json

from tandem.errors import NoRoom
from tandem.eval.benchmarks import BENCHMARKS
from tandem.models.catalog import DEFAULT_MODEL
from tandem.sampling import SamplingParams
from tandem.target import Target, load_target
from tandem.tree import chain
from tandem.verifier import Verifier

OUT = Path(__file__).parent / "results" / "kv_capacity.json"


def prompt_mixes(target: Target, context: int, reply: int, count: int) -> dict[str, list[list[int]]]:
    chat = [p.ids for p in load_prompts(target, list(BENCHMARKS), 80)]
    random.Random(0).shuffle(chat)
    text = [t for ids in chat for t in ids]
    rng = random.Random(1)
    long = []
    for _ in range(count):
        n, start = rng.randint(64, context - reply - 1), rng.randrange(len(text) // 2)
        long.append(text[start : start + n])
    return {"chat": (chat * (count // len(chat) + 1))[:count], "long": long}


def hold(verifier: Verifier, prompts: Sequence[list[int]], reply: int) -> list[int]:
    """Open sessions in order until the cache refuses one; ``reply``: blocks of that many more
    tokens reserved per session (0: its prompt's only)."""
    rows = []
    for seed, prompt in enumerate(prompts):
        try:
            row = verifier.open(prompt, SamplingParams(max_tokens=reply or 1), seed)
        except NoRoom:
            break
        try:
            verifier.cache.reserve({row: len(prompt) + reply})
        except NoRoom:
            verifier.close(row)
            break
        rows.append(row)
    return rows


def measure(target: Target, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    blocks = args.rows * -(-args.context // args.block_size)  # a dense cache's 16 rows
    record: dict[str, object] = {"kv_blocks": blocks}
    for name, reply in (("admitted", 0), ("reserved", args.max_tokens)):
        verifier = Verifier(target.model, 4 * blocks, args.context, kv_blocks=blocks, block_size=args.block_size)
        rows = hold(verifier, prompts, reply)
        record[f"{name}_sessions"] = len(rows)
        record[f"{name}_vs_dense"] = round(len(rows) / args.rows, 2)
        record[f"{name}_mean_prompt_tokens"] = round(statistics.mean(len(p) for p in prompts[: len(rows)]), 1)
        if name != "reserved":
            continue
        start = time.perf_counter()
        anchors = [step.tokens[-1] for step in verifier.prefill(rows, 512)]
        record["prefill_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        for _ in range(args.rounds):  # plain decoding of every held session, one batch
            anchors = [s.tokens[-1] for s in verifier.verify(rows, [chain(a, []) for a in anchors])]
        record["decode_tok_s"] = round(len(rows) * args.rounds / (time.perf_counter() - start), 1)
        record["blocks_in_use"] = verifier.cache.blocks_in_use
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=16, help="the dense cache's rows whose memory the pool gets")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256, help="reply tokens per session")
    parser.add_argument("--rounds", type=int, default=4, help="decode rounds of the held sessions")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = load_target(args.model, args.dtype)
    mixes = prompt_mixes(target, args.context, args.max_tokens, 64 * args.rows)
    results = {}
    for name, prompts in mixes.items():
        results[name] = measure(target, prompts, args)
        print(name, results[name], file=sys.stderr)
    settings = {k: getattr(args, k) for k in ("model", "dtype", "context", "rows", "block_size", "max_tokens")}
    write_json(args.out, {"settings": settings, "machine": machine_info(args.threads, args.dtype), "mixes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
