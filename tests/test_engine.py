"""The engine: speculative output equals plain decoding, token for token (greedy) and in
distribution (sampling), for every drafter shape, batch 1 and batched, every family."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from tandem.drafters import Drafter, DraftRequest, NgramDrafter, make_drafter
from tandem.engine import Engine, Request
from tandem.errors import InvalidRequest
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams, target_probs
from tandem.sequence import draft_budget
from tandem.tokenizer import Detokenizer, IncrementalDecoder
from tandem.tree import TokenTree, chain, from_paths
from tandem.verifier import Verifier
from tests.tiny_models import FAMILIES, build_tiny

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "tandem" / "data" / "prompts"


class OracleDrafter(Drafter):
    """Knows the plain-decoding output and proposes it with deliberate mistakes: a wrong token at
    a random depth and a decoy sibling branch, so rounds accept long paths, partial paths and
    nothing, and cache compaction moves entries from every offset."""

    name = "oracle"

    def __init__(self, references: list[list[int]], seed: int = 0) -> None:
        self.references = references  # prompt + plain output, one per request
        self.rng = random.Random(seed)

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        trees = []
        for r in requests:
            n = len(r.token_ids)
            ref = next(ref for ref in self.references if ref[:n] == list(r.token_ids))
            truth = ref[n : n + self.rng.randint(1, 6)]
            if truth and self.rng.random() < 0.5:
                wrong_at = self.rng.randrange(len(truth))
                truth[wrong_at] = (truth[wrong_at] + 1) % 50
            decoy = [self.rng.randrange(50) for _ in range(self.rng.randint(0, 3))]
            trees.append(from_paths(r.token_ids[-1], [decoy, truth], max_nodes=r.max_nodes))
        return trees


class TableDrafter(Drafter):
    """A toy draft model: a fixed random table ``q[prev]``; it samples a tree (two children per
    node, two levels, siblings without replacement) and records each node's ``q``."""

    name = "table"

    def __init__(self, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        table = torch.rand(vocab, vocab, generator=g) ** 2
        self.q = table / table.sum(-1, keepdim=True)
        self.g = g

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        return [self._tree(r) for r in requests]

    def _tree(self, r: DraftRequest) -> TokenTree:
        tokens, parents, qs = [r.token_ids[-1]], [-1], [torch.zeros(self.q.shape[1])]
        frontier = [0]
        for _ in range(2):
            grown = []
            for node in frontier:
                q = self.q[tokens[node]].clone()
                for _ in range(2):
                    if len(tokens) - 1 >= r.max_nodes:
                        break
                    tok = int(torch.multinomial(q, 1, generator=self.g))
                    tokens.append(tok)
                    parents.append(node)
                    qs.append(q.clone())
                    grown.append(len(tokens) - 1)
                    q[tok] = 0
                    q = q / q.sum()
            frontier = grown
        return TokenTree(torch.tensor(tokens), torch.tensor(parents), torch.stack(qs))


def _outputs(engine: Engine, prompts: Sequence[list[int]], params: SamplingParams, batch: int) -> list[list[int]]:
    results = []
    for i in range(0, len(prompts), batch):
        results += engine.generate([Request(p, params) for p in prompts[i : i + batch]])
    return [r.token_ids for r in results]


# --- tiny random models of every family -------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"engine-{request.param}")
    hf = build_tiny(request.param, folder, vocab=64)
    model, _ = load_model(folder, torch.float32)
    return model, hf


def _tiny_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(64) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def test_plain_decoding_matches_hugging_face_generate(tiny_model):
    model, hf = tiny_model
    prompts = _tiny_prompts(3)
    ours = _outputs(Engine(model), prompts, SamplingParams(max_tokens=20), batch=1)
    hf.generation_config.eos_token_id = None  # our engine was given no stop tokens either
    for prompt, out in zip(prompts, ours):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        assert out == ref[0, len(prompt) :].tolist()


@pytest.mark.parametrize("batch", [1, 4])
def test_speculation_is_exact_on_tiny_models(tiny_model, batch):
    model, _ = tiny_model
    prompts = _tiny_prompts(8, seed=batch)
    params = SamplingParams(max_tokens=24)
    plain = _outputs(Engine(model), prompts, params, batch=1)
    # the second also prefills its prompts in parts of 4 tokens (chunked prefill)
    for drafter, chunk in ((NgramDrafter(depth=4), None), (NgramDrafter(depth=3, branches=3), 4)):
        engine = Engine(model, drafter, max_draft_nodes=8, prefill_chunk=chunk)
        assert _outputs(engine, prompts, params, batch) == plain
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        refs = [p + plain[start + i] for i, p in enumerate(group)]
        engine = Engine(model, OracleDrafter(refs, seed=start), max_draft_nodes=8)
        assert [r.token_ids for r in engine.generate([Request(p, params) for p in group])] == plain[
            start : start + batch
        ]


def test_oracle_rounds_accept_long_paths(tiny_model):
    """Guards the test above: the oracle must really drive multi-token acceptance."""
    model, _ = tiny_model
    prompt = _tiny_prompts(1, seed=9)[0]
    params = SamplingParams(max_tokens=30)
    plain = Engine(model).generate([Request(prompt, params)])[0].token_ids
    result = Engine(model, OracleDrafter([prompt + plain]), max_draft_nodes=8).generate([Request(prompt, params)])[0]
    assert result.token_ids == plain
    assert result.stats.tau > 1.5


def test_sampling_through_the_engine_follows_the_target(tiny_model):
    """First three sampled tokens: engine + sampling tree drafter vs the exact target law."""
    model, _ = tiny_model
    assert_follows_the_target(Engine(model, TableDrafter(64, seed=1), max_draft_nodes=6), [5, 17, 33, 2, 9], top_k=4)


def assert_follows_the_target(engine: Engine, prompt: list[int], top_k: int, n: int = 2000) -> None:
    """The first three tokens of ``n`` seeded requests (T = 1, top-k) against the exact law of the
    engine's target (chi-square), and both the accept and the residual branches ran often."""
    params = SamplingParams(temperature=1.0, top_k=top_k, max_tokens=6, ignore_eos=True)
    results = engine.generate([Request(prompt, replace(params, seed=s)) for s in range(n)])
    triples = Counter(tuple(r.token_ids[:3]) for r in results)
    expected = exact_law(engine.model, prompt, params, steps=3)
    assert set(triples) <= set(expected), "sampled a sequence outside the target's support"
    total = sum(expected.values())
    observed = [triples[k] for k in expected]
    assert chisquare(observed, [expected[k] / total * n for k in expected]).pvalue > 1e-3
    accepted, drafted = sum(r.stats.accepted for r in results), sum(r.stats.drafted for r in results)
    # Each branch at least once per 20 requests: a scheduled drafter drafts (and so accepts) less.
    assert n // 20 < accepted < drafted - n // 20, "both accept and reject branches must run often"


def exact_law(model, prompt: list[int], params: SamplingParams, steps: int) -> dict[tuple[int, ...], float]:
    """Probability of every ``steps``-token continuation, from our model's own logits."""
    law = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for prefix, prob in law.items():
            ids = prompt + list(prefix)
            p = target_probs(model.block_logits(ids, model.new_cache(1, len(ids)))[-1], params)
            for tok in p.nonzero().flatten().tolist():
                grown[(*prefix, tok)] = prob * float(p[tok])
        law = grown
    return law


def test_seeded_sampling_is_reproducible(tiny_model):
    model, _ = tiny_model
    prompt = _tiny_prompts(1, seed=3)[0]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=42)
    runs = [Engine(model, NgramDrafter(depth=3)).generate([Request(prompt, params)])[0].token_ids for _ in range(2)]
    assert runs[0] == runs[1]


