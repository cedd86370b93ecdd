"""The target replica's tensor-parallel group: every rank holds a shard of the model and the same
:class:`~tandem.verifier.Verifier` bookkeeping, and runs the same operations in the same order, so
all ranks take the same rows and commit the same verdicts (rank 0's, broadcast every round);
rank 0's answers are returned.

tp = 1 keeps the verifier in the replica's own process, behind one thread (calls stay ordered and
the replica's event loop keeps serving gRPC while a forward pass runs). tp > 1 starts one Ray actor
per rank in the replica's placement group, joined by torch.distributed (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from tandem.devices import available_cpus, field_to_host
from tandem.models.catalog import resolve_model_path
from tandem.models.exact import apply_exact
from tandem.models.loading import load_model
from tandem.models.tp import rank0_verdicts
from tandem.profile import load_or_measure
from tandem.scheduler import PassCost
from tandem.target import DTYPES
from tandem.tree import TokenTree
from tandem.verifier import Step, Verifier


@dataclass(frozen=True)
class ShardSpec:
    """What every rank builds: the target model and a verifier of ``rows`` sessions."""

    model: str
    dtype: str
    rows: int
    max_model_len: int
    feature_layers: tuple[int, ...]
    # torch threads per rank: its CPU share, never more (oversubscription is ~20x slower); None: the
    # rank is its node's only target work, and takes the node's cores / tp
    threads: int | None
    device: str = "cpu"  # "cuda" when the pool asks for GPUs: NCCL joins the ranks instead of gloo
    exact: bool | None = None  # batch-invariant kernels (tandem.models.exact; None: where they run)
    kv_blocks: int | None = None  # the paged KV cache's blocks (None: every row can fill max_model_len)
    block_size: int = 16
    prefix_caching: bool = False  # tandem.prefix_cache: full blocks stay indexed after their sessions


def build_verifier(spec: ShardSpec, group: dist.ProcessGroup | None = None) -> Verifier:
    world = 1 if group is None else dist.get_world_size(group)
    torch.set_num_threads(spec.threads or max(1, available_cpus() // world))
    model, _ = load_model(resolve_model_path(spec.model), DTYPES[spec.dtype], spec.device, group)
    agree = None if group is None else rank0_verdicts(group)
    apply_exact(model, spec.exact)  # after sharding: it packs this rank's weights
    capacity = min(spec.max_model_len, model.config.max_position)
    return Verifier(
        model, spec.rows, capacity, spec.feature_layers, agree, spec.kv_blocks, spec.block_size, spec.prefix_caching
    )  # every rank: blocks of its own KV heads


def _prefill_part(verifier: Verifier, rows: list[int], chunk: int | None) -> list[tuple[Step, int] | None]:
    """One part of the rows' prefills (:meth:`Verifier.prefill_part`): answers for the rows
    whose prompts are now whole, None for the others."""
    steps = verifier.prefill_part(rows, chunk)
    done = [i for i, step in enumerate(steps) if step is not None]
    answers = dict(zip(done, _answers(verifier, [rows[i] for i in done], [steps[i] for i in done])))
    return [answers.get(i) for i in range(len(rows))]


def _verify(verifier: Verifier, rows: list[int], trees: list[TokenTree]) -> list[tuple[Step, int]]:
    return _answers(verifier, rows, verifier.verify(rows, trees))


def _answers(verifier: Verifier, rows: list[int], steps: list[Step]) -> list[tuple[Step, int]]:
    """Steps with their features on the host (one transfer for the batch: they leave this process
    through Ray or gRPC, possibly to a process without a GPU), and each row's room for drafts."""
    return [(step, verifier.room(row)) for step, row in zip(field_to_host(steps, "features"), rows)]


def _pass_cost(verifier: Verifier, model_name: str) -> PassCost:
    """This group's verification profile (every rank measures in step: the passes are collective)."""
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    return load_or_measure(verifier.model, f"{model_name}-tp{ranks}" if ranks > 1 else model_name)


