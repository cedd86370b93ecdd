"""A target model ready to serve: decoder weights plus the tokenizer stored beside them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.devices import resolve_device
from tandem.models.catalog import DEFAULT_MODEL, resolve_model_path
from tandem.models.decoder import Transformer
from tandem.models.exact import apply_exact
from tandem.models.loading import load_model
from tandem.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Target:
    model: Transformer
    tokenizer: Tokenizer
    folder: Path

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.tokenizer.eos_token_ids + self.model.config.eos_token_ids))


def load_target(
    name_or_path: str | Path = DEFAULT_MODEL,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    exact: bool | None = None,
) -> Target:
    """Load a built-in model by name, a Hugging Face folder or a .gguf file, onto ``device``
    (``auto``: CUDA when present); ``exact``: the batch-invariant kernels (None: where they run,
    see :mod:`tandem.models.exact`)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model, folder = load_model(resolve_model_path(name_or_path), dtype, resolve_device(device))
    apply_exact(model, exact)
    return Target(model, Tokenizer(folder), folder)
