"""Fixtures shared by the test files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TATOEBA_RELATIVE_PATH = Path("tatoeba-cmn-eng/cmn-eng.tsv")


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    """The real Tatoeba corpus in $SEQ2SEQ_DATA_MIRROR; tests that need it are skipped (with the reason) without it."""
    mirror = os.environ.get("SEQ2SEQ_DATA_MIRROR")
    if not mirror:
        pytest.skip(f"SEQ2SEQ_DATA_MIRROR is not set; this test needs $SEQ2SEQ_DATA_MIRROR/{TATOEBA_RELATIVE_PATH}")
    path = Path(mirror) / TATOEBA_RELATIVE_PATH
    if not path.is_file():
        pytest.skip(f"Tatoeba corpus not found at {path} (SEQ2SEQ_DATA_MIRROR={mirror})")
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `cuda` (the GPU suite, `pytest -m cuda`) are skipped where torch sees no GPU."""
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
