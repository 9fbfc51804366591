"""Parallel corpora: find (or download) them, load them through Hugging Face `datasets`, clean them with every
dropped pair counted, and split them so that no sentence is shared between train, valid and test.

Every source becomes a `datasets.Dataset` whose columns are named by language (or hold a `translation` dict
keyed by language), then takes the same path: pick src/tgt, clean, split.
  - tsv: the manythings.org/Tatoeba layout `<lang>\\t<lang>[\\t<attribution>]`, no header, columns named by
    data.columns. Read line by line here rather than by a csv parser: published copies hold lines without a
    tab and bytes that are not UTF-8, and each such line is counted (with its number) instead of aborting the
    load or being merged into its neighbour. A field entirely wrapped in CSV quotes, with inner quotes
    doubled, as some copies have, is unquoted (see `_unquote`).
  - json / csv / parquet: local files, `load_dataset(format, data_files=...)`.
  - hub: `load_dataset(hub_name, hub_config)`; its own splits are kept.

Cleaning is for training data only. A corpus's own validation and test splits (hub splits, or local files given
as data.valid_path / data.test_path) are kept whole: every line, in order, with its text unchanged, so scores are
comparable with published ones. A split the corpus lacks is carved from training by the grouped split (sizes from
data.split), never borrowed from the other evaluation split.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import sys
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import numpy as np
import xxhash
from datasets.exceptions import DatasetsError

from seq2seq import __version__
from seq2seq.data.tokenizer import normalize_text
from seq2seq.atomic import atomic_write
from seq2seq.paths import cache_dir, data_dir, data_mirror

DROP_REASONS = ("malformed", "invalid_utf8", "nul_byte", "empty", "too_long", "bad_ratio", "duplicate")
FORMATS = ("tsv", "json", "csv", "parquet", "hub")
LINES_LISTED = 20  # line numbers kept per kind of bad line; the counts are always complete
DOWNLOAD_TIMEOUT_S = 30
HUB_PROBE_TIMEOUT_S = 5

# Scripts written without spaces between words: each character counts as one length unit, like a word.
_UNSPACED = re.compile(
    "[\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u31a0-\u31bf\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0003134f]"
)
_WORD = re.compile(r"[^\W_]+")


class CorpusError(Exception):
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
    split_sizes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def _listed(self, reason: str) -> list[int] | None:
        return {
            "malformed": self.malformed_lines, "invalid_utf8": self.invalid_utf8_lines, "nul_byte": self.nul_byte_lines
        }.get(reason)

    def drop(self, reason: str, line: int | None = None) -> None:
        self.dropped[reason] += 1
        listed = self._listed(reason)
        if listed is not None and line is not None and len(listed) < LINES_LISTED:
            listed.append(line)

    def summary(self) -> str:
        total = sum(self.dropped.values())
        lines = [f"corpus {self.source}: read {self.read:,}, kept {self.kept:,}, dropped {total:,}"]
        for reason in DROP_REASONS:
            detail = ""
            numbers = self._listed(reason)
            if numbers:
                more = ", ..." if self.dropped[reason] > len(numbers) else ""
                detail = f" (line {', '.join(map(str, numbers))}{more})"
            lines.append(f"  {reason:<13}{self.dropped[reason]:>9,}{detail}")
        if self.split_sizes:
            lines.append("  splits: " + ", ".join(f"{name} {size:,}" for name, size in self.split_sizes.items()))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CleaningReport:
        return cls(**values)


def length_units(text: str) -> int:
    """Length for the ratio filter: words, with each Chinese/Japanese character counting as a word.

    Raw character counts would make every Chinese-English pair look lopsided (an English sentence has about
    3x the characters of its Chinese translation), while one Han character carries roughly one English word's
    worth of meaning (typical unit ratios are 0.5-2). Punctuation does not count.
    """
    unspaced = len(_UNSPACED.findall(text))
    return unspaced + len(_WORD.findall(_UNSPACED.sub(" ", text) if unspaced else text))


def find_corpus(data_cfg: Any) -> Path:
    """The local corpus file: data.path, else $SEQ2SEQ_DATA_MIRROR/<mirror_path>, else data/<mirror_path>, else
    a download of data.download_url into data/<mirror_path>. Raises one CorpusError listing every place tried."""
    if data_cfg.path:
        path = Path(str(data_cfg.path)).expanduser()
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
            _download(str(data_cfg.download_url), data_cfg.download_member, local)
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


def load_corpus(data_cfg: Any) -> tuple[datasets.DatasetDict, CleaningReport]:
    """"train", "valid" and "test" splits with columns "src" and "tgt", and the report of what was dropped.

    Only training data is cleaned; the corpus's own valid/test splits come back whole (see the module docstring).
    """
    if data_cfg.format not in FORMATS:
        raise CorpusError(f"data.format must be one of {', '.join(FORMATS)}; got {data_cfg.format!r}.")
    report = CleaningReport()
    raw = _load_hub(data_cfg, report) if data_cfg.format == "hub" else _load_local(data_cfg, report)
    if "train" not in raw:
        raise CorpusError(f"{report.source} has splits {sorted(raw)} but no 'train' split.")
    given = {name: _pick(raw[alias], data_cfg, report) for name, alias in _evaluation_splits(raw).items()}
    given.update(_given_files(data_cfg, report))
    train = _clean(_pick(raw["train"], data_cfg, report), data_cfg, report)
    report.kept = len(train) + sum(len(split) for split in given.values())
    if not report.kept:
        raise CorpusError(
            f"no pair could be read from {report.source}:\n{report.summary()}\n"
            "Check data.format, data.columns and data.src_lang/tgt_lang against the file."
        )
    splits = _assign_splits(train, given, data_cfg, report)
    report.split_sizes = {name: len(splits[name]) for name in ("train", "valid", "test")}
    return datasets.DatasetDict(splits), report


def load_tsv_pairs(path: Path, data_cfg: Any) -> tuple[datasets.Dataset, CleaningReport]:
    """One manythings-layout TSV read whole for evaluation: every line kept, in order, texts as given."""
    if not path.is_file():
        raise CorpusError(f"{path} does not exist or is not a file.")
    report = CleaningReport(source=str(path))
    dataset = _pick(_read_whole_tsv(path, list(data_cfg.columns or ()), report), data_cfg, report)
    report.read = report.kept = len(dataset)
    return dataset, report


def _evaluation_splits(raw: datasets.DatasetDict) -> dict[str, str]:
    """Our split name -> the corpus's own split name, for the evaluation splits it has."""
    found = {}
    valid = next((name for name in ("validation", "valid", "dev") if name in raw), None)
    if valid is not None:
        found["valid"] = valid
    if "test" in raw:
        found["test"] = "test"
    return found


