"""The engine is device-clean by construction (tests/device_check.py): every tensor it makes names
its device, nothing mixes devices, and device data comes back to the host only through
``to_host``: once per verification round on the target side, once per chain or tree depth on the
draft side. Covered: plain and speculative generation with every drafter (chains, trees, the
scheduler), greedy and sampling, a training step per algorithm, and the target worker's ops.
On a CUDA machine (scripts/gpu-check.sh) the same tests also run on the GPU, where mixing devices
fails for real."""

from __future__ import annotations

import random

import pytest
import torch

from tandem.devices import DeviceUnavailable, resolve_device
from tandem.drafters import ADAPTERS, HybridDrafter, NgramDrafter, SuffixDrafter, new_draft_model
from tandem.drafters.neural import ALGORITHMS, DraftConfig
from tandem.engine import Engine, Request
from tandem.kernels.cpu import KernelUnavailable
from tandem.models.exact import apply_exact
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem.scheduler import PassCost, ScheduledDrafter
from tandem.train.features import build_store, draft_vocabulary
from tandem.train.trainer import TrainSettings, train
from tandem.tree import chain
from tandem.tree_search import TreeShape
from tests.device_check import DeviceError, device_check
from tests.tiny_models import build_tiny
from workers.features import chunks
from workers.tp import OPERATIONS
from workers.wire import step_to_proto, tree_to_proto

VOCAB, GAMMA = 64, 4
SHAPE = TreeShape(3, GAMMA, 8)
PARAMS = {"greedy": SamplingParams(max_tokens=10), "sampled": SamplingParams(temperature=1.0, max_tokens=10, seed=3)}


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(4, 10))] * 2 for _ in range(2)]


@pytest.fixture(scope="module", params=["cpu", "cpu-exact", pytest.param("cuda", marks=pytest.mark.gpu)])
def target(request, tmp_path_factory):
    """The stock kernels on each device, and the exact CPU kernels (their step plan included)."""
    folder = tmp_path_factory.mktemp("device-target")
    build_tiny("llama", folder, vocab=VOCAB)
    device, _, exact = request.param.partition("-")
    model = load_model(folder, torch.float32, device)[0]
    if exact:
        try:
            apply_exact(model, True)
        except KernelUnavailable as exc:
            pytest.skip(f"exact kernels unavailable: {exc}")
    return model


@pytest.fixture(scope="module")
def drafts(target):
    """A random drafter per algorithm (the code paths, not the guesses, are under test)."""
    torch.manual_seed(0)
    out = {}
    for algo in ALGORITHMS:
        cfg = DraftConfig.for_target(algo, target, "tiny", draft_vocab=48, block_size=GAMMA)
        out[algo] = new_draft_model(cfg, target, torch.arange(48)).to(target.device).eval()
    return out


def _drafter(spec: str, drafts):
    name, _, shape = spec.partition(":")
    tree = None if shape == "chain" else SHAPE
    if name == "ngram":
        return NgramDrafter(depth=GAMMA, branches=2)
    if name == "suffix":
        return SuffixDrafter()
    if name == "hybrid":
        return HybridDrafter(SuffixDrafter(), ADAPTERS["dspark"](drafts["dspark"], tree=tree))
    drafter = ADAPTERS[name](drafts[name], tree=tree)
    return ScheduledDrafter(drafter, PassCost((1,), (1, 9), ((1.0, 1.2),))) if shape == "scheduled" else drafter


SPECS = [
    "none",
    "ngram",
    "suffix",
    "hybrid",
    *(f"{algo}:{kind}" for algo in ALGORITHMS for kind in ("chain", "tree")),
    "dspark:scheduled",
]


@pytest.fixture(scope="module")
def plain(target):
    """Plain greedy decoding of the prompts, outside the check: what every greedy run must emit."""
    return Engine(target, None).generate([Request(p, PARAMS["greedy"]) for p in _prompts(1)])


@pytest.mark.parametrize("mode", PARAMS)
@pytest.mark.parametrize("spec", SPECS)
def test_generation_is_device_clean(target, drafts, plain, spec, mode, monkeypatch):
    drafter = None if spec == "none" else _drafter(spec, drafts)
    engine = Engine(target, drafter, max_draft_nodes=8)
    requests = [Request(p, PARAMS[mode]) for p in _prompts(1)]
    expected = plain if mode == "greedy" else None
    modules = [target, *(m for m in drafts.values())]
    with device_check(*modules, monkeypatch=monkeypatch) as transfers:
        results = engine.generate(requests)
    rounds = engine.target_passes
    assert transfers["tandem.verify"] == rounds  # one per pass: prefill and each verification
    draft_side = sum(n for module, n in transfers.items() if module != "tandem.verify")
    drafting_rounds = sum(r.stats.rounds for r in results)
    assert draft_side <= drafting_rounds * GAMMA  # at most one per chain or per tree depth
    if expected is not None:
        assert [r.token_ids for r in results] == [r.token_ids for r in expected]


