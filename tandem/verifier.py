"""The target side of speculative decoding: a KV cache whose rows are live sequences, one batched
prefill pass for new ones, and one batched pass that verifies every sequence's tree.

The in-process :class:`tandem.engine.Engine` and the cluster's target worker share it, so both
emit the very same tokens. Sequences join and leave at any time (continuous batching): a row is
taken by :meth:`Verifier.open` and given back by :meth:`Verifier.close`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.errors import InvalidRequest, TandemError
from tandem.models.decoder import Transformer
from tandem.sampling import SamplingParams, sample, target_probs
from tandem.tree import TokenTree, ancestor_mask, tree_depths
from tandem.verify import verify_batch


class NoRoom(TandemError):
    """Every row is taken: the caller should retry later or send the session elsewhere."""


@dataclass
class Step:
    """What one target pass gives one sequence."""

    tokens: list[int]  # accepted draft tokens, then the bonus token (after prefill: the first token)
    accepted: int  # accepted draft tokens
    features: torch.Tensor | None  # [n, F]: target features of the n tokens this pass verified


@dataclass
class _Slot:
    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]


class Verifier:
    """``rows`` sequences of up to ``capacity`` tokens each on one target model."""

    def __init__(self, model: Transformer, rows: int, capacity: int, feature_layers: Sequence[int] = ()) -> None:
        layers = model.config.num_layers
        if any(not 0 <= i < layers for i in feature_layers):
            raise ValueError(f"feature layers {list(feature_layers)} outside the target's {layers} layers")
        self.model = model
        self.feature_layers = tuple(feature_layers)
        self.cache = model.new_cache(rows, capacity)
        self.passes = 0
        self._slots: dict[int, _Slot] = {}

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def free_rows(self) -> int:
        return self.cache.num_rows - len(self._slots)

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise :class:`InvalidRequest` for a prompt this target cannot take."""
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        if len(prompt_ids) >= self.capacity:
            raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; the context holds {self.capacity}")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must lie in [0, {vocab})")

    def open(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int) -> int:
        """Take a row for a new sequence; its first token comes from :meth:`prefill`."""
        self.check_prompt(prompt_ids)
        if not self.free_rows:
            raise NoRoom(f"all {self.cache.num_rows} sequences are in use")
        row = min(set(range(self.cache.num_rows)) - self._slots.keys())
        self.cache.reset(row)
        self._slots[row] = _Slot(params, torch.Generator().manual_seed(seed), list(prompt_ids))
        return row

    def close(self, row: int) -> None:
        self._slots.pop(row, None)

    def room(self, row: int) -> int:
        """Draft nodes that still fit below the anchor in ``row``."""
        return self.capacity - int(self.cache.lengths[row]) - 1

    def prefill(self, rows: Sequence[int]) -> list[Step]:
        """One pass over the rows' prompts (padded); the last prompt position gives the first token."""
        prompts = [self._slots[r].prompt_ids for r in rows]
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        tokens = torch.zeros(len(rows), longest, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            tokens[b, : len(prompt)] = torch.tensor(prompt)
        depths = torch.arange(longest).expand(len(rows), -1)
        causal = torch.ones(longest, longest, dtype=torch.bool).tril().expand(len(rows), -1, -1)
        last = torch.tensor(lengths)[:, None] - 1
        logits, features = self._pass(tokens, depths, causal, rows, last)
        steps = []
        for b, (row, n) in enumerate(zip(rows, lengths)):
            self.cache.commit(row, range(n))
            slot = self._slots[row]
            first = sample(target_probs(logits[b, 0], slot.params), slot.generator)
            steps.append(Step([first], 0, None if features is None else features[b, :n]))
        return steps

    def verify(self, rows: Sequence[int], trees: Sequence[TokenTree]) -> list[Step]:
        """One pass over every row's tree (rooted at its anchor), then exact verification."""
        width = max(len(t) for t in trees)
        batch = len(trees)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        depths = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.eye(width, dtype=torch.bool).repeat(batch, 1, 1)  # padding sees itself only
        for b, tree in enumerate(trees):
            n = len(tree)
            tokens[b, :n] = tree.tokens
            depths[b, :n] = tree_depths(tree.parents)
            mask[b, :n, :n] = ancestor_mask(tree.parents)
        logits, features = self._pass(tokens, depths, mask, rows)
        slots = [self._slots[r] for r in rows]
        verdicts = verify_batch(trees, logits, [s.params for s in slots], [s.generator for s in slots])
        steps = []
        for b, (row, tree, verdict) in enumerate(zip(rows, trees, verdicts)):
            self.cache.commit(row, verdict.accepted_nodes)
            kept = None if features is None else features[b, list(verdict.accepted_nodes)]
            steps.append(Step(verdict.emitted(tree), verdict.accepted_drafts, kept))
        return steps

    def _pass(
        self,
        tokens: torch.Tensor,
        depths: torch.Tensor,
        mask: torch.Tensor,
        rows: Sequence[int],
        logit_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.passes += 1
        row_ids = torch.tensor(list(rows))
        return self.model.forward_features(tokens, depths, mask, self.cache, row_ids, self.feature_layers, logit_index)
