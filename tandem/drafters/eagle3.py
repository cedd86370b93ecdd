"""EAGLE-3-style drafter: one decoder layer over ``[embedding of x_{i+1} ; fused target features
of x_i]`` predicts ``x_{i+2}``; when drafting, the layer's own output stands in for the target
features of the token it just drafted. Trained with training-time test: the layer is unrolled on
its own outputs so that it learns to read them (see :meth:`Eagle3Model.unroll`).
"""

from __future__ import annotations

import torch

from tandem.drafters.neural import KV, DraftConfig, DraftLayer, DraftModel, DraftState, NeuralDrafter, cat_kv
from tandem.models.decoder import Transformer
from tandem.sampling import SamplingParams


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
        mask: torch.Tensor,
        past: KV | None,
    ) -> tuple[torch.Tensor, KV]:
        """One layer pass over inputs ``[embed(next_tokens) ; hidden]`` ``[B, T, 2d]``."""
        x = torch.cat([self.embed(next_tokens), hidden], -1)
        return self.layer(x, self.rope(positions), mask, past, residual=hidden)

    def unroll(self, tokens: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test over one sequence: outputs ``[T-1, d]`` of each of ``steps`` steps.

        Step 0 reads target features (position ``i``: ``x_{i+1}`` and the features of ``x_i``).
        Step ``j`` reads at position ``i`` the output of step ``j-1`` at ``i-1``, and sees what the
        drafter would at inference: context keys up to ``i-j`` plus its own chain ``i-j+1 .. i``
        from steps ``1 .. j``. Every step's output at ``i`` predicts ``x_{i+2}``.
        """
        n = tokens.numel() - 1
        positions = torch.arange(n)
        next_tokens = tokens[1:][None]
        hidden = self.fuse(features[:n])[None]
        outputs: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for j in range(steps):
            if j:
                hidden = torch.cat([hidden[:, :1], outputs[-1][:, :-1]], 1)  # shift: i reads i-1
            # Visible: step-0 keys at p <= i - j, and step-t keys (1 <= t <= j) at p == i - j + t.
            query = positions[:, None]
            parts = [positions[None, :] <= query - j]
            parts += [positions[None, :] == query - j + t for t in range(1, j + 1)]
            mask = torch.cat(parts, -1)[None]
            past = (torch.cat(keys, 2), torch.cat(values, 2)) if keys else None
            out, (k, v) = self.step(next_tokens, hidden, positions[None], mask, past)
            keys.append(k)
            values.append(v)
            outputs.append(out)
        return [o[0] for o in outputs]


class Eagle3Drafter(NeuralDrafter):
    """Autoregressive chain: each drafted token costs one pass of the single layer."""

    model: Eagle3Model

    def extend(self, state: DraftState, token_ids: torch.Tensor, features: torch.Tensor) -> None:
        start, n = state.length, len(features)
        positions = torch.arange(start, start + n)[None]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(n, start, dtype=torch.bool), causal], -1)[None]
        past = state.cache[0] if state.cache else None
        hidden = self.model.fuse(features[None])
        out, kv = self.model.step(token_ids[start + 1 : start + n + 1][None], hidden, positions, mask, past)
        state.cache = [kv if past is None else cat_kv(past, kv)]
        state.length += n
        state.extra["last"] = out[:, -1:]  # predicts the token after the anchor

    def draft(
        self, state: DraftState, token_ids: torch.Tensor, depth: int, params: SamplingParams
    ) -> tuple[list[int], torch.Tensor | None]:
        hidden = state.extra["last"]
        past = state.cache[0]
        tokens: list[int] = []
        probs: list[torch.Tensor | None] = []
        for t in range(depth):
            token, q = self.pick(self.model.draft_logits(hidden[0, -1]), params, state.generator)
            tokens.append(token)
            probs.append(q)
            if t + 1 == depth:
                break
            position = torch.tensor([[state.length + t]])
            mask = torch.ones(1, 1, past[0].shape[2] + 1, dtype=torch.bool)
            hidden, kv = self.model.step(torch.tensor([[token]]), hidden, position, mask, past)
            past = cat_kv(past, kv)
        return tokens, self.stack_probs(probs)
