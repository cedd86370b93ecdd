"""Chains against trees, with and without the draft scheduler, at several batch sizes: tokens/s
against plain decoding of the same target in the same run, τ and the draft nodes verified per
round, greedy, on the five benchmark sets. Fixed chain lengths of the first drafter are measured
too, as the scheduler's yardstick (it should never lose to the best of them).

    python bench/scheduler.py --drafter dspark:chain --drafter dspark --drafter suffix \
        --limit 1 --max-tokens 96 --batch 1 8 --out docs/results/scheduler

Methods are interleaved per batch of prompts, so a slow spell of a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from tandem.drafters import Drafter, DraftRequest, make_drafter, split_spec
from tandem.engine import Engine, Request
from tandem.eval.benchmarks import BENCHMARKS, load_benchmarks
from tandem.models.catalog import DEFAULT_MODEL
from tandem.profile import load_or_measure
from tandem.sampling import SamplingParams
from tandem.scheduler import ScheduledDrafter
from tandem.target import Target, load_target
from tandem.tree import TokenTree


class Capped(Drafter):
    """A drafter held to ``k`` draft nodes a round: a fixed draft length."""

    def __init__(self, inner: Drafter, k: int) -> None:
        self.inner, self.k = inner, k
        self.name, self.feature_layers = inner.name, inner.feature_layers

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        return self.inner.propose([replace(r, max_nodes=min(r.max_nodes, self.k)) for r in requests])

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)


def build_methods(args: argparse.Namespace, target: Target) -> dict[str, Drafter | None]:
    cost = load_or_measure(target.model, str(args.model), progress=lambda line: print(line, file=sys.stderr))
    name = str(args.model)
    methods: dict[str, Drafter | None] = {"plain": None}
    first = split_spec(args.drafter[0])[0]
    for k in args.fixed:
        methods[f"{first}:chain γ={k}"] = Capped(make_drafter(f"{first}:chain", target.model, name), k)
    for spec in args.drafter:
        methods[spec] = make_drafter(spec, target.model, name)
        methods[f"{spec} +sched"] = ScheduledDrafter(make_drafter(spec, target.model, name), cost)
    return methods


def run(args: argparse.Namespace) -> dict:
    target = load_target(args.model, args.dtype)
    chat = target.tokenizer.has_chat_template
    prompts = [target.tokenizer.encode(p.text, chat=chat) for p in load_benchmarks(list(BENCHMARKS), args.limit)]
    params = SamplingParams(max_tokens=args.max_tokens)
    results: dict[str, dict] = {}
    for batch in args.batch:
        methods = build_methods(args, target)  # fresh per batch size: no state carried over
        engines = {
            m: Engine(target.model, d, target.eos_token_ids, max_draft_nodes=args.max_draft) for m, d in methods.items()
        }
        totals = {m: {"tokens": 0, "seconds": 0.0, "rounds": 0, "accepted": 0, "drafted": 0} for m in methods}
        chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        for chunk in tqdm(chunks, desc=f"batch {batch}", unit="batch"):
            for m, engine in engines.items():
                start = time.perf_counter()
                out = engine.generate([Request(p, params) for p in chunk])
                t = totals[m]
                t["seconds"] += time.perf_counter() - start
                for r in out:
                    t["tokens"] += len(r.token_ids)
                    t["rounds"] += r.stats.rounds
                    t["accepted"] += r.stats.accepted
                    t["drafted"] += r.stats.drafted
        plain = totals["plain"]["tokens"] / totals["plain"]["seconds"]
        results[str(batch)] = {
            m: {
                "tokens_per_s": round(t["tokens"] / t["seconds"], 2),
                "speedup": round(t["tokens"] / t["seconds"] / plain, 3),
                "tau": round((t["accepted"] + t["rounds"]) / t["rounds"], 3) if t["rounds"] else None,
                "nodes_per_round": round(t["drafted"] / t["rounds"], 2) if t["rounds"] else 0.0,
            }
            for m, t in totals.items()
        }
    return results


def write(results: dict, meta: dict, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    batches = list(results)
    lines = [
        f"Greedy, {meta['model']}, {meta['dtype']}, {meta['threads']} threads, {meta['prompts']} prompts, "
        f"{meta['max_tokens']} tokens. Per batch size: tokens/s (× plain), τ, nodes verified per round.",
        "",
        "| method | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for m in results[batches[0]]:
        cells = []
        for b in batches:
            r = results[b][m]
            tau = f", τ {r['tau']:.2f}, {r['nodes_per_round']:g} nodes" if r["tau"] else ""
            cells.append(f"{r['tokens_per_s']:.1f} ({r['speedup']:.2f}×){tau}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    _plot(results, out.with_suffix(".png"))
    return table


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(results)
    methods = list(results[batches[0]])
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(methods) + 1.5))
    height = 0.8 / len(batches)
    for i, b in enumerate(batches):
        ys = [j + i * height for j in range(len(methods))]
        ax.barh(ys, [results[b][m]["speedup"] for m in methods], height, label=f"batch {b}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + height * (len(batches) - 1) / 2 for j in range(len(methods))], methods)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s ÷ plain decoding (same run, same batch size)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", action="append", required=True, help="drafter spec (repeatable)")
    parser.add_argument("--fixed", type=int, nargs="*", default=[1, 2, 4], help="fixed chain lengths of the first")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--limit", type=int, default=1, help="prompts per benchmark")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--max-draft", type=int, default=16)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="scheduler", help="writes <out>.json, <out>.md, <out>.png")
    args = parser.parse_args(argv)
    results = run(args)
    meta = {
        "model": str(args.model),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompts": args.limit * len(BENCHMARKS),
        "max_tokens": args.max_tokens,
        "max_draft": args.max_draft,
        "drafters": args.drafter,
    }
    print(write(results, meta, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
