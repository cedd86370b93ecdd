"""A mechanical check that the engine is device-clean, runnable on a machine without a GPU.

Inside :func:`device_check`:

- every tensor factory (``torch.zeros``, ``arange``, ``tensor``, ``Generator``...) must name its
  device; anything that still slips through (a factory not listed here, in a library) lands on
  the ``meta`` device, which fails at its first use with real data;
- no operation may mix tensors of two devices (on a GPU machine this catches a host tensor fed
  to a CUDA op; on a CPU one the rule above stands in for it);
- device data may reach the host only through :func:`tandem.devices.to_host`. Tensors are tagged
  "device" when they come from a model's weights, from a factory or ``.to()`` that names a device
  other than :data:`tandem.devices.HOST`, or from an operation on tagged tensors; ``.item()``,
  ``.tolist()``, ``bool()``, ``int()``, ``float()``, ``.numpy()`` or ``.cpu()`` on a tagged tensor is
  a stray synchronisation and fails at once. ``to_host`` calls are counted per calling module, so a
  test can hold them to one per verification round.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import tandem.devices as devices

FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.tensor,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.eye,
    torch.linspace,
    torch.scalar_tensor,
}
SYNCS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
}
TAG = "_tandem_on_device"


class DeviceError(AssertionError):
    """A device rule broken: the message names the operation."""


class _Check(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.transfers: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if func in FACTORIES and "device" not in kwargs:
            raise DeviceError(f"torch.{name} without a device")
        if func is torch.as_tensor and not isinstance(args[0], torch.Tensor) and "device" not in kwargs:
            raise DeviceError("torch.as_tensor of host data without a device")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in SYNCS and any(_tagged(t) for t in tensors):
            raise DeviceError(f"Tensor.{name} on device data: bring it back with tandem.devices.to_host")
        if func is torch.Tensor.to and _tagged(args[0]) and _host_target(args, kwargs):
            raise DeviceError("Tensor.to(host) on device data: bring it back with tandem.devices.to_host")
        devices_seen = {t.device for t in tensors if t.dim() > 0}
        if len(devices_seen) > 1:
            raise DeviceError(f"{name} mixes devices {sorted(map(str, devices_seen))}")
        out = func(*args, **kwargs)
        if any(_tagged(t) for t in tensors) or _names_a_device(func, args, kwargs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    _tag(t)
        return out


def _tagged(t: torch.Tensor) -> bool:
    return getattr(t, TAG, False)


def _tag(t: torch.Tensor, value: bool = True) -> None:
    with contextlib.suppress(AttributeError, RuntimeError):
        setattr(t, TAG, value)


def _device_arg(args: tuple, kwargs: dict) -> Any:
    if "device" in kwargs:
        return kwargs["device"]
    return next((a for a in args[1:] if isinstance(a, (torch.device, str))), None)


def _host_target(args: tuple, kwargs: dict) -> bool:
    """``HOST`` itself, or spelled out: the engine's own device is a different object even on a CPU."""
    target = _device_arg(args, kwargs)
    return target is devices.HOST or target == "cpu"


def _names_a_device(func: Any, args: tuple, kwargs: dict) -> bool:
    """A factory or ``.to()`` that puts its result on the engine's device (not ``HOST`` itself)."""
    if func not in FACTORIES and func not in (torch.as_tensor, torch.Tensor.to, torch.Tensor.new_tensor):
        return False
    device = _device_arg(args, kwargs)
    return device is not None and device is not devices.HOST


def _strict_generator(real: type) -> Any:
    def make(*args: Any, **kwargs: Any) -> torch.Generator:
        if "device" not in kwargs:
            raise DeviceError("torch.Generator without a device")
        return real(*args, **kwargs)

    return make


def tag_module(module: torch.nn.Module) -> None:
    """Mark a model's weights and buffers as device data (they are, wherever it runs)."""
    for t in [*module.parameters(), *module.buffers()]:
        _tag(t)


@contextlib.contextmanager
def device_check(*modules: torch.nn.Module, monkeypatch: Any) -> Iterator[collections.Counter[str]]:
    """Run the body under the rules above; yields the ``to_host`` calls per calling module."""
    for module in modules:
        tag_module(module)
    check = _Check()
    real_to_host = devices.to_host

    def counted_to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        frame = sys._getframe(1)
        while frame.f_globals["__name__"] == devices.__name__:  # field_to_host: count its caller
            frame = frame.f_back
        check.transfers[frame.f_globals["__name__"]] += 1
        with torch._C.DisableTorchFunction():  # the one sanctioned device-to-host copy
            out = real_to_host(*tensors)
        for t in out:  # on the host now (the very same objects on a CPU run)
            _tag(t, False)
        return out

    for name, mod in list(sys.modules.items()):
        if name.startswith(("tandem", "workers", "cluster")) and getattr(mod, "to_host", None) is real_to_host:
            monkeypatch.setattr(mod, "to_host", counted_to_host)
    monkeypatch.setattr(torch, "Generator", _strict_generator(torch.Generator))
    # The optimizer keeps its step counts as host scalars by design: library code, outside the rules.
    real_step = torch.optim.AdamW.step

    def unchecked_step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        with torch._C.DisableTorchFunction():
            return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", unchecked_step)
    with torch.device("meta"), check:
        yield check.transfers
