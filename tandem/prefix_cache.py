"""Prefix caching over the paged KV cache: full blocks stay in the pool after their sequence lets
go of them, so a later prompt that starts with the same tokens takes them into its block table
instead of prefilling them again. No copy: the row shares the blocks. A prompt's blocks are
indexed when its prefill completes, the whole sequence's (the reply too) when it ends. Kept blocks
no row uses are the pool's free space: a row that needs a block evicts the least recently used.

A block is found by its own tokens together with the block before it (its parent), so a hit
means the whole prefix up to and including the block is the same token sequence. Parents are
named by a serial number that is never reused: once a block is evicted its descendants can no
longer be reached (they age out of the LRU order), and a block reused for other tokens can never
be taken for the old ones. Nothing is hashed, so there are no collisions to rule out.

Exactness: a shared block holds the numbers its first sequence's passes wrote. Prefilling the rest
after it is a chunked prefill whose first parts came from the cache: on the exact kernels each row
is computed alone with its keys in order, whether in a prefill or a verification pass, so the result
is the same bits as a cold prefill (tested in tests/test_prefix_cache.py); on the stock kernels it
rounds as chunked prefill does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.devices import host_tensor
from tandem.models.kv_cache import KVCache

ROOT = 0  # the parent serial of a prompt's first block


@dataclass(frozen=True)
class Hit:
    """What :meth:`PrefixCache.load` put into a row."""

    tokens: int  # cached prompt tokens now in the row (a multiple of the block size)
    features: torch.Tensor | None  # [tokens, F] target features of those tokens, if the cache keeps them


class PrefixCache:
    """The index of ``cache``'s kept blocks (it attaches itself as the pool's keeper).

    ``feature_layers``: the target layers whose hidden states the verifier hands to drafters; a
    cache serves only verifiers of the same layers, since a hit must give back the prompt's
    features as a prefill would. Their storage, one slot per pool block, is allocated on the
    first store and touched as blocks are indexed."""

    def __init__(self, cache: KVCache, feature_layers: Sequence[int] = ()) -> None:
        if cache.keeper is not None:
            raise ValueError("this KV cache already has a prefix cache")
        self.cache = cache
        cache.keeper = self
        self.feature_layers = tuple(feature_layers)
        self.features: torch.Tensor | None = None  # [pool blocks, block_size, F]
        self._index: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent serial, tokens) -> block
        self._keys: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> its key
        self._serials: dict[int, int] = {}  # block -> its serial
        self._unused: OrderedDict[int, None] = OrderedDict()  # kept blocks no row uses, oldest first
        self._last_serial = ROOT
        self.queried_tokens = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hit_tokens = 0  # of which found (prefix_cache_hits)

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @property
    def blocks_cached(self) -> int:
        return len(self._keys)

    # the pool's BlockKeeper
    def park(self, block: int) -> bool:
        if block not in self._keys:
            return False
        self._unused[block] = None
        return True

    def evictable(self) -> int:
        return len(self._unused)

    def evict(self) -> int:
        block, _ = self._unused.popitem(last=False)
        del self._index[self._keys.pop(block)]
        del self._serials[block]
        return block

    def reuse(self, block: int) -> None:
        del self._unused[block]

    def match(self, prompt_ids: Sequence[int]) -> list[int]:
        """Blocks of the prompt's longest cached run of full blocks. The last prompt token is
        never among them: its logits give the first output token, so it is always computed."""
        blocks, parent, size = [], ROOT, self.block_size
        for start in range(0, len(prompt_ids) - size, size):
            block = self._index.get((parent, tuple(prompt_ids[start : start + size])))
            if block is None:
                break
            blocks.append(block)
            parent = self._serials[block]
        return blocks

    def load(self, row: int, prompt_ids: Sequence[int]) -> Hit:
        """Start the empty ``row`` with the prompt's cached blocks (shared, not copied)."""
        blocks = self.match(prompt_ids)
        self.queried_tokens += len(prompt_ids)
        tokens = len(blocks) * self.block_size
        self.hit_tokens += tokens
        if not blocks:
            return Hit(0, None)
        self.cache.share(row, blocks)  # in use: not evictable; when let go, the most recently used
        features = None
        if self.features is not None:
            features = self.features.index_select(0, host_tensor(blocks, torch.long, self.features.device))
            features = features.flatten(0, 1)
        return Hit(tokens, features)

    def store(self, row: int, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        """Index the full blocks of ``tokens``, the first ``len(tokens)`` of ``row`` (a prompt, or
        a finished sequence); ``features``: their ``[len(tokens), F]`` target features, or None
        without feature layers. A block whose tokens are indexed already (another sequence's)
        stays as it is; the row's own copy is freed with the row."""
        size, table = self.block_size, self.cache.tables[row]
        parent, new = ROOT, []  # new: (block number in the sequence, pool block)
        for b in range(len(tokens) // size):
            key = (parent, tuple(tokens[b * size : (b + 1) * size]))
            block = self._index.get(key)
            if block is None:
                block = table[b]
                self._last_serial += 1
                self._index[key], self._keys[block], self._serials[block] = block, key, self._last_serial
                new.append((b, block))
            parent = self._serials[block]
        if new and features is not None:
            self._copy_features(new, features)

    def _copy_features(self, new: list[tuple[int, int]], features: torch.Tensor) -> None:
        size = self.block_size
        if self.features is None:  # uninitialised: a block's features are written before it can be found
            shape = (self.cache.num_blocks, size, features.shape[-1])
            self.features = torch.empty(shape, dtype=features.dtype, device=features.device)
        elif self.features.shape[0] < self.cache.num_blocks:  # the pool grew
            extra = self.features.new_empty(self.cache.num_blocks - self.features.shape[0], *self.features.shape[1:])
            self.features = torch.cat([self.features, extra])
        numbers = host_tensor([b for b, _ in new], torch.long, features.device)
        blocks = host_tensor([k for _, k in new], torch.long, features.device)
        span = (new[-1][0] + 1) * size  # the tokens up to the last new block (numbers increase)
        self.features.index_copy_(0, blocks, features[:span].reshape(-1, size, features.shape[-1])[numbers])
