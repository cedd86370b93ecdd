"""Data-parallel training speed (issue 25): the same ``tandem train`` run in process, and through
Ray Train with 1 and with N workers sharing the machine's cores, each for the same steps on the
same global batch; plus the time of one gradient all-reduce of the drafter's size on a gloo group.
Training seconds come from each run's ``training.json`` (start-up and feature loading excluded).

    python bench/train_parallel.py --data data/train.jsonl --steps 30
    python bench/train_parallel.py --data data/train.jsonl --algo dspark --workers 2 --steps 30

Writes bench/results/train_parallel.json. Equal results of 1 and N workers are tested
(tests/test_train_parallel.py); on a machine whose cores all workers share, expect no speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from decode import machine_info, write_json

OUT = Path(__file__).parent / "results" / "train_parallel.json"


def _train(args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tandem.cli", "train", "--algo", args.algo, "--data", args.data, "--out", str(out)]
    cmd += ["--steps", str(args.steps), "--samples", str(args.samples), "--eval-limit", "0", "--seed", "0", *extra]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    begin = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"train_parallel: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "training.json").read_text())
    return {
        "steps": summary["steps"],
        "train_seconds": summary["seconds"],
        "wall_seconds": round(time.perf_counter() - begin, 1),
        "response_tok_s": round(summary["response_tokens_seen"] / summary["seconds"], 1),
        "s_per_step": round(summary["seconds"] / summary["steps"], 3),
        "final_loss": summary["final_loss"],
    }


def _all_reduce_rank(rank: int, world: int, port: int, numel: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    flat = torch.randn(numel)
    dist.all_reduce(flat)  # warm-up
    begin = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(flat)
    if rank == 0:
        Path(out).write_text(str((time.perf_counter() - begin) / repeats))
    dist.destroy_process_group()


def all_reduce_seconds(numel: int, world: int, repeats: int = 10) -> float:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/seconds"
        mp.start_processes(
            _all_reduce_rank, args=(world, port, numel, repeats, out), nprocs=world, start_method="spawn"
        )
        return float(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a `tandem data` file whose feature cache is built")
    parser.add_argument("--algo", default="dspark", choices=["dspark", "eagle3", "dflash"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="N for the data-parallel run")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        runs["in process"] = _train(args, root / "alone", [])
        runs["ray, 1 worker"] = _train(args, root / "one", ["--workers", "1", "--cpus-per-worker", str(cores)])
        per = cores / args.workers
        runs[f"ray, {args.workers} workers"] = _train(
            args, root / "many", ["--workers", str(args.workers), "--cpus-per-worker", str(per)]
        )
        trained = json.loads((root / "alone" / "training.json").read_text())["config"]
    params = _trained_parameters(trained)
    seconds = all_reduce_seconds(params, args.workers)
    report = {
        "machine": machine_info(torch.get_num_threads(), "float32"),
        "settings": vars(args) | {"out": str(args.out)},
        "runs": runs,
        "trained_parameters": params,
        "all_reduce": {"world": args.workers, "megabytes": round(params * 4 / 2**20, 1), "seconds": round(seconds, 4)},
    }
    write_json(args.out, report)
    for name, run in runs.items():
        print(f"{name:>16}: {run['s_per_step']:.3f} s/step, {run['response_tok_s']:.0f} response tok/s")
    print(f"all-reduce of {params:,} float32 gradients on {args.workers} gloo ranks: {seconds * 1000:.1f} ms")
    return 0


def _trained_parameters(config: dict) -> int:
    """The trained parameters of the drafter ``config`` describes."""
    from tandem.drafters import DraftConfig, new_draft_model
    from tandem.target import load_target

    cfg = DraftConfig(**config)
    target = load_target(cfg.target, "float32")
    model = new_draft_model(cfg, target.model, torch.arange(cfg.draft_vocab))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    sys.exit(main())
