"""Published drafter checkpoints in and out: EAGLE-3 as the EAGLE authors and SpecForge save it,
DFlash as z-lab publishes it, DSpark (and DSpark-class DFlash) as DeepSpec saves it. Each maps onto
one of Tandem's drafter classes with the semantics of the code that trained it; the switches it
needs are :class:`DraftConfig` fields (docs/published-formats.md has the layouts and sources).

One name table per format, Tandem name -> published name, serves both directions, so that an
export read back is the same drafter (tests/test_formats.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tandem.drafters.neural import DraftConfig, DraftModel, read_config, read_json_config
from tandem.errors import ModelLoadError
from tandem.models.config import ModelConfig
from tandem.models.decoder import Transformer

# format -> the architecture name it writes (and the algorithms it holds)
FORMATS = {"specforge": "LlamaForCausalLMEagle3", "zlab": "DFlashDraftModel", "deepspec": "Qwen3DSparkModel"}
ALGOS = {"specforge": ("eagle3",), "zlab": ("dflash",), "deepspec": ("dflash", "dspark")}
# a decoder layer's parts: Tandem's module name -> the Hugging Face (Llama / Qwen3) one
LAYER = {
    "attn_norm": "input_layernorm",
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "mlp_norm": "post_attention_layernorm",
    "w1": "mlp.gate_proj",
    "w3": "mlp.up_proj",
    "w2": "mlp.down_proj",
}
EAGLE3 = {
    "layer.attn_norm.embed_norm": "midlayer.input_layernorm",
    "layer.attn_norm.hidden_norm": "midlayer.hidden_norm",
}
BLOCK = {
    "fused_norm": "hidden_norm",
    "markov_in": "markov_head.markov_w1",
    "markov_out": "markov_head.markov_w2",
    "confidence": "confidence_head.proj",
}
# tensors a published checkpoint may hold that Tandem takes from the target instead: DeepSpec
# saves frozen copies of the target's embedding and LM head, SpecForge's HF export the embedding
BORROWED = ("embed_tokens.weight", "lm_head.weight", "t2d")


LAYOUTS = ("tandem", "deepspec", "specforge")


def layout_overrides(layout: str, algo: str, vocab_size: int, mask_token_id: int | None = None) -> dict[str, Any]:
    """:class:`DraftConfig` fields that make a new drafter of ``algo`` exportable as ``layout``
    (``tandem``: Tandem's own, none). DeepSpec's DFlash/DSpark: fc then norm, q/k norm, context
    keys/values without the layer norm, a mask token (default: the vocabulary's last id) and the
    whole vocabulary, no anchor features. SpecForge's EAGLE-3: fc alone, split input norms."""
    if layout not in LAYOUTS:
        raise ModelLoadError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "tandem":
        return {}
    if algo not in ALGOS[layout]:
        raise ModelLoadError(f"the {layout} layout holds {'/'.join(ALGOS[layout])} drafters, not {algo}")
    if layout == "specforge":
        return {"fusion": "fc", "split_input_norm": True}
    return {
        "fusion": "fc_norm",
        "context_norm": False,
        "qk_norm": True,
        "anchor_features": False,
        "mask_token_id": vocab_size - 1 if mask_token_id is None else mask_token_id,
        "draft_vocab": vocab_size,
    }


def drafter_config(folder: str | Path, target: ModelConfig | None) -> DraftConfig:
    """The config of a drafter folder in any layout; a published one is read against the
    ``target``'s config (its layer ids may default from the target's depth)."""
    hf = read_json_config(folder)
    fmt = published_format(hf)
    if fmt is None:
        return read_config(folder)
    if target is None:
        raise ModelLoadError(f"{str(folder)!r} is a published {fmt} drafter: reading it needs the target's config")
    return import_config(hf, fmt, target, str(Path(folder) / "config.json"))


def load_published(
    folder: str | Path,
    hf: dict[str, Any],
    fmt: str,
    target: Transformer,
    build: Callable[[DraftConfig, torch.Tensor], DraftModel],
) -> DraftModel:
    """A published drafter (``hf``: its config.json, in layout ``fmt``) next to ``target``:
    ``build(config, vocab_map)`` makes the Tandem model, then filled from the folder (every
    shape checked)."""
    folder = Path(folder)
    cfg = import_config(hf, fmt, target.config, str(folder / "config.json"))
    tensors = PublishedTensors(folder, fmt)
    if fmt != "specforge":  # Qwen3 layers norm each head's q and k; the tensors say whether these do
        cfg = replace(cfg, qk_norm="layers.0.self_attn.q_norm.weight" in tensors.readers)
    model = build(cfg, tensors.vocab_map(cfg))
    model.load_state_dict(tensors.state_for(model))
    return model.to(device=target.device, dtype=target.dtype)


def published_format(hf: dict[str, Any]) -> str | None:
    """Which published layout a drafter's ``config.json`` is in; ``None`` for Tandem's own."""
    if "algo" in hf:
        return None
    arch = " ".join(hf.get("architectures") or [])
    if "Eagle3" in arch or "eagle_config" in hf or "draft_vocab_size" in hf:
        return "specforge"
    if "DFlashDraftModel" in arch or "dflash_config" in hf:
        return "zlab"
    if "DSpark" in arch or {"target_layer_ids", "markov_rank"} <= hf.keys():
        return "deepspec"
    raise ModelLoadError(
        f"config.json names {arch or 'no architecture'}: neither a tandem drafter nor a published "
        "EAGLE-3 (SpecForge), DFlash (z-lab) or DSpark (DeepSpec) layout"
    )


def published_name(tandem: str, fmt: str) -> str | None:
    """The published name of a Tandem state-dict key (``None``: not saved in that format)."""
    if tandem == "vocab_map":
        return "d2t" if fmt == "specforge" else None
    module, _, kind = tandem.rpartition(".")
    if fmt == "specforge":
        if module in EAGLE3:
            return f"{EAGLE3[module]}.{kind}"
        if module.startswith("layer."):
            return f"midlayer.{LAYER[module.removeprefix('layer.')]}.{kind}"
        return tandem  # fc, norm, lm_head
    found = re.fullmatch(r"layers\.(\d+)\.(\w+)", module)
    if found:
        return f"layers.{found[1]}.{LAYER[found[2]]}.{kind}"
    return f"{BLOCK.get(module, module)}.{kind}"


def import_config(hf: dict[str, Any], fmt: str, target: ModelConfig, source: str) -> DraftConfig:
    """A :class:`DraftConfig` for a published config, checked against the target it will run on."""
    n = target.num_layers
    vocab = _field(hf, "vocab_size", source)
    if vocab != target.vocab_size:
        raise ModelLoadError(
            f"{source}: the drafter is for a {vocab}-token vocabulary; the target's has {target.vocab_size}"
        )
    if hf.get("attention_bias") or hf.get("bias"):
        raise ModelLoadError(f"{source}: attention or fc biases are not supported")
    heads, hidden = _field(hf, "num_attention_heads", source), _field(hf, "hidden_size", source)
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    common: dict[str, Any] = dict(
        target=source,
        target_vocab_size=vocab,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=_field(hf, "intermediate_size", source),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),  # EAGLE's default base
        rope_scaling=scaling,
        max_position=max(int(hf.get("max_position_embeddings") or 0), target.max_position),
        anchor_features=False,
        draft_vocab=vocab,
    )
    if fmt == "specforge":
        cfg = _eagle3_config(hf, n, common, source)
    else:
        options = hf.get("dflash_config") or {}  # z-lab nests these; DeepSpec keeps them top-level
        nested = options if fmt == "zlab" else hf
        layers = nested.get("target_layer_ids")
        if layers is None:  # z-lab's default: evenly spaced from layer 1 to N - 3
            draft_layers = _field(hf, "num_hidden_layers", source)
            layers = [round(1 + i * (n - 4) / max(draft_layers - 1, 1)) for i in range(draft_layers)]
        if "sliding_attention" in (hf.get("layer_types") or []) or options.get("causal") or options.get("use_swa"):
            raise ModelLoadError(f"{source}: causal or sliding-window draft layers are not supported")
        if hf.get("num_target_layers", n) != n:
            raise ModelLoadError(f"{source}: trained for a {hf['num_target_layers']}-layer target, this one has {n}")
        mask = nested.get("mask_token_id")
        if mask is None:
            raise ModelLoadError(f"{source}: no mask_token_id in config.json")
        rank = int(hf.get("markov_rank", 0)) if fmt == "deepspec" else 0
        if rank and hf.get("markov_head_type", "vanilla") != "vanilla":
            raise ModelLoadError(f"{source}: Markov head {hf['markov_head_type']!r}; only 'vanilla' is supported")
        confidence = bool(hf.get("enable_confidence_head", False)) and fmt == "deepspec"
        cfg = DraftConfig(
            algo="dspark" if rank or confidence else "dflash",
            feature_layers=list(layers),
            num_layers=_field(hf, "num_hidden_layers", source),
            block_size=_field(hf, "block_size", source),
            markov_rank=rank,
            fusion="fc_norm",
            context_norm=False,
            qk_norm=hf.get("model_type") == "qwen3",  # what the tensors say overrides it (load_published)
            mask_token_id=int(mask),
            anchor_row=fmt == "deepspec",  # z-lab drops the anchor's row: the mask at a + k drafts a + k
            confidence_head=confidence,
            confidence_with_markov=bool(hf.get("confidence_head_with_markov", True)),
            **common,
        )
    bad = [i for i in cfg.feature_layers if not 0 <= i < n]
    if bad:
        raise ModelLoadError(f"{source}: target layer ids {bad} are outside the target's layers 0..{n - 1}")
    return cfg


def _eagle3_config(hf: dict[str, Any], n: int, common: dict[str, Any], source: str) -> DraftConfig:
    """EAGLE-3's layer ids, in the convention their place selects: SpecForge writes
    ``eagle_config.eagle_aux_hidden_state_layer_ids`` as layer outputs (SGLang reads them so too);
    the speculators format's top-level list is read by vLLM as layer inputs, one layer later;
    without ids, EAGLE's default: the inputs of layers 2, N/2 and N - 3."""
    if hf.get("num_hidden_layers", 1) != 1:
        raise ModelLoadError(f"{source}: {hf['num_hidden_layers']} draft layers; EAGLE-3 drafters have one")
    if hf.get("target_hidden_size", common["hidden_size"]) != common["hidden_size"]:
        raise ModelLoadError(f"{source}: target_hidden_size differs from hidden_size; not supported")
    nested = (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if nested is not None:
        layers = list(nested)
    elif hf.get("eagle_aux_hidden_state_layer_ids") is not None:
        layers = [i - 1 for i in hf["eagle_aux_hidden_state_layer_ids"]]
    else:
        layers = [1, n // 2 - 1, n - 4]
    draft_vocab = int(hf.get("draft_vocab_size") or common["target_vocab_size"])
    if draft_vocab > common["target_vocab_size"]:
        raise ModelLoadError(
            f"{source}: draft_vocab_size {draft_vocab} is larger than the target's vocabulary "
            f"({common['target_vocab_size']})"
        )
    return DraftConfig(
        algo="eagle3",
        feature_layers=layers,
        fusion="fc",
        split_input_norm=True,
        own_lm_head=True,
        **{**common, "draft_vocab": draft_vocab},
    )


def _field(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise ModelLoadError(f"{source}: config.json has no {key!r}")
    return hf[key]


class PublishedTensors:
    """The tensors of a published drafter folder under Tandem's names, each read when asked for
    (the target's embedding and LM head copies some checkpoints carry are never read)."""

    def __init__(self, folder: Path, fmt: str) -> None:
        self.folder, self.fmt = folder, fmt
        self.readers, self.file_of = _read_tensors(folder)

    def vocab_map(self, cfg: DraftConfig) -> torch.Tensor:
        """Draft id -> target id: EAGLE-3's ``d2t`` offsets (target = draft + d2t[draft]), or the
        whole vocabulary in order (DFlash, DSpark, and EAGLE-3 without a reduced vocabulary)."""
        if "d2t" not in self.readers:
            if cfg.draft_vocab != cfg.target_vocab_size:
                raise ModelLoadError(f"{self.folder}: draft_vocab_size {cfg.draft_vocab} needs a d2t tensor")
            return torch.arange(cfg.draft_vocab)
        d2t = self.readers["d2t"]().long()
        if d2t.shape != (cfg.draft_vocab,):
            shape = list(d2t.shape)
            raise ModelLoadError(f"{self.file_of['d2t']}: tensor 'd2t' has shape {shape}, not [{cfg.draft_vocab}]")
        vocab = torch.arange(cfg.draft_vocab) + d2t
        if int(vocab.min()) < 0 or int(vocab.max()) >= cfg.target_vocab_size:
            raise ModelLoadError(f"{self.file_of['d2t']}: d2t maps draft tokens outside the target's vocabulary")
        return vocab

    def state_for(self, model: DraftModel) -> dict[str, torch.Tensor]:
        """``model``'s state dict from the folder, every shape checked against it."""
        state: dict[str, torch.Tensor] = {}
        used: set[str | None] = set(BORROWED)
        for name, param in model.state_dict().items():
            published = published_name(name, self.fmt)
            used.add(published)
            if published is None or name == "vocab_map":  # already in the model (d2t: PublishedTensors.vocab_map)
                state[name] = param
                continue
            if published not in self.readers:
                raise ModelLoadError(f"{self.folder}: the {self.fmt} checkpoint has no tensor {published!r}")
            value = self.readers[published]()
            # Tandem's Markov embedding has an extra last row, for tokens outside a reduced vocabulary
            shape = [param.shape[0] - 1, *param.shape[1:]] if name == "markov_in.weight" else list(param.shape)
            if list(value.shape) != shape:
                raise ModelLoadError(
                    f"{self.file_of[published]}: tensor {published!r} has shape {list(value.shape)}, "
                    f"config.json implies {shape}"
                )
            state[name] = torch.cat([value, value.new_zeros(1, shape[1])]) if name == "markov_in.weight" else value
        unknown = sorted(set(self.readers) - used)
        if unknown:
            raise ModelLoadError(f"{self.folder}: tensors {unknown[:5]} have no place in a {model.config.algo} drafter")
        return state


def _read_tensors(folder: Path) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, Path]]:
    """Each tensor of a folder's ``*.safetensors`` (or EAGLE's ``pytorch_model.bin``), read when called."""
    files = sorted(folder.glob("*.safetensors"))
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    where: dict[str, Path] = {}
    if not files:
        bin_file = folder / "pytorch_model.bin"
        if not bin_file.is_file():
            raise ModelLoadError(f"{folder}: no model.safetensors or pytorch_model.bin")
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable pickle is the same error to the user
            raise ModelLoadError(f"{bin_file}: unreadable: {exc}") from exc
        return {k: (lambda v=v: v) for k, v in state.items()}, dict.fromkeys(state, bin_file)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelLoadError(f"{file}: unreadable: {exc}") from exc
        for name in names:
            readers[name] = lambda file=file, name=name: _read_one(file, name)
            where[name] = file
    return readers, where


def _read_one(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)


def export_drafter(model: DraftModel, fmt: str, folder: str | Path, num_target_layers: int) -> Path:
    """Write ``model`` in the layout ``fmt`` loads (vLLM and SGLang load all three), exactly: only
    a drafter whose config is in that layout can be written, else a clear error says what differs."""
    cfg = model.config
    _check_exportable(cfg, fmt)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if fmt == "specforge":  # draft ids in increasing target-id order, as SpecForge's t2d assumes
        order = state["vocab_map"].argsort()
        state["vocab_map"] = state["vocab_map"][order]
        state["lm_head.weight"] = model.head.detach()[order]
        vocab = state["vocab_map"]
        out["t2d"] = torch.zeros(cfg.target_vocab_size, dtype=torch.bool).index_fill_(0, vocab.cpu(), True)
    for name, value in state.items():
        published = published_name(name, fmt)
        if published is None:
            continue
        if name == "vocab_map":
            value = value - torch.arange(len(value), device=value.device)
        elif name == "markov_in.weight":
            value = value[:-1]
        out[published] = value
    if fmt == "deepspec":  # its modules hold (frozen) copies of the target's embedding and LM head
        out["embed_tokens.weight"] = model.target_embed
        out["lm_head.weight"] = model.target_lm_head
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in out.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = _export_config(cfg, fmt, num_target_layers, next(iter(tensors.values())).dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def _check_exportable(cfg: DraftConfig, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ModelLoadError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if cfg.algo not in ALGOS[fmt]:
        raise ModelLoadError(f"a {cfg.algo} drafter cannot be written as {fmt} ({'/'.join(ALGOS[fmt])} only)")
    if fmt == "specforge":
        need = {"fusion": "fc", "split_input_norm": True, "qk_norm": False}
    else:
        need = {
            "fusion": "fc_norm",
            "context_norm": False,
            "qk_norm": True,
            "anchor_row": fmt == "deepspec",
            "anchor_features": False,
            "own_lm_head": False,
        }
    wrong = {k: getattr(cfg, k) for k, v in need.items() if getattr(cfg, k) != v}
    if fmt != "specforge" and (cfg.mask_token_id is None or cfg.draft_vocab != cfg.target_vocab_size):
        wrong["mask_token_id / draft_vocab"] = (cfg.mask_token_id, cfg.draft_vocab)
    if wrong:
        raise ModelLoadError(
            f"this drafter is not in {fmt}'s layout (differs in {wrong}; {fmt} needs {need}, a mask "
            "token and the whole vocabulary for DFlash/DSpark): train it with `tandem train --layout`"
        )


def _export_config(cfg: DraftConfig, fmt: str, num_target_layers: int, dtype: torch.dtype) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": [FORMATS[fmt]],
        "model_type": "llama" if fmt == "specforge" else "qwen3",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position,
        "vocab_size": cfg.target_vocab_size,
        "num_hidden_layers": cfg.num_layers,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    layers = list(cfg.feature_layers)
    if fmt == "specforge":
        hf.update(draft_vocab_size=cfg.draft_vocab, eagle_config={"eagle_aux_hidden_state_layer_ids": layers})
        return hf
    hf.update(block_size=cfg.block_size, num_target_layers=num_target_layers)
    hf["layer_types"] = ["full_attention"] * cfg.num_layers
    if fmt == "zlab":
        hf["dflash_config"] = {"mask_token_id": cfg.mask_token_id, "target_layer_ids": layers}
        return hf
    confidence = cfg.algo == "dspark" and cfg.confidence_head
    hf.update(
        target_layer_ids=layers,
        mask_token_id=cfg.mask_token_id,
        num_anchors=512,  # DeepSpec's training setting; its model class asserts it is present
        markov_rank=cfg.markov_rank if cfg.algo == "dspark" else 0,
        enable_confidence_head=confidence,
    )
    if hf["markov_rank"]:
        hf["markov_head_type"] = "vanilla"
    if confidence:
        hf["confidence_head_with_markov"] = cfg.confidence_with_markov
    return hf
