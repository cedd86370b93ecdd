"""Loading a real-size checkpoint: peak resident memory and time per rank, at tp = 1 and 2.

Writes a random-weight Llama-architecture checkpoint the size of TinyLlama-1.1B (bf16, about
2.2 GB, in several shards with ``model.safetensors.index.json``), once, then loads it in fresh
processes: what the loader before sharded reads did (every file read whole), and Tandem's loader
at tp = 1 and at tp = 2 (two gloo ranks). Each process reports its peak RSS (``VmHWM``), its
RSS before loading (Python and torch) and the load time; the aim is a peak per rank, above that
start, of at most 1.2 × (checkpoint ÷ tp) + the largest single tensor. Then a draft worker's
footprint for each drafter shipped for the default model: next to the whole target (as before)
and next to the target's embedding and LM head only (``load_embeddings``).

    python bench/loading.py                  # writes bench/results/loading.json and .md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tandem.cache import cache_root

OUT = Path(__file__).parent / "results" / "loading"
# TinyLlama-1.1B's shapes: GQA (32 query heads over 4 KV heads), untied LM head.
CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
SHARD_BYTES = 500 * 2**20
DRAFTERS = ("dspark", "eagle3", "dflash")  # shipped for the default model (SmolLM2-135M, 0.25 GiB in bf16)


def _tensors() -> list[tuple[str, tuple[int, ...]]]:
    c = CONFIG
    h, i, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [(p + f"self_attn.{x}_proj.weight", (kv if x in "kv" else h, h)) for x in "qkvo"]
        out += [
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def write_checkpoint(folder: Path) -> Path:
    """The random checkpoint in ``folder`` (written once; seeded, so always the same numbers)."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, shape in tqdm(_tensors(), desc="random weights", unit="tensor"):
        if sum(t.nbytes for t in shards[-1].values()) >= SHARD_BYTES:
            shards.append({})
        shards[-1][name] = (torch.randn(shape) * (1.0 if len(shape) == 1 else 0.02)).to(torch.bfloat16)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return folder


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from /proc: the peak is
    the process's own since its exec, where ``ru_maxrss`` would carry the parent's from the fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rank(rank: int, world: int, port: int, folder: str, how: str, out: str) -> None:
    from tandem.models.loading import load_model

    torch.set_num_threads(1)
    if how == "tandem" and world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    if how.startswith("draft:"):  # a draft worker's drafter next to the whole target, or its embeddings only
        from tandem.drafters import make_drafter
        from tandem.models.catalog import DEFAULT_MODEL, resolve_model_path
        from tandem.models.loading import load_embeddings

        algo, what = how.removeprefix("draft:").split("+")
        path = resolve_model_path(DEFAULT_MODEL)
        if what == "target":
            target = load_model(path, torch.bfloat16)[0]
        else:
            target = load_embeddings(path, torch.bfloat16)
        drafter = make_drafter(algo, target=target, model_name=DEFAULT_MODEL)
        params = sum(p.numel() for p in target.parameters() if not p.is_meta) + sum(
            p.numel() for p in drafter.model.parameters()
        )
    elif how == "whole-files":  # the loader before: every file read whole (copied out of the map), then cut
        kept = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            kept.update((name, t.clone()) for name, t in load_file(file).items())
        params = sum(t.numel() for t in kept.values())
    else:
        model, _ = load_model(folder, torch.bfloat16, "cpu", dist.group.WORLD if world > 1 else None)
        params = sum(t.numel() for t in model.parameters())
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    Path(out, f"{how}-{world}-{rank}.json").write_text(
        json.dumps({"rss_before": before, "peak_rss": peak, "seconds": seconds, "params": params})
    )
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(folder: Path, out: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    largest = max(math.prod(shape) for _, shape in _tensors()) * 2
    rows = []
    for how, world in tqdm([("whole-files", 1), ("tandem", 1), ("tandem", 2)], desc="loads"):
        mp.start_processes(
            _rank, args=(world, _free_port(), str(folder), how, str(out)), nprocs=world, start_method="spawn"
        )
        for rank in range(world):
            r = json.loads((out / f"{how}-{world}-{rank}.json").read_text())
            grown = r["peak_rss"] - r["rss_before"]
            aim = 1.2 * size / world + largest
            rows.append({"loader": how, "tp": world, "rank": rank, **r, "peak_above_start": grown, "aim": aim})
    drafts = []
    for algo in tqdm(DRAFTERS, desc="draft workers"):
        for what in ("target", "embeddings"):
            how = f"draft:{algo}+{what}"
            mp.start_processes(_rank, args=(1, 0, str(folder), how, str(out)), nprocs=1, start_method="spawn")
            r = json.loads((out / f"{how}-1-0.json").read_text())
            drafts.append({"drafter": algo, "loads": what, **r, "peak_above_start": r["peak_rss"] - r["rss_before"]})
    return {
        "checkpoint_bytes": size,
        "files": len(files),
        "largest_tensor_bytes": largest,
        "runs": rows,
        "draft_workers": drafts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(cache_root() / "bench-checkpoint-1b"))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    folder = write_checkpoint(Path(args.checkpoint))
    with tempfile.TemporaryDirectory() as scratch:
        result = run(folder, Path(scratch))
    gib = 2**30
    lines = [
        f"Checkpoint: {result['checkpoint_bytes'] / gib:.2f} GiB bf16 in {result['files']} files; largest tensor "
        f"{result['largest_tensor_bytes'] / gib:.3f} GiB. Peak RSS above the process's start (Python + torch).",
        "",
        "| loader | tp | rank | load s | RSS at start GiB | peak GiB | peak above start GiB | aim GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['loader']} | {r['tp']} | {r['rank']} | {r['seconds']:.1f} | {r['rss_before'] / gib:.2f} | "
            f"{r['peak_rss'] / gib:.2f} | {r['peak_above_start'] / gib:.2f} | {r['aim'] / gib:.2f} |"
        )
    lines += [
        "",
        "Draft workers (the default model's shipped drafters, bf16): the drafter next to the whole target, "
        "or next to its embedding and LM head only (`load_embeddings`).",
        "",
        "| drafter | loads | load s | peak above start GiB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['drafter']} | {r['loads']} | {r['seconds']:.1f} | {r['peak_above_start'] / gib:.3f} |"
        for r in result["draft_workers"]
    ]
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
