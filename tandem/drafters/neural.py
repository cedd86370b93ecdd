"""What the trained drafters (EAGLE-3, DFlash, DSpark) share: their config, the frozen pieces they
borrow from the target (embedding, LM-head rows of a reduced draft vocabulary), one attention+MLP
layer that can attend to extra keys/values, save/load as a Hugging Face style folder, and the
:class:`NeuralDrafter` adapter that keeps per-sequence state behind the :class:`Drafter` interface.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tandem.devices import host_tensor, to_host
from tandem.drafters.base import Drafter, DraftRequest
from tandem.errors import ModelLoadError
from tandem.kernels.cpu import ExactKernels
from tandem.models.decoder import Linear, RMSNorm, Rotary, Transformer, apply_rotary
from tandem.models.rope import RopeParams
from tandem.sampling import SamplingParams, round_seed, target_probs
from tandem.tree import TokenTree, chain
from tandem.tree_search import Growth, TreeShape, greedy_trees, sampled_trees

ALGORITHMS = ("eagle3", "dflash", "dspark")
# How target features become the drafter's hidden size: RMSNorm over them then fc (Tandem's own),
# fc then RMSNorm (DFlash, DSpark), fc alone (EAGLE-3, which norms inside its layer).
FUSIONS = ("norm_fc", "fc_norm", "fc")
log = logging.getLogger(__name__)
KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [B, kv_heads, T, head_dim]
# (several sequences' growing trees, each one's frontier node ids at one depth) -> draft-vocabulary
# logits of their children, the frontiers' rows one after another, and per frontier node the
# confidence that its best child survives (None: no confidence head)
ChildLogitsMany = Callable[[list[Growth], list[list[int]]], tuple[torch.Tensor, torch.Tensor | None]]


class Pick(NamedTuple):
    """One drafted token, all on the drafter's device: its target id (0-dim), the full-vocabulary
    ``q`` it was drawn from (``None`` for a greedy target: a point mass), and the highest
    probability of that distribution (known before the draw: the drafter's own estimate that the
    position survives). :meth:`NeuralDrafter.chain_of` brings a chain's picks back at once."""

    token: torch.Tensor
    q: torch.Tensor | None
    top: torch.Tensor


def cat_kv(old: KV, new: KV) -> KV:
    """Keys/values of more positions appended along the sequence axis."""
    return torch.cat([old[0], new[0]], 2), torch.cat([old[1], new[1]], 2)