def _given_files(data_cfg: Any, report: CleaningReport) -> dict[str, datasets.Dataset]:
    """data.valid_path / data.test_path read whole, in data.format (by file suffix for a hub corpus)."""
    given = {}
    for name in ("valid", "test"):
        value = data_cfg.get(f"{name}_path")
        if not value:
            continue
        path = Path(str(value)).expanduser()
        if not path.is_file():
            raise CorpusError(f"data.{name}_path={path} is not a file. Point it at the {name} file, or unset it.")
        fmt = data_cfg.format if data_cfg.format != "hub" else _SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise CorpusError(
                f"data.{name}_path={path}: cannot tell its format from the suffix; use one of "
                f"{', '.join(sorted(_SUFFIX_FORMATS))}."
            )
        if fmt == "tsv":
            dataset = _read_whole_tsv(path, list(data_cfg.columns or ()), report)
        else:
            dataset = _load_file(path, fmt)
        report.read += len(dataset)
        given[name] = _pick(dataset, data_cfg, report)
        report.notes.append(f"{name} split: {path}, {len(dataset):,} pairs kept whole")
    return given


_SUFFIX_FORMATS = {".tsv": "tsv", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_local(data_cfg: Any, report: CleaningReport) -> datasets.DatasetDict:
    path = find_corpus(data_cfg)
    report.source = str(path)
    if data_cfg.format == "tsv":
        return datasets.DatasetDict({"train": _read_tsv(path, list(data_cfg.columns or ()), report)})
    loaded = _load_file(path, data_cfg.format)
    report.read = len(loaded)
    return datasets.DatasetDict({"train": loaded})


def _load_file(path: Path, fmt: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(
            fmt, data_files={"train": str(path)}, split="train", cache_dir=str(cache_dir() / "hf_datasets")
        )
    except (OSError, ValueError, DatasetsError) as error:
        raise CorpusError(f"cannot read {path} as {fmt}: {error}. Check data.format.") from error


def _check_columns(columns: list[str]) -> None:
    if len(columns) < 2 or len(set(columns)) != len(columns):
        raise CorpusError(f"data.columns must name each TSV column by language, e.g. [en, zh]; got {columns}.")


def _read_tsv(path: Path, columns: list[str], report: CleaningReport) -> datasets.Dataset:
    """Training rows of `columns` (plus an ignored attribution column); bad lines are counted, never fatal."""
    _check_columns(columns)
    rows: dict[str, list[str]] = {name: [] for name in columns}
    unquoted = 0
    for number, raw in _tsv_lines(path):
        report.read += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            report.drop("invalid_utf8", number)
            continue
        if "\x00" in line:
            report.drop("nul_byte", number)
            continue
        fields = line.split("\t")
        if len(fields) not in (len(columns), len(columns) + 1):
            report.drop("malformed", number)
            continue
        for name, value in zip(columns, fields):
            text = _unquote(value)
            if text is not value:
                unquoted += 1
            rows[name].append(text)
    if unquoted:
        report.notes.append(f"{unquoted} CSV-quoted fields unquoted")
    return _string_dataset(rows)


def _read_whole_tsv(path: Path, columns: list[str], report: CleaningReport) -> datasets.Dataset:
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
            rows[name].append(_unquote(value))
    if replaced:
        report.notes.append(f"{path}: {replaced} lines with invalid UTF-8 kept, the bad bytes shown as U+FFFD")
    return _string_dataset(rows)


def _tsv_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the line break and a leading BOM), streamed."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\r\n")
            yield number, raw[3:] if number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw


