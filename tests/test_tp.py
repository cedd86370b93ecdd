"""Tensor parallelism on a real torch.distributed group (gloo, 2 processes on this CPU; NCCL on
two GPUs where a machine has them)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tandem.drafters import NgramDrafter
from tandem.engine import Engine, Request
from tandem.kernels.cpu import KernelUnavailable, exact_kernels
from tandem.models.config import ModelConfig
from tandem.models.decoder import Transformer
from tandem.models.loading import load_model
from tandem.models.tp import check_tp_size, rank0_verdicts
from tandem.sampling import SamplingParams
from tandem.tree import chain
from tandem.verifier import Verifier
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


@contextlib.contextmanager
def _shard(
    rank: int, world: int, port: int, folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Iterator[Transformer]:
    """In a spawned rank: join the group (gloo, or NCCL on CUDA) and yield this rank's shard."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world)
    try:
        model, _ = load_model(folder, dtype, device, dist.group.WORLD)
        yield model
    finally:
        dist.destroy_process_group()


def _rank_main(rank: int, world: int, port: int, folder: str, out: str, device: str = "cpu") -> None:
    with _shard(rank, world, port, folder, device=device) as model:
        logits = _tree_logits(model).cpu()
        torch.save({"logits": logits, "outputs": _outputs(model)}, f"{out}/rank{rank}.pt")


# SmolLM2-like head counts (6 query heads over 3 KV heads) split unevenly, 2 + 1 KV groups.
UNEVEN = {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96}


@pytest.mark.parametrize(
    "family,overrides,sharded",
    [
        ("llama", {}, False),
        ("qwen2", {}, False),
        ("qwen3", {}, False),
        ("gemma3", {}, True),
        ("llama", UNEVEN, True),
    ],
    ids=["llama", "qwen2", "qwen3", "gemma3-sharded-file", "llama-uneven-sharded-file"],
)
def test_tp2_matches_tp1(family: str, overrides: dict, sharded: bool, tmp_path: Path) -> None:
    """Each rank reads its slices (from one file, or from a checkpoint in several with an index)
    and the group's logits and tokens are tp=1's."""
    folder = tmp_path / "model"
    hf = build_tiny(family, folder, vocab=64, **overrides)
    if sharded:
        folder = tmp_path / "sharded"
        hf.save_pretrained(folder, max_shard_size="30KB")
        assert (folder / "model.safetensors.index.json").is_file()
    model, _ = load_model(folder, torch.float32)
    reference = {"logits": _tree_logits(model), "outputs": _outputs(model)}
    mp.start_processes(_rank_main, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["logits"], reference["logits"], atol=1e-5, rtol=1e-5)
        assert result["outputs"] == reference["outputs"]


def _exact_rank_main(rank: int, world: int, port: int, folder: str, out: str) -> None:
    """A tp rank in bf16 on the exact kernels (packed after sharding, as workers/tp.py does):
    plain decoding, and speculation with n-gram trees at batch 12."""
    from tandem.models.exact import apply_exact

    with _shard(rank, world, port, folder, torch.bfloat16) as model:
        assert apply_exact(model, True)
        rng = random.Random(0)
        prompts = [[rng.randrange(64) for _ in range(rng.randint(3, 20))] for _ in range(12)]
        params = SamplingParams(max_tokens=24)
        plain = [Engine(model).generate([Request(p, params)])[0].token_ids for p in prompts]
        engine = Engine(model, NgramDrafter(depth=3, branches=2), max_draft_nodes=6)
        speculative = [r.token_ids for r in engine.generate([Request(p, params) for p in prompts])]
        # with prefix hits: every prompt behind a shared system prompt another call left cached
        system = [rng.randrange(64) for _ in range(13)]
        shared = [system + p for p in prompts]
        cold = [Engine(model).generate([Request(p, params)])[0].token_ids for p in shared]
        engine = Engine(
            model, NgramDrafter(depth=3, branches=2), max_draft_nodes=6, prefix_cache_blocks=32, block_size=4
        )
        engine.generate([Request(shared[0], params)])
        hot = engine.generate([Request(p, params) for p in shared])
        assert min(r.stats.cached_tokens for r in hot) == 12
        results = {"plain": plain, "speculative": speculative, "cold": cold, "hot": [r.token_ids for r in hot]}
        torch.save(results, f"{out}/rank{rank}.pt")


def test_tp2_on_the_exact_kernels_keeps_bf16_plain_output(tmp_path: Path) -> None:
    """bf16 tp ranks on the exact kernels: speculative output equals the same ranks' plain decoding
    token for token (the all-reduce sums partial outputs elementwise, so rows stay independent),
    with and without prefix-cache hits (each rank keeps the blocks of its own KV heads)."""
    try:
        exact_kernels()
    except KernelUnavailable as exc:
        pytest.skip(f"exact kernels unavailable: {exc}")
    folder = tmp_path / "model"
    build_tiny("llama", folder, vocab=64, **UNEVEN)
    mp.start_processes(
        _exact_rank_main, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["speculative"] == result["plain"]
        assert result["hot"] == result["cold"]


def _sampled_tokens(verifier: Verifier, seed: int, rounds: int = 8) -> list[int]:
    """Plain sampled decoding through the verifier: each token depends on its generator's draws."""
    params = SamplingParams(temperature=1.0, max_tokens=rounds + 1)
    row = verifier.open(PROMPTS[0], params, seed)
    tokens = [verifier.prefill([row])[0].tokens[-1]]
    for _ in range(rounds):
        tokens += verifier.verify([row], [chain(tokens[-1], [])])[0].tokens
    return tokens


def _agreeing_rank_main(rank: int, world: int, port: int, folder: str, out: str) -> None:
    with _shard(rank, world, port, folder) as model:
        verifier = Verifier(model, 1, 64, agree=rank0_verdicts(dist.group.WORLD))
        torch.save(_sampled_tokens(verifier, seed=100 + rank), f"{out}/rank{rank}.pt")  # each rank its own draws


def test_ranks_commit_rank0s_verdicts(tmp_path: Path) -> None:
    """Ranks that would sample differently (here: different seeds) still emit and commit rank 0's
    tokens: the verdict is broadcast, never assumed."""
    folder = tmp_path / "model"
    build_tiny("llama", folder, vocab=64)
    model, _ = load_model(folder, torch.float32)
    alone = _sampled_tokens(Verifier(model, 1, 64), seed=100)
    assert alone != _sampled_tokens(Verifier(model, 1, 64), seed=101)  # the seeds do draw differently
    args = (2, _free_port(), str(folder), str(tmp_path))
    mp.start_processes(_agreeing_rank_main, args=args, nprocs=2, start_method="spawn")
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [alone, alone]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tp2_over_nccl_matches_tp1_on_one_gpu(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    build_tiny("llama", folder, vocab=64, **UNEVEN)
    model, _ = load_model(folder, torch.float32, "cuda:0")
    reference = {"logits": _tree_logits(model).cpu(), "outputs": _outputs(model)}
    args = (2, _free_port(), str(folder), str(tmp_path), "cuda")
    mp.start_processes(_rank_main, args=args, nprocs=2, start_method="spawn")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["logits"], reference["logits"], atol=1e-4, rtol=1e-4)
        assert result["outputs"] == reference["outputs"]


def test_tp_sizes_up_to_the_kv_head_count() -> None:
    cfg = ModelConfig.from_hf(tiny_config("llama").to_dict())  # 2 KV heads
    for world in (1, 2):
        check_tp_size(cfg, world)
    with pytest.raises(ValueError, match="2 KV heads"):
        check_tp_size(cfg, 3)
