"""Dynamic draft trees (EAGLE-2 style): grow a tree depth by depth from the drafter's child
distributions, expanding the most promising nodes, within a node budget.

Pure functions over an ``expand`` callback, so one search serves every drafter: the callback
gives the children's distributions of a set of frontier nodes at the same depth (DSpark: base
logits of that depth plus the Markov bias of each parent's token; EAGLE-3: one layer pass over
the frontier; DFlash: the same row for every parent).

- :func:`greedy_tree` (greedy targets): every frontier node proposes its ``topk`` children;
  the ``topk`` best by cumulative log-probability form the next frontier; at the end the
  ``budget`` best nodes are kept. A child's score never exceeds its parent's, so the kept set
  is closed under ancestors.
- :func:`sampled_tree` (sampling targets): children are *drawn* from ``q`` without replacement,
  each with the renormalised remainder as its own ``q``, as recursive rejection sampling needs.
  For the output to keep the target's law, whether a node exists may depend on anything drawn
  before it but never on its own token: so every drawn child is kept, the frontier (which nodes
  get children) is chosen by score, and drawing stops when the budget is spent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tandem.sampling import sample
from tandem.tree import TokenTree


@dataclass(frozen=True)
class TreeShape:
    """``topk`` children per expanded node and nodes expanded per depth, ``depth`` levels below
    the root, ``budget`` draft nodes in all (the root excluded)."""

    topk: int = 4
    depth: int = 6
    budget: int = 16

    def __post_init__(self) -> None:
        if min(self.topk, self.depth, self.budget) < 1:
            raise ValueError(f"a tree shape needs topk, depth and budget >= 1, got {self}")

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """``"TOPK,DEPTH,BUDGET"`` (the ``--tree`` flag)."""
        try:
            topk, depth, budget = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"--tree takes TOPK,DEPTH,BUDGET (three integers), got {text!r}") from None
        return cls(topk, depth, budget)


@dataclass
class Growth:
    """The tree while it grows: node ``i`` holds ``tokens[i]`` under ``parents[i]`` at
    ``depths[i]`` with cumulative draft log-probability ``scores[i]``; node 0 is the root."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    scores: list[float] = field(default_factory=lambda: [0.0])
    probs: list[torch.Tensor | None] = field(default_factory=lambda: [None])

    def add(self, token: int, parent: int, score: float, q: torch.Tensor | None = None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(score)
        self.probs.append(q)
        return len(self.tokens) - 1

    def best(self, nodes: Sequence[int], k: int) -> list[int]:
        """The ``k`` highest-scoring of ``nodes`` (ties: lower id), in id order."""
        return sorted(sorted(nodes, key=lambda i: (-self.scores[i], i))[:k])

    def tree(self, keep: Sequence[int] | None = None) -> TokenTree:
        """The :class:`TokenTree` of ``keep`` (default all; must be closed under ancestors)."""
        nodes = sorted(range(len(self.tokens)) if keep is None else {0, *keep})
        index = {node: i for i, node in enumerate(nodes)}
        parents = [-1] + [index[self.parents[n]] for n in nodes[1:]]
        probs = None
        if len(nodes) > 1 and self.probs[nodes[1]] is not None:
            rows = [self.probs[n] for n in nodes[1:]]
            probs = torch.stack([torch.zeros_like(rows[0]), *rows])
        return TokenTree(
            torch.tensor([self.tokens[n] for n in nodes], dtype=torch.long),
            torch.tensor(parents, dtype=torch.long),
            probs,
        )


# (the growing tree, frontier node ids at one depth) -> what their children are drawn from
GreedyExpand = Callable[[Growth, list[int]], tuple[torch.Tensor, torch.Tensor]]  # log-probs, tokens [F, k]
SampledExpand = Callable[[Growth, list[int]], torch.Tensor]  # q over the target vocabulary [F, V]


def greedy_tree(root: int, expand: GreedyExpand, shape: TreeShape, max_nodes: int) -> TokenTree:
    """Best-first tree for a greedy target. ``expand`` returns, for each frontier node, its
    ``shape.topk`` best children: their log-probabilities (descending) and token ids.
    ``max_nodes`` caps the budget (cache room, tokens left)."""
    growth = Growth([root])
    budget = min(shape.budget, max_nodes)
    frontier = [0]
    for _ in range(min(shape.depth, budget)):
        logp, tokens = expand(growth, frontier)
        children = []
        for row, parent in enumerate(frontier):
            for lp, token in zip(logp[row, : shape.topk].tolist(), tokens[row, : shape.topk].tolist()):
                children.append(growth.add(int(token), parent, growth.scores[parent] + lp))
        frontier = growth.best(children, shape.topk)
    return growth.tree(growth.best(range(1, len(growth.tokens)), budget))


def sampled_tree(
    root: int, expand: SampledExpand, shape: TreeShape, max_nodes: int, generator: torch.Generator
) -> TokenTree:
    """Tree for a sampling target: up to ``shape.topk`` children drawn without replacement from
    each of the ``shape.topk`` best frontier nodes per depth, every draw kept with the
    distribution it was drawn from, until ``max_nodes`` / ``shape.budget`` nodes exist."""
    growth = Growth([root])
    budget = min(shape.budget, max_nodes)
    frontier = [0]
    while frontier and len(growth.tokens) - 1 < budget and growth.depths[frontier[0]] < shape.depth:
        q = expand(growth, frontier)
        children = []
        for row, parent in enumerate(frontier):
            remaining = q[row].float()
            for _ in range(shape.topk):
                if len(growth.tokens) - 1 >= budget or float(remaining.sum()) <= 0:
                    break
                remaining = remaining / remaining.sum()
                token = sample(remaining, generator)
                score = growth.scores[parent] + float(torch.log(remaining[token]))
                children.append(growth.add(token, parent, score, remaining))
                remaining = remaining.clone()
                remaining[token] = 0
        frontier = growth.best(children, shape.topk)
    return growth.tree()
