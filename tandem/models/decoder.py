"""A compact decoder for Llama/SmolLM, Qwen2, Qwen3 and Gemma 3 (gpt-fast style).

One forward pass takes, per cache row, a block of new tokens (a prompt, or a token tree rooted
at the anchor) together with its tree mask and depths; every new token attends to the row's
cached prefix and to its own ancestors in the block, at position ``prefix length + depth``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.devices import host_tensor
from tandem.kernels.cpu import DTYPES as KERNEL_DTYPES
from tandem.kernels.cpu import ExactKernels, StepPlan
from tandem.models.config import ModelConfig
from tandem.models.kv_cache import KVCache
from tandem.models.rope import RopeParams, inverse_frequencies
from tandem.tree import ancestor_mask, tree_depths


class RMSNorm(nn.Module):
    """Normalises in float32; Gemma scales by ``1 + weight`` (``offset``), others by ``weight``."""

    kernels: ExactKernels | None = None  # set by Transformer.use_exact_kernels

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.weight, self.eps, self.offset)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight.float())).type_as(x)
        return self.weight * normed.type_as(x)


class Rotary(nn.Module):
    """Precomputed RoPE tables (non-interleaved halves, as in Hugging Face checkpoints), with
    the scaling scheme folded in (:mod:`tandem.models.rope`)."""

    def __init__(self, head_dim: int, rope: RopeParams, max_position: int) -> None:
        super().__init__()
        inv_freq, scale = inverse_frequencies(rope, head_dim)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", angles.cos() * scale, persistent=False)
        self.register_buffer("sin", angles.sin() * scale, persistent=False)

    def tables(
        self, positions: torch.Tensor, dtype: torch.dtype, flat: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions`` ``[B, T]``, shaped ``[B, 1, T, D]`` (``[B, T, D]`` if ``flat``)."""
        cos, sin = self.cos[positions].to(dtype), self.sin[positions].to(dtype)
        return (cos, sin) if flat else (cos.unsqueeze(1), sin.unsqueeze(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Linear(nn.Linear):
    """``nn.Linear`` that runs the batch-invariant CPU kernel once its weight is packed
    (:meth:`Transformer.use_exact_kernels`); forward hooks (tp's all-reduce) still run."""

    kernels: ExactKernels | None = None
    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.kernels is None:
            out = super().forward(x)
            return out if out_dtype is None else out.to(out_dtype)
        return self.kernels.linear(x, self.packed, self.out_features, self.bias, out_dtype or x.dtype)

    def pack(self, kernels: ExactKernels) -> None:
        self.kernels, self.packed = kernels, kernels.pack(self.weight)


@dataclass
class PassContext:
    """What every layer of one forward pass shares: computed once, not per layer."""

    cache: KVCache
    starts: torch.Tensor  # [B] cached lengths: the new tokens' first position
    tables: torch.Tensor  # [B, n] the rows' blocks, through the longest row's new tokens
    tree: torch.Tensor  # [B, T, T] new token i sees new token j; every row sees its whole prefix
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin: [B, 1, T, D] in the model's dtype; [B, T, D] float32 exact
    local_tree: torch.Tensor | None = None  # sliding-window layers: the tree within the window
    local_first: torch.Tensor | None = None  # [B, T] sliding-window layers: each query's first visible position
    local_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    # the stock path only: it gathers the rows' blocks and attends through a dense mask
    write_index: tuple[torch.Tensor, ...] = ()
    length: int = 0  # positions gathered
    mask: torch.Tensor | None = None  # [B, T, length]
    local_mask: torch.Tensor | None = None
    fresh: bool = False  # no row has a prefix and the tree is causal: SDPA's causal kernels need no mask


class Attention(nn.Module):
    kernels: ExactKernels | None = None

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wqkv = Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.attention_bias)
        self.wo = Linear(q_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, ctx: PassContext, sliding: bool) -> torch.Tensor:
        batch, steps, _ = x.shape
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(batch, steps, self.num_heads, self.head_dim)
        k = k.view(batch, steps, self.num_kv_heads, self.head_dim)
        v = v.view(batch, steps, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = ctx.local_rope if sliding and ctx.local_rope is not None else ctx.rope
        if self.kernels is not None:  # RoPE, the cache write and attention in one call
            tree, first = (
                (ctx.local_tree, ctx.local_first) if sliding and ctx.local_tree is not None else (ctx.tree, None)
            )
            keys, values = ctx.cache.k[self.layer], ctx.cache.v[self.layer]
            out = self.kernels.rope_attention(
                q, k, v, rope, ctx.starts, keys, values, ctx.tables, tree, first, self.scale
            )
            return self.wo(out)
        cos, sin = rope
        q, k, v = (
            apply_rotary(q.transpose(1, 2), cos, sin),
            apply_rotary(k.transpose(1, 2), cos, sin),
            v.transpose(1, 2),
        )
        ctx.cache.write(self.layer, ctx.write_index, k, v)
        gqa = self.num_heads != self.num_kv_heads
        if ctx.fresh:  # a prompt's first part: its own keys, causal (flash-eligible on CUDA)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            mask = ctx.local_mask if sliding and ctx.local_mask is not None else ctx.mask
            keys, values = ctx.cache.read(self.layer, ctx.tables, ctx.length)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask.unsqueeze(1), scale=self.scale, enable_gqa=gqa
            )
        return self.wo(out.transpose(1, 2).reshape(batch, steps, q_dim))


class FeedForward(nn.Module):
    kernels: ExactKernels | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.w13 = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate, up
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.hidden_act != "silu"
        self.act = (lambda t: F.gelu(t, approximate="tanh")) if self.gelu else F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.w2(self.kernels.act_mul(self.w13(x), self.gelu))
        gate, up = self.w13(x).split(self.intermediate, dim=-1)
        return self.w2(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.sliding = cfg.is_sliding(layer)
        self.attn = Attention(cfg, layer)
        self.mlp = FeedForward(cfg)
        self.attn_norm = RMSNorm(cfg.hidden_size, eps, off)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps, off) if cfg.sandwich_norm else None
        self.post_mlp_norm = RMSNorm(cfg.hidden_size, eps, off) if cfg.sandwich_norm else None

    def exact_weights(self) -> dict[str, torch.Tensor | None]:
        """The tensors a :class:`StepPlan` reads for this layer (after it is packed)."""

        def weight(norm: RMSNorm | None) -> torch.Tensor | None:
            return None if norm is None else norm.weight

        attn, mlp = self.attn, self.mlp
        return {
            "attn_norm": self.attn_norm.weight,
            "mlp_norm": self.mlp_norm.weight,
            "post_attn_norm": weight(self.post_attn_norm),
            "post_mlp_norm": weight(self.post_mlp_norm),
            "q_norm": weight(attn.q_norm),
            "k_norm": weight(attn.k_norm),
            "wqkv": attn.wqkv.packed,
            "bqkv": attn.wqkv.bias,
            "wo": attn.wo.packed,
            "w13": mlp.w13.packed,
            "w2": mlp.w2.packed,
        }

    def forward(self, x: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), ctx, self.sliding)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.step_plan: StepPlan | None = None  # every layer in one exact-kernel call (use_exact_kernels)
        self.build_rotary()

    def build_rotary(self) -> None:
        """(Re)compute the RoPE tables; needed after building the model on the meta device."""
        cfg = self.config
        self.rotary = Rotary(cfg.head_dim, cfg.rope, cfg.max_position)
        self.local_rotary = Rotary(cfg.head_dim, cfg.local_rope, cfg.max_position) if cfg.local_rope else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def exact(self) -> bool:
        """Whether passes run on the batch-invariant kernels (:meth:`use_exact_kernels`)."""
        return self.lm_head.kernels is not None

    @property
    def kernels(self) -> str:
        """Which kernels run its passes: ``stock``, or the exact ones' label (ISA and build)."""
        return self.lm_head.kernels.label if self.lm_head.kernels is not None else "stock"

    def exact_unsupported(self) -> str | None:
        """Why this model cannot run on the exact kernels (None: it can)."""
        if self.dtype not in KERNEL_DTYPES or self.device.type != "cpu":
            dtype = str(self.dtype).removeprefix("torch.")
            return f"the exact kernels need a bf16 or float32 model on the CPU (this one is {dtype} on {self.device})"
        if self.config.head_dim % 8:
            return f"the exact kernels need a head size divisible by 8, not {self.config.head_dim}"
        return None

    def use_exact_kernels(self, kernels: ExactKernels) -> None:
        """Run every op that decides a token (linears, attention, norms, activation, an fp32 LM
        head) on ``kernels``, so a row's logits no longer depend on what shares its pass. bf16 or
        float32 on the CPU; call after any tp sharding (it packs the local weights)."""
        reason = self.exact_unsupported()
        if reason:
            raise ValueError(reason)
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack(kernels)
            elif isinstance(module, RMSNorm | Attention | FeedForward):
                module.kernels = kernels
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.modules()):
            return  # tp's all-reduce runs between the kernels: the layers go one module at a time
        cfg = self.config
        sizes = {
            "hidden": cfg.hidden_size,
            "heads": self.layers[0].attn.num_heads,  # this rank's, after any sharding
            "kv_heads": self.layers[0].attn.num_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate": self.layers[0].mlp.intermediate,
        }
        self.step_plan = StepPlan(
            kernels,
            [block.exact_weights() for block in self.layers],
            [block.sliding for block in self.layers],
            sizes,
            cfg.rms_norm_eps,
            cfg.norm_offset,
            self.layers[0].attn.scale,
            cfg.hidden_act != "silu",
        )

    def new_cache(self, rows: int, capacity: int, blocks: int | None = None, block_size: int = 16) -> KVCache:
        """A paged cache of ``rows`` sequences of up to ``capacity`` tokens in ``blocks`` blocks
        (None: enough for every row to fill its capacity)."""
        cfg = self.config
        capacity = min(capacity, cfg.max_position)
        kv_heads = self.layers[0].attn.num_kv_heads  # this rank's, after any sharding
        return KVCache(
            cfg.num_layers, rows, kv_heads, capacity, cfg.head_dim, self.dtype, self.device, blocks, block_size,
            zeroed=not self.exact,
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def block_logits(
        self, tokens: Sequence[int], cache: KVCache, row: int = 0, parents: Sequence[int] | None = None
    ) -> torch.Tensor:
        """``[T, V]`` logits of one block after ``row``'s cached prefix: a chain, or the tree given
        by ``parents``; nothing is committed. For checks and tools: the engine batches its own."""
        parent_ids = list(range(-1, len(tokens) - 1)) if parents is None else list(parents)
        depths = host_tensor([tree_depths(parent_ids)], torch.long, self.device)
        mask = ancestor_mask(parent_ids, self.device)[None]
        return self(host_tensor([list(tokens)], torch.long, self.device), depths, mask, cache, [row])[0]

    def forward(
        self,
        tokens: torch.Tensor,
        depths: torch.Tensor,
        tree_mask: torch.Tensor,
        cache: KVCache,
        rows: Sequence[int],
        logit_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``tokens`` ``[B, T]`` after each row's cached prefix and return float32 logits.

        ``tree_mask[b, i, j]``: new token ``i`` sees new token ``j`` (itself and its ancestors);
        ``depths[b, i]``: its depth below the row's prefix. ``logit_index`` ``[B, K]`` picks the
        positions that need logits (e.g. the last prompt token), saving LM-head work.
        """
        return self.forward_features(tokens, depths, tree_mask, cache, rows, (), logit_index)[0]

    @torch.inference_mode()
    def forward_features(
        self,
        tokens: torch.Tensor,
        depths: torch.Tensor,
        tree_mask: torch.Tensor,
        cache: KVCache,
        rows: Sequence[int],
        feature_layers: Sequence[int],
        logit_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward`, plus the hidden states after each of ``feature_layers`` (0-based),
        concatenated: ``[B, T, len(feature_layers) * hidden]``, the drafters' view of the target."""
        x = self.embed(tokens)
        if self.config.embedding_scale:
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype, device=x.device)
        x, features = self.run_layers(x, depths, tree_mask, cache, rows, feature_layers)
        if logit_index is not None:
            x = x.gather(1, logit_index[:, :, None].expand(-1, -1, x.shape[-1]))
        return self.logits(x), features

    @torch.inference_mode()
    def run_layers(
        self,
        x: torch.Tensor,
        depths: torch.Tensor,
        tree_mask: torch.Tensor,
        cache: KVCache,
        rows: Sequence[int],
        feature_layers: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inputs ``x`` ``[B, T, hidden]`` through every layer after each row's cached prefix (as
        :meth:`forward`: new token ``i`` at position ``prefix length + depths[b, i]``, seeing what
        ``tree_mask`` shows): the last layer's hidden states, before the final norm, and the
        features of ``feature_layers``. A drafter's backbone runs its blocks through here too. The
        one-call path writes the layers' output over ``x`` (a contiguous one): pass a fresh tensor."""
        cfg = self.config
        steps = x.shape[1]
        cache.reserve({r: cache.lengths[r] + steps for r in rows})  # NoRoom, before any work
        length = max(cache.lengths[r] for r in rows) + steps
        starts = cache.starts(rows)
        positions = starts[:, None] + depths
        rope_dtype = torch.float32 if self.exact else self.dtype
        ctx = PassContext(
            cache=cache,
            starts=starts,
            tables=cache.block_tables(rows, length),
            tree=tree_mask,
            rope=self.rotary.tables(positions, rope_dtype, self.exact),
        )
        window = cfg.sliding_window
        if window is not None:
            ctx.local_tree = tree_mask & ((depths[:, :, None] - depths[:, None, :]) < window)
            ctx.local_first = (positions - window + 1).clamp(min=0).contiguous()
        if self.local_rotary is not None:
            ctx.local_rope = self.local_rotary.tables(positions, rope_dtype, self.exact)
        if not self.exact:
            self._stock_context(ctx, rows, depths, length)
        kept: dict[int, torch.Tensor] = {}
        if self.step_plan is not None:  # the same kernels, without Python between them
            x = x.contiguous()
            kept = {i: torch.empty_like(x) for i in feature_layers}
            self.lm_head.kernels.layers(
                self.step_plan, x, ctx.rope, ctx.local_rope, ctx.tree, ctx.local_tree, ctx.local_first, starts,
                ctx.tables, cache.k, cache.v, [kept.get(i) for i in range(cfg.num_layers)],
            )  # fmt: skip
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, ctx)
                if i in feature_layers:
                    kept[i] = x
        return x, torch.cat([kept[i] for i in feature_layers], -1) if feature_layers else None

    def _stock_context(self, ctx: PassContext, rows: Sequence[int], depths: torch.Tensor, length: int) -> None:
        """What the stock path adds: where its new keys go, and the dense mask over the gathered
        blocks, unless the pass is a prompt's first part (SDPA's own causal mask then)."""
        cache, steps, window = ctx.cache, depths.shape[1], self.config.sliding_window
        ctx.write_index = cache.write_index(ctx.tables, ctx.starts, steps)
        if all(cache.lengths[r] == 0 for r in rows) and (window is None or steps <= window):
            ctx.fresh = bool(torch.equal(ctx.tree, torch.ones_like(ctx.tree).tril()))
        if ctx.fresh:
            return
        ctx.length = length
        ctx.mask, key_positions = _attention_mask(ctx.starts, ctx.tree, depths, length)
        if window is not None:
            distance = (ctx.starts[:, None] + depths)[:, :, None] - key_positions[:, None, :]
            ctx.local_mask = ctx.mask & (distance < window)

    def logits(self, hidden: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits of last-layer hidden states (final norm, LM head, softcap); ``head``:
        only these rows of the LM head (a drafter's reduced vocabulary)."""
        normed = self.norm(hidden)
        logits = self.lm_head(normed, torch.float32) if head is None else (normed @ head.T).float()
        if self.config.final_logit_softcap:
            cap = self.config.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits


def _attention_mask(
    starts: torch.Tensor, tree_mask: torch.Tensor, depths: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visibility ``[B, T, length]`` over cache slots, and each slot's position ``[B, length]``."""
    batch, steps = depths.shape
    slots = torch.arange(length, device=starts.device)
    mask = (slots[None, None, :] < starts[:, None, None]).expand(batch, steps, length).clone()
    new_slots = starts[:, None] + torch.arange(steps, device=starts.device)  # [B, T]
    mask.scatter_(2, new_slots[:, None, :].expand(batch, steps, steps), tree_mask)
    key_positions = slots.expand(batch, length).clone()
    key_positions.scatter_(1, new_slots, starts[:, None] + depths)
    return mask, key_positions
