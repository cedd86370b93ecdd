"""Bytes per round on the cluster's wire, as its messages encode them: the draft call (new tokens
in, the tree out), the verify call (the tree in, the verdict out) and the target features.
Counted both ways on the very same rounds:

- features: through the router (out of the target in the verdict, into the drafter with the next
  step: twice, the encoding before) or straight from the target replica to the draft replica
  (``Draft.Features``: once, none through the router, the encoding now);
- ``q``: dense [nodes, vocabulary] (before) or over its support (now);
- the tree: through the router (out of the draft call, into the verify call: twice, before) or
  straight from the draft replica to the target replica, which asks for it (once, now); the router
  then reads only the verdicts.

    python bench/wire_bytes.py                       # dspark, eagle3, ngram; greedy and T = 1
    python bench/wire_bytes.py --drafters dspark --prompts 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from decode import load_prompts, machine_info, write_json

from tandem.drafters import Drafter, DraftRequest, make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.sampling import SamplingParams
from tandem.target import load_target
from tandem.tree import TokenTree
from tandem_proto.v1 import worker_pb2
from workers.features import chunks
from workers.wire import tensor_to_proto, tree_to_proto

OUT = Path(__file__).parent / "results" / "wire_bytes.json"


class Measured(Drafter):
    """``inner``, with each round's messages encoded and their sizes kept."""

    def __init__(self, inner: Drafter) -> None:
        self.inner, self.name, self.feature_layers = inner, inner.name, inner.feature_layers
        self.rounds: list[dict[str, int]] = []

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        trees = self.inner.propose(requests)
        for request, tree in zip(requests, trees):
            features = tensor_to_proto(request.features)
            feature_bytes = features.ByteSize() if features is not None else 0
            direct = sum(c.ByteSize() for c in chunks("0" * 32, 0, request.features)) if feature_bytes else 0
            step = worker_pb2.DraftStep(new_token_ids=request.token_ids[-1:], max_nodes=request.max_nodes)
            # a verdict as large as a typical one: two tokens (tau about 2) and the round's counts
            verdict = worker_pb2.VerifyOut(
                tokens=tree.tokens[:2], accepted=1, room=1024, capacity=2048, kv_blocks=16.0, continues=True,
                drafted=len(tree) - 1, draft_seconds=0.003,
            )  # fmt: skip
            dense = worker_pb2.Tree(tokens=tree.tokens, parents=tree.parents, survival=tree.survival or [])
            if tree.draft_probs is not None:
                dense.draft_probs.CopyFrom(tensor_to_proto(tree.draft_probs))
            # before, all through the router: the step in and the tree out of the draft call, the
            # tree in and the verdict out of the verify call; now the target replica sends the step
            # and gets the tree, and the router reads the verdict
            self.rounds.append(
                {
                    "features_via_router": 2 * feature_bytes,
                    "features_direct": direct,
                    "tree_before": 2 * dense.ByteSize(),
                    "tree_after": tree_to_proto(tree).ByteSize(),
                    "step": step.ByteSize(),
                    "verdict": verdict.ByteSize(),
                }
            )
        return trees

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafters", nargs="+", default=["dspark", "eagle3", "ngram"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    target = load_target(args.model, "bfloat16")
    prompts = [p.ids for p in load_prompts(target, ("humaneval", "mbpp", "mt-bench"), args.prompts)][: args.prompts]
    results: dict[str, dict] = {}
    for name in args.drafters:
        for temperature in (0.0, 1.0):
            measured = Measured(make_drafter(name, target.model, str(args.model)))
            engine = Engine(target.model, measured, target.eos_token_ids)
            params = [SamplingParams(temperature, max_tokens=args.max_tokens, seed=i) for i in range(len(prompts))]
            engine.generate([Request(p, s) for p, s in zip(prompts, params)])
            per_round = {key: statistics.mean(r[key] for r in measured.rounds) for key in measured.rounds[0]}
            control = per_round["step"] + per_round["verdict"]
            router_before = per_round["features_via_router"] + per_round["tree_before"] + control
            router_after = per_round["verdict"]
            before = router_before
            after = per_round["tree_after"] + control + per_round["features_direct"]
            results[f"{name} T={temperature:g}"] = {
                "rounds": len(measured.rounds),
                "bytes_per_round_before": round(before),
                "bytes_per_round_after": round(after),
                "router_bytes_per_round_before": round(router_before),
                "router_bytes_per_round_after": round(router_after),
                "features_bytes_per_round_via_router": round(per_round["features_via_router"]),
                "features_bytes_per_round_direct": round(per_round["features_direct"]),
                "tree_bytes_per_round_before": round(per_round["tree_before"]),
                "tree_bytes_per_round_after": round(per_round["tree_after"]),
            }
            print(
                f"{name} T={temperature:g}: {before / 1e3:.1f} kB -> {after / 1e3:.1f} kB a round, "
                f"through the router {router_before:.0f} B -> {router_after:.0f} B",
                file=sys.stderr,
            )
    meta = {**machine_info(torch.get_num_threads(), "bfloat16"), "model": str(args.model), "prompts": len(prompts)}
    record = {"meta": meta, "results": results}
    out = Path(args.out)
    write_json(out, record)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
