"""Data pipeline: corpus loading and cleaning, grouped splits, SentencePiece tokenizers, batching, caching."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import tatoeba_cfg
from omegaconf import OmegaConf

from seq2seq.config import DataConfig, TokenizerConfig, RunConfig, saved_config
from seq2seq.data import corpus as corpus_module
from seq2seq.data import prepare as prepare_module
from seq2seq.data import split as split_module
from seq2seq.data import tokenizer as tokenizer_module
from seq2seq.data.batching import TokenBatchSampler, collate, make_loader
from seq2seq.data.clean import length_units
from seq2seq.data.corpus import CorpusError, find_corpus, load_corpus
from seq2seq.data.prepare import prepare_data
from seq2seq.data.split import grouped_split
from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, build_tokenizers, normalize_text
from seq2seq.paths import CONFIG_DIR

EN_WORDS = "the a cat dog sees likes big small red house tree runs eats fish book reads we you they quickly".split()
ZH_CHARS = list(
    "我你他她们的是在有个人这中大为上来说国年着就那和要出也得里后自以会家可下而过天去能对小多然于心学么之都好看起发当没成"
    "只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动方期它头经长儿回位分爱老因很给名法间斯知世什两次"
    "使身者被高已亲其进此话常与活正感"
)


def synthetic_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Distinct (English, Chinese) pairs of plausible lengths."""
    rng = random.Random(seed)
    pairs = {}
    while len(pairs) < count:
        n = rng.randint(2, 9)
        en = " ".join(rng.choice(EN_WORDS) for _ in range(n)).capitalize() + "."
        pairs.setdefault(en, "".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(n, 2 * n))) + "。")
    return list(pairs.items())


class Split(dict):
    """A split's texts as lists under "src" and "tgt"; len() is its number of pairs."""

    def __len__(self) -> int:
        return len(self["src"])


