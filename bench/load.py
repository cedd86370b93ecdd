"""Throughput against load: tokens/s of plain decoding and of each scheduled drafter at several
batch sizes, in process, greedy, in one run.

Each batch size decodes the same prompts (humaneval, mbpp, mt-bench) in chunks of that size;
methods take turns per chunk, in an order that rotates, so a slow spell of a shared machine hits
all alike; each keeps its engine across chunks (calibration and timings carry over, as in a
server). Decode tok/s counts the tokens after the first (prefill excluded); end-to-end counts all
of them over the whole time. Every method's output is compared with plain decoding's.

    python bench/load.py                                   # the default set, batch 1 4 16 32
    python bench/load.py --methods plain suffix suffix:always --batch 1 16 --prompts 8

A method is a drafter behind the draft scheduler and its gate (``tandem generate``'s default);
``NAME:always`` is the scheduler without the gate (it drafts every sequence every round, as before
the gate); ``NAME:never`` the control that never calls the drafter (the fixed threshold at batch
1: the engine still captures its features), which tells a drafter's cost from the noise. Fixed
batch-size thresholds (vLLM's ``disable_by_batch_size``: draft every sequence while the batch is
smaller than N, none from N on) give, at each batch size, either the ``:always`` figure or the
plain one, so the best such threshold is read off those two.

``--cluster`` runs the same through a local cluster (router, draft pool, target pool on Ray,
bench/serve.py's layout: the target replica gets the engine's threads): a batch of N is N
concurrent gRPC streams. Each drafter gets its own cluster, fresh for every pass over the
prompts, in which plain decoding (requests with ``drafter: none``) and the drafter take turns per
chunk; its ratios are to that plain. Decode tok/s there counts the tokens that arrived after
every stream of the chunk had its first.

    python bench/load.py --cluster --methods plain default dspark eagle3 hybrid --out bench/results/load-cluster
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import torch
from decode import load_prompts, machine_info, warmup_prompt
from tqdm import tqdm

from tandem.drafters import default_drafter, make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.profile import load_or_measure
from tandem.sampling import SamplingParams
from tandem.scheduler import ScheduledDrafter
from tandem.target import Target, load_target

BENCHMARKS = ("humaneval", "mbpp", "mt-bench")
CODE = ("humaneval", "mbpp")
DEFAULT_METHODS = ("plain", "default", "default:always", "dspark", "eagle3", "hybrid")
OUT = Path(__file__).parent / "results" / "load"


def drafter_name(name: str, model_name: str) -> str:
    """The drafter ``name`` means: ``default`` is the model's default, by the name a cluster serves it."""
    return default_drafter(model_name) if name == "default" else name


def build(method: str, target: Target, model_name: str) -> ScheduledDrafter | None:
    if method == "plain":
        return None
    name, _, how = method.partition(":")
    name = drafter_name(name, model_name)
    cost = load_or_measure(target.model, model_name, progress=lambda line: print(line, file=sys.stderr))
    drafter = make_drafter(name, target.model, model_name)
    if how == "never":  # the control: the drafter held and fed its features, never called
        return ScheduledDrafter(drafter, cost, max_batch=1)
    return ScheduledDrafter(drafter, cost, gate=how != "always")


def run(args: argparse.Namespace) -> dict:
    target = load_target(args.model, args.dtype)
    per_benchmark = math.ceil(args.prompts / len(BENCHMARKS))
    prompts = load_prompts(target, BENCHMARKS, per_benchmark)
    prompts = sorted(prompts, key=lambda p: BENCHMARKS.index(p.benchmark))
    prompts = [p for i in range(per_benchmark) for p in prompts[i::per_benchmark]][: args.prompts]  # interleaved
    params = SamplingParams(max_tokens=args.max_tokens)
    if args.cluster:
        return _run_clusters(args, target, prompts, params)
    results: dict[str, dict] = {}
    for batch in args.batch:
        chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        runs = [_run(args, target, chunks, params) for _ in range(args.repeats)]
        results[str(batch)] = _median(runs)
    return results


