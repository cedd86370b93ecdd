"""DSpark's hardware-aware draft scheduler: verify only the draft nodes that pay for their cost.

A verification pass costs what the hardware makes it cost for its batch size and tree width
(padded to the widest tree: measured once by :mod:`tandem.profile`). Every draft node carries
the drafter's predicted survival (:attr:`TokenTree.survival`), the expected number of tokens it
adds. The scheduler picks the width that maximises expected tokens per second of round time,

    (Σ_seqs 1 + Σ_kept survival) / (draft seconds + pass seconds(batch, width)),

and keeps, in each tree, the width − 1 nodes ranked first. It decides before the target sees the
tokens, and stays lossless:

- a greedy target's output never depends on which nodes are verified, so its nodes are ranked by
  survival (ancestors first: survival never rises down a path) and the best width is taken;
- under sampling, whether a node is verified must not depend on its own token or on anything
  drawn after it, so nodes are ranked in draw order (node ids: a prefix in it is a subtree), their
  survival is known before their draw (:mod:`tandem.tree_search`), and the width grows only while
  the objective rises: the decision to keep node k reads nothing after node k.

Trees without survival (the n-gram drafter) are verified whole. Survival is calibrated online
before the cut (:mod:`tandem.calibration`): drafters' own predictions are far off.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.calibration import SurvivalCalibration
from tandem.drafters.base import Drafter, DraftRequest
from tandem.tree import TokenTree


@dataclass(frozen=True)
class PassCost:
    """Seconds of one verification pass at ``batches[i]`` sequences of ``widths[j]`` tokens each
    (anchor included): ``seconds[i][j]``, measured by ``tandem profile``."""

    batches: tuple[int, ...]
    widths: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if len(self.seconds) != len(self.batches) or any(len(row) != len(self.widths) for row in self.seconds):
            raise ValueError("a pass cost needs one row of seconds per batch size and one value per width")
        if list(self.batches) != sorted(set(self.batches)) or list(self.widths) != sorted(set(self.widths)):
            raise ValueError("batch sizes and widths must be increasing")
        if self.widths[0] != 1:
            raise ValueError("the profile must include width 1 (plain decoding)")

    def __call__(self, batch: int, width: int) -> float:
        """Interpolated linearly in width, then in batch size (extrapolated past the last).

        Measured values are taken as they are, dips included: on CPUs a wider pass can be
        cheaper (float32 passes of 2-3 tokens measured slower than of 5 on this machine)."""
        rows = [_interpolate(self.widths, row, width) for row in self.seconds]
        return max(_interpolate(self.batches, rows, batch), 1e-9)

    def to_json(self) -> dict:
        return {"batches": list(self.batches), "widths": list(self.widths), "seconds": [list(r) for r in self.seconds]}

    @classmethod
    def from_json(cls, data: dict) -> PassCost:
        return cls(tuple(data["batches"]), tuple(data["widths"]), tuple(tuple(r) for r in data["seconds"]))


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    if len(xs) == 1:
        return ys[0] * (x / xs[0] if x > xs[0] else 1.0)
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return max(min(ys), ys[i] + slope * (x - xs[i]))


def ranked_gains(tree: TokenTree, greedy: bool) -> tuple[list[int], list[float]]:
    """The tree's draft nodes in the order the scheduler admits them, and their survival."""
    assert tree.survival is not None
    survival = list(tree.survival)
    for i, parent in enumerate(tree.parents):  # a node survives no more than its parent does
        if parent >= 0:
            survival[i] = min(survival[i], survival[parent])
    nodes = list(range(1, len(tree)))
    if greedy:
        depths = tree.depths
        nodes.sort(key=lambda i: (-survival[i], depths[i], i))
    return nodes, [survival[i] for i in nodes]


def best_width(
    gains: Sequence[Sequence[float]],
    batch: int,
    fixed_width: int,
    cost: PassCost,
    draft_seconds: float,
    greedy: bool,
) -> int:
    """The verification width (tokens per sequence) with the most expected tokens per second.

    ``gains[s]`` lists scored sequence ``s``'s ranked survival values; the pass holds ``batch``
    sequences, and trees verified whole make it at least ``fixed_width`` wide. Greedy batches take
    the best width; others grow it while the objective rises (see the module docstring)."""
    widest = max([fixed_width, *(len(g) + 1 for g in gains)])
    cumulative = [[0.0, *itertools.accumulate(g)] for g in gains]
    best, best_value = fixed_width, -1.0
    for width in range(fixed_width, widest + 1):
        # one token per sequence for sure (the bonus); unscored trees add what we cannot predict
        expected = batch + sum(c[min(width - 1, len(c) - 1)] for c in cumulative)
        value = expected / (draft_seconds + cost(batch, width))
        if value > best_value:
            best, best_value = width, value
        elif not greedy:
            break
    return best


def schedule(
    trees: Sequence[TokenTree], greedy: Sequence[bool], cost: PassCost, draft_seconds: float = 0.0
) -> list[TokenTree]:
    """The trees cut to the width that pays best on this hardware (see the module docstring)."""
    scored = [i for i, t in enumerate(trees) if t.survival is not None and len(t) > 1]
    if not scored:
        return list(trees)
    fixed = max([1, *(len(t) for i, t in enumerate(trees) if i not in scored)])
    ranked = {i: ranked_gains(trees[i], greedy[i]) for i in scored}
    greedy_only = all(greedy[i] for i in scored)
    width = best_width([ranked[i][1] for i in scored], len(trees), fixed, cost, draft_seconds, greedy_only)
    out = list(trees)
    for i in scored:
        if len(trees[i]) > width:
            out[i] = trees[i].subtree(ranked[i][0][: width - 1])
    return out


class ScheduledDrafter(Drafter):
    """A drafter whose trees come out cut by :func:`schedule` for the whole batch it is asked
    for, counting its own drafting time: the in-process engine's scheduler. With ``calibrate``
    the drafter's survival predictions are first calibrated online (:mod:`tandem.calibration`)
    from what the tokens of each sequence's next request show was accepted."""

    def __init__(self, inner: Drafter, cost: PassCost, calibrate: bool = True) -> None:
        self.inner, self.cost = inner, cost
        self.name = inner.name
        self.feature_layers = inner.feature_layers
        self.calibration = SurvivalCalibration() if calibrate else None
        self._sent: dict[int, tuple[TokenTree, int]] = {}  # seq_id -> (tree verified, tokens known then)

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        start = time.perf_counter()
        greedy = [r.params.greedy for r in requests]
        trees = self.inner.propose(requests)
        if self.calibration is not None:
            for r in requests:
                sent = self._sent.pop(r.seq_id, None)
                if sent is not None:
                    self.calibration.observe(r.seq_id, sent[0], r.token_ids[sent[1] :])
            trees = [self.calibration.apply(r.seq_id, t, g) for r, t, g in zip(requests, trees, greedy)]
        trees = schedule(trees, greedy, self.cost, time.perf_counter() - start)
        if self.calibration is not None:
            self._sent.update((r.seq_id, (t, len(r.token_ids))) for r, t in zip(requests, trees))
        return trees

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)
        self._sent.pop(seq_id, None)
        if self.calibration is not None:
            self.calibration.forget(seq_id)

    def held(self) -> int:
        return max(self.inner.held(), len(self._sent), self.calibration.held() if self.calibration else 0)
