"""Weight loading: a Hugging Face folder (config.json + safetensors) or a GGUF file.

GGUF goes through transformers' reader once (it dequantizes, 15-60 s here) and is cached as a
Hugging Face folder keyed by the file's hash, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from tandem.cache import cache_root
from tandem.errors import ModelLoadError
from tandem.models.config import ModelConfig
from tandem.models.decoder import Transformer

GGUF_MAGIC = b"GGUF"


def resolve_model_dir(path: str | Path) -> Path:
    """A loadable Hugging Face folder for ``path`` (a folder or a .gguf file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{str(path)!r} is not a model folder: no config.json")
        return path
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{str(path)!r} is neither a model folder nor a GGUF file")
    return convert_gguf(path)


def convert_gguf(gguf: Path) -> Path:
    """Dequantize ``gguf`` into a cached Hugging Face folder (once per file content)."""
    target = cache_root() / "gguf" / _sha256(gguf)[:20]
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow import, only on first use

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelLoadError(f"cannot read GGUF file {str(gguf)!r}: {exc}") from exc
    # transformers refuses to save a model it thinks is quantized; the weights are dense now.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "tandem_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[Transformer, Path]:
    """Our decoder with the weights at ``path`` on ``device``; also returns the Hugging Face folder used."""
    folder = resolve_model_dir(path)
    try:
        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{str(folder)!r} has an unreadable config.json: {exc}") from exc
    state = convert_state_dict(_read_safetensors(folder), cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.build_rotary()
    return model.to(device=device, dtype=dtype).eval(), folder


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{str(folder)!r} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise ModelLoadError(f"cannot read weights {str(file)!r}: {exc}") from exc
    return state


def convert_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names -> ours, fusing q/k/v and gate/up into one matmul each."""
    hf = {_strip_prefix(k): v for k, v in hf.items()}
    out = {"embed.weight": hf.pop("embed_tokens.weight"), "norm.weight": hf.pop("norm.weight")}
    if "lm_head.weight" in hf and not cfg.tie_embeddings:
        out["lm_head.weight"] = hf.pop("lm_head.weight")
    hf.pop("lm_head.weight", None)
    # In Llama/Qwen "post_attention_layernorm" is the pre-MLP norm; Gemma 3 has four norms.
    renames = {
        "input_layernorm": "attn_norm",
        "self_attn.o_proj": "attn.wo",
        "self_attn.q_norm": "attn.q_norm",
        "self_attn.k_norm": "attn.k_norm",
        "mlp.down_proj": "mlp.w2",
        "post_attention_layernorm": "post_attn_norm" if cfg.sandwich_norm else "mlp_norm",
        "pre_feedforward_layernorm": "mlp_norm",
        "post_feedforward_layernorm": "post_mlp_norm",
    }
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [hf.pop(f"{src}self_attn.{p}_proj.{kind}", None) for p in "qkv"]
            if all(t is not None for t in qkv):
                out[f"{dst}attn.wqkv.{kind}"] = torch.cat(qkv)
        out[f"{dst}mlp.w13.weight"] = torch.cat(
            [hf.pop(f"{src}mlp.gate_proj.weight"), hf.pop(f"{src}mlp.up_proj.weight")]
        )
        for old, new in renames.items():
            if f"{src}{old}.weight" in hf:
                out[f"{dst}{new}.weight"] = hf.pop(f"{src}{old}.weight")
    out.update(hf)  # leftovers surface as "unexpected" in load_state_dict
    return out


def _strip_prefix(name: str) -> str:
    for prefix in ("model.language_model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
