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
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import sys
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
from datasets.exceptions import DatasetsError

from seq2seq import __version__
from seq2seq.data.tokenizer import normalize_text
from seq2seq.atomic import atomic_write
from seq2seq.paths import cache_dir, data_dir, data_mirror

DROP_REASONS = ("malformed", "invalid_utf8", "empty", "too_long", "bad_ratio", "duplicate")
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
    split_sizes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, line: int | None = None) -> None:
        self.dropped[reason] += 1
        listed = {"malformed": self.malformed_lines, "invalid_utf8": self.invalid_utf8_lines}.get(reason)
        if listed is not None and line is not None and len(listed) < LINES_LISTED:
            listed.append(line)

    def summary(self) -> str:
        total = sum(self.dropped.values())
        lines = [f"corpus {self.source}: read {self.read:,}, kept {self.kept:,}, dropped {total:,}"]
        for reason in DROP_REASONS:
            detail = ""
            numbers = {"malformed": self.malformed_lines, "invalid_utf8": self.invalid_utf8_lines}.get(reason)
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
    """Cleaned "train", "valid" and "test" splits with columns "src" and "tgt", and the report of what was dropped."""
    if data_cfg.format not in FORMATS:
        raise CorpusError(f"data.format must be one of {', '.join(FORMATS)}; got {data_cfg.format!r}.")
    report = CleaningReport()
    raw = _load_hub(data_cfg, report) if data_cfg.format == "hub" else _load_local(data_cfg, report)
    cleaned = {name: _clean(split, data_cfg, report, name) for name, split in raw.items()}
    report.kept = sum(len(split) for split in cleaned.values())
    splits = _assign_splits(cleaned, data_cfg, report)
    report.split_sizes = {name: len(split) for name, split in splits.items()}
    return datasets.DatasetDict(splits), report


def load_tsv_pairs(path: Path, data_cfg: Any) -> tuple[datasets.Dataset, CleaningReport]:
    """One manythings-layout TSV read and cleaned exactly as for training, but not split (for evaluation sets)."""
    if not path.is_file():
        raise CorpusError(f"{path} does not exist or is not a file.")
    report = CleaningReport(source=str(path))
    dataset = _clean(_read_tsv(path, list(data_cfg.columns or ()), report), data_cfg, report, "eval")
    report.kept = len(dataset)
    return dataset, report


def _load_local(data_cfg: Any, report: CleaningReport) -> datasets.DatasetDict:
    path = find_corpus(data_cfg)
    report.source = str(path)
    if data_cfg.format == "tsv":
        return datasets.DatasetDict({"train": _read_tsv(path, list(data_cfg.columns or ()), report)})
    try:
        loaded = datasets.load_dataset(
            data_cfg.format, data_files={"train": str(path)}, cache_dir=str(cache_dir() / "hf_datasets")
        )
    except (OSError, ValueError, DatasetsError) as error:
        raise CorpusError(f"cannot read {path} as {data_cfg.format}: {error}. Check data.format.") from error
    report.read = sum(len(split) for split in loaded.values())
    return loaded


def _read_tsv(path: Path, columns: list[str], report: CleaningReport) -> datasets.Dataset:
    """Rows of `columns` (plus an ignored attribution column); bad lines are counted, never fatal."""
    if len(columns) < 2 or len(set(columns)) != len(columns):
        raise CorpusError(f"data.columns must name each TSV column by language, e.g. [en, zh]; got {columns}.")
    rows: dict[str, list[str]] = {name: [] for name in columns}
    unquoted = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\r\n")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            report.read += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                report.drop("invalid_utf8", number)
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
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    return datasets.Dataset.from_dict(rows, features=features)


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


def _clean(dataset: datasets.Dataset, data_cfg: Any, report: CleaningReport, split: str) -> datasets.Dataset:
    """Columns -> "src"/"tgt", normalised; drops counted in `report` in this order: empty, too_long, bad_ratio,
    duplicate (exact pair, first occurrence kept)."""
    src_lang, tgt_lang = data_cfg.src_lang, data_cfg.tgt_lang
    names = dataset.column_names
    if "translation" in names:
        def pick(batch: dict[str, list]) -> tuple[list, list]:
            pairs = [pair or {} for pair in batch["translation"]]
            return [pair.get(src_lang) for pair in pairs], [pair.get(tgt_lang) for pair in pairs]
    elif src_lang in names and tgt_lang in names:
        def pick(batch: dict[str, list]) -> tuple[list, list]:
            return batch[src_lang], batch[tgt_lang]
    else:
        raise CorpusError(
            f"{report.source} has columns {names}; expected a 'translation' column or columns named "
            f"{src_lang!r} and {tgt_lang!r} (data.src_lang/tgt_lang; for TSV files, data.columns)."
        )
    return dataset.map(
        _cleaner(pick, data_cfg.clean, report),
        batched=True,
        batch_size=10_000,
        remove_columns=names,
        features=datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")}),
        load_from_cache_file=False,
        new_fingerprint=hashlib.sha256(f"{dataset._fingerprint} {split} {data_cfg}".encode()).hexdigest()[:32],
        desc=f"cleaning {split}",
    )


