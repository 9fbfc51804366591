"""corpus -> cleaned grouped splits -> SentencePiece models -> tokenized Arrow splits (cached).

`prepare_data(cfg)` is the one call the trainer makes. The first run reads, cleans, splits, trains the
tokenizers and saves the tokenized splits under cache_dir()/datasets/<hash>; later runs with the same corpus
content and the same data/tokenizer settings load that folder (memory-mapped) in about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from omegaconf import OmegaConf

from seq2seq.data.corpus import CleaningReport, find_corpus, load_corpus
from seq2seq.data.tokenizer import Tokenizer, build_tokenizers
from seq2seq.paths import cache_dir

MAX_SENTENCE_TOKENS = 256  # longer token sequences are truncated, so one odd line cannot blow up a batch
DATA_FORMAT = 2  # bump when cleaning, splitting or tokenizing changes, so old caches are not reused
RESULT_KEYS = ("format", "columns", "src_lang", "tgt_lang", "hub_name", "hub_config", "split", "clean")

@dataclass
class PreparedData:
    """Tokenized splits "train"/"valid"/"test" (columns src, tgt, src_ids, tgt_ids, index) and what built them."""

    splits: datasets.DatasetDict
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    report: CleaningReport
    cache_path: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)  # of this build; empty when loaded from cache


def prepare_data(cfg: Any, log: Callable[[str], None] = print) -> PreparedData:
    """Load (or build and cache) the tokenized splits for `cfg.data` and `cfg.tokenizer`; `log` gets the
    cleaning summary and the cache location (pass a no-op on non-zero distributed ranks)."""
    path = cache_dir() / "datasets" / _cache_key(cfg)
    prepared = _load_cached(path)
    if prepared is None:
        prepared = _build(cfg, path)
        log(prepared.report.summary())
        log(f"tokenized splits saved to {path}")
    else:
        log(prepared.report.summary())
        log(f"tokenized splits loaded from {path} (delete it to rebuild)")
    log(f"vocabulary sizes: source {prepared.src_tokenizer.vocab_size}, target {prepared.tgt_tokenizer.vocab_size}")
    return prepared


def _cache_key(cfg: Any) -> str:
    """Hash of the settings that shape the result and of the corpus content (local) or name (hub)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    settings = {
        "format": DATA_FORMAT,
        "max_sentence_tokens": MAX_SENTENCE_TOKENS,
        "data": {key: data.get(key) for key in RESULT_KEYS},
        "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    files = [cfg.data.get("valid_path"), cfg.data.get("test_path")]
    if cfg.data.format != "hub":
        files.insert(0, find_corpus(cfg.data))
    for file in files:
        if file and Path(str(file)).expanduser().is_file():
            with open(Path(str(file)).expanduser(), "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _load_cached(path: Path) -> PreparedData | None:
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        return PreparedData(
            splits=datasets.load_from_disk(str(path / "splits")),
            src_tokenizer=Tokenizer.from_proto((path / "src.model").read_bytes()),
            tgt_tokenizer=Tokenizer.from_proto((path / "tgt.model").read_bytes()),
            report=CleaningReport.from_dict(meta["report"]),
            cache_path=path,
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None  # damaged or from an incompatible version: rebuilt and replaced


def _build(cfg: Any, path: Path) -> PreparedData:
    clock = [time.perf_counter()]
    stage_seconds: dict[str, float] = {}

    def lap(stage: str) -> None:
        now = time.perf_counter()
        stage_seconds[stage] = now - clock[0]
        clock[0] = now

    splits, report = load_corpus(cfg.data)
    lap("read, clean, split")
    src_tokenizer, tgt_tokenizer = build_tokenizers(splits["train"], cfg.tokenizer, cache_dir())
    lap("train SentencePiece")
    truncated = {"count": 0}

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        src_ids = src_tokenizer.encode_batch(batch["src"])
        tgt_ids = tgt_tokenizer.encode_batch(batch["tgt"])
        for ids in src_ids + tgt_ids:
            if len(ids) > MAX_SENTENCE_TOKENS:
                truncated["count"] += 1
                del ids[MAX_SENTENCE_TOKENS:]
        return {"src_ids": src_ids, "tgt_ids": tgt_ids, "index": indices}

    features = datasets.Features(
        {
            "src": datasets.Value("string"),
            "tgt": datasets.Value("string"),
            "src_ids": datasets.List(datasets.Value("int32")),
            "tgt_ids": datasets.List(datasets.Value("int32")),
            "index": datasets.Value("int64"),
        }
    )
    tokenized = datasets.DatasetDict(
        {
            name: split.map(
                encode,
                batched=True,
                batch_size=10_000,
                with_indices=True,
                features=features,
                load_from_cache_file=False,
                new_fingerprint=f"{path.name}-{name}",
                desc=f"tokenizing {name}",
            )
            for name, split in splits.items()
        }
    )
    if truncated["count"]:
        report.notes.append(f"{truncated['count']} token sequences truncated to {MAX_SENTENCE_TOKENS} tokens")
    _save(path, tokenized, src_tokenizer, tgt_tokenizer, report)
    lap("tokenize, save")
    return PreparedData(
        datasets.load_from_disk(str(path / "splits")), src_tokenizer, tgt_tokenizer, report, path, stage_seconds
    )


def _save(
    path: Path, splits: datasets.DatasetDict, src: Tokenizer, tgt: Tokenizer, report: CleaningReport
) -> None:
    """Write into a temporary sibling folder and rename it into place, so a crash never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        splits.save_to_disk(str(tmp / "splits"))
        (tmp / "src.model").write_bytes(src.proto)
        (tmp / "tgt.model").write_bytes(tgt.proto)
        (tmp / "meta.json").write_text(json.dumps({"report": report.to_dict()}, indent=1, ensure_ascii=False))
        try:
            os.replace(tmp, path)
        except OSError:
            if _load_cached(path) is not None:
                return  # another process (e.g. a distributed rank) finished the same cache first
            shutil.rmtree(path)  # a damaged cache that could not be loaded
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
