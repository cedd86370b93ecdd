"""The target side of speculative decoding: a KV cache whose rows are live sequences, batched
prefill passes for new ones (rows of similar length together), and one batched pass that
verifies every sequence's tree.

The in-process :class:`tandem.engine.Engine` and the cluster's target worker share it, so both
emit the very same tokens. Sequences join and leave at any time (continuous batching): a row is
taken by :meth:`Verifier.open` and given back by :meth:`Verifier.close`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tandem.devices import HOST, host_tensor
from tandem.errors import InvalidRequest, NoRoom
from tandem.models.decoder import Transformer
from tandem.models.kv_cache import KVCache
from tandem.prefix_cache import PrefixCache
from tandem.sampling import SamplingParams, round_seed
from tandem.tree import TokenTree, ancestor_rows, chain, tree_depths
from tandem.verify import Verdict, verify_batch

# What a pass's fixed cost (reading every weight once) is worth in prompt tokens on the packed CPU
# kernels: a 1-token step takes 8.5-10 ms here, a prompt token in a prefill about 2 ms.
PREFILL_PASS_TOKENS = 8


def prefill_groups(lengths: Sequence[int], pass_tokens: float) -> list[list[int]]:
    """Which rows (indices into ``lengths``, their prompt parts' lengths) to prefill in one pass
    each: a pass pads its rows to its longest, so rows of similar length go together. The
    partition of the rows sorted by length into runs with the fewest padded tokens plus
    ``pass_tokens`` per pass (``math.inf``: one pass for all); shortest run first."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if len(order) < 2 or math.isinf(pass_tokens):
        return [sorted(order)]
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):  # the rows order[:end], the last run order[start:end]
        for start in range(end):
            cost = best[start] + pass_tokens + (end - start) * lengths[order[end - 1]]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], len(order)
    while end:
        runs.append(sorted(order[cut[end] : end]))
        end = cut[end]
    return runs[::-1]


@dataclass
class Step:
    """What one target pass gives one sequence."""

    tokens: list[int]  # accepted draft tokens, then the bonus token (after prefill: the first token)
    accepted: int  # accepted draft tokens
    features: torch.Tensor | None  # [n, F] on the target's device: features of the n tokens this pass verified
    cached_tokens: int = 0  # the prefill's answer: prompt tokens the prefix cache served, not computed
    kv_blocks: float = 0.0  # KV-cache blocks the row holds after the pass, a block shared by n rows counting 1/n


@dataclass
class _Slot:
    params: SamplingParams
    seed: int
    generator: torch.Generator  # on the host, where verification walks (tandem.verify); reseeded per round
    prompt_ids: list[int]
    # Target features of the tokens in the row: the prompt's parts while it is prefilled; with a
    # prefix cache, everything committed since, for the blocks its sequence leaves at close
    features: list[torch.Tensor] = field(default_factory=list)
    cached_tokens: int = 0  # of the prompt, from the prefix cache
    committed: list[int] = field(default_factory=list)  # with a prefix cache: tokens committed after the prompt


