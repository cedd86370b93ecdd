"""The ``--exact`` mode: the batch-invariant kernels where they run, with one rule for ``auto``.

``auto`` (``None``) turns them on for bf16 and float32 models on CPUs that have them: there they
are also faster than oneDNN (docs/results.md), so nothing is traded. ``True`` insists and says why
not; ``False`` keeps the stock kernels (GPUs and other dtypes always do).
"""

from __future__ import annotations

import logging

from tandem.kernels.cpu import KernelUnavailable, exact_kernels
from tandem.models.decoder import Transformer

log = logging.getLogger(__name__)


def apply_exact(model: Transformer, exact: bool | None = None) -> bool:
    """Switch ``model`` to the exact kernels per ``exact`` (after any tp sharding); returns
    whether it runs on them. :class:`KernelUnavailable` when ``exact=True`` cannot be met."""
    if exact is False:
        return False
    try:
        reason = model.exact_unsupported()
        if reason:
            raise KernelUnavailable(reason)
        model.use_exact_kernels(exact_kernels())
    except KernelUnavailable as exc:
        if exact:
            raise
        log.info("exact kernels off: %s", exc)
        return False
    return True
