"""corpus -> cleaned grouped splits -> SentencePiece models -> tokenized Arrow splits (cached).

`prepare_data(cfg)` is the one call the trainer makes. The first run reads, cleans and splits the corpus (on every
core, into Arrow shards), trains the tokenizers on a seeded sample of the training split, tokenizes every split in
parallel chunks and saves them under cache_dir()/datasets/<hash>; later runs with the same corpus content and the
same data/tokenizer settings memory-map that folder in about a second. Token ids are stored as uint16 (uint32 for a
vocabulary over 65,536), so a training split of millions of pairs costs a few bytes per token on disk and in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import xxhash

from seq2seq.config import DataConfig, RunConfig
from seq2seq.data.clean import side_normalizations
from seq2seq.data.corpus import (
    CleaningReport, CorpusError, find_corpus, given_split_file, hub_fingerprint, load_corpus,
)
from seq2seq.data.shards import Pairs, resolve_num_proc, run_chunks, write_shard
from seq2seq.data.tokenizer import Tokenizer, build_tokenizers
from seq2seq.paths import cache_dir

# Token cap of a side, so one odd line cannot blow up a batch: a training pair over it is dropped (cut, its target
# would end in an EOS the sentence does not have and teach the model to stop mid-sentence); an evaluation pair is
# kept whole for scoring, its ids cut for the validation loss.
MAX_SENTENCE_TOKENS = 256
DATA_FORMAT = 5  # bump when cleaning, splitting or tokenizing changes, so old caches are not reused
RESULT_KEYS = ("format", "columns", "src_lang", "tgt_lang", "hub_name", "hub_config", "split", "clean")
SPLITS = ("train", "valid", "test")
TOKENIZE_ROWS = 20_000  # rows per tokenizing task

@dataclass
class PreparedData:
    """Tokenized splits "train"/"valid"/"test" (columns src, tgt, src_ids, tgt_ids, index) and what built them."""

    splits: datasets.DatasetDict
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    report: CleaningReport
    cache_path: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)  # of this build; empty when loaded from cache


def prepare_data(cfg: RunConfig, log: Callable[[str], None] = print) -> PreparedData:
    """Load (or build and cache) the tokenized splits for `cfg.data` and `cfg.tokenizer`; `log` gets the
    cleaning summary and the cache location (pass a no-op on non-zero distributed ranks)."""
    path = cache_dir() / "datasets" / _cache_key(cfg)
    prepared = _load_cached(path)
    if prepared is None:
        prepared = _build(cfg, path, log)
        log(prepared.report.summary())
        log(f"tokenized splits saved to {path}")
    else:
        log(prepared.report.summary())
        log(f"tokenized splits loaded from {path} (delete it to rebuild)")
    log(f"vocabulary sizes: source {prepared.src_tokenizer.vocab_size}, target {prepared.tgt_tokenizer.vocab_size}")
    log(direction_line(cfg.data, prepared))
    return prepared


def direction_line(data_cfg: DataConfig, prepared: PreparedData) -> str:
    """The translation direction and each side's normalisation, so a run of the other direction says so."""
    forms = [side.normalization or "none, as written" for side in (prepared.src_tokenizer, prepared.tgt_tokenizer)]
    return (
        f"direction: {data_cfg.src_lang} -> {data_cfg.tgt_lang} (source normalisation {forms[0]}, "
        f"target normalisation {forms[1]})"
    )


