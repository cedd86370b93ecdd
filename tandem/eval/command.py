"""``tandem eval``: τ per benchmark, acceptance per draft position and tokens/s of drafters against
plain decoding, written as JSON, a markdown table and PNG plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tandem.errors import TandemError
from tandem.flags import add_device_flag, add_draft_flags, add_exact_flag


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.eval.benchmarks import BENCHMARKS
    from tandem.models.catalog import DEFAULT_MODEL, builtin_names

    p = sub.add_parser("eval", help="measure drafters (τ, acceptance by position, tokens/s) on benchmarks")
    p.add_argument(
        "--drafter",
        action="append",
        required=True,
        help="drafter folder or name (eagle3, dflash, dspark, ngram, ...); repeatable",
    )
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated, from " + ", ".join(BENCHMARKS))
    p.add_argument("--prompts-file", help='any jsonl of {"turns": [...]} (instead of --benchmarks)')
    p.add_argument("--limit", type=int, default=10, help="prompts per benchmark")
    p.add_argument("--temperature", type=float, nargs="+", default=[0.0], help="one or more; 0 = greedy")
    p.add_argument("--max-tokens", type=int, default=128)
    add_draft_flags(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{', '.join(builtin_names())}, an HF folder or a .gguf")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    add_device_flag(p)
    add_exact_flag(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval", help="writes <out>.json, <out>.md, <out>-tau.png, <out>-acceptance.png")
    p.add_argument("--json", action="store_true", help="also print the results JSON on stdout")
    p.set_defaults(run=run_eval)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from tandem.drafters import check_drafter_name, make_drafter, with_tree
    from tandem.eval.benchmarks import load_benchmarks, read_turns_file
    from tandem.eval.report import write_results
    from tandem.eval.run import evaluate
    from tandem.profile import scheduled_drafter
    from tandem.target import load_target

    if args.limit < 1 or args.max_tokens < 1:
        raise TandemError("--limit and --max-tokens must be >= 1")
    if any(t < 0 for t in args.temperature):
        raise TandemError("--temperature must be >= 0")
    if args.prompts_file:
        path = Path(args.prompts_file)
        prompts = read_turns_file(path, path.stem, args.limit)
    else:
        prompts = load_benchmarks([b.strip() for b in args.benchmarks.split(",") if b.strip()], args.limit)
    if not prompts:
        raise TandemError("no prompts to evaluate")
    specs = {name: with_tree(name, args.tree, args.chain) for name in args.drafter}
    for spec in specs.values():
        check_drafter_name(spec)
    target = load_target(args.model, args.dtype, args.device, args.exact)
    drafters = {name: make_drafter(spec, target.model, str(args.model)) for name, spec in specs.items()}
    if args.schedule:
        drafters = {n: scheduled_drafter(d, target.model, str(args.model), _stderr) for n, d in drafters.items()}
    encoded = [(p, target.tokenizer.encode(p.text, chat=target.tokenizer.has_chat_template)) for p in prompts]
    results = evaluate(
        target.model,
        {Path(n).name if Path(n).exists() else n: d for n, d in drafters.items()},
        encoded,
        args.temperature,
        args.max_tokens,
        target.eos_token_ids,
        max_draft_nodes=args.max_draft,
        seed=args.seed,
    )
    meta = {
        "model": str(args.model),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "limit": args.limit,
        "drafters": args.drafter,
        "tree": "chain" if args.chain else args.tree or "default",
        "scheduled": args.schedule,
    }
    title = f"{args.model}, {args.dtype}, {args.max_tokens} tokens"
    table, written = write_results(results, meta, Path(args.out), title)
    print(table)
    if args.json:
        print(json.dumps(results))
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0
