"""On a CUDA device (scripts/gpu-check.sh; skipped elsewhere): the engine with every shipped
drafter, chains and trees, batch 1 and 4, emits exactly what plain decoding emits on the same GPU
(float32), and sampled output keeps the target's law. The device-clean rules (tests/
test_device_clean.py) and NCCL tensor parallelism (tests/test_tp.py) have their own gpu tests."""

from __future__ import annotations

import pytest
import torch

from tandem.drafters import make_drafter
from tandem.engine import Engine, Request
from tandem.models.catalog import DEFAULT_MODEL
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem.target import load_target
from tests.test_drafters import VOCAB, _prompts
from tests.test_engine import assert_follows_the_target
from tests.tiny_models import build_tiny

pytestmark = pytest.mark.gpu

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain the difference between a list and a tuple in Python.",
    "Give three tips for writing clear commit messages.",
    "What is 17 * 23? Show your work.",
]


@pytest.fixture(scope="module")
def cuda_target():
    return load_target(DEFAULT_MODEL, "float32", "cuda")


@pytest.fixture(scope="module")
def plain(cuda_target):
    ids = [cuda_target.tokenizer.encode(p, chat=True) for p in PROMPTS]
    engine = Engine(cuda_target.model, None, cuda_target.eos_token_ids)
    return ids, [r.token_ids for r in engine.generate([Request(i, SamplingParams(max_tokens=64)) for i in ids])]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(
    "drafter", ["dspark", "dspark:chain", "eagle3", "eagle3:chain", "dflash", "dflash:chain", "suffix", "hybrid"]
)
def test_greedy_equals_plain_decoding_on_cuda(cuda_target, plain, drafter, batch):
    ids, expected = plain
    engine = Engine(
        cuda_target.model, make_drafter(drafter, cuda_target.model, DEFAULT_MODEL), cuda_target.eos_token_ids
    )
    outputs = []
    for start in range(0, len(ids), batch):
        requests = [Request(i, SamplingParams(max_tokens=64)) for i in ids[start : start + batch]]
        outputs += [r.token_ids for r in engine.generate(requests)]
    assert outputs == expected


@pytest.mark.parametrize("drafter", ["dspark", "eagle3:chain"])
def test_sampling_keeps_the_targets_law_on_cuda(drafter, tmp_path):
    """A tiny target on the GPU with a random drafter of each kind: chi-square on 2,000 draws."""
    from tandem.drafters import ADAPTERS, new_draft_model
    from tandem.drafters.neural import DraftConfig
    from tandem.tree_search import TreeShape

    build_tiny("llama", tmp_path, vocab=VOCAB)
    target = load_model(tmp_path, torch.float32, "cuda")[0]
    algo, _, kind = drafter.partition(":")
    torch.manual_seed(0)
    cfg = DraftConfig.for_target(algo, target, "tiny", draft_vocab=48, block_size=4)
    model = new_draft_model(cfg, target, torch.arange(48)).to(target.device).eval()
    tree = None if kind == "chain" else TreeShape(3, 4, 8)
    engine = Engine(target, ADAPTERS[algo](model, tree=tree), max_draft_nodes=8)
    assert_follows_the_target(engine, _prompts(1, seed=5)[0], top_k=4)
