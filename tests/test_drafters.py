"""The trained drafters (EAGLE-3, DFlash, DSpark) on a tiny random target: training lowers the
loss, a checkpoint round trip and a resumed run reproduce the drafts exactly, and through the
engine every drafter keeps greedy output identical and sampled output on the target's law."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.drafters import (
    ADAPTERS,
    SHIPPED,
    UNTRAINED,
    DraftConfig,
    DraftRequest,
    check_drafter_name,
    default_drafter,
    load_drafter,
    make_drafter,
    new_draft_model,
    shipped_drafter,
    split_spec,
)
from tandem.drafters.backbone import BlockBackbone
from tandem.drafters.dspark import DSparkDrafter, DSparkModel
from tandem.drafters.neural import ALGORITHMS, DraftState, NeuralDrafter, cat_kv
from tandem.engine import Engine, Request
from tandem.errors import InvalidRequest, ModelLoadError
from tandem.eval.replay import build_cases, replay
from tandem.models.decoder import RMSNorm
from tandem.models.exact import apply_exact
from tandem.models.loading import load_embeddings, load_model
from tandem.sampling import SamplingParams
from tandem.scheduler import DraftCost, PassCost, ScheduledDrafter
from tandem.train.command import _label_counts
from tandem.train.features import FeatureStore, OnlineStore, build_store, draft_vocabulary, sequence_features
from tandem.train.prompts import DataError
from tandem.train.trainer import TrainSettings, calibrate_confidence, train
from tandem.tree import path_to
from tandem.tree_search import Growth, TreeShape
from tests.test_engine import assert_follows_the_target
from tests.tiny_models import build_tiny

VOCAB, DRAFT_VOCAB = 64, 48
SETTINGS = TrainSettings(steps=40, batch_size=4, samples=8, lr=3e-3, warmup=4, checkpoint_every=10)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 12))] for _ in range(n)]


@pytest.fixture(scope="module")
def target_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drafter-target")
    build_tiny("llama", folder, vocab=VOCAB)
    return folder


@pytest.fixture(scope="module")
def target(target_folder):
    return load_model(target_folder, torch.float32)[0]


@pytest.fixture(scope="module")
def store(target, tmp_path_factory):
    """Greedy continuations by the target itself, as ``tandem data`` makes them."""
    prompts = _prompts(48, seed=0)
    results = Engine(target).generate([Request(p, SamplingParams(max_tokens=40)) for p in prompts])
    records = [(p, r.token_ids) for p, r in zip(prompts, results)]
    layers = DraftConfig.for_target("dflash", target, "tiny").feature_layers
    return build_store(target, records, layers, tmp_path_factory.mktemp("features"), progress=False)


def _new(algo: str, target, store):
    cfg = DraftConfig.for_target(algo, target, "tiny", draft_vocab=DRAFT_VOCAB, block_size=4)
    return new_draft_model(cfg, target, draft_vocabulary(store.token_counts(VOCAB), DRAFT_VOCAB))


@pytest.fixture(scope="module")
def trained(target, store, tmp_path_factory):
    """Each drafter after a short seeded run, with its loss history and its saved folder."""
    out = {}
    for algo in ALGORITHMS:
        torch.manual_seed(0)
        model = _new(algo, target, store)
        result = train(model, target, store, SETTINGS, progress=False)
        folder = tmp_path_factory.mktemp(algo)
        model.save(folder)
        out[algo] = (model, result, folder)
    return out


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_training_lowers_the_loss(trained, algo):
    history = trained[algo][1].history
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < first - 0.1, f"{algo}: loss {first:.3f} -> {last:.3f}"


def _drafts(drafter, target, prompts, params):
    """Trees proposed right after prefill (features of each whole prompt)."""
    engine = Engine(target)
    trees = []
    for i, prompt in enumerate(prompts):
        feats = sequence_features(target, prompt, drafter.feature_layers)
        first = engine.generate([Request(prompt, replace(params, max_tokens=1))])[0].token_ids
        request = DraftRequest(i, [*prompt, *first], 8, params, feats)
        trees.append(drafter.propose([request])[0])
    return trees


def _requests(target, prompts, params, layers) -> list[DraftRequest]:
    """Right after prefill: each prompt's features and its first token as the anchor."""
    firsts = Engine(target).generate([Request(p, replace(params, max_tokens=1)) for p in prompts])
    return [
        DraftRequest(i, [*p, *r.token_ids], 8, params, sequence_features(target, p, layers))
        for i, (p, r) in enumerate(zip(prompts, firsts))
    ]


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_sequences_drafted_together_get_the_drafts_each_gets_alone(trained, target, target_folder, algo, tree):
    """Sequences drafted in one round share the drafter's passes (the block drafters' backbone,
    EAGLE-3's chain steps: linears batched, attention per sequence): on the batch-invariant
    kernels the drafts are bit-equal to drafting each sequence alone, greedy and sampled, also
    when the chains have different lengths."""
    exact = load_model(target_folder, torch.float32)[0]
    apply_exact(exact, True)
    shape = TreeShape(3, 4, 8) if tree else None
    prompts = _prompts(5, seed=41)
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=3)):
        requests = _requests(target, prompts, params, trained[algo][0].config.feature_layers)
        requests[1] = replace(requests[1], max_nodes=2)  # a shorter chain among them
        together, alone = (load_drafter(trained[algo][2], exact, shape) for _ in range(2))
        assert together.model.kernels is not None
        batched = together.propose(requests)
        single = [alone.propose([r])[0] for r in requests]
        for a, b in zip(batched, single):
            assert (a.tokens, a.parents, a.survival) == (b.tokens, b.parents, b.survival)
            assert (a.draft_probs is None and b.draft_probs is None) or torch.equal(a.draft_probs, b.draft_probs)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_bf16_drafts_on_the_kernels_norms_are_the_torch_norms_drafts(trained, target, target_folder, algo):
    """On the packed kernels a drafter's RMSNorms run in one native call each (five torch calls
    fewer per norm); in bf16 that changes no draft: trees bit-equal to the norms in torch ops."""
    exact = load_model(target_folder, torch.bfloat16)[0]
    apply_exact(exact, True)
    requests = _requests(target, _prompts(3, seed=53), SamplingParams(), trained[algo][0].config.feature_layers)
    native, torch_norms = (load_drafter(trained[algo][2], exact, TreeShape(3, 4, 8)) for _ in range(2))
    norms = [m for m in torch_norms.model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.kernels is not None for m in norms)
    for module in norms:
        module.kernels = None
    for a, b in zip(native.propose(requests), torch_norms.propose(requests)):
        assert (a.tokens, a.parents, a.survival) == (b.tokens, b.parents, b.survival)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("algo", ["dflash", "dspark", "dspark-no-markov"])