def load_texts(data_cfg) -> tuple[dict[str, Split], corpus_module.CleaningReport]:
    """`load_corpus` with every split's texts read into Python lists (the shards live in a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        splits, report = load_corpus(data_cfg, Path(folder))
        return {name: Split(src=pairs.texts("src"), tgt=pairs.texts("tgt")) for name, pairs in splits.items()}, report


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{en}\t{zh}\n" for en, zh in pairs), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- corpus


@pytest.mark.corpus
def test_real_corpus_counts_and_split(corpus_path, monkeypatch):
    monkeypatch.setenv("SEQ2SEQ_DATA_MIRROR", str(corpus_path.parents[1]))
    splits, report = load_texts(tatoeba_cfg().data)

    assert report.source == str(corpus_path)
    assert report.read == 29_980
    assert report.dropped == dict(
        malformed=1, invalid_utf8=0, nul_byte=0, empty=0, too_long=0, bad_ratio=0, duplicate=6, in_eval_split=0,
        over_token_cap=0,
    )
    assert report.kept == 29_973
    assert report.read == report.kept + sum(report.dropped.values())
    assert report.malformed_lines == [13]
    assert "line 13" in report.summary()
    assert report.split_sizes == {"train": 26_973, "valid": 1_500, "test": 1_500}
    assert {name: len(split) for name, split in splits.items()} == report.split_sizes

    targets = {name: set(split["tgt"][:]) for name, split in splits.items()}
    assert 'He said, "I\'m from Canada."' in set.union(*targets.values())  # a CSV-quoted line, unquoted
    for side in ("src", "tgt"):
        sets = {name: set(split[side][:]) for name, split in splits.items()}
        assert not sets["train"] & sets["valid"] and not sets["train"] & sets["test"]
        assert not sets["valid"] & sets["test"]


@pytest.mark.parametrize("chunk_bytes, num_proc", [(8 << 20, 1), (100, 2)], ids=["one-chunk", "many-chunks-2-procs"])
def test_planted_flaws_are_counted_exactly(tmp_path, cache, monkeypatch, chunk_bytes, num_proc):
    """Counts, line numbers and kept pairs do not depend on how the file is cut into chunks or on the processes."""
    monkeypatch.setattr("seq2seq.data.clean.CHUNK_BYTES", chunk_bytes)
    good = synthetic_pairs(40)
    lines = [f"{en}\t{zh}".encode() for en, zh in good]
    planted = [
        b"no tab on this line",  # 41 malformed
        b"one\ttwo\tthree\tfour",  # 42 malformed (4 columns)
        b"",  # 43 malformed (blank)
        b"Bad bytes \xff here\t" + "坏".encode(),  # 44 invalid UTF-8
        b"Caf\xc3\t\xe5\x92\x96\xe5\x95\xa1",  # 45 invalid UTF-8 (truncated sequence)
        "Only English\t   ".encode(),  # 46 empty
        "\t只有中文".encode(),  # 47 empty
        ("word " * 70 + "\t" + "字" * 60).encode(),  # 48 too long (350 characters)
        ("this english sentence has a great many words for one chinese character\t是").encode(),  # 49 bad ratio
        lines[0],  # 50 duplicate
        lines[1],  # 51 duplicate
        ("  " + good[3][0] + "\t" + good[3][1].replace("着", "\ufaaa") + "  ").encode(),  # 52 duplicate after NFKC + strip
        "Attribution kept out\t有署名\tCC-BY 2.0 (France) Attribution: tatoeba.org".encode(),  # 53 kept, 3 columns
        '"Who? ""Tom."""\t谁？汤姆。\r'.encode(),  # 54 kept, CSV-quoted, CRLF
        b"NUL \x00 inside\t\xe7\xa9\xba",  # 55 NUL byte
    ]
    path = tmp_path / "flawed.tsv"
    path.write_bytes(b"\n".join(lines + planted) + b"\n")

    cfg = tatoeba_cfg(path=str(path), num_proc=num_proc, **{"split.valid_size": 5, "split.test_size": 5})
    splits, report = load_texts(cfg.data)

    assert report.read == 55
    assert report.dropped == dict(
        malformed=3, invalid_utf8=2, nul_byte=1, empty=2, too_long=1, bad_ratio=1, duplicate=3, in_eval_split=0,
        over_token_cap=0,
    )
    assert report.too_long_lines == [48] and "too_long               1 (line 48)" in report.summary()
    assert report.malformed_lines == [41, 42, 43]
    assert report.invalid_utf8_lines == [44, 45]
    assert report.nul_byte_lines == [55] and "nul_byte" in report.summary()
    assert report.kept == 42 == report.read - sum(report.dropped.values())
    assert sum(report.split_sizes.values()) == 42 and report.split_sizes["test"] == 5
    kept = {pair for split in splits.values() for pair in zip(split["src"], split["tgt"])}
    assert ("有署名", "Attribution kept out") in kept
    assert ("谁?汤姆。", 'Who? "Tom."') in kept  # NFKC folds full-width punctuation; CSV quoting undone
    assert any("1 CSV-quoted fields unquoted" in note for note in report.notes)


def test_normalization_and_length_units():
    assert normalize_text("  ＡＢＣ１２３\u3000hello\t\tworld ", "NFKC") == "ABC123 hello world"
    assert normalize_text("  你好，世界！\u3000hello\t\tworld ", None) == "你好，世界！ hello world"
    assert length_units("我是一个学生。") == 6
    assert length_units("I am a student.") == 4
    assert length_units("我有2010个tomatoes!") == 3 + 2


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_local_json_csv_parquet_load_through_the_same_path(tmp_path, cache, fmt):
    pairs = synthetic_pairs(30) + [synthetic_pairs(30)[0], ("", "空")]  # one duplicate, one empty side
    if fmt == "json":
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps({"translation": {"en": en, "zh": zh}}) + "\n" for en, zh in pairs))
    else:
        table = datasets.Dataset.from_dict({"en": [en for en, _ in pairs], "zh": [zh for _, zh in pairs]})
        path = tmp_path / f"pairs.{fmt}"
        if fmt == "csv":
            table.to_csv(str(path), index=False)
        else:
            table.to_parquet(str(path))

    cfg = tatoeba_cfg(format=fmt, path=str(path), **{"split.valid_size": 4, "split.test_size": 4})
    splits, report = load_texts(cfg.data)

    assert report.read == 32 and report.kept == 30
    assert report.dropped["duplicate"] == 1 and report.dropped["empty"] == 1
    assert report.split_sizes == {"train": 22, "valid": 4, "test": 4}
    kept = {pair for split in splits.values() for pair in zip(split["src"], split["tgt"])}
    assert kept == {(zh, en) for en, zh in synthetic_pairs(30)}


