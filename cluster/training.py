"""``tandem train --workers N``: the same training run, data parallel through Ray Train.

Ray Train starts N workers with a torch process group between them (gloo on CPUs, NCCL on GPUs),
restarts them from the last checkpoint when one dies (``--max-failures``) and keeps the run's
checkpoints in its storage. Each worker runs what ``tandem train`` runs in process
(:func:`tandem.train.command.prepare`, then the training loop, which sums the ranks' gradients,
see :mod:`tandem.train.trainer`); rank 0 alone evaluates, prints progress and, at the end, reports
the drafter folder as the last checkpoint, which the driver copies to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.app import start_ray
from tandem.errors import TandemError
from tandem.train.command import prepare
from tandem.train.features import read_records
from tandem.train.trainer import CHECKPOINT_FILE, FileCheckpoint


class RayCheckpoint:
    """Checkpoints through Ray Train: rank 0 reports the state as a checkpoint directory, the
    other ranks report the same metrics without one (a report is collective)."""

    def __init__(self, rank: int, earlier: Path) -> None:
        self.rank = rank
        self.earlier = FileCheckpoint(earlier)  # an earlier run's state in --out, resumed when this run has none
        self.last: dict | None = None  # the latest state, which the final drafter folder also holds

    def load(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                self.last = FileCheckpoint(Path(folder) / CHECKPOINT_FILE).load()
        else:
            self.last = self.earlier.load()
        if self.last is None:
            return None
        if self.rank == 0:
            print(f"tandem train: resuming at step {self.last['step']}", file=sys.stderr, flush=True)
        return self.last

    def save(self, state: dict) -> None:
        self.last = state
        last = state["history"][-1] if state["history"] else {}
        self.report({"step": state["step"], "tokens": state["tokens"], "loss": last.get("loss")}, lambda folder: None)

    def report(self, metrics: dict, write) -> None:
        """Report ``metrics``; rank 0 adds a checkpoint: the state and what ``write(folder)`` puts beside it."""
        if self.rank != 0:
            ray.train.report(metrics)
            return
        print(f"tandem train: {metrics}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as folder:
            write(Path(folder))
            torch.save(self.last, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _worker(config: dict) -> None:
    """One rank: the in-process training run on its share of every batch; at the end rank 0
    reports the drafter folder (with the final state, so a rerun resumes as in process)."""
    torch.set_num_threads(max(1, int(config["threads"])))
    job = prepare(argparse.Namespace(**config["args"]))
    earlier = Path(config["args"]["out"]) / CHECKPOINT_FILE
    saver = RayCheckpoint(ray.train.get_context().get_world_rank(), earlier)
    result = job.train(saver, progress=False)
    saver.report(
        {"step": result.steps, "tokens": result.tokens, "final": True}, lambda folder: job.save(result, folder)
    )


def fit(args: argparse.Namespace) -> int:
    """Run ``tandem train`` on ``args.workers`` Ray Train workers; the drafter lands in ``--out``."""
    start_ray(os.environ.get("RAY_ADDRESS"), dashboard=True)
    out = Path(args.out).resolve()
    gpus = args.gpus_per_worker
    if gpus is None:
        cuda = args.device.startswith("cuda") or args.device == "auto"
        gpus = 1.0 if cuda and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    read_records(Path(args.data))  # a bad data file fails here, not in every worker
    worker_args = {k: v for k, v in vars(args).items() if k != "run"}
    for name in ("data", "model", "features"):  # workers start in their own directories
        value = worker_args[name]
        if value and value != "online" and Path(value).exists():
            worker_args[name] = str(Path(value).resolve())
    worker_args["out"] = str(out)
    worker_args["device"] = "cuda" if gpus else "cpu"  # Ray Train sets each worker's visible device
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"args": worker_args, "threads": args.cpus_per_worker},
        scaling_config=ScalingConfig(
            num_workers=args.workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=RunConfig(
            name=out.name,
            storage_path=str(Path(args.storage).resolve() if args.storage else out / "ray-train"),
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None or result.checkpoint is None:
        raise TandemError(f"training on Ray failed: {result.error}")
    result.checkpoint.to_directory(str(out))
    steps = result.metrics.get("step")
    print(f"saved {args.algo} drafter to {out} after {steps} steps on {args.workers} workers", file=sys.stderr)
    return 0
