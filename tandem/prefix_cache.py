"""Prefix caching: full blocks of tokens keep their keys, values (and the drafters' target
features) after their sequence ends, so a later prompt that starts with the same tokens copies
them into its KV-cache row instead of prefilling them again. A prompt's blocks are stored when
its prefill completes, the whole sequence's (the reply too) when it ends.

A block is found by its own tokens together with the block before it (its parent), so a hit
means the whole prefix up to and including the block is the same token sequence. Parents are
named by a serial number that is never reused: once a block is evicted its descendants can no
longer be reached (they age out of the LRU order), and a new block in the same storage slot can
never be taken for it. Nothing is hashed, so there are no collisions to rule out.

Exactness: the copied numbers are the ones the sequence's own passes wrote. Prefilling the rest
after them is a chunked prefill whose first parts came from the store: on the exact kernels each
row is computed alone with its keys in order, whether in a prefill or a verification pass, so the
result is the same bits as a cold prefill (tested in tests/test_prefix_cache.py); on the stock
kernels it rounds as chunked prefill does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.devices import host_tensor
from tandem.models.kv_cache import KVCache


@dataclass
class _Block:
    serial: int  # unique for the life of the cache: children name their parent by it
    key: tuple[int, tuple[int, ...]]  # (parent serial, the block's tokens)


@dataclass(frozen=True)
class Hit:
    """What :meth:`PrefixCache.load` put into a row."""

    tokens: int  # cached prompt tokens now in the row (a multiple of the block size)
    features: torch.Tensor | None  # [tokens, F] target features of those tokens, if the cache keeps them


class PrefixCache:
    """Up to ``blocks`` blocks of ``block_size`` tokens each, evicted least recently used.

    ``feature_layers``: the target layers whose hidden states the verifier hands to drafters; a
    cache serves only verifiers of the same layers, since a hit must give back the prompt's
    features as a prefill would. Storage is allocated on the first store, shaped like the KV cache
    it copies from."""

    ROOT = 0  # the parent serial of a prompt's first block

    def __init__(self, blocks: int, block_size: int = 16, feature_layers: Sequence[int] = ()) -> None:
        if blocks < 1 or block_size < 1:
            raise ValueError(f"a prefix cache needs blocks >= 1 and block_size >= 1, got {blocks} and {block_size}")
        self.num_blocks = blocks
        self.block_size = block_size
        self.feature_layers = tuple(feature_layers)
        self.k: torch.Tensor | None = None  # [layers, blocks, kv_heads, block_size, head_dim]
        self.v: torch.Tensor | None = None
        self.features: torch.Tensor | None = None  # [blocks, block_size, F]
        self._index: dict[tuple[int, tuple[int, ...]], int] = {}  # key -> storage slot
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # storage slot -> block, oldest first
        self._serials = 0
        self.queried_tokens = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hit_tokens = 0  # of which found (prefix_cache_hits)

    @property
    def blocks_in_use(self) -> int:
        return len(self._blocks)

    def match(self, prompt_ids: Sequence[int]) -> list[int]:
        """Storage slots of the prompt's longest cached run of full blocks. The last prompt token
        is never among them: its logits give the first output token, so it is always computed."""
        slots, parent, size = [], self.ROOT, self.block_size
        for start in range(0, len(prompt_ids) - 1 - size + 1, size):
            slot = self._index.get((parent, tuple(prompt_ids[start : start + size])))
            if slot is None:
                break
            slots.append(slot)
            parent = self._blocks[slot].serial
        return slots

    def load(self, cache: KVCache, row: int, prompt_ids: Sequence[int]) -> Hit:
        """Copy the prompt's cached blocks into ``row`` (just reset) and mark them cached there."""
        slots = self.match(prompt_ids)
        self.queried_tokens += len(prompt_ids)
        tokens = len(slots) * self.block_size
        self.hit_tokens += tokens
        if not slots:
            return Hit(0, None)
        for slot in slots:
            self._blocks.move_to_end(slot)
        index = host_tensor(slots, torch.long, cache.device)
        layers, _, heads, _, dim = self.k.shape
        for store, dest in ((self.k, cache.k), (self.v, cache.v)):
            blocks = store.index_select(1, index)  # [L, n, H, bs, D]
            dest[:, row, :, :tokens] = blocks.transpose(1, 2).reshape(layers, heads, tokens, dim)
        cache.lengths[row] = tokens
        features = None if self.features is None else self.features.index_select(0, index).flatten(0, 1)
        return Hit(tokens, features)

    def store(self, cache: KVCache, row: int, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        """Keep the full blocks of ``tokens``, the first ``len(tokens)`` in ``row`` (a prompt, or a
        finished sequence); ``features``: their ``[len(tokens), F]`` target features, or None
        without feature layers. Blocks already kept are only marked recently used."""
        size = self.block_size
        full = min(len(tokens) // size, self.num_blocks)  # more than fit: keep the front
        parent, new = self.ROOT, []  # new: (block number in the sequence, storage slot)
        for b in range(full):
            key = (parent, tuple(tokens[b * size : (b + 1) * size]))
            slot = self._index.get(key)
            if slot is None:
                slot = self._take_slot()
                self._serials += 1
                self._blocks[slot] = _Block(self._serials, key)
                self._index[key] = slot
                new.append((b, slot))
            self._blocks.move_to_end(slot)
            parent = self._blocks[slot].serial
        if new:
            self._copy_in(cache, row, new, features)

    def _take_slot(self) -> int:
        """A free storage slot, or the least recently used block's, evicted."""
        if len(self._blocks) < self.num_blocks:
            return len(self._blocks)  # slots fill in order until the first eviction
        slot, block = self._blocks.popitem(last=False)
        del self._index[block.key]
        return slot

    def _copy_in(self, cache: KVCache, row: int, new: list[tuple[int, int]], features: torch.Tensor | None) -> None:
        layers, _, heads, _, dim = cache.k.shape
        size = self.block_size
        if self.k is None:  # uninitialised: a block is written before it can be found, and
            # memory is touched as blocks fill (zeroing every block up front took 0.3 s here)
            shape = (layers, self.num_blocks, heads, size, dim)
            self.k = torch.empty(shape, dtype=cache.k.dtype, device=cache.device)
            self.v = torch.empty(shape, dtype=cache.v.dtype, device=cache.device)
            if features is not None:
                shape = (self.num_blocks, size, features.shape[-1])
                self.features = torch.empty(shape, dtype=features.dtype, device=features.device)
        numbers = host_tensor([b for b, _ in new], torch.long, cache.device)
        slots = host_tensor([s for _, s in new], torch.long, cache.device)
        span = (new[-1][0] + 1) * size  # the tokens up to the last new block (numbers increase)
        for store, source in ((self.k, cache.k), (self.v, cache.v)):
            blocks = source[:, row, :, :span].reshape(layers, heads, -1, size, dim)
            store.index_copy_(1, slots, blocks.index_select(2, numbers).transpose(1, 2))
        if self.features is not None and features is not None:
            blocks = features[:span].reshape(-1, size, features.shape[-1])
            self.features.index_copy_(0, slots, blocks.index_select(0, numbers))