@pytest.mark.parametrize("spec", ["none", "dspark:tree"])
def test_prefix_cache_hits_are_device_clean(target, drafts, plain, spec, monkeypatch):
    """Blocks copied in (keys, values, the drafter's target features) and out, at prefill and at
    close, without a transfer of their own."""
    drafter = None if spec == "none" else _drafter(spec, drafts)
    engine = Engine(target, drafter, max_draft_nodes=8, prefix_cache_blocks=32, block_size=2)
    requests = [Request(p, PARAMS["greedy"]) for p in _prompts(1)]
    engine.generate(requests)  # leaves every prompt and reply cached
    passes = engine.target_passes
    with device_check(target, *drafts.values(), monkeypatch=monkeypatch) as transfers:
        results = engine.generate(requests)
    assert transfers["tandem.verify"] == engine.target_passes - passes
    assert all(r.stats.cached_tokens for r in results)
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]


def test_the_check_catches_what_it_should(target, monkeypatch):
    """It must fail on a factory without a device, a stray sync, and a Generator without a device."""
    with device_check(target, monkeypatch=monkeypatch), pytest.raises(DeviceError, match="without a device"):
        torch.zeros(3)
    with device_check(target, monkeypatch=monkeypatch), pytest.raises(DeviceError, match="to_host"):
        target.embed.weight[0, 0].item()
    with device_check(target, monkeypatch=monkeypatch), pytest.raises(DeviceError, match="Generator"):
        torch.Generator()
    with device_check(target, monkeypatch=monkeypatch), pytest.raises(DeviceError, match="to_host"):
        (target.embed.weight.sum(-1) > 0).any().__bool__()


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_training_step_is_device_clean(target, drafts, algo, tmp_path, monkeypatch):
    prompts = _prompts(2)
    results = Engine(target).generate([Request(p, SamplingParams(max_tokens=16)) for p in prompts])
    records = [(p, r.token_ids) for p, r in zip(prompts, results)]
    cfg = DraftConfig.for_target(algo, target, "tiny", draft_vocab=48, block_size=GAMMA)
    store = build_store(target, records, cfg.feature_layers, tmp_path, progress=False)
    model = new_draft_model(cfg, target, draft_vocabulary(store.token_counts(VOCAB), 48)).to(target.device)
    settings = TrainSettings(steps=2, batch_size=2, samples=2, warmup=1, checkpoint_every=10)
    with device_check(target, model, monkeypatch=monkeypatch):
        result = train(model, target, store, settings, progress=False)
    assert len(result.history) == 2


def test_target_worker_ops_are_device_clean(target, monkeypatch):
    """The ops a target replica (or each tp rank) runs, and the wire conversions of their answers."""
    from tandem.verifier import Verifier, prefill_groups

    verifier = Verifier(target, 2, 64, feature_layers=(0, 1))
    prompts = _prompts(3)
    with device_check(target, monkeypatch=monkeypatch) as transfers:
        rows = [OPERATIONS["open"](verifier, p, PARAMS["sampled"], 7) for p in prompts]
        answers = OPERATIONS["prefill_part"](verifier, rows, None)
        trees = [chain(step.tokens[-1], [1, 2, 3]) for step, _ in answers]
        answers = OPERATIONS["verify"](verifier, rows, trees)
        for step, room in answers:
            step_to_proto(step, room, verifier.capacity)
            list(chunks("s", 0, step.features))
        tree_to_proto(trees[0])
    passes = len(prefill_groups([len(p) for p in prompts], verifier.prefill_pass_tokens))
    assert transfers == {"tandem.verify": passes + 1, "workers.tp": 2}  # one read per pass, none per token


def test_devices_are_resolved_or_refused_clearly():
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceUnavailable, match="auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="no CUDA device"):
            resolve_device("cuda:0")


def test_pools_refuse_gpu_settings_nccl_cannot_use():
    from cluster.config import ConfigError, load_config

    for bad in (0.5, 2):
        with pytest.raises(ConfigError, match="one GPU per NCCL rank"):
            load_config(None, target={"num_gpus": bad})
    with pytest.raises(ConfigError, match="device cuda needs num_gpus"):
        load_config(None, draft={"device": "cuda"})
    with pytest.raises(ConfigError, match="device must be"):
        load_config(None, target={"device": "tpu"})
    config = load_config(None, draft={"num_gpus": 0.25}, target={"num_gpus": 1, "tp": 2})
    assert (config.draft.torch_device, config.target.torch_device) == ("cuda", "cuda")
    assert load_config(None).target.torch_device == "cpu"
