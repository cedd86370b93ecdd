"""A preallocated KV cache whose rows are sequences; a forward pass appends a token tree after a
row's cached prefix, and :meth:`KVCache.commit` keeps only the accepted path."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.devices import host_tensor


class KVCache:
    """``k``/``v``: ``[layers, rows, kv_heads, capacity, head_dim]`` on the model's device;
    ``lengths[r]`` (host metadata) tokens of row ``r`` are verified and cached. Slots past
    ``lengths[r]`` hold the tree being verified."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, rows, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * rows
        self.capacity = capacity
        self.device = torch.device(device)

    @property
    def num_rows(self) -> int:
        return self.k.shape[1]

    def starts(self, rows: Sequence[int]) -> torch.Tensor:
        """Cached lengths of ``rows`` as a ``[B]`` tensor on the device."""
        return host_tensor([self.lengths[r] for r in rows], torch.long, self.device)

    def block_index(self, rows: Sequence[int], starts: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
        """Index for writing ``steps`` new tokens right after each row's cached prefix (``starts``);
        computed once per forward pass and reused by every layer."""
        slots = starts[:, None] + torch.arange(steps, device=self.device)  # [B, T]
        heads = torch.arange(self.k.shape[2], device=self.device)[None, :, None]
        return host_tensor(list(rows), torch.long, self.device)[:, None, None], heads, slots[:, None, :]

    def row_selector(self, rows: Sequence[int], row_ids: torch.Tensor) -> slice | torch.Tensor:
        """A slice when ``rows`` are consecutive, so reads are views instead of gathers; else
        ``row_ids``, the same rows already on the device (from :meth:`block_index`)."""
        if list(rows) == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return row_ids

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
        start = self.lengths[row]
        if list(kept) != list(range(len(kept))):
            src = host_tensor([start + i for i in kept], torch.long, self.device)
            dst = slice(start, start + len(kept))
            self.k[:, row, :, dst] = self.k[:, row, :, src]
            self.v[:, row, :, dst] = self.v[:, row, :, src]
        self.lengths[row] = start + len(kept)

    def reset(self, row: int) -> None:
        self.lengths[row] = 0
