"""Prefix caching: time to first token of a long prompt that shares all but its end with an earlier
request, against a cold one, through the OpenAI API of a local cluster; the hot request's output
against the in-process engine's without a cache; a resumed session's re-prefill; and generation
speed at batch 1, 4 and 16 with the cache on and off, in the same run (the cache may cost nothing
per token: a hit shares the cached blocks, and indexing a sequence's blocks copies nothing).

    python bench/prefix.py        # 1,500-token prompts sharing all but 50 tokens, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import openai
import torch
from decode import load_prompts, machine_info, write_json
from serve import local_config

from cluster.app import start
from tandem.drafters import default_drafter, make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.profile import scheduled_drafter
from tandem.sampling import SamplingParams
from tandem.target import Target, load_target

OUT = Path(__file__).parent / "results" / "prefix.json"


def long_prompts(target: Target, rounds: int, length: int, tail: int) -> list[tuple[list[int], list[int]]]:
    """Per round, a cold and a hot prompt of ``length`` tokens that share all but the last ``tail``;
    rounds share nothing (each cold prompt is cold). Real text: benchmark prompts run together."""
    stream: list[int] = []
    for prompt in load_prompts(target, ["mt-bench", "humaneval", "gsm8k", "math500", "mbpp"], 200):
        stream += prompt.ids
    need = rounds * (length + tail)
    if len(stream) < need:
        raise SystemExit(f"the prompt files give {len(stream)} tokens; {need} are needed")
    pairs = []
    for r in range(rounds):
        base = stream[r * (length + tail) : (r + 1) * (length + tail)]
        shared = base[: length - tail]
        pairs.append((shared + base[length - tail : length], shared + base[length:]))
    return pairs


def first_token_seconds(client: openai.OpenAI, model: str, prompt: list[int], max_tokens: int) -> tuple[float, dict]:
    """Seconds to the first streamed event, and the response's token ids and usage."""
    start = time.perf_counter()
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True},
    )
    first, token_ids, usage = None, [], None
    for chunk in stream:
        if first is None:
            first = time.perf_counter() - start
        if chunk.choices:
            token_ids += chunk.choices[0].model_extra.get("token_ids") or []
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return first, {"token_ids": token_ids, "usage": usage}


