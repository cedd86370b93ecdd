"""Tensor parallelism (gpt-fast style), decided before any weight is read.

Attention heads and MLP channels are split across the ranks of a process group: q/k/v and
gate/up are column-parallel (each rank keeps its own heads / channels), the output projections
are row-parallel and all-reduce their partial sums. A rank builds its shard's modules on the
meta device and reads only its slices from the checkpoint (:mod:`tandem.models.loading`).
Embedding and LM head are split by vocabulary rows: the lookup is masked and summed across the
group, the logits are gathered once per pass, so every rank ends with the same full logits and
can run the same engine loop. Norms are replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tandem.models.config import ModelConfig
from tandem.models.decoder import Linear, Transformer


@dataclass(frozen=True)
class Shard:
    """What one rank of ``world`` holds: whole KV groups (a KV head with the query heads that
    share it), a share of the MLP channels and one of the vocabulary (embedding and LM-head
    rows), as evenly as the counts allow (SmolLM2's 3 KV heads split 2 + 1 at tp=2, so any tp up
    to the KV-head count works)."""

    rank: int
    world: int
    q_heads: range
    kv_heads: range
    channels: range
    vocab: range

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, world: int) -> Shard:
        check_tp_size(cfg, world)
        kv_heads = _my_range(cfg.num_kv_heads, rank, world)
        group_size = cfg.num_heads // cfg.num_kv_heads
        q_heads = range(kv_heads.start * group_size, kv_heads.stop * group_size)
        channels, vocab = (_my_range(n, rank, world) for n in (cfg.intermediate_size, cfg.vocab_size))
        return cls(rank, world, q_heads, kv_heads, channels, vocab)

    def rows(self, cfg: ModelConfig, what: str) -> range:
        """This rank's rows of q/k/v (``"q"``, ``"kv"``: per projection) or of gate/up
        (``"mlp"``), which are also its input columns of o and down; of the embedding and LM
        head (``"vocab"``)."""
        if what == "mlp":
            return self.channels
        if what == "vocab":
            return self.vocab
        return _scaled(self.q_heads if what == "q" else self.kv_heads, cfg.head_dim)


def shard_layers(model: Transformer, shard: Shard, group: dist.ProcessGroup) -> Transformer:
    """Make ``model`` (built on the meta device, before its weights are read) this rank's shard:
    q/k/v and gate/up column-parallel, o and down row-parallel with an all-reduce of their
    partial sums; embedding and LM head vocabulary-parallel (a masked lookup summed across the
    group; logits gathered once per pass). Then :func:`tandem.models.loading.load_model` reads
    just these slices."""
    cfg = model.config
    model.embed = _VocabShardEmbedding(shard.vocab, cfg.hidden_size, group)
    model.lm_head = _meta_linear(cfg.hidden_size, len(shard.vocab), False)
    sizes = [len(_my_range(cfg.vocab_size, r, shard.world)) for r in range(shard.world)]
    model.lm_head.register_forward_hook(lambda _module, _inputs, output: _gather_last(output, sizes, group))
    q_rows, kv_rows, channels = (shard.rows(cfg, what) for what in ("q", "kv", "mlp"))
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        attn.wqkv = _meta_linear(cfg.hidden_size, len(q_rows) + 2 * len(kv_rows), attn.wqkv.bias is not None)
        attn.wo = _row_parallel(len(q_rows), cfg.hidden_size, group)
        attn.num_heads, attn.num_kv_heads = len(shard.q_heads), len(shard.kv_heads)
        mlp.w13 = _meta_linear(cfg.hidden_size, 2 * len(channels), False)
        mlp.w2 = _row_parallel(len(channels), cfg.hidden_size, group)
        mlp.intermediate = len(channels)
    # The local shard's shape: what this rank's KV cache needs.
    model.config = replace(
        cfg, num_heads=len(shard.q_heads), num_kv_heads=len(shard.kv_heads), intermediate_size=len(channels)
    )
    return model


class _VocabShardEmbedding(nn.Embedding):
    """This rank's rows ``vocab`` of the embedding: ids elsewhere look up zeros, and the sum
    across the group is every id's own row (one rank adds it, the others add zeros: exact)."""

    def __init__(self, vocab: range, hidden: int, group: dist.ProcessGroup) -> None:
        super().__init__(len(vocab), hidden, device="meta")
        self.start, self.group = vocab.start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        dist.all_reduce(out, group=self.group)
        return out


def _gather_last(part: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's ``part`` joined along the last dimension (sizes may differ by one: each is
    padded to the largest for the all-gather, then cut back)."""
    widest = max(sizes)
    padded = F.pad(part, (0, widest - part.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def rank0_verdicts(group: dist.ProcessGroup) -> Callable[[list], list]:
    """What a :class:`~tandem.verifier.Verifier` of this group commits: rank 0's verdicts, sent to
    every rank. Ranks compute the same logits in exact arithmetic, but a near-tie or a rank's own
    sampling could still set them apart; one broadcast per round makes them commit the same path."""
    source = dist.get_global_rank(group, 0)

    def agree(verdicts: list) -> list:
        box = [verdicts]
        dist.broadcast_object_list(box, src=source, group=group)
        return box[0]

    return agree


def check_tp_size(cfg: ModelConfig, world: int) -> None:
    """Every rank needs at least one KV head (and its query heads)."""
    if not 1 <= world <= cfg.num_kv_heads:
        raise ValueError(f"tp={world} is not possible: the model has {cfg.num_kv_heads} KV heads")


def _my_range(n: int, rank: int, world: int) -> range:
    """This rank's share of ``n`` items: contiguous, sizes differing by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _scaled(r: range, factor: int) -> range:
    return range(r.start * factor, r.stop * factor)


def _shifted(r: range, offset: int) -> range:
    return range(r.start + offset, r.stop + offset)


def _meta_linear(inputs: int, outputs: int, bias: bool) -> Linear:
    return Linear(inputs, outputs, bias=bias, device="meta")


def _row_parallel(inputs: int, outputs: int, group: dist.ProcessGroup) -> Linear:
    """This rank's input columns; the partial outputs are summed across the group (o and down
    have no bias, which would be added ``world`` times)."""
    out = _meta_linear(inputs, outputs, False)
    out.register_forward_hook(lambda _module, _inputs, output: dist.all_reduce(output, group=group))
    return out
