"""Weight loading: a Hugging Face folder (config.json + safetensors) or a GGUF file.

GGUF goes through transformers' reader once (it dequantizes, 15-60 s here) and is cached as a
Hugging Face folder keyed by the file's hash, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tandem.cache import cache_root
from tandem.errors import ModelLoadError
from tandem.models.config import ModelConfig
from tandem.models.decoder import Transformer
from tandem.models.tp import Shard, shard_layers

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
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    group: dist.ProcessGroup | None = None,
) -> tuple[Transformer, Path]:
    """Our decoder with the weights at ``path`` on ``device``; also returns the Hugging Face
    folder used. With ``group``, this rank's tensor-parallel shard (:mod:`tandem.models.tp`).

    The model is built on the meta device and each tensor is read alone, only the slice this
    rank holds, straight into ``dtype`` on ``device``: memory grows with the shard, never with
    the whole checkpoint, and no float32 copy is made on the way."""
    folder, checkpoint, model = _on_meta(path)
    cfg = model.config
    shard = None
    if group is not None:
        shard = Shard.of(cfg, dist.get_rank(group), dist.get_world_size(group))
        shard_layers(model, shard, group)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = read_state_dict(checkpoint, cfg, shard, expected, dtype, torch.device(device))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    with torch.device(device):
        model.build_rotary()
    return model.to(dtype=dtype).eval(), folder  # the RoPE tables too, as they always were


# safetensors' dtype names -> torch's
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class _Entry:
    file: Path
    name: str  # as stored
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file


def load_embeddings(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Transformer:
    """The target as a drafter sees it: its config, embedding and LM head read from the
    checkpoint (by name, nothing else), its layers left on the meta device, where they take no
    memory and cannot run. A draft worker's footprint is then the drafter's plus these two."""
    _, checkpoint, model = _on_meta(path)
    cfg = model.config
    shape, device = (cfg.vocab_size, cfg.hidden_size), torch.device(device)
    names = {"embed.weight": "embed_tokens.weight"} | (
        {} if cfg.tie_embeddings else {"lm_head.weight": "lm_head.weight"}
    )
    model.load_state_dict(
        {ours: checkpoint.read(theirs, shape, dtype, device) for ours, theirs in names.items()},
        strict=False,
        assign=True,
    )
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def _on_meta(path: str | Path) -> tuple[Path, Checkpoint, Transformer]:
    """The Hugging Face folder at ``path``, its tensors' index, and the model built on the meta
    device from its config: where both loaders start, before any weight is read."""
    folder = resolve_model_dir(path)
    cfg = read_model_config(folder)
    checkpoint = Checkpoint(folder)
    with torch.device("meta"):
        return folder, checkpoint, Transformer(cfg)


def read_model_config(path: str | Path) -> ModelConfig:
    """The decoder config of a model folder or GGUF file, without reading a weight."""
    folder = resolve_model_dir(path)
    try:
        return ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{str(folder)!r} has an unreadable config.json: {exc}") from exc


class Checkpoint:
    """The tensors of a Hugging Face folder, by name without the ``model.`` (or Gemma 3's
    ``model.language_model.``) prefix; each read alone, only the rows asked for.

    The safetensors files are read with plain reads, not mapped: a mapped file's touched pages
    count in the process's resident memory for as long as it stays open, so reading a rank's
    columns of every matrix would make the whole checkpoint resident."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():  # a sharded checkpoint: the index says which file holds each tensor
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (KeyError, AttributeError, json.JSONDecodeError) as exc:
                raise ModelLoadError(f"{str(index)!r} is not a safetensors index: {exc}") from exc
            for file in files:
                if not (folder / file).is_file():
                    raise ModelLoadError(f"{str(index)!r} lists {file!r}, which is missing from {str(folder)!r}")
            paths = [folder / file for file in files]
        else:
            paths = sorted(folder.glob("*.safetensors"))
            if not paths:
                raise ModelLoadError(f"{str(folder)!r} has no *.safetensors weights")
        self._entries = {_strip_prefix(e.name): e for path in paths for e in _header(path)}

    def names(self) -> set[str]:
        return set(self._entries)

    def read(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        rows: range | None = None,
        cols: range | None = None,
    ) -> torch.Tensor:
        """Tensor ``name`` (which must have ``shape``), only ``rows`` / ``cols`` of it, read
        straight into its buffer (a column slice row by row): nothing else is held on the way."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelLoadError(f"{str(self.folder)!r} has no tensor {name!r} (after the model. prefix)")
        if entry.shape != shape:
            raise ModelLoadError(
                f"{entry.name!r} in {str(entry.file)!r} has shape {list(entry.shape)}; the config needs {list(shape)}"
            )
        rows = rows or range(shape[0])
        size = entry.dtype.itemsize
        row_bytes = math.prod(shape[1:]) * size
        cols = cols or range(shape[1] if len(shape) > 1 else 1)
        seg = row_bytes if len(shape) == 1 else len(cols) * size  # bytes kept of each row
        data = torch.empty(len(rows) * seg, dtype=torch.uint8)
        view = memoryview(data.numpy())
        with entry.file.open("rb", buffering=0) as f:
            # whole rows are one read; a column slice is one read per row
            starts = [rows.start * row_bytes] if seg == row_bytes else [r * row_bytes + cols.start * size for r in rows]
            length = len(rows) * seg if seg == row_bytes else seg
            for i, start in enumerate(starts):
                f.seek(entry.offset + start)
                done = 0
                while done < length:  # a raw read may return less than asked (at most 2 GiB on Linux)
                    got = f.readinto(view[i * length + done : (i + 1) * length])
                    if not got:
                        raise ModelLoadError(f"{str(entry.file)!r} ends inside {entry.name!r}: the file is truncated")
                    done += got
        part = data.view(entry.dtype).view(len(rows), *([len(cols)] if len(shape) > 1 else []))
        return part.to(device=device, dtype=dtype)


def _header(path: Path) -> list[_Entry]:
    """The tensors a safetensors file holds: an 8-byte little-endian header length, a JSON
    header of name -> dtype, shape and byte range, then the data."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        entries = [
            _Entry(path, name, _DTYPES[v["dtype"]], tuple(v["shape"]), 8 + size + v["data_offsets"][0])
            for name, v in header.items()
            if name != "__metadata__"
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read weights {str(path)!r}: not a safetensors file we read ({exc})") from exc
    return entries


