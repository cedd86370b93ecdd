"""Target features for drafter training: one pass of the frozen target over every regenerated
record, kept as safetensors shards so that several drafters train on the same features without
running the target again (DeepSpec's cached-feature path).

Per token we keep the hidden states after the drafter's feature layers (concatenated) and after
the last layer; the latter turns back into the target's distribution through its final norm and
LM head (``Transformer.logits``), which the total-variation and confidence losses need.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tandem.models.decoder import Transformer
from tandem.train.prompts import DataError, read_jsonl

SHARD_RECORDS = 64


@dataclass
class Example:
    """One training sequence: prompt + response tokens and the target's view of each."""

    tokens: torch.Tensor  # [T] int64
    prompt_len: int
    features: torch.Tensor  # [T, F]: hidden states after the feature layers
    final: torch.Tensor  # [T, d]: hidden states after the last layer


def read_records(path: Path) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, response_ids)`` of every record of a ``tandem data`` jsonl file."""
    records = read_jsonl(path, "a `tandem data` record", lambda r: (list(r["prompt_ids"]), list(r["response_ids"])))
    if not records:
        raise DataError(f"{str(path)!r} holds no records")
    return records


def build_store(
    target: Transformer,
    records: Sequence[tuple[list[int], list[int]]],
    feature_layers: Sequence[int],
    folder: Path,
    batch_size: int = 4,
    progress: bool = True,
) -> FeatureStore:
    """Compute (or resume computing) the features of ``records`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"layers": list(feature_layers), "records": len(records), "shard_records": SHARD_RECORDS}
    meta_file = folder / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
        raise DataError(f"{str(folder)!r} holds features of other records or layers; pass another folder")
    meta_file.write_text(json.dumps(meta) + "\n")
    shards = range(0, len(records), SHARD_RECORDS)
    for start in tqdm(shards, desc="target features", unit="shard", disable=not progress):
        path = folder / f"shard-{start // SHARD_RECORDS:05d}.safetensors"
        if not path.exists():
            _write_shard(target, records[start : start + SHARD_RECORDS], feature_layers, path, batch_size)
    return FeatureStore(folder)


@torch.inference_mode()
def _write_shard(
    target: Transformer,
    records: Sequence[tuple[list[int], list[int]]],
    feature_layers: Sequence[int],
    path: Path,
    batch_size: int,
) -> None:
    layers = [*feature_layers, target.config.num_layers - 1]
    sequences = [p + r for p, r in records]
    features, finals = [], []
    for i in range(0, len(sequences), batch_size):
        for feats in _forward(target, sequences[i : i + batch_size], layers):
            features.append(feats[:, : -target.config.hidden_size])
            finals.append(feats[:, -target.config.hidden_size :])
    lengths = torch.tensor([len(s) for s in sequences])
    tensors = {
        "tokens": torch.tensor([t for s in sequences for t in s]),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "prompt_lens": torch.tensor([len(p) for p, _ in records]),
        "features": torch.cat(features).contiguous(),
        "final": torch.cat(finals).contiguous(),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)  # a shard is either complete or absent: resuming never reads half a shard


def _forward(target: Transformer, sequences: Sequence[list[int]], layers: Sequence[int]) -> Iterable[torch.Tensor]:
    """Hidden states ``[T, len(layers) * d]`` of each sequence (one padded causal pass)."""
    longest = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), longest, dtype=torch.long)
    for b, s in enumerate(sequences):
        tokens[b, : len(s)] = torch.tensor(s)
    depths = torch.arange(longest).expand(len(sequences), -1)
    causal = torch.ones(longest, longest, dtype=torch.bool).tril().expand(len(sequences), -1, -1)
    cache = target.new_cache(len(sequences), longest)
    last = torch.zeros(len(sequences), 1, dtype=torch.long)  # logits are not needed here
    _, feats = target.forward_features(tokens, depths, causal, cache, torch.arange(len(sequences)), layers, last)
    return [feats[b, : len(s)] for b, s in enumerate(sequences)]


class FeatureStore:
    """Every shard of a feature folder, held in memory; examples are views into it."""

    def __init__(self, folder: Path) -> None:
        paths = sorted(folder.glob("shard-*.safetensors"))
        if not paths:
            raise DataError(f"{str(folder)!r} has no feature shards")
        self.layers = json.loads((folder / "meta.json").read_text())["layers"]
        self._shards = [load_file(str(p)) for p in paths]
        self._index = [(s, i) for s, shard in enumerate(self._shards) for i in range(len(shard["prompt_lens"]))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Example:
        shard, j = self._index[i]
        data = self._shards[shard]
        a, b = int(data["offsets"][j]), int(data["offsets"][j + 1])
        return Example(data["tokens"][a:b], int(data["prompt_lens"][j]), data["features"][a:b], data["final"][a:b])

    def token_counts(self, vocab_size: int, responses_only: bool = True) -> torch.Tensor:
        """How often each target token occurs (in responses): the reduced draft vocabulary's basis."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for i in range(len(self)):
            ex = self[i]
            counts += torch.bincount(ex.tokens[ex.prompt_len if responses_only else 0 :], minlength=vocab_size)
        return counts


def draft_vocabulary(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids (ties by id), most frequent first."""
    return torch.argsort(-counts, stable=True)[:size]
