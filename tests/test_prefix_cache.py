"""The paged KV cache's admission and prefix caching (tandem/prefix_cache.py): which blocks a
prompt finds, sharing without copies, LRU eviction of unused blocks, admission by free blocks, and
output with prefix hits equal to cold output (greedy and sampled, batch 1 and batched, with
drafters, on the exact kernels where hits are the same bits by construction)."""

from __future__ import annotations

import random

import pytest
import torch

from tandem.drafters import NgramDrafter, make_drafter
from tandem.engine import Engine, Request
from tandem.errors import NoRoom
from tandem.kernels.cpu import KernelUnavailable, exact_kernels
from tandem.models.catalog import DEFAULT_MODEL
from tandem.models.exact import apply_exact
from tandem.models.kv_cache import KVCache
from tandem.models.loading import load_model
from tandem.prefix_cache import PrefixCache
from tandem.sampling import SamplingParams
from tandem.tree import chain
from tandem.verifier import Verifier
from tests.tiny_models import build_tiny

VOCAB = 64


def _pool(blocks: int = 16, rows: int = 3) -> KVCache:
    """A float32 pool of 4-token blocks with a prefix cache over it."""
    cache = KVCache(2, rows, 2, 64, 8, torch.float32, torch.device("cpu"), blocks=blocks, block_size=4)
    PrefixCache(cache)
    return cache


def _finished(cache: KVCache, tokens: list[int], features: torch.Tensor | None = None) -> list[int]:
    """A sequence of ``tokens`` that ends: its row takes blocks, indexes them and lets go; returns
    its blocks."""
    row = cache.take_row()
    cache.reserve({row: len(tokens)})
    cache.lengths[row] = len(tokens)
    blocks = list(cache.tables[row])
    cache.keeper.store(row, tokens, features)
    cache.release(row)
    return blocks


def test_a_prompt_finds_its_longest_run_of_whole_cached_blocks():
    cache = _pool()
    prefix = cache.keeper
    prompt = list(range(20))
    _finished(cache, prompt)
    assert prefix.blocks_cached == 5 and cache.blocks_in_use == 0 and cache.free_blocks == 16
    assert len(prefix.match(prompt + [50, 51])) == 5
    assert len(prefix.match(prompt)) == 4, "the last prompt token is always computed (it gives the first token)"
    assert len(prefix.match(prompt[:9])) == 2
    assert len(prefix.match(prompt[:6] + [60] + prompt[7:])) == 1, "a changed token ends the run at its block"
    assert prefix.match([60] + prompt[1:]) == [], "later blocks are found only after the same earlier ones"
    _finished(cache, prompt)
    assert prefix.blocks_cached == 5, "the same tokens again add nothing: the second copy is freed"


def test_a_hit_shares_the_blocks_without_copying_and_they_outlive_both_rows():
    cache = _pool()
    prefix = cache.keeper
    prompt = list(range(14))
    features = torch.randn(len(prompt), 5, generator=torch.Generator().manual_seed(2))
    blocks = _finished(cache, prompt, features)
    row = cache.take_row()
    hit = prefix.load(row, prompt + [99])
    assert hit.tokens == 12 and cache.lengths[row] == 12 and cache.tables[row] == blocks[:3]
    assert torch.equal(hit.features, features[:12])
    assert (prefix.queried_tokens, prefix.hit_tokens) == (15, 12)
    other = cache.take_row()
    prefix.load(other, prompt[:9])
    assert cache.tables[other] == blocks[:2] and [cache.refs[b] for b in blocks[:3]] == [2, 2, 1]
    assert cache.blocks_in_use == 3
    cache.release(row)
    cache.release(other)
    assert cache.blocks_in_use == 0 and len(prefix.match(prompt + [0])) == 3, "kept after both rows let go"


def test_a_row_that_needs_room_evicts_the_least_recently_used_unused_block():
    cache = _pool(blocks=4)
    prefix = cache.keeper
    first, second = list(range(12)), list(range(30, 38))
    _finished(cache, first)
    _finished(cache, second)  # 5 blocks asked of 4: first's oldest went for second's last
    assert prefix.match(first + [0]) == [], "its descendants cannot be reached without it"
    assert len(prefix.match(second + [0])) == 2
    # blocks a row uses are never evicted, however old
    row = cache.take_row()
    prefix.load(row, second + [0])
    with pytest.raises(NoRoom, match="3 more blocks"):
        cache.reserve({cache.take_row(): 20})  # 5 blocks: 2 in use, 2 unused kept ones are free space
    assert len(prefix.match(second + [0])) == 2 and prefix.blocks_cached == 4, "a refused reservation takes nothing"
    # first's block 0 comes back with a new identity: its old child (block 1, still kept) is not
    # taken for the child of the new one
    _finished(cache, first[:4])
    assert len(prefix.match(first + [0])) == 1
    cache.release(row)


