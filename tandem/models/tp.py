"""Tensor parallelism as a transformation of a loaded model (gpt-fast style).

Attention heads and MLP channels are split across the ranks of a process group: q/k/v and
gate/up are column-parallel (each rank keeps its own heads / channels), the output projections
are row-parallel and all-reduce their partial sums. Embedding, norms and the LM head stay
replicated, so every rank ends with the same logits and can run the same engine loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from tandem.models.config import ModelConfig
from tandem.models.decoder import Linear, Transformer


def apply_tp(model: Transformer, group: dist.ProcessGroup) -> Transformer:
    """Shard ``model`` in place for this rank of ``group``; returns it for chaining.

    Ranks own whole KV groups (a KV head with the query heads that share it), as evenly as the
    counts allow: SmolLM2's 3 KV heads split 2 + 1 at tp=2, so any tp up to the KV-head count works.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cfg = model.config
    check_tp_size(cfg, world)
    kv_heads = _my_range(cfg.num_kv_heads, rank, world)
    group_size = cfg.num_heads // cfg.num_kv_heads
    q_heads = range(kv_heads.start * group_size, kv_heads.stop * group_size)
    channels = _my_range(cfg.intermediate_size, rank, world)
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        d = attn.head_dim
        q_dim, kv_dim = attn.num_heads * d, attn.num_kv_heads * d
        rows = [
            _scaled(q_heads, d),
            _shifted(_scaled(kv_heads, d), q_dim),
            _shifted(_scaled(kv_heads, d), q_dim + kv_dim),
        ]
        attn.wqkv = _column_parallel(attn.wqkv, rows)
        attn.wo = _row_parallel(attn.wo, _scaled(q_heads, d), group)
        attn.num_heads, attn.num_kv_heads = len(q_heads), len(kv_heads)
        mlp.w13 = _column_parallel(mlp.w13, [channels, _shifted(channels, mlp.intermediate)])
        mlp.w2 = _row_parallel(mlp.w2, channels, group)
        mlp.intermediate = len(channels)
    # The local shard's shape: what this rank's KV cache needs.
    model.config = replace(cfg, num_heads=len(q_heads), num_kv_heads=len(kv_heads), intermediate_size=len(channels))
    return model


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


def _column_parallel(linear: Linear, rows: list[range]) -> Linear:
    """Keep the listed output rows (this rank's part of q, k, v or of gate, up)."""
    index = torch.tensor([i for r in rows for i in r], device=linear.weight.device)
    weight = linear.weight.data[index].contiguous()
    out = Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.data[index].contiguous(), requires_grad=False)
    return out


def _row_parallel(linear: Linear, cols: range, group: dist.ProcessGroup) -> Linear:
    """Keep this rank's input columns; the partial outputs are summed across the group."""
    if linear.bias is not None:
        raise ValueError("row-parallel layers with a bias are not supported")
    weight = linear.weight.data[:, cols.start : cols.stop].contiguous()
    out = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    out.register_forward_hook(lambda _module, _inputs, output: dist.all_reduce(output, group=group))
    return out
