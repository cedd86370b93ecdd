"""What each drafter's own work costs per round, against the target's plain step at the same batch
size: the seconds of ``Drafter.propose`` (features absorbed, tree drafted) for the whole batch,
measured in the engine on benchmark prompts with every sequence drafted every round.

    python bench/draft_cost.py                           # dspark eagle3 dflash hybrid suffix at batch 1 and 16
    python bench/draft_cost.py --drafters dspark --batch 1 --prompts 4
    python bench/draft_cost.py --drafters dspark eagle3 --max-nodes 16 4   # the full tree, then 4 nodes

``--max-nodes N ...`` measures each drafter asked for at most N nodes a round (the engine's
``max_draft_nodes``), as the scheduler's gate asks for twice what it kept last round, 4 at least
(``DraftGate.ask``); a drafter's work falls with the nodes it is asked for where its tree's depth
does (the block drafters' LM head rows, EAGLE-3's passes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from decode import load_prompts, machine_info, write_json

from tandem.drafters import Drafter, DraftRequest, make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.sampling import SamplingParams
from tandem.target import load_target
from tandem.tree import TokenTree

OUT = Path(__file__).parent / "results" / "draft_cost.json"


class Timed(Drafter):
    """``inner``, with the seconds of each of its rounds kept."""

    def __init__(self, inner: Drafter) -> None:
        self.inner, self.name, self.feature_layers = inner, inner.name, inner.feature_layers
        self.seconds: list[float] = []

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        start = time.perf_counter()
        trees = self.inner.propose(requests)
        self.seconds.append(time.perf_counter() - start)
        return trees

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)


def step_seconds(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> float:
    """Median seconds of a plain decoding step of the whole batch (prefill excluded)."""
    stamps = []
    for _ in engine.stream([Request(p, params) for p in prompts]):
        stamps.append(time.perf_counter())
    steps = [
        b - a for a, b in zip(stamps[len(prompts) - 1 :: len(prompts)], stamps[2 * len(prompts) - 1 :: len(prompts)])
    ]
    return statistics.median(steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafters", nargs="+", default=["dspark", "eagle3", "dflash", "hybrid", "suffix"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--max-nodes", type=int, nargs="+", default=[16], help="draft nodes asked for a round")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    target = load_target(args.model, args.dtype)
    prompts = [p.ids for p in load_prompts(target, ("humaneval", "mbpp", "mt-bench"), args.prompts)][: args.prompts]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    results: dict[str, dict] = {}
    for batch in args.batch:
        chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        plain = Engine(target.model, None, target.eos_token_ids)
        step = statistics.median(step_seconds(plain, c, params) for c in chunks)
        row = {"target_step_ms": round(step * 1000, 2)}
        for name, nodes in itertools.product(args.drafters, args.max_nodes):
            timed = Timed(make_drafter(name, target.model, str(args.model)))
            engine = Engine(target.model, timed, target.eos_token_ids, max_draft_nodes=nodes)
            for chunk in chunks:
                engine.generate([Request(p, params) for p in chunk])
            per_round = statistics.median(timed.seconds[1:])
            key = name if len(args.max_nodes) == 1 else f"{name}@{nodes}"
            row[key] = {
                "draft_ms_per_round": round(per_round * 1000, 2),
                "x_target_step": round(per_round / step, 3),
            }
            print(
                f"batch {batch} {key}: {per_round * 1000:.2f} ms a round, {per_round / step:.2f}x a step",
                file=sys.stderr,
            )
        results[str(batch)] = row
    record = {
        "meta": {
            **machine_info(torch.get_num_threads(), args.dtype),
            "model": str(args.model),
            "prompts": len(prompts),
            "max_nodes": args.max_nodes,
        },
        "results": results,
    }
    out = Path(args.out)
    write_json(out, record)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
