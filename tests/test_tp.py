"""Tensor parallelism on a real torch.distributed group (gloo, 2 processes on this CPU)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tandem.drafters import NgramDrafter
from tandem.engine import Engine, Request
from tandem.models.config import ModelConfig
from tandem.models.loading import load_model
from tandem.models.tp import apply_tp, check_tp_size
from tandem.sampling import SamplingParams
from tests.tiny_models import build_tiny, tiny_config

PROMPTS = [[3, 14, 15, 9, 2, 6, 5, 35], [27, 18, 28], [1, 1, 2, 3, 5, 8, 13, 21, 34, 55]]
TREE_PARENTS = [-1, 0, 0, 1, 2, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_logits(model) -> torch.Tensor:
    """A prefill then a branching tree pass on one cache row: ``[prefill + tree, V]`` logits."""
    prompt = PROMPTS[2]
    cache = model.new_cache(1, 64)
    first = model.block_logits(prompt, cache)
    cache.commit(0, range(len(prompt)))
    second = model.block_logits([prompt[-1], 7, 9, 11, 13, 17], cache, parents=TREE_PARENTS)
    return torch.cat([first, second])


def _outputs(model) -> list[list[int]]:
    engine = Engine(model, NgramDrafter(depth=3, branches=2), max_draft_nodes=6)
    return [r.token_ids for r in engine.generate([Request(p, SamplingParams(max_tokens=16)) for p in PROMPTS])]


def _rank_main(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _ = load_model(folder, torch.float32)
        apply_tp(model, dist.group.WORLD)
        torch.save({"logits": _tree_logits(model), "outputs": _outputs(model)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# SmolLM2-like head counts (6 query heads over 3 KV heads) split unevenly, 2 + 1 KV groups.
UNEVEN = {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96}


@pytest.mark.parametrize(
    "family,overrides",
    [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("gemma3", {}), ("llama", UNEVEN)],
    ids=["llama", "qwen2", "qwen3", "gemma3", "llama-uneven"],
)
def test_tp2_matches_tp1(family: str, overrides: dict, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    build_tiny(family, folder, vocab=64, **overrides)
    model, _ = load_model(folder, torch.float32)
    reference = {"logits": _tree_logits(model), "outputs": _outputs(model)}
    mp.start_processes(_rank_main, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["logits"], reference["logits"], atol=1e-5, rtol=1e-5)
        assert result["outputs"] == reference["outputs"]


def test_tp_sizes_up_to_the_kv_head_count() -> None:
    cfg = ModelConfig.from_hf(tiny_config("llama").to_dict())  # 2 KV heads
    for world in (1, 2):
        check_tp_size(cfg, world)
    with pytest.raises(ValueError, match="2 KV heads"):
        check_tp_size(cfg, 3)