def _string_dataset(rows: dict[str, list[str]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(rows, features=datasets.Features({name: datasets.Value("string") for name in rows}))


def _unquote(value: str) -> str:
    """Undo CSV quoting when the whole field is one quoted string (inner quotes doubled); else return it as is."""
    if len(value) >= 2 and value[0] == value[-1] == '"' and '"' not in value[1:-1].replace('""', ""):
        return value[1:-1].replace('""', '"')
    return value


def _load_hub(data_cfg: Any, report: CleaningReport) -> datasets.DatasetDict:
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
    report.read = sum(len(split) for split in loaded.values())
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


def _pick(dataset: datasets.Dataset, data_cfg: Any, report: CleaningReport) -> datasets.Dataset:
    """Columns -> "src"/"tgt" strings as given (a missing side becomes ""); nothing is dropped."""
    src_lang, tgt_lang = data_cfg.src_lang, data_cfg.tgt_lang
    names = dataset.column_names
    if "translation" in names:
        def pick(batch: dict[str, list]) -> dict[str, list]:
            pairs = [pair or {} for pair in batch["translation"]]
            return {"src": [pair.get(src_lang) or "" for pair in pairs], "tgt": [pair.get(tgt_lang) or "" for pair in pairs]}
    elif src_lang in names and tgt_lang in names:
        def pick(batch: dict[str, list]) -> dict[str, list]:
            return {"src": [text or "" for text in batch[src_lang]], "tgt": [text or "" for text in batch[tgt_lang]]}
    else:
        raise CorpusError(
            f"{report.source} has columns {names}; expected a 'translation' column or columns named "
            f"{src_lang!r} and {tgt_lang!r} (data.src_lang/tgt_lang; for TSV files, data.columns)."
        )
    return dataset.map(
        pick,
        batched=True,
        batch_size=10_000,
        remove_columns=names,
        features=_PAIR_FEATURES,
        load_from_cache_file=False,
        new_fingerprint=hashlib.sha256(f"{dataset._fingerprint} pick {src_lang} {tgt_lang}".encode()).hexdigest()[:32],
        desc="reading pairs",
    )


_PAIR_FEATURES = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})


