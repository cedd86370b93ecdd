"""EAGLE-3-style drafter: one decoder layer over ``[embedding of x_{i+1} ; fused target features
of x_i]`` predicts ``x_{i+2}``; when drafting, the layer's own output stands in for the target
features of the token it just drafted. Trained with training-time test: the layer is unrolled on
its own outputs so that it learns to read them (see :meth:`Eagle3Model.unroll`).
"""

from __future__ import annotations

import functools

import torch

from tandem.drafters.neural import (
    KV,
    ChildLogitsMany,
    DraftConfig,
    DraftLayer,
    DraftModel,
    DraftState,
    NeuralDrafter,
    Pick,
    cat_kv,
)
from tandem.models.decoder import Transformer
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree
from tandem.tree_search import Growth


class Eagle3Model(DraftModel):
    algo = "eagle3"

    def __init__(self, cfg: DraftConfig, target: Transformer, vocab_map: torch.Tensor | None = None) -> None:
        super().__init__(cfg, target, vocab_map)
        self.layer = DraftLayer(cfg, input_size=2 * cfg.hidden_size)

    def step(
        self,
        next_tokens: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        past: KV | list[KV] | None,
    ) -> tuple[torch.Tensor, KV]:
        """One layer pass over inputs ``[embed(next_tokens) ; hidden]`` ``[B, T, 2d]`` (``past``:
        one cache for all rows with ``mask``, or one per row: :class:`DraftLayer`)."""
        x = torch.cat([self.embed(next_tokens), hidden], -1)
        return self.layer(x, self.rope(positions), mask, past, residual=hidden)

    def chains(
        self, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor, steps: int
    ) -> list[torch.Tensor]:
        """Training-time test on one sequence: the layer's outputs ``[A, d]`` at each of ``steps``
        chain steps from every anchor (teacher-forced tokens), exactly as it drafts.

        Position ``i`` reads ``x_{i+1}`` and the features of ``x_i``. Step 0 of the chain from anchor
        ``a`` is position ``a`` (the context pass's output there); step ``j`` is position ``a + j``,
        reads the output of step ``j - 1`` in place of features, and sees the context keys up to
        ``a`` plus its own chain. Step ``j`` predicts ``x_{a+j+2}``. Only the chains are computed:
        the context needs keys and values, not outputs.
        """
        n = tokens.numel() - 1
        positions = torch.arange(n, device=tokens.device)
        context = torch.cat([self.embed(tokens[1:])[None], self.fuse(features[:n])[None]], -1)
        keys, values = self.layer.kv(context, self.rope(positions[None]))
        count = len(anchors)
        past_k, past_v = keys.expand(count, -1, -1, -1), values.expand(count, -1, -1, -1)
        hidden = self.fuse(features[anchors])[:, None]
        outputs: list[torch.Tensor] = []
        for j in range(steps):
            # Step 0's own key is the context key at a (same input), so its context stops before a;
            # later steps see the context through a, their chain (steps 1 .. j-1) and themselves.
            seen = positions[None, :] < anchors[:, None] + (1 if j else 0)
            mask = torch.cat([seen, seen.new_ones(count, max(j, 1))], -1)[:, None]
            inputs = tokens[(anchors + j + 1).clamp(max=n)][:, None]  # past the end: scored 0
            hidden, (k, v) = self.step(inputs, hidden, (anchors + j)[:, None], mask, (past_k, past_v))
            if j:
                past_k, past_v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            outputs.append(hidden[:, 0])
        return outputs


class Eagle3Drafter(NeuralDrafter):
    """Autoregressive chain: each drafted token costs one pass of the single layer."""

    model: Eagle3Model

    def extend(self, state: DraftState, token_ids: list[int], features: torch.Tensor) -> None:
        start, n = state.length, len(features)
        positions = torch.arange(start, start + n, device=self.device)[None]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        mask = torch.cat([causal.new_ones(n, start - state.offset), causal], -1)[None]
        past = state.cache[0] if state.cache else None
        hidden = self.model.fuse(features[None])
        out, kv = self.model.step(
            self.tokens(token_ids[start + 1 : start + n + 1])[None], hidden, positions, mask, past
        )
        state.cache = [kv if past is None else cat_kv(past, kv)]
        state.length += n
        state.extra["last"] = out[:, -1:]  # predicts the token after the anchor

    def chains(
        self, states: list[DraftState], anchors: list[int], depths: list[int], params: list[SamplingParams]
    ) -> list[TokenTree]:
        """One layer pass per chain step for all sequences: the linears batched, attention per
        sequence over its own cache and chain."""
        hidden = torch.cat([state.extra["last"] for state in states])  # [B, 1, d]
        pasts = [state.cache[0] for state in states]
        picks: list[list[Pick | None]] = [[] for _ in states]
        positions = self.tokens([state.length for state in states])[:, None]
        for t in range(max(depths)):
            logits = self.model.draft_logits(hidden[:, -1])
            step, tokens = self.pick_rows(logits, params, states, [d > t for d in depths])
            for row, pick in zip(picks, step):
                row.append(pick)
            if t + 1 == max(depths):
                break
            hidden, (k, v) = self.model.step(tokens[:, None], hidden, positions + t, None, pasts)
            pasts = [cat_kv(past, (k[b : b + 1], v[b : b + 1])) for b, past in enumerate(pasts)]
        return [self.chain_of(a, row[:d]) for a, row, d in zip(anchors, picks, depths)]

    def children(self, states: list[DraftState], anchors: list[int]) -> ChildLogitsMany:
        """One layer pass per depth over the new frontier nodes of every tree (EAGLE-2): node ``c``
        at depth ``d`` reads its token and its parent's output at position ``length + d - 1`` and
        attends to its sequence's context, the steps of its own ancestors and itself. The linears
        run once for all nodes, attention node by node, so a node's output is the same whichever
        trees grow beside it."""
        outputs = [{0: state.extra["last"][0, -1]} for state in states]  # node -> what predicts its children
        steps: list[dict[int, KV]] = [{} for _ in states]  # node -> its own key and value

        def logits(growths: list[Growth], frontiers: list[list[int]]) -> tuple[torch.Tensor, None]:
            new = [(b, node) for b, frontier in enumerate(frontiers) for node in frontier if node not in outputs[b]]
            if new:
                pasts = [  # the context, then the ancestors' steps from the top down
                    functools.reduce(cat_kv, (steps[b][a] for a in _ancestors(growths[b], node)), states[b].cache[0])
                    for b, node in new
                ]
                tokens = self.tokens([growths[b].tokens[node] for b, node in new])[:, None]
                hidden = torch.stack([outputs[b][growths[b].parents[node]] for b, node in new])[:, None]
                positions = self.tokens([states[b].length + growths[b].depths[node] - 1 for b, node in new])[:, None]
                out, (k, v) = self.model.step(tokens, hidden, positions, None, pasts)
                for row, (b, node) in enumerate(new):
                    outputs[b][node] = out[row, -1]
                    steps[b][node] = (k[row : row + 1], v[row : row + 1])
            rows = [outputs[b][node] for b, frontier in enumerate(frontiers) for node in frontier]
            return self.model.draft_logits(torch.stack(rows)), None

        return logits


def _ancestors(growth: Growth, node: int) -> list[int]:
    """Strict ancestors of ``node`` below the root, from the top down."""
    found = []
    node = growth.parents[node]
    while node > 0:
        found.append(node)
        node = growth.parents[node]
    return found[::-1]
