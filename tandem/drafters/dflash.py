"""DFlash-style parallel block drafter: the anchor plus γ-1 mask tokens give γ draft logits in one
pass. The target's fused context features are projected by every layer into extra keys/values
(cached per sequence), and attention inside the block is bidirectional.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.drafters.neural import (
    KV,
    ChildLogits,
    DraftConfig,
    DraftLayer,
    DraftModel,
    DraftState,
    NeuralDrafter,
    cat_kv,
)
from tandem.models.decoder import Transformer
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree


class DFlashModel(DraftModel):
    algo = "dflash"

    def __init__(self, cfg: DraftConfig, target: Transformer, vocab_map: torch.Tensor | None = None) -> None:
        super().__init__(cfg, target, vocab_map)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.mask_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)

    def context_kv(self, fused: torch.Tensor, positions: torch.Tensor) -> list[KV]:
        """Per layer, keys/values of context positions from fused target features ``[B, n, d]``."""
        rope = self.rope(positions)
        return [layer.kv(fused, rope) for layer in self.layers]

    def block_hidden(
        self,
        anchors: torch.Tensor,
        starts: torch.Tensor,
        context: list[KV],
        visible: torch.Tensor,
        before: torch.Tensor | None,
    ) -> torch.Tensor:
        """Hidden states ``[B, γ, d]`` of blocks ``[anchor, mask, ...]`` at positions ``starts + k``.

        ``context``: per layer ``[B, kv, S, hd]``; ``visible`` ``[B, γ, S]``: which context keys
        each block sees (all of its own prefix). ``before`` ``[B, d]``: the fused features of the
        position before each anchor (the newest the target has given), added to every slot when
        the config has ``anchor_features``, so the block need not find them by attention."""
        gamma = self.config.block_size
        x = torch.cat([self.embed(anchors)[:, None], self.mask_embedding.expand(len(anchors), gamma - 1, -1)], 1)
        if self.config.anchor_features:
            x = x + before[:, None]
        rope = self.rope(starts[:, None] + torch.arange(gamma, device=starts.device))
        mask = torch.cat([visible, visible.new_ones(len(anchors), gamma, gamma)], -1)
        for layer, past in zip(self.layers, context):
            x, _ = layer(x, rope, mask, past)
        return x

    def blocks(
        self, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training view of one sequence: block hidden states ``[A, γ, d]`` for anchor positions
        ``anchors`` ``[A]``, each seeing the target features of positions before its anchor, and the
        context keys/values shared by all of them."""
        n = tokens.numel()
        fused = self.fuse(features[None])
        positions = torch.arange(n, device=tokens.device)
        context = self.context_kv(fused, positions[None])
        context = [(k.expand(len(anchors), -1, -1, -1), v.expand(len(anchors), -1, -1, -1)) for k, v in context]
        visible = (positions[None, :] < anchors[:, None])[:, None, :].expand(-1, self.config.block_size, -1)
        return self.block_hidden(tokens[anchors], anchors, context, visible, fused[0, anchors - 1]), anchors


class DFlashDrafter(NeuralDrafter):
    """All γ tokens from one pass; each position's ``q`` is independent of the tokens before it."""

    model: DFlashModel

    def extend(self, state: DraftState, token_ids: list[int], features: torch.Tensor) -> None:
        positions = torch.arange(state.length, state.length + len(features), device=self.device)[None]
        fused = self.model.fuse(features[None])
        new = self.model.context_kv(fused, positions)
        state.cache = new if not state.cache else [cat_kv(old, kv) for old, kv in zip(state.cache, new)]
        state.length += len(features)
        state.extra["before"] = fused[:, -1]  # the position before the next anchor

    def block_logits(self, state: DraftState, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Base logits ``U`` ``[γ, V_draft]`` and hidden states ``[γ, d]`` for the anchor's block."""
        gamma = self.model.config.block_size
        visible = torch.ones(1, gamma, state.length - state.offset, dtype=torch.bool, device=self.device)
        start = self.tokens([state.length])
        anchor = self.tokens(token_ids[-1:])
        hidden = self.model.block_hidden(anchor, start, state.cache, visible, state.extra["before"])[0]
        return self.model.draft_logits(hidden), hidden

    def draft(self, state: DraftState, token_ids: list[int], depth: int, params: SamplingParams) -> TokenTree:
        logits, _ = self.block_logits(state, token_ids)
        return self.chain_of(token_ids[-1], [self.pick(logits[k], params, state.generator) for k in range(depth)])

    def children(self, state: DraftState, token_ids: list[int]) -> ChildLogits:
        """Position k's logits whatever the parent: top-k per position, combined by the search."""
        logits, _ = self.block_logits(state, token_ids)
        return lambda growth, frontier: (logits[growth.depths[frontier[0]]].expand(len(frontier), -1), None)