def test_missing_corpus_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQ2SEQ_DATA_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setattr(corpus_module, "data_dir", lambda: tmp_path / "data")
    cfg = tatoeba_cfg(download_url="http://127.0.0.1:9/cmn-eng.zip")  # nothing listens on port 9: fails at once
    with pytest.raises(CorpusError) as error:
        find_corpus(cfg.data)
    message = str(error.value)
    assert str(tmp_path / "mirror" / "tatoeba-cmn-eng" / "cmn-eng.tsv") in message
    assert str(tmp_path / "data" / "tatoeba-cmn-eng" / "cmn-eng.tsv") in message
    assert "http://127.0.0.1:9/cmn-eng.zip" in message
    assert "SEQ2SEQ_DATA_MIRROR" in message and "data.path" in message

    with pytest.raises(CorpusError, match="data.path="):
        find_corpus(tatoeba_cfg(path=str(tmp_path / "nope.tsv")).data)


def test_download_extracts_the_zip_member(tmp_path, monkeypatch):
    archive = tmp_path / "cmn-eng.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("cmn.txt", "Hi.\t嗨。\tCC-BY 2.0 (France)\n")
    monkeypatch.delenv("SEQ2SEQ_DATA_MIRROR", raising=False)
    monkeypatch.setattr(corpus_module, "data_dir", lambda: tmp_path / "data")
    path = find_corpus(tatoeba_cfg(download_url=archive.as_uri()).data)
    assert path == tmp_path / "data" / "tatoeba-cmn-eng" / "cmn-eng.tsv"
    assert path.read_text(encoding="utf-8") == "Hi.\t嗨。\tCC-BY 2.0 (France)\n"


def hub_cfg() -> DataConfig:
    return saved_config({"data": OmegaConf.load(CONFIG_DIR / "data" / "opus100_zh_en.yaml")}).data


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorpusError, match="HF_HUB_OFFLINE is set and it is not in the local"):
        load_texts(hub_cfg())


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(CorpusError, match="hub is unreachable .*HF_HUB_OFFLINE=1"):
        load_texts(hub_cfg())


def test_hub_evaluation_splits_are_kept_whole_and_a_missing_test_is_carved(monkeypatch):
    def rows(pairs):
        return datasets.Dataset.from_dict({"translation": [{"en": en, "zh": zh} for en, zh in pairs]})

    pairs = synthetic_pairs(250)
    validation = pairs[200:] + pairs[200:202] + [("", ""), (" Spaced  out ", "全角．")]  # duplicates, empty, odd
    fake = datasets.DatasetDict({"train": rows(pairs[:200] + pairs[:2]), "validation": rows(validation)})
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(corpus_module.datasets, "load_dataset", lambda name, config: fake)
    with pytest.raises(CorpusError, match="no test split: set data.split.test_size .* data.test_path"):
        load_texts(hub_cfg())

    cfg = hub_cfg()
    cfg.split.test_size = 20
    splits, report = load_texts(cfg)
    assert report.read == 256 and report.dropped["duplicate"] == 2
    assert report.split_sizes == {"train": 180, "valid": 54, "test": 20}
    assert list(splits["valid"]["tgt"]) == [en for en, _ in validation]  # nothing dropped, nothing normalised
    assert list(splits["valid"]["src"]) == [zh for _, zh in validation]
    assert not set(splits["test"]["src"]) & set(splits["valid"]["src"])
    assert not set(splits["test"]["src"]) & set(splits["train"]["src"])
    assert any("test carved from training" in note for note in report.notes)


