"""Tiny random models of every supported family, built from transformers configs (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
WINDOW = 8


def tiny_config(family: str, vocab: int = 160, **overrides: object) -> PretrainedConfig:
    """Small but not degenerate: GQA, untied and tied heads, biases, qk-norm, mixed attention."""
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Large enough that attention is sharp, so masking and position errors change the logits.
        initializer_range=0.2,
        rms_norm_eps=1e-6,
    )
    llama = {"num_hidden_layers": 2, "tie_word_embeddings": False, "rope_theta": 500.0}
    qwen2 = {"num_hidden_layers": 2, "tie_word_embeddings": True, "rope_theta": 1000.0}
    qwen3 = {"num_hidden_layers": 2, "head_dim": 16, "tie_word_embeddings": False, "rope_theta": 1000.0}
    gemma3 = dict(
        num_hidden_layers=4,
        head_dim=16,
        query_pre_attn_scalar=32,  # != head_dim, so the query scale is exercised
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        final_logit_softcapping=5.0,
        tie_word_embeddings=True,
    )
    kind, own = {"llama": (LlamaConfig, llama), "qwen2": (Qwen2Config, qwen2), "qwen3": (Qwen3Config, qwen3)}.get(
        family, (Gemma3TextConfig, gemma3)
    )
    return kind(**{**common, **own, **overrides})


def randomize(model: PreTrainedModel) -> None:
    """Norm weights and biases start at constants; perturb them so the Gemma ``1 + w`` offset,
    qk-norm and the Qwen2 q/k/v biases actually change the result."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.2)


def build_tiny(family: str, folder: Path, vocab: int = 160, seed: int = 1234, **overrides: object) -> PreTrainedModel:
    """Save a seeded random HF model of ``family`` into ``folder``; returns it (fp32, eval)."""
    torch.manual_seed(seed)
    hf = (
        AutoModelForCausalLM.from_config(tiny_config(family, vocab, **overrides), attn_implementation="eager")
        .float()
        .eval()
    )
    randomize(hf)
    hf.save_pretrained(folder, safe_serialization=True)
    return hf
