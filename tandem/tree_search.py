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

Every node also gets a predicted survival (the probability that verification accepts it, for the
draft scheduler): its parent's times a factor known *before* the node's own token is drawn, so
that cutting a sampled tree by it stays lossless. The factor is the drafter's confidence that the
parent's best child survives when it has a confidence head (DSpark), else the highest draft
probability among the children; a greedy tree's lesser children scale it by their probability
relative to the best one (greedy output depends on no draft probability at all).
"""

from __future__ import annotations

import math
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
    survival: list[float] = field(default_factory=lambda: [1.0])

    def add(self, token: int, parent: int, score: float, factor: float, q: torch.Tensor | None = None) -> int:
        """A child of ``parent``; its survival is the parent's times ``factor``."""
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(score)
        self.probs.append(q)
        self.survival.append(self.survival[parent] * min(1.0, factor))
        return len(self.tokens) - 1

    def best(self, nodes: Sequence[int], k: int) -> list[int]:
        """The ``k`` highest-scoring of ``nodes`` (ties: lower id), in id order."""
        return sorted(sorted(nodes, key=lambda i: (-self.scores[i], i))[:k])

    def tree(self, keep: Sequence[int] | None = None) -> TokenTree:
        """The :class:`TokenTree` of ``keep`` (default all; must be closed under ancestors)."""
        probs = None
        if len(self.tokens) > 1 and self.probs[1] is not None:
            probs = torch.stack([torch.zeros_like(self.probs[1]), *self.probs[1:]])
        whole = TokenTree(
            torch.tensor(self.tokens, dtype=torch.long),
            torch.tensor(self.parents, dtype=torch.long),
            probs,
            torch.tensor(self.survival, dtype=torch.float32),
        )
        return whole if keep is None else whole.subtree(keep)


# (the growing tree, frontier node ids at one depth) -> what their children are drawn from, and
# per frontier node the confidence that its best child survives (None: use draft probabilities)
Confidence = torch.Tensor | None  # [F]
GreedyExpand = Callable[[Growth, list[int]], tuple[torch.Tensor, torch.Tensor, Confidence]]  # log-probs, tokens [F, k]
SampledExpand = Callable[[Growth, list[int]], tuple[torch.Tensor, Confidence]]  # q over the target vocabulary [F, V]


def greedy_tree(root: int, expand: GreedyExpand, shape: TreeShape, max_nodes: int) -> TokenTree:
    """Best-first tree for a greedy target. ``expand`` returns, for each frontier node, its
    ``shape.topk`` best children: their log-probabilities (descending) and token ids.
    ``max_nodes`` caps the budget (cache room, tokens left)."""
    growth = Growth([root])
    budget = min(shape.budget, max_nodes)
    frontier = [0]
    for _ in range(min(shape.depth, budget)):
        logp, tokens, confidence = expand(growth, frontier)
        children = []
        for row, parent in enumerate(frontier):
            best = logp[row, 0].item()
            for lp, token in zip(logp[row, : shape.topk].tolist(), tokens[row, : shape.topk].tolist()):
                factor = math.exp(lp) if confidence is None else float(confidence[row]) * math.exp(lp - best)
                children.append(growth.add(int(token), parent, growth.scores[parent] + lp, factor))
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
        q, confidence = expand(growth, frontier)
        children = []
        for row, parent in enumerate(frontier):
            remaining = q[row].float() / q[row].float().sum()
            first = float(remaining.max())
            for _ in range(shape.topk):
                mass = float(remaining.sum())
                if len(growth.tokens) - 1 >= budget or mass <= 0:
                    break
                # Known before the draw; not renormalised, so a later sibling never outranks an earlier one.
                top = float(remaining.max())
                factor = top if confidence is None else float(confidence[row]) * top / first
                drawn_from = remaining / mass
                token = sample(drawn_from, generator)
                score = growth.scores[parent] + float(torch.log(drawn_from[token]))
                children.append(growth.add(token, parent, score, factor, drawn_from))
                remaining = remaining.clone()
                remaining[token] = 0
        frontier = growth.best(children, shape.topk)
    return growth.tree()
