"""The ``--exact`` mode: the batch-invariant kernels where they run, with one rule for ``auto``.

``auto`` (``None``) turns them on for bf16 models on CPUs that have them: there they are also
faster than oneDNN (docs/results.md), so nothing is traded. ``True`` insists and says why not;
``False`` keeps the stock kernels (float32 and GPUs always do).
"""

from __future__ import annotations

import logging

import torch

from tandem.kernels.cpu import KernelUnavailable, exact_kernels
from tandem.models.decoder import Transformer

log = logging.getLogger(__name__)


def apply_exact(model: Transformer, exact: bool | None = None) -> bool:
    """Switch ``model`` to the exact kernels per ``exact`` (after any tp sharding); returns
    whether it runs on them. :class:`KernelUnavailable` when ``exact=True`` cannot be met."""
    if exact is False:
        return False
    if model.dtype != torch.bfloat16 or model.device.type != "cpu":
        if exact:
            raise KernelUnavailable(
                f"--exact needs a bf16 model on the CPU (this one is {str(model.dtype).removeprefix('torch.')} "
                f"on {model.device}); float32 runs the stock kernels, where plain and speculative decoding agree"
            )
        return False
    try:
        model.use_exact_kernels(exact_kernels())
    except (KernelUnavailable, ValueError) as exc:
        if exact:
            raise KernelUnavailable(str(exc)) from None
        log.info("exact kernels off: %s", exc)
        return False
    return True
