"""Training pairs cleaned chunk by chunk on every core into Arrow shards, each pair hashed for the split.

A chunk is a byte range of a TSV file (cut at line starts) or a row range of an Arrow table (json, csv, parquet or
hub data loaded by `datasets`). A worker reads its chunk, applies the rules of `PairCleaner`, writes the kept pairs
to a shard and returns what it dropped (by reason, with line numbers for unreadable lines) and 64-bit hashes of the
kept sentences. The parent only adds up counts and concatenates hashes: 16 bytes per pair.

Cleaning is for training data only; evaluation splits are kept whole (see corpus.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from seq2seq.data.shards import Pairs, run_chunks, write_shard
from seq2seq.data.split import hash_texts
from seq2seq.config import CleanConfig
from seq2seq.data.tokenizer import UNSPACED_CHARACTER, normalize_text

# Why a training pair is dropped: the cleaning rules below, then deduplication, a sentence shared with a given
# evaluation split (corpus.py) and a side over the token cap (prepare.py).
DROP_REASONS = (
    "malformed", "invalid_utf8", "nul_byte", "empty", "too_long", "bad_ratio", "duplicate", "in_eval_split",
    "over_token_cap",
)
LISTED_REASONS = ("malformed", "invalid_utf8", "nul_byte", "too_long")  # reported by line number
LINES_LISTED = 20  # line numbers kept per kind of bad line; the counts are always complete
CHUNK_BYTES = 8 << 20  # of a TSV file per task: tens of thousands of lines
CHUNK_ROWS = 50_000  # of an Arrow table per task

_WORD = re.compile(r"[^\W_]+")
_BOM = b"\xef\xbb\xbf"

PickPairs = Callable[[pa.Table], tuple[list[str], list[str]]]


def length_units(text: str) -> int:
    """Length for the ratio filter: words, with each Chinese/Japanese character counting as a word.

    Raw character counts would make every Chinese-English pair look lopsided (an English sentence has about
    3x the characters of its Chinese translation), while one Han character carries roughly one English word's
    worth of meaning (typical unit ratios are 0.5-2). Punctuation does not count.
    """
    unspaced = len(UNSPACED_CHARACTER.findall(text))
    return unspaced + len(_WORD.findall(UNSPACED_CHARACTER.sub(" ", text) if unspaced else text))


def unquote(value: str) -> str:
    """Undo CSV quoting when the whole field is one quoted string (inner quotes doubled); else return it as is."""
    if len(value) >= 2 and value[0] == value[-1] == '"' and '"' not in value[1:-1].replace('""', ""):
        return value[1:-1].replace('""', '"')
    return value


def side_normalizations(clean_cfg: CleanConfig) -> tuple[str | None, str | None]:
    """(source, target) Unicode normalisation of data.clean; the tokenizers apply the same forms. A checkpoint
    written before the per-side keys had one form for both sides (`saved_config` carries it over)."""
    return clean_cfg.src_normalization, clean_cfg.tgt_normalization


class PairCleaner:
    """The data.clean rules for one pair: normalise each side, then drop for nul_byte, empty, too_long or bad_ratio."""

    def __init__(self, clean_cfg: CleanConfig) -> None:
        self.src_form, self.tgt_form = side_normalizations(clean_cfg)
        self.max_chars = clean_cfg.max_chars
        self.max_ratio = clean_cfg.max_length_ratio

    def __call__(self, src: str, tgt: str) -> tuple[str | None, str, str]:
        """(drop reason or None, normalised source, normalised target)."""
        if "\x00" in src or "\x00" in tgt:
            return "nul_byte", src, tgt
        src, tgt = normalize_text(src, self.src_form), normalize_text(tgt, self.tgt_form)
        if not src or not tgt:
            return "empty", src, tgt
        if len(src) > self.max_chars or len(tgt) > self.max_chars:
            return "too_long", src, tgt
        src_units, tgt_units = length_units(src), length_units(tgt)
        if max(src_units, tgt_units) > self.max_ratio * max(min(src_units, tgt_units), 1):
            return "bad_ratio", src, tgt
        return None, src, tgt


@dataclass(frozen=True)
class TsvLayout:
    """Which tab-separated fields hold the source and target; a line may carry one extra (attribution) field."""

    fields: int
    src_at: int
    tgt_at: int


@dataclass
class CleanedPairs:
    """The cleaned (not yet deduplicated) training pairs, in corpus order, and what cleaning dropped."""

    pairs: Pairs
    src_hash: np.ndarray
    tgt_hash: np.ndarray
    read: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    lines: dict[str, list[int]] = field(default_factory=lambda: {reason: [] for reason in LISTED_REASONS})
    unquoted: int = 0


@dataclass
class _Chunk:
    """What one worker did with one chunk; line numbers count from 1 within the chunk."""

    path: Path | None
    read: int
    dropped: dict[str, int]
    lines: dict[str, list[int]]
    unquoted: int
    src_hash: np.ndarray
    tgt_hash: np.ndarray


def clean_tsv(path: Path, layout: TsvLayout, clean_cfg: CleanConfig, folder: Path, num_proc: int) -> CleanedPairs:
    """A manythings-layout TSV file cleaned in byte-range chunks."""
    ranges = list(_line_aligned_ranges(path, CHUNK_BYTES))
    tasks = [(index, start, stop) for index, (start, stop) in enumerate(ranges)]
    work = partial(_clean_tsv_range, path, layout, PairCleaner(clean_cfg), folder)
    sizes = [stop - start for _, start, stop in tasks]
    return _gather(run_chunks(work, tasks, num_proc, "cleaning train", sizes, unit="B"))


def clean_table(table: pa.Table, pick: PickPairs, clean_cfg: CleanConfig, folder: Path, num_proc: int) -> CleanedPairs:
    """An Arrow table (memory-mapped by `datasets`) cleaned in row-range chunks; `pick` gives its src/tgt texts."""
    starts = range(0, len(table), CHUNK_ROWS)
    tasks = [(index, start, min(start + CHUNK_ROWS, len(table))) for index, start in enumerate(starts)]
    work = partial(_clean_rows, table, pick, PairCleaner(clean_cfg), folder)
    return _gather(run_chunks(work, tasks, num_proc, "cleaning train", [stop - start for _, start, stop in tasks]))


def _gather(chunks: Iterator[_Chunk]) -> CleanedPairs:
    """Merge the chunks' results in corpus order, turning chunk line numbers into file line numbers."""
    shards, src_hashes, tgt_hashes = [], [], []
    total = CleanedPairs(Pairs([], []), np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    for chunk in chunks:
        for reason, count in chunk.dropped.items():
            total.dropped[reason] += count
        for reason, numbers in chunk.lines.items():
            listed = total.lines[reason]
            listed.extend(total.read + number for number in numbers[: LINES_LISTED - len(listed)])
        total.read += chunk.read
        total.unquoted += chunk.unquoted
        if chunk.path is not None:
            shards.append(chunk.path)
            src_hashes.append(chunk.src_hash)
            tgt_hashes.append(chunk.tgt_hash)
    total.pairs = Pairs(shards, [len(hashes) for hashes in src_hashes])
    if shards:
        total.src_hash, total.tgt_hash = np.concatenate(src_hashes), np.concatenate(tgt_hashes)
    return total


def _line_aligned_ranges(path: Path, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of about `chunk_bytes` that start at a line start and end after a line break (or at the end)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = 0
        while start < size:
            handle.seek(min(start + chunk_bytes, size))
            handle.readline()
            stop = min(handle.tell(), size)
            yield start, stop
            start = stop


class _ChunkWriter:
    """Collects one chunk's kept pairs and drop counts, then writes its shard."""

    def __init__(self, cleaner: PairCleaner) -> None:
        self.cleaner = cleaner
        self.src: list[str] = []
        self.tgt: list[str] = []
        self.read = 0
        self.unquoted = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.lines: dict[str, list[int]] = {reason: [] for reason in LISTED_REASONS}

    def drop(self, reason: str, line: int | None = None) -> None:
        self.dropped[reason] += 1
        listed = self.lines.get(reason)
        if listed is not None and line is not None and len(listed) < LINES_LISTED:
            listed.append(line)

    def add(self, src: str, tgt: str, line: int) -> None:
        reason, src, tgt = self.cleaner(src, tgt)
        if reason is None:
            self.src.append(src)
            self.tgt.append(tgt)
        else:
            self.drop(reason, line)

    def finish(self, folder: Path, index: int) -> _Chunk:
        path = None
        if self.src:
            path = folder / f"clean-{index:06d}.arrow"
            texts = {"src": pa.array(self.src, pa.string()), "tgt": pa.array(self.tgt, pa.string())}
            write_shard(path, pa.table(texts))
        hashes = hash_texts(self.src), hash_texts(self.tgt)
        return _Chunk(path, self.read, self.dropped, self.lines, self.unquoted, *hashes)


def _clean_tsv_range(
    path: Path, layout: TsvLayout, cleaner: PairCleaner, folder: Path, task: tuple[int, int, int]
) -> _Chunk:
    """Worker: one byte range of a TSV file. Unreadable lines are counted with their number, never fatal."""
    index, start, stop = task
    with open(path, "rb") as handle:
        handle.seek(start)
        lines = handle.read(stop - start).split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the range ends with a line break
    if start == 0 and lines and lines[0].startswith(_BOM):
        lines[0] = lines[0][len(_BOM) :]
    chunk = _ChunkWriter(cleaner)
    chunk.read = len(lines)
    allowed = (layout.fields, layout.fields + 1)
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError:
            chunk.drop("invalid_utf8", number)
            continue
        if "\x00" in line:
            chunk.drop("nul_byte", number)
            continue
        fields = line.split("\t")
        if len(fields) not in allowed:
            chunk.drop("malformed", number)
            continue
        src, tgt = unquote(fields[layout.src_at]), unquote(fields[layout.tgt_at])
        chunk.unquoted += (src is not fields[layout.src_at]) + (tgt is not fields[layout.tgt_at])
        chunk.add(src, tgt, number)
    return chunk.finish(folder, index)


def _clean_rows(
    table: pa.Table, pick: PickPairs, cleaner: PairCleaner, folder: Path, task: tuple[int, int, int]
) -> _Chunk:
    """Worker: one row range of an Arrow table."""
    index, start, stop = task
    chunk = _ChunkWriter(cleaner)
    chunk.read = stop - start
    for number, (src, tgt) in enumerate(zip(*pick(table.slice(start, stop - start))), start=1):
        chunk.add(src, tgt, number)
    return chunk.finish(folder, index)
