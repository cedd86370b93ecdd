"""The learning curves of trained drafters, from the ``learning_curve`` that ``tandem train``
records in each ``training.json`` (greedy τ by replay on a fixed benchmark subset, every
``--eval-every`` steps), as one JSON file and one PNG; with ``--at``, each run's τ at equal
response tokens seen (the curve point nearest each count, a markdown table), which compares runs
whose machines gave them different step counts in the same minutes.

    python bench/learning_curve.py drafters/dspark drafters/eagle3 drafters/dflash \
        --out docs/results/learning-curve
    python bench/learning_curve.py baseline=drafters/dspark ce03=runs/ce03.training.json \
        --at 1.97e6 3.29e6 4.31e6 --out docs/results/dspark-train-ablation/curves
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tandem.eval.report import plot_learning_curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "drafters", nargs="+", help="[NAME=]PATH: a folder written by `tandem train`, or its training.json"
    )
    parser.add_argument("--at", type=float, nargs="*", default=[], help="response token counts to compare τ at")
    parser.add_argument("--out", default="learning-curve", help="writes <out>.json and <out>.png (and <out>.md)")
    args = parser.parse_args(argv)
    curves, settings = {}, {}
    for spec in args.drafters:
        name, _, path = spec.rpartition("=")
        record = Path(path) / "training.json" if Path(path).is_dir() else Path(path)
        name = name or (record.parent.name if Path(path).is_dir() else record.name.split(".")[0])
        try:
            summary = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            print(f"learning_curve: {path}: no readable training.json ({exc})", file=sys.stderr)
            return 2
        if not summary.get("learning_curve"):
            print(f"learning_curve: {path} was trained without τ checks (--eval-limit 0)", file=sys.stderr)
            return 2
        curves[name] = summary["learning_curve"]
        settings[name] = {k: summary[k] for k in ("steps", "seconds", "response_tokens_seen", "settings")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"curves": curves, "runs": settings}
    if args.at:
        record["tau_at_tokens"] = {name: tau_at(points, args.at) for name, points in curves.items()}
        table = at_tokens_table(curves, settings, args.at)
        out.with_suffix(".md").write_text(table)
        print(table)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    png = plot_learning_curves(curves, out.with_suffix(".png"), "drafter learning curves (greedy τ by replay)")
    print(f"wrote {out.with_suffix('.json')} and {png}", file=sys.stderr)
    return 0


def tau_at(points: list[dict], counts: list[float]) -> dict[str, dict | None]:
    """τ (all benchmarks) at the curve point nearest each token count; None past the run's end
    (more than half a check interval beyond its last point)."""
    step = max((b["tokens"] - a["tokens"] for a, b in zip(points, points[1:])), default=0)
    out: dict[str, dict | None] = {}
    for count in counts:
        nearest = min(points, key=lambda p: abs(p["tokens"] - count))
        late = count - points[-1]["tokens"] > step / 2
        out[f"{count:.3g}"] = None if late else {"tokens": nearest["tokens"], "tau": nearest["tau"]["all"]}
    return out


def at_tokens_table(curves: dict[str, list[dict]], settings: dict[str, dict], counts: list[float]) -> str:
    """Markdown: each run's steps, tokens seen, τ at each count and at its end."""
    heads = [f"τ at {c / 1e6:.2f} M tokens" for c in counts]
    lines = ["| run | steps | response tokens seen | " + " | ".join(heads) + " | τ at the end |"]
    lines.append("|---" * (len(heads) + 4) + "|")
    for name, points in curves.items():
        at = tau_at(points, counts).values()
        cells = ["—" if point is None else f"{point['tau']:.3f}" for point in at]
        run = settings[name]
        tokens = f"{run['response_tokens_seen'] / 1e6:.2f} M"
        end = points[-1]["tau"]["all"]
        lines.append(f"| {name} | {run['steps']:,} | {tokens} | " + " | ".join(cells) + f" | {end:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
