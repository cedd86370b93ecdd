"""Target features for drafter training: one pass of the frozen target over every regenerated
record, kept as safetensors shards so that several drafters train on the same features without
running the target again (DeepSpec's cached-feature path).

Per token we keep the hidden states after the drafter's feature layers (concatenated) and after
the last layer, stored in bfloat16, and the log-normaliser of the target's logits (float32). With
them the target's probability of any token ``v`` is ``exp(logit_v - lse)``: the total-variation and
confidence losses need it only on the draft vocabulary, so training never multiplies by the whole
LM head (6x the rows of the draft vocabulary's).

The target's greedy token at each position is kept too (int32): teacher-forced records (text the
target did not write) take their labels from it instead of from the text's next token.

Sequences go through the target one at a time: on a CPU a padded batch is slower (measured: 373,
279 and 208 tok/s at 1, 4 and 8 sequences, float32, 2 cores).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tandem.devices import HOST, host_tensor, to_host
from tandem.models.decoder import Transformer
from tandem.train.prompts import DataError, read_jsonl

SHARD_RECORDS = 64
FORMAT = 2  # 2: bfloat16 features and final hidden states, float32 ``lse``


@dataclass
class Example:
    """One training sequence: prompt + response tokens and the target's view of each."""

    tokens: torch.Tensor  # [T] int64
    prompt_len: int
    features: torch.Tensor  # [T, F]: hidden states after the feature layers
    final: torch.Tensor  # [T, d]: hidden states after the last layer
    lse: torch.Tensor  # [T]: logsumexp of the target's logits at each position
    labels: torch.Tensor  # [T]: the token a drafter learns to predict after each position (last unused)

    def to(self, device: torch.device) -> Example:
        """The example on the trainer's device (copies queued without blocking)."""
        moved = {
            k: getattr(self, k).to(device, non_blocking=True) for k in ("tokens", "features", "final", "lse", "labels")
        }
        return Example(prompt_len=self.prompt_len, **moved)


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
    progress: bool = True,
    teacher_forced: bool = False,
) -> FeatureStore:
    """Compute (or resume computing) the features of ``records`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"layers": list(feature_layers), "records": len(records), "shard_records": SHARD_RECORDS, "format": FORMAT}
    meta_file = folder / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
        raise DataError(f"{str(folder)!r} holds features of other records or layers; pass another folder")
    meta_file.write_text(json.dumps(meta) + "\n")
    shards = range(0, len(records), SHARD_RECORDS)
    total = sum(len(p) + len(r) for p, r in records)
    with tqdm(total=total, desc="target features", unit="tok", unit_scale=True, disable=not progress) as bar:
        for start in shards:
            path = folder / f"shard-{start // SHARD_RECORDS:05d}.safetensors"
            chunk = records[start : start + SHARD_RECORDS]
            if not path.exists():
                _write_shard(target, chunk, feature_layers, path)
            bar.update(sum(len(p) + len(r) for p, r in chunk))
    return FeatureStore(folder, teacher_forced)


@torch.inference_mode()
def _write_shard(
    target: Transformer,
    records: Sequence[tuple[list[int], list[int]]],
    feature_layers: Sequence[int],
    path: Path,
) -> None:
    sequences = [p + r for p, r in records]
    per_record = [record_tensors(target, sequence, feature_layers) for sequence in sequences]
    offsets = [0, *itertools.accumulate(len(s) for s in sequences)]
    computed = to_host(*(torch.cat(t).contiguous() for t in zip(*per_record)))  # one sync a shard
    tensors = {
        "tokens": torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=HOST),
        "offsets": torch.tensor(offsets, dtype=torch.long, device=HOST),
        "prompt_lens": torch.tensor([len(p) for p, _ in records], dtype=torch.long, device=HOST),
        **dict(zip(("features", "final", "lse", "greedy"), computed)),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)  # a shard is either complete or absent: resuming never reads half a shard


@torch.inference_mode()
def record_tensors(
    target: Transformer, sequence: Sequence[int], feature_layers: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the trainer reads of one sequence: features [T, F] and final hidden states [T, d]
    (bfloat16), the logsumexp of the logits [T] (float32) and the greedy tokens [T] (int32)."""
    d = target.config.hidden_size
    feats = sequence_features(target, sequence, [*feature_layers, target.config.num_layers - 1]).to(torch.bfloat16)
    final = feats[:, -d:]
    # Of the stored (rounded) final states, so that exp(logits - lse) sums to exactly 1.
    logits = target.logits(final.to(target.dtype))
    return feats[:, :-d], final, torch.logsumexp(logits, -1), logits.argmax(-1).to(torch.int32)