def _run(args: argparse.Namespace, target: Target, chunks: list, params: SamplingParams) -> dict:
    """One pass over the chunks by every method, each with a fresh engine, taking turns per chunk."""
    drafters = {m: build(m, target, str(args.model)) for m in args.methods}
    engines = {m: Engine(target.model, d, target.eos_token_ids, target.tokenizer.decode) for m, d in drafters.items()}
    totals = {m: defaultdict(float) for m in args.methods}
    outputs: dict[str, list[list[int]]] = {m: [] for m in args.methods}
    order = list(engines)
    for chunk in tqdm(chunks, desc=f"batch {len(chunks[0])}", unit="chunk"):
        order = order[1:] + order[:1]  # who goes first rotates: no method always follows the same one
        for m in order:
            engine = engines[m]
            out, first, start = [[] for _ in chunk], None, time.perf_counter()
            for delta in engine.stream([Request(p.ids, params) for p in chunk]):
                out[delta.index].extend(delta.token_ids)
                first = first or time.perf_counter()  # the first delta comes after the batch's prefill
            end = time.perf_counter()
            _count(totals[m], chunk, out, start, first, end, sum(len(o) - 1 for o in out))
            outputs[m] += out
    return _summary(totals, outputs, drafters)


def _run_clusters(args: argparse.Namespace, target: Target, prompts: list, params: SamplingParams) -> dict:
    """Every batch size through a cluster per drafter, plain and the drafter taking turns; the
    plain row is the first cluster's (each drafter's ratios are to its own cluster's plain). Each
    pass over the prompts gets a fresh cluster, as the in-process passes get fresh engines: a
    draft replica remembers what it served (the suffix drafter's shared trie), and a second pass
    over the same prompts would draft from the first pass's outputs. The prefix cache is off: of
    two methods decoding a chunk in turn, the second would find its prompts cached and skip the
    prefill (which made the methods that went first look slower end to end at 16 and 32 streams)."""
    from ray import serve
    from serve import local_config

    from cluster.app import start

    warmup = warmup_prompt(target)
    runs: dict[str, list[dict]] = defaultdict(lambda: [{} for _ in range(args.repeats)])
    for method in args.methods[1:]:
        served = drafter_name(method, args.model)
        config = local_config(argparse.Namespace(**{**vars(args), "drafter": served}), max(args.batch), False)
        for batch in args.batch:
            chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
            for index, run in enumerate(runs[str(batch)]):
                print(f"starting a cluster with {method} ...", file=sys.stderr)
                start(config)
                try:
                    with grpc.insecure_channel(config.address) as channel:
                        for drafter in ("none", served):  # warm both paths up
                            _cluster_chunk(channel, [warmup], params, drafter)
                        # and the KV pool's pages: the first pass at a batch's full width on a fresh
                        # replica was 4-7 % slower (its first writes to the pool), which with one
                        # chunk fell on the same method every time
                        _cluster_chunk(channel, chunks[0], replace(params, max_tokens=8), "none")
                        metrics = f"http://{config.http_address}/metrics"
                        summary = _cluster_run(channel, chunks, params, served, metrics, plain_first=index % 2 == 1)
                finally:
                    serve.shutdown()
                run.setdefault("plain", summary["plain"])
                cpu = {f"plain_{k}": v for k, v in summary["plain"].items() if k.startswith("cpu_ms_per_token_")}
                run[method] = summary[served] | cpu  # with its own cluster's plain CPU, to compare
    return {batch: _median(repeats) for batch, repeats in runs.items()}


def _cluster_run(
    channel: grpc.Channel, chunks: list, params: SamplingParams, method: str, metrics: str, plain_first: bool
) -> dict:
    """One pass over the chunks by plain decoding and ``method``, taking turns per chunk (who goes
    first alternates from ``plain_first``, which repeats alternate too); with
    each method's rounds (drafted or not, from the router's ``metrics``) and the CPU seconds each
    process used: on a shared machine, CPU per token tells costs apart that tok/s, moving by
    several percent between passes, cannot."""
    from serve import cpu_seconds, cpu_used

    totals = {m: defaultdict(float) for m in ("plain", method)}
    outputs: dict[str, list[list[int]]] = {"plain": [], method: []}
    order = [method, "plain"] if plain_first else ["plain", method]
    for chunk in tqdm(chunks, desc=f"{method}, {len(chunks[0])} streams", unit="chunk"):
        order = order[::-1]  # who goes first alternates
        for m in order:
            cpu, rounds = cpu_seconds(), _rounds(metrics)
            tokens, *times = _cluster_chunk(channel, chunk, params, "none" if m == "plain" else method)
            _count(totals[m], chunk, tokens, *times)
            outputs[m] += tokens
            for role, used in cpu_used(cpu).items():
                totals[m][f"cpu:{role}"] += used
            for name, count in _rounds(metrics).items():
                totals[m][name] += count - rounds[name]
    return _summary(totals, outputs, dict.fromkeys(totals))


