"""Shared test setup: never touch the network, keep CPU threads predictable on the 2-core machines."""

from __future__ import annotations

import os
import sys

import pytest

# Hub look-ups fail at once instead of retrying for ~47 s (DESIGN.md section 7); set before any import
# of huggingface_hub/datasets/transformers reads it.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