def test_the_native_tree_search_grows_the_python_searchs_trees(trained, target, target_folder, algo, dtype):
    """The block drafters' greedy trees grown in one native call (tandem/kernels/tree_cpu.c) are
    the trees Python's best-first search grows from the same blocks: the same tokens and parents,
    and the same survivals to rounding; with budgets that differ between the sequences."""
    exact = load_model(target_folder, dtype)[0]
    apply_exact(exact, True)
    drafter = load_drafter(trained[algo.removesuffix("-no-markov")][2], exact, TreeShape(3, 4, 10))
    if algo == "dspark-no-markov":  # the ablation: no transition bias, the confidence still reads the codes
        drafter.markov = False
    requests = _requests(target, _prompts(6, seed=47), SamplingParams(), drafter.model.config.feature_layers)
    max_nodes = [10, 3, 10, 1, 7, 10]
    requests = [replace(r, max_nodes=m) for r, m in zip(requests, max_nodes)]
    with torch.inference_mode():
        states = [drafter.absorb(r) for r in requests]
        native = drafter.grow(states, requests, greedy=True)
        python = NeuralDrafter.grow(drafter, states, requests, greedy=True)  # the search in Python
    assert [len(tree) - 1 for tree in native] == max_nodes
    # survivals: the torch path rounds DSpark's confidence logit to the storage type, the native
    # one keeps it in float32 (a bf16 logit is good to about 4e-3)
    close = 1e-5 if dtype == torch.float32 else 4e-3
    for a, b in zip(native, python):
        assert (a.tokens, a.parents) == (b.tokens, b.parents)
        assert a.survival == pytest.approx(b.survival, rel=close, abs=1e-7)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("algo", ["dflash", "dspark"])