def _rounds(metrics: str) -> dict[str, float]:
    """The cluster's verification rounds so far, and of those the drafted ones (the drafter asked)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(urlopen(metrics, timeout=30).read().decode())
        for s in family.samples
    }
    return {
        "rounds": samples.get("tandem:spec_decode_num_rounds_total", 0.0),
        "drafted_rounds": samples.get("tandem:round_draft_seconds_count", 0.0),
    }


def _cluster_chunk(
    channel: grpc.Channel, chunk: list, params: SamplingParams, drafter: str
) -> tuple[list[list[int]], float, float, float, int]:
    """``chunk``'s prompts as concurrent streams: their tokens, the start, the moment every
    stream had its first token, the end, and the tokens that arrived after that moment."""
    from cluster.client import generate, prompt_request
    from tandem_proto.v1 import api_pb2

    arrivals: list[list[tuple[float, int]]] = [[] for _ in chunk]
    wire = api_pb2.SamplingParams(max_tokens=params.max_tokens)

    def one(i: int) -> list[int]:
        def arrived(delta: api_pb2.Delta) -> None:
            arrivals[i].append((time.perf_counter(), len(delta.token_ids)))

        request = prompt_request(chunk[i].ids, params=wire, drafter=drafter)
        return list(generate(channel, request, timeout=1800, on_delta=arrived).token_ids)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(chunk)) as pool:
        tokens = list(pool.map(one, range(len(chunk))))
    end = time.perf_counter()
    first = max(a[0][0] for a in arrivals)
    return tokens, start, first, end, sum(n for a in arrivals for t, n in a if t > first)


def _count(
    t: defaultdict, chunk: list, tokens: list[list[int]], start: float, first: float, end: float, decoded: int
) -> None:
    """Add a chunk's run to a method's totals: ``decoded`` tokens came after ``first``, when every
    sequence had its first token (the batch's prefill)."""
    t["tokens"] += sum(len(o) for o in tokens)
    t["seconds"] += end - start
    t["decode_tokens"] += decoded
    t["decode_seconds"] += end - first
    if len(chunk) == 1:
        t[f"{chunk[0].benchmark}:tokens"] += decoded
        t[f"{chunk[0].benchmark}:seconds"] += end - first


def _median(runs: list[dict]) -> dict:
    """Each figure's median over repeated runs, with the spread of the ratios to plain."""
    out = {}
    for m, row in runs[0].items():
        out[m] = {k: statistics.median(r[m][k] for r in runs) if k in row else None for k in row}
        out[m]["equal_to_plain"] = min(r[m]["equal_to_plain"] for r in runs)
        out[m]["sequences"] = row["sequences"]
        ratios = [r[m]["decode_x_plain"] for r in runs]
        out[m]["decode_x_plain_range"] = [min(ratios), max(ratios)]
    return out


def _summary(totals: dict, outputs: dict, drafters: dict) -> dict:
    plain = totals["plain"]
    rate = {m: t["decode_tokens"] / t["decode_seconds"] for m, t in totals.items()}
    out = {}
    for m, t in totals.items():
        row = {
            "decode_tok_s": round(rate[m], 2),
            "end_to_end_tok_s": round(t["tokens"] / t["seconds"], 2),
            "decode_x_plain": round(rate[m] / rate["plain"], 3),
            "end_to_end_x_plain": round(t["tokens"] / t["seconds"] / (plain["tokens"] / plain["seconds"]), 3),
            "equal_to_plain": sum(a == b for a, b in zip(outputs[m], outputs["plain"])),
            "sequences": len(outputs[m]),
        }
        for name, sets in {**{b: (b,) for b in BENCHMARKS}, "code": CODE}.items():
            seconds = sum(t[f"{b}:seconds"] for b in sets)
            if seconds:  # batch 1: × plain on one benchmark, or on the code ones together
                mine = sum(t[f"{b}:tokens"] for b in sets) / seconds
                base = sum(plain[f"{b}:tokens"] for b in sets) / sum(plain[f"{b}:seconds"] for b in sets)
                row[f"{name}_x_plain"] = round(mine / base, 3)
        d = drafters[m]
        if d is not None:
            row["drafted_round_share"] = round(d.drafted_rounds / max(d.rounds, 1), 3)
        if t.get("rounds"):  # through the cluster
            row["drafted_round_share"] = round(t["drafted_rounds"] / t["rounds"], 3)
            row |= {
                f"cpu_ms_per_token_{k.removeprefix('cpu:')}": round(1000 * v / t["tokens"], 3)
                for k, v in sorted(t.items())
                if k.startswith("cpu:")
            }
        if d is not None and d.gate is not None:
            row["draft_ms_per_sequence"] = round(d.gate.draft_cost(1) * 1000, 2)
        out[m] = row
    return out


def best_threshold(results: dict, drafter: str) -> dict | None:
    """vLLM's ``disable_by_batch_size`` for ``drafter``: the N (a batch size measured, or
    never) whose figures, ``drafter:always`` below N and plain from N on, have the highest
    geometric mean ratio to plain over the batch sizes measured."""
    always = f"{drafter}:always"
    batches = [int(b) for b in results]
    if any(always not in results[str(b)] for b in batches):
        return None
    options = {}
    for n in [*batches, max(batches) + 1]:
        ratios = [results[str(b)][always]["decode_x_plain"] if b < n else 1.0 for b in batches]
        options[n] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    n = max(options, key=options.get)
    return {
        "disable_by_batch_size": n,
        "decode_x_plain": {str(b): results[str(b)][always]["decode_x_plain"] if b < n else 1.0 for b in batches},
        "geomean": round(options[n], 3),
    }


def write(results: dict, meta: dict, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    thresholds = {d: best_threshold(results, d) for d in ("default", "dspark")}
    record = {"meta": meta, "results": results, "best_fixed_threshold": thresholds}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    batches = list(results)

    def decode(r: dict) -> str:
        low, high = r["decode_x_plain_range"]
        return (
            f"{r['decode_tok_s']:.1f} ({r['decode_x_plain']:.2f}× [{low:.2f}–{high:.2f}]; "
            f"{r['end_to_end_x_plain']:.2f}×) {r['equal_to_plain']}/{r['sequences']}"
        )

    def cpu(r: dict) -> str:
        cell = f"{r['drafted_round_share']:.1%}; " + _cpu_cell(r, "cpu_ms_per_token_")
        return cell + (f" [{_cpu_cell(r, 'plain_cpu_ms_per_token_')}]" if "plain_cpu_ms_per_token_target" in r else "")

    lines = [
        f"Greedy, {meta['through']}, {meta['model']}, {meta['dtype']}, {meta['threads']} threads, "
        f"{meta['prompts']} prompts, "
        f"{meta['max_tokens']} tokens, median of {meta['repeats']} runs. Decode tok/s (× plain [range over runs]; "
        "end-to-end × plain), outputs equal to plain.",
        "",
        *_table(results, decode),
    ]
    if "cpu_ms_per_token_target" in results[batches[0]]["plain"]:
        lines += [
            "",
            "Through the cluster: share of rounds drafted; CPU ms per token of the target replica, and of "
            "every other process (router, draft replica, clients, Ray) together; [the same for plain "
            "decoding in the method's own cluster].",
            "",
            *_table(results, cpu),
        ]
    for d, best in thresholds.items():
        if best:
            cells = ", ".join(f"batch {b}: {x:.2f}×" for b, x in best["decode_x_plain"].items())
            n = best["disable_by_batch_size"]
            lines.append(f"\nBest fixed threshold for {d}: disable_by_batch_size={n} ({cells})")
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    _plot(results, out.with_suffix(".png"))
    return table


def _table(results: dict, cell: Callable[[dict], str]) -> list[str]:
    """A markdown table, a row per method and a column per batch size, of ``cell(figures)``."""
    batches = list(results)
    lines = ["| method | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    return lines + [f"| {m} | " + " | ".join(cell(results[b][m]) for b in batches) + " |" for m in results[batches[0]]]


def _cpu_cell(row: dict, prefix: str) -> str:
    """CPU ms per token: the target replica's, then every other process's together."""
    cpu = {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix)}
    return f"{cpu.pop('target'):.2f}, {sum(cpu.values()):.2f}"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [int(b) for b in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "end_to_end_tok_s", "end to end")):
        for m in results[str(batches[0])]:
            style = "--" if m.endswith(":always") else "-"
            ax.plot(batches, [results[str(b)][m][key] for b in batches], style, marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size (sequences decoded together)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompts", type=int, default=32, help="prompts, a third from each benchmark")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2, help="runs per batch size; figures are their median")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(OUT), help="writes <out>.json, <out>.md, <out>.png")
    parser.add_argument("--cluster", action="store_true", help="through a local cluster: N concurrent streams")
    parser.add_argument("--threads", type=int, default=2, help="with --cluster: torch threads of the target replica")
    args = parser.parse_args(argv)
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")
    args.methods = ["plain", *(m for m in args.methods if m != "plain")]
    if args.cluster and any(m.endswith(":always") for m in args.methods):
        parser.error("--cluster runs each drafter behind its gate: NAME:always is in process only")
    if args.cluster:
        args.drafter = None  # set per cluster
    results = run(args)
    meta = {
        **machine_info(args.threads if args.cluster else torch.get_num_threads(), args.dtype),
        "model": str(args.model),
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "through": "cluster: N concurrent gRPC streams" if args.cluster else "in process: a batch of N",
        "command": " ".join(["python", "bench/load.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(write(results, meta, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
