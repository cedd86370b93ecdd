"""One config dataclass for every supported decoder family, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tandem.errors import ModelLoadError
from tandem.models.rope import RopeParams

Family = Literal["llama", "qwen2", "qwen3", "gemma3"]

_FAMILIES: dict[str, Family] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; family differences are explicit flags, not subclasses."""

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float
    rope: RopeParams  # of full-attention layers
    tie_embeddings: bool = True
    attention_bias: bool = False  # qwen2: bias on q/k/v
    qk_norm: bool = False  # qwen3, gemma3: RMSNorm on each head's q and k
    hidden_act: Literal["silu", "gelu_tanh"] = "silu"
    # gemma3 specifics
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight)
    embedding_scale: bool = False  # multiply embeddings by sqrt(hidden_size)
    sandwich_norm: bool = False  # extra norms after attention and after the MLP
    query_scale: float | None = None  # None: head_dim ** -0.5
    sliding_window: int | None = None
    local_rope: RopeParams | None = None  # of sliding-window layers
    layer_types: tuple[str, ...] = field(default=())  # "full_attention" | "sliding_attention"
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Translate a transformers ``config.json`` (v4 or v5 rope layout)."""
        hf = hf.get("text_config", hf)
        model_type = hf.get("model_type", "")
        if model_type not in _FAMILIES:
            raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {sorted(set(_FAMILIES))}")
        family = _FAMILIES[model_type]
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        max_position = hf.get("max_position_embeddings", 2048)
        rope = _rope_params(hf, max_position)
        eos = hf.get("eos_token_id")
        common = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position=max_position,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=rope["full_attention"],
            tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )
        if family == "llama":
            return cls(**common, attention_bias=hf.get("attention_bias", False))
        if family == "qwen2":
            return cls(**common, attention_bias=True)
        if family == "qwen3":
            return cls(**common, attention_bias=hf.get("attention_bias", False), qk_norm=True)
        layer_types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
            for i in range(hf["num_hidden_layers"])
        ]
        return cls(
            **common,
            qk_norm=True,
            hidden_act="gelu_tanh",
            norm_offset=1.0,
            embedding_scale=True,
            sandwich_norm=True,
            query_scale=hf.get("query_pre_attn_scalar", head_dim) ** -0.5,
            sliding_window=hf.get("sliding_window"),
            local_rope=rope["sliding_attention"],
            layer_types=tuple(layer_types),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )


def _rope_params(hf: dict[str, Any], max_position: int) -> dict[str, RopeParams]:
    """RoPE per attention type. transformers v5 nests it in ``rope_parameters`` (per attention
    type for Gemma 3); v4 has a flat ``rope_theta`` (and Gemma 3's ``rope_local_base_freq``) and
    ``rope_scaling``, which applies to full-attention layers only."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        return {kind: RopeParams.from_hf(group, 10000.0, max_position) for kind, group in params.items()}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    full = RopeParams.from_hf(params or hf.get("rope_scaling") or {}, theta, max_position)
    return {"full_attention": full, "sliding_attention": RopeParams(float(hf.get("rope_local_base_freq", 10000.0)))}
