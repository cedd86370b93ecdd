"""DSpark: the DFlash parallel backbone gives base logits ``U_k``; a Markov head adds a rank-r
transition bias ``W1[x_{k-1}] W2`` so each position conditions on the token drafted before it;
a confidence head ``σ(w · [h_k ; W1[x_{k-1}]])`` predicts whether position k survives
verification, and drafting stops where the running survival falls below a threshold.

The bias depends only on the previous token, so the sequential part costs one small matmul per
token on top of a single backbone pass.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.drafters.dflash import DFlashDrafter, DFlashModel
from tandem.drafters.neural import ChildLogitsMany, DraftConfig, DraftState, Pick
from tandem.kernels.cpu import TreeHeads
from tandem.models.decoder import Linear, Transformer
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree
from tandem.tree_search import Growth, TreeShape


class DSparkModel(DFlashModel):
    algo = "dspark"

    def __init__(self, cfg: DraftConfig, target: Transformer, vocab_map: torch.Tensor | None = None) -> None:
        super().__init__(cfg, target, vocab_map)
        r = cfg.markov_rank
        self.markov_in = nn.Embedding(cfg.draft_vocab + 1, r)  # W1; the last row: "not in the draft vocab"
        self.markov_out = Linear(r, cfg.draft_vocab, bias=False)  # W2
        nn.init.normal_(self.markov_in.weight, std=0.02)
        nn.init.zeros_(self.markov_out.weight)  # starts as plain DFlash
        width = cfg.hidden_size + (r if cfg.confidence_with_markov else 0)
        self.confidence = Linear(width, 1) if cfg.confidence_head else None

    def transition(self, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W1[x_{k-1}]`` and the logit bias ``W1[x_{k-1}] W2`` for previous target ids."""
        code = self.markov_in(self.to_draft[previous])
        return code, self.markov_out(code).float()

    def confidence_logits(self, hidden: torch.Tensor, code: torch.Tensor) -> torch.Tensor | None:
        """Uncalibrated confidence logits (``σ`` of them estimates survival of the position);
        ``None`` for a drafter without a confidence head."""
        if self.confidence is None:
            return None
        inputs = torch.cat([self.norm(hidden), code], -1) if self.config.confidence_with_markov else self.norm(hidden)
        return self.confidence(inputs).squeeze(-1).float()

    def survival(self, hidden: torch.Tensor, code: torch.Tensor, position: int) -> torch.Tensor:
        """Predicted survival of block position ``position`` (temperature-scaled confidence; 1
        without a confidence head, so drafting never stops early)."""
        logits = self.confidence_logits(hidden, code)
        if logits is None:
            return hidden.new_ones(hidden.shape[:-1], dtype=torch.float32)
        temps = self.config.confidence_temperature
        t = temps[min(position, len(temps) - 1)] if temps else 1.0
        return torch.sigmoid(logits / t)


class DSparkDrafter(DFlashDrafter):
    """Drafts token by token through the Markov head; stops once the predicted probability that
    the whole prefix survives drops below ``min_survival`` (at least one token is sent)."""

    model: DSparkModel

    def __init__(
        self, model: DSparkModel, min_survival: float = 0.05, markov: bool = True, tree: TreeShape | None = None
    ) -> None:
        super().__init__(model, tree)
        self.min_survival = min_survival
        self.markov = markov  # False: drop the transition bias (the ablation of the Markov head)

    def chains(
        self, states: list[DraftState], anchors: list[int], depths: list[int], params: list[SamplingParams]
    ) -> list[TokenTree]:
        """The Markov head steps every sequence's chain at once, all positions on the device, then
        one transfer per chain; a chain is cut where its running survival (which reads only
        tokens before each position) drops below the threshold."""
        base, hidden = self.blocks(states, anchors, max(depths))
        picks: list[list[Pick]] = [[] for _ in states]
        confidences: list[torch.Tensor] = []
        previous = self.tokens(anchors)
        for k in range(max(depths)):
            code, bias = self.model.transition(previous)
            confidences.append(self.model.survival(hidden[:, k], code, k))
            live = [d > k for d in depths]
            step, previous = self.pick_rows(base[:, k] + bias if self.markov else base[:, k], params, states, live)
            for row, pick in zip(picks, step):
                row.append(pick)
        survival = torch.stack(confidences, 1)
        return [
            self.chain_of(anchor, row[:depth], survival[b, :depth], self.min_survival)
            for b, (anchor, row, depth) in enumerate(zip(anchors, picks, depths))
        ]

    def tree_heads(self, hidden: torch.Tensor) -> TreeHeads:
        """The Markov and confidence heads for the native search: the codes (W1) and packed W2,
        and the confidence head's weight split in two, the hidden states' part applied here to
        every block position at once (the same confidences up to rounding: the trees are the
        same, their survivals agree to rounding)."""
        model, cfg = self.model, self.model.config
        heads = {"to_draft": model.to_draft, "codes": model.markov_in.weight.detach().contiguous()}
        if self.markov:
            heads["packed_bias"] = model.markov_out.packed
        if model.confidence is not None:
            weight, bias = model.confidence.weight[0].float(), model.confidence.bias.float()
            d = cfg.hidden_size
            heads["confidence"] = (model.norm(hidden).float() @ weight[:d] + bias).contiguous()
            if cfg.confidence_with_markov:
                heads["confidence_code"] = weight[d:].contiguous()
            if cfg.confidence_temperature:
                heads["temperatures"] = torch.tensor(cfg.confidence_temperature, dtype=torch.float32)
        return TreeHeads(**heads)

    def children_of(self, base: torch.Tensor, hidden: torch.Tensor) -> ChildLogitsMany:
        """Depth k's base logits plus each parent's Markov bias: branching costs one rank-r matmul
        per expanded node, no extra backbone pass; the confidence head scores each parent's best
        child from the same transition code."""

        def logits(growths: list[Growth], frontiers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            index = self.frontier_index(growths, frontiers)
            parents = [growth.tokens[i] for growth, frontier in zip(growths, frontiers) for i in frontier]
            code, bias = self.model.transition(self.tokens(parents))
            confidence = self.model.survival(hidden[index], code, index[1])
            return (base[index] + bias if self.markov else base[index]), confidence

        return logits
