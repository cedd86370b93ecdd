"""Our decoder against Hugging Face transformers: same weights must give the same logits.

Tiny random models of every family exercise prefill, incremental decoding, token trees, batched
rows with different lengths and cache compaction; the real built-in models are checked once each.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
)

from tandem.errors import ModelLoadError
from tandem.models.catalog import resolve_model_path
from tandem.models.config import ModelConfig
from tandem.models.decoder import Transformer
from tandem.models.kv_cache import KVCache
from tandem.models.loading import load_model
from tandem.tokenizer import Tokenizer
from tandem.tree import ancestor_mask, path_to, tree_depths
from tests.tiny_models import FAMILIES, WINDOW, build_tiny, tiny_config

ATOL = 1e-4  # fp32 vs fp32: only summation order differs
SEQ_LEN = 40  # longer than the tiny Gemma's sliding window (8), several times over
VOCAB = 160

# A branching tree: node -> parent. Node 7 hangs off the root although it sits last in the block,
# so its cache slot (prefix + 7) differs from its position (prefix + 1): this catches a sliding
# window or RoPE computed from slots instead of positions.
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 4, 0]
# Deeper than the window: a side branch (1-3) comes first, so nodes on the main chain (4-12) sit
# at slots past their positions; an ancestor 8 positions up must drop out of the sliding window
# even though its slot is closer. Node 13 branches off the middle of the chain.
DEEP_TREE_PARENTS = [-1, 0, 1, 2, 0, 4, 5, 6, 7, 8, 9, 10, 11, 6]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, PreTrainedModel, Path]:
    """(family, reference HF model in fp32, saved folder) built once per family."""
    family = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{family}")
    return family, build_tiny(family, folder, VOCAB), folder


@pytest.fixture(scope="module")
def tiny_ours(tiny: tuple[str, PreTrainedModel, Path]) -> Transformer:
    model, _ = load_model(tiny[2], torch.float32)
    return model


def _hf_logits(hf: PreTrainedModel, ids: Sequence[int]) -> torch.Tensor:
    """``[T, V]`` float32 logits of one sequence."""
    with torch.no_grad():
        return hf(torch.tensor([list(ids)])).logits[0].float()


def _random_ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=gen).tolist()


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"{what}: max |ours - hf| = {diff:.2e} > {atol:.0e}"


def test_tiny_weights_are_not_trivial(tiny: tuple[str, PreTrainedModel, Path]) -> None:
    """Guards the other tests: attention must depend on context, or mask bugs would go unseen."""
    _, hf, _ = tiny
    ids = _random_ids(SEQ_LEN, seed=1)
    changed = ids[:30] + [(ids[30] + 1) % VOCAB] + ids[31:]
    logits, changed_logits = _hf_logits(hf, ids), _hf_logits(hf, changed)
    assert logits.std().item() > 0.3
    # A token earlier in the context moves later logits well beyond the tolerance.
    assert (logits[31:] - changed_logits[31:]).abs().max().item() > 1e-2


def test_prefill_matches_hf(tiny: tuple[str, PreTrainedModel, Path], tiny_ours: Transformer) -> None:
    _, hf, _ = tiny
    ids = _random_ids(SEQ_LEN, seed=2)
    cache = tiny_ours.new_cache(1, 64)
    ours = tiny_ours.block_logits(ids, cache, 0)
    _close(ours, _hf_logits(hf, ids), "prefill")


def test_logit_index_picks_positions(tiny: tuple[str, PreTrainedModel, Path], tiny_ours: Transformer) -> None:
    _, hf, _ = tiny
    ids = _random_ids(SEQ_LEN, seed=3)
    picks = [0, 17, SEQ_LEN - 1]
    par = list(range(-1, SEQ_LEN - 1))
    ours = tiny_ours(
        torch.tensor([ids]),
        torch.tensor([tree_depths(par)]),
        ancestor_mask(par, "cpu")[None],
        tiny_ours.new_cache(1, 64),
        [0],
        torch.tensor([picks]),
    )[0]
    assert ours.shape == (len(picks), VOCAB)
    _close(ours, _hf_logits(hf, ids)[picks], "logit_index")


@pytest.mark.parametrize("chunks", [[1] * 16, [3, 1, 5, 2, 4, 1]])
def test_incremental_decoding_matches_hf(
    tiny: tuple[str, PreTrainedModel, Path], tiny_ours: Transformer, chunks: list[int]
) -> None:
    """Prefill, then feed the rest one token or a chunk at a time; the cache must carry state."""
    _, hf, _ = tiny
    ids = _random_ids(SEQ_LEN, seed=4)
    ref = _hf_logits(hf, ids)
    prefill = SEQ_LEN - sum(chunks)
    cache = tiny_ours.new_cache(2, 64)
    row = 1  # the second row: rows must not leak into each other
    _close(tiny_ours.block_logits(ids[:prefill], cache, row), ref[:prefill], "prefill")
    cache.commit(row, range(prefill))
    at = prefill
    for size in chunks:
        ours = tiny_ours.block_logits(ids[at : at + size], cache, row)
        _close(ours, ref[at : at + size], f"tokens {at}..{at + size - 1}")
        cache.commit(row, range(size))
        at += size
    assert cache.lengths[row] == SEQ_LEN and cache.lengths[0] == 0


def _prefilled(model: Transformer, prefix: Sequence[int], rows: int = 1, row: int = 0) -> KVCache:
    cache = model.new_cache(rows, 64)
    model.block_logits(prefix, cache, row)
    cache.commit(row, range(len(prefix)))
    return cache


@pytest.mark.parametrize("tree_parents", [TREE_PARENTS, DEEP_TREE_PARENTS], ids=["bushy", "deep"])
def test_tree_pass_matches_hf_paths(
    tiny: tuple[str, PreTrainedModel, Path], tiny_ours: Transformer, tree_parents: list[int]
) -> None:
    """Each tree node sees the prefix and its own ancestors only: its logits equal HF's on that path."""
    _, hf, _ = tiny
    prefix = _random_ids(20, seed=5)
    tree = _random_ids(len(tree_parents), seed=6)
    cache = _prefilled(tiny_ours, prefix)
    ours = tiny_ours.block_logits(tree, cache, 0, parents=tree_parents)
    parents = tree_parents
    paths = [prefix + [tree[i] for i in path_to(parents, node)] for node in range(len(tree_parents))]
    # One HF call for all root-to-node paths: right padding cannot affect earlier causal positions.
    width = max(map(len, paths))
    with torch.no_grad():
        ref = hf(torch.tensor([p + [0] * (width - len(p)) for p in paths])).logits.float()
    for node, path in enumerate(paths):
        _close(ours[node], ref[node, len(path) - 1], f"tree node {node}")


