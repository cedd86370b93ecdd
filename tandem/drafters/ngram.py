"""Prompt-lookup (n-gram) drafter: if the last n tokens occurred before, guess what followed.

Needs no training and pays off on text that repeats its context (code edits, summaries,
quoting). With ``branches > 1`` it proposes a tree: the continuations of several earlier
matches, merged where they share a prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tandem.drafters.base import Drafter, DraftRequest
from tandem.tree import TokenTree, from_paths


class NgramDrafter(Drafter):
    """``depth`` tokens per continuation; the longest matching n-gram (``max_ngram`` down to
    ``min_ngram``) and, among equal n, the most recent occurrence come first."""

    name = "ngram"

    def __init__(self, depth: int = 8, branches: int = 1, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if depth < 1 or branches < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError("ngram drafter needs depth >= 1, branches >= 1, 1 <= min_ngram <= max_ngram")
        self.depth, self.branches = depth, branches
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        return [self._propose_one(r) for r in requests]

    def _propose_one(self, request: DraftRequest) -> TokenTree:
        history = np.asarray(request.token_ids, dtype=np.int64)
        root = int(history[-1])
        if request.max_nodes <= 0:
            return from_paths(root, [])
        depth = min(self.depth, request.max_nodes)
        return from_paths(root, self.continuations(history, depth), max_nodes=request.max_nodes)

    def continuations(self, history: np.ndarray, depth: int) -> list[list[int]]:
        """Up to ``branches`` distinct continuations of the history's suffix."""
        found: list[list[int]] = []
        for n in range(min(self.max_ngram, len(history) - 1), self.min_ngram - 1, -1):
            suffix = history[-n:]
            windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
            starts = np.flatnonzero((windows == suffix).all(axis=1))[::-1]  # most recent first
            for start in starts:
                follow = history[start + n : start + n + depth].tolist()
                if follow and follow not in found:
                    found.append(follow)
                    if len(found) == self.branches:
                        return found
        return found
