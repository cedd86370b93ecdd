"""Online calibration of drafters' predicted survival, from what verification accepted.

The draft scheduler (:mod:`tandem.scheduler`) admits a node when its predicted survival pays for
its share of the pass. Drafters predict it badly: the suffix drafter's "seen once before, so 1/2"
nodes are accepted 11 % of the time on prose and 25 % on code (greedy replays of the five
benchmarks), and a trained drafter's confidence head was fitted on training data, at another
temperature. So every verified node teaches the scheduler: a node's *step factor* (its predicted
survival over its parent's: the chance it survives once its parent did) falls into one of
:data:`BINS` bins, and each bin counts how many nodes were tried (their parent was accepted) and
how many of those were accepted. A bin's calibrated factor is its acceptance rate, shrunk toward
the drafter's own factor by a prior; a node's calibrated survival is the product of calibrated
factors down its path.

Counts are kept twice: for all sequences (greedy and sampling apart, halved once they grow large,
so they follow the traffic) and per sequence (prose and code differ), the second shrunk toward
the first. A calibrated survival depends on the node's own factor, which the drafter knows before
it draws the node, and on earlier rounds' outcomes only: the scheduler's cut stays lossless.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from tandem.tree import TokenTree, matched_path, path_to

BINS = 10  # step factors in [0, 1], in bins of 0.1
GLOBAL_PRIOR = 20.0  # pseudo-observations at the drafter's own factor, for all sequences
SEQUENCE_PRIOR = 10.0  # pseudo-observations at the all-sequence estimate, for one sequence
MAX_COUNT = 5000.0  # per bin; above it the all-sequence counts are halved


@dataclass
class _Counts:
    tried: list[float] = field(default_factory=lambda: [0.0] * BINS)
    accepted: list[float] = field(default_factory=lambda: [0.0] * BINS)


@dataclass
class _Sent:
    """The calibrated tree handed to the scheduler, the bin of each node's step factor, and
    which counts it learns into."""

    tree: TokenTree
    bins: list[int]
    greedy: bool


def step_factors(tree: TokenTree) -> list[float]:
    """Each node's predicted survival over its parent's (root 1; a parent predicted never to
    survive gives its children 0)."""
    assert tree.survival is not None
    s = tree.survival
    return [1.0] + [min(1.0, s[i] / s[p]) if s[p] > 0 else 0.0 for i, p in enumerate(tree.parents[1:], 1)]


class SurvivalCalibration:
    """Calibrated survival for the trees of many sequences (keys: sequence ids, cache rows)."""

    def __init__(self) -> None:
        self._all = {True: _Counts(), False: _Counts()}  # greedy, sampling
        self._seqs: dict[Hashable, _Counts] = {}
        self._sent: dict[Hashable, _Sent] = {}

    def apply(self, key: Hashable, tree: TokenTree, greedy: bool) -> TokenTree:
        """``tree`` with its survival calibrated (unchanged when it predicts none)."""
        if tree.survival is None or len(tree) == 1:
            return tree
        factors = step_factors(tree)
        bins = [min(int(f * BINS), BINS - 1) for f in factors]
        seq = self._seqs.get(key)
        calibrated = [1.0]
        for i, parent in enumerate(tree.parents[1:], 1):
            factor = self._factor(bins[i], factors[i], greedy, seq)
            calibrated.append(calibrated[parent] * factor)
        out = TokenTree(tree.tokens, tree.parents, tree.draft_probs, tuple(calibrated))
        self._sent[key] = _Sent(out, bins, greedy)
        return out

    def observe(self, key: Hashable, verified: TokenTree, emitted: Sequence[int]) -> None:
        """Count the outcome of the tree last calibrated for ``key``, of which ``verified`` (the
        scheduler's cut) was checked and ``emitted`` came out."""
        sent = self._sent.pop(key, None)
        if sent is None or len(verified) == 1:
            return
        bin_of = _bins_by_path(sent.tree, sent.bins)
        accepted = set(matched_path(verified, emitted))
        counts = [self._all[sent.greedy], self._seqs.setdefault(key, _Counts())]
        for i, parent in enumerate(verified.parents[1:], 1):
            if parent and parent not in accepted:
                continue  # its parent failed: the node was never tried on its own
            b = bin_of.get(_path(verified, i))
            if b is None:
                continue
            for c in counts:
                c.tried[b] += 1
                c.accepted[b] += i in accepted
        shared = self._all[sent.greedy]
        for b in range(BINS):
            if shared.tried[b] > MAX_COUNT:
                shared.tried[b] /= 2
                shared.accepted[b] /= 2

    def forget(self, key: Hashable) -> None:
        """The sequence ended: drop its counts and its pending tree."""
        self._seqs.pop(key, None)
        self._sent.pop(key, None)

    def held(self) -> int:
        return len(self._seqs.keys() | self._sent.keys())

    def _factor(self, b: int, own: float, greedy: bool, seq: _Counts | None) -> float:
        shared = self._all[greedy]
        rate = (shared.accepted[b] + GLOBAL_PRIOR * own) / (shared.tried[b] + GLOBAL_PRIOR)
        if seq is not None:
            rate = (seq.accepted[b] + SEQUENCE_PRIOR * rate) / (seq.tried[b] + SEQUENCE_PRIOR)
        return rate


def _bins_by_path(tree: TokenTree, bins: list[int]) -> dict[tuple[int, ...], int]:
    """A cut keeps token paths, not node ids: each node's bin by the tokens leading to it."""
    return {_path(tree, i): bins[i] for i in range(1, len(tree))}


def _path(tree: TokenTree, node: int) -> tuple[int, ...]:
    return tuple(tree.path_tokens(path_to(tree.parents, node)[1:]))
