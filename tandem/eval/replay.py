"""τ at temperature 0 without the target in the loop, cheap enough to track during training.

Under greedy decoding the output is the target's greedy continuation whatever the drafter, so the
rounds of speculative decoding can be replayed on a known continuation: hand the drafter the
target's features of the tokens each round verified (as the engine does), accept the longest
prefix of its chain that matches the continuation, then the target's bonus token. One prefill
pass per prompt gives every feature; each round then costs one drafter call and no target pass.
The rounds are those of ``tandem eval`` at temperature 0, up to float rounding between one
prefill pass and the engine's verification passes (tested to agree on a tiny model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tandem.devices import HOST, to_host
from tandem.drafters.base import Drafter, DraftRequest
from tandem.engine import Engine, Request
from tandem.models.decoder import Transformer
from tandem.sampling import SamplingParams
from tandem.train.features import sequence_features
from tandem.tree import matched_path


@dataclass
class ReplayCase:
    """One prompt and the target's greedy continuation, with its features at every position."""

    benchmark: str
    prompt_len: int
    tokens: torch.Tensor  # [T]: prompt + continuation
    features: torch.Tensor  # [T, F]: the target's hidden states after the drafter's feature layers


@torch.inference_mode()
def build_cases(
    target: Transformer,
    prompts: Sequence[tuple[str, list[int]]],
    feature_layers: Sequence[int],
    max_tokens: int,
    eos_token_ids: Sequence[int] = (),
) -> list[ReplayCase]:
    """Greedy continuations of ``(benchmark, prompt ids)`` by plain decoding, then their features."""
    engine = Engine(target, None, eos_token_ids)
    results = engine.generate([Request(ids, SamplingParams(max_tokens=max_tokens)) for _, ids in prompts])
    cases = []
    for (benchmark, ids), result in zip(prompts, results):
        sequence = ids + result.token_ids
        (feats,) = to_host(sequence_features(target, sequence, feature_layers).float())
        cases.append(ReplayCase(benchmark, len(ids), torch.tensor(sequence, dtype=torch.long, device=HOST), feats))
    return cases


def save_cases(cases: Sequence[ReplayCase], path: Path) -> None:
    tensors = {}
    for i, c in enumerate(cases):
        tensors[f"{i}.tokens"], tensors[f"{i}.features"] = c.tokens, c.features.contiguous()
        tensors[f"{i}.prompt_len"] = torch.tensor(c.prompt_len, device=HOST)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"benchmarks": ",".join(c.benchmark for c in cases)})
    tmp.rename(path)


def load_cases(path: Path) -> list[ReplayCase]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        benchmarks = f.metadata()["benchmarks"].split(",")
    t = load_file(str(path))
    return [
        ReplayCase(b, int(t[f"{i}.prompt_len"]), t[f"{i}.tokens"], t[f"{i}.features"]) for i, b in enumerate(benchmarks)
    ]


@torch.inference_mode()
def replay(drafter: Drafter, cases: Sequence[ReplayCase], max_draft: int = 16) -> dict[str, float]:
    """τ (accepted drafts + 1 per round) per benchmark and over ``all``, greedy, batch 1."""
    emitted: dict[str, int] = {}
    rounds: dict[str, int] = {}
    for benchmark, _, step in replay_rounds(drafter, cases, max_draft):
        emitted[benchmark] = emitted.get(benchmark, 0) + step
        rounds[benchmark] = rounds.get(benchmark, 0) + 1
    tau = {b: round(emitted[b] / rounds[b], 4) for b in rounds}
    tau["all"] = round(sum(emitted.values()) / max(1, sum(rounds.values())), 4)
    return tau


@torch.inference_mode()
def replay_rounds(drafter: Drafter, cases: Sequence[ReplayCase], max_draft: int = 16) -> Iterator[tuple[str, int, int]]:
    """Every greedy round of the cases in turn: its benchmark, the draft tokens accepted, and the
    tokens it emitted (one more, but never past the continuation's end)."""
    params = SamplingParams(max_tokens=1 << 30)
    for seq_id, case in enumerate(cases):
        tokens, end = case.tokens.tolist(), len(case.tokens)
        known = case.prompt_len + 1  # the prefill emits the first token
        fed = 0  # positions whose features the drafter has been given
        while known < end:
            features = case.features[fed : known - 1]
            request = DraftRequest(seq_id, tokens[:known], min(max_draft, end - known - 1), params, features)
            fed = known - 1
            accepted = len(matched_path(drafter.propose([request])[0], tokens[known:]))
            step = min(accepted + 1, end - known)
            yield case.benchmark, accepted, step
            known += step
        drafter.release(seq_id)
