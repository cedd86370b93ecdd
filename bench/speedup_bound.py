"""The most a trained drafter can speed up batch-1 decoding on this machine: its replayed τ at
each tree budget B (``bench/tree_budget.py``'s JSON) over what a drafted round costs here, the
plain step plus the wider pass (the machine's verification profile) plus the drafter's own round
(measured now, as ``bench/draft_cost.py`` does):

    bound(B) = τ(B) × step / (step + pass(B + 1) − pass(1) + draft)

It is an upper bound on what a fixed budget can reach: every round drafted at that budget, with
the τ of a tree grown for it, and no cost for the scheduler, the calibration or the tree's
bookkeeping. It also gives the draft cost a round may have at most for ``--aim`` (draft × step)
at each budget, so an aim out of reach is shown by numbers, not guessed.

A scheduler that cuts each round's tree on its own may do better than any fixed budget, so every
drafter (the suffix drafter too, which has no tree-budget entry) also gets a hindsight bound from
a replay of its full trees on the code prompts' greedy continuations in the bench's dtype
(:func:`tandem.eval.replay.replay_rounds`): each round verifies exactly the path that will be
accepted, or, where that path does not pay for its drafting and wider pass, the tokens are
decoded plain. That is the most a scheduler can get out of these trees (up to the later trees that
plain rounds would shift).

    python bench/speedup_bound.py --drafters dspark eagle3 suffix --max-tokens 96 --out docs/results/speedup-bound
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from decode import load_prompts, machine_info
from draft_cost import Timed, step_seconds

from tandem.drafters import make_drafter
from tandem.engine import Engine, Request
from tandem.eval.replay import ReplayCase, build_cases, replay_rounds
from tandem.models.catalog import DEFAULT_MODEL
from tandem.profile import load_or_measure
from tandem.sampling import SamplingParams
from tandem.target import Target, load_target

CODE = ("humaneval", "mbpp")
CASES_PER_BENCHMARK = 10  # code prompts per benchmark the hindsight bound replays
TAUS = Path(__file__).parents[1] / "docs" / "results" / "tree-budget.json"


def tau_key(results: dict, drafter: str) -> str | None:
    """The tree-budget entry of the shipped ``drafter`` (its name, or its name with a note), if any."""
    for key in results:
        if key == drafter or (key.startswith(f"{drafter} (") and "shipped" in key):
            return key
    return None


def bound(tau: float, step: float, extra_pass: float, draft: float) -> float:
    return tau * step / (step + extra_pass + draft)


def hindsight(rounds: list[tuple[int, int]], step: float, extra_pass: Callable[[int], float], draft: float) -> float:
    """× plain when every round ``(accepted, emitted)`` verifies just its accepted path (a pass
    ``extra_pass(accepted)`` wider), or is decoded plain where that costs less."""
    seconds = sum(min(step + extra_pass(a) + draft, n * step) if a else n * step for a, n in rounds)
    return sum(n for _, n in rounds) * step / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafters", nargs="+", default=["dspark", "eagle3"])
    parser.add_argument("--taus", default=str(TAUS), help="bench/tree_budget.py's JSON")
    parser.add_argument("--prompts", type=int, default=6, help="code prompts the step and draft cost are timed on")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--aim", type=float, default=1.15)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="speedup-bound", help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    taus = json.loads(Path(args.taus).read_text())["results"]
    target = load_target(args.model, args.dtype)
    prompts = [p.ids for p in load_prompts(target, CODE, args.prompts)][: args.prompts]
    context = round(statistics.mean(len(p) for p in prompts)) + args.max_tokens // 2
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    cost = load_or_measure(target.model, str(args.model))
    cases_by_layers: dict[tuple[int, ...], list[ReplayCase]] = {}
    plain = Engine(target.model, None, target.eos_token_ids)
    step = statistics.median(step_seconds(plain, [p], params) for p in prompts)

    def extra_pass(drafts: int) -> float:
        """What verifying ``drafts`` tokens beside the anchor adds to a batch-1 pass."""
        return cost(1, drafts + 1, context) - cost(1, 1, context)

    results: dict[str, dict] = {}
    for name in args.drafters:
        timed = Timed(make_drafter(name, target.model, str(args.model)))
        engine = Engine(target.model, timed, target.eos_token_ids)
        for prompt in prompts:
            list(engine.stream([Request(prompt, params)]))
        draft = statistics.median(timed.seconds)
        cases = code_cases(target, cases_by_layers, timed.feature_layers, args.max_tokens)
        fresh = make_drafter(name, target.model, str(args.model))  # the timed one's suffix trie holds these prompts
        rounds = [(a, n) for _, a, n in replay_rounds(fresh, cases)]
        rows = {}
        key = tau_key(taus, name)
        for budget, by_benchmark in taus[key]["tree"].items() if key else ():
            extra = extra_pass(int(budget))
            tau = statistics.mean(by_benchmark[b] for b in CODE)
            rows[budget] = {
                "tau_code": round(tau, 3),
                "tau_all": by_benchmark["all"],
                "pass_x_step": round((step + extra) / step, 3),
                "bound_free_draft": round(bound(tau, step, extra, 0.0), 3),
                "bound": round(bound(tau, step, extra, draft), 3),
                "draft_for_aim_x_step": round((tau * step / args.aim - step - extra) / step, 3),
            }
        results[name] = {
            "draft_ms": round(draft * 1000, 2),
            "draft_x_step": round(draft / step, 3),
            "budgets": rows,
            "hindsight": {
                "tau_code": round(sum(n for _, n in rounds) / len(rounds), 3),
                "bound_free_draft": round(hindsight(rounds, step, extra_pass, 0.0), 3),
                "bound": round(hindsight(rounds, step, extra_pass, draft), 3),
            },
        }
    meta = {
        **machine_info(torch.get_num_threads(), args.dtype),
        "model": str(args.model),
        "step_ms": round(step * 1000, 2),
        "context": context,
        "aim": args.aim,
        "taus": args.taus,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, meta)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


def code_cases(
    target: Target, built: dict[tuple[int, ...], list[ReplayCase]], layers: tuple[int, ...], max_tokens: int
) -> list[ReplayCase]:
    """The code prompts' greedy continuations with the features of ``layers`` (built once per
    layer set, kept in ``built``; a drafter that reads none gets the last layer's, unread)."""
    layers = layers or (target.model.config.num_layers - 1,)
    if layers not in built:
        prompts = [(p.benchmark, p.ids) for p in load_prompts(target, CODE, CASES_PER_BENCHMARK)]
        built[layers] = build_cases(target.model, prompts, layers, max_tokens, target.eos_token_ids)
    return built[layers]


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"Batch 1, code prompts ({' + '.join(CODE)}), {meta['model']}, plain step {meta['step_ms']} ms. "
        f"τ: replayed trees of B nodes; bounds: × plain; the last column: the draft cost a round may "
        f"have at most for {meta['aim']}× (× step; negative: out of reach even with free drafting).",
        "",
        "| drafter (draft × step) | B | τ code | drafted pass × step | bound, free draft | bound | draft for aim |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for budget, row in r["budgets"].items():
            lines.append(
                f"| {name} ({r['draft_x_step']}×) | {budget} | {row['tau_code']} | {row['pass_x_step']} | "
                f"{row['bound_free_draft']}× | {row['bound']}× | {row['draft_for_aim_x_step']} |"
            )
    lines += [
        "",
        f"Hindsight: each drafter's full trees replayed on the code prompts ({CASES_PER_BENCHMARK} a benchmark, "
        f"{meta['dtype']}); every round verifies just the path it will accept, or decodes plain where that "
        "costs less: the most a scheduler can get out of these trees.",
        "",
        "| drafter | draft × step | τ code, full trees | bound, free draft | bound |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        h = r["hindsight"]
        lines.append(f"| {name} | {r['draft_x_step']}× | {h['tau_code']} | {h['bound_free_draft']}× | {h['bound']}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