def test_local_valid_and_test_files_are_kept_whole(tmp_path):
    pairs = synthetic_pairs(400)
    train = write_tsv(tmp_path / "train.tsv", pairs[:300])
    valid = write_tsv(tmp_path / "valid.tsv", pairs[300:340])
    test_pairs = pairs[340:] + pairs[340:343] + [("", "")] + [("long " * 400, "长" * 2000), ("  ＡＢＣ  x ", "全角")]
    test = tmp_path / "test.tsv"
    test.write_text("".join("\n" if not en else f"{en}\t{zh}\n" for en, zh in test_pairs), encoding="utf-8")
    cfg = tatoeba_cfg(path=str(train), valid_path=str(valid), test_path=str(test))
    splits, report = load_texts(cfg.data)
    assert report.split_sizes == {"train": 300, "valid": 40, "test": len(test_pairs)}
    assert list(splits["test"]["tgt"]) == [en for en, _ in test_pairs]
    assert list(splits["test"]["src"]) == [zh for _, zh in test_pairs]
    assert report.read == report.kept + sum(report.dropped.values())

    cfg = tatoeba_cfg(path=str(train), test_path=str(test), **{"split.valid_size": 30})  # valid carved, test given
    splits, report = load_texts(cfg.data)
    assert report.split_sizes == {"train": 270, "valid": 30, "test": len(test_pairs)}
    assert any("valid carved from training" in note for note in report.notes)

    # Training pairs sharing a sentence with a given split leave training (the grouped split's guarantee).
    shared = [pairs[0], (pairs[1][0], "另一个翻译"), ("  " + pairs[2][0] + " ", "全新的句子"), pairs[3]]
    cfg = tatoeba_cfg(path=str(train), valid_path=str(write_tsv(tmp_path / "v.tsv", shared[:3])), test_path=str(test))
    splits, report = load_texts(cfg.data)
    assert report.dropped["in_eval_split"] == 3 and report.split_sizes["train"] == 297
    assert not {pair[0] for pair in pairs[:3]} & set(splits["train"]["tgt"])
    assert pairs[3][0] in splits["train"]["tgt"]
    assert "in_eval_split          3" in report.summary()

    bad = tmp_path / "bad.tsv"
    bad.write_text("ok\t好\nno tab here\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="line 2 has 1 tab-separated fields"):
        load_texts(tatoeba_cfg(path=str(train), test_path=str(bad)).data)


def test_given_files_are_honoured_whatever_the_cache_holds(tmp_path, cache):
    """The cache key covers which valid/test files are given and their content; a missing or empty one is an error
    even when a cache of the same settings (with a carved test split) is already there."""
    pairs = synthetic_pairs(400)
    train = write_tsv(tmp_path / "train.tsv", pairs[:360])

    def prepared(**given: str):
        cfg = tatoeba_cfg(path=str(train), **{"split.valid_size": 20, "split.test_size": 20}, **given)
        cfg.tokenizer.src_vocab_size, cfg.tokenizer.tgt_vocab_size = 400, 300
        return prepare_data(cfg, log=lambda line: None)

    carved = prepared()  # warm: the same settings with the test split carved from training
    missing = tmp_path / "missing.tsv"
    with pytest.raises(CorpusError, match=f"^data.test_path={missing} is not a file. Point it at the test file"):
        prepared(test_path=str(missing))
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(CorpusError, match=f"^data.valid_path={empty} holds no pairs. Give a valid file with pairs"):
        prepared(valid_path=str(empty))

    test = write_tsv(tmp_path / "test.tsv", pairs[360:])
    first = prepared(test_path=str(test))
    assert first.cache_path != carved.cache_path
    assert list(first.splits["test"]["tgt"]) == [en for en, _ in pairs[360:]]
    write_tsv(test, pairs[370:])  # same name, other content: rebuilt, not reused
    second = prepared(test_path=str(test))
    assert second.cache_path != first.cache_path
    assert list(second.splits["test"]["tgt"]) == [en for en, _ in pairs[370:]]


def test_training_with_a_missing_test_file_is_one_line_and_exit_2(tmp_path, cache):
    train = write_tsv(tmp_path / "train.tsv", synthetic_pairs(100))
    result = subprocess.run(
        [sys.executable, "-m", "seq2seq.train", f"data.path={train}", f"data.test_path={tmp_path / 'gone.tsv'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "SEQ2SEQ_CACHE": str(cache)}, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data.test_path={tmp_path / 'gone.tsv'} is not a file. Point it at the test file, or unset it."
    )
    assert "Traceback" not in result.stderr


def test_hub_cache_key_follows_the_corpus_fingerprint(monkeypatch):
    """Another revision of a hub corpus (other files, so other fingerprints) is another cache."""
    rows = datasets.Dataset.from_dict({"translation": [{"zh": "你好", "en": "Hello"}]})
    revised = rows.map(lambda row: row)
    versions = iter([datasets.DatasetDict({"train": split}) for split in (rows, rows, revised)])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(corpus_module.datasets, "load_dataset", lambda name, config: next(versions))
    cfg = RunConfig(data=hub_cfg(), tokenizer=tokenizer_cfg())
    keys = [prepare_module._cache_key(cfg) for _ in range(3)]
    assert keys[0] == keys[1] != keys[2]


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02\xff\xfe" * 50, b"no tabs at all\nnone here either\n"])
def test_unreadable_corpus_says_no_pair_could_be_read(tmp_path, content):
    path = tmp_path / "corpus.tsv"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match="no pair could be read") as error:
        load_texts(tatoeba_cfg(path=str(path)).data)
    assert "valid_size" not in str(error.value) and "dropped" in str(error.value)


# ------------------------------------------------------------------------------------------------ split


def linked_pairs(count: int) -> tuple[list[str], list[str]]:
    """Pairs where sources and targets repeat, so many groups have several members."""
    rng = random.Random(1)
    return [f"s{rng.randrange(count // 2)}" for _ in range(count)], [f"t{rng.randrange(count)}" for _ in range(count)]


def assert_no_shared_sentence(parts: dict, src, tgt) -> None:
    for side in (src, tgt):
        owners = {}
        for name, rows in parts.items():
            for row in rows.tolist():
                assert owners.setdefault(side[row], name) == name, f"{side[row]} is in {owners[side[row]]} and {name}"


def test_grouped_split_is_disjoint_sized_and_seeded():
    src, tgt = linked_pairs(2000)
    parts = grouped_split(src, tgt, valid_size=200, test_size=150, seed=7)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(2000))
    assert 190 <= len(parts["valid"]) <= 200 and 140 <= len(parts["test"]) <= 150
    assert_no_shared_sentence(parts, src, tgt)
    again = grouped_split(src, tgt, 200, 150, seed=7)
    assert all(np.array_equal(again[name], parts[name]) for name in parts)
    assert not np.array_equal(grouped_split(src, tgt, 200, 150, seed=8)["test"], parts["test"])


