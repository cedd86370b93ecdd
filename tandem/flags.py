"""Command-line flags that several ``tandem`` commands share, defined once."""

from __future__ import annotations

import argparse


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def add_exact_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exact",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batch-invariant kernels: speculative output equals plain decoding token for token "
        "(default: on for bf16 and float32 on CPUs with AVX2, where they are also the fastest; "
        "--no-exact: stock kernels)",
    )


def add_draft_flags(p: argparse.ArgumentParser) -> None:
    """How drafts are shaped and scheduled (``tandem generate`` and ``tandem eval``)."""
    p.add_argument("--max-draft", type=int, default=16, help="draft tree nodes per round")
    p.add_argument("--tree", metavar="TOPK,DEPTH,BUDGET", help="tree shape of the trained drafters (default 4,6,16)")
    p.add_argument("--chain", action="store_true", help="trained drafters draft chains instead of trees")
    p.add_argument(
        "--no-schedule",
        dest="schedule",
        action="store_false",
        help="verify every drafted node (default: the draft scheduler keeps what pays on this machine, "
        "from a pass-time profile measured once and cached)",
    )
