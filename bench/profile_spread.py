"""How reproducible the verification profile is: ``tandem profile``'s measurement taken several
times in a row on this machine, and how far each cell's ratio to the plain pass of its batch size
(what the draft gate decides by) moves between them.

    python bench/profile_spread.py                        # 3 profiles, 11 sweeps each (the default)
    python bench/profile_spread.py --profiles 3 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from decode import machine_info, write_json
from tqdm import tqdm

from tandem import profile
from tandem.models.catalog import DEFAULT_MODEL
from tandem.scheduler import PassCost
from tandem.target import load_target

OUT = Path(__file__).parent / "results" / "profile_spread.json"


def ratio_spreads(profiles: Sequence[PassCost]) -> dict[str, dict[str, float]]:
    """Per batch size and width past 1: the lowest and highest ratio to the width-1 pass, and
    their difference over the median ratio."""
    first = profiles[0]
    spreads = {}
    for b, batch in enumerate(first.batches):
        for w, width in enumerate(first.widths[1:], 1):
            ratios = [p.seconds[b][w] / p.seconds[b][0] for p in profiles]
            spreads[f"b{batch}_w{width}"] = {
                "min": min(ratios),
                "max": max(ratios),
                "spread": (max(ratios) - min(ratios)) / statistics.median(ratios),
            }
    return spreads


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--profiles", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11, help="sweeps per profile (tandem profile's own)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    model = load_target(args.model, args.dtype).model
    with torch.inference_mode():
        profiles = [profile.measure(model, repeats=args.repeats) for _ in tqdm(range(args.profiles), unit="profile")]
    spreads = ratio_spreads(profiles)
    values = [s["spread"] for s in spreads.values()]
    summary = {"median_spread": statistics.median(values), "max_spread": max(values)}
    write_json(
        args.out,
        {
            **machine_info(torch.get_num_threads(), args.dtype),
            "model": str(args.model),
            "repeats": args.repeats,
            **summary,
            "ratios": spreads,
            "profiles": [p.to_json() for p in profiles],
        },
    )
    moved = f"{summary['median_spread']:.1%} (median), {summary['max_spread']:.1%} at most"
    print(f"the cells' ratios to the plain pass moved by {moved}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
