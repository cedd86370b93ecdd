"""The learning curves of trained drafters, from the ``learning_curve`` that ``tandem train``
records in each ``training.json`` (greedy τ by replay on a fixed benchmark subset, every
``--eval-every`` steps), as one JSON file and one PNG.

    python bench/learning_curve.py drafters/dspark drafters/eagle3 drafters/dflash \
        --out docs/results/learning-curve
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tandem.eval.report import plot_learning_curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drafters", nargs="+", help="folders written by `tandem train`")
    parser.add_argument("--out", default="learning-curve", help="writes <out>.json and <out>.png")
    args = parser.parse_args(argv)
    curves, settings = {}, {}
    for folder in map(Path, args.drafters):
        try:
            summary = json.loads((folder / "training.json").read_text())
        except (OSError, ValueError) as exc:
            print(f"learning_curve: {folder}: no readable training.json ({exc})", file=sys.stderr)
            return 2
        if not summary.get("learning_curve"):
            print(f"learning_curve: {folder} was trained without τ checks (--eval-limit 0)", file=sys.stderr)
            return 2
        curves[folder.name] = summary["learning_curve"]
        settings[folder.name] = {k: summary[k] for k in ("steps", "seconds", "response_tokens_seen", "settings")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"curves": curves, "runs": settings}, indent=2) + "\n")
    png = plot_learning_curves(curves, out.with_suffix(".png"), "drafter learning curves (greedy τ by replay)")
    print(f"wrote {out.with_suffix('.json')} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
