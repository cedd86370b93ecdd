"""The training ablation's report (issue 26): trained drafters side by side, each drafting chains
and trees, through the real engine against plain decoding on the same prompts, greedy and T = 1:
τ per benchmark, acceptance by position and tokens/s (``tandem eval``'s loop), with each run's
training record (steps, seconds, settings) beside it.

    python bench/train_ablation.py baseline=tandem/data/drafters/smollm2-135m-instruct/dspark \
        layers2=/work/ablation/runs/layers2 eagle3=tandem/data/drafters/smollm2-135m-instruct/eagle3 \
        --out docs/results/dspark-train-ablation

Draft cost per round and tokens/s at batch 16 come from ``bench/draft_cost.py`` and
``bench/load.py``, which take the same folders (``FOLDER:chain``, ``FOLDER:always``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tandem.drafters import load_drafter
from tandem.eval.benchmarks import BENCHMARKS, load_benchmarks
from tandem.eval.report import write_results
from tandem.eval.run import evaluate
from tandem.models.catalog import DEFAULT_MODEL
from tandem.target import load_target
from tandem.tree_search import TreeShape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=FOLDER of each trained drafter")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--limit", type=int, default=3, help="prompts per benchmark")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default="dspark-train-ablation", help="writes <out>.json, <out>.md and PNGs")
    args = parser.parse_args(argv)
    runs = dict(run.split("=", 1) for run in args.runs if "=" in run)
    if len(runs) != len(args.runs):
        print("train_ablation: give each run as NAME=FOLDER", file=sys.stderr)
        return 2
    target = load_target(args.model, args.dtype)
    drafters, trained = {}, {}
    for name, folder in runs.items():
        drafters[f"{name}:chain"] = load_drafter(folder, target.model)
        drafters[f"{name}:tree"] = load_drafter(folder, target.model, TreeShape())
        record = Path(folder) / "training.json"
        if record.exists():
            summary = json.loads(record.read_text())
            keep = ("steps", "seconds", "response_tokens_seen", "final_loss", "final_accuracy")
            trained[name] = {k: summary.get(k) for k in keep} | {"config": summary.get("config")}
    prompts = load_benchmarks(list(BENCHMARKS), args.limit)
    chat = target.tokenizer.has_chat_template
    encoded = [(p, target.tokenizer.encode(p.text, chat=chat)) for p in prompts]
    results = evaluate(target.model, drafters, encoded, args.temperature, args.max_tokens, target.eos_token_ids)
    meta = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "training": trained,
    }
    table, _ = write_results(results, meta, Path(args.out), f"DSpark training ablation, {args.model}, {args.dtype}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
