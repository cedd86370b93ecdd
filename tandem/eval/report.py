"""What ``tandem eval`` writes besides its JSON: a markdown table and PNG plots (τ per benchmark
per drafter; acceptance rate by draft position)."""

from __future__ import annotations

from pathlib import Path

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


def plot(results: Results, png: Path, title: str) -> list[Path]:
    """``<png stem>-tau.png`` and ``<png stem>-acceptance.png``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    temps = list(results)
    fig, axes = plt.subplots(1, len(temps), figsize=(7 * len(temps), 4.5), squeeze=False)
    for ax, temperature in zip(axes[0], temps):
        methods = {k: v for k, v in results[temperature].items() if k != "plain"}
        benchmarks = list(next(iter(methods.values())))
        width = 0.8 / max(1, len(methods))
        for i, (name, cells) in enumerate(methods.items()):
            xs = [j + i * width for j in range(len(benchmarks))]
            ax.bar(xs, [cells[b]["tau"] or 0 for b in benchmarks], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(benchmarks))], benchmarks)
        ax.set_ylabel("τ (tokens per target pass)")
        ax.set_title(f"temperature {temperature}")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = png.with_name(f"{png.stem}-tau.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, len(temps), figsize=(7 * len(temps), 4.5), squeeze=False)
    for ax, temperature in zip(axes[0], temps):
        for name, cells in results[temperature].items():
            rates = cells["all"]["acceptance_by_position"]
            if name != "plain" and rates:
                ax.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate (given the position was reached)")
        ax.set_ylim(0, 1)
        ax.set_title(f"temperature {temperature}, all benchmarks")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = png.with_name(f"{png.stem}-acceptance.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
