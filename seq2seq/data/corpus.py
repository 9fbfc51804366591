"""Parallel corpora: find (or download) them, read them, clean the training pairs with every dropped pair counted
(clean.py, on every core), deduplicate them and split them so that no sentence is shared between train, valid
and test (split.py). Memory stays bounded whatever the size: the text lives in memory-mapped Arrow shards and the
splits are row numbers into them (`Pairs`).

Sources:
  - tsv: the manythings.org/Tatoeba layout `<lang>\\t<lang>[\\t<attribution>]`, no header, columns named by
    data.columns. Read in byte ranges rather than by a csv parser: published copies hold lines without a
    tab and bytes that are not UTF-8, and each such line is counted (with its number) instead of aborting the
    load or being merged into its neighbour. A field entirely wrapped in CSV quotes, with inner quotes
    doubled, as some copies have, is unquoted.
  - json / csv / parquet: local files, `load_dataset(format, data_files=...)` (Arrow on disk), with columns named
    by language or a `translation` dict keyed by language.
  - hub: `load_dataset(hub_name, hub_config)`; its own splits are kept.

Cleaning is for training data only. A corpus's own validation and test splits (hub splits, or local files given
as data.valid_path / data.test_path) are kept whole: every line, in order, with its text unchanged, so scores are
comparable with published ones. A split the corpus lacks is carved from training by the grouped split (sizes from
data.split), never borrowed from the other evaluation split.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow as pa
from datasets.exceptions import DatasetsError

from seq2seq import __version__
from seq2seq.atomic import atomic_write
from seq2seq.config import CleanConfig, DataConfig
from seq2seq.data.clean import (
    DROP_REASONS, CleanedPairs, PickPairs, TsvLayout, clean_table, clean_tsv, side_normalizations, unquote,
)
from seq2seq.data.shards import Pairs, resolve_num_proc
from seq2seq.data.split import first_occurrences, grouped_split, hash_texts
from seq2seq.data.tokenizer import normalize_text
from seq2seq.errors import UsageError
from seq2seq.paths import cache_dir, data_dir, data_mirror

DOWNLOAD_TIMEOUT_S = 30
HUB_PROBE_TIMEOUT_S = 5

class CorpusError(UsageError):
    """A corpus that cannot be found, read or split; the message says where we looked and what to do."""


@dataclass
class CleaningReport:
    """What loading did to the corpus. `read == kept + sum(dropped.values())` always holds."""

    source: str = ""
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    malformed_lines: list[int] = field(default_factory=list)
    invalid_utf8_lines: list[int] = field(default_factory=list)
    nul_byte_lines: list[int] = field(default_factory=list)
    too_long_lines: list[int] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def _listed(self, reason: str) -> list[int] | None:
        return {
            "malformed": self.malformed_lines, "invalid_utf8": self.invalid_utf8_lines, "nul_byte": self.nul_byte_lines,
            "too_long": self.too_long_lines,
        }.get(reason)

    def add_cleaning(self, cleaned: CleanedPairs) -> None:
        """Counts and listed line numbers of the training-data cleaning."""
        self.read += cleaned.read
        for reason, count in cleaned.dropped.items():
            self.dropped[reason] += count
        for reason, numbers in cleaned.lines.items():
            self._listed(reason).extend(numbers)
        if cleaned.unquoted:
            self.notes.append(f"{cleaned.unquoted} CSV-quoted fields unquoted")

    def summary(self) -> str:
        total = sum(self.dropped.values())
        lines = [f"corpus {self.source}: read {self.read:,}, kept {self.kept:,}, dropped {total:,}"]
        for reason in DROP_REASONS:
            detail = ""
            numbers = self._listed(reason)
            if numbers:
                more = ", ..." if self.dropped[reason] > len(numbers) else ""
                detail = f" (line {', '.join(map(str, numbers))}{more})"
            lines.append(f"  {reason:<15}{self.dropped[reason]:>9,}{detail}")
        if self.split_sizes:
            lines.append("  splits: " + ", ".join(f"{name} {size:,}" for name, size in self.split_sizes.items()))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CleaningReport:
        return cls(**values)


def find_corpus(data_cfg: DataConfig) -> Path:
    """The local corpus file: data.path, else $SEQ2SEQ_DATA_MIRROR/<mirror_path>, else data/<mirror_path>, else
    a download of data.download_url into data/<mirror_path>. Raises one CorpusError listing every place tried."""
    if data_cfg.path:
        path = Path(data_cfg.path).expanduser()
        if path.is_file():
            return path
        raise CorpusError(f"data.path={path} is not a file. Point data.path at the corpus file, or unset it.")
    if not data_cfg.mirror_path:
        raise CorpusError(f"data config {data_cfg.name!r} has neither data.path nor data.mirror_path; set data.path.")
    looked = []
    mirror = data_mirror()
    if mirror is None:
        looked.append(f"$SEQ2SEQ_DATA_MIRROR/{data_cfg.mirror_path} (SEQ2SEQ_DATA_MIRROR is not set)")
    else:
        candidate = mirror / data_cfg.mirror_path
        if candidate.is_file():
            return candidate
        looked.append(f"{candidate} (from SEQ2SEQ_DATA_MIRROR): not there")
    local = data_dir() / data_cfg.mirror_path
    if local.is_file():
        return local
    looked.append(f"{local}: not there")
    if data_cfg.download_url:
        try:
            _download(data_cfg.download_url, data_cfg.download_member, local)
            return local
        except (OSError, zipfile.BadZipFile, KeyError) as error:
            looked.append(f"download of {data_cfg.download_url} failed: {error}")
    raise CorpusError(
        f"cannot find the {data_cfg.name} corpus. Looked at:\n  - "
        + "\n  - ".join(looked)
        + f"\nSet SEQ2SEQ_DATA_MIRROR to a folder holding {data_cfg.mirror_path}, or set data.path=/path/to/file"
        + (f", or place the file at {local}." if not data_cfg.download_url else f", or download it to {local}.")
    )


def _download(url: str, member: str | None, target: Path) -> None:
    """Fetch `url` (a zip when `member` is given), write the file (or the member) to `target` atomically."""
    print(f"downloading {url} ...", file=sys.stderr, flush=True)
    request = urllib.request.Request(url, headers={"User-Agent": f"seq2seq/{__version__}"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        payload = response.read()
    if member:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            payload = archive.read(member)
    with atomic_write(target) as handle:
        handle.write(payload)


def load_corpus(data_cfg: DataConfig, folder: Path) -> tuple[dict[str, Pairs], CleaningReport]:
    """"train", "valid" and "test" pairs, and the report of what was dropped; `folder` receives the cleaned training
    shards the pairs point into (keep it while they are used).

    Only training data is cleaned; the corpus's own valid/test splits come back whole (see the module docstring).
    """
    num_proc = resolve_num_proc(data_cfg.num_proc)
    folder.mkdir(parents=True, exist_ok=True)
    report = CleaningReport()
    if data_cfg.format == "hub":
        raw = _load_hub(data_cfg, report)
        if "train" not in raw:
            raise CorpusError(f"{report.source} has splits {sorted(raw)} but no 'train' split.")
        given = {name: _whole(_arrow(raw[alias]), data_cfg, report) for name, alias in _evaluation_splits(raw).items()}
        given.update(_given_files(data_cfg, report))
        source: Path | pa.Table = _arrow(raw["train"])
    else:
        path = find_corpus(data_cfg)
        report.source = str(path)
        given = _given_files(data_cfg, report)
        source = path if data_cfg.format == "tsv" else _arrow(_load_file(path, data_cfg.format))
    if isinstance(source, Path):
        cleaned = clean_tsv(source, _tsv_layout(data_cfg, report), data_cfg.clean, folder, num_proc)
    else:
        cleaned = clean_table(source, _picker(source.column_names, data_cfg, report), data_cfg.clean, folder, num_proc)
    report.add_cleaning(cleaned)
    train, src_hash, tgt_hash = cleaned.pairs, cleaned.src_hash, cleaned.tgt_hash
    if data_cfg.clean.deduplicate and len(train):
        first = first_occurrences(src_hash, tgt_hash)
        report.dropped["duplicate"] += len(train) - len(first)
        if len(first) < len(train):
            train, src_hash, tgt_hash = train.select(first), src_hash[first], tgt_hash[first]
    if given and len(train):
        keep = np.flatnonzero(~_shares_a_sentence(src_hash, tgt_hash, given, data_cfg.clean))
        report.dropped["in_eval_split"] += len(train) - len(keep)
        if len(keep) < len(train):
            train, src_hash, tgt_hash = train.select(keep), src_hash[keep], tgt_hash[keep]
    report.kept = len(train) + sum(len(split) for split in given.values())
    if not report.kept:
        raise CorpusError(
            f"no pair could be read from {report.source}:\n{report.summary()}\n"
            "Check data.format, data.columns and data.src_lang/tgt_lang against the file."
        )
    splits = _assign_splits(train, (src_hash, tgt_hash), given, data_cfg, report)
    report.split_sizes = {name: len(splits[name]) for name in ("train", "valid", "test")}
    return splits, report


def _shares_a_sentence(
    src_hash: np.ndarray, tgt_hash: np.ndarray, given: dict[str, Pairs], clean_cfg: CleanConfig
) -> np.ndarray:
    """Per training pair, whether its source or target sentence occurs in a given evaluation split (compared as
    cleaning writes them: the side's normalisation, whitespace runs folded). Such pairs leave training, as the
    grouped split guarantees for carved splits, so a given test set is never partly trained on."""
    forms = dict(zip(("src", "tgt"), side_normalizations(clean_cfg)))
    evaluation = {
        side: np.concatenate([hash_texts(normalize_text(text, form) for text in split.texts(side))
                              for split in given.values()])
        for side, form in forms.items()
    }
    return np.isin(src_hash, evaluation["src"]) | np.isin(tgt_hash, evaluation["tgt"])


def load_tsv_pairs(path: Path, data_cfg: DataConfig) -> tuple[Pairs, CleaningReport]:
    """One manythings-layout TSV read whole for evaluation: every line kept, in order, texts as given."""
    if not path.is_file():
        raise CorpusError(f"{path} does not exist or is not a file.")
    report = CleaningReport(source=str(path))
    pairs = _whole(_read_whole_tsv(path, list(data_cfg.columns or ()), report), data_cfg, report)
    report.read = report.kept = len(pairs)
    return pairs, report


def _evaluation_splits(raw: datasets.DatasetDict) -> dict[str, str]:
    """Our split name -> the corpus's own split name, for the evaluation splits it has."""
    found = {}
    valid = next((name for name in ("validation", "valid", "dev") if name in raw), None)
    if valid is not None:
        found["valid"] = valid
    if "test" in raw:
        found["test"] = "test"
    return found


def given_split_file(data_cfg: DataConfig, name: str) -> Path | None:
    """data.<name>_path (name: valid or test) as a file, None when unset. A missing or empty file is a CorpusError
    whatever the cache holds: a run must never score a split other than the one asked for."""
    value = getattr(data_cfg, f"{name}_path")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise CorpusError(f"data.{name}_path={path} is not a file. Point it at the {name} file, or unset it.")
    if path.stat().st_size == 0:
        raise _empty_split(name, path)
    return path


def _empty_split(name: str, path: Path) -> CorpusError:
    return CorpusError(
        f"data.{name}_path={path} holds no pairs. Give a {name} file with pairs, or unset data.{name}_path to "
        f"carve a {name} split from training."
    )


def hub_fingerprint(data_cfg: DataConfig) -> str:
    """The fingerprints `datasets` gives the hub corpus's splits. They follow its revision and files, so a
    cache keyed on them is not reused for another version of the corpus."""
    loaded = _load_hub(data_cfg, CleaningReport())
    return json.dumps({name: split._fingerprint for name, split in sorted(loaded.items())})


def _given_files(data_cfg: DataConfig, report: CleaningReport) -> dict[str, Pairs]:
    """data.valid_path / data.test_path read whole, in data.format (by file suffix for a hub corpus)."""
    given = {}
    for name in ("valid", "test"):
        path = given_split_file(data_cfg, name)
        if path is None:
            continue
        fmt = data_cfg.format if data_cfg.format != "hub" else _SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise CorpusError(
                f"data.{name}_path={path}: cannot tell its format from the suffix; use one of "
                f"{', '.join(sorted(_SUFFIX_FORMATS))}."
            )
        if fmt == "tsv":
            table = _read_whole_tsv(path, list(data_cfg.columns or ()), report)
        else:
            table = _arrow(_load_file(path, fmt))
        if not len(table):
            raise _empty_split(name, path)
        given[name] = _whole(table, data_cfg, report)
        report.notes.append(f"{name} split: {path}, {len(table):,} pairs kept whole")
    return given


_SUFFIX_FORMATS = {".tsv": "tsv", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_file(path: Path, fmt: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(
            fmt, data_files={"train": str(path)}, split="train", cache_dir=str(cache_dir() / "hf_datasets")
        )
    except (OSError, ValueError, DatasetsError) as error:
        raise CorpusError(f"cannot read {path} as {fmt}: {error}. Check data.format.") from error


def _arrow(dataset: datasets.Dataset) -> pa.Table:
    """The dataset's Arrow table (memory-mapped when `datasets` cached it on disk), without copying it."""
    return dataset.with_format("arrow")[:]


def _check_columns(columns: list[str]) -> None:
    if len(columns) < 2 or len(set(columns)) != len(columns):
        raise CorpusError(f"data.columns must name each TSV column by language, e.g. [en, zh]; got {columns}.")


def _tsv_layout(data_cfg: DataConfig, report: CleaningReport) -> TsvLayout:
    columns = list(data_cfg.columns or ())
    _check_columns(columns)
    _picker(columns, data_cfg, report)  # the languages must be among the columns
    return TsvLayout(len(columns), columns.index(data_cfg.src_lang), columns.index(data_cfg.tgt_lang))


def _read_whole_tsv(path: Path, columns: list[str], report: CleaningReport) -> pa.Table:
    """An evaluation TSV, one row per line: an empty line is an empty pair, bytes that are not UTF-8 become
    U+FFFD (counted in a note). A non-empty line with the wrong number of fields cannot be kept whole: error."""
    _check_columns(columns)
    rows: dict[str, list[str]] = {name: [] for name in columns}
    replaced = 0
    for number, raw in _tsv_lines(path):
        line = raw.decode("utf-8", errors="replace")
        replaced += "\ufffd" in line and "\ufffd".encode() not in raw
        fields = line.split("\t") if line else [""] * len(columns)
        if len(fields) not in (len(columns), len(columns) + 1):
            raise CorpusError(
                f"{path} line {number} has {len(fields)} tab-separated fields; an evaluation file is kept "
                f"whole, so every line needs {len(columns)} ({', '.join(columns)}). Fix the file."
            )
        for name, value in zip(columns, fields):
            rows[name].append(unquote(value))
    if replaced:
        report.notes.append(f"{path}: {replaced} lines with invalid UTF-8 kept, the bad bytes shown as U+FFFD")
    return pa.table({name: pa.array(texts, pa.string()) for name, texts in rows.items()})


def _tsv_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the line break and a leading BOM), streamed."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\r\n")
            yield number, raw[3:] if number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw


def _load_hub(data_cfg: DataConfig, report: CleaningReport) -> datasets.DatasetDict:
    """A hub dataset, failing fast and clearly when the hub cannot be reached (instead of minutes of retries)."""
    name, config = data_cfg.hub_name, data_cfg.hub_config
    if not name:
        raise CorpusError("data.format=hub needs data.hub_name (e.g. Helsinki-NLP/opus-100).")
    report.source = f"hub:{name}" + (f" ({config})" if config else "")
    local_hint = (
        "or download it where there is internet and use the copy: data.format=parquet (or json/csv) data.path=FILE"
    )
    offline = datasets.config.HF_HUB_OFFLINE
    if not offline:
        problem = _unreachable(huggingface_hub.constants.ENDPOINT)
        if problem:
            raise CorpusError(
                f"cannot load hub dataset {name}: the hub is unreachable ({problem}). If the dataset is already in "
                f"your Hugging Face cache, run with HF_HUB_OFFLINE=1; otherwise connect to the internet, {local_hint}."
            )
    try:
        loaded = datasets.load_dataset(name, config)
    except (OSError, ValueError, DatasetsError) as error:
        if offline:
            raise CorpusError(
                f"cannot load hub dataset {name} ({config}): HF_HUB_OFFLINE is set and it is not in the local "
                f"Hugging Face cache ({error}). Unset HF_HUB_OFFLINE on a machine with internet, {local_hint}."
            ) from error
        raise CorpusError(
            f"cannot load hub dataset {name} ({config}): {error}. "
            f"Check data.hub_name and data.hub_config, {local_hint}."
        ) from error
    return loaded


def _unreachable(endpoint: str) -> str | None:
    """Why the hub endpoint cannot be reached, or None. Skipped behind a proxy, where only the proxy can tell."""
    if urllib.request.getproxies():
        return None
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        return f"{url.hostname}:{port}: {error}"
    return None


def _picker(names: list[str], data_cfg: DataConfig, report: CleaningReport) -> PickPairs:
    """How to get source and target texts from a table with these columns (a missing side becomes "")."""
    src_lang, tgt_lang = data_cfg.src_lang, data_cfg.tgt_lang
    if "translation" in names:
        return partial(_pick_translation, src_lang, tgt_lang)
    if src_lang in names and tgt_lang in names:
        return partial(_pick_columns, src_lang, tgt_lang)
    raise CorpusError(
        f"{report.source} has columns {names}; expected a 'translation' column or columns named "
        f"{src_lang!r} and {tgt_lang!r} (data.src_lang/tgt_lang; for TSV files, data.columns)."
    )


def _pick_translation(src_lang: str, tgt_lang: str, table: pa.Table) -> tuple[list[str], list[str]]:
    pairs = [pair or {} for pair in table.column("translation").to_pylist()]
    return [pair.get(src_lang) or "" for pair in pairs], [pair.get(tgt_lang) or "" for pair in pairs]


def _pick_columns(src_lang: str, tgt_lang: str, table: pa.Table) -> tuple[list[str], list[str]]:
    return (
        [text or "" for text in table.column(src_lang).to_pylist()],
        [text or "" for text in table.column(tgt_lang).to_pylist()],
    )


def _whole(table: pa.Table, data_cfg: DataConfig, report: CleaningReport) -> Pairs:
    """An evaluation split as given: every row, texts unchanged."""
    src, tgt = _picker(table.column_names, data_cfg, report)(table)
    report.read += len(src)
    return Pairs.from_table(pa.table({"src": pa.array(src, pa.string()), "tgt": pa.array(tgt, pa.string())}))


def _assign_splits(
    train: Pairs,
    hashes: tuple[np.ndarray, np.ndarray],
    given: dict[str, Pairs],
    data_cfg: DataConfig,
    report: CleaningReport,
) -> dict[str, Pairs]:
    """The given valid/test splits as they are; a missing one is carved from training by the grouped split."""
    missing = [name for name in ("valid", "test") if name not in given]
    if not missing:
        return {"train": train, **given}
    sizes = {name: getattr(data_cfg.split, f"{name}_size") for name in missing}
    for name, size in sizes.items():
        if size is None:
            raise CorpusError(
                f"{report.source} has no {name} split: set data.split.{name}_size to carve one from training "
                f"(grouped split), or give data.{name}_path=FILE."
            )
    wanted = sum(sizes.values())
    if wanted >= len(train):
        raise CorpusError(
            f"{report.source} has {len(train):,} training pairs after cleaning: too few to carve "
            + " and ".join(f"{name}_size={size}" for name, size in sizes.items())
            + " plus a training split. Lower data.split."
            + "/".join(f"{name}_size" for name in sizes) + "."
        )
    parts = grouped_split(
        *hashes, sizes.get("valid") or 0, sizes.get("test") or 0, data_cfg.split.seed
    )
    report.notes.append(
        f"{' and '.join(missing)} carved from training by connected groups of shared sentences, seed "
        f"{data_cfg.split.seed}: no source or target sentence is in two of these splits"
    )
    carved = {name: train.select(rows) for name, rows in parts.items()}
    return {"train": carved["train"], "valid": given.get("valid", carved["valid"]), "test": given.get("test", carved["test"])}