def _clean(dataset: datasets.Dataset, data_cfg: Any, report: CleaningReport) -> datasets.Dataset:
    """Training pairs normalised; drops counted in `report` in this order: nul_byte, empty, too_long, bad_ratio,
    then duplicate (exact pair after normalisation, first occurrence kept, found on 64-bit hashes in numpy)."""
    cleaned = dataset.map(
        _cleaner(data_cfg.clean, report),
        batched=True,
        batch_size=10_000,
        features=_PAIR_FEATURES,
        load_from_cache_file=False,
        new_fingerprint=hashlib.sha256(f"{dataset._fingerprint} clean {data_cfg}".encode()).hexdigest()[:32],
        desc="cleaning train",
    )
    if not data_cfg.clean.deduplicate or not len(cleaned):
        return cleaned
    src_hash, tgt_hash = hash_column(cleaned, "src"), hash_column(cleaned, "tgt")
    pair_hash = src_hash ^ (tgt_hash * np.uint64(0x9E3779B97F4A7C15))
    _, first = np.unique(pair_hash, return_index=True)
    duplicates = len(cleaned) - len(first)
    if not duplicates:
        return cleaned
    report.dropped["duplicate"] += duplicates
    return cleaned.select(np.sort(first)).flatten_indices()


def _cleaner(clean_cfg: Any, report: CleaningReport) -> Callable[[dict], dict]:
    """A batched map function that normalises and filters, counting into `report`."""
    form = clean_cfg.normalization
    max_chars = int(clean_cfg.max_chars)
    max_ratio = float(clean_cfg.max_length_ratio)

    def clean(batch: dict[str, list]) -> dict[str, list]:
        kept_src, kept_tgt = [], []
        for src, tgt in zip(batch["src"], batch["tgt"]):
            if "\x00" in src or "\x00" in tgt:
                report.drop("nul_byte")
                continue
            src, tgt = normalize_text(src, form), normalize_text(tgt, form)
            if not src or not tgt:
                report.drop("empty")
                continue
            if len(src) > max_chars or len(tgt) > max_chars:
                report.drop("too_long")
                continue
            src_units, tgt_units = length_units(src), length_units(tgt)
            if max(src_units, tgt_units) > max_ratio * max(min(src_units, tgt_units), 1):
                report.drop("bad_ratio")
                continue
            kept_src.append(src)
            kept_tgt.append(tgt)
        return {"src": kept_src, "tgt": kept_tgt}

    return clean


def hash_texts(texts: Iterable[str]) -> np.ndarray:
    """64-bit xxh3 hashes of UTF-8 texts: stable across processes and runs (unlike `hash`)."""
    return np.fromiter((xxhash.xxh3_64_intdigest(text.encode("utf-8")) for text in texts), dtype=np.uint64)


