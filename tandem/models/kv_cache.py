"""A paged KV cache (the vLLM design): keys and values live in fixed-size blocks of one pool, and
each sequence (a row) holds a table of the blocks its tokens occupy, taken on demand as it grows
and given back when it ends. A forward pass appends a token tree after a row's cached prefix;
:meth:`KVCache.commit` keeps only the accepted path.

Full blocks may be shared between rows (prefix caching, :mod:`tandem.prefix_cache`). No block is
ever written at a position below its row's cached length, and a shared block is full and below
it, so sharing needs no copy-on-write.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Protocol

import torch

from tandem.devices import host_tensor
from tandem.errors import NoRoom


class BlockKeeper(Protocol):
    """What keeps blocks after the last row lets go of them (the prefix cache), until evicted."""

    def park(self, block: int) -> bool:
        """``block`` is now used by no row: keep it (cached, evictable, most recently used last)
        and say True, or say False if it is not cached (then it is free at once)."""

    def evictable(self) -> int:
        """Blocks it keeps that no row uses: free space, taken back by :meth:`evict`."""

    def evict(self) -> int:
        """Forget the least recently used kept block no row uses, and hand it over."""

    def reuse(self, block: int) -> None:
        """``block``, kept and unused, is taken by a row again: no longer evictable."""


class KVCache:
    """``k``/``v``: ``[layers, blocks, kv_heads, block_size, head_dim]`` on the model's device.

    Row ``r`` holds ``lengths[r]`` verified tokens, token ``p`` at offset ``p % block_size`` of
    block ``tables[r][p // block_size]``; positions past its length hold the tree being verified.
    ``capacity``: the most tokens a row may hold (the context). Host-side bookkeeping (tables,
    lengths, reference counts) is plain Python: a pass reads it once."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        blocks: int | None = None,
        block_size: int = 16,
        zeroed: bool = True,
    ) -> None:
        """``blocks``: the pool's size (None: enough for every row to fill its capacity, the
        memory a dense cache of ``rows`` x ``capacity`` takes). ``zeroed``: the stock path reads
        whole blocks, masked, and 0 x NaN from never-written memory would leak; the exact kernels
        read only written positions, so their pool is left uninitialised (zeroing a large pool
        costs a fraction of a second)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        blocks = rows * -(-capacity // block_size) if blocks is None else blocks
        shape = (num_layers, blocks, num_kv_heads, block_size, head_dim)
        self._new = torch.zeros if zeroed else torch.empty
        self.k = self._new(shape, dtype=dtype, device=device)
        self.v = self._new(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.capacity = capacity
        self.device = torch.device(device)
        self.lengths = [0] * rows
        self.tables: list[list[int]] = [[] for _ in range(rows)]
        self.taken: set[int] = set()  # rows a verifier holds (take_row .. release)
        self._free_rows = list(range(rows))  # a heap: the lowest free row first
        self.refs = [0] * blocks  # rows using each block
        self._free = list(range(blocks - 1, -1, -1))  # pop() takes the lowest first
        self.keeper: BlockKeeper | None = None  # set by a PrefixCache over this pool

    @property
    def num_rows(self) -> int:
        return len(self.tables)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def free_blocks(self) -> int:
        """Blocks a row can take now: free ones, and cached ones no row uses (evicted on demand)."""
        return len(self._free) + (self.keeper.evictable() if self.keeper else 0)

    @property
    def blocks_in_use(self) -> int:
        """Blocks some row uses (vLLM's ``kv_blocks_in_use``)."""
        return self.num_blocks - self.free_blocks

    def share_of(self, row: int) -> float:
        """The blocks ``row`` holds, one shared by n rows counting 1/n (so shares add up to
        :attr:`blocks_in_use`)."""
        return sum(1 / self.refs[block] for block in self.tables[row])

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def shortfall(self, wants: dict[int, int]) -> int:
        """Blocks missing for each row ``r`` of ``wants`` to hold ``wants[r]`` tokens (0: they fit)."""
        need = sum(max(0, self.blocks_for(n) - len(self.tables[r])) for r, n in wants.items())
        return max(0, need - self.free_blocks)

    def reserve(self, wants: dict[int, int]) -> None:
        """Give each row ``r`` the blocks to hold ``wants[r]`` tokens, all or none: :class:`NoRoom`
        (nothing taken) when the pool cannot."""
        too_long = [n for n in wants.values() if n > self.capacity]
        if too_long:
            raise ValueError(f"KV cache rows hold {self.capacity} tokens; this pass needs {max(too_long)}")
        missing = self.shortfall(wants)
        if missing:
            raise NoRoom(f"the KV cache needs {missing} more blocks of {self.block_size} tokens than are free")
        for row, tokens in wants.items():
            table = self.tables[row]
            while len(table) < self.blocks_for(tokens):
                block = self._free.pop() if self._free else self.keeper.evict()
                self.refs[block] = 1
                table.append(block)

    def take_row(self) -> int:
        """The lowest row no one holds (empty); :class:`NoRoom` if every row is held."""
        if not self._free_rows:
            raise NoRoom(f"all {self.num_rows} sequences are in use")
        self.taken.add(row := heapq.heappop(self._free_rows))
        return row

    def share(self, row: int, blocks: Sequence[int]) -> None:
        """Start the empty ``row`` with ``blocks`` (full, cached elsewhere) as its first tokens."""
        assert not self.tables[row], "share blocks into an empty row"
        for block in blocks:
            if self.refs[block] == 0 and self.keeper is not None:
                self.keeper.reuse(block)
            self.refs[block] += 1
        self.tables[row] = list(blocks)
        self.lengths[row] = len(blocks) * self.block_size

    def clear(self, row: int) -> None:
        """Empty the row, which stays held; blocks no other row uses are free again, or stay cached."""
        for block in self.tables[row]:
            self.refs[block] -= 1
            if self.refs[block] == 0 and not (self.keeper is not None and self.keeper.park(block)):
                self._free.append(block)
        self.tables[row] = []
        self.lengths[row] = 0

    def release(self, row: int) -> None:
        """Empty the row and give it back."""
        self.clear(row)
        if row in self.taken:
            self.taken.discard(row)
            heapq.heappush(self._free_rows, row)

    def grow(self, rows: int, blocks: int, capacity: int) -> None:
        """At least ``rows`` rows of ``capacity`` tokens and ``blocks`` blocks; what is cached stays
        (block numbers are kept)."""
        self.capacity = max(self.capacity, capacity)
        for row in range(self.num_rows, rows):
            heapq.heappush(self._free_rows, row)
        self.lengths += [0] * max(0, rows - self.num_rows)
        self.tables += [[] for _ in range(rows - len(self.tables))]
        extra = blocks - self.num_blocks
        if extra > 0:
            layers, _, heads, size, dim = self.k.shape
            pad = self._new(layers, extra, heads, size, dim, dtype=self.k.dtype, device=self.device)
            self.k, self.v = torch.cat([self.k, pad], 1), torch.cat([self.v, pad], 1)
            self._free[:0] = range(self.num_blocks - 1, self.num_blocks - extra - 1, -1)
            self.refs += [0] * extra

    def starts(self, rows: Sequence[int]) -> torch.Tensor:
        """Cached lengths of ``rows`` as a ``[B]`` tensor on the device."""
        return host_tensor([self.lengths[r] for r in rows], torch.long, self.device)

    def block_tables(self, rows: Sequence[int], tokens: int) -> torch.Tensor:
        """``[B, ceil(tokens / block_size)]`` block numbers of the rows' first ``tokens`` positions
        on the device (0 past a row's own blocks: never visible to it)."""
        width = self.blocks_for(tokens)
        tables = [self.tables[r][:width] + [0] * (width - len(self.tables[r][:width])) for r in rows]
        return host_tensor(tables, torch.long, self.device)

    def write_index(self, tables: torch.Tensor, starts: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
        """Index into one layer's ``[blocks, kv_heads, block_size, head_dim]`` for ``steps`` new
        tokens after each row's prefix (``starts``); computed once per pass, used by every layer."""
        positions = starts[:, None] + torch.arange(steps, device=self.device)  # [B, T]
        blocks = tables.gather(1, positions // self.block_size)
        heads = torch.arange(self.k.shape[2], device=self.device)[None, :, None]
        return blocks[:, None, :], heads, (positions % self.block_size)[:, None, :]

    def write(self, layer: int, index: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new ``[B, H, T, D]`` keys/values at ``index`` (from :meth:`write_index`)."""
        self.k[layer].index_put_(index, k)
        self.v[layer].index_put_(index, v)

    def read(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the first ``length`` positions of the rows of ``tables``, gathered into
        ``[B, H, length, D]`` (the stock path's view; the exact kernels read the blocks in place)."""
        return _gathered(self.k[layer][tables], length), _gathered(self.v[layer][tables], length)

    def contents(self, row: int, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``row``'s first ``tokens`` positions (its cached ones by default),
        ``[layers, kv_heads, tokens, head_dim]``: for checks and tools."""
        tokens = self.lengths[row] if tokens is None else tokens
        blocks = host_tensor(self.tables[row][: self.blocks_for(tokens)], torch.long, self.device)
        return _gathered(self.k[:, blocks], tokens), _gathered(self.v[:, blocks], tokens)

    def commit(self, row: int, kept: Sequence[int]) -> None:
        """Keep the new tokens at block offsets ``kept`` (increasing) and advance the row.

        Offsets only move down (``kept[i] >= i``), so gathering before writing is safe.
        """
        start = self.lengths[row]
        if list(kept) != list(range(len(kept))):
            src = self._slots(row, [start + i for i in kept])
            dst = self._slots(row, range(start, start + len(kept)))
            for pool in (self.k, self.v):
                pool[:, dst[0], :, dst[1]] = pool[:, src[0], :, src[1]]
        self.lengths[row] = start + len(kept)

    def _slots(self, row: int, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks and offsets of ``row``'s ``positions``, on the device."""
        table, size = self.tables[row], self.block_size
        blocks = host_tensor([table[p // size] for p in positions], torch.long, self.device)
        return blocks, host_tensor([p % size for p in positions], torch.long, self.device)


def _gathered(blocks: torch.Tensor, length: int) -> torch.Tensor:
    """``[..., n, H, block_size, D]`` blocks in order as ``[..., H, length, D]`` positions."""
    return blocks.transpose(-4, -3).flatten(-3, -2)[..., :length, :]
