"""Run drafters through the real engine on benchmark prompts and measure what they buy.

Per (drafter, benchmark, temperature): τ (accepted drafts + 1 per round), acceptance rate at each
draft position (of the rounds that drafted a k-th token, the share that accepted it), and
tokens/s of decoding, with plain decoding of the same target measured in the same run. Prompts
run one at a time (batch 1) and drafters are interleaved per prompt, so a slow spell of a shared
machine hits every method alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from tandem.drafters.base import Drafter, DraftRequest
from tandem.engine import Engine, Request
from tandem.eval.benchmarks import BenchPrompt
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree


class DepthRecorder(Drafter):
    """Wraps a drafter and records the depth of every tree it proposes, in order per sequence."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.name = inner.name
        self.feature_layers = inner.feature_layers
        self.depths: dict[int, list[int]] = {}

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        trees = self.inner.propose(requests)
        for r, t in zip(requests, trees):
            self.depths.setdefault(r.seq_id, []).append(max(t.depths))
        return trees

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)


@dataclass
class Tally:
    """Counters of one (drafter, benchmark, temperature) cell."""

    prompts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    accepted: int = 0
    reached: list[int] = field(default_factory=list)  # rounds that drafted a k-th token
    kept: list[int] = field(default_factory=list)  # rounds that accepted it

    def add_round(self, depth: int, accepted: int) -> None:
        grow = depth - len(self.reached)  # both lists stay as long as the deepest draft
        self.reached.extend([0] * grow)
        self.kept.extend([0] * grow)
        for k in range(depth):
            self.reached[k] += 1
        for k in range(accepted):
            self.kept[k] += 1

    def summary(self, plain_tps: float | None) -> dict[str, object]:
        tps = self.tokens / self.seconds if self.seconds else 0.0
        return {
            "prompts": self.prompts,
            "tokens": self.tokens,
            "tau": round((self.accepted + self.rounds) / self.rounds, 3) if self.rounds else None,
            "acceptance_by_position": [round(k / r, 3) for k, r in zip(self.kept, self.reached)],
            "tokens_per_s": round(tps, 2),
            "speedup": round(tps / plain_tps, 3) if plain_tps else None,
        }


def evaluate(
    model,
    drafters: dict[str, Drafter | None],
    prompts: Sequence[tuple[BenchPrompt, list[int]]],
    temperatures: Sequence[float],
    max_tokens: int,
    eos_token_ids: Sequence[int],
    max_draft_nodes: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, dict[str, dict[str, object]]]]:
    """``results[temperature][drafter][benchmark]`` summaries; ``plain`` is the baseline."""
    methods: dict[str, Drafter | None] = {"plain": None, **drafters}
    engines = {
        name: Engine(model, DepthRecorder(d) if d else None, eos_token_ids, max_draft_nodes=max_draft_nodes)
        for name, d in methods.items()
    }
    tallies: dict[tuple[float, str, str], Tally] = {}
    total = len(temperatures) * len(prompts) * len(methods)
    bar = tqdm(total=total, desc="eval", unit="run", disable=not progress)
    for temperature in temperatures:
        for i, (prompt, ids) in enumerate(prompts):
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i)
            for name, engine in engines.items():
                tally = tallies.setdefault((temperature, name, prompt.benchmark), Tally())
                _run_one(engine, ids, params, tally)
                bar.update()
    bar.close()
    results: dict[str, dict[str, dict[str, dict[str, object]]]] = {}
    for temperature in temperatures:
        per_method: dict[str, dict[str, dict[str, object]]] = {}
        benchmarks = sorted({p.benchmark for p, _ in prompts}, key=[p.benchmark for p, _ in prompts].index)
        for name in methods:
            cells = {b: tallies[(temperature, name, b)] for b in benchmarks}
            cells["all"] = _merge(list(cells.values()))
            plain = {b: tallies_for(tallies, temperature, b) for b in cells}
            per_method[name] = {b: cell.summary(plain[b]) for b, cell in cells.items()}
        results[f"{temperature:g}"] = per_method
    return results


def tallies_for(tallies: dict[tuple[float, str, str], Tally], temperature: float, benchmark: str) -> float:
    """Plain decoding's tokens/s for a benchmark (``all``: every benchmark together)."""
    if benchmark == "all":
        cells = [t for (temp, name, _), t in tallies.items() if temp == temperature and name == "plain"]
    else:
        cells = [tallies[(temperature, "plain", benchmark)]]
    merged = _merge(cells)
    return merged.tokens / merged.seconds if merged.seconds else 0.0


def _merge(cells: list[Tally]) -> Tally:
    out = Tally()
    for c in cells:
        out.prompts += c.prompts
        out.tokens += c.tokens
        out.seconds += c.seconds
        out.rounds += c.rounds
        out.accepted += c.accepted
        out.reached, out.kept = _add(out.reached, c.reached), _add(out.kept, c.kept)
    return out


def _add(a: list[int], b: list[int]) -> list[int]:
    return [(a[k] if k < len(a) else 0) + (b[k] if k < len(b) else 0) for k in range(max(len(a), len(b)))]


def _run_one(engine: Engine, ids: list[int], params: SamplingParams, tally: Tally) -> None:
    """Decode one prompt. The clock starts after the prefill (the same pass for every method),
    and every later delta is one round: its tokens are the accepted drafts plus the bonus."""
    start = 0.0
    rounds: list[int] = []  # tokens emitted per round
    final = None
    for delta in engine.stream([Request(ids, params)]):
        if final is None and not start:
            start = time.perf_counter()
        else:
            rounds.append(len(delta.token_ids))
        final = delta
    tally.seconds += time.perf_counter() - start
    tally.prompts += 1
    tally.tokens += sum(rounds)
    if not rounds:
        return
    stats = final.stats
    tally.rounds += stats.rounds
    tally.accepted += stats.accepted
    recorder = engine.drafter
    if isinstance(recorder, DepthRecorder):
        depths = recorder.depths.pop(max(recorder.depths))
        # A stop can cut the last round's tokens short; its accepted count is what the total leaves.
        accepted = [n - 1 for n in rounds[:-1]]
        accepted.append(stats.accepted - sum(accepted))
        for depth, kept in zip(depths, accepted):
            tally.add_round(depth, kept)