def _cache_key(cfg: RunConfig) -> str:
    """Hash of everything that shapes the result: the settings, the corpus content (local) or its splits'
    fingerprints (hub), and which valid/test files are given with their content. xxh3 reads gigabytes per second,
    so even a corpus of millions of lines is recognised in a fraction of a second."""
    data = asdict(cfg.data)
    settings = {
        "format": DATA_FORMAT,
        "max_sentence_tokens": MAX_SENTENCE_TOKENS,
        "data": {key: data[key] for key in RESULT_KEYS},
        "tokenizer": asdict(cfg.tokenizer),
    }
    digest = xxhash.xxh3_128(json.dumps(settings, sort_keys=True).encode())
    if cfg.data.format == "hub":
        digest.update(hub_fingerprint(cfg.data).encode())
    files = {
        "train": find_corpus(cfg.data) if cfg.data.format != "hub" else None,
        "valid": given_split_file(cfg.data, "valid"),
        "test": given_split_file(cfg.data, "test"),
    }
    for name, file in files.items():
        digest.update(f"{name} file: {file is not None}\0".encode())
        if file is not None:
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(16 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()[:32]


def _load_cached(path: Path) -> PreparedData | None:
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        shards = {name: sorted((path / "splits" / name).glob("*.arrow")) for name in SPLITS}
        splits = datasets.DatasetDict(
            {
                name: datasets.concatenate_datasets([datasets.Dataset.from_file(str(shard)) for shard in files])
                for name, files in shards.items()
            }
        )
        return PreparedData(
            splits=splits,
            src_tokenizer=Tokenizer.from_proto((path / "src.model").read_bytes(), meta["normalization"]["src"]),
            tgt_tokenizer=Tokenizer.from_proto((path / "tgt.model").read_bytes(), meta["normalization"]["tgt"]),
            report=CleaningReport.from_dict(meta["report"]),
            cache_path=path,
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pa.ArrowException):
        return None  # damaged or from an incompatible version: rebuilt and replaced


def _build(cfg: RunConfig, path: Path, log: Callable[[str], None]) -> PreparedData:
    """Build in a temporary sibling folder and rename it into place, so a crash never leaves half a cache."""
    clock = [time.perf_counter()]
    stage_seconds: dict[str, float] = {}

    def lap(stage: str) -> None:
        now = time.perf_counter()
        stage_seconds[stage] = now - clock[0]
        clock[0] = now

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        splits, report = load_corpus(cfg.data, tmp / "clean")
        lap("read, clean, split")
        log(f"training SentencePiece on {min(len(splits['train']), cfg.tokenizer.max_sentences):,} training pairs")
        src_sample, tgt_sample = _tokenizer_sample(splits["train"], cfg.tokenizer.max_sentences)
        src_tokenizer, tgt_tokenizer = build_tokenizers(
            src_sample, tgt_sample, cfg.tokenizer, cache_dir(), side_normalizations(cfg.data.clean)
        )
        del src_sample, tgt_sample
        lap("train SentencePiece")
        num_proc = resolve_num_proc(cfg.data.num_proc)
        over_cap = _tokenize(splits, src_tokenizer, tgt_tokenizer, tmp / "splits", num_proc)
        _count_over_cap(report, over_cap)
        del splits
        shutil.rmtree(tmp / "clean")
        (tmp / "src.model").write_bytes(src_tokenizer.proto)
        (tmp / "tgt.model").write_bytes(tgt_tokenizer.proto)
        normalization = {"src": src_tokenizer.normalization, "tgt": tgt_tokenizer.normalization}
        meta = {"report": report.to_dict(), "normalization": normalization}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        _move_into_place(tmp, path)
        lap("tokenize, save")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prepared = _load_cached(path)
    if prepared is None:
        raise CorpusError(f"the tokenized splits written to {path} cannot be read back; delete the folder and rerun.")
    prepared.stage_seconds = stage_seconds
    return prepared


def _tokenizer_sample(train: Pairs, max_sentences: int) -> tuple[list[str], list[str]]:
    """All training pairs, or a seeded sample of `max_sentences` in corpus order: SentencePiece training time grows
    with its input, and only the sample ever becomes Python strings."""
    if len(train) > max_sentences:
        train = train.select(np.sort(np.random.default_rng(0).choice(len(train), size=max_sentences, replace=False)))
    return train.texts("src"), train.texts("tgt")


def _count_over_cap(report: CleaningReport, over_cap: dict[str, int]) -> None:
    """Training pairs dropped at the token cap join the report's counts; cut evaluation sequences get a note."""
    dropped = over_cap["train"]
    report.dropped["over_token_cap"] += dropped
    report.kept -= dropped
    report.split_sizes["train"] -= dropped
    cut = {name: over_cap[name] for name in ("valid", "test") if over_cap[name]}
    if cut:
        report.notes.append(
            ", ".join(f"{name} {count:,}" for name, count in cut.items())
            + f" token sequences over {MAX_SENTENCE_TOKENS} tokens cut for the loss; BLEU scores the whole references"
        )


def _tokenize(
    splits: dict[str, Pairs], src: Tokenizer, tgt: Tokenizer, folder: Path, num_proc: int
) -> dict[str, int]:
    """Every split tokenized in row chunks on `num_proc` processes into `folder`/<split>/*.arrow, with columns src,
    tgt, src_ids, tgt_ids and index (the row number in the split before the token cap). Returns, per split, the
    training pairs dropped at the cap, or the evaluation sequences cut to it."""
    tasks = []
    for name in SPLITS:
        (folder / name).mkdir(parents=True)
        size = len(splits[name])
        tasks += [(name, start, min(start + TOKENIZE_ROWS, size)) for start in range(0, size, TOKENIZE_ROWS)]
    work = partial(_tokenize_rows, splits, src, tgt, folder, 1 if num_proc > 1 else -1)
    sizes = [stop - start for _, start, stop in tasks]
    over_cap = dict.fromkeys(SPLITS, 0)
    for name, count in run_chunks(work, tasks, num_proc, "tokenizing", sizes):
        over_cap[name] += count
    return over_cap


def _tokenize_rows(
    splits: dict[str, Pairs], src: Tokenizer, tgt: Tokenizer, folder: Path, threads: int, task: tuple[str, int, int]
) -> tuple[str, int]:
    """Worker: rows start..stop-1 of one split tokenized into one shard -> (split, pairs dropped or sequences cut)."""
    name, start, stop = task
    table = splits[name].slice(start, stop)
    src_ids = src.encode_batch(table.column("src").to_pylist(), threads)
    tgt_ids = tgt.encode_batch(table.column("tgt").to_pylist(), threads)
    index = np.arange(start, stop, dtype=np.int64)
    if name == "train":
        keep = [i for i, (x, y) in enumerate(zip(src_ids, tgt_ids)) if max(len(x), len(y)) <= MAX_SENTENCE_TOKENS]
        over_cap = len(index) - len(keep)
        if over_cap:
            table, index = table.take(keep), index[keep]
            src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
    else:
        over_cap = sum(len(ids) > MAX_SENTENCE_TOKENS for ids in (*src_ids, *tgt_ids))
        src_ids = [ids[:MAX_SENTENCE_TOKENS] for ids in src_ids]
        tgt_ids = [ids[:MAX_SENTENCE_TOKENS] for ids in tgt_ids]
    shard = pa.table(
        {
            "src": table.column("src"),
            "tgt": table.column("tgt"),
            "src_ids": pa.array(src_ids, pa.list_(_id_type(src))),
            "tgt_ids": pa.array(tgt_ids, pa.list_(_id_type(tgt))),
            "index": pa.array(index),
        }
    )
    write_shard(folder / name / f"{start // TOKENIZE_ROWS:06d}.arrow", shard)
    return name, over_cap


def _id_type(tokenizer: Tokenizer) -> pa.DataType:
    return pa.uint16() if tokenizer.vocab_size <= 1 << 16 else pa.uint32()


def _move_into_place(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError:
        if _load_cached(path) is not None:
            return  # another process (e.g. a distributed rank) finished the same cache first
        shutil.rmtree(path)  # a damaged cache that could not be loaded
        os.replace(tmp, path)
