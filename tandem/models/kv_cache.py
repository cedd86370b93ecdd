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

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new ``[B, H, T, D]`` keys/values right after each row's cached prefix."""
        batch, heads, steps, _ = k.shape
        slots = self.lengths[rows][:, None] + torch.arange(steps)  # [B, T]
        b_idx = rows[:, None, None]
        h_idx = torch.arange(heads)[None, :, None]
        s_idx = slots[:, None, :]
        self.k[layer].index_put_((b_idx, h_idx, s_idx), k)
        self.v[layer].index_put_((b_idx, h_idx, s_idx), v)

    def read(self, layer: int, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the first ``length`` slots of ``rows``: ``[B, H, length, D]``."""
        first = int(rows[0])
        if torch.equal(rows, torch.arange(first, first + rows.numel())):
            picked = slice(first, first + rows.numel())
            return self.k[layer, picked, :, :length], self.v[layer, picked, :, :length]
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
