"""``tandem`` command line: ``tandem generate "PROMPT"`` streams text from the embedded engine."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tandem.errors import TandemError

EXIT_USAGE = 2


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.drafters import DRAFTERS
    from tandem.models.catalog import DEFAULT_MODEL, builtin_names

    p = sub.add_parser("generate", help="generate text with speculative decoding, in process")
    p.add_argument("prompt", help="the user message (or the raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="skip the chat template")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{', '.join(builtin_names())}, an HF folder or a .gguf")
    p.add_argument("--drafter", default="ngram", choices=DRAFTERS)
    p.add_argument("--max-draft", type=int, default=16, help="draft tree nodes per round")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    # Validate cheap things before the slow model load.
    from tandem.drafters import make_drafter
    from tandem.engine import Engine, Request
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
    drafter = make_drafter(args.drafter)
    target = load_target(args.model, args.dtype)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
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
