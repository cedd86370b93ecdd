"""DFlash-style parallel block drafter: the anchor plus γ-1 mask tokens give γ draft logits in one
pass. The target's fused context features are projected by every layer into extra keys/values
(cached per sequence), and attention inside the block is bidirectional.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.drafters.base import DraftRequest
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
from tandem.errors import ModelLoadError
from tandem.models.decoder import Transformer
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree


class DFlashModel(DraftModel):
    algo = "dflash"

    def __init__(self, cfg: DraftConfig, target: Transformer, vocab_map: torch.Tensor | None = None) -> None:
        super().__init__(cfg, target, vocab_map)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        if cfg.mask_token_id is None:
            self.mask_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        elif not 0 <= cfg.mask_token_id < cfg.target_vocab_size:
            raise ModelLoadError(f"mask_token_id {cfg.mask_token_id} is outside the target's vocabulary")

    def mask_slots(self, count: int) -> torch.Tensor:
        """The ``block_size - 1`` slot inputs after each of ``count`` anchors ``[count, γ - 1, d]``."""
        cfg = self.config
        if cfg.mask_token_id is None:
            mask = self.mask_embedding
        else:
            mask = self.embed(torch.tensor(cfg.mask_token_id, device=self.target_embed.device))
        return mask.expand(count, cfg.block_size - 1, -1)

    def context_kv(self, fused: torch.Tensor, positions: torch.Tensor) -> list[KV]:
        """Per layer, keys/values of context positions from fused target features ``[B, n, d]``."""
        rope = self.rope(positions)
        return [layer.kv(fused, rope, self.config.context_norm) for layer in self.layers]

    def block_hidden(
        self,
        anchors: torch.Tensor,
        starts: torch.Tensor,
        context: list[KV] | list[list[KV]],
        visible: torch.Tensor | None,
        before: torch.Tensor | None,
    ) -> torch.Tensor:
        """Hidden states ``[B, drafts, d]`` of the drafting rows of blocks ``[anchor, mask, ...]``
        at positions ``starts + k`` (every row, or all but the anchor's: ``config.anchor_row``).

        ``context``: per layer ``[B, kv, S, hd]``, with ``visible`` ``[B, γ, S]``: which context
        keys each block sees (training: its own prefix); or, with ``visible`` None, per sequence
        its own per-layer cache, all of it seen (drafting several sequences in one pass).
        ``before`` ``[B, d]``: the fused features of the position before each anchor (the newest
        the target has given), added to every slot when the config has ``anchor_features``, so
        the block need not find them by attention."""
        cfg = self.config
        gamma = cfg.block_size
        x = torch.cat([self.embed(anchors)[:, None], self.mask_slots(len(anchors))], 1)
        if cfg.anchor_features:
            x = x + before[:, None]
        rope = self.rope(starts[:, None] + torch.arange(gamma, device=starts.device))
        mask = None if visible is None else torch.cat([visible, visible.new_ones(len(anchors), gamma, gamma)], -1)
        for i, layer in enumerate(self.layers):
            past = [cache[i] for cache in context] if visible is None else context[i]
            x, _ = layer(x, rope, mask, past)
        return x[:, gamma - cfg.drafts :]

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

    def blocks(self, states: list[DraftState], anchors: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Base logits ``U`` ``[B, drafts, V_draft]`` and hidden states ``[B, drafts, d]`` of each
        sequence's block after its anchor, in one backbone pass: the linears run once for all
        sequences, attention per sequence over its own context (the same numbers as one sequence
        alone, on batch-invariant kernels)."""
        starts = self.tokens([state.length for state in states])
        before = torch.cat([state.extra["before"] for state in states])
        hidden = self.model.block_hidden(self.tokens(anchors), starts, [state.cache for state in states], None, before)
        return self.model.draft_logits(hidden), hidden

    def prepare(self, states: list[DraftState], requests: list[DraftRequest]) -> None:
        """Trees: every sequence's block in one pass, kept in its state for :meth:`block_logits`."""
        logits, hidden = self.blocks(states, [r.token_ids[-1] for r in requests])
        for k, state in enumerate(states):
            state.extra["block"] = (state.length, logits[k], hidden[k])

    def block_logits(self, state: DraftState, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's block after the anchor ``token_ids[-1]``: :meth:`prepare`'s, or its own pass."""
        length, logits, hidden = state.extra.pop("block", (None, None, None))
        if length != state.length:
            logits, hidden = (t[0] for t in self.blocks([state], token_ids[-1:]))
        return logits, hidden

    def chains(
        self, states: list[DraftState], anchors: list[int], depths: list[int], params: list[SamplingParams]
    ) -> list[TokenTree]:
        logits, _ = self.blocks(states, anchors)
        steps = [self.pick_rows(logits[:, k], params, states, [d > k for d in depths])[0] for k in range(max(depths))]
        return [self.chain_of(a, [step[b] for step in steps[:d]]) for b, (a, d) in enumerate(zip(anchors, depths))]

    def children(self, state: DraftState, token_ids: list[int]) -> ChildLogits:
        """Position k's logits whatever the parent: top-k per position, combined by the search."""
        logits, _ = self.block_logits(state, token_ids)
        return lambda growth, frontier: (logits[growth.depths[frontier[0]]].expand(len(frontier), -1), None)
