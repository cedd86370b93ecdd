"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import pytest
import torch

from tandem.target import Target, load_target

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_target() -> Target:
    """SmolLM2-135M-Instruct in float32 (exactness tests run in fp32, see DESIGN.md)."""
    return load_target("smollm2-135m-instruct", "float32")