def test_shallow_drafts_read_the_lm_head_for_their_depth_only_and_are_the_same(
    trained, target, target_folder, algo, tree
):
    """A block drafter asked for a few nodes runs its LM head (the largest matmul of its round)
    on as many block positions as its draft can be deep, not on the whole block: the same
    trees and chains, bit for bit, as from the logits of every position."""
    exact = load_model(target_folder, torch.bfloat16)[0]
    apply_exact(exact, True)
    shape = TreeShape(3, 4, 8) if tree else None
    shallow, whole = (load_drafter(trained[algo][2], exact, shape) for _ in range(2))
    rows: list[int] = []
    every_position = type(whole).blocks

    def blocks(states, anchors, positions=None):
        base, hidden = every_position(whole, states, anchors)
        rows.append(base.shape[1])
        return base, hidden

    whole.blocks = blocks
    layers = trained[algo][0].config.feature_layers
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=5)):
        requests = [
            replace(r, max_nodes=m) for r, m in zip(_requests(target, _prompts(3, seed=59), params, layers), (2, 1, 3))
        ]
        for a, b in zip(shallow.propose(requests), whole.propose(requests)):
            assert (a.tokens, a.parents, a.survival) == (b.tokens, b.parents, b.survival)
            assert (a.draft_probs is None and b.draft_probs is None) or torch.equal(a.draft_probs, b.draft_probs)
    assert rows and min(rows) > 3  # the comparison read every position


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("algo", ["dflash", "dspark"])
def test_the_block_backbone_in_one_call_is_its_modules_bit_for_bit(trained, target, target_folder, algo, dtype):
    """A block drafter drafts through its layers run as a decoder over a paged cache: on the
    exact kernels every layer of a round is one native call, with the very bits of running the
    layers one module at a time on the same kernels; both agree with the training view (the
    drafter's modules over its whole context) to rounding, and the drafts are the same."""
    exact = load_model(target_folder, dtype)[0]
    apply_exact(exact, True)
    drafter = load_drafter(trained[algo][2], exact)
    model = drafter.model
    requests = _requests(target, _prompts(4, seed=43), SamplingParams(), model.config.feature_layers)
    drafter.propose(requests)  # the contexts absorbed (and a first round drafted)
    states = [drafter._states[r.seq_id] for r in requests]
    anchors = [r.token_ids[-1] for r in requests]
    assert drafter.backbone.decoder.step_plan is not None
    logits, hidden = drafter.blocks(states, anchors)
    plan, drafter.backbone.decoder.step_plan = drafter.backbone.decoder.step_plan, None
    module_logits, module_hidden = drafter.blocks(states, anchors)
    drafter.backbone.decoder.step_plan = plan
    assert torch.equal(hidden, module_hidden) and torch.equal(logits, module_logits)
    for b, request in enumerate(requests):
        n = len(request.features)
        fused = model.fuse(request.features[None].to(dtype))
        context = model.context_kv(fused, torch.arange(n)[None])
        visible = torch.ones(1, model.config.block_size, n, dtype=torch.bool)
        view = model.block_hidden(torch.tensor(anchors[b : b + 1]), torch.tensor([n]), context, visible, fused[:, -1])
        if dtype == torch.float32:  # bf16 rounds RoPE and the softmax at other points
            torch.testing.assert_close(hidden[b : b + 1], view, atol=1e-4, rtol=1e-4)
            assert torch.equal(model.draft_logits(view).argmax(-1), logits[b : b + 1].argmax(-1))
        else:
            torch.testing.assert_close(hidden[b : b + 1], view, atol=0.1, rtol=0.05)


def test_the_block_backbone_cache_grows_and_gives_rows_back(target, store):
    """The backbone's paged cache starts small and doubles its rows and blocks as sequences come
    and contexts grow, keeping what it holds; a restarted row starts empty, a closed one is free."""
    model = _new("dspark", target, store).eval()
    backbone = BlockBackbone(model.layers, model.config, None)
    cache = backbone.cache
    rows, written = [backbone.open() for _ in range(6)], {}
    assert cache.num_rows >= 6
    lengths = (200, 150, 40, 200, 200, 200)  # 65 blocks of 16: more than the first 64
    for row, n in zip(rows, lengths):
        for part in (range(n // 2), range(n // 2, n)):  # appended in two parts
            kv = model.context_kv(torch.randn(1, len(part), model.config.hidden_size), torch.tensor([part]))
            backbone.append(row, kv)
            written.setdefault(row, []).append(kv[0])
    assert cache.num_blocks > 64 and sum(cache.blocks_for(n) for n in lengths) == 65
    for row, parts in written.items():  # layer 0's keys and values, as appended
        keys, values = cache.contents(row)
        assert torch.equal(keys[0], torch.cat([k for k, _ in parts], 2)[0])
        assert torch.equal(values[0], torch.cat([v for _, v in parts], 2)[0])
    held = cache.free_blocks
    backbone.restart(rows[0])
    assert cache.lengths[rows[0]] == 0 and cache.free_blocks == held + cache.blocks_for(200)
    backbone.close(rows[1])
    assert backbone.open() == rows[1]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_checkpoint_round_trip_gives_identical_drafts(trained, target, algo):
    model, _, folder = trained[algo]
    prompts = _prompts(4, seed=7)
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=5)):
        before = _drafts(ADAPTERS[algo](model), target, prompts, params)
        after = _drafts(load_drafter(folder, target), target, prompts, params)
        for a, b in zip(before, after):
            assert (a.tokens, a.parents) == (b.tokens, b.parents)
            assert (a.draft_probs is None) == (b.draft_probs is None)
            if a.draft_probs is not None:
                assert torch.equal(a.draft_probs, b.draft_probs)
        assert any(len(t) > 1 for t in before)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_drafter_next_to_the_embeddings_alone_drafts_the_same(trained, target, target_folder, algo):
    """A draft worker loads only the target's embedding and LM head (its layers stay on the meta
    device, taking no memory); its drafter proposes what one next to the whole target does."""
    light = load_embeddings(target_folder, torch.float32)
    assert all(p.is_meta for p in light.layers.parameters()) and not light.embed.weight.is_meta
    prompts, params = _prompts(4, seed=7), SamplingParams(temperature=1.0, seed=5)
    folder = trained[algo][2]
    for a, b in zip(
        _drafts(load_drafter(folder, target), target, prompts, params),
        _drafts(load_drafter(folder, light), target, prompts, params),
    ):
        assert (a.tokens, a.parents) == (b.tokens, b.parents)
        assert (a.draft_probs is None and b.draft_probs is None) or torch.equal(a.draft_probs, b.draft_probs)