@dataclass
class DraftConfig:
    """Everything needed to rebuild a drafter next to its target; saved as ``config.json``."""

    algo: str
    target: str  # the target model it was trained for (name or path)
    target_vocab_size: int
    feature_layers: list[int]  # target layers whose hidden states are fused
    hidden_size: int  # equals the target's: embedding and LM head are shared
    num_layers: int = 1
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    block_size: int = 8  # γ: draft tokens per round (dflash/dspark block; eagle3 chain depth)
    draft_vocab: int = 8192  # size of the reduced draft vocabulary
    markov_rank: int = 64  # dspark only
    # dflash/dspark: add the fused features of the position before the anchor to every block slot
    # (False in drafters saved before it existed: they found them by attention only)
    anchor_features: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 8192
    # dspark: per-position temperature of the confidence logits (fitted after training)
    confidence_temperature: list[float] = field(default_factory=list)
    rope_scaling: dict[str, Any] | None = None  # a transformers rope dict (published drafters)
    # The training objective (read by tandem/train/losses.py, kept here so that a drafter says how it was trained)
    loss_decay: float = 0.0  # draft position k weighs exp(-k / loss_decay); 0: the block size (γ)
    distance: str = "tv"  # dspark: the distribution term, total variation or DeepSpec's L1 (= 2 TV)
    # Layout switches: the defaults are Tandem's own drafters; the published layouts (EAGLE-3,
    # z-lab DFlash, DeepSpec DSpark) set them on import (tandem/drafters/formats.py).
    fusion: str = "norm_fc"  # one of FUSIONS
    context_norm: bool = True  # dflash/dspark: context keys/values read through each layer's input norm
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (Qwen3 layers)
    mask_token_id: int | None = None  # dflash/dspark: block slots embed this target token, else a learned vector
    anchor_row: bool = True  # dflash/dspark: the anchor's row drafts; False (z-lab DFlash): block_size - 1 drafts
    split_input_norm: bool = False  # eagle3: embedding and hidden state normed apart, not as one vector
    own_lm_head: bool = False  # a draft LM head of its own (EAGLE-3) instead of the target's rows
    confidence_head: bool = True  # dspark
    confidence_with_markov: bool = True  # dspark: the confidence head reads W1[previous] beside the hidden state

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ValueError(f"unknown drafter algorithm {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.drafts < 1 or self.num_layers < 1 or not self.feature_layers:
            raise ValueError("a drafter needs at least one draft token a round, one layer and feature layers")
        if self.distance not in ("tv", "l1") or self.loss_decay < 0:
            raise ValueError(f"distance is 'tv' or 'l1' (not {self.distance!r}) and loss_decay >= 0")
        if self.split_input_norm and self.algo != "eagle3":
            raise ValueError("split_input_norm is EAGLE-3's: only its layer reads [embedding ; hidden]")

    @property
    def feature_size(self) -> int:
        return len(self.feature_layers) * self.hidden_size

    @property
    def decay(self) -> float:
        """The loss weights' decay constant: ``loss_decay``, or the block size by default."""
        return self.loss_decay or self.block_size

    @property
    def drafts(self) -> int:
        """Draft tokens a round at most: the block's rows, less the anchor's where it does not draft."""
        return self.block_size - (0 if self.anchor_row or self.algo == "eagle3" else 1)

    @property
    def rope(self) -> RopeParams:
        if self.rope_scaling is None:
            return RopeParams(self.rope_theta)
        return RopeParams.from_hf(self.rope_scaling, self.rope_theta, self.max_position)

    @classmethod
    def for_target(cls, algo: str, target: Transformer, target_name: str, **overrides: Any) -> DraftConfig:
        """Defaults sized from the target: low/mid/high feature layers and its attention shape."""
        t = target.config
        low, mid, high = min(2, t.num_layers - 1), t.num_layers // 2, max(0, t.num_layers - 3)
        fields: dict[str, Any] = dict(
            algo=algo,
            target=target_name,
            target_vocab_size=t.vocab_size,
            feature_layers=sorted({low, mid, high}),
            hidden_size=t.hidden_size,
            num_heads=t.num_heads,
            num_kv_heads=t.num_kv_heads,
            head_dim=t.head_dim,
            intermediate_size=t.intermediate_size,
            draft_vocab=min(8192, t.vocab_size),
            rms_norm_eps=t.rms_norm_eps,
            max_position=t.max_position,
            anchor_features=True,
        )
        fields.update(overrides)
        return cls(**fields)


def _attend(q: torch.Tensor, kv: KV) -> torch.Tensor:
    """One sequence's queries ``[1, heads, T, hd]`` over all of its keys and values."""
    visible = torch.ones(1, 1, q.shape[2], kv[0].shape[2], dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, *kv, attn_mask=visible, enable_gqa=True)


class SplitNorm(nn.Module):
    """RMSNorm of each half of ``[embedding ; hidden]`` with its own weight (EAGLE-3's
    ``input_layernorm`` and ``hidden_norm``) instead of one over the whole input."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.embed_norm = RMSNorm(dim, eps)
        self.hidden_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedded, hidden = x.chunk(2, -1)
        return torch.cat([self.embed_norm(embedded), self.hidden_norm(hidden)], -1)


class DraftLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP whose queries also attend to keys/values given from outside
    (the target's context features, or a drafter's cached prefix)."""

    def __init__(self, cfg: DraftConfig, input_size: int | None = None) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        inp = input_size or d
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.attn_norm = SplitNorm(d, cfg.rms_norm_eps) if cfg.split_input_norm else RMSNorm(inp, cfg.rms_norm_eps)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.wq = Linear(inp, cfg.num_heads * hd, bias=False)
        self.wk = Linear(inp, cfg.num_kv_heads * hd, bias=False)
        self.wv = Linear(inp, cfg.num_kv_heads * hd, bias=False)
        self.wo = Linear(cfg.num_heads * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.w1 = Linear(d, cfg.intermediate_size, bias=False)
        self.w3 = Linear(d, cfg.intermediate_size, bias=False)
        self.w2 = Linear(cfg.intermediate_size, d, bias=False)

    def kv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], norm: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, kv_heads, T, head_dim]`` of inputs ``x`` ``[B, T, input]``
        (read through the input norm unless ``norm`` is False, as DFlash reads its context)."""
        return self._kv(self.attn_norm(x) if norm else x, rope)

    def _kv(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._heads(self.wk(h), self.kv_heads, self.k_norm)
        return apply_rotary(k, *rope), self._heads(self.wv(h), self.kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        past: KV | list[KV] | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """``x`` ``[B, T, input]`` attends to ``past`` keys then its own (``mask`` ``[B, T, S + T]``).
        ``past`` may also be one cache per row, of its own length (sequences drafted together):
        the linears then run once for all rows and attention row by row, each row seeing all
        of its cache and all of ``x``'s row (``mask`` None), as one sequence alone would.

        Returns the new hidden states and this block's own keys/values (for a cache)."""
        h = self.attn_norm(x)
        q = apply_rotary(self._heads(self.wq(h), self.heads, self.q_norm), *rope)
        k, v = self._kv(h, rope)
        if isinstance(past, list):
            out = torch.cat(
                [_attend(q[i : i + 1], cat_kv(kv, (k[i : i + 1], v[i : i + 1]))) for i, kv in enumerate(past)]
            )
        else:
            keys, values = (k, v) if past is None else cat_kv(past, (k, v))
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.unsqueeze(1), enable_gqa=True)
        out = out.transpose(1, 2).flatten(2)
        x = (x if residual is None else residual) + self.wo(out)
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h)), (k, v)

    def _heads(self, x: torch.Tensor, n: int, norm: RMSNorm | None = None) -> torch.Tensor:
        x = x.unflatten(-1, (n, self.head_dim))
        return (x if norm is None else norm(x)).transpose(1, 2)


