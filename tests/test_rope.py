"""RoPE scaling (linear, dynamic NTK, YaRN, llama3) against transformers: the frequencies of
each scheme, the config in both of transformers' spellings, and whole tiny models' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tandem.errors import ModelLoadError
from tandem.models.config import ModelConfig
from tandem.models.loading import load_model
from tandem.models.rope import RopeParams, inverse_frequencies
from tests.tiny_models import build_tiny, tiny_config

VOCAB = 160
HEAD_DIM = 16
CONTEXT = 64  # the "pretraining" context of the tiny models; sequences below run past it
# Each scheme with settings that make all of its cases happen at HEAD_DIM and CONTEXT: llama3's
# wavelengths fall on both sides of and between its bounds, YaRN's ramp spans several dimensions.
SCHEMES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": CONTEXT},
    "yarn-deepseek": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": CONTEXT,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
        "truncate": False,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": CONTEXT,
    },
}


def _hf_config(scheme: dict[str, object], theta: float = 500.0) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        rope_parameters={**scheme, "rope_theta": theta},
    )


@pytest.mark.parametrize("name", SCHEMES)
def test_frequencies_equal_transformers(name: str) -> None:
    scheme = SCHEMES[name]
    hf = _hf_config(scheme)
    want, want_scale = ROPE_INIT_FUNCTIONS[scheme["rope_type"]](hf, "cpu")
    rope = ModelConfig.from_hf({**tiny_config("llama", VOCAB).to_dict(), **hf.to_dict()}).rope
    got, scale = inverse_frequencies(rope, HEAD_DIM)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)
    if name != "dynamic":  # the scheme does something here, or the comparison would prove little
        unscaled, _ = inverse_frequencies(RopeParams(rope.theta), HEAD_DIM)
        assert not torch.allclose(got, unscaled)


@pytest.mark.parametrize("name", ["linear", "yarn", "llama3"])
def test_both_spellings_read_alike(name: str) -> None:
    """transformers v4 wrote ``rope_theta`` and ``rope_scaling`` (scheme under ``type``), v5 writes
    ``rope_parameters``."""
    scheme = SCHEMES[name]
    base = {k: v for k, v in tiny_config("llama", VOCAB).to_dict().items() if k != "rope_parameters"}
    v5 = ModelConfig.from_hf({**base, "rope_parameters": {**scheme, "rope_theta": 500.0}})
    old = {("type" if k == "rope_type" else k): v for k, v in scheme.items()}
    v4 = ModelConfig.from_hf({**base, "rope_theta": 500.0, "rope_scaling": old})
    assert v4.rope == v5.rope and v5.rope.kind == name and v5.rope.theta == 500.0


def test_gemma3_scales_only_its_global_layers() -> None:
    """Gemma 3 (4B and up) stretches its full-attention layers only, in v5 per attention type."""
    hf = tiny_config("gemma3", VOCAB).to_dict()
    hf["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    }
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope == RopeParams(1e6, "linear", 8.0, original_max_position=256)
    assert cfg.local_rope == RopeParams(10000.0)


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        ({"rope_type": "longrope", "factor": 2.0}, "'longrope' is not supported"),
        ({"rope_type": "llama3", "factor": 8.0}, "needs original_max_position_embeddings"),
        ({"rope_type": "linear", "factor": 0}, "needs a positive factor"),
        ({"rope_type": "linear"}, "needs a positive factor"),
    ],
)
def test_unsupported_or_incomplete_scaling_is_refused(scheme: dict[str, object], message: str) -> None:
    hf = {**tiny_config("llama", VOCAB).to_dict(), "rope_parameters": {**scheme, "rope_theta": 500.0}}
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_hf(hf)


CASES = [
    ("llama", "llama3"),
    ("llama", "linear"),
    ("llama", "dynamic"),
    ("qwen3", "yarn"),
    ("qwen2", "yarn-deepseek"),
    ("gemma3", "linear"),
]


@pytest.mark.parametrize(("family", "name"), CASES)
def test_scaled_models_match_transformers(family: str, name: str, tmp_path: Path) -> None:
    """A tiny model with the scheme, past its pretraining context: prefill then cached decoding
    give transformers' logits; and the scheme changes them, so the match means something."""
    theta = {"llama": 500.0, "qwen2": 1000.0, "qwen3": 1000.0, "gemma3": 10000.0}[family]
    scaled = {**SCHEMES[name], "rope_theta": theta}
    if family == "gemma3":  # per attention type; the sliding layers keep theirs
        rope = {"full_attention": scaled, "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    else:
        rope = scaled
    hf = build_tiny(family, tmp_path / "scaled", VOCAB, rope_parameters=rope)
    unscaled = build_tiny(family, tmp_path / "plain", VOCAB)
    ours, _ = load_model(tmp_path / "scaled", torch.float32)
    ids = torch.randint(0, VOCAB, (CONTEXT + 40,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
        if name != "dynamic":  # dynamic leaves the served context alone (tandem.models.rope)
            assert (want - unscaled(torch.tensor([ids])).logits[0].float()).abs().max() > 1e-2
    cache = ours.new_cache(1, len(ids))
    got = ours.block_logits(ids[:-4], cache, 0)
    cache.commit(0, range(len(ids) - 4))
    for i in range(len(ids) - 4, len(ids)):
        got = torch.cat([got, ours.block_logits(ids[i : i + 1], cache, 0)])
        cache.commit(0, range(1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
