"""Drafters: one file each, one interface (:class:`tandem.drafters.base.Drafter`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tandem.drafters.base import Drafter, DraftRequest
from tandem.drafters.dflash import DFlashDrafter, DFlashModel
from tandem.drafters.dspark import DSparkDrafter, DSparkModel
from tandem.drafters.eagle3 import Eagle3Drafter, Eagle3Model
from tandem.drafters.formats import drafter_config, load_published, published_format
from tandem.drafters.hybrid import HybridDrafter
from tandem.drafters.neural import (
    ALGORITHMS,
    DraftConfig,
    DraftModel,
    NeuralDrafter,
    load_weights,
    read_config,
    read_json_config,
)
from tandem.drafters.ngram import NgramDrafter
from tandem.drafters.suffix import SuffixDrafter
from tandem.errors import InvalidRequest
from tandem.kernels.cpu import KernelUnavailable, exact_kernels
from tandem.models.decoder import Transformer
from tandem.tree_search import TreeShape

DRAFTERS = ("none", "ngram", "ngram-tree", "suffix", "hybrid", *ALGORITHMS)
CHAIN = "chain"  # NAME:chain: a trained drafter drafting chains instead of its default trees
UNTRAINED = ("none", "ngram", "ngram-tree", "suffix")  # no target model needed, no tree shape taken
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "drafters"  # <model name>/<algo>/
MODELS: dict[str, type[DraftModel]] = {"eagle3": Eagle3Model, "dflash": DFlashModel, "dspark": DSparkModel}
ADAPTERS: dict[str, type[NeuralDrafter]] = {"eagle3": Eagle3Drafter, "dflash": DFlashDrafter, "dspark": DSparkDrafter}


def new_draft_model(cfg: DraftConfig, target: Transformer, vocab_map=None) -> DraftModel:
    return MODELS[cfg.algo](cfg, target, vocab_map)


def load_draft_model(folder: str | Path, target: Transformer) -> DraftModel:
    """The model of a drafter folder next to ``target``: one ``tandem train`` wrote, or a
    published EAGLE-3, DFlash or DSpark checkpoint (:mod:`tandem.drafters.formats`)."""
    hf = read_json_config(folder)
    fmt = published_format(hf)
    if fmt is not None:
        return load_published(folder, hf, fmt, target, lambda cfg, vocab: new_draft_model(cfg, target, vocab))
    cfg = read_config(folder)
    return load_weights(MODELS[cfg.algo], cfg, folder, target)


def load_drafter(
    folder: str | Path, target: Transformer, tree: TreeShape | None = None, exact: bool | None = None
) -> NeuralDrafter:
    """A trained drafter from its folder (:func:`load_draft_model`); chains, or trees of
    ``tree``'s shape. ``exact``: its passes on the packed kernels, which draft faster (None: when
    its target runs on them; True: wherever they run, as a draft replica asks, whose target is
    only an embedding and an LM head)."""
    model = load_draft_model(folder, target)
    packed = target.exact if exact is None else exact and _kernels_run(model)
    if packed and model.fc.weight.dtype == target.dtype:
        model.use_exact_kernels(exact_kernels())
    return ADAPTERS[model.config.algo](model, tree=tree)


def _kernels_run(model: DraftModel) -> bool:
    """Whether the packed kernels run ``model`` here (bf16 or float32 on a CPU that has them)."""
    weight = model.fc.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
        return False
    try:
        exact_kernels()
    except KernelUnavailable:
        return False
    return True


def split_spec(spec: str) -> tuple[str, TreeShape | str | None]:
    """``NAME[:TOPK,DEPTH,BUDGET|:chain]`` -> the drafter name and its tree shape (:data:`CHAIN`:
    chains; ``None``: the drafter's default)."""
    name, sep, shape = spec.rpartition(":")
    if sep and shape == CHAIN:
        return name, CHAIN
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
    its shipped drafters (written with the results, see docs/results.md), else the suffix drafter
    (no training needed, and it beats prompt lookup in docs/results.md)."""
    path = SHIPPED / model_name / "default.json"
    if not path.is_file():
        return "suffix"
    return json.loads(path.read_text(encoding="utf-8"))["drafter"]


def hybrid_part(name: str) -> str | None:
    """The trained drafter in ``hybrid[:ALGO|FOLDER]`` (``dspark`` by default); ``None``: no hybrid."""
    if name == "hybrid":
        return "dspark"
    return name.removeprefix("hybrid:") if name.startswith("hybrid:") else None


def check_drafter_name(spec: str) -> None:
    """Refuse an unknown drafter (or a tree on one that cannot branch) before any slow model load."""
    name, tree = split_spec(spec)
    if tree not in (None, CHAIN) and name in UNTRAINED:
        raise InvalidRequest(f"drafter {name!r} takes no tree shape; trees are for {', '.join(ALGORITHMS)} and hybrid")
    inner = hybrid_part(name)
    if inner is not None and inner not in ALGORITHMS and not (Path(inner) / "config.json").exists():
        raise InvalidRequest(f"drafter {name!r}: a hybrid's second part is one of {', '.join(ALGORITHMS)} or a folder")
    if inner is None and name not in DRAFTERS and not (Path(name) / "config.json").exists():
        raise InvalidRequest(f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)} or a drafter folder")


def with_tree(spec: str, tree: str | None = None, chain: bool = False) -> str:
    """``spec`` with the ``--tree``/``--chain`` flags applied: ``--chain`` ends in ``:chain``."""
    if tree and chain:
        raise InvalidRequest("--tree and --chain exclude each other")
    if (tree or chain) and split_spec(spec)[1] is not None:
        raise InvalidRequest(f"drafter {spec!r} already has a tree shape; drop --tree/--chain")
    return f"{spec}:{tree}" if tree else f"{spec}:chain" if chain else spec


def trained_folder(spec: str, model_name: str) -> Path | None:
    """The folder of the trained drafter that ``spec`` uses (a hybrid's trained part); ``None``
    for the untrained ones."""
    name, _ = split_spec(spec)
    if name in UNTRAINED:
        return None
    trained = hybrid_part(name) or name
    folder = shipped_drafter(trained, model_name) if trained in ALGORITHMS else Path(trained)
    if folder is None:
        raise InvalidRequest(f"no {trained} drafter is shipped for {model_name!r}; pass a drafter folder")
    return folder


def make_drafter(
    spec: str, target: Transformer | None = None, model_name: str = "", exact: bool | None = None
) -> Drafter | None:
    """A drafter by name or folder; ``none`` means plain decoding. Trained ones (``eagle3``,
    ``dflash``, ``dspark``) are the drafters shipped for ``model_name``, loaded next to ``target``;
    they draft dynamic trees (:class:`TreeShape`'s default shape), of another shape with
    ``NAME:TOPK,DEPTH,BUDGET``, chains with ``NAME:chain``. ``hybrid[:ALGO|FOLDER]`` pairs the
    suffix drafter with a trained one (shipped ``dspark`` by default; a tree shape is its).
    ``exact``: as :func:`load_drafter`'s."""
    check_drafter_name(spec)
    name, tree = split_spec(spec)
    if name == "none":
        return None
    if name == "ngram":
        return NgramDrafter(depth=8, branches=1)
    if name == "ngram-tree":
        return NgramDrafter(depth=6, branches=3)
    if name == "suffix":
        return SuffixDrafter()
    folder = trained_folder(spec, model_name)
    inner = hybrid_part(name)
    if target is None:
        raise InvalidRequest(f"drafter {name!r} needs its target model")
    neural = load_drafter(folder, target, None if tree == CHAIN else tree or TreeShape(), exact)
    return neural if inner is None else HybridDrafter(SuffixDrafter(), neural)


__all__ = [
    "DRAFTERS",
    "DraftConfig",
    "DraftModel",
    "DraftRequest",
    "Drafter",
    "HybridDrafter",
    "NeuralDrafter",
    "NgramDrafter",
    "SuffixDrafter",
    "UNTRAINED",
    "check_drafter_name",
    "default_drafter",
    "drafter_config",
    "load_draft_model",
    "load_drafter",
    "make_drafter",
    "new_draft_model",
    "split_spec",
    "trained_folder",
    "with_tree",
]
