"""``tandem train``: features from the target (cached), a drafter trained on them, saved as a
Hugging Face style folder."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from tandem.errors import TandemError
from tandem.flags import add_device_flag

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from tandem.drafters import DraftConfig
    from tandem.drafters.neural import DraftModel
    from tandem.target import Target
    from tandem.train.features import Store
    from tandem.train.trainer import Checkpointer, TrainResult, TrainSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.drafters.neural import ALGORITHMS
    from tandem.models.catalog import DEFAULT_MODEL, builtin_names

    p = sub.add_parser("train", help="train a drafter (eagle3, dflash, dspark) on `tandem data` output")
    p.add_argument("--algo", required=True, choices=ALGORITHMS)
    p.add_argument("--data", required=True, help="jsonl written by `tandem data`")
    p.add_argument("--out", required=True, help="drafter folder (config.json + model.safetensors); resumes")
    p.add_argument(
        "--features",
        help="feature cache folder (default: <data>.features-<dtype>-<layers>/), or `online`: the target "
        "computes each example's features when it is trained on, and nothing is cached (big targets)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{', '.join(builtin_names())}, an HF folder or a .gguf")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="of the target while computing features (float32: 4x faster than bfloat16 on CPUs without bf16 units)",
    )
    add_device_flag(p)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (the cosine horizon)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget; sets the horizon")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--samples", type=int, default=16, help="blocks or positions scored per sequence")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", type=int, default=None, help="train on the first N records only (data ablations)")
    p.add_argument("--block-size", type=int, default=8, help="γ: draft tokens per round")
    p.add_argument("--layers", type=int, default=1, help="drafter layers (dflash/dspark)")
    p.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: the target's)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="most frequent target tokens kept")
    p.add_argument(
        "--vocab-records",
        type=int,
        default=512,
        help="--features online with teacher-forced data: the draft vocabulary counts the target's labels "
        "of this many records, spread over the data (each costs a target pass; cached features count all)",
    )
    p.add_argument("--markov-rank", type=int, default=64, help="dspark: rank of the Markov head (0: none)")
    p.add_argument(
        "--anchor-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dflash/dspark: give every block slot the features of the position before the anchor",
    )
    p.add_argument(
        "--layout",
        default="tandem",
        choices=["tandem", "deepspec", "specforge"],
        help="tandem: Tandem's own drafter; deepspec (dflash/dspark) or specforge (eagle3): the published "
        "layout, so that `tandem export` can write it for vLLM, SGLang, DeepSpec or SpecForge",
    )
    p.add_argument("--mask-token-id", type=int, default=None, help="--layout deepspec: the block slots' token")
    p.add_argument("--ce-weight", type=float, default=0.1, help="dspark: CE weight; TV gets 1 - it")
    p.add_argument(
        "--feature-layers",
        type=_layer_list,
        default=None,
        help="target layers whose outputs are fused, e.g. 1,8,14,21,27 (default: 2, N/2, N-3)",
    )
    p.add_argument("--loss-decay", type=float, default=0.0, help="position k weighs exp(-k/D) (0: the block size)")
    p.add_argument("--distance", default="tv", choices=["tv", "l1"], help="dspark: TV, or DeepSpec's L1 (= 2 TV)")
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data-parallel workers through Ray Train (DDP: gloo on CPUs, NCCL on GPUs), on the Ray cluster "
        "at RAY_ADDRESS or a local one; the global batch and schedule are those of one process (0: in process)",
    )
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="--workers: CPUs (and torch threads) each")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="--workers: GPUs each (default: 1 with CUDA)")
    p.add_argument(
        "--storage",
        default=None,
        help="--workers: Ray Train's run storage (default: <out>/ray-train); on several nodes a shared path or bucket",
    )
    p.add_argument("--max-failures", type=int, default=3, help="--workers: restarts from the last checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=0, help="steps between τ checks (0: start and end only)")
    p.add_argument("--eval-limit", type=int, default=4, help="τ check: prompts per benchmark (0: no checks)")
    p.add_argument("--eval-tokens", type=int, default=96, help="τ check: greedy tokens per prompt")
    p.set_defaults(run=run_train)


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer numbers") from None


def run_train(args: argparse.Namespace) -> int:
    _check(args)
    if args.workers:
        return _launcher()(args)
    from tandem.train.trainer import CHECKPOINT_FILE

    job = prepare(args)
    result = job.train(checkpoint=Path(args.out) / CHECKPOINT_FILE)
    summary = job.save(result, Path(args.out))
    print(
        f"saved {args.algo} drafter to {args.out} after {result.steps} steps in {result.seconds:.0f} s "
        f"(loss {summary['final_loss']}, first-token accuracy {summary['final_accuracy']})",
        file=sys.stderr,
    )
    return 0


def _check(args: argparse.Namespace) -> None:
    names = ("steps", "batch_size", "samples", "block_size", "layers", "draft_vocab", "vocab_records", "eval_tokens")
    for name in (*names, "records"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TandemError(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_every < 0 or args.eval_limit < 0 or args.markov_rank < 0 or args.loss_decay < 0:
        raise TandemError("--eval-every, --eval-limit, --markov-rank and --loss-decay must be >= 0")
    if args.workers < 0 or args.checkpoint_every < 1:
        raise TandemError("--workers must be >= 0 and --checkpoint-every >= 1")
    if not 0 <= args.ce_weight <= 1:
        raise TandemError("--ce-weight must be in [0, 1]")
    if args.minutes is not None and args.minutes <= 0:
        raise TandemError("--minutes must be > 0")


def _launcher():
    """``tandem train --workers N`` runs through Ray Train, which a package layered on this one
    provides (``cluster.training``, registered as the ``tandem.train`` entry point ``ray``)."""
    for entry in importlib.metadata.entry_points(group="tandem.train", name="ray"):
        return entry.load()
    raise TandemError("--workers needs the cluster package (Ray Train); install tandem with its cluster part")


@dataclass
class TrainJob:
    """Everything one training process holds: the target, the features, a fresh drafter."""

    args: argparse.Namespace
    target: Target
    cfg: DraftConfig
    store: Store
    model: DraftModel
    settings: TrainSettings
    features: Path  # the feature cache's folder (online: where the learning curve's cases are kept)
    teacher_forced: bool

    def train(self, checkpoint: Path | Checkpointer, progress: bool = True) -> TrainResult:
        """Train the drafter; rank 0 alone measures the learning curve."""
        from tandem.train.trainer import rank_and_world, train

        args = self.args
        probe = rank_and_world()[0] == 0 and args.eval_limit
        evaluate = (
            replay_check(self.target, self.cfg, self.features, args.eval_limit, args.eval_tokens) if probe else None
        )
        return train(self.model, self.target.model, self.store, self.settings, checkpoint, progress, evaluate)

    def save(self, result: TrainResult, out: Path) -> dict:
        """Write the drafter folder (config.json, model.safetensors, training.json) into ``out``."""
        import torch

        self.model.save(out, dtype=getattr(torch, self.args.save_dtype))
        last = result.history[-min(20, len(result.history)) :]
        summary = {
            "algo": self.args.algo,
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "examples": len(self.store),
            "final_loss": round(sum(h["loss"] for h in last) / len(last), 4),
            "final_accuracy": round(sum(h["accuracy"] for h in last) / len(last), 4),
            "response_tokens_seen": result.tokens,
            "teacher_forced": self.teacher_forced,
            "workers": max(1, self.args.workers),
            "learning_curve": result.evals,
            "settings": asdict(self.settings),
            "config": asdict(self.cfg),
        }
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return summary


def _label_counts(
    store: Store, examples: Sequence[int] | None, sample: int, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """The draft vocabulary's basis (:meth:`FeatureStore.token_counts`), over ``sample`` records
    spread over ``examples`` where each costs a target pass (online, teacher-forced), else over all;
    with a process group the ranks count their shares and add them up (on ``device``: NCCL's)."""
    from tandem.devices import to_host
    from tandem.train.features import OnlineStore
    from tandem.train.trainer import rank_and_world

    chosen = list(range(len(store)) if examples is None else examples)
    if isinstance(store, OnlineStore) and store.teacher_forced and len(chosen) > sample:
        chosen = [chosen[i * len(chosen) // sample] for i in range(sample)]
    rank, world = rank_and_world()
    counts = store.token_counts(vocab_size, chosen[rank::world])
    if world > 1:
        total = counts.to(device)
        dist.all_reduce(total)
        counts = to_host(total)[0]
    return counts


def prepare(args: argparse.Namespace) -> TrainJob:
    """Load the target, compute (or open) the features and build the drafter to train. With a
    process group, rank 0 computes a missing feature cache while the other ranks wait for it."""
    import torch

    from tandem.drafters import DraftConfig, new_draft_model
    from tandem.drafters.formats import layout_overrides
    from tandem.target import load_target
    from tandem.train.features import FeatureStore, OnlineStore, build_store, draft_vocabulary, read_records
    from tandem.train.regenerate import responses_of
    from tandem.train.trainer import TrainSettings, rank_and_world, split

    records = read_records(Path(args.data))
    target = load_target(args.model, args.dtype, args.device)
    overrides = {
        "block_size": args.block_size,
        "num_layers": args.layers,
        "draft_vocab": min(args.draft_vocab, target.model.config.vocab_size),
        "markov_rank": args.markov_rank,
        "anchor_features": args.anchor_features,
        "loss_decay": args.loss_decay,
        "distance": args.distance,
    }
    if args.feature_layers:
        depth = target.model.config.num_layers
        if any(not 0 <= i < depth for i in args.feature_layers):
            raise TandemError(f"--feature-layers must lie in 0..{depth - 1} for this {depth}-layer target")
        overrides["feature_layers"] = args.feature_layers
    if args.intermediate_size:
        overrides["intermediate_size"] = args.intermediate_size
    vocab_size = target.model.config.vocab_size
    overrides |= layout_overrides(args.layout, args.algo, vocab_size, args.mask_token_id)
    cfg = DraftConfig.for_target(args.algo, target.model, str(args.model), **overrides)
    layers = "-".join(map(str, cfg.feature_layers))
    teacher_forced = responses_of(Path(args.data)) == "dataset"
    lead = rank_and_world()[0] == 0
    if args.features == "online":
        store = OnlineStore(target.model, records, cfg.feature_layers, teacher_forced)
        features = Path(f"{args.data}.online-{args.dtype}-{layers}")  # for the learning curve's replay cases
        features.mkdir(parents=True, exist_ok=True)
    else:
        features = Path(args.features or f"{args.data}.features-{args.dtype}-{layers}")
        if lead:
            store = build_store(target.model, records, cfg.feature_layers, features, teacher_forced=teacher_forced)
        if dist.is_initialized():
            dist.barrier()
        if not lead:
            store = FeatureStore(features, teacher_forced)
    torch.manual_seed(args.seed)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings) if hasattr(args, f.name)})
    # With --records the draft vocabulary comes from those records only (a data ablation sees no more).
    trained_on = split(store, settings.holdout, settings.records)[0] if settings.records else None
    counts = _label_counts(store, trained_on, args.vocab_records, vocab_size, target.model.device)
    vocab = draft_vocabulary(counts, cfg.draft_vocab)
    model = new_draft_model(cfg, target.model, vocab).to(device=target.model.device, dtype=torch.float32)
    return TrainJob(args, target, cfg, store, model, settings, features, teacher_forced)


