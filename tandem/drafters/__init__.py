"""Drafters: one file each, one interface (:class:`tandem.drafters.base.Drafter`)."""

from __future__ import annotations

import json
from pathlib import Path

from tandem.drafters.base import Drafter, DraftRequest
from tandem.drafters.dflash import DFlashDrafter, DFlashModel
from tandem.drafters.dspark import DSparkDrafter, DSparkModel
from tandem.drafters.eagle3 import Eagle3Drafter, Eagle3Model
from tandem.drafters.neural import ALGORITHMS, DraftConfig, DraftModel, NeuralDrafter, load_weights, read_config
from tandem.drafters.ngram import NgramDrafter
from tandem.errors import InvalidRequest
from tandem.models.decoder import Transformer
from tandem.tree_search import TreeShape

DRAFTERS = ("none", "ngram", "ngram-tree", *ALGORITHMS)
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "drafters"  # <model name>/<algo>/
MODELS: dict[str, type[DraftModel]] = {"eagle3": Eagle3Model, "dflash": DFlashModel, "dspark": DSparkModel}
ADAPTERS: dict[str, type[NeuralDrafter]] = {"eagle3": Eagle3Drafter, "dflash": DFlashDrafter, "dspark": DSparkDrafter}


def new_draft_model(cfg: DraftConfig, target: Transformer, vocab_map=None) -> DraftModel:
    return MODELS[cfg.algo](cfg, target, vocab_map)


def load_drafter(folder: str | Path, target: Transformer, tree: TreeShape | None = None) -> NeuralDrafter:
    """A trained drafter from its folder (``config.json`` + ``model.safetensors``); chains, or
    trees of ``tree``'s shape."""
    cfg = read_config(folder)
    return ADAPTERS[cfg.algo](load_weights(MODELS[cfg.algo], cfg, folder, target), tree=tree)


def split_spec(spec: str) -> tuple[str, TreeShape | None]:
    """``NAME[:TOPK,DEPTH,BUDGET]`` -> the drafter name and its tree shape (``None``: chains)."""
    name, sep, shape = spec.rpartition(":")
    if not sep or "," not in shape:  # no shape (a folder's path may hold a ":" of its own)
        return spec, None
    try:
        return name, TreeShape.parse(shape)
    except ValueError as exc:
        raise InvalidRequest(f"drafter {spec!r}: {exc}") from None


def shipped_drafter(algo: str, model_name: str) -> Path | None:
    folder = SHIPPED / model_name / algo
    return folder if (folder / "config.json").exists() else None


def default_drafter(model_name: str) -> str:
    """The drafter the shipped results show fastest for the model: ``<model>/default.json`` beside
    its shipped drafters (written with the results, see docs/results.md), else prompt lookup."""
    path = SHIPPED / model_name / "default.json"
    if not path.is_file():
        return "ngram"
    return json.loads(path.read_text(encoding="utf-8"))["drafter"]


def check_drafter_name(spec: str) -> None:
    """Refuse an unknown drafter (or a tree on one that cannot branch) before any slow model load."""
    name, tree = split_spec(spec)
    if tree is not None and name in ("none", "ngram", "ngram-tree"):
        raise InvalidRequest(f"drafter {name!r} takes no tree shape; trees are for {', '.join(ALGORITHMS)}")
    if name not in DRAFTERS and not (Path(name) / "config.json").exists():
        raise InvalidRequest(f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)} or a drafter folder")


def make_drafter(spec: str, target: Transformer | None = None, model_name: str = "") -> Drafter | None:
    """A drafter by name or folder; ``none`` means plain decoding. Trained ones (``eagle3``,
    ``dflash``, ``dspark``) are the drafters shipped for ``model_name``, loaded next to ``target``;
    ``NAME:TOPK,DEPTH,BUDGET`` makes them draft trees of that shape."""
    check_drafter_name(spec)
    name, tree = split_spec(spec)
    if name == "none":
        return None
    if name == "ngram":
        return NgramDrafter(depth=8, branches=1)
    if name == "ngram-tree":
        return NgramDrafter(depth=6, branches=3)
    folder = shipped_drafter(name, model_name) if name in ALGORITHMS else Path(name)
    if folder is None:
        raise InvalidRequest(f"no {name} drafter is shipped for {model_name!r}; pass a drafter folder")
    if target is None:
        raise InvalidRequest(f"drafter {name!r} needs its target model")
    return load_drafter(folder, target, tree)


__all__ = [
    "DRAFTERS",
    "DraftConfig",
    "DraftModel",
    "DraftRequest",
    "Drafter",
    "NeuralDrafter",
    "NgramDrafter",
    "check_drafter_name",
    "default_drafter",
    "load_drafter",
    "make_drafter",
    "new_draft_model",
    "split_spec",
]