def test_a_verifier_refuses_a_cache_of_other_feature_layers(tiny):
    cache = tiny.new_cache(1, 64)
    PrefixCache(cache, (1,))
    with pytest.raises(ValueError, match="prefix cache keeps features"):
        Verifier(tiny, 1, 64, feature_layers=(0, 1), cache=cache)


def test_admission_is_by_free_blocks_and_a_full_cache_says_so(tiny):
    """More rows than blocks for their contexts: sessions get in while their prompts' blocks are
    free, a refused one leaves nothing taken, and a closed one's blocks let the next in."""
    verifier = Verifier(tiny, 8, 64, kv_blocks=6, block_size=4)
    params = SamplingParams(max_tokens=4)
    rows = [verifier.open(list(range(1, 11)), params, 0) for _ in range(2)]  # 3 blocks each
    assert verifier.cache.blocks_in_use == 6 and verifier.free_rows == 6
    with pytest.raises(NoRoom, match="more blocks"):
        verifier.open([1, 2, 3], params, 0)
    assert verifier.cache.blocks_in_use == 6 and verifier.free_rows == 6
    verifier.close(rows[0])
    row = verifier.open([1, 2, 3], params, 0)
    assert verifier.prefill([row, rows[1]])[0].tokens  # the padding pass did not fit: each row alone
    with pytest.raises(NoRoom):  # a round that needs a block the cache lacks fails before any work
        verifier.verify([rows[1]], [chain(5, [6, 7])])
    assert verifier.cache.lengths[rows[1]] == 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny float32 Llama on the exact kernels, where a prefix hit is the same bits as a prefill."""
    try:
        exact_kernels()
    except KernelUnavailable as exc:
        pytest.skip(f"exact kernels unavailable: {exc}")
    folder = tmp_path_factory.mktemp("prefix-target")
    build_tiny("llama", folder, vocab=VOCAB)
    model, _ = load_model(folder, torch.float32)
    assert apply_exact(model, True)
    return model


def _shared_prompts(n: int, seed: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    system = [rng.randrange(VOCAB) for _ in range(21)]
    return system, [system + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))] for _ in range(n)]


def test_prefill_after_a_hit_gives_the_cold_prefills_token_features_and_cache(tiny):
    layers = (0, 1)
    system, (warm, prompt) = _shared_prompts(2, seed=3)
    cold = Verifier(tiny, 1, 64, layers)
    hot = Verifier(tiny, 2, 64, layers, block_size=4, prefix_caching=True)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    row = hot.open(warm, params, 7)
    hot.prefill([row])
    hot.close(row)
    cold_row, hot_row = cold.open(prompt, params, 7), hot.open(prompt, params, 7)
    cold_step, hot_step = cold.prefill([cold_row])[0], hot.prefill([hot_row])[0]
    assert hot_step.cached_tokens == 20 and cold_step.cached_tokens == 0
    assert hot_step.tokens == cold_step.tokens
    assert torch.equal(hot_step.features, cold_step.features)
    assert all(torch.equal(a, b) for a, b in zip(hot.cache.contents(hot_row), cold.cache.contents(cold_row)))
    tree = chain(cold_step.tokens[-1], [5, 9, 11])
    cold_next, hot_next = cold.verify([cold_row], [tree])[0], hot.verify([hot_row], [tree])[0]
    assert (hot_next.tokens, hot_next.accepted) == (cold_next.tokens, cold_next.accepted)
    assert torch.equal(hot_next.features, cold_next.features)


def test_a_finished_sequence_leaves_its_reply_cached_with_the_numbers_a_prefill_writes(tiny):
    """The blocks a sequence leaves at close include its reply, whose keys, values and features
    came from verification passes of several nodes: a next turn that starts with prompt and reply
    gets from them what a cold prefill of the same tokens computes."""
    layers = (0, 1)
    _, (prompt,) = _shared_prompts(1, seed=5)
    params = SamplingParams(max_tokens=40)
    cold = Verifier(tiny, 1, 96, layers)
    row = cold.open(prompt, params, 0)
    greedy = cold.prefill([row])[0].tokens
    while len(greedy) < 30:  # the target's greedy continuation, one token a pass
        greedy += cold.verify([row], [chain(greedy[-1], [])])[0].tokens
    cold.close(row)
    hot = Verifier(tiny, 1, 96, layers, block_size=4, prefix_caching=True)
    row = hot.open(prompt, params, 0)
    out = hot.prefill([row])[0].tokens
    while len(out) < 24:  # chains of 3 right drafts and a wrong one: accepted nodes of 4-node passes
        right = greedy[len(out) : len(out) + 3]
        out += hot.verify([row], [chain(out[-1], [*right, (greedy[len(out) + 3] + 1) % VOCAB])])[0].tokens
    assert out == greedy[: len(out)]
    hot.close(row)
    turn = prompt + out + [7, 8, 9, 10, 11]
    cold_row, hot_row = cold.open(turn, params, 0), hot.open(turn, params, 0)
    cold_step, hot_step = cold.prefill([cold_row])[0], hot.prefill([hot_row])[0]
    assert hot_step.cached_tokens == (len(prompt) + len(out) - 1) // 4 * 4 > len(prompt)
    assert hot_step.tokens == cold_step.tokens
    assert torch.equal(hot_step.features, cold_step.features)
    assert all(torch.equal(a, b) for a, b in zip(hot.cache.contents(hot_row), cold.cache.contents(cold_row)))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("drafter", [None, "ngram"])
def test_output_with_prefix_hits_equals_cold_output(tiny, temperature, drafter):
    """Batched and at batch 1, after an earlier call left the shared prefix cached; draws are
    keyed by (seed, position), so equal logits give equal samples too."""
    _, prompts = _shared_prompts(5, seed=4)
    params = [SamplingParams(temperature=temperature, max_tokens=24, seed=s) for s in range(len(prompts))]

    def engine(blocks: int) -> Engine:
        draft = NgramDrafter(depth=3, branches=2) if drafter else None
        return Engine(tiny, draft, max_draft_nodes=6, prefix_cache_blocks=blocks, block_size=4)

    cold = [engine(0).generate([Request(p, q)])[0].token_ids for p, q in zip(prompts, params)]
    hot = engine(64)
    hot.generate([Request(prompts[0], params[0])])  # leaves the shared prefix cached
    batched = hot.generate([Request(p, q) for p, q in zip(prompts[1:], params[1:])])
    alone = [hot.generate([Request(p, q)])[0] for p, q in zip(prompts, params)]
    assert [r.token_ids for r in batched] == cold[1:]
    assert [r.token_ids for r in alone] == cold
    assert all(r.stats.cached_tokens >= 20 for r in [*batched, *alone])
    # a next turn: the earlier prompt and its reply come from the cache
    turn = prompts[0] + alone[0].token_ids + [1, 2, 3]
    expected = engine(0).generate([Request(turn, params[0])])[0].token_ids
    again = hot.generate([Request(turn, params[0])])[0]
    assert again.token_ids == expected and again.stats.cached_tokens > len(prompts[0])


@pytest.mark.slow
def test_the_default_model_with_dspark_keeps_its_output_with_a_cached_system_prompt(default_target):
    """The real target (float32) with the shipped DSpark drafter, whose drafts read the prompt's
    target features: the copied features must be the prefill's."""
    tok = default_target.tokenizer
    system = "You are a careful assistant. Answer briefly, and show the steps of any arithmetic. " * 3
    questions = ["What is 12 * 13?", "Name three prime numbers.", "Write a haiku about caches."]
    prompts = [tok.encode([{"role": "system", "content": system}, {"role": "user", "content": q}], chat=True)
               for q in questions]  # fmt: skip
    params = SamplingParams(max_tokens=24)
    model = default_target.model

    def engine(blocks: int) -> Engine:
        drafter = make_drafter("dspark", model, DEFAULT_MODEL)
        return Engine(model, drafter, default_target.eos_token_ids, prefix_cache_blocks=blocks)

    plain = [r.token_ids for r in Engine(model, None, default_target.eos_token_ids).generate(
        [Request(p, params) for p in prompts])]  # fmt: skip
    hot = engine(64)
    hot.generate([Request(prompts[0], params)])
    results = hot.generate([Request(p, params) for p in prompts[1:]]) + hot.generate([Request(prompts[0], params)])
    assert [r.token_ids for r in results] == plain[1:] + plain[:1]
    assert min(r.stats.cached_tokens for r in results) >= 48