def test_commit_accepted_path_then_continue(tiny: tuple[str, PreTrainedModel, Path], tiny_ours: Transformer) -> None:
    """Two rounds of tree, accept a non-contiguous path, compact; decoding continues correctly."""
    _, hf, _ = tiny
    seq = _random_ids(20, seed=7)
    cache = _prefilled(tiny_ours, seq)
    parents = TREE_PARENTS
    for round_, accepted in enumerate([6, 5]):  # paths [0, 1, 4, 6] and [0, 2, 5]
        tree = _random_ids(len(TREE_PARENTS), seed=8 + round_)
        tiny_ours.block_logits(tree, cache, 0, parents=TREE_PARENTS)
        kept = path_to(parents, accepted)
        cache.commit(0, kept)
        seq = seq + [tree[i] for i in kept]
        assert cache.lengths[0] == len(seq)
    follow = _random_ids(3, seed=10)
    ours = tiny_ours.block_logits(follow, cache, 0)
    _close(ours, _hf_logits(hf, seq + follow)[-len(follow) :], "after compaction")


def test_batched_rows_with_different_lengths(tiny: tuple[str, PreTrainedModel, Path], tiny_ours: Transformer) -> None:
    """Rows padded to one block, then decoded together from different cached lengths, give each
    row's own logits (as HF and as a single-row run)."""
    _, hf, _ = tiny
    lengths = [12, 25, 18]
    rows = [2, 0, 3]  # not a contiguous range: the gathered cache read path
    prompts = [_random_ids(n, seed=20 + i) for i, n in enumerate(lengths)]
    follows = [_random_ids(3, seed=30 + i) for i in range(len(lengths))]
    width = max(lengths)
    chain = ancestor_mask(range(-1, width - 1), "cpu")
    # Padding is a causal continuation of each prompt: real tokens cannot see it, it is not committed.
    tokens = torch.tensor([p + [VOCAB - 1] * (width - len(p)) for p in prompts])
    depths = torch.arange(width).expand(len(lengths), width)
    last = torch.tensor([[n - 1] for n in lengths])
    cache = tiny_ours.new_cache(4, 64)
    first = tiny_ours(tokens, depths, chain.expand(len(lengths), width, width), cache, rows, last)
    for i, row in enumerate(rows):
        cache.commit(row, range(lengths[i]))
    # Now the rows' prefixes differ, and slots past the shorter ones hold stale padding.
    block = ancestor_mask(range(-1, 2), "cpu").expand(len(lengths), 3, 3)
    second = tiny_ours(torch.tensor(follows), torch.arange(3).expand(len(lengths), 3), block, cache, rows)
    for i in range(len(lengths)):
        ref = _hf_logits(hf, prompts[i] + follows[i])
        _close(first[i, 0], ref[lengths[i] - 1], f"row {i} prompt")
        _close(second[i], ref[lengths[i] :], f"row {i} decode")
        alone_cache = _prefilled(tiny_ours, prompts[i], rows=2, row=1)
        _close(second[i], tiny_ours.block_logits(follows[i], alone_cache, 1), f"row {i} vs alone")


