"""What ``tandem eval`` writes besides its JSON: a markdown table and PNG plots (τ per benchmark
per drafter; acceptance rate by draft position)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Results = dict[str, dict[str, dict[str, dict[str, object]]]]  # temperature -> method -> benchmark -> figures


def markdown(results: Results) -> str:
    """One table per temperature: τ and speedup over plain decoding per benchmark and drafter."""
    lines = []
    for temperature, methods in results.items():
        benchmarks = list(next(iter(methods.values())))
        lines += [
            f"**Temperature {temperature}** — τ (speedup vs plain decoding, batch 1)",
            "",
            "| drafter | " + " | ".join(benchmarks) + " |",
            "|---|" + "---|" * len(benchmarks),
        ]
        plain = methods["plain"]
        lines.append("| plain (tok/s) | " + " | ".join(f"{plain[b]['tokens_per_s']:.1f}" for b in benchmarks) + " |")
        for name, cells in methods.items():
            if name == "plain":
                continue
            row = [f"{cells[b]['tau']:.2f} ({cells[b]['speedup']:.2f}×)" for b in benchmarks]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(results: Results, meta: dict[str, Any], out: Path, title: str) -> tuple[str, list[Path]]:
    """``<out>.json`` (meta + results), ``<out>.md`` (the table) and the PNG plots; returns the
    table and every file written."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results)
    out.with_suffix(".md").write_text(table + "\n")
    return table, [out.with_suffix(".json"), out.with_suffix(".md"), *plot(results, out.with_suffix(".png"), title)]


def plot(results: Results, png: Path, title: str) -> list[Path]:
    """``<png stem>-tau.png`` and ``<png stem>-acceptance.png``; returns the files written."""
    return [
        _figure(results, png.with_name(f"{png.stem}-tau.png"), title, _tau_bars),
        _figure(results, png.with_name(f"{png.stem}-acceptance.png"), title, _acceptance_lines),
    ]


def _figure(results: Results, path: Path, title: str, draw: Callable[[Any, str, dict], None]) -> Path:
    """One panel per temperature, drawn by ``draw(axes, temperature, methods)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, (temperature, methods) in zip(axes[0], results.items()):
        draw(ax, temperature, methods)
        ax.legend()
    return _save(plt, fig, title, path)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display here or on CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, title: str, path: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tau_bars(ax: Any, temperature: str, methods: dict) -> None:
    drafters = {k: v for k, v in methods.items() if k != "plain"}
    benchmarks = list(methods["plain"])
    width = 0.8 / max(1, len(drafters))
    for i, (name, cells) in enumerate(drafters.items()):
        xs = [j + i * width for j in range(len(benchmarks))]
        ax.bar(xs, [cells[b]["tau"] or 0 for b in benchmarks], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(benchmarks))], benchmarks)
    ax.set_ylabel("τ (tokens per target pass)")
    ax.set_title(f"temperature {temperature}")


def _acceptance_lines(ax: Any, temperature: str, methods: dict) -> None:
    for name, cells in methods.items():
        rates = cells["all"]["acceptance_by_position"]
        if name != "plain" and rates:
            ax.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate (given the position was reached)")
    ax.set_ylim(0, 1)
    ax.set_title(f"temperature {temperature}, all benchmarks")


def plot_learning_curves(curves: dict[str, list[dict]], png: Path, title: str) -> Path:
    """τ (all benchmarks, greedy replay) against response tokens seen and against training
    minutes, one line per drafter; ``curves[name]`` is a ``training.json`` ``learning_curve``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, points in curves.items():
        tau = [p["tau"]["all"] for p in points]
        axes[0].plot([p["tokens"] / 1e6 for p in points], tau, marker=".", label=name)
        axes[1].plot([p["seconds"] / 60 for p in points], tau, marker=".", label=name)
    axes[0].set_xlabel("response tokens seen (millions)")
    axes[1].set_xlabel("training minutes (whole machine)")
    for ax in axes:
        ax.set_ylabel("τ, greedy (tokens per target pass)")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, title, png)