def api_rounds(target: Target, args: argparse.Namespace, pairs: list[tuple[list[int], list[int]]]) -> dict:
    """Cold then hot request of each round through the OpenAI API; outputs against the engine."""
    config = local_config(args, sessions=4)
    print("starting the cluster ...", file=sys.stderr)
    start(config)
    client = openai.OpenAI(base_url=f"http://{config.http_address}/v1", api_key="unused", timeout=600)
    first_token_seconds(client, config.model, pairs[0][0][63::-1], 4)  # warm up (shares no block with a round)
    reference = Engine(target.model, None, target.eos_token_ids)  # plain decoding, no prefix cache
    rows = []
    for cold_prompt, hot_prompt in pairs:
        cold_s, cold = first_token_seconds(client, config.model, cold_prompt, args.max_tokens)
        hot_s, hot = first_token_seconds(client, config.model, hot_prompt, args.max_tokens)
        expected = reference.generate([Request(hot_prompt, SamplingParams(max_tokens=args.max_tokens))])[0]
        rows.append(
            {
                "cold_ttft_s": round(cold_s, 4),
                "hot_ttft_s": round(hot_s, 4),
                "ratio": round(hot_s / cold_s, 4),
                "cold_cached_tokens": cold["usage"]["prompt_tokens_details"]["cached_tokens"],
                "hot_cached_tokens": hot["usage"]["prompt_tokens_details"]["cached_tokens"],
                "hot_output_equals_uncached_engine": hot["token_ids"] == expected.token_ids,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return {
        "rounds": rows,
        "median_cold_ttft_s": statistics.median(r["cold_ttft_s"] for r in rows),
        "median_hot_ttft_s": statistics.median(r["hot_ttft_s"] for r in rows),
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "identical_outputs": f"{sum(r['hot_output_equals_uncached_engine'] for r in rows)}/{len(rows)}",
    }


def resume(target: Target, prompt: list[int], generated: int) -> dict:
    """A session resumed after its replica was lost re-prefills its prompt and the ``generated``
    tokens it had emitted (the router's resume). On a replica that served the same prompt before
    (only the prompt's blocks are there), against one that holds nothing."""
    cold = Engine(target.model, None, target.eos_token_ids)
    emitted = cold.generate([Request(prompt, SamplingParams(max_tokens=generated, ignore_eos=True))])[0]
    hot = Engine(target.model, None, target.eos_token_ids, prefix_cache_blocks=1024)
    hot.generate([Request(prompt, SamplingParams(max_tokens=1))])  # the prompt's blocks, no reply
    resumed = Request(prompt + emitted.token_ids, SamplingParams(max_tokens=1))
    seconds, cached = {}, {}
    for name, engine in (("cold", cold), ("hot", hot)):
        start = time.perf_counter()
        cached[name] = engine.generate([resumed])[0].stats.cached_tokens
        seconds[name] = time.perf_counter() - start
    return {
        "context_tokens": len(resumed.prompt_ids),
        "reprefill_cold_s": round(seconds["cold"], 4),
        "reprefill_hot_s": round(seconds["hot"], 4),
        "ratio": round(seconds["hot"] / seconds["cold"], 4),
        "cached_tokens": cached["hot"],
    }


def generation_speed(target: Target, args: argparse.Namespace, batches: Sequence[int]) -> list[dict]:
    """Generated tok/s (prefill included, where the cache's lookups happen) with the cache off and
    on, alternating, on distinct prompts: the median of ``args.repeats``."""
    prompts = [p.ids for p in load_prompts(target, ["humaneval", "mt-bench"], 8)]
    drafter_name = default_drafter(args.model)
    drafter = scheduled_drafter(make_drafter(drafter_name, target.model, args.model), target.model, args.model)
    params = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
    rows = []
    for batch in batches:
        rates: dict[str, list[float]] = {"off": [], "on": []}
        requests = [Request(prompts[i % len(prompts)], params) for i in range(batch)]
        for _ in range(args.repeats):
            for name, blocks in (("off", 0), ("on", 1024)):
                engine = Engine(target.model, drafter, target.eos_token_ids, prefix_cache_blocks=blocks)
                start = time.perf_counter()
                results = engine.generate(requests)
                rates[name].append(sum(len(r.token_ids) for r in results) / (time.perf_counter() - start))
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        rows.append({"batch": batch, "off_tok_s": round(off, 1), "on_tok_s": round(on, 1), "ratio": round(on / off, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--drafter", default=None, help="the cluster's drafter (default: the model's default)")
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--tail", type=int, default=50, help="tokens at the end that differ")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16, help="per API request")
    parser.add_argument("--decode-tokens", type=int, default=64, help="per request of the speed runs")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.drafter = args.drafter or default_drafter(args.model)
    torch.set_num_threads(args.threads)
    target = load_target(args.model, args.dtype)
    pairs = long_prompts(target, args.rounds, args.prompt_tokens, args.tail)
    speed = generation_speed(target, args, [int(b) for b in args.batches.split(",")])
    resumed = resume(target, pairs[0][0], generated=200)
    print(json.dumps({"resume": resumed}), file=sys.stderr)
    api = api_rounds(target, args, pairs)
    results = {
        "machine": machine_info(torch.get_num_threads(), args.dtype, target.model.device),
        "model": args.model,
        "exact_kernels": target.model.exact,
        "prompt_tokens": args.prompt_tokens,
        "differing_tail_tokens": args.tail,
        "openai_api": api,
        "resume": resumed,
        "generation_speed": speed,
    }
    write_json(args.out, results)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