def _cleaner(pick: Callable, clean_cfg: Any, report: CleaningReport) -> Callable[[dict], dict]:
    """A batched map function that normalises, filters and deduplicates, counting into `report`.

    Duplicates are found by a 64-bit hash of the pair so memory stays small on hub-sized corpora.
    """
    form = clean_cfg.normalization
    max_chars = int(clean_cfg.max_chars)
    max_ratio = float(clean_cfg.max_length_ratio)
    seen: set[int] | None = set() if clean_cfg.deduplicate else None

    def clean(batch: dict[str, list]) -> dict[str, list]:
        kept_src, kept_tgt = [], []
        for src, tgt in zip(*pick(batch)):
            src, tgt = normalize_text(src or "", form), normalize_text(tgt or "", form)
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
            if seen is not None:
                key = hash((src, tgt))
                if key in seen:
                    report.drop("duplicate")
                    continue
                seen.add(key)
            kept_src.append(src)
            kept_tgt.append(tgt)
        return {"src": kept_src, "tgt": kept_tgt}

    return clean


def grouped_split(src: list[str], tgt: list[str], valid_size: int, test_size: int, seed: int) -> dict[str, list[int]]:
    """Row indices of train/valid/test such that pairs sharing a source or a target sentence stay together.

    Pairs are joined (union-find) into connected groups; groups are shuffled by `seed` and each goes to test if
    it still fits in `test_size`, else to valid if it fits in `valid_size`, else to train. Singletons dominate,
    so test and valid end up at (or within a few pairs of) their sizes; large groups land in train.
    """
    parent = list(range(len(src)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for sentences in (src, tgt):
        first: dict[str, int] = {}
        for i, sentence in enumerate(sentences):
            j = first.setdefault(sentence, i)
            if j != i:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(src)):
        groups.setdefault(root(i), []).append(i)
    ordered = list(groups.values())
    random.Random(seed).shuffle(ordered)
    parts: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    for group in ordered:
        if len(parts["test"]) + len(group) <= test_size:
            parts["test"] += group
        elif len(parts["valid"]) + len(group) <= valid_size:
            parts["valid"] += group
        else:
            parts["train"] += group
    return {name: sorted(indices) for name, indices in parts.items()}


def _assign_splits(
    cleaned: dict[str, datasets.Dataset], data_cfg: Any, report: CleaningReport
) -> dict[str, datasets.Dataset]:
    """One split: grouped split by data.split. Several (hub): keep them, mapping validation/dev -> valid."""
    if len(cleaned) == 1:
        return _split_single(next(iter(cleaned.values())), data_cfg.split, report)
    if "train" not in cleaned:
        raise CorpusError(f"{report.source} has splits {sorted(cleaned)} but no 'train' split.")
    valid = next((cleaned[name] for name in ("validation", "valid", "dev") if name in cleaned), None)
    test = cleaned.get("test")
    if valid is None and test is None:
        return _split_single(cleaned["train"], data_cfg.split, report)
    if test is None:
        report.notes.append("the corpus has no test split: the validation split is used as test too")
        test = valid
    if valid is None:
        report.notes.append("the corpus has no validation split: the test split is used for validation too")
        valid = test
    return {"train": cleaned["train"], "valid": valid, "test": test}


def _split_single(dataset: datasets.Dataset, split_cfg: Any, report: CleaningReport) -> dict[str, datasets.Dataset]:
    if split_cfg.valid_size is None or split_cfg.test_size is None:
        raise CorpusError(f"{report.source} has a single split: set data.split.valid_size and data.split.test_size.")
    valid_size, test_size = int(split_cfg.valid_size), int(split_cfg.test_size)
    if valid_size < 1 or test_size < 1 or valid_size + test_size >= len(dataset):
        raise CorpusError(
            f"{report.source} has {len(dataset):,} pairs after cleaning: too few for valid_size={valid_size} and "
            f"test_size={test_size} plus a training split. Lower data.split.valid_size/test_size."
        )
    columns = dataset.with_format("arrow")[:]
    indices = grouped_split(
        columns.column("src").to_pylist(), columns.column("tgt").to_pylist(), valid_size, test_size, int(split_cfg.seed)
    )
    report.notes.append(
        f"split by connected groups of shared sentences, seed {split_cfg.seed}: no source or target sentence "
        "is in two splits"
    )
    return {name: dataset.select(rows).flatten_indices() for name, rows in indices.items()}
