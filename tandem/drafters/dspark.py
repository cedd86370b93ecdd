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
from tandem.drafters.neural import ChildLogits, DraftConfig, DraftState, Pick
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
        self.confidence = Linear(cfg.hidden_size + r, 1)

    def transition(self, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W1[x_{k-1}]`` and the logit bias ``W1[x_{k-1}] W2`` for previous target ids."""
        code = self.markov_in(self.to_draft[previous])
        return code, self.markov_out(code).float()

    def confidence_logits(self, hidden: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Uncalibrated confidence logits (``σ`` of them estimates survival of the position)."""
        return self.confidence(torch.cat([self.norm(hidden), code], -1)).squeeze(-1).float()

    def calibrated(self, logits: torch.Tensor, position: int) -> torch.Tensor:
        """Predicted survival of block position ``position`` (temperature-scaled confidence)."""
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

    def draft(self, state: DraftState, token_ids: list[int], depth: int, params: SamplingParams) -> TokenTree:
        """All ``depth`` positions on the device, then one transfer; the chain is cut where the
        running survival (which reads only tokens before each position) drops below the threshold."""
        base, hidden = self.block_logits(state, token_ids)
        picks: list[Pick] = []
        confidences: list[torch.Tensor] = []
        previous = self.tokens(token_ids[-1:])[0]
        for k in range(depth):
            code, bias = self.model.transition(previous)
            confidences.append(self.model.calibrated(self.model.confidence_logits(hidden[k], code), k))
            picks.append(self.pick(base[k] + bias if self.markov else base[k], params, state.generator))
            previous = picks[-1].token
        return self.chain_of(token_ids[-1], picks, torch.stack(confidences), self.min_survival)

    def children(self, state: DraftState, token_ids: list[int]) -> ChildLogits:
        """Depth k's base logits plus each parent's Markov bias: branching costs one rank-r matmul
        per expanded node, no extra backbone pass; the confidence head scores each parent's best
        child from the same transition code."""
        base, hidden = self.block_logits(state, token_ids)

        def logits(growth: Growth, frontier: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            k = growth.depths[frontier[0]]
            code, bias = self.model.transition(self.tokens([growth.tokens[i] for i in frontier]))
            rows = hidden[k].expand(len(frontier), -1)
            confidence = self.model.calibrated(self.model.confidence_logits(rows, code), k)
            return (base[k] + bias if self.markov else base[k].expand(len(frontier), -1)), confidence

        return logits
