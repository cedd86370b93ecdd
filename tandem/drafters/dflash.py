"""DFlash-style parallel block drafter: the anchor plus γ-1 mask tokens give γ draft logits in one
pass. The target's fused context features are projected by every layer into extra keys/values
(cached per sequence), and attention inside the block is bidirectional.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.drafters.backbone import BlockBackbone
from tandem.drafters.base import DraftRequest
from tandem.drafters.neural import (
    KV,
    ChildLogitsMany,
    DraftConfig,
    DraftLayer,
    DraftModel,
    DraftState,
    NeuralDrafter,
)
from tandem.errors import ModelLoadError
from tandem.kernels.cpu import TreeHeads
from tandem.models.decoder import Transformer
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree
from tandem.tree_search import Growth, TreeShape


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

    def block_inputs(self, anchors: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        """The inputs ``[B, γ, d]`` of blocks ``[anchor, mask, ...]``. ``before`` ``[B, d]``: the
        fused features of the position before each anchor (the newest the target has given),
        added to every slot when the config has ``anchor_features``, so the block need not find
        them by attention."""
        x = torch.cat([self.embed(anchors)[:, None], self.mask_slots(len(anchors))], 1)
        return x + before[:, None] if self.config.anchor_features else x

    def block_hidden(
        self,
        anchors: torch.Tensor,
        starts: torch.Tensor,
        context: list[KV],
        visible: torch.Tensor,
        before: torch.Tensor | None,
    ) -> torch.Tensor:
        """Hidden states ``[B, drafts, d]`` of the drafting rows of blocks after ``anchors`` at
        positions ``starts + k`` (every row, or all but the anchor's: ``config.anchor_row``), run
        through the modules (training; drafting runs them as :class:`BlockBackbone`).

        ``context``: per layer ``[B, kv, S, hd]``, with ``visible`` ``[B, γ, S]``: which context
        keys each block sees (its own prefix)."""
        cfg = self.config
        gamma = cfg.block_size
        x = self.block_inputs(anchors, before)
        rope = self.rope(starts[:, None] + torch.arange(gamma, device=starts.device))
        mask = torch.cat([visible, visible.new_ones(len(anchors), gamma, gamma)], -1)
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, rope, mask, context[i])
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
    """All γ tokens from one pass; each position's ``q`` is independent of the tokens before it.
    A sequence's context lives in a row of :class:`BlockBackbone`'s paged cache."""

    model: DFlashModel

    def __init__(self, model: DFlashModel, tree: TreeShape | None = None) -> None:
        super().__init__(model, tree)
        self._backbone: BlockBackbone | None = None

    @property
    def backbone(self) -> BlockBackbone:
        """Built on first use, on the kernels the model runs on then."""
        if self._backbone is None:
            self._backbone = BlockBackbone(self.model.layers, self.model.config, self.model.kernels)
        return self._backbone

    def extend(self, state: DraftState, token_ids: list[int], features: torch.Tensor) -> None:
        if "row" not in state.extra:
            state.extra["row"] = self.backbone.open()
        positions = torch.arange(state.length, state.length + len(features), device=self.device)[None]
        fused = self.model.fuse(features[None])
        self.backbone.append(state.extra["row"], self.model.context_kv(fused, positions))
        state.length += len(features)
        state.extra["before"] = fused[:, -1]  # the position before the next anchor

    def restart(self, state: DraftState, start: int) -> None:
        super().restart(state, start)
        if "row" in state.extra:
            self.backbone.restart(state.extra["row"])

    def release(self, seq_id: int) -> None:
        state = self._states.get(seq_id)
        if state is not None and "row" in state.extra:
            self.backbone.close(state.extra["row"])
        super().release(seq_id)

    def blocks(
        self, states: list[DraftState], anchors: list[int], positions: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Base logits ``U`` ``[B, P, V_draft]`` and hidden states ``[B, P, d]`` of the first ``P``
        (``positions``, default all ``drafts``) drafting positions of each sequence's block after
        its anchor, every layer of every sequence in one backbone pass (on batch-invariant
        kernels, the same numbers as one sequence alone). The backbone runs the whole block (its
        attention is bidirectional), but a draft no deeper than ``P`` needs the LM head, the
        largest matmul of a round, for ``P`` rows only."""
        cfg = self.model.config
        before = torch.cat([state.extra["before"] for state in states])
        x = self.model.block_inputs(self.tokens(anchors), before)
        rows, offsets = [state.extra["row"] for state in states], [state.offset for state in states]
        first = cfg.block_size - cfg.drafts
        last = first + (cfg.drafts if positions is None else positions)
        hidden = self.backbone.run(x, rows, offsets)[:, first:last]
        return self.model.draft_logits(hidden), hidden

    def chains(
        self, states: list[DraftState], anchors: list[int], depths: list[int], params: list[SamplingParams]
    ) -> list[TokenTree]:
        logits, _ = self.blocks(states, anchors, max(depths))
        steps = [self.pick_rows(logits[:, k], params, states, [d > k for d in depths])[0] for k in range(max(depths))]
        return [self.chain_of(a, [step[b] for step in steps[:d]]) for b, (a, d) in enumerate(zip(anchors, depths))]

    def grow(self, states: list[DraftState], requests: list[DraftRequest], greedy: bool) -> list[TokenTree]:
        """Every tree from one backbone pass; on the packed kernels' CPU path the greedy ones grow
        in one call of ``tree_cpu.c``, which grows the trees :meth:`greedy_trees` grows."""
        if not (greedy and self.model.kernels is not None and self.device.type == "cpu"):
            return super().grow(states, requests, greedy)
        anchors, shape = [r.token_ids[-1] for r in requests], self.tree
        budgets = [min(shape.budget, r.max_nodes) for r in requests]
        depth = min(shape.depth, max(budgets))  # a tree of n nodes is at most n deep
        base, hidden = self.blocks(states, anchors, depth)
        found = self.model.kernels.greedy_trees(
            base, anchors, budgets, shape.topk, depth, self.model.vocab_map, self.tree_heads(hidden)
        )
        return [
            TokenTree(tuple(tokens[:n]), tuple(parents[:n]), None, tuple(survival[:n]))
            for n, tokens, parents, survival in zip(found[0], *(t.tolist() for t in found[1:]))
        ]

    def tree_heads(self, hidden: torch.Tensor) -> TreeHeads | None:
        """What the native search needs of the heads beyond the block's logits: nothing here."""
        return None

    def children(self, states: list[DraftState], anchors: list[int]) -> ChildLogitsMany:
        """The trees' children from one backbone pass (:meth:`children_of`)."""
        return self.children_of(*self.blocks(states, anchors))

    def children_of(self, base: torch.Tensor, hidden: torch.Tensor) -> ChildLogitsMany:
        """Trees of sequences whose blocks gave ``base`` logits ``[B, drafts, V_draft]`` and
        ``hidden`` states: position k's logits whatever the parent (top-k per position,
        combined by the search)."""
        return lambda growths, frontiers: (base[self.frontier_index(growths, frontiers)], None)

    def frontier_index(self, growths: list[Growth], frontiers: list[list[int]]) -> tuple[torch.Tensor, int]:
        """``(sequence rows, depth)``: where the frontier nodes' block positions are in
        ``[B, drafts, ...]`` tensors (every tree's frontier is at the same depth)."""
        rows = [b for b, frontier in enumerate(frontiers) for _ in frontier]
        first = next(b for b, frontier in enumerate(frontiers) if frontier)
        return self.tokens(rows), growths[first].depths[frontiers[first][0]]