def test_resumed_training_equals_one_run(target, store, tmp_path):
    """Stopping at step 6 and resuming from the checkpoint ends with the very same weights."""
    settings = replace(SETTINGS, steps=12, checkpoint_every=3)
    models = []
    for stops in ([None], [6, None]):
        torch.manual_seed(0)
        model = _new("dspark", target, store)
        checkpoint = tmp_path / f"run{len(stops)}" / "checkpoint.pt"
        for stop in stops:
            train(model, target, store, replace(settings, stop_at=stop), checkpoint=checkpoint, progress=False)
        models.append(model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name
    assert models[0].config.confidence_temperature == models[1].config.confidence_temperature


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_greedy_output_equals_plain_decoding(trained, target, algo, batch):
    prompts = _prompts(8, seed=11)
    params = SamplingParams(max_tokens=30)
    plain = Engine(target).generate([Request(p, params) for p in prompts])
    engine = Engine(target, load_drafter(trained[algo][2], target), max_draft_nodes=8)
    spec = []
    for i in range(0, len(prompts), batch):
        spec += engine.generate([Request(p, params) for p in prompts[i : i + batch]])
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert sum(r.stats.accepted for r in spec) > 0, "the drafter never helped: the test would not see a bad accept"


def _chain_drafter(trained, algo):
    """The chain drafter without DSpark's confidence stop (full γ chains, as trees go)."""
    model = trained[algo][0]
    return DSparkDrafter(model, min_survival=0.0) if algo == "dspark" else ADAPTERS[algo](model)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_trees_branch_on_what_each_path_would_draft(trained, target, algo):
    """A width-one tree is the chain. In a wider tree every node's best child is what the drafter
    gives when it walks that node's path alone (for EAGLE-3 this checks the tree attention: keys
    of other branches leaking in would change it), and the shape stays within its budget."""
    model, prompts, params = trained[algo][0], _prompts(6, seed=31), SamplingParams(max_tokens=8)
    gamma = model.config.block_size
    chains = _drafts(_chain_drafter(trained, algo), target, prompts, params)
    narrow = _drafts(ADAPTERS[algo](model, tree=TreeShape(1, gamma, gamma)), target, prompts, params)
    assert [t.tokens for t in narrow] == [t.tokens for t in chains]
    drafter = ADAPTERS[algo](model, tree=TreeShape(3, gamma, 8))
    for i, tree in enumerate(_drafts(drafter, target, prompts, params)):
        assert len(tree) - 1 <= 8 and max(tree.depths) <= gamma and len(tree.children(0)) == 3
        state, anchor = drafter._states[i], int(tree.tokens[0])
        for node in range(len(tree)):
            if not tree.children(node):
                continue
            alone, logits_of = Growth([anchor]), drafter.children([state], [anchor])
            for step in path_to(tree.parents, node)[1:]:
                logits_of([alone], [[len(alone.tokens) - 1]])
                alone.add(int(tree.tokens[step]), len(alone.tokens) - 1, 0.0, 1.0)
            best = model.vocab_map[logits_of([alone], [[len(alone.tokens) - 1]])[0][0].argmax()]
            assert int(tree.tokens[tree.children(node)[0]]) == int(best)


# Each token of width costs 1/32 of a pass, whatever the batch size (the sampled tests batch
# 2,000 requests): the scheduler cuts the trees, but not to nothing. Its gate is off: real
# drafting time against these synthetic passes would stop drafting (the gate: tests below).
TOKEN_PRICED = PassCost((1, 8), (1, 17), ((1.0, 1.5), (1.0, 1.5)))


def _maybe_scheduled(drafter, scheduled: bool):
    return ScheduledDrafter(drafter, TOKEN_PRICED, gate=False) if scheduled else drafter


@pytest.mark.parametrize("scheduled", [False, True], ids=["whole", "scheduled"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_greedy_output_with_trees_equals_plain_decoding(trained, target, algo, batch, scheduled):
    prompts = _prompts(8, seed=13)
    params = SamplingParams(max_tokens=30)
    plain = Engine(target).generate([Request(p, params) for p in prompts])
    drafter = _maybe_scheduled(ADAPTERS[algo](trained[algo][0], tree=TreeShape(3, 4, 10)), scheduled)
    engine = Engine(target, drafter, max_draft_nodes=10)
    spec = []
    for i in range(0, len(prompts), batch):
        spec += engine.generate([Request(p, params) for p in prompts[i : i + batch]])
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert sum(r.stats.accepted for r in spec) > 0
    if scheduled:  # the scheduler did cut: fewer nodes per round than the full trees
        assert sum(r.stats.drafted for r in spec) < 10 * sum(r.stats.rounds for r in spec)


@pytest.mark.parametrize("scheduled", [False, True], ids=["whole", "scheduled"])
@pytest.mark.parametrize("tree", [None, TreeShape(2, 3, 6)], ids=["chain", "tree"])
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_sampled_output_follows_the_target(trained, target, algo, tree, scheduled):
    """First three tokens of 2,000 seeded requests against the exact law of the target."""
    drafter = _maybe_scheduled(ADAPTERS[algo](trained[algo][0], tree=tree), scheduled)
    assert_follows_the_target(Engine(target, drafter, max_draft_nodes=6), [5, 17, 33, 2, 9], top_k=4)


class _PricedDrafting(DraftCost):
    """Drafting priced per sequence, whatever the clock says."""

    def __init__(self, per_sequence: float) -> None:
        super().__init__()
        self.per_sequence = per_sequence

    def __call__(self, k: int) -> float:
        return self.per_sequence * k


class _Alternating(ScheduledDrafter):
    """Drafts each sequence every other round (by round and sequence id, never by a token): one
    pass mixes drafted and plain sequences, and every sequence switches back and forth."""

    def _choose(self, requests):
        return {i for i, r in enumerate(requests) if r.max_nodes > 0 and (self.rounds + r.seq_id) % 2 == 0}


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_gated_sequences_switch_between_drafted_and_plain_rounds(trained, target, algo):
    """The gate leaves out the sequences whose drafts do not pay for a drafting cost of 3 % of
    a pass each; output stays plain decoding's, and the features of the rounds a sequence sat
    out reach its drafter in step when it is drafted again (no resync)."""
    prompts = _prompts(8, seed=21)
    params = SamplingParams(max_tokens=40)
    plain = Engine(target).generate([Request(p, params) for p in prompts])
    neural = ADAPTERS[algo](trained[algo][0], tree=TreeShape(3, 4, 10))
    gated = ScheduledDrafter(neural, TOKEN_PRICED)
    gated.gate.draft_cost = _PricedDrafting(0.03)
    engine = Engine(target, gated, max_draft_nodes=10)
    spec = []
    for i in range(0, len(prompts), 4):
        spec += engine.generate([Request(p, params) for p in prompts[i : i + 4]])
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert 0 < gated.drafted_rounds < gated.rounds, (gated.drafted_rounds, gated.rounds)
    assert sum(r.stats.accepted for r in spec) > 0
    assert neural.resyncs == 0 and gated.held() == 0


@pytest.mark.parametrize("algo", ["eagle3", "dspark"])
def test_sampled_output_follows_the_target_when_rounds_switch(trained, target, algo):
    """Sequences drafted every other round, their features held back in between, keep the law."""
    neural = ADAPTERS[algo](trained[algo][0], tree=TreeShape(2, 3, 6))
    free = PassCost((1,), (1, 17), ((1.0, 1.0),))  # every node verified, whatever drafting took
    drafter = _Alternating(neural, free)
    assert_follows_the_target(Engine(target, drafter, max_draft_nodes=6), [5, 17, 33, 2, 9], top_k=4)
    assert neural.resyncs == 0


def test_confidence_lies_in_the_unit_interval(trained):
    model: DSparkModel = trained["dspark"][0]
    assert len(model.config.confidence_temperature) == model.config.block_size
    hidden = torch.randn(200, model.config.hidden_size) * 10
    with torch.no_grad():
        code, _ = model.transition(torch.randint(VOCAB, (200,)))
        for k in range(model.config.block_size):
            values = model.survival(hidden, code, k)
            assert values.shape == (200,) and bool(((values >= 0) & (values <= 1)).all())


def test_bad_drafter_folders_are_refused(trained, target, tmp_path):
    with pytest.raises(InvalidRequest, match="unknown drafter"):
        make_drafter(str(tmp_path / "missing"), target)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a drafter folder"):
        load_drafter(tmp_path, target)
    with pytest.raises(InvalidRequest, match="no dspark drafter is shipped"):
        make_drafter("dspark", target, "no-such-model")
    other = tmp_path / "other"
    build_tiny("llama", other, vocab=VOCAB + 8)
    with pytest.raises(ModelLoadError, match="trained for"):
        load_drafter(trained["dflash"][2], load_model(other, torch.float32)[0])


def test_eagle3_training_chains_are_what_it_drafts(target, store):
    """Training-time test computes, for each anchor, the very outputs the drafter computes when it
    drafts the same (teacher-forced) chain: the context pass, then steps on its own outputs."""
    torch.manual_seed(3)
    model = _new("eagle3", target, store).eval()
    ex = store[0]
    tokens, features = ex.tokens, ex.features.float()
    anchors = torch.tensor([ex.prompt_len - 1, ex.prompt_len + 4, tokens.numel() - 6])
    with torch.no_grad():
        trained = model.chains(tokens, features, anchors, 4)
        for i, a in enumerate(anchors.tolist()):
            drafter = ADAPTERS["eagle3"](model)
            state = DraftState([], 0, torch.Generator())
            drafter.extend(state, tokens[: a + 2], features[: a + 1])
            hidden, past = state.extra["last"], state.cache[0]
            for j in range(4):
                if j:
                    mask = torch.ones(1, 1, past[0].shape[2] + 1, dtype=torch.bool)
                    step_input = tokens[a + j + 1].view(1, 1)
                    hidden, kv = model.step(step_input, hidden, torch.tensor([[a + j]]), mask, past)
                    past = cat_kv(past, kv)
                torch.testing.assert_close(trained[j][i], hidden[0, -1], rtol=1e-4, atol=1e-5)


def test_target_probabilities_from_the_stored_normaliser(target, store):
    """The DSpark losses read the target's probabilities of the draft vocabulary from the stored
    final states and logsumexp: the same numbers as a softmax over the whole vocabulary."""
    model = _new("dspark", target, store)
    ex = store[1]
    with torch.no_grad():
        full = torch.softmax(target.logits(ex.final.float()), -1)[:, model.vocab_map]
        rows = torch.exp(target.logits(ex.final.float(), model.target_lm_head) - ex.lse[:, None])
    torch.testing.assert_close(rows, full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher_forced", [False, True])
def test_online_features_equal_the_cached_ones_bit_for_bit(target, tmp_path, teacher_forced):
    """``--features online`` computes each example when it is read: the same tensors as the cache
    (float32 target), the same label counts, and so the same training."""
    rng = random.Random(7)
    records = [(p, [rng.randrange(VOCAB) for _ in range(rng.randrange(3, 20))]) for p in _prompts(70, seed=7)]
    layers = DraftConfig.for_target("dspark", target, "tiny").feature_layers
    cached = build_store(target, records, layers, tmp_path / "f", progress=False, teacher_forced=teacher_forced)
    online = OnlineStore(target, records, layers, teacher_forced)
    assert len(online) == len(cached) == 70  # two shards of the cache
    for i in (0, 1, 63, 64, 69):
        a, b = cached[i], online[i]
        assert a.prompt_len == b.prompt_len
        for name in ("tokens", "features", "final", "lse", "labels"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), (i, name)
    assert torch.equal(cached.token_counts(VOCAB, [3, 5, 8]), online.token_counts(VOCAB, [3, 5, 8]))
    # the draft vocabulary's counts: every record from the cache; online, where labels cost a
    # target pass (teacher-forced), a sample spread over the records
    spread = [0, 14, 28, 42, 56] if teacher_forced else list(range(70))
    assert torch.equal(_label_counts(online, None, 5, VOCAB, target.device), online.token_counts(VOCAB, spread))
    assert torch.equal(_label_counts(cached, None, 5, VOCAB, target.device), cached.token_counts(VOCAB))


def test_teacher_forced_labels_are_the_targets_greedy_tokens(target, tmp_path):
    """Text the target did not write (random here) is labelled with the target's greedy token after
    each position, which plain decoding from that prefix emits; the target's own text keeps its
    next tokens as labels."""
    rng = random.Random(5)
    records = [(p, [rng.randrange(VOCAB) for _ in range(12)]) for p in _prompts(4, seed=5)]
    layers = DraftConfig.for_target("dflash", target, "tiny").feature_layers
    forced = build_store(target, records, layers, tmp_path / "f", progress=False, teacher_forced=True)
    for i, (prompt, response) in enumerate(records):
        ex, tokens = forced[i], prompt + response
        positions = range(len(prompt) - 1, len(tokens) - 1)
        plain = Engine(target).generate([Request(tokens[: p + 1], SamplingParams(max_tokens=1)) for p in positions])
        assert ex.labels[len(prompt) - 1 : -1].tolist() == [r.token_ids[0] for r in plain]
        assert ex.labels[len(prompt) - 1 : -1].tolist() != response  # random text is not the target's
        own = FeatureStore(tmp_path / "f")[i]
        assert torch.equal(own.labels[:-1], own.tokens[1:])

    shard = next((tmp_path / "f").glob("shard-*.safetensors"))
    save_file({k: v for k, v in load_file(str(shard)).items() if k != "greedy"}, str(shard))
    FeatureStore(tmp_path / "f")  # caches made before greedy labels still train on the target's own text
    with pytest.raises(DataError, match="predates teacher-forced labels"):
        FeatureStore(tmp_path / "f", teacher_forced=True)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_replayed_tau_equals_the_engines(trained, target, algo):
    """Greedy τ by replay (no target in the loop) is the τ of real decoding through the engine."""
    prompts = _prompts(6, seed=13)
    drafter = load_drafter(trained[algo][2], target)
    cases = build_cases(target, [("tiny", p) for p in prompts], drafter.feature_layers, max_tokens=24)
    params = SamplingParams(max_tokens=24)
    results = Engine(target, drafter, max_draft_nodes=16).generate([Request(p, params) for p in prompts])
    assert [c.tokens[c.prompt_len :].tolist() for c in cases] == [r.token_ids for r in results]
    rounds = sum(r.stats.rounds for r in results)
    engine_tau = (sum(r.stats.accepted for r in results) + rounds) / rounds
    assert replay(load_drafter(trained[algo][2], target), cases)["all"] == pytest.approx(engine_tau, abs=1e-3)
    assert engine_tau > 1.0, "the drafter never helped: the comparison would not see a miscount"


def test_training_records_a_learning_curve(target, store):
    torch.manual_seed(0)
    model = _new("dflash", target, store)
    calls = []

    def evaluate(m):
        calls.append(m.training)
        return {"tau": {"all": 1.0 + len(calls)}}

    result = train(model, target, store, replace(SETTINGS, steps=10, eval_every=4), progress=False, evaluate=evaluate)
    assert [e["step"] for e in result.evals] == [0, 4, 8, 10]
    tokens = [e["tokens"] for e in result.evals]
    assert tokens[0] == 0 and all(b > a for a, b in zip(tokens, tokens[1:]))
    assert model.training is False and [e["tau"]["all"] for e in result.evals] == [2.0, 3.0, 4.0, 5.0]


def test_dspark_without_a_markov_head_trains_and_stays_exact(target, store):
    """``--markov-rank 0`` (the ablation): the backbone alone, still lossless."""
    torch.manual_seed(0)
    cfg = DraftConfig.for_target("dspark", target, "tiny", draft_vocab=DRAFT_VOCAB, block_size=4, markov_rank=0)
    model = new_draft_model(cfg, target, draft_vocabulary(store.token_counts(VOCAB), DRAFT_VOCAB))
    result = train(model, target, store, replace(SETTINGS, steps=8), progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    prompts = _prompts(4, seed=21)
    params = SamplingParams(max_tokens=20)
    plain = Engine(target).generate([Request(p, params) for p in prompts])
    spec = Engine(target, ADAPTERS["dspark"](model), max_draft_nodes=8).generate([Request(p, params) for p in prompts])
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]


ABLATIONS = {
    "2 layers": {"num_layers": 2},
    "3 layers": {"num_layers": 3, "markov_rank": 16},
    "deepspec layout": {"layout": "deepspec", "num_layers": 2},
    "block 3": {"block_size": 3},
}


@pytest.mark.parametrize("options", list(ABLATIONS.values()), ids=list(ABLATIONS))
def test_every_dspark_configuration_trains_and_stays_exact_with_trees(target, store, options):
    """What ``tandem train`` configures (issue 26: layers, block size, the published layout's
    norms and mask token): trains, and drafts chains and trees that keep greedy output exact."""
    from tandem.drafters.formats import layout_overrides

    options = dict(options)
    overrides = layout_overrides(options.pop("layout", "tandem"), "dspark", VOCAB) | options
    torch.manual_seed(0)
    cfg = DraftConfig.for_target("dspark", target, "tiny", **{"draft_vocab": DRAFT_VOCAB, "block_size": 4, **overrides})
    vocab = draft_vocabulary(store.token_counts(VOCAB), cfg.draft_vocab)
    model = new_draft_model(cfg, target, vocab)
    result = train(model, target, store, replace(SETTINGS, steps=6), progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 1.5 and len(model.layers) == cfg.num_layers
    prompts = _prompts(4, seed=25)
    params = SamplingParams(max_tokens=20)
    plain = Engine(target).generate([Request(p, params) for p in prompts])
    for tree in (None, TreeShape(3, cfg.block_size, 8)):
        drafter = DSparkDrafter(model, tree=tree)
        spec = Engine(target, drafter, max_draft_nodes=8).generate([Request(p, params) for p in prompts])
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]


def test_the_objective_settings_change_the_loss_as_deepspec_defines_them(trained, target, store):
    """``distance: l1`` doubles the distance term (L1 = 2 TV); ``loss_decay`` sets the weight of
    block position k to exp(-k / decay)."""
    from tandem.train.losses import block_loss, block_outputs, choose

    model = trained["dspark"][0]
    ex = store[0]
    # the anchor block_loss draws with the same seed
    anchors = choose(max(ex.prompt_len, 1), ex.tokens.numel() - 1, 1, torch.Generator().manual_seed(0), "cpu")

    def loss(**changes) -> float:
        model.config = replace(model.config, **changes)
        try:
            return float(block_loss(model, ex, target, 1, torch.Generator().manual_seed(0), ce_weight=0.1).loss)
        finally:
            model.config = replace(model.config, loss_decay=0.0, distance="tv")

    with torch.no_grad():
        out = block_outputs(model, ex, target, anchors)
        tv = float((out.tv * out.weights).sum() / out.weights.sum())
        assert loss(distance="l1") - loss() == pytest.approx(0.9 * tv, rel=1e-4)
        model.config = replace(model.config, loss_decay=2.0)
        weights = block_outputs(model, ex, target, anchors).weights[0]
        model.config = replace(model.config, loss_decay=0.0)
    k = torch.arange(model.config.block_size)
    valid = weights > 0
    torch.testing.assert_close(weights[valid], torch.exp(-k / 2.0)[valid])


@pytest.mark.parametrize("options", [{"markov": False}, {"min_survival": 0.0}, {"min_survival": 0.5}])
def test_dspark_inference_ablations_stay_exact(trained, target, options):
    """What ``bench/dspark_ablation.py`` switches (the Markov bias off, other stop thresholds)
    changes the drafts, never the output."""
    prompts = _prompts(4, seed=23)
    params = SamplingParams(max_tokens=20)
    plain = Engine(target).generate([Request(p, params) for p in prompts])
    drafter = DSparkDrafter(trained["dspark"][0], **options)
    spec = Engine(target, drafter, max_draft_nodes=8).generate([Request(p, params) for p in prompts])
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert sum(r.stats.drafted for r in spec) > 0


def test_calibration_skips_held_out_sequences_shorter_than_a_block(target, tmp_path):
    """Teacher-forced replies can be a few tokens long ("Hi!"): no block fits, nothing to fit."""
    records = [(p, [1, 2]) for p in _prompts(3, seed=9)]
    layers = DraftConfig.for_target("dspark", target, "tiny").feature_layers
    short = build_store(target, records, layers, tmp_path, progress=False)
    model = _new("dspark", target, short)
    assert calibrate_confidence(model, target, short, [0, 1, 2], samples=4, seed=0) == [1.0] * 4


def test_drafter_specs_with_tree_shapes():
    assert split_spec("dspark:4,6,16") == ("dspark", TreeShape(4, 6, 16))
    assert split_spec("dspark") == ("dspark", None)
    assert split_spec("/runs/a:b/dflash") == ("/runs/a:b/dflash", None)
    check_drafter_name("eagle3:2,3,6")
    with pytest.raises(InvalidRequest, match="TOPK,DEPTH,BUDGET"):
        check_drafter_name("dspark:4,6,x")
    with pytest.raises(InvalidRequest, match="takes no tree shape"):
        check_drafter_name("ngram:2,3,4")


def test_the_default_drafter_is_the_one_recorded_fastest():
    """Each model's ``default.json`` names a drafter that exists for it; without one, suffix."""
    for folder in SHIPPED.iterdir():
        name = default_drafter(folder.name)
        assert name in UNTRAINED or shipped_drafter(name, folder.name) is not None
    assert default_drafter("no-such-model") == "suffix"


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_drafter_out_of_step_recovers_and_says_so(target, store, algo, caplog):
    """Features that skip positions restart the context where they start (drafting goes on, the
    resync is counted and logged); features sent twice are taken once."""
    model = _new(algo, target, store).eval()
    ex = store[0]
    tokens, feats, n = ex.tokens.tolist(), ex.features.float(), ex.prompt_len + 6
    params = SamplingParams()

    def request(end: int, first: int, last: int) -> DraftRequest:
        return DraftRequest(0, tokens[: end + 1], 4, params, feats[first:last])

    gapped = ADAPTERS[algo](model)
    gapped.propose([request(n, 0, n)])
    with caplog.at_level("WARNING"):
        tree = gapped.propose([request(n + 5, n + 2, n + 5)])[0]  # positions n, n + 1 never came
    assert len(tree) > 1 and gapped.resyncs == 1 and "expected" in caplog.text
    once, twice = ADAPTERS[algo](model), ADAPTERS[algo](model)
    for drafter in (once, twice):
        drafter.propose([request(n, 0, n)])
    expected = once.propose([request(n + 3, n, n + 3)])[0]
    resent = twice.propose([request(n + 3, n - 2, n + 3)])[0]  # two positions again
    assert (resent.tokens, twice.resyncs, once.resyncs) == (expected.tokens, 1, 0)
