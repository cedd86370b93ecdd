"""What one forward pass of the target costs, by tokens in the pass, for each way of running it:
the stock kernels eager and under ``torch.compile`` (inductor), and the exact kernels one module
at a time and in one call for every layer (the default). Both dtypes, batch 1, one run.

    python bench/step.py                        # widths 1 2 4 8 16, bf16 and float32
    python bench/step.py --dtypes bfloat16 --widths 1 16 --repeats 10   # a quick look

A pass is a verification step over a 64-token prefix (a chain of ``width`` tokens; what a tree of
the same size costs too). First-call latency (which includes compiling) is reported apart from
the steady-state median. Ratios are within this run only.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from tandem.models.catalog import DEFAULT_MODEL
from tandem.models.decoder import Transformer
from tandem.target import load_target

PREFIX = 64
DEFAULT_OUT = Path(__file__).parent / "results" / "step.json"
METHODS = ("stock eager", "stock compiled", "exact per module", "exact one call")


def load(method: str, model_name: str, dtype: str) -> Transformer:
    model = load_target(model_name, dtype, exact=method.startswith("exact")).model
    if method == "exact per module":
        model.step_plan = None
    if method == "stock compiled":  # the whole pass, one graph; shapes symbolic (no recompiles by width)
        eager = functools.partial(Transformer.forward_features.__wrapped__, model)  # without inference_mode,
        model.forward_features = torch.compile(eager, dynamic=True)  # whose tensors a graph cannot mutate
    return model


def measure(model: Transformer, widths: Sequence[int], repeats: int) -> dict[int, dict[str, float]]:
    """Per width: first-call and median milliseconds of a pass after a ``PREFIX``-token prompt."""
    cache = model.new_cache(1, PREFIX + max(widths) + 1)
    model.block_logits(list(range(100, 100 + PREFIX)), cache)
    cache.commit(0, list(range(PREFIX)))

    def step(tokens: list[int]) -> float:
        start = time.perf_counter()
        model.block_logits(tokens, cache)  # nothing committed: every pass sees the same prefix
        return 1000 * (time.perf_counter() - start)

    results = {}
    for width in widths:
        tokens = list(range(200, 200 + width))
        first = step(tokens)
        times = [step(tokens) for _ in range(repeats)]
        results[width] = {"first_ms": first, "median_ms": statistics.median(times), "min_ms": min(times)}
    return results


def report(results: dict, widths: Sequence[int], print_: Callable[[Table], None]) -> None:
    for dtype, by_method in results.items():
        table = Table(title=f"{dtype}: ms per pass (× the 1-token pass of the same method) [first call]")
        table.add_column("method")
        for width in widths:
            table.add_column(f"{width} tok", justify="right")
        for method, by_width in by_method.items():
            one = by_width[widths[0]]["median_ms"]
            cells = [
                f"{r['median_ms']:.1f} ({r['median_ms'] / one:.2f}×) [{r['first_ms']:.0f}]"
                for r in (by_width[w] for w in widths)
            ]
            table.add_row(method, *cells)
        print_(table)


def plot(results: dict, widths: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (dtype, by_method) in zip(axes[0], results.items()):
        for method, by_width in by_method.items():
            ax.plot(widths, [by_width[w]["median_ms"] for w in widths], marker="o", label=method)
        ax.set(title=f"one pass, {dtype}", xlabel="tokens in the pass", ylabel="ms (median)", ylim=(0, None))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--widths", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, dict]] = {}
    runs = [(dtype, method) for dtype in args.dtypes for method in args.methods]
    for dtype, method in tqdm(runs, desc="methods"):
        with torch.no_grad():
            results.setdefault(dtype, {})[method] = measure(load(method, args.model, dtype), args.widths, args.repeats)
    report(results, args.widths, Console().print)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "model": args.model,
        "prefix": PREFIX,
        "results": {d: {m: {str(w): r for w, r in by.items()} for m, by in ms.items()} for d, ms in results.items()},
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    plot(results, args.widths, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
