"""What each inference-time piece of a trained DSpark drafter adds: the confidence head's stop
(off, and several survival thresholds) and the Markov head (its transition bias dropped), each
measured through the real engine against plain decoding in the same run (``tandem eval``'s
loop: τ, acceptance by position, tokens/s).

    python bench/dspark_ablation.py --drafter tandem/data/drafters/smollm2-135m-instruct/dspark \
        --limit 3 --max-tokens 96 --out docs/results/dspark-ablation

The training-time pieces (Markov head rank 0, the CE/TV loss weights) are separate
``tandem train`` runs (``--markov-rank 0``, ``--ce-weight``); see docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tandem.drafters import load_drafter, shipped_drafter
from tandem.drafters.dspark import DSparkDrafter
from tandem.eval.benchmarks import BENCHMARKS, load_benchmarks
from tandem.eval.report import write_results
from tandem.eval.run import evaluate
from tandem.models.catalog import DEFAULT_MODEL
from tandem.target import load_target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", default=None, help="DSpark folder (default: the one shipped for --model)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0])
    parser.add_argument("--limit", type=int, default=3, help="prompts per benchmark")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default="dspark-ablation", help="writes <out>.json, <out>.md and PNGs")
    args = parser.parse_args(argv)
    folder = args.drafter or shipped_drafter("dspark", args.model)
    if folder is None:
        print(f"dspark_ablation: no DSpark drafter is shipped for {args.model!r}; pass --drafter", file=sys.stderr)
        return 2
    target = load_target(args.model, args.dtype)
    model = load_drafter(folder, target.model).model
    if model.config.algo != "dspark":
        print(f"dspark_ablation: {folder} is a {model.config.algo} drafter, not dspark", file=sys.stderr)
        return 2
    drafters = {f"stop<{t:g}": DSparkDrafter(model, min_survival=t) for t in args.thresholds}
    drafters["no-markov"] = DSparkDrafter(model, markov=False)
    prompts = load_benchmarks(list(BENCHMARKS), args.limit)
    chat = target.tokenizer.has_chat_template
    encoded = [(p, target.tokenizer.encode(p.text, chat=chat)) for p in prompts]
    results = evaluate(target.model, drafters, encoded, args.temperature, args.max_tokens, target.eos_token_ids)
    meta = {"drafter": str(folder), "model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads()}
    table, _ = write_results(results, meta, Path(args.out), f"DSpark ablation, {args.model}, {args.dtype}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
