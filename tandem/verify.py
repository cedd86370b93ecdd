"""Exact verification of a token tree against the target's distributions.

The whole promise of the product lives here: what a round emits (accepted draft tokens, then
one bonus token) is distributed exactly as tokens sampled one at a time from the target.

Sampling is recursive rejection sampling (SpecInfer / Leviathan et al., with ``p`` the target
and ``q`` the draft). At node ``u`` with target distribution ``p``, the children ``c1, c2, ...``
are tried in order: ``c`` drawn from ``q_c`` is accepted with probability ``min(1, p(c)/q_c(c))``;
on rejection ``p <- norm(max(0, p - q_c))``. When every child is rejected the bonus token is
drawn from what is left of ``p``. Each child may carry its own ``q`` (e.g. sampled without
replacement after its siblings); a deterministic proposal is a point mass.

The walks run on the host: :func:`verify_batch` brings what they read (the target's argmax per
node, or ``p`` and ``q`` for sampled rows) back from the device in one transfer per round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from tandem.devices import HOST, to_host
from tandem.sampling import SamplingParams, sample, target_probs
from tandem.tree import TokenTree, path_to


@dataclass(frozen=True)
class Verdict:
    """The accepted path (node ids from the root, root included) and the bonus token."""

    accepted_nodes: tuple[int, ...]
    bonus_token: int

    def emitted(self, tree: TokenTree) -> list[int]:
        """Tokens this round adds to the output: accepted drafts, then the bonus."""
        return [*tree.path_tokens(self.accepted_nodes[1:]), self.bonus_token]

    @property
    def accepted_drafts(self) -> int:
        return len(self.accepted_nodes) - 1


def verify_greedy(tree: TokenTree, best: Sequence[int]) -> Verdict:
    """Accept a child iff it is the target's argmax at its parent (``best[i]``: the argmax of
    the target's logits at node ``i``); the deepest such path wins.

    Siblings carry distinct tokens in a well-formed tree, so at most one child of any node
    matches and the accepted path is unique.
    """
    tokens, parents = tree.tokens, tree.parents
    depth = [0] + [-1] * (len(tree) - 1)  # -1: not on an accepted path
    last = 0
    for i in range(1, len(tree)):
        parent = parents[i]
        if depth[parent] >= 0 and tokens[i] == best[parent]:
            depth[i] = depth[parent] + 1
            if depth[i] > depth[last]:
                last = i
    return Verdict(tuple(path_to(tree.parents, last)), int(best[last]))


def verify_sampling(tree: TokenTree, p: torch.Tensor, generator: torch.Generator | None) -> Verdict:
    """Recursive rejection sampling down the tree; ``p[i]`` is the target distribution of the
    token following node ``i`` (already temperature/top-k/top-p processed). ``p`` and the tree's
    ``draft_probs`` are host tensors (:func:`verify_batch` brings them over)."""
    node, path = 0, [0]
    while True:
        residual = p[node]
        for child in tree.children(node):
            token = tree.tokens[child]
            q = None if tree.draft_probs is None else tree.draft_probs[child].float()
            q_token = 1.0 if q is None else float(q[token])
            if q_token <= 0:
                raise ValueError(f"node {child} has q(token) == 0: it cannot have been drawn from q")
            u = float(torch.rand((), generator=generator, device=HOST))
            if u * q_token < float(residual[token]):
                node = child
                path.append(child)
                break
            residual = _residual(residual, token, q)
        else:
            return Verdict(tuple(path), sample(residual, generator))


def _residual(p: torch.Tensor, token: int, q: torch.Tensor | None) -> torch.Tensor:
    """``norm(max(0, p - q))``; for a point mass, ``p`` without ``token``."""
    if q is None:
        rest = p.clone()
        rest[token] = 0
    else:
        rest = (p - q).clamp_min(0)
    total = rest.sum()
    # In exact arithmetic a rejection implies total > 0; keep p if rounding says otherwise.
    return rest / total if total > 0 else p


def verify_batch(
    trees: Sequence[TokenTree],
    target_logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[Verdict]:
    """Verify each sequence's tree; ``target_logits`` is ``[B, N_max, V]`` (padded per tree), on
    any device. One transfer brings back what the host walks read; ``generators`` are host ones."""
    sampled = [b for b in range(len(trees)) if not params[b].greedy]
    probs = [target_probs(target_logits[b, : len(trees[b])], params[b]) for b in sampled]
    drafts = [trees[b].draft_probs for b in sampled if trees[b].draft_probs is not None]
    best, *host = to_host(target_logits.argmax(-1), *probs, *drafts)
    p_of = dict(zip(sampled, host))
    q_of = iter(host[len(probs) :])
    verdicts = []
    for b, tree in enumerate(trees):
        if params[b].greedy:
            verdicts.append(verify_greedy(tree, best[b, : len(tree)].tolist()))
        else:
            if tree.draft_probs is not None:
                tree = replace(tree, draft_probs=next(q_of))
            verdicts.append(verify_sampling(tree, p_of[b], generators[b]))
    return verdicts