def test_bfloat16_close_to_fp32_reference(tiny: tuple[str, PreTrainedModel, Path]) -> None:
    """bf16 keeps 8 mantissa bits (relative error ~4e-3 per op). Tolerance: max abs deviation of 8%
    of the reference logits' max magnitude (HF's own bf16 model deviates up to ~5% on these tiny
    models; a real bug such as a missing norm offset deviates by O(100%)); the greedy token must
    agree on at least 90% of positions, and everywhere HF's top-2 margin exceeds twice the bound."""
    _, hf, folder = tiny
    model, _ = load_model(folder, torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ids = _random_ids(SEQ_LEN, seed=11)
    cache = model.new_cache(1, 64)
    ours = model.block_logits(ids[:30], cache, 0)
    cache.commit(0, range(30))
    ours = torch.cat([ours, model.block_logits(ids[30:], cache, 0)])
    assert ours.dtype == torch.float32
    ref = _hf_logits(hf, ids)
    tol = 0.08 * ref.abs().max().item()
    _close(ours, ref, "bf16", atol=tol)
    agree = ours.argmax(-1) == ref.argmax(-1)
    assert agree.float().mean().item() >= 0.9
    top2 = ref.topk(2, dim=-1).values
    assert bool(agree[(top2[:, 0] - top2[:, 1]) > 2 * tol].all())


# ----------------------------------------------------------------------------- real models

REAL_PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens, and watched the fishing boats return to the harbour one by one, their lanterns "
    "swaying"
)


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def real(request: pytest.FixtureRequest) -> tuple[Transformer, PreTrainedModel, list[int]]:
    """Ours and HF's fp32 model on the same converted folder (GGUF converted once, then cached),
    plus a tokenized prompt; loaded once per module."""
    ours, folder = load_model(resolve_model_path(request.param), torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = Tokenizer(folder).encode(REAL_PROMPT, chat=False)
    return ours, hf, ids


@pytest.mark.slow
def test_real_model_matches_hf(real: tuple[Transformer, PreTrainedModel, list[int]]) -> None:
    ours, hf, ids = real
    assert 30 <= len(ids) <= 60
    ref = _hf_logits(hf, ids)
    cache = ours.new_cache(1, 128)
    got = ours.block_logits(ids[:-4], cache, 0)
    cache.commit(0, range(len(ids) - 4))
    got = torch.cat([got, ours.block_logits(ids[-4:], cache, 0)])  # cached decoding, not just prefill
    _close(got, ref, "real model", atol=1e-3)
    assert got[-1].argmax().item() == ref[-1].argmax().item()


# ----------------------------------------------------------------------------- config translation


def _hf_dict(**overrides: object) -> dict[str, object]:
    base = tiny_config("llama", VOCAB).to_dict()
    base.update(overrides)
    return base


def test_config_accepts_supported_families() -> None:
    for family in FAMILIES:
        cfg = ModelConfig.from_hf(tiny_config(family, VOCAB).to_dict())
        assert cfg.family == family
    gemma = ModelConfig.from_hf(tiny_config("gemma3", VOCAB).to_dict())
    assert gemma.sliding_window == WINDOW and gemma.local_rope.theta == 100.0 and gemma.rope.theta == 10000.0
    assert gemma.query_scale == pytest.approx(32**-0.5)


def test_config_rejects_unsupported_model_type() -> None:
    with pytest.raises(ModelLoadError, match="unsupported model_type"):
        ModelConfig.from_hf(_hf_dict(model_type="mistral"))
    with pytest.raises(ModelLoadError):
        ModelConfig.from_hf({"hidden_size": 64})