def test_a_resumed_sequence_draws_what_it_would_have_drawn(llama):
    """The target's draws depend only on (seed, position): a verifier that prefills a sequence's
    tokens up to its anchor (a session moved to another replica) then verifies the same tree
    emits what the first verifier emitted, under sampling, with rejections and resampling."""
    prompt = _tiny_prompts(1, seed=8)[0]
    params = SamplingParams(temperature=1.0, seed=11)
    first = Verifier(llama, rows=1, capacity=128)
    row = first.open(prompt, params, params.seed)
    tokens = prompt + first.prefill([row])[0].tokens
    rng = random.Random(0)
    for _ in range(12):  # random trees: most drafts are rejected, each round draws several numbers
        tree = from_paths(tokens[-1], [[rng.randrange(64) for _ in range(3)] for _ in range(2)])
        moved = Verifier(llama, rows=1, capacity=128)
        moved_row = moved.open(tokens[:-1], params, params.seed)
        moved.prefill([moved_row])
        expected = first.verify([row], [tree])[0].tokens
        assert moved.verify([moved_row], [tree])[0].tokens == expected
        tokens += expected


# --- stops, limits and bad input ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-llama")
    build_tiny("llama", folder, vocab=64)
    return load_model(folder, torch.float32)[0]


def _letters(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_token_and_max_tokens(llama):
    prompt = _tiny_prompts(1, seed=4)[0]
    full = Engine(llama).generate([Request(prompt, SamplingParams(max_tokens=20))])[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop_at = full.token_ids[7]
    first = full.token_ids.index(stop_at)
    for drafter in (None, NgramDrafter(depth=4)):
        engine = Engine(llama, drafter, eos_token_ids=[stop_at])
        result = engine.generate([Request(prompt, SamplingParams(max_tokens=20))])[0]
        assert result.finish_reason == "stop"
        assert result.token_ids == full.token_ids[: first + 1]
        ignored = engine.generate([Request(prompt, SamplingParams(max_tokens=20, ignore_eos=True))])[0]
        assert ignored.token_ids == full.token_ids


def test_stop_string_cuts_the_output(llama):
    prompt = _tiny_prompts(1, seed=5)[0]
    full = Engine(llama, decode=_letters).generate([Request(prompt, SamplingParams(max_tokens=20))])[0]
    stop = _letters(full.token_ids[10:12])
    cut = next(n for n in range(1, 21) if stop in _letters(full.token_ids[:n]))
    for drafter in (None, NgramDrafter(depth=5)):
        engine = Engine(llama, drafter, decode=_letters)
        result = engine.generate([Request(prompt, SamplingParams(max_tokens=20, stop=(stop,)))])[0]
        assert result.finish_reason == "stop"
        assert result.token_ids == full.token_ids[:cut]


@pytest.mark.parametrize(
    "prompt,message",
    [([], "empty"), (list(range(30)) * 10, "context"), ([70], "token ids")],
)
def test_bad_prompts_are_refused(llama, prompt, message):
    with pytest.raises(InvalidRequest, match=message):
        Engine(llama).generate([Request(prompt)])


def test_generation_stops_at_the_context_length(llama):
    prompt = _tiny_prompts(1)[0]
    room = llama.config.max_position - len(prompt)
    result = Engine(llama, NgramDrafter()).generate([Request(prompt, SamplingParams(max_tokens=10_000))])[0]
    assert result.finish_reason == "length"
    assert len(result.token_ids) <= room


# --- the real default model --------------------------------------------------------------------


def _benchmark_prompts(per_file: int) -> list[str]:
    prompts = []
    for name in ("humaneval", "mbpp", "mt-bench", "gsm8k"):
        with open(PROMPTS_DIR / f"{name}.jsonl") as f:
            prompts += [json.loads(line)["turns"][0] for _, line in zip(range(per_file), f)]
    return prompts


@pytest.fixture(scope="module")
def smollm(default_target):
    tok = default_target.tokenizer
    prompts = [tok.encode(p, chat=True) for p in _benchmark_prompts(5)]
    params = SamplingParams(max_tokens=32)
    engine = Engine(default_target.model, eos_token_ids=default_target.eos_token_ids)
    plain = _outputs(engine, prompts, params, batch=1)
    return default_target, prompts, params, plain


@pytest.mark.slow
@pytest.mark.parametrize(("drafter", "batch"), [("chain", 1), ("tree", 4)])
def test_real_model_speculation_equals_plain_decoding(smollm, drafter, batch):
    target, prompts, params, plain = smollm
    assert len(prompts) >= 20
    ngram = NgramDrafter(depth=8) if drafter == "chain" else NgramDrafter(depth=5, branches=3)
    engine = Engine(target.model, ngram, target.eos_token_ids, max_draft_nodes=16)
    assert _outputs(engine, prompts, params, batch) == plain


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dspark", "eagle3", "dflash"])
def test_shipped_drafters_keep_plain_output(smollm, algo):
    """The trained drafters shipped for the default model (trees), on the real model in float32, at
    batch 4. Tiny models cover every drafter at batch 1 and 4 (test_drafters.py); tests/test_kernels.py
    runs the shipped DSpark's trees on the real model in bf16 at batch 1."""
    target, prompts, params, plain = smollm
    batch = 4
    drafter = make_drafter(algo, target.model, "smollm2-135m-instruct")
    engine = Engine(target.model, drafter, target.eos_token_ids, max_draft_nodes=16)
    results = []
    for i in range(0, len(prompts), batch):
        results += engine.generate([Request(p, params) for p in prompts[i : i + batch]])
    assert [r.token_ids for r in results] == plain
    rounds = sum(r.stats.rounds for r in results)
    assert sum(r.stats.accepted for r in results) > rounds // 10, "a trained drafter is accepted in some rounds"


@pytest.mark.slow
def test_real_model_oracle_tree_equals_plain_decoding(smollm):
    target, prompts, params, plain = smollm
    for start in range(0, len(prompts), 4):
        group = prompts[start : start + 4]
        refs = [p + plain[start + i] for i, p in enumerate(group)]
        engine = Engine(target.model, OracleDrafter(refs, seed=start), target.eos_token_ids, max_draft_nodes=12)
        assert [r.token_ids for r in engine.generate([Request(p, params) for p in group])] == plain[start : start + 4]


@pytest.mark.slow
def test_gemma_base_model_speculation_equals_plain_decoding():
    """The second family end to end: Gemma 3 270M on raw prompts (no chat template)."""
    from tandem.target import load_target

    target = load_target("gemma3-270m", "float32")
    tok = target.tokenizer
    prompts = [tok.encode(p, chat=False) for p in ("def fibonacci(n):", "The capital of France is", "1, 2, 3, 4,")]
    params = SamplingParams(max_tokens=24)
    plain = _outputs(Engine(target.model, eos_token_ids=target.eos_token_ids), prompts, params, batch=1)
    for drafter, batch in ((NgramDrafter(depth=6), 1), (NgramDrafter(depth=4, branches=3), 3)):
        engine = Engine(target.model, drafter, target.eos_token_ids, max_draft_nodes=12)
        assert _outputs(engine, prompts, params, batch) == plain


class RecordingDrafter(NgramDrafter):
    """An n-gram drafter that remembers which sequences it drafted for and which it released."""

    def __init__(self) -> None:
        super().__init__(depth=3)
        self.seen: set[int] = set()
        self.released: list[int] = []

    def propose(self, requests: Sequence[DraftRequest]) -> list[TokenTree]:
        self.seen.update(r.seq_id for r in requests)
        return super().propose(requests)

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)


def test_drafter_state_is_released_once_per_sequence(llama):
    drafter = RecordingDrafter()
    engine = Engine(llama, drafter)
    prompts = _tiny_prompts(3, seed=6)
    engine.generate([Request(p, SamplingParams(max_tokens=8)) for p in prompts])
    engine.generate([Request(p, SamplingParams(max_tokens=8)) for p in prompts])
    assert len(drafter.seen) == 6, "sequence ids must stay unique across calls"
    assert sorted(drafter.released) == sorted(drafter.seen)
    # A consumer that stops early (client abort) still frees every sequence's state.
    stream = engine.stream([Request(p, SamplingParams(max_tokens=50)) for p in prompts])
    next(stream)
    stream.close()
    assert len(drafter.released) == 9 and len(set(drafter.released)) == 9


def test_a_row_near_its_context_end_does_not_fail_its_batch(tiny_model):
    """Capacity 32: a 29-token prompt (room for 2 drafts) batched with a 3-token one drafting 16
    nodes; the padding to 17 would overflow the first row, which is verified in its own pass.
    Each row gets exactly what it gets alone."""
    model, _ = tiny_model
    prompts, drafts = [list(range(1, 30)), [5, 6, 7]], [[9], list(range(10, 26))]

    def steps(rows_of: list[int]) -> list:
        verifier = Verifier(model, len(rows_of), 32)
        rows = [verifier.open(prompts[i], SamplingParams(), 0) for i in rows_of]
        anchors = [s.tokens[-1] for s in verifier.prefill(rows)]
        return verifier.verify(rows, [chain(a, drafts[i]) for a, i in zip(anchors, rows_of)])

    together = steps([0, 1])
    assert [s.tokens for s in together] == [steps([0])[0].tokens, steps([1])[0].tokens]


@pytest.mark.parametrize(
    ("max_nodes", "room", "max_tokens", "generated", "budget"),
    [
        (16, 40, 64, 0, 16),  # the drafter's own limit
        (16, 5, 64, 0, 5),  # the cache row's room
        (16, 40, 64, 60, 3),  # 4 tokens left: 3 drafts plus the bonus token
        (16, 40, 64, 63, 0),  # the last token is the bonus: nothing to draft
        (16, 0, 64, 0, 0),  # a full row
    ],
)
def test_the_draft_budget_never_overruns_the_row_or_the_request(max_nodes, room, max_tokens, generated, budget):
    """One budget for the engine and the target replica; it never drafts what cannot be kept."""
    assert draft_budget(max_nodes, room, max_tokens, generated) == budget


@pytest.mark.slow
def test_incremental_decoding_equals_decoding_the_whole(default_target):
    """Per-id windows give the very text of one decode of everything, at every step (multi-byte
    characters split across ids included); the stream of deltas adds up to it, stops cut it."""
    tok = default_target.tokenizer
    text = "Café — naïve 日本語 🙂🚀 text,\n  spaces  and\ttabs: ∑x² ≤ 3; ok."
    ids = tok.encode(text, chat=False)
    rng = random.Random(0)
    decoder, stream, at = IncrementalDecoder(tok.decode), Detokenizer(tok), 0
    deltas = []
    while at < len(ids):
        step = ids[at : at + rng.randint(1, 4)]
        at += len(step)
        decoder.push(step)
        deltas.append(stream.push(step, final=at == len(ids)))
        whole = tok.decode(ids[:at])  # an id that ends inside a character waits for the rest
        assert whole.startswith(decoder.text) and decoder.text + decoder.tail() == whole
        assert "\ufffd" not in decoder.text and len(whole.rstrip("\ufffd")) - len(decoder.text) < 4
    assert "".join(deltas) == tok.decode(ids) == text
    assert all(tok.decode(ids[:k]).startswith(decoder.text[: decoder.ends[k]]) for k in range(len(ids)))
    stopped = Detokenizer(tok, stop=("語 🙂",))
    assert "".join(stopped.push([i]) for i in ids) == "Café — naïve 日本"
