"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from tandem.target import Target, load_target

# Two threads on CI's two cores; fewer when the machine is shared (oversubscribed OpenMP threads
# slow torch down by an order of magnitude).
torch.set_num_threads(int(os.environ.get("TANDEM_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run where CUDA is (scripts/gpu-check.sh) and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_target() -> Target:
    """SmolLM2-135M-Instruct in float32 (exactness tests run in fp32, see DESIGN.md)."""
    return load_target("smollm2-135m-instruct", "float32")