def test_connected_groups_follow_chains():
    # pairs 0-1 share a source, 1-2 a target, 2-3 a source: one chain; 4 alone; 5-6 share a target
    src = ["a", "a", "b", "b", "c", "d", "e"]
    tgt = ["x", "y", "y", "z", "w", "v", "v"]
    labels = split_module.connected_groups(split_module.hash_texts(src), split_module.hash_texts(tgt))
    assert len(set(labels[:4].tolist())) == 1 and len(set(labels.tolist())) == 3 and labels[5] == labels[6]


@pytest.mark.corpus
def test_grouped_split_of_the_real_corpus_shares_no_sentence(corpus_path):
    rows = [line.split("\t") for line in corpus_path.read_text(encoding="utf-8").splitlines()]
    src, tgt = [row[1] for row in rows if len(row) >= 2], [row[0] for row in rows if len(row) >= 2]
    parts = grouped_split(src, tgt, valid_size=1500, test_size=1500, seed=1234)
    assert len(parts["test"]) == 1500 and len(parts["valid"]) == 1500
    assert_no_shared_sentence(parts, src, tgt)


def test_load_corpus_split_is_deterministic(tmp_path):
    path = write_tsv(tmp_path / "c.tsv", synthetic_pairs(300))
    cfg = tatoeba_cfg(path=str(path), **{"split.valid_size": 30, "split.test_size": 30})
    first, _ = load_texts(cfg.data)
    again, _ = load_texts(cfg.data)
    cfg.data.split.seed = 99
    other, _ = load_texts(cfg.data)
    assert all(list(first[name]["src"]) == list(again[name]["src"]) for name in first)
    assert list(first["test"]["src"]) != list(other["test"]["src"])


def test_too_small_corpus_for_the_split_sizes(tmp_path):
    path = write_tsv(tmp_path / "c.tsv", synthetic_pairs(20))
    with pytest.raises(CorpusError, match="too few"):
        load_texts(tatoeba_cfg(path=str(path)).data)


# -------------------------------------------------------------------------------------------- tokenizer


def tokenizer_cfg(**overrides: object) -> TokenizerConfig:
    return TokenizerConfig(**{"src_vocab_size": 700, "tgt_vocab_size": 320, **overrides})


@pytest.fixture(scope="module")
def train_split() -> Split:
    pairs = synthetic_pairs(3000)
    return Split(src=[zh for _, zh in pairs], tgt=[en for en, _ in pairs])


SIDES = ("NFKC", None)  # the shipped default: sources folded, targets kept as written