def sequence_features(target: Transformer, sequence: Sequence[int], layers: Sequence[int]) -> torch.Tensor:
    """Hidden states ``[T, len(layers) * d]`` of one sequence (one causal pass)."""
    n, device = len(sequence), target.device
    causal = torch.ones(1, n, n, dtype=torch.bool, device=device).tril()
    last = torch.zeros(1, 1, dtype=torch.long, device=device)  # logits are not needed here
    tokens = host_tensor([list(sequence)], torch.long, device)
    positions = torch.arange(n, device=device)[None]
    _, feats = target.forward_features(tokens, positions, causal, target.new_cache(1, n), [0], layers, last)
    return feats[0]


class FeatureStore:
    """Every shard of a feature folder, held in memory; examples are views into it.

    ``teacher_forced``: the records' responses are not the target's own (``tandem data
    --responses dataset``), so labels are the target's greedy tokens, not the text's next tokens."""

    def __init__(self, folder: Path, teacher_forced: bool = False) -> None:
        paths = sorted(folder.glob("shard-*.safetensors"))
        if not paths:
            raise DataError(f"{str(folder)!r} has no feature shards")
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise DataError(f"{str(folder)!r} holds features in an older format; delete it to rebuild")
        self.layers = meta["layers"]
        self._shards = [load_file(str(p)) for p in paths]
        self._index = [(s, i) for s, shard in enumerate(self._shards) for i in range(len(shard["prompt_lens"]))]
        self.teacher_forced = teacher_forced
        if teacher_forced and any("greedy" not in shard for shard in self._shards):
            raise DataError(f"{str(folder)!r} predates teacher-forced labels (no greedy tokens); delete it to rebuild")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Example:
        shard, j = self._index[i]
        data = self._shards[shard]
        a, b = int(data["offsets"][j]), int(data["offsets"][j + 1])
        tokens, features, final, lse = (data[k][a:b] for k in ("tokens", "features", "final", "lse"))
        labels = data["greedy"][a:b].long() if self.teacher_forced else _next_tokens(tokens)
        return Example(tokens, int(data["prompt_lens"][j]), features, final, lse, labels)

    def token_counts(self, vocab_size: int, examples: Sequence[int] | None = None) -> torch.Tensor:
        """How often each token is a label of a response position (in ``examples``, default all):
        the draft vocabulary's basis."""
        chosen = map(self.__getitem__, range(len(self)) if examples is None else examples)
        return _label_counts(((ex.labels, ex.prompt_len) for ex in chosen), vocab_size)


class OnlineStore:
    """The target's view of each record computed when the trainer reads it (``tandem train
    --features online``): no cache on disk, the very numbers a :class:`FeatureStore` of the same
    records holds (the same pass of one record alone, the same rounding), at the cost of a target
    pass per example read."""

    def __init__(
        self,
        target: Transformer,
        records: Sequence[tuple[list[int], list[int]]],
        feature_layers: Sequence[int],
        teacher_forced: bool = False,
    ) -> None:
        self.target, self.records, self.layers = target, records, list(feature_layers)
        self.teacher_forced = teacher_forced

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        prompt, response = self.records[i]
        tokens = torch.tensor([*prompt, *response], dtype=torch.long, device=HOST)
        features, final, lse, greedy = to_host(*record_tensors(self.target, tokens.tolist(), self.layers))
        labels = greedy.long() if self.teacher_forced else _next_tokens(tokens)
        return Example(tokens, len(prompt), features, final, lse, labels)

    def token_counts(self, vocab_size: int, examples: Sequence[int] | None = None) -> torch.Tensor:
        """As :meth:`FeatureStore.token_counts`; a target pass per record only for teacher-forced data."""
        chosen = range(len(self)) if examples is None else examples
        if self.teacher_forced:
            pairs = ((ex.labels, ex.prompt_len) for ex in map(self.__getitem__, chosen))
        else:
            records = (self.records[i] for i in chosen)
            pairs = ((_next_tokens(torch.tensor([*p, *r], device=HOST)), len(p)) for p, r in records)
        return _label_counts(pairs, vocab_size)


def _next_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Each position's label in a record the target wrote: the next token (the last is unused)."""
    return torch.cat([tokens[1:], tokens[-1:]])


def _label_counts(pairs: Iterable[tuple[torch.Tensor, int]], vocab_size: int) -> torch.Tensor:
    """Counts of the labels of response positions, over (labels, prompt length) pairs."""
    counts = torch.zeros(vocab_size, dtype=torch.long, device=HOST)
    for labels, prompt_len in pairs:
        counts += torch.bincount(labels[max(prompt_len - 1, 0) : -1], minlength=vocab_size)
    return counts


Store = FeatureStore | OnlineStore  # what the trainer reads examples from


def draft_vocabulary(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids (ties by id), most frequent first."""
    return torch.argsort(-counts, stable=True)[:size]
