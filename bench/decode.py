"""Decoding speed of the Tandem engine against plain decoding and Hugging Face ``generate``, in one run.

Every method decodes the same prompts greedily, one prompt at a time (batch 1), on the same
weights and thread count. Methods are interleaved per prompt, so a slow spell of a shared machine
hurts all of them alike instead of whichever happened to run then. Ratios are only meaningful
within one run, which is why HF greedy is measured here rather than quoted.

    python bench/decode.py                      # 8 prompts each of humaneval, mbpp, mt-bench
    python bench/decode.py --limit 2 --max-tokens 32 --skip-hf   # a quick smoke run
    python bench/decode.py --device cuda --drafters dspark eagle3 dflash suffix   # shipped drafters too
    python bench/decode.py --drafters suffix+sched --stock-kernels plain suffix+sched --repeats 3   # vs stock kernels

A drafter name ending in ``+sched`` runs behind the draft scheduler (as ``tandem generate`` does by
default), ``+rawsched`` behind it without calibrating the drafter's survival predictions.
``--stock-kernels`` also runs every engine method on a second copy of the target with the stock
kernels (oneDNN on the CPU) instead of the exact batch-invariant ones. ``--repeats N`` decodes
every prompt N times per method, interleaved, and reports min / median / max tok/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.utils import logging as hf_logging

import tandem
from tandem.drafters import make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.profile import scheduled_drafter
from tandem.sampling import SamplingParams
from tandem.target import DTYPES, Target, load_target

PROMPTS_DIR = Path(tandem.__file__).parent / "data" / "prompts"
DEFAULT_BENCHMARKS = ("humaneval", "mbpp", "mt-bench")
DEFAULT_OUT = Path(__file__).parent / "results" / "decode.json"
WARMUP_TOKENS = 32  # enough to touch every kernel path (prefill, decode, draft trees) once
BANDWIDTH_MIB = 256  # well beyond the last-level cache, so x.sum() streams from DRAM
MAX_DRAFT_NODES = 16  # the engine's and the CLI's default


@dataclass(frozen=True)
class Method:
    label: str
    drafter: str | None  # for our engine (NAME, NAME+sched or NAME+rawsched); None: Hugging Face generate
    hf_kwargs: dict
    stock: bool = False  # our engine on the stock kernels instead of the exact ones


METHODS: dict[str, Method] = {
    "plain": Method("tandem plain", "none", {}),
    "ngram": Method("tandem ngram", "ngram", {}),
    "ngram-tree": Method("tandem ngram-tree", "ngram-tree", {}),
    "hf": Method("HF greedy", None, {}),
    "hf-pld": Method("HF prompt lookup", None, {"prompt_lookup_num_tokens": 10}),
}


@dataclass
class Prompt:
    benchmark: str
    text: str
    ids: list[int]


@dataclass
class Run:
    """One method on one prompt. ``decode_seconds`` excludes the prefill pass (our engine only)."""

    token_ids: list[int]
    seconds: float
    passes: int | None
    tau: float | None = None
    decode_seconds: float | None = None


class TandemRunner:
    """Our engine with one drafter; timing comes from the stream so prefill can be told apart."""

    def __init__(self, target: Target, drafter: str, model_name: str) -> None:
        name, how = drafter, ""
        for suffix in ("+sched", "+rawsched"):
            if drafter.endswith(suffix):
                name, how = drafter.removesuffix(suffix), suffix
        spec = make_drafter(name, target.model, model_name)
        if how:
            spec = scheduled_drafter(spec, target.model, model_name, calibrate=how == "+sched")
        self.engine = Engine(
            target.model,
            spec,
            target.eos_token_ids,
            target.tokenizer.decode,
            MAX_DRAFT_NODES,
        )

    def run(self, prompt_ids: list[int], max_tokens: int) -> Run:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        passes_before = self.engine.target_passes
        tokens: list[int] = []
        first_delta = None
        start = time.perf_counter()
        for delta in self.engine.stream([Request(prompt_ids, params)]):
            tokens.extend(delta.token_ids)
            if first_delta is None:
                first_delta = time.perf_counter()  # batch 1: the first delta comes right after prefill
            stats = delta.stats
        end = time.perf_counter()
        return Run(tokens, end - start, self.engine.target_passes - passes_before, stats.tau, end - first_delta)


class HFRunner:
    """Hugging Face ``generate``; a forward pre-hook counts target passes (HF keeps no such counter)."""

    def __init__(self, model: torch.nn.Module, eos_token_ids: Sequence[int], extra: dict) -> None:
        self.model = model
        self.extra = extra
        self.eos = list(eos_token_ids)

    def run(self, prompt_ids: list[int], max_tokens: int) -> Run:
        config = GenerationConfig(
            do_sample=False, max_new_tokens=max_tokens, eos_token_id=self.eos, pad_token_id=self.eos[0], **self.extra
        )
        inputs = torch.tensor([prompt_ids], device=self.model.device)
        passes = 0

        def count(*_: object) -> None:
            nonlocal passes
            passes += 1

        hook = self.model.register_forward_pre_hook(count)
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
            out = out.cpu()  # waits for the device: the time below covers the whole generation
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        return Run(out[0, len(prompt_ids) :].tolist(), seconds, passes)


def warmup_prompt(target: Target) -> Prompt:
    """The request that warms a fresh engine or cluster up: unlike any measured prompt, so a
    drafter that remembers what it served (the suffix drafter's trie) learns nothing measured."""
    text = "Name three colours."
    return Prompt("warmup", text, target.tokenizer.encode(text, chat=True))


def load_prompts(target: Target, benchmarks: Sequence[str], limit: int) -> list[Prompt]:
    """The first ``limit`` prompts of each benchmark: first turn, through the chat template."""
    prompts = []
    for name in benchmarks:
        path = PROMPTS_DIR / f"{name}.jsonl"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.jsonl")))
            raise SystemExit(f"unknown benchmark {name!r}; choose from {known}")
        with path.open() as f:
            lines = [line for line in f if line.strip()][:limit]
        for line in lines:
            text = json.loads(line)["turns"][0]
            prompts.append(Prompt(name, text, target.tokenizer.encode(text, chat=True)))
    return prompts


def measure_bandwidth(device: torch.device, repeats: int = 10) -> dict[str, float]:
    """Memory read bandwidth of ``device`` as torch sees it (on a CPU, with the current thread
    count): best and median of x.sum(), each waited for."""
    size = BANDWIDTH_MIB * 2**20 // 4 * (16 if device.type == "cuda" else 1)  # beyond a GPU's L2 too
    x = torch.ones(size, dtype=torch.float32, device=device)  # written once so every page is real
    x.sum().item()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum().item()
        rates.append(x.nbytes / (time.perf_counter() - start))
    return {"best_gb_s": max(rates) / 1e9, "median_gb_s": statistics.median(rates) / 1e9, "tensor_mib": BANDWIDTH_MIB}


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step must read: every parameter once (tied ones are one tensor),
    except an untied input embedding, of which the lookup reads a single row."""
    unique = {id(p): p for p in model.parameters()}
    embed = model.embed.weight
    if embed is not model.lm_head.weight:
        unique.pop(id(embed), None)
    return sum(p.numel() * p.element_size() for p in unique.values())


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where two outputs differ (None if identical); tells a late
    near-tie flip from an early, systematic mismatch."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def top2_margin(target: Target, ids: Sequence[int]) -> float:
    """The target's top-1 minus top-2 logit after ``ids`` (one prefill pass over them): a small
    margin at a divergence means a near-tie flipped by rounding, the only acceptable
    cause in bf16 (DESIGN.md)."""
    logits = target.model.block_logits(ids, target.model.new_cache(1, len(ids)))
    top = logits[-1].topk(2).values
    return float(top[0] - top[1])


def divergence(target: Target, prompt: Prompt, run: Run, plain: Run) -> dict[str, float] | None:
    """Where ``run`` first leaves plain decoding and the target's top-2 margin there."""
    pos = first_difference(run.token_ids, plain.token_ids)
    if pos is None or pos >= min(len(run.token_ids), len(plain.token_ids)):
        return None
    return {"position": pos, "top2_margin": round(top2_margin(target, prompt.ids + plain.token_ids[:pos]), 4)}


def write_json(path: Path, record: dict) -> None:
    """A result people compare: indented JSON beside its plot, the folder made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def machine_info(threads: int, dtype: str, device: torch.device | None = None) -> dict[str, object]:
    """Where a result was measured; ``gpu`` names the accelerator when the run used one."""
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def summarize(repeats: list[dict[str, list[Run]]], keys: Sequence[int]) -> dict[str, dict[str, object]]:
    """Figures of each method over the prompts ``keys``, with ratios to plain and HF greedy: the
    median over repeats, and the min / max of tok/s and of the ratio to plain."""
    out: dict[str, dict[str, object]] = {}
    for method in repeats[0]:
        rates, ratios, hf_ratios = [], [], []
        for runs in repeats:
            rates.append(_rate(runs[method], keys))
            ratios.append(rates[-1] / _rate(runs["plain"], keys))
            if "hf" in runs:
                hf_ratios.append(rates[-1] / _rate(runs["hf"], keys))
        first = [repeats[0][method][i] for i in keys]
        tokens = sum(len(r.token_ids) for r in first)
        passes = [r.passes for r in first]
        taus = [r.tau for r in first]
        plain = repeats[0][reference(method)]
        out[method] = {
            "label": METHODS[method].label,
            "prompts": len(first),
            "repeats": len(repeats),
            "generated_tokens": tokens,
            "tokens_per_s": statistics.median(rates),
            "tokens_per_s_min": min(rates),
            "tokens_per_s_max": max(rates),
            "vs_plain": statistics.median(ratios),
            "vs_plain_min": min(ratios),
            "vs_plain_max": max(ratios),
            "vs_hf": statistics.median(hf_ratios) if hf_ratios else None,
            "tau": statistics.mean(taus) if None not in taus else None,
            "passes_per_token": sum(passes) / tokens if None not in passes else None,
            "identical_to_plain": sum(r.token_ids == plain[i].token_ids for r, i in zip(first, keys, strict=True)),
        }
    return out


def reference(method: str) -> str:
    """The plain decoding a method's tokens must equal: ours on the same kernels (HF: ours)."""
    return "plain/stock" if METHODS[method].stock else "plain"


def _rate(runs: list[Run], keys: Sequence[int]) -> float:
    return sum(len(runs[i].token_ids) for i in keys) / sum(runs[i].seconds for i in keys)


def bandwidth_bound(target: Target, plain: list[Run], bandwidth: dict[str, float]) -> dict:
    """How close plain decoding gets to reading all weights once per step at the measured bandwidth."""
    weights = weight_bytes_per_step(target.model)
    bound_step_s = weights / (bandwidth["best_gb_s"] * 1e9)
    decode_passes = sum(r.passes - 1 for r in plain)  # the first pass of each prompt is its prefill
    if decode_passes == 0:
        raise SystemExit("every prompt finished at prefill: no decode step to time (raise --max-tokens)")
    step_s = sum(r.decode_seconds for r in plain) / decode_passes
    tokens_per_s = sum(len(r.token_ids) for r in plain) / sum(r.seconds for r in plain)
    return {
        "weight_bytes_per_step": weights,
        "bandwidth_gb_s": bandwidth["best_gb_s"],
        "bandwidth_median_gb_s": bandwidth["median_gb_s"],
        "bound_ms_per_step": bound_step_s * 1e3,
        "bound_tokens_per_s": 1 / bound_step_s,
        "plain_ms_per_step": step_s * 1e3,
        "plain_ms_per_pass_with_prefill": sum(r.seconds for r in plain) / sum(r.passes for r in plain) * 1e3,
        "fraction_of_bound_per_step": bound_step_s / step_s,
        "fraction_of_bound_end_to_end": tokens_per_s * bound_step_s,
    }


def print_table(console: Console, summaries: dict[str, dict], bound: dict, info: dict, max_tokens: int) -> None:
    where = info.get("gpu") or info["cpu"]
    title = f"Greedy decoding, {info['dtype']}, {info['threads']} threads, max {max_tokens} tokens — {where}"
    table = Table(title=title)
    for column in ("benchmark", "method"):
        table.add_column(column)
    for column in ("prompts", "tokens", "tok/s", "min–max", "× plain", "min–max", "× HF", "τ", "passes/tok", "= plain"):
        table.add_column(column, justify="right")

    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    for benchmark, methods in summaries.items():
        for i, f in enumerate(methods.values()):
            table.add_row(
                benchmark if i == 0 else "",
                f["label"],
                str(f["prompts"]),
                str(f["generated_tokens"]),
                fmt(f["tokens_per_s"], ".2f"),
                f"{f['tokens_per_s_min']:.1f}–{f['tokens_per_s_max']:.1f}",
                fmt(f["vs_plain"], ".2f"),
                f"{f['vs_plain_min']:.2f}–{f['vs_plain_max']:.2f}",
                fmt(f["vs_hf"], ".2f"),
                fmt(f["tau"], ".2f"),
                fmt(f["passes_per_token"], ".3f"),
                f"{f['identical_to_plain']}/{f['prompts']}",
                end_section=i == len(methods) - 1,
            )
    console.print(table)
    console.print(
        f"Memory-bandwidth bound for plain decoding: {bound['weight_bytes_per_step'] / 1e6:.1f} MB of weights per step"
        f" ÷ {bound['bandwidth_gb_s']:.2f} GB/s read (x.sum(), median {bound['bandwidth_median_gb_s']:.2f})"
        f" = {bound['bound_ms_per_step']:.1f} ms/step ({bound['bound_tokens_per_s']:.1f} tok/s).\n"
        f"Plain decoding: {bound['plain_ms_per_step']:.1f} ms per decode pass"
        f" ({bound['plain_ms_per_pass_with_prefill']:.1f} ms counting prefill) ="
        f" {bound['fraction_of_bound_per_step']:.1%} of the bound per step,"
        f" {bound['fraction_of_bound_end_to_end']:.1%} end to end."
    )


def plot(summaries: dict[str, dict], path: Path, title: str) -> None:
    """Grouped bars: tokens/s of each method per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(summaries)
    methods = list(next(iter(summaries.values())))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2.2 * len(benchmarks) + 2, 4.5))
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(benchmarks))]
        ys = [summaries[b][method]["tokens_per_s"] for b in benchmarks]
        bars = ax.bar(xs, ys, width, label=METHODS[method].label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(benchmarks)), benchmarks)
    ax.set_ylabel("tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_runners(target: Target, args: argparse.Namespace) -> dict[str, Callable[[list[int], int], Run]]:
    runners: dict[str, Callable[[list[int], int], Run]] = {}
    stock = load_target(args.model, args.dtype, args.device, exact=False) if args.stock_kernels is not None else None
    for key, method in METHODS.items():
        if method.drafter is not None:
            runners[key] = TandemRunner(stock if method.stock else target, method.drafter, str(args.model)).run
    if not args.skip_hf:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(target.folder, dtype=DTYPES[args.dtype])
        model = model.to(target.model.device).eval()
        for key, method in METHODS.items():
            if method.drafter is None:
                # Same stop set as our engine (the tokenizer's eos plus the config's), so lengths compare.
                runners[key] = HFRunner(model, target.eos_token_ids, method.hf_kwargs).run
    return runners


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", nargs="+", default=list(DEFAULT_BENCHMARKS), help="prompt files (by stem)")
    p.add_argument("--limit", type=int, default=8, help="prompts per benchmark")
    p.add_argument("--max-tokens", type=int, default=128, help="at least 2: the per-step figure needs a decode pass")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in model name, HF folder or .gguf")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every method")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the PNG chart goes beside it")
    p.add_argument("--skip-hf", action="store_true", help="only our engine (no HF baselines, no × HF column)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--drafters", nargs="*", default=[], help="more drafters for our engine (e.g. dspark, suffix+sched)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None, help="exact kernels (default auto)")
    p.add_argument(
        "--stock-kernels",
        nargs="*",
        metavar="METHOD",
        help="also run these engine methods (none named: all) on the stock kernels",
    )
    p.add_argument("--repeats", type=int, default=1, help="decode every prompt this many times per method")
    args = p.parse_args(argv)
    for name in args.drafters:
        METHODS[name] = Method(f"tandem {name}", name, {})
    if args.stock_kernels is not None:
        for key, method in list(METHODS.items()):
            if method.drafter is not None and (not args.stock_kernels or key in args.stock_kernels):
                METHODS[f"{key}/stock"] = Method(f"{method.label} (stock kernels)", method.drafter, {}, stock=True)
    if args.max_tokens < 2 or args.limit < 1 or args.threads < 1 or args.repeats < 1:
        p.error("--max-tokens must be >= 2, --limit, --threads and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 150)  # logs get the full table, not 80 columns
    target = load_target(args.model, args.dtype, args.device, args.exact)
    info = machine_info(torch.get_num_threads(), args.dtype, target.model.device)
    info["exact_kernels"] = target.model.exact
    prompts = load_prompts(target, args.benchmarks, args.limit)
    runners = build_runners(target, args)

    bandwidth = measure_bandwidth(target.model.device)
    for key, run in runners.items():
        console.print(f"warming up {METHODS[key].label}", style="dim")
        run(prompts[0].ids, min(WARMUP_TOKENS, args.max_tokens))

    repeats: list[dict[str, list[Run]]] = [{key: [] for key in runners} for _ in range(args.repeats)]
    progress = tqdm(total=args.repeats * len(prompts) * len(runners), desc="decoding", unit="run", file=sys.stderr)
    for r, runs in enumerate(repeats):
        for prompt in prompts:
            for key, run in runners.items():
                progress.set_postfix_str(f"#{r + 1} {prompt.benchmark} · {key}")
                runs[key].append(run(prompt.ids, args.max_tokens))
                progress.update()
    progress.close()
    runs = repeats[0]

    groups = {b: [i for i, p in enumerate(prompts) if p.benchmark == b] for b in args.benchmarks}
    if len(groups) > 1:
        groups["all"] = list(range(len(prompts)))
    summaries = {b: summarize(repeats, keys) for b, keys in groups.items()}
    bound = bandwidth_bound(target, runs["plain"], bandwidth)
    print_table(console, summaries, bound, info, args.max_tokens)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": info,
        "config": {
            "model": str(args.model),
            "model_folder": str(target.folder),
            "device": str(target.model.device),
            "benchmarks": args.benchmarks,
            "limit": args.limit,
            "max_tokens": args.max_tokens,
            "max_draft_nodes": MAX_DRAFT_NODES,
            "warmup_tokens": min(WARMUP_TOKENS, args.max_tokens),
            "hf_prompt_lookup_num_tokens": METHODS["hf-pld"].hf_kwargs["prompt_lookup_num_tokens"],
            "repeats": args.repeats,
        },
        "bandwidth_bound": bound,
        "summary": summaries,
        "prompts": [
            {
                "benchmark": p.benchmark,
                "prompt_tokens": len(p.ids),
                "runs": {
                    key: {
                        "tokens": len(r[i].token_ids),
                        "seconds": round(r[i].seconds, 4),
                        "passes": r[i].passes,
                        "tau": r[i].tau,
                        "identical_to_plain": r[i].token_ids == runs[reference(key)][i].token_ids,
                        "divergence": divergence(target, p, r[i], runs[reference(key)][i]),
                    }
                    for key, r in runs.items()
                },
            }
            for i, p in enumerate(prompts)
        ],
    }
    margins = [
        run["divergence"]["top2_margin"] for p in report["prompts"] for run in p["runs"].values() if run["divergence"]
    ]
    report["divergences"] = {"runs": len(margins), "top2_margins": sorted(margins)}
    if margins:
        console.print(
            f"{len(margins)} runs left plain decoding's tokens; the target's top-2 logit margin at the first "
            f"divergent token: median {statistics.median(margins):.3f}, max {max(margins):.3f}"
        )
    write_json(args.out, report)
    png = args.out.with_suffix(".png")
    plot(summaries, png, f"{args.model}, {args.dtype}, {info['threads']} threads, greedy, {args.max_tokens} tokens")
    console.print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