@pytest.fixture(scope="module")
def tokenizers(train_split, tmp_path_factory) -> tuple[Tokenizer, Tokenizer]:
    return build_tokenizers(train_split["src"], train_split["tgt"], tokenizer_cfg(), tmp_path_factory.mktemp("tok"), SIDES)


@pytest.mark.parametrize(
    "text",
    [
        "我是一个学生。",
        "他们的家很大",
        "The big cat quickly eats fish.",
        "龘靐齉𠜎 and 😀🚀 never seen",  # rare CJK (one outside the BMP) and emoji: byte fallback
        "Ｆｕｌｌ－ｗｉｄｔｈ　ｔｅｘｔ，  extra   spaces ",  # the source side NFKC-normalises it, the target keeps it
        "Ünïcödé ñ ß ø",
    ],
)
def test_tokenizer_round_trip(tokenizers, text):
    for tokenizer in tokenizers:
        ids = tokenizer.encode(text)
        assert UNK_ID not in ids
        assert tokenizer.decode(ids) == tokenizer.normalize(text)
        assert tokenizer.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == tokenizer.normalize(text)
        assert len(tokenizer.pieces(ids)) == len(ids)


def test_tokenizer_specials_and_proto(tokenizers):
    src, tgt = tokenizers
    assert src.pieces([PAD_ID, UNK_ID, BOS_ID, EOS_ID]) == ["<pad>", "<unk>", "<s>", "</s>"]
    assert src.vocab_size == 700 and tgt.vocab_size == 320
    clone = Tokenizer.from_proto(src.proto, src.normalization)
    assert clone.encode("他是我的老师") == src.encode("他是我的老师")
    assert any(piece.startswith("<0x") for piece in src.pieces(src.encode("😀")))


def test_tokenizer_cache_reuses_models(train_split, tmp_path, monkeypatch):
    calls = []
    train = tokenizer_module._train_sentencepiece
    monkeypatch.setattr(tokenizer_module, "_train_sentencepiece", lambda *a: calls.append(1) or train(*a))
    first = build_tokenizers(train_split["src"], train_split["tgt"], tokenizer_cfg(), tmp_path, SIDES)
    models = sorted((tmp_path / "tokenizers").glob("*.model"))
    mtimes = [path.stat().st_mtime_ns for path in models]
    assert len(calls) == 2 and len(models) == 2

    second = build_tokenizers(train_split["src"], train_split["tgt"], tokenizer_cfg(), tmp_path, SIDES)
    assert len(calls) == 2, "a second build with the same data and settings must not retrain"
    assert [path.stat().st_mtime_ns for path in models] == mtimes
    assert [t.proto for t in second] == [t.proto for t in first]

    build_tokenizers(train_split["src"], train_split["tgt"], tokenizer_cfg(tgt_vocab_size=310), tmp_path, SIDES)
    assert len(calls) == 3  # only the target model's settings changed
    build_tokenizers(train_split["src"][:2000], train_split["tgt"][:2000], tokenizer_cfg(), tmp_path, SIDES)
    assert len(calls) == 5  # other training data: both retrained


def test_joint_tokenizer_and_soft_vocab_limit(train_split, tmp_path):
    src, tgt = build_tokenizers(train_split["src"], train_split["tgt"], tokenizer_cfg(joint=True, model_type="bpe"), tmp_path, SIDES)
    assert src.proto == tgt.proto and src.vocab_size == 700  # one model, each side with its own normalisation
    assert (src.normalization, tgt.normalization) == SIDES
    assert src.decode(src.encode("我们 like the red book")) == "我们 like the red book"
    small, _ = build_tokenizers(train_split["src"][:40], train_split["tgt"][:40], tokenizer_cfg(src_vocab_size=5000, tgt_vocab_size=5000), tmp_path, SIDES)
    assert 260 < small.vocab_size < 5000  # too little data for 5000 pieces: fewer, no failure


# --------------------------------------------------------------------------------------------- batching


def random_lengths(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 60, count), rng.integers(1, 80, count)


def test_sampler_budget_and_coverage():
    src, tgt = random_lengths(3000)
    sampler = TokenBatchSampler(src, tgt, max_tokens=1000, shuffle=True, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(3000))
    for batch in batches:
        assert len(batch) * (src[batch].max() + 1) <= 1000 and len(batch) * (tgt[batch].max() + 1) <= 1000
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(i for batch in epoch1 for i in batch) == list(range(3000))
    assert epoch1 != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches
    assert list(TokenBatchSampler(src, tgt, 1000, shuffle=True, seed=3)) == batches