# What a replica asks of its ranks; prefills and verify also return each row's room for drafts.
OPERATIONS = {
    "open": Verifier.open,
    "close": Verifier.close,
    "capacity": lambda verifier: verifier.capacity,
    "rows_in_use": lambda verifier: verifier.cache.num_rows - verifier.free_rows,
    "kv_blocks": lambda verifier: (verifier.cache.blocks_in_use, verifier.cache.num_blocks),
    "prefill_part": _prefill_part,
    "verify": _verify,
    "pass_cost": _pass_cost,
}


class RanksLost(RuntimeError):
    """A rank of the tp group died: the group cannot run another collective pass. Its replica
    fails Serve's health check, so Serve replaces the whole group; its sessions resume elsewhere."""


class Ranks(Protocol):
    async def call(self, operation: str, *args: Any) -> Any:
        """Run ``OPERATIONS[operation](verifier, *args)`` on every rank; rank 0's result."""

    async def check(self) -> None:
        """Raise :class:`RanksLost` if the group lost a rank."""


class LocalRanks:
    """tp = 1: the verifier in this process."""

    def __init__(self, spec: ShardSpec) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier")
        self.verifier = self._thread.submit(build_verifier, spec).result()  # torch threads are per thread

    async def call(self, operation: str, *args: Any) -> Any:
        run = OPERATIONS[operation]
        return await asyncio.get_running_loop().run_in_executor(self._thread, run, self.verifier, *args)

    async def check(self) -> None:
        """Its ranks live and die with the replica's process, which Serve watches itself."""


RANK_NAME = "tandem-tp-rank"


class Rank:
    """One rank of a tp > 1 group (a Ray actor). Its operations run in order on one thread of
    its own; :meth:`alive` runs in a concurrency group of its own (``HEALTH``), so a health
    check answers while a long pass runs instead of queueing behind it."""

    def __init__(self, spec: ShardSpec, rank: int, world: int, init_method: str) -> None:
        backend = "nccl" if spec.device == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray exposes this rank's one GPU as device 0
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        self.rank = rank
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier")  # torch threads are per thread
        self.verifier = self._thread.submit(build_verifier, spec, dist.group.WORLD).result()

    def call(self, operation: str, *args: Any) -> Any:
        result = self._thread.submit(OPERATIONS[operation], self.verifier, *args).result()
        return result if self.rank == 0 else None

    def alive(self) -> bool:
        return True


HEALTH = "health"  # the Rank actors' concurrency group for health checks


class RayRanks:
    """tp > 1: one actor per rank on bundles 1..tp of the replica's placement group (bundle 0
    holds the replica); STRICT_PACK keeps them on the replica's node, so it hosts the rendezvous."""

    def __init__(self, spec: ShardSpec, tp: int, num_cpus: float, num_gpus: float) -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = get_current_placement_group()
        init_method = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
        actor = ray.remote(concurrency_groups={HEALTH: 1})(Rank)
        self.actors = [
            actor.options(
                name=f"{RANK_NAME}{rank}-{group.id.hex()}",  # ray list actors: which group, which rank
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank + 1),
            ).remote(spec, rank, tp, init_method)
            for rank in range(tp)
        ]
        self.lost: BaseException | None = None  # once a rank died, the survivors may hang in a collective

    async def call(self, operation: str, *args: Any) -> Any:
        # Submitted in one order from one caller, so every rank runs the same sequence of calls.
        return (await self._all([a.call.remote(operation, *args) for a in self.actors]))[0]

    async def check(self) -> None:
        await self._all([a.alive.options(concurrency_group=HEALTH).remote() for a in self.actors])

    async def _all(self, calls: list[Any]) -> list[Any]:
        from ray.exceptions import RayActorError

        if self.lost is not None:
            raise RanksLost(f"the tp group lost a rank: {self.lost}")
        try:
            return await asyncio.gather(*calls)
        except RayActorError as exc:
            self.lost = exc
            raise RanksLost(f"the tp group lost a rank: {exc}") from exc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