def _norm_names(cfg: ModelConfig) -> dict[str, str]:
    """Hugging Face names of a layer's norms -> ours. In Llama/Qwen "post_attention_layernorm"
    is the pre-MLP norm; Gemma 3 has four norms around attention and the MLP."""
    names = {"input_layernorm": "attn_norm"}
    if cfg.qk_norm:
        names |= {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}
    if not cfg.sandwich_norm:
        return names | {"post_attention_layernorm": "mlp_norm"}
    return names | {
        "post_attention_layernorm": "post_attn_norm",
        "pre_feedforward_layernorm": "mlp_norm",
        "post_feedforward_layernorm": "post_mlp_norm",
    }


def read_state_dict(
    checkpoint: Checkpoint,
    cfg: ModelConfig,
    shard: Shard | None,
    expected: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Our parameters (``expected``: their shapes) from the checkpoint's tensors, q/k/v and
    gate/up fused into one matmul each, cut to ``shard`` (everything when None)."""
    left = checkpoint.names()
    full = Shard.of(cfg, 0, 1)
    part = shard or full

    def take(name: str, shape: tuple[int, ...], rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        left.discard(name)
        return checkpoint.read(name, shape, dtype, device, rows, cols)

    hidden, d = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_heads * d, cfg.num_kv_heads * d
    vocab = part.rows(cfg, "vocab")
    out = {
        "embed.weight": take("embed_tokens.weight", (cfg.vocab_size, hidden), vocab),
        "norm.weight": take("norm.weight", (hidden,)),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight", (cfg.vocab_size, hidden), vocab)
    left.discard("lm_head.weight")  # tied: some checkpoints still store a copy
    norms = _norm_names(cfg)
    for i in range(cfg.num_layers):
        layer = f"layers.{i}."
        q_rows, kv_rows = part.rows(cfg, "q"), part.rows(cfg, "kv")
        for kind in ("weight", "bias") if cfg.attention_bias else ("weight",):
            qkv = [
                take(f"{layer}self_attn.{p}_proj.{kind}", (n, hidden)[: 2 if kind == "weight" else 1], rows)
                for p, n, rows in zip("qkv", (q_dim, kv_dim, kv_dim), (q_rows, kv_rows, kv_rows))
            ]
            out[f"{layer}attn.wqkv.{kind}"] = torch.cat(qkv)
        out[f"{layer}attn.wo.weight"] = take(f"{layer}self_attn.o_proj.weight", (hidden, q_dim), cols=q_rows)
        channels = part.rows(cfg, "mlp")
        gate_up = [
            take(f"{layer}mlp.{p}_proj.weight", (cfg.intermediate_size, hidden), channels) for p in ("gate", "up")
        ]
        out[f"{layer}mlp.w13.weight"] = torch.cat(gate_up)
        out[f"{layer}mlp.w2.weight"] = take(
            f"{layer}mlp.down_proj.weight", (hidden, cfg.intermediate_size), cols=channels
        )
        for old, new in norms.items():
            out[f"{layer}{new}.weight"] = take(f"{layer}{old}.weight", expected[f"{layer}{new}.weight"])
    if left:
        raise ModelLoadError(f"{str(checkpoint.folder)!r} has tensors the config does not use: {sorted(left)[:5]}")
    for name, shape in expected.items():
        if name not in out and not (cfg.tie_embeddings and name == "lm_head.weight"):
            raise ModelLoadError(f"{str(checkpoint.folder)!r} lacks the weights of {name!r}")
        if name in out and tuple(out[name].shape) != shape:  # a shard's cut: a bug here, not in the file
            raise AssertionError(f"{name}: read {list(out[name].shape)}, the model needs {list(shape)}")
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
