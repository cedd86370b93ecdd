"""Where tensors live, and the one way results come back to the host.

The rule the engine keeps on every device: tensors (weights, KV cache, logits, draft
distributions, features) live on the model's device; host metadata (token ids, tree shapes,
lengths, what verification decided) is plain Python. A round copies its metadata to the device
once, and brings back what the host must decide on with one :func:`to_host` call (one
synchronisation), never with ``.item()`` / ``.tolist()`` inside a loop over nodes or layers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch

from tandem.errors import TandemError

HOST = torch.device("cpu")
T = TypeVar("T")


class DeviceUnavailable(TandemError):
    """A device name this machine cannot run on."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; :class:`DeviceUnavailable` otherwise."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else HOST
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {name!r} asked for, but this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Copies of ``tensors`` on the host after a single synchronisation: the copies are queued
    without blocking (into pinned memory on CUDA) and waited for once."""
    copies = tuple(_host_copy(t) for t in tensors)
    for device in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()
    return copies


def field_to_host(items: Sequence[T], name: str) -> list[T]:
    """Dataclass ``items`` with their tensor field ``name`` (where not ``None``) on the host, in
    one :func:`to_host` call for them all."""
    copies = iter(to_host(*(getattr(i, name) for i in items if getattr(i, name) is not None)))
    return [i if getattr(i, name) is None else replace(i, **{name: next(copies)}) for i in items]


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cuda":
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=HOST, pin_memory=True)
    return out.copy_(tensor, non_blocking=True)


def host_tensor(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host metadata as a tensor on ``device``: built on the host, copied without blocking."""
    tensor = torch.tensor(data, dtype=dtype, device=HOST)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def available_cpus() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's limit, which the affinity does not show)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cpus
    return cpus if quota == "max" else max(1, min(cpus, int(quota) // int(period)))