def hash_column(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """`hash_texts` of a string column, read a slice at a time so no whole column becomes Python strings."""
    table = dataset.with_format("arrow")
    parts = [hash_texts(table[start : start + 100_000].column(column).to_pylist()) for start in range(0, len(dataset), 100_000)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def connected_groups(src_hash: np.ndarray, tgt_hash: np.ndarray) -> np.ndarray:
    """A group label per pair: pairs sharing a source or a target hash (directly or through others) share it.

    Label propagation with pointer jumping over the bipartite graph source-sentence -- target-sentence, all in
    numpy: each round gives both ends of every pair the smaller label and then short-cuts label chains, so the
    rounds grow with the logarithm of a group's diameter, not with the corpus.
    """
    if not len(src_hash):
        return np.zeros(0, dtype=np.int64)
    _, src_node = np.unique(src_hash, return_inverse=True)
    _, tgt_node = np.unique(tgt_hash, return_inverse=True)
    src_node, tgt_node = src_node.ravel(), tgt_node.ravel() + (src_node.max() + 1)
    labels = np.arange(tgt_node.max() + 1)
    while True:
        lower = np.minimum(labels[src_node], labels[tgt_node])
        updated = labels.copy()
        np.minimum.at(updated, src_node, lower)
        np.minimum.at(updated, tgt_node, lower)
        while not np.array_equal(jumped := updated[updated], updated):
            updated = jumped
        if np.array_equal(updated, labels):
            return labels[src_node]
        labels = updated


def grouped_split(
    src: Sequence[str] | np.ndarray, tgt: Sequence[str] | np.ndarray, valid_size: int, test_size: int, seed: int
) -> dict[str, np.ndarray]:
    """Sorted row indices of train/valid/test such that pairs sharing a source or a target sentence stay together.

    `src`/`tgt` are the sentences or their `hash_texts`. Pairs are joined into connected groups; groups are
    shuffled by `seed` and each goes to test if it still fits in `test_size`, else to valid if it fits in
    `valid_size`, else to train. Singletons dominate, so test and valid end up at (or within a few pairs of)
    their sizes; large groups land in train.
    """
    src_hash = src if isinstance(src, np.ndarray) else hash_texts(src)
    tgt_hash = tgt if isinstance(tgt, np.ndarray) else hash_texts(tgt)
    _, group, sizes = np.unique(connected_groups(src_hash, tgt_hash), return_inverse=True, return_counts=True)
    target = np.zeros(len(sizes), dtype=np.int8)  # 0 train, 1 valid, 2 test
    left = {1: valid_size, 2: test_size}
    order = np.random.default_rng(seed).permutation(len(sizes))
    for start in range(0, len(order), 65_536):
        if not left[1] and not left[2]:
            break
        for g in order[start : start + 65_536].tolist():
            size = int(sizes[g])
            part = 2 if size <= left[2] else 1 if size <= left[1] else 0
            if part:
                target[g] = part
                left[part] -= size
    codes = target[group.ravel()]
    return {name: np.flatnonzero(codes == code) for code, name in enumerate(("train", "valid", "test"))}


def _assign_splits(
    train: datasets.Dataset, given: dict[str, datasets.Dataset], data_cfg: Any, report: CleaningReport
) -> dict[str, datasets.Dataset]:
    """The given valid/test splits as they are; a missing one is carved from training by the grouped split."""
    missing = [name for name in ("valid", "test") if name not in given]
    if not missing:
        return {"train": train, **given}
    sizes = {name: data_cfg.split.get(f"{name}_size") for name in missing}
    for name, size in sizes.items():
        if size is None or int(size) < 1:
            raise CorpusError(
                f"{report.source} has no {name} split: set data.split.{name}_size to carve one from training "
                f"(grouped split), or give data.{name}_path=FILE."
            )
    wanted = sum(int(size) for size in sizes.values())
    if wanted >= len(train):
        raise CorpusError(
            f"{report.source} has {len(train):,} training pairs after cleaning: too few to carve "
            + " and ".join(f"{name}_size={size}" for name, size in sizes.items())
            + " plus a training split. Lower data.split."
            + "/".join(f"{name}_size" for name in sizes) + "."
        )
    parts = grouped_split(
        hash_column(train, "src"), hash_column(train, "tgt"),
        int(sizes.get("valid") or 0), int(sizes.get("test") or 0), int(data_cfg.split.seed),
    )
    report.notes.append(
        f"{' and '.join(missing)} carved from training by connected groups of shared sentences, seed "
        f"{data_cfg.split.seed}: no source or target sentence is in two of these splits"
    )
    carved = {name: train.select(rows).flatten_indices() for name, rows in parts.items()}
    return {"train": carved["train"], "valid": given.get("valid", carved["valid"]), "test": given.get("test", carved["test"])}