def replay_check(target, cfg, features: Path, limit: int, max_tokens: int):
    """The learning-curve probe: greedy τ by replay (``tandem.eval.replay``) on the first ``limit``
    prompts of each benchmark, full γ chains (DSpark without its confidence stop, so that all
    algorithms are measured alike). The target's continuations are cached beside the features."""
    from tandem.drafters import ADAPTERS
    from tandem.drafters.dspark import DSparkDrafter
    from tandem.eval.benchmarks import BENCHMARKS, load_benchmarks
    from tandem.eval.replay import build_cases, load_cases, replay, save_cases

    path = features / f"replay-{limit}x{max_tokens}.safetensors"
    if path.exists():
        cases = load_cases(path)
    else:
        prompts = load_benchmarks(list(BENCHMARKS), limit)
        chat = target.tokenizer.has_chat_template
        encoded = [(p.benchmark, target.tokenizer.encode(p.text, chat=chat)) for p in prompts]
        cases = build_cases(target.model, encoded, cfg.feature_layers, max_tokens, target.eos_token_ids)
        save_cases(cases, path)

    def evaluate(model) -> dict:
        drafter = DSparkDrafter(model, min_survival=0.0) if cfg.algo == "dspark" else ADAPTERS[cfg.algo](model)
        return {"tau": replay(drafter, cases)}

    return evaluate


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.drafters.formats import FORMATS
    from tandem.models.catalog import DEFAULT_MODEL, builtin_names

    p = sub.add_parser(
        "export", help="write a trained drafter in a published layout (vLLM, SGLang, DeepSpec, SpecForge)"
    )
    p.add_argument("drafter", help="drafter folder (written by `tandem train`, or a published one)")
    p.add_argument(
        "--format",
        required=True,
        choices=list(FORMATS),
        help="deepspec: DSpark/DFlash; specforge: EAGLE-3; zlab: DFlash",
    )
    p.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"the drafter's target: {', '.join(builtin_names())}, an HF folder or a .gguf",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="of the written weights")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from tandem.drafters import load_draft_model
    from tandem.drafters.formats import export_drafter
    from tandem.models.catalog import resolve_model_path
    from tandem.models.loading import load_embeddings
    from tandem.target import DTYPES

    # The drafter's view of the target (embedding and LM head, no layers), as a draft worker loads it.
    target = load_embeddings(resolve_model_path(args.model), DTYPES[args.dtype])
    model = load_draft_model(args.drafter, target)
    out = export_drafter(model, args.format, args.out, target.config.num_layers)
    print(f"wrote the {model.config.algo} drafter to {out} in the {args.format} layout", file=sys.stderr)
    return 0
