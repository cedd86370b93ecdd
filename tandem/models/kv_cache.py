"""A preallocated KV cache whose rows are sequences; a forward pass appends a token tree after a
row's cached prefix, and :meth:`KVCache.commit` keeps only the accepted path."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """``k``/``v``: ``[layers, rows, kv_heads, capacity, head_dim]``; ``lengths[r]`` tokens of row
    ``r`` are verified and cached. Slots past ``lengths[r]`` hold the tree being verified."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, rows, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.capacity = capacity

    @property
    def num_rows(self) -> int:
        return self.k.shape[1]

    def block_index(self, rows: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
        """Index for writing ``steps`` new tokens right after each row's cached prefix; computed
        once per forward pass and reused by every layer."""
        slots = self.lengths[rows][:, None] + torch.arange(steps)  # [B, T]
        heads = torch.arange(self.k.shape[2])[None, :, None]
        return rows[:, None, None], heads, slots[:, None, :]

    @staticmethod
    def row_selector(rows: torch.Tensor) -> slice | torch.Tensor:
        """A slice when ``rows`` are consecutive, so reads are views instead of gathers."""
        first = int(rows[0])
        if torch.equal(rows, torch.arange(first, first + rows.numel())):
            return slice(first, first + rows.numel())
        return rows

    def write(self, layer: int, index: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new ``[B, H, T, D]`` keys/values at ``index`` (from :meth:`block_index`)."""
        self.k[layer].index_put_(index, k)
        self.v[layer].index_put_(index, v)

    def read(self, layer: int, rows: slice | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the first ``length`` slots of ``rows``: ``[B, H, length, D]``."""
        return self.k[layer, rows, :, :length], self.v[layer, rows, :, :length]

    def commit(self, row: int, kept: Sequence[int]) -> None:
        """Keep the new tokens at block offsets ``kept`` (increasing) and advance the row.

        Offsets only move down (``kept[i] >= i``), so gathering before writing is safe.
        """
        start = int(self.lengths[row])
        if list(kept) != list(range(len(kept))):
            src = torch.tensor(kept, dtype=torch.long) + start
            dst = slice(start, start + len(kept))
            self.k[:, row, :, dst] = self.k[:, row, :, src]
            self.v[:, row, :, dst] = self.v[:, row, :, src]
        self.lengths[row] = start + len(kept)

    def reset(self, row: int) -> None:
        self.lengths[row] = 0
