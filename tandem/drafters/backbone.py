"""The block drafters' (DFlash, DSpark) layers at inference time, run as a decoder over a paged
KV cache, the way the target runs.

A sequence's context keys and values (projected from the target's features) are written into the
cache once, as they arrive. Each round's block of ``γ`` slots then runs every layer in one pass
through :meth:`Transformer.run_layers`: one native call on the exact kernels, as the target's
step, instead of a module call per linear and a copy of the whole context every round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.devices import host_tensor
from tandem.drafters.neural import KV, DraftConfig, DraftLayer
from tandem.errors import NoRoom
from tandem.kernels.cpu import ExactKernels
from tandem.models.config import ModelConfig
from tandem.models.decoder import Transformer
from tandem.models.kv_cache import KVCache

BLOCK = 16  # tokens per cache block
FIRST_BLOCKS = 64  # the pool's first size; it doubles when a row needs more


def decoder_config(cfg: DraftConfig) -> ModelConfig:
    """The drafter's layers as a decoder's: the same attention shape, norms and RoPE (the
    vocabulary is not used: the drafter embeds and reads out by itself)."""
    return ModelConfig(
        family="qwen3" if cfg.qk_norm else "llama",
        vocab_size=1,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position=cfg.max_position,
        rms_norm_eps=cfg.rms_norm_eps,
        rope=cfg.rope,
        qk_norm=cfg.qk_norm,
    )


class BlockBackbone:
    """A copy of a block drafter's layers as a :class:`Transformer` (q/k/v and gate/up fused, as
    the target's), with a paged cache holding one row per sequence: its context's keys and values
    at cache slots ``0 .. n - 1``. Rebuild it when the drafter's weights change (training probes
    build a new drafter each time)."""

    def __init__(self, layers: Sequence[DraftLayer], cfg: DraftConfig, kernels: ExactKernels | None) -> None:
        weight = layers[0].wq.weight
        with torch.device("meta"):  # no random initialisation: every weight is given below
            self.decoder = Transformer(decoder_config(cfg))
        unused = weight.new_zeros(1, cfg.hidden_size)  # the drafter embeds and reads out by itself
        state = {"embed.weight": unused, "lm_head.weight": unused, "norm.weight": weight.new_ones(cfg.hidden_size)}
        for i, layer in enumerate(layers):
            pieces = {
                "attn_norm": layer.attn_norm.weight,
                "mlp_norm": layer.mlp_norm.weight,
                "attn.wqkv": torch.cat([layer.wq.weight, layer.wk.weight, layer.wv.weight]),
                "attn.wo": layer.wo.weight,
                "mlp.w13": torch.cat([layer.w1.weight, layer.w3.weight]),
                "mlp.w2": layer.w2.weight,
            }
            if cfg.qk_norm:
                pieces |= {"attn.q_norm": layer.q_norm.weight, "attn.k_norm": layer.k_norm.weight}
            state |= {f"layers.{i}.{name}.weight": t.detach().clone() for name, t in pieces.items()}
        self.decoder.load_state_dict(state, assign=True)
        with torch.device(weight.device):
            self.decoder.build_rotary()
        self.decoder.to(weight.dtype)
        self.decoder.requires_grad_(False)
        if kernels is not None:
            self.decoder.use_exact_kernels(kernels)
        self.cache: KVCache = self.decoder.new_cache(1, cfg.max_position, FIRST_BLOCKS, BLOCK)

    def open(self) -> int:
        """A new, empty row (twice the rows when all are taken)."""
        cache = self.cache
        if len(cache.taken) == cache.num_rows:
            cache.grow(2 * cache.num_rows, cache.num_blocks, cache.capacity)
        return cache.take_row()

    def close(self, row: int) -> None:
        self.cache.release(row)

    def restart(self, row: int) -> None:
        """Forget the row's context: its next positions start a new one at slot 0."""
        self.cache.clear(row)

    def append(self, row: int, context: Sequence[KV]) -> None:
        """Keys and values ``[1, kv_heads, n, head_dim]`` per layer, already rotated to their
        positions, stored after the row's context."""
        cache, steps = self.cache, context[0][0].shape[2]
        start = cache.lengths[row]
        self._room({row: start + steps})
        tables = cache.block_tables([row], start + steps)
        index = cache.write_index(tables, cache.starts([row]), steps)
        for layer, (k, v) in enumerate(context):
            cache.write(layer, index, k, v)
        cache.commit(row, range(steps))

    def run(self, x: torch.Tensor, rows: Sequence[int], offsets: Sequence[int]) -> torch.Tensor:
        """Blocks ``x`` ``[B, γ, hidden]`` through every layer after each row's context, attention
        bidirectional inside a block; block slot ``k`` of row ``b`` sits at position
        ``offsets[b] + length + k`` (``offsets``: where the row's slot 0 is in the sequence).
        Returns the last layer's hidden states; the block's own keys stay past the context, where
        the next :meth:`append` writes over them."""
        batch, steps, _ = x.shape
        self._room({r: self.cache.lengths[r] + steps for r in rows})
        depths = host_tensor(list(offsets), torch.long, x.device)[:, None] + torch.arange(steps, device=x.device)
        tree = torch.ones(batch, steps, steps, dtype=torch.bool, device=x.device)
        return self.decoder.run_layers(x, depths, tree, self.cache, rows)[0]

    def _room(self, wants: dict[int, int]) -> None:
        """:meth:`KVCache.reserve`, the pool doubled as often as it takes."""
        cache = self.cache
        while True:
            try:
                return cache.reserve(wants)
            except NoRoom:
                cache.grow(cache.num_rows, 2 * cache.num_blocks, cache.capacity)