class Verifier:
    """``rows`` sequences of up to ``capacity`` tokens each on one target model, their keys and
    values in a paged cache of ``kv_blocks`` blocks of ``block_size`` tokens (None: enough for
    every row to fill its capacity)."""

    def __init__(
        self,
        model: Transformer,
        rows: int,
        capacity: int,
        feature_layers: Sequence[int] = (),
        agree: Callable[[list[Verdict]], list[Verdict]] | None = None,
        kv_blocks: int | None = None,
        block_size: int = 16,
        prefix_caching: bool = False,
        cache: KVCache | None = None,
        prefill_pass_tokens: float | None = None,
    ) -> None:
        """``agree``: what a tensor-parallel group commits, given this rank's verdicts
        (:func:`tandem.models.tp.rank0_verdicts`); alone, a verifier commits its own.
        ``prefix_caching``: prompts start from their longest cached prefix and leave their full
        blocks there. ``cache``: an existing pool to work in instead (with its prefix cache, if
        it has one: the engine keeps one across calls). ``prefill_pass_tokens``: a pass's fixed
        cost in prompt tokens, for :func:`prefill_groups` (default: :data:`PREFILL_PASS_TOKENS`
        on the exact kernels, whose rows are computed alone so that grouping changes no bit;
        one pass for all rows elsewhere)."""
        layers = model.config.num_layers
        if any(not 0 <= i < layers for i in feature_layers):
            raise ValueError(f"feature layers {list(feature_layers)} outside the target's {layers} layers")
        if cache is None:
            cache = model.new_cache(rows, capacity, kv_blocks, block_size)
            if prefix_caching:
                PrefixCache(cache, feature_layers)
        self.cache = cache
        self.prefix_cache: PrefixCache | None = cache.keeper  # type: ignore[assignment]
        if self.prefix_cache is not None and self.prefix_cache.feature_layers != tuple(feature_layers):
            raise ValueError(
                f"the prefix cache keeps features of layers {list(self.prefix_cache.feature_layers)}, "
                f"this verifier computes {list(feature_layers)}"
            )
        self.model = model
        self.feature_layers = tuple(feature_layers)
        self.agree = agree
        if prefill_pass_tokens is None:
            prefill_pass_tokens = PREFILL_PASS_TOKENS if model.exact else math.inf
        self.prefill_pass_tokens = prefill_pass_tokens
        self.passes = 0
        self._slots: dict[int, _Slot] = {}

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def free_rows(self) -> int:
        return self.cache.num_rows - len(self.cache.taken)

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
        """Take a row for a new sequence, with the blocks its prompt needs (:class:`NoRoom` when
        the cache has neither a free row nor, after any cached prefix, the blocks); its first
        token comes from :meth:`prefill`."""
        self.check_prompt(prompt_ids)
        row = self.cache.take_row()
        slot = _Slot(params, seed, torch.Generator(device=HOST), list(prompt_ids))
        if self.prefix_cache is not None:
            hit = self.prefix_cache.load(row, prompt_ids)
            slot.cached_tokens = hit.tokens
            if hit.features is not None:
                slot.features.append(hit.features)
        try:
            self.cache.reserve({row: len(prompt_ids)})
        except NoRoom:
            self.cache.release(row)
            raise
        self._slots[row] = slot
        return row

    def close(self, row: int) -> None:
        """Give the row and its blocks back; with a prefix cache, its sequence's full blocks stay
        there (a chat's next turn starts with this one's prompt and reply)."""
        slot = self._slots.pop(row, None)
        if self.prefix_cache is not None and slot is not None and self.cache.lengths[row] >= len(slot.prompt_ids):
            features = torch.cat(slot.features) if slot.features else None
            self.prefix_cache.store(row, slot.prompt_ids + slot.committed, features)
        if slot is not None:
            self.cache.release(row)

    def room(self, row: int) -> int:
        """Draft nodes that still fit below the anchor in ``row``."""
        return self.capacity - self.cache.lengths[row] - 1

    def prefill(self, rows: Sequence[int], chunk: int | None = None) -> list[Step]:
        """The rows' prompts in passes of up to ``chunk`` tokens each (whole, if None); each
        row's last prompt position gives its first token (see :meth:`prefill_part`)."""
        steps: dict[int, Step] = {}
        while len(steps) < len(rows):
            pending = [row for row in rows if row not in steps]
            steps.update((row, step) for row, step in zip(pending, self.prefill_part(pending, chunk)) if step)
        return [steps[row] for row in rows]

    def prefill_part(self, rows: Sequence[int], chunk: int | None = None) -> list[Step | None]:
        """One pass over the next ``chunk`` prompt tokens of each row (all that are left, if
        None), after what earlier parts cached. A row whose prompt is now whole gets its first
        token (the bonus of a root-only tree, through the same verification as every round,
        keyed by the prompt's length as a whole prefill is) with the features of its whole
        prompt; the others get None: call again. A long prompt in parts leaves room between
        them for other rows' passes (chunked prefill); on the exact kernels the parts cache
        the very numbers one whole pass would (each row is computed alone, keys in order)."""
        starts = [self.cache.lengths[row] for row in rows]
        prompts = [self._slots[row].prompt_ids for row in rows]
        parts = [p[s : s + chunk if chunk else None] for p, s in zip(prompts, starts)]
        groups = prefill_groups([len(part) for part in parts], self.prefill_pass_tokens)
        if len(groups) > 1:  # lengths too far apart to pad together: a pass per group
            found: dict[int, Step | None] = {}
            for group in groups:
                found.update(zip(group, self.prefill_part([rows[i] for i in group], chunk)))
            return [found[i] for i in range(len(rows))]
        longest = max(len(part) for part in parts)
        fits = [s + longest <= self.capacity for s in starts]
        wants = {row: s + longest for row, s in zip(rows, starts)}
        if self.cache.shortfall(wants):  # padding needs blocks the cache lacks: rows that would take
            # new ones go alone (each has its prompt's since open)
            tables = self.cache.tables
            fits = [ok and self.cache.blocks_for(wants[row]) <= len(tables[row]) for ok, row in zip(fits, rows)]
        if not all(fits) and len(rows) > 1:  # padding would run past a row's end: alone, it fits
            together = [i for i, ok in enumerate(fits) if ok]
            steps = dict(zip(together, self.prefill_part([rows[i] for i in together], chunk) if together else []))
            steps.update({i: self.prefill_part([rows[i]], chunk)[0] for i, ok in enumerate(fits) if not ok})
            return [steps[i] for i in range(len(rows))]
        device = self.model.device
        tokens = host_tensor([part + [0] * (longest - len(part)) for part in parts], torch.long, device)
        depths = torch.arange(longest, device=device).expand(len(rows), -1)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril().expand(len(rows), -1, -1)
        last = host_tensor([[len(part) - 1] for part in parts], torch.long, device)
        logits, features = self._pass(tokens, depths, causal, rows, last)
        done = [b for b, (p, s, part) in enumerate(zip(prompts, starts, parts)) if s + len(part) == len(p)]
        verdicts = self._verdicts(
            [rows[b] for b in done],
            [chain(prompts[b][-1], []) for b in done],
            logits[done],
            [len(prompts[b]) - 1 for b in done],
        )
        for b, (row, part) in enumerate(zip(rows, parts)):  # only now: a pass that raised changed nothing
            self.cache.commit(row, range(len(part)))
            if features is not None:
                self._slots[row].features.append(features[b, : len(part)])
        steps: list[Step | None] = [None] * len(rows)
        for b, verdict in zip(done, verdicts):
            slot = self._slots[rows[b]]
            features = torch.cat(slot.features) if slot.features else None
            slot.features.clear()
            if self.prefix_cache is not None:  # sessions that start alike hit it while this one runs
                self.prefix_cache.store(rows[b], slot.prompt_ids, features)
                slot.features += [] if features is None else [features]  # for the store at close
            steps[b] = Step([verdict.bonus_token], 0, features, slot.cached_tokens, self.cache.share_of(rows[b]))
        return steps

    def verify(self, rows: Sequence[int], trees: Sequence[TokenTree]) -> list[Step]:
        """One pass over every row's tree (rooted at its anchor), then exact verification.

        Trees are padded to the widest; a row too near its context end to hold that padding is
        verified in a pass of its own, so it never fails the others."""
        width = max(len(t) for t in trees)
        fits = [self.cache.lengths[row] + width <= self.capacity for row in rows]
        if not all(fits) and len(rows) > 1:
            together = [i for i, ok in enumerate(fits) if ok]
            tight = [trees[i] for i in together]
            steps = dict(zip(together, self.verify([rows[i] for i in together], tight) if together else []))
            steps.update({i: self.verify([rows[i]], [trees[i]])[0] for i, ok in enumerate(fits) if not ok})
            return [steps[i] for i in range(len(rows))]
        tokens, depths, mask = [], [], []
        for tree in trees:
            pad = width - len(tree)
            tokens.append([*tree.tokens, *[0] * pad])
            depths.append([*tree_depths(tree.parents), *[0] * pad])
            mask.append(ancestor_rows(tree.parents, width))
        device = self.model.device
        logits, features = self._pass(
            host_tensor(tokens, torch.long, device),
            host_tensor(depths, torch.long, device),
            host_tensor(mask, torch.bool, device),
            rows,
        )
        verdicts = self._verdicts(rows, trees, logits, [self.cache.lengths[row] for row in rows])
        steps = []
        for b, (row, tree, verdict) in enumerate(zip(rows, trees, verdicts)):
            self.cache.commit(row, verdict.accepted_nodes)
            kept = None if features is None else features[b, list(verdict.accepted_nodes)]
            if self.prefix_cache is not None:
                slot = self._slots[row]
                slot.committed += [tree.tokens[i] for i in verdict.accepted_nodes]
                slot.features += [] if kept is None else [kept]
            steps.append(Step(verdict.emitted(tree), verdict.accepted_drafts, kept, 0, self.cache.share_of(row)))
        return steps

    def _verdicts(
        self, rows: Sequence[int], trees: Sequence[TokenTree], logits: torch.Tensor, anchors: Sequence[int]
    ) -> list[Verdict]:
        """``anchors``: each tree's root position in its sequence, which keys the round's draws."""
        slots = [self._slots[r] for r in rows]
        for slot, position in zip(slots, anchors):
            slot.generator.manual_seed(round_seed(slot.seed, position))
        verdicts = verify_batch(trees, logits, [s.params for s in slots], [s.generator for s in slots])
        return verdicts if self.agree is None else self.agree(verdicts)

    def _pass(
        self,
        tokens: torch.Tensor,
        depths: torch.Tensor,
        mask: torch.Tensor,
        rows: Sequence[int],
        logit_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.passes += 1
        return self.model.forward_features(tokens, depths, mask, self.cache, rows, self.feature_layers, logit_index)
