"""``tandem`` command line: ``tandem generate "PROMPT"`` streams text from the embedded engine;
``tandem data`` regenerates training responses with the target model; ``tandem profile`` measures
what verification costs on this machine (the draft scheduler's input)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time

from tandem.errors import TandemError
from tandem.eval import command as eval_command
from tandem.flags import add_device_flag, add_draft_flags, add_exact_flag
from tandem.train import command as train_command

EXIT_USAGE = 2


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.drafters import DRAFTERS
    from tandem.models.catalog import DEFAULT_MODEL, builtin_names

    p = sub.add_parser("generate", help="generate text with speculative decoding, in process")
    p.add_argument("prompt", help="the user message (or the raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="skip the chat template")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{', '.join(builtin_names())}, an HF folder or a .gguf")
    p.add_argument(
        "--drafter",
        default=None,
        help=f"{', '.join(DRAFTERS)} or a drafter folder; a trained one with :TOPK,DEPTH,BUDGET drafts trees "
        "(default: the drafter recorded fastest for the model, tandem/data/drafters/<model>/default.json)",
    )
    add_draft_flags(p)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    add_device_flag(p)
    add_exact_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(run=run_generate)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    # Validate cheap things before the slow model load.
    from tandem.drafters import check_drafter_name, default_drafter, make_drafter, with_tree
    from tandem.engine import Engine, Request
    from tandem.profile import scheduled_drafter
    from tandem.sampling import SamplingParams
    from tandem.target import load_target
    from tandem.tokenizer import Detokenizer

    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    if not args.prompt.strip():
        raise TandemError("prompt is empty")
    args.drafter = with_tree(args.drafter or default_drafter(str(args.model)), args.tree, args.chain)
    check_drafter_name(args.drafter)
    target = load_target(args.model, args.dtype, args.device, args.exact)
    drafter = make_drafter(args.drafter, target.model, str(args.model))
    if args.schedule:
        drafter = scheduled_drafter(drafter, target.model, str(args.model), _stderr)
    tok = target.tokenizer
    prompt_ids = tok.encode(args.prompt, chat=not args.raw)
    engine = Engine(target.model, drafter, target.eos_token_ids, tok.decode, max_draft_nodes=args.max_draft)
    detok = Detokenizer(tok, params.stop)
    start = time.perf_counter()
    final = None
    for delta in engine.stream([Request(prompt_ids, params)]):
        text = detok.push(delta.token_ids, final=delta.finish_reason is not None)
        if not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()
        final = delta
    elapsed = time.perf_counter() - start
    stats = final.stats
    figures = {
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": len(detok.ids),
        "finish_reason": final.finish_reason,
        "tau": round(stats.tau, 3),
        "rounds": stats.rounds,
        "drafted_tokens": stats.drafted,
        "accepted_tokens": stats.accepted,
        "target_passes": engine.target_passes,
        "tokens_per_s": round(len(detok.ids) / elapsed, 2),
        "seconds": round(elapsed, 3),
        "drafter": args.drafter,
        "scheduled": args.schedule and drafter is not None,
        "model": str(args.model),
        "dtype": args.dtype,
    }
    if args.json:
        print(json.dumps({"text": detok.text, "token_ids": detok.ids, **figures}))
    else:
        sys.stdout.write("\n")
        print(
            f"[{figures['generated_tokens']} tokens, tau {figures['tau']:.2f}, "
            f"{figures['tokens_per_s']:.1f} tok/s, {figures['target_passes']} target passes, "
            f"finish {figures['finish_reason']}]",
            file=sys.stderr,
        )
    return 0


def _data_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.drafters import DRAFTERS
    from tandem.models.catalog import DEFAULT_MODEL, builtin_names
    from tandem.train.regenerate import RESPONSES

    p = sub.add_parser("data", help="regenerate training responses with the target model (jsonl with token ids)")
    p.add_argument("--prompts", help='jsonl of {"turns": [...]} or ShareGPT json/jsonl (default: ShareGPT package)')
    p.add_argument("--out", default="regenerated.jsonl", help="output jsonl; an existing one is resumed")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{', '.join(builtin_names())}, an HF folder or a .gguf")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    add_device_flag(p)
    p.add_argument(
        "--drafter",
        default="ngram",
        choices=DRAFTERS,
        help="faster decoding; greedy output is unchanged, samples keep their law",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--responses",
        default="target",
        choices=RESPONSES,
        help="regenerated by the target, or the source's own first reply (teacher-forced: no generation; "
        "training labels become the target's greedy prediction at each position)",
    )
    p.add_argument("--seed", type=int, default=0, help="each prompt's seed derives from it and the prompt id")
    p.add_argument("--max-tokens", type=int, default=256, help="per response")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--offset", type=int, default=0, help="skip this many usable prompts")
    p.add_argument("--limit", type=int, default=None, help="regenerate at most this many prompts")
    p.add_argument(
        "--server",
        help="regenerate through this OpenAI-compatible server (tandem serve's HTTP API, vLLM, SGLang: "
        "http://host:port) instead of in process; --model still names the tokenizer and chat template",
    )
    p.add_argument("--server-model", help="the model name the server serves (default: --model)")
    p.add_argument("--api-key", help="the server's API key (default: $OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight to the server")
    p.set_defaults(run=run_data)


def run_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tandem.sampling import SamplingParams
    from tandem.train.prompts import DataError, sharegpt_path
    from tandem.train.regenerate import regenerate_dataset
    from tandem.train.remote import Server

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")

    # Validate cheap things before reading prompts and loading the model.
    minimums = {"batch_size": 1, "max_prompt_tokens": 1, "offset": 0, "limit": 1, "concurrency": 1}
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise DataError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    stats = regenerate_dataset(
        source=Path(args.prompts) if args.prompts else sharegpt_path(),
        out=Path(args.out),
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        drafter=args.drafter,
        params=params,
        batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens,
        offset=args.offset,
        limit=args.limit,
        responses=args.responses,
        log=lambda line: print(line, file=sys.stderr),
        server=Server(args.server, args.server_model or args.model, api_key) if args.server else None,
        concurrency=args.concurrency,
    )
    no_reply = f"{stats.no_reply} without a reply, " if args.responses == "dataset" else ""
    print(
        f"wrote {stats.written} records to {args.out} ({stats.already_done} already there, {no_reply}"
        f"{stats.too_long} prompts over {args.max_prompt_tokens} tokens skipped; "
        f"{stats.generated_tokens} tokens in {stats.seconds:.1f} s)",
        file=sys.stderr,
    )
    return 0


def _profile_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.models.catalog import DEFAULT_MODEL, builtin_names

    p = sub.add_parser("profile", help="measure the target's verification time by batch size and tree width")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{', '.join(builtin_names())}, an HF folder or a .gguf")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    add_device_flag(p)
    add_exact_flag(p)
    p.add_argument("--force", action="store_true", help="measure again even if this machine has a profile")
    p.set_defaults(run=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    from tandem.profile import load_or_measure, profile_path
    from tandem.target import load_target

    target = load_target(args.model, args.dtype, args.device, args.exact)
    cost = load_or_measure(target.model, str(args.model), args.force, _stderr)
    path = profile_path(str(args.model), target.model.dtype, target.model.device, target.model.kernels)
    print(f"verification pass, ms ({args.model}, {args.dtype}, {target.model.kernels} kernels; {path})")
    print("batch \\ width " + "".join(f"{w:>9}" for w in cost.widths))
    for batch, row in zip(cost.batches, cost.seconds):
        print(f"{batch:>13}  " + "".join(f"{s * 1000:9.1f}" for s in row))
    extra = cost.per_key * 1000 * 1000 * 1000
    print(f"after {cost.base_context} tokens; attention adds {extra:.1f} ms per 1000 query tokens x 1000 cached keys")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _data_parser(sub)
    _profile_parser(sub)
    train_command.add_parser(sub)
    train_command.add_export_parser(sub)
    eval_command.add_parser(sub)
    # More verbs (`tandem serve`, `tandem client`) come from packages layered on top of this one.
    for entry in importlib.metadata.entry_points(group="tandem.commands"):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except TandemError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
