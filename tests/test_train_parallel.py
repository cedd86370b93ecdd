"""Data-parallel drafter training (issue 25): N ranks take the very steps one process takes on the
same global batch, checked on a real gloo group, and shown to fail when a rank's gradient is
dropped; ``tandem train --workers 2`` through a real local Ray Train run, with a worker killed
mid-run, resumes from its last checkpoint and ends with the same steps and weights as one process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tandem.drafters import DraftConfig, new_draft_model
from tandem.engine import Engine, Request
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem.train import trainer
from tandem.train.features import FeatureStore, build_store, draft_vocabulary, read_records
from tests.cluster_helpers import tiny_chat_target
from tests.test_tp import _free_port

SETTINGS = trainer.TrainSettings(steps=5, batch_size=6, samples=4, lr=3e-3, warmup=1)
DRAFT_VOCAB = 48


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny chat target, 24 greedy records of it (``tandem data``'s format) and their features."""
    root = tmp_path_factory.mktemp("train-parallel")
    target = load_model(tiny_chat_target(root / "target", 512), torch.float32)[0]
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 300) for _ in range(rng.randint(3, 12))] for _ in range(24)]
    results = Engine(target).generate([Request(p, SamplingParams(max_tokens=32)) for p in prompts])
    lines = [json.dumps({"prompt_ids": p, "response_ids": r.token_ids}) for p, r in zip(prompts, results)]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    layers = DraftConfig.for_target("dspark", target, "tiny").feature_layers
    build_store(target, read_records(root / "data.jsonl"), layers, root / "features", progress=False)
    return root


def _train(folder: Path, rank: int = 0, world: int = 1, port: int = 0, drop: bool = False) -> dict:
    """One rank's training run (a process group of ``world`` when > 1); rank 0's weights."""
    if world > 1:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if drop:  # rank 1 loses its gradient before the all-reduce: the check below must notice
        summed = trainer._sum_over_ranks

        def dropping(params, counts, device, world):
            if rank == 1:
                for p in params:
                    p.grad = None
            return summed(params, counts, device, world)

        trainer._sum_over_ranks = dropping
    target = load_model(folder / "target", torch.float32)[0]
    store = FeatureStore(folder / "features")
    cfg = DraftConfig.for_target("dspark", target, "tiny", draft_vocab=DRAFT_VOCAB, block_size=4)
    torch.manual_seed(0)
    model = new_draft_model(cfg, target, draft_vocabulary(store.token_counts(target.config.vocab_size), DRAFT_VOCAB))
    result = trainer.train(model, target, store, SETTINGS, progress=False)
    if world > 1:
        dist.destroy_process_group()
    return {"weights": model.state_dict(), "tokens": result.tokens, "losses": [h["loss"] for h in result.history]}


def _rank_main(rank: int, world: int, port: int, folder: str, drop: bool) -> None:
    out = _train(Path(folder), rank, world, port, drop)
    if rank == 0:
        torch.save(out, Path(folder) / f"ranks{world}-drop{drop}.pt")


def _two_ranks(folder: Path, drop: bool) -> dict:
    mp.start_processes(_rank_main, args=(2, _free_port(), str(folder), drop), nprocs=2, start_method="spawn")
    return torch.load(folder / f"ranks2-drop{drop}.pt")


def _max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_ranks_take_the_steps_of_one_process(workspace):
    one = _train(workspace)
    two = _two_ranks(workspace, drop=False)
    assert two["tokens"] == one["tokens"] > 0  # the same global batches, split between the ranks
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert _max_difference(two["weights"], one["weights"]) < 1e-5
    dropped = _two_ranks(workspace, drop=True)  # the same comparison fails when a gradient is lost
    assert _max_difference(dropped["weights"], one["weights"]) > 1e-3


def _ray_train_workers() -> list[psutil.Process]:
    """The training workers' processes (Ray titles them ``ray::RayTrainWorker``)."""
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "ray::RayTrainWorker"]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_two_workers_survive_a_killed_worker(workspace, tmp_path):
    """``tandem train --workers 2`` on a local Ray: a worker SIGKILLed mid-run is
    replaced, the run resumes from the last checkpoint, and it ends with the steps and the weights of
    the same run in one process."""
    data = workspace / "data.jsonl"
    args = ["--algo", "dspark", "--data", str(data), "--model", str(workspace / "target"), "--features"]
    args += [str(workspace / "features"), "--steps", "24", "--batch-size", "6", "--samples", "4", "--lr", "3e-3"]
    args += ["--warmup", "1", "--eval-limit", "0", "--draft-vocab", str(DRAFT_VOCAB), "--block-size", "4"]
    args += ["--save-dtype", "float32", "--checkpoint-every", "3"]
    tandem = [sys.executable, "-m", "tandem.cli", "train", *args]
    alone = subprocess.run([*tandem, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    out = tmp_path / "two"
    cmd = [*tandem, "--out", str(out), "--workers", "2", "--cpus-per-worker", "0.5", "--max-failures", "2"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(run.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 400
    # Ray Train's controller records each checkpoint it has registered in this file: kill after one.
    snapshot = out / "ray-train" / "two" / "checkpoint_manager_snapshot.json"
    while "checkpoint_" not in (snapshot.read_text() if snapshot.exists() else ""):
        assert run.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.1)
    _ray_train_workers()[-1].send_signal(signal.SIGKILL)
    assert run.wait(timeout=400) == 0, "".join(lines)[-3000:]
    reader.join(timeout=10)
    log = "".join(lines)
    resumed = [int(line.split("resuming at step ")[1].split()[0]) for line in log.splitlines() if "resuming at" in line]
    assert resumed and 0 < resumed[0] < 24, log[-3000:]  # it resumed mid-run, from a checkpoint
    one, two = (json.loads((tmp_path / side / "training.json").read_text()) for side in ("one", "two"))
    assert two["steps"] == one["steps"] == 24 and len(two["settings"]) and two["workers"] == 2
    assert two["response_tokens_seen"] == one["response_tokens_seen"]
    weights = [load_file(str(tmp_path / side / "model.safetensors")) for side in ("one", "two")]
    assert _max_difference(*weights) < 1e-5
