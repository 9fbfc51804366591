"""Work split into chunks and run on every core, and the Arrow shard files the chunks write.

Preparing a corpus of millions of pairs is a sequence of chunked passes (clean, tokenize). Each chunk is handled by a
worker process that reads it, works on it and writes its result as one Arrow shard file, so only one chunk per
worker is ever held as Python objects, and the parent keeps only small numpy arrays. Workers are forked: they see
what the parent had loaded (memory-mapped tables, tokenizers) without it being copied or pickled.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
from datasets.utils import tqdm

Task = TypeVar("Task")
Result = TypeVar("Result")

PAIR_SCHEMA = pa.schema([("src", pa.string()), ("tgt", pa.string())])

_work: Callable[[Any], Any] | None = None  # the function forked workers run; set just before the pool starts


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which container CPU limits and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_num_proc(num_proc: int | None) -> int:
    """data.num_proc: null means every available core; fork-less platforms run in one process."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return num_proc if num_proc is not None else available_cores()


def run_chunks(
    work: Callable[[Task], Result],
    tasks: Sequence[Task],
    num_proc: int,
    desc: str,
    sizes: Sequence[int],
    unit: str = "pairs",
) -> Iterator[Result]:
    """`work(task)` for every task, yielded in task order, on up to `num_proc` forked processes, with a progress
    bar advancing by `sizes[i]` as task i finishes. With one process (or one task) everything runs here."""
    global _work
    bar = tqdm(total=sum(sizes), desc=desc, unit=unit, unit_scale=True)
    try:
        processes = min(num_proc, len(tasks))
        if processes <= 1:
            for task, size in zip(tasks, sizes):
                yield work(task)
                bar.update(size)
            return
        _work = work
        try:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                for result, size in zip(pool.imap(_run, tasks), sizes):
                    bar.update(size)
                    yield result
        finally:
            _work = None
    finally:
        bar.close()


def _run(task: Any) -> Any:
    assert _work is not None
    return _work(task)


def write_shard(path: Path, table: pa.Table) -> None:
    """One Arrow IPC stream file, the layout `datasets.Dataset.from_file` memory-maps."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


class Pairs:
    """Pairs with "src" and "tgt" text columns, kept in Arrow shards (files, or tables in memory), optionally only
    the rows numbered in `rows` (ascending): a split of a corpus that costs 8 bytes per row, not a copy of its text.

    A shard file is memory-mapped only while rows are read from it, so reading a whole corpus chunk by chunk never
    leaves it all mapped (mapped pages that were read count as resident memory for as long as they stay mapped).
    """

    def __init__(self, shards: Sequence[Path | pa.Table], sizes: Sequence[int], rows: np.ndarray | None = None) -> None:
        self.shards = list(shards)
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.rows = rows

    @classmethod
    def from_table(cls, table: pa.Table) -> Pairs:
        return cls([table], [len(table)])

    def __len__(self) -> int:
        return int(self.starts[-1]) if self.rows is None else len(self.rows)

    def select(self, rows: np.ndarray) -> Pairs:
        """The pairs at positions `rows` (ascending) of this one."""
        selected = copy.copy(self)
        selected.rows = rows if self.rows is None else self.rows[rows]
        return selected

    def slice(self, start: int, stop: int) -> pa.Table:
        """Pairs start..stop-1 as an Arrow table, read from the shards that hold them."""
        rows = np.arange(start, stop, dtype=np.int64) if self.rows is None else self.rows[start:stop]
        if not len(rows):
            return PAIR_SCHEMA.empty_table()
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        firsts = np.flatnonzero(np.diff(shard_of, prepend=-1))  # where each shard's run of rows begins
        pieces = []
        for shard, shard_rows in zip(shard_of[firsts].tolist(), np.split(rows, firsts[1:])):
            pieces.append(_open(self.shards[shard]).take(pa.array(shard_rows - self.starts[shard])))
        return pa.concat_tables(pieces)

    def texts(self, column: str, block: int = 50_000) -> list[str]:
        """A whole column as Python strings (evaluation splits, a tokenizer sample), read a block at a time."""
        texts: list[str] = []
        for start in range(0, len(self), block):
            texts += self.slice(start, min(start + block, len(self))).column(column).to_pylist()
        return texts


def _open(shard: Path | pa.Table) -> pa.Table:
    if isinstance(shard, pa.Table):
        return shard
    return pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