@pytest.mark.parametrize("max_tokens", [1, 7, 40, 300])
def test_sampler_cut_is_the_greedy_rule(max_tokens):
    """Each batch takes rows, in sorted order, while (rows + 1) * longest side fits; compared with a plain loop."""
    rng = np.random.default_rng(max_tokens)
    src, tgt = rng.integers(0, 60, 3000), rng.integers(0, 60, 3000)
    sampler = TokenBatchSampler(src, tgt, max_tokens, shuffle=True, seed=3)
    order = np.lexsort((np.random.default_rng([3, 0, 0]).permutation(3000), tgt, src))
    expected, batch, longest = [], [], 0
    for row in order.tolist():
        size = max(src[row], tgt[row]) + 1
        if batch and (len(batch) + 1) * max(longest, size) > max_tokens:
            expected.append(batch)
            batch, longest = [], 0
        batch.append(row)
        longest = max(longest, size)
    expected.append(batch)
    assert sorted(map(tuple, sampler)) == sorted(map(tuple, expected))


def test_sampler_sorts_without_shuffle_and_isolates_overlong_pairs():
    src, tgt = np.array([5, 3, 400, 4, 3]), np.array([5, 3, 2, 4, 3])
    batches = list(TokenBatchSampler(src, tgt, max_tokens=12, shuffle=False, seed=0))
    assert batches == [[1, 4], [3, 0], [2]]  # sorted by (src, tgt); the 400-token pair alone


@pytest.mark.parametrize("count", [3000, 37])
def test_sampler_sharding_gives_equal_batch_counts(count):
    src, tgt = random_lengths(count, seed=1)
    ranks = [TokenBatchSampler(src, tgt, 700, True, seed=5, rank=rank, world_size=2) for rank in (0, 1)]
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shards = [list(sampler) for sampler in ranks]
        assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == len(ranks[1])
        seen = [i for shard in shards for batch in shard for i in batch]
        assert set(seen) == set(range(count))
        whole = list(TokenBatchSampler(src, tgt, 700, True, seed=5))
        assert len(seen) - count <= max(len(batch) for batch in whole)  # at most one wrapped batch repeats


def test_collate_layout_and_masks():
    examples = [
        {"src_ids": [11, 12, 13], "tgt_ids": [21, 22], "index": 7},
        {"src_ids": np.array([14], dtype=np.int32), "tgt_ids": [23, 24, 25, 26], "index": 3},
    ]
    batch = collate(examples)
    assert batch.src.tolist() == [[11, 12, 13, EOS_ID], [14, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 21, 22, PAD_ID, PAD_ID], [BOS_ID, 23, 24, 25, 26]]
    assert batch.tgt_out.tolist() == [[21, 22, EOS_ID, PAD_ID, PAD_ID], [23, 24, 25, 26, EOS_ID]]
    assert batch.src_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.tgt_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch.indices.tolist() == [7, 3]
    assert (batch.size, batch.num_src_tokens, batch.num_tgt_tokens) == (2, 6, 8)
    assert batch.src.dtype == torch.long and batch.src_mask.dtype == torch.bool
    assert batch.to("cpu").tgt_out.equal(batch.tgt_out)


def test_make_loader_yields_every_row_once_with_its_ids():
    rng = np.random.default_rng(0)
    rows = 5000
    src_ids = [rng.integers(4, 300, rng.integers(1, 40)).tolist() for _ in range(rows)]
    tgt_ids = [rng.integers(4, 300, rng.integers(1, 40)).tolist() for _ in range(rows)]
    full = datasets.Dataset.from_dict({"src_ids": src_ids, "tgt_ids": tgt_ids, "index": list(range(rows))})
    split = full.select(range(1000, 4000))  # a view with an indices mapping, as after a select/split
    loader = make_loader(split, max_tokens=800, shuffle=True, seed=0)
    seen = []
    for batch in loader:
        assert batch.src.numel() <= 800 and batch.tgt_in.numel() <= 800
        for row, index in enumerate(batch.indices.tolist()):
            length = int(batch.src_mask[row].sum()) - 1
            assert batch.src[row, :length].tolist() == src_ids[index]
            assert batch.tgt_out[row, : int(batch.tgt_mask[row].sum()) - 1].tolist() == tgt_ids[index]
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(1000, 4000))
    first_order = seen
    loader.batch_sampler.set_epoch(1)
    assert [i for batch in loader for i in batch.indices.tolist()] != first_order


