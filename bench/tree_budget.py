"""Chains against trees at the same verification budget: greedy τ of each trained drafter when a
round verifies at most B draft nodes, as a chain of B tokens or as a dynamic tree of B nodes
(issue 9's aim: DSpark trees ≥ 1.15× the τ of DSpark chains at the same budget).

τ comes from replay (:mod:`tandem.eval.replay`): the target's greedy continuation and its
features are computed once per prompt, then each round costs one drafter call, and greedy
verification of a chain or a tree is a match against the known continuation (tested equal to the
engine's). Chains are full (DSpark without its confidence stop), so both shapes spend B nodes.

    python bench/tree_budget.py --limit 4 --max-tokens 96 --out docs/results/tree-budget
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from tandem.drafters import ADAPTERS, load_drafter, shipped_drafter
from tandem.drafters.dspark import DSparkDrafter
from tandem.eval.benchmarks import BENCHMARKS, load_benchmarks
from tandem.eval.replay import build_cases, load_cases, replay, save_cases
from tandem.models.catalog import DEFAULT_MODEL
from tandem.target import load_target
from tandem.tree_search import TreeShape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--drafter", action="append", help="algorithm (shipped) or folder; default: all three shipped")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--topk", type=int, default=4, help="tree children per expanded node and frontier width")
    parser.add_argument("--limit", type=int, default=4, help="prompts per benchmark")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--cases", help="replay cases file (built and saved there when missing)")
    parser.add_argument("--out", default="tree-budget", help="writes <out>.json, <out>.md and <out>.png")
    args = parser.parse_args(argv)
    target = load_target(args.model, "float32")
    folders = {}
    for spec in args.drafter or ["dspark", "eagle3", "dflash"]:
        folder = shipped_drafter(spec, args.model) if "/" not in spec else Path(spec)
        if folder is None:
            print(f"tree_budget: no {spec} drafter is shipped for {args.model!r}; pass a folder", file=sys.stderr)
            return 2
        folders[spec] = folder
    models = {name: load_drafter(folder, target.model).model for name, folder in folders.items()}
    layers = next(iter(models.values())).config.feature_layers
    cases_path = Path(args.cases) if args.cases else None
    if cases_path is not None and cases_path.exists():
        cases = load_cases(cases_path)
    else:
        prompts = load_benchmarks(list(BENCHMARKS), args.limit)
        chat = target.tokenizer.has_chat_template
        encoded = [(p.benchmark, target.tokenizer.encode(p.text, chat=chat)) for p in prompts]
        cases = build_cases(target.model, encoded, layers, args.max_tokens, target.eos_token_ids)
        if cases_path is not None:
            save_cases(cases, cases_path)

    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    runs = [(n, shape, b) for n in models for b in args.budgets for shape in ("chain", "tree")]
    for name, shape, budget in tqdm(runs, desc="replay", unit="run"):
        model = models[name]
        if shape == "chain" and budget > model.config.block_size:
            continue  # a chain is at most one block long
        tree = TreeShape(args.topk, model.config.block_size, budget) if shape == "tree" else None
        drafter = DSparkDrafter(model, min_survival=0.0, tree=tree) if model.config.algo == "dspark" else None
        drafter = drafter or ADAPTERS[model.config.algo](model, tree=tree)
        results.setdefault(name, {}).setdefault(shape, {})[str(budget)] = replay(drafter, cases, max_draft=budget)

    meta = {
        "model": args.model,
        "dtype": "float32",
        "drafters": {n: str(f) for n, f in folders.items()},
        "topk": args.topk,
        "prompts_per_benchmark": args.limit,
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, args.budgets)
    out.with_suffix(".md").write_text(table + "\n")
    plot(results, out.with_suffix(".png"), f"τ at equal budget, {args.model}, greedy, replay")
    print(table)
    return 0


def markdown(results: dict, budgets: list[int]) -> str:
    """τ (all benchmarks) per drafter and budget: chain, tree, and tree ÷ chain."""
    header = "| drafter | shape | " + " | ".join(f"B = {b}" for b in budgets) + " |"
    lines = [header, "|---|---|" + "---|" * len(budgets)]
    for name, shapes in results.items():
        for shape in ("chain", "tree"):
            cells = [f"{shapes[shape][str(b)]['all']:.3f}" if str(b) in shapes[shape] else "—" for b in budgets]
            lines.append(f"| {name} | {shape} | " + " | ".join(cells) + " |")
        tree, chain = shapes["tree"], shapes["chain"]
        ratio = [f"{tree[str(b)]['all'] / chain[str(b)]['all']:.2f}×" if str(b) in chain else "—" for b in budgets]
        lines.append(f"| {name} | tree ÷ chain | " + " | ".join(ratio) + " |")
    return "\n".join(lines)


def plot(results: dict, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, shapes) in enumerate(results.items()):
        color = f"C{i}"
        for shape, style in (("chain", "--"), ("tree", "-")):
            budgets = sorted(int(b) for b in shapes[shape])
            tau = [shapes[shape][str(b)]["all"] for b in budgets]
            ax.plot(budgets, tau, style, color=color, marker="o", label=f"{name} {shape}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("draft nodes verified per round (budget B)")
    ax.set_ylabel("τ (tokens per round), greedy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