class DraftModel(nn.Module):
    """Base of the trained drafters: a feature fusion layer, RoPE, final norm, and the frozen
    embedding and draft-vocabulary LM head borrowed from the target (not saved with the drafter;
    with ``own_lm_head`` the LM head is the drafter's own, as EAGLE-3 checkpoints have it)."""

    algo: ClassVar[str]

    def __init__(self, cfg: DraftConfig, target: Transformer, vocab_map: torch.Tensor | None = None) -> None:
        super().__init__()
        if target.config.hidden_size != cfg.hidden_size or target.config.vocab_size != cfg.target_vocab_size:
            raise ModelLoadError(f"this {cfg.algo} drafter was trained for {cfg.target!r}, not for this target")
        self.config = cfg
        self.fc = Linear(cfg.feature_size, cfg.hidden_size, bias=False)
        self.feature_norm = RMSNorm(cfg.feature_size, cfg.rms_norm_eps) if cfg.fusion == "norm_fc" else None
        self.fused_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.fusion == "fc_norm" else None
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope, cfg.max_position)
        device = target.device  # the drafter's own layers are moved there by whoever builds it
        if vocab_map is None:
            vocab_map = torch.arange(cfg.draft_vocab, device=device)
        # Draft id -> target id (saved), target id -> draft id with ``draft_vocab`` for "not in it".
        self.register_buffer("vocab_map", vocab_map.to(device, torch.long).clone())
        to_draft = torch.full((cfg.target_vocab_size,), cfg.draft_vocab, dtype=torch.long, device=device)
        to_draft[self.vocab_map] = torch.arange(cfg.draft_vocab, device=device)
        self.register_buffer("to_draft", to_draft, persistent=False)
        # Frozen, borrowed: plain attributes, so they are neither trained nor saved.
        self.target_embed = target.embed.weight.detach()
        head = target.lm_head.weight.detach()
        whole = torch.equal(self.vocab_map, torch.arange(cfg.target_vocab_size, device=device))
        self.target_lm_head = head if whole else head[self.vocab_map]  # no copy of a whole-vocabulary head
        self.lm_head = Linear(cfg.hidden_size, cfg.draft_vocab, bias=False) if cfg.own_lm_head else None
        self.embed_scale = cfg.hidden_size**0.5 if target.config.embedding_scale else 1.0
        self.kernels: ExactKernels | None = None  # see use_exact_kernels
        self.packed_head: torch.Tensor | None = None

    def embed(self, target_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(target_ids, self.target_embed).to(self.fc.weight.dtype) * self.embed_scale

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """Target features ``[..., F]`` -> the drafter's hidden size (``config.fusion``)."""
        x = features.to(self.fc.weight.dtype)
        x = self.fc(x if self.feature_norm is None else self.feature_norm(x))
        return x if self.fused_norm is None else self.fused_norm(x)

    @property
    def head(self) -> torch.Tensor:
        """The draft-vocabulary LM head ``[V_draft, d]``: the drafter's own or the target's rows."""
        return self.target_lm_head if self.lm_head is None else self.lm_head.weight

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the draft vocabulary."""
        normed = self.norm(hidden)
        if self.kernels is not None:
            return self.kernels.linear(normed, self.packed_head, len(self.vocab_map), None, torch.float32)
        return (normed @ self.head.to(hidden.dtype).T).float()

    def use_exact_kernels(self, kernels: ExactKernels) -> None:
        """Run the drafter's linears, norms and draft LM head on the packed kernels (for speed: a
        bf16 block of γ tokens through oneDNN costs about γ one-token passes on this CPU, and a
        norm in torch ops costs five of their calls). Inference only: the kernels have no
        backward."""
        for module in self.modules():
            if isinstance(module, Linear) and module is not self.lm_head:
                module.pack(kernels)
            elif isinstance(module, RMSNorm):
                module.kernels = kernels
        self.kernels, self.packed_head = kernels, kernels.pack(self.head)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` ``[B, T]`` -> cos/sin ``[B, 1, T, D]``."""
        return self.rotary.tables(positions, self.fc.weight.dtype)

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """``config.json`` + ``model.safetensors`` (floating weights cast to ``dtype`` if given)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n", encoding="utf-8")
        tensors = {
            k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous()
            for k, v in self.state_dict().items()
        }
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "algo": self.config.algo})


def read_json_config(folder: str | Path) -> dict[str, Any]:
    """A drafter folder's ``config.json`` as a dict (Tandem's layout or a published one)."""
    try:
        hf = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{str(folder)!r} is not a drafter folder: {exc}") from exc
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{str(folder)!r} is not a drafter folder: config.json is not an object")
    return hf


def read_config(folder: str | Path) -> DraftConfig:
    """The config of a drafter ``tandem train`` wrote."""
    try:
        return DraftConfig(**read_json_config(folder))
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{str(folder)!r} is not a drafter folder: {exc}") from exc


def load_weights(cls: type[DraftModel], cfg: DraftConfig, folder: str | Path, target: Transformer) -> DraftModel:
    """Build ``cls`` next to ``target`` and fill it from ``folder/model.safetensors``."""
    try:
        state = load_file(str(Path(folder) / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the weights in {str(folder)!r}: {exc}") from exc
    if "vocab_map" not in state:
        raise ModelLoadError(f"{str(folder)!r} has no vocab_map: not a tandem drafter")
    model = cls(cfg, target, state["vocab_map"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"drafter weights do not match its config: missing {missing}, unexpected {unexpected}")
    return model.to(device=target.device, dtype=target.dtype)


@dataclass
class DraftState:
    """What a drafter keeps for one sequence between rounds."""

    # per layer: context keys/values [1, kv, n, hd] (EAGLE-3; the block drafters keep theirs in a
    # BlockBackbone row, extra['row'])
    cache: list[tuple[torch.Tensor, torch.Tensor]]
    length: int  # the context's positions are known up to here
    generator: torch.Generator  # on the drafter's device: draft tokens are drawn there
    extra: dict[str, Any] = field(default_factory=dict)
    offset: int = 0  # ... from here: the cache holds positions offset .. length - 1
    seed: int = 0  # the draws of the round anchored at position a come from round_seed(seed, a)


class NeuralDrafter(Drafter):
    """Adapter from a :class:`DraftModel` to the :class:`Drafter` interface: absorbs each
    sequence's new target features into its context cache, then drafts a chain of up to γ tokens,
    or with ``tree`` a dynamic tree (:mod:`tandem.tree_search`, at most γ deep).

    Greedy targets get the drafter's argmax chain (point masses: verification only needs the
    tokens); sampling targets get tokens sampled from the drafter's distribution, warped like the
    target's, with ``q`` attached so that rejection sampling stays exact.
    """

    def __init__(self, model: DraftModel, tree: TreeShape | None = None) -> None:
        self.model = model.eval()
        self.device = model.fc.weight.device
        self.name = model.config.algo
        self.feature_layers = tuple(model.config.feature_layers)
        self.tree = None if tree is None else replace(tree, depth=min(tree.depth, model.config.drafts))
        self.resyncs = 0  # rounds whose features were out of step with a sequence's state
        self._states: dict[int, DraftState] = {}

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        """Every request's new features absorbed; then the sequences in step draft together:
        chains in one batched pass per step (:meth:`chains`), trees by :meth:`trees`."""
        trees = [chain(r.token_ids[-1], []) for r in requests]
        ready, states = [], []
        for i, request in enumerate(requests):
            state = self.absorb(request)
            if request.max_nodes > 0 and state.length == len(request.token_ids) - 1:
                ready.append(i)
                states.append(state)
        if not ready:
            return trees
        drafting = [requests[i] for i in ready]
        if self.tree is None:
            depths = [min(self.model.config.drafts, r.max_nodes) for r in drafting]
            built = self.chains(states, [r.token_ids[-1] for r in drafting], depths, [r.params for r in drafting])
        else:
            built = self.trees(states, drafting)
        for i, tree in zip(ready, built):
            trees[i] = tree
        return trees

    def trees(self, states: list[DraftState], requests: list[DraftRequest]) -> list[TokenTree]:
        """Every sequence's tree of ``self.tree``'s shape: the greedy ones grown together, and so
        the sampled ones (:meth:`grow`). Each tree is the one its sequence grows alone."""
        trees: list[TokenTree] = [chain(r.token_ids[-1], []) for r in requests]
        for greedy in (True, False):
            rows = [i for i, r in enumerate(requests) if r.params.greedy == greedy]
            if rows:
                picked = [states[i] for i in rows], [requests[i] for i in rows]
                for i, tree in zip(rows, self.grow(*picked, greedy)):
                    trees[i] = tree
        return trees

    def grow(self, states: list[DraftState], requests: list[DraftRequest], greedy: bool) -> list[TokenTree]:
        """Trees of sequences with greedy (or else sampling) targets, grown together over
        :meth:`children`: best-first top-k children for greedy targets, children drawn without
        replacement (each with its own ``q``) for sampling ones."""
        anchors, max_nodes = [r.token_ids[-1] for r in requests], [r.max_nodes for r in requests]
        logits_of = self.children(states, anchors)
        if greedy:
            return self.greedy_trees(anchors, logits_of, max_nodes)
        return self.sampled_trees(anchors, max_nodes, logits_of, states, [r.params for r in requests])

    def draft(self, state: DraftState, token_ids: list[int], depth: int, params: SamplingParams) -> TokenTree:
        """One sequence's chain of up to ``depth`` tokens after the anchor ``token_ids[-1]``."""
        return self.chains([state], token_ids[-1:], [depth], [params])[0]

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    def held(self) -> int:
        return len(self._states)

    @torch.inference_mode()
    def absorb(self, request: DraftRequest) -> DraftState:
        """Take the request's new target features into the sequence's context cache, without
        drafting (a hybrid drafter that answers from elsewhere this round still calls it)."""
        state = self._states.get(request.seq_id)
        if state is None:
            seed = (request.params.seed or 0) ^ 0x5DEECE66D
            state = DraftState([], 0, torch.Generator(device=self.device), seed=seed)
            self._states[request.seq_id] = state
        # This round's draws depend on (seed, anchor position) alone, not on the rounds before: a
        # stream continued elsewhere drafts the very trees from the same context (cluster/session.py).
        state.generator.manual_seed(round_seed(state.seed, len(request.token_ids) - 1))
        if request.features is not None and len(request.features):
            token_ids = list(request.token_ids)
            features, start = request.features, len(token_ids) - 1 - len(request.features)
            if start != state.length:
                features = self._resync(request.seq_id, state, start, features)
            if len(features):
                self.extend(state, token_ids, features.to(self.device, self.model.fc.weight.dtype, non_blocking=True))
        return state

    def _resync(self, seq_id: int, state: DraftState, start: int, features: torch.Tensor) -> torch.Tensor:
        """Features out of step with what the state holds (re-sent, or some never arrived): keep
        what is new, or restart the context at ``start`` (a context that lacks its beginning
        drafts worse, never not at all). Counted in :attr:`resyncs` and logged."""
        self.resyncs += 1
        log.warning(
            "drafter %s: features for sequence %d start at %d, expected %d", self.name, seq_id, start, state.length
        )
        if start < state.length:  # the overlap is known already
            return features[state.length - start :]
        self.restart(state, start)
        return features

    def restart(self, state: DraftState, start: int) -> None:
        """Forget the sequence's context: the next one starts at position ``start``."""
        state.cache, state.length, state.offset = [], start, start

    def tokens(self, ids: list[int]) -> torch.Tensor:
        """Host token ids as a long tensor on the drafter's device."""
        return host_tensor(ids, torch.long, self.device)

    def greedy_trees(self, anchors: list[int], logits_of: ChildLogitsMany, max_nodes: list[int]) -> list[TokenTree]:
        """Greedy trees of several sequences grown together (:func:`greedy_trees`: one expansion
        and one transfer a depth for all of them)."""
        assert self.tree is not None
        return greedy_trees(
            anchors, lambda growths, frontiers: self.best_children(*logits_of(growths, frontiers)), self.tree, max_nodes
        )

    def sampled_trees(
        self,
        anchors: list[int],
        max_nodes: list[int],
        logits_of: ChildLogitsMany,
        states: list[DraftState],
        params: list[SamplingParams],
    ) -> list[TokenTree]:
        """Sampled trees of several sequences grown together (:func:`sampled_trees`): each depth's
        draft logits of every tree at once, warped by each sequence's own sampling parameters,
        each tree drawing from its own generator."""
        assert self.tree is not None

        def drawn_from(growths: list[Growth], frontiers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
            logits, confidence = logits_of(growths, frontiers)
            growing = [(len(frontier), p) for frontier, p in zip(frontiers, params) if frontier]
            parts = logits.split([count for count, _ in growing])
            return torch.cat([self.draft_probs(part, p) for part, (_, p) in zip(parts, growing)]), confidence

        return sampled_trees(anchors, drawn_from, self.tree, max_nodes, [state.generator for state in states])

    def best_children(
        self, logits: torch.Tensor, confidence: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A greedy tree's expansion from draft logits ``[F, V_draft]``: each row's ``topk`` best
        children's log-probabilities and target ids, and the confidence passed through."""
        logp, ids = torch.log_softmax(logits, -1).topk(self.tree.topk, -1)
        return logp, self.model.vocab_map[ids], confidence

    def pick(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> Pick:
        """A target token id from draft-vocabulary ``logits`` (see :class:`Pick`), on the device."""
        if params.greedy:
            top, best = torch.softmax(logits.float(), -1).max(-1)
            return Pick(self.model.vocab_map[best], None, top)
        q = self.draft_probs(logits, params)
        return Pick(torch.multinomial(q, 1, generator=generator)[0], q, q.max())

    def pick_rows(
        self, logits: torch.Tensor, params: list[SamplingParams], states: list[DraftState], live: list[bool]
    ) -> tuple[list[Pick | None], torch.Tensor]:
        """:meth:`pick` for each row of ``logits`` ``[B, V_draft]`` whose chain goes on (``live``;
        row b: ``params[b]``, drawn with ``states[b]``'s generator, so that a sequence's draws do
        not depend on what it is drafted with); greedy rows in one reduction. Also the picked
        target ids ``[B]`` as one tensor, to feed the next step (a finished row's is a stand-in)."""
        if all(p.greedy for p in params):
            top, best = torch.softmax(logits.float(), -1).max(-1)
            tokens = self.model.vocab_map[best]
            return [Pick(token, None, t) for token, t in zip(tokens, top)], tokens
        picks = [
            self.pick(row, p, state.generator) if alive else None
            for row, p, state, alive in zip(logits, params, states, live)
        ]
        stand_in = next(pick.token for pick in picks if pick is not None)
        return picks, torch.stack([stand_in if pick is None else pick.token for pick in picks])

    def draft_probs(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Draft-vocabulary ``logits`` ``[..., V_draft]`` -> ``q`` over the target vocabulary
        ``[..., V]``, warped like the target's distribution (tokens outside the draft vocabulary: 0)."""
        shape = (*logits.shape[:-1], self.model.config.target_vocab_size)
        full = torch.full(shape, float("-inf"), device=logits.device)
        full[..., self.model.vocab_map] = logits.float()
        return target_probs(full, params)

    @staticmethod
    def chain_of(
        root: int, picks: Sequence[Pick], factors: torch.Tensor | None = None, min_survival: float = 0.0
    ) -> TokenTree:
        """The chain of ``picks`` below ``root``, brought to the host in one transfer; position k
        survives with the product of ``factors[:k + 1]`` (default: each pick's top probability).
        The chain stops before the first position whose survival falls below ``min_survival``
        (at least one pick is kept): a cut that reads no token at or after it."""
        if not picks:
            return chain(root, [])
        tokens, factor = to_host(
            torch.stack([p.token for p in picks]), torch.stack([p.top for p in picks]) if factors is None else factors
        )
        survival = list(itertools.accumulate(factor.tolist(), operator.mul))
        keep = next((k for k, s in enumerate(survival) if k and s < min_survival), len(picks))
        probs = None
        if picks[0].q is not None:
            probs = torch.stack([torch.zeros_like(picks[0].q), *(p.q for p in picks[:keep])])
        return chain(root, tokens.tolist()[:keep], probs, survival[:keep])

    @abstractmethod
    def extend(self, state: DraftState, token_ids: list[int], features: torch.Tensor) -> None:
        """Add context positions ``state.length ...`` for the new ``features`` to ``state``
        (its cache holds ``state.length - state.offset`` positions before them)."""

    @abstractmethod
    def chains(
        self, states: list[DraftState], anchors: list[int], depths: list[int], params: list[SamplingParams]
    ) -> list[TokenTree]:
        """Each sequence's chain of up to ``depths[b]`` draft tokens after ``anchors[b]``
        (:meth:`chain_of`), drafted together."""

    @abstractmethod
    def children(self, states: list[DraftState], anchors: list[int]) -> ChildLogitsMany:
        """For trees rooted at ``anchors`` (one per sequence of ``states``): what gives the draft
        logits of the children of their frontier nodes (all at one depth), the rows of each
        independent of the others'."""
