"""Suffix matching where the text repeats, a trained drafter elsewhere.

Copying from earlier text is nearly free and often long when it applies; a trained drafter guesses
a few tokens anywhere. Each round, per sequence, a confident suffix tree wins, otherwise the
trained drafter drafts. The trained one still takes in the target's features every round, so its
cache never falls behind.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.drafters.base import Drafter, DraftRequest
from tandem.drafters.neural import NeuralDrafter
from tandem.drafters.suffix import SuffixDrafter
from tandem.tree import TokenTree


class HybridDrafter(Drafter):
    """The suffix tree when its best node's estimate is at least ``min_survival`` and it has at
    least ``min_tokens`` nodes; otherwise the neural drafter's tree.

    Defaults from greedy replays of SmolLM2's regenerated ShareGPT responses: suffix trees past
    both bars got 1.9 to 7 tokens accepted a round, the others 0.1 to 0.5, no more than the
    shipped trained drafters get (τ 1.3 to 1.5)."""

    name = "hybrid"

    def __init__(
        self, suffix: SuffixDrafter, neural: NeuralDrafter, min_survival: float = 0.5, min_tokens: int = 3
    ) -> None:
        if min_tokens < 1:
            raise ValueError("hybrid drafter needs min_tokens >= 1")
        self.suffix, self.neural = suffix, neural
        self.min_survival, self.min_tokens = min_survival, min_tokens
        self.feature_layers = neural.feature_layers

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        trees = self.suffix.propose(requests)
        unsure = []
        for i, (request, tree) in enumerate(zip(requests, trees)):
            if self._confident(tree):
                self.neural.absorb(request)
            else:
                unsure.append(i)
        if unsure:
            for i, tree in zip(unsure, self.neural.propose([requests[i] for i in unsure])):
                trees[i] = tree
        return trees

    def release(self, seq_id: int) -> None:
        self.suffix.release(seq_id)
        self.neural.release(seq_id)

    def held(self) -> int:
        return max(self.suffix.held(), self.neural.held())

    def _confident(self, tree: TokenTree) -> bool:
        survival = tree.survival  # suffix trees always carry it; node 1 is their best guess
        return len(tree) > self.min_tokens and survival is not None and survival[1] >= self.min_survival
