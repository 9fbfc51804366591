"""Where the project keeps downloaded corpora and caches."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


def data_dir() -> Path:
    """`data/` of a source checkout, else a per-user folder (for a non-editable install)."""
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / "data"
    return Path.home() / ".cache" / "seq2seq"


def cache_dir() -> Path:
    """Tokenizer models and tokenized datasets; `SEQ2SEQ_CACHE` moves it."""
    override = os.environ.get("SEQ2SEQ_CACHE")
    return Path(override) if override else data_dir() / "cache"


def data_mirror() -> Path | None:
    """A local folder of corpora named by `SEQ2SEQ_DATA_MIRROR`, if set."""
    mirror = os.environ.get("SEQ2SEQ_DATA_MIRROR")
    return Path(mirror) if mirror else None