# ---------------------------------------------------------------------------------------- prepare_data


def test_prepare_data_builds_then_reuses_the_cache(tmp_path, cache, monkeypatch):
    monkeypatch.setattr("seq2seq.data.prepare.MAX_SENTENCE_TOKENS", 12)
    path = write_tsv(tmp_path / "c.tsv", synthetic_pairs(600))
    cfg = tatoeba_cfg(path=str(path), **{"split.valid_size": 50, "split.test_size": 50})
    cfg.tokenizer.src_vocab_size, cfg.tokenizer.tgt_vocab_size = 500, 350
    logged: list[str] = []
    first = prepare_data(cfg, log=logged.append)

    assert first.cache_path.parent == cache / "datasets"
    assert any("saved to" in line for line in logged) and any("read 600" in line for line in logged)
    train = first.splits["train"]
    assert set(train.column_names) == {"src", "tgt", "src_ids", "tgt_ids", "index"}
    assert train.features["src_ids"].feature.dtype == "uint16"
    # Training pairs over the token cap are dropped, never cut: a cut target would end in a false EOS.
    dropped = first.report.dropped["over_token_cap"]
    assert 0 < dropped < 500 and len(train) == 500 - dropped == first.report.split_sizes["train"]
    assert f"over_token_cap {dropped:>9,}" in first.report.summary()
    assert first.report.read == first.report.kept + sum(first.report.dropped.values())
    for row in train:
        assert row["src_ids"] == first.src_tokenizer.encode(row["src"]) and len(row["src_ids"]) <= 12
        assert row["tgt_ids"] == first.tgt_tokenizer.encode(row["tgt"]) and len(row["tgt_ids"]) <= 12
    assert list(train["index"]) == sorted(set(train["index"]))  # row numbers before the cap, in order
    # Evaluation pairs stay whole for scoring; only their ids are cut, for the loss.
    valid = first.splits["valid"]
    assert len(valid) == 50 and max(len(ids) for ids in valid["src_ids"]) == 12
    assert any("cut for the loss; BLEU scores the whole references" in note for note in first.report.notes)

    monkeypatch.setattr("seq2seq.data.prepare.load_corpus", lambda *_: pytest.fail("the cached splits were rebuilt"))
    logged.clear()
    again = prepare_data(cfg, log=logged.append)
    assert any("loaded from" in line for line in logged)
    assert again.cache_path == first.cache_path and again.report == first.report
    assert list(again.splits["valid"]["src_ids"]) == list(first.splits["valid"]["src_ids"])
    assert again.src_tokenizer.proto == first.src_tokenizer.proto
    assert os.listdir(cache / "datasets") == [first.cache_path.name]  # no temporary folders left behind


@pytest.mark.slow
@pytest.mark.corpus
def test_preparation_memory_does_not_grow_with_the_corpus(corpus_path, tmp_path):
    """scripts/benchmark_data.py on synthetic Tatoeba corpora of 150k and 600k pairs (both cleaned by two worker
    processes, the SentencePiece sample capped at the same size): memory grows by the numpy arrays of the split, a
    little over 100 bytes per pair. A reader that holds the corpus as Python objects grew by about 1,200."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_data.py"
    env = {**os.environ, "SEQ2SEQ_DATA_MIRROR": str(corpus_path.parents[1])}
    figures = {}
    for pairs in (150_000, 600_000):
        result = tmp_path / f"{pairs}.json"
        subprocess.run(
            [sys.executable, str(script), "--pairs", str(pairs), "--workdir", str(tmp_path), "--json", str(result),
             "data.num_proc=2", "tokenizer.max_sentences=10000", "tokenizer.src_vocab_size=4000",
             "tokenizer.tgt_vocab_size=2000"],
            check=True, env=env, capture_output=True, timeout=600,
        )
        figures[pairs] = json.loads(result.read_text())
        assert figures[pairs]["read"] == pairs
    for measure in ("peak_tree_pss_mib", "peak_process_rss_mib"):
        growth = (figures[600_000][measure] - figures[150_000][measure]) * 2**20 / 450_000
        assert growth < 300, f"{measure} grew {growth:.0f} bytes per pair: {figures}"
