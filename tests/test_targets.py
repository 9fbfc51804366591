"""Targets as written: each side has its own normalisation, Chinese references survive tokenizing unchanged, old
checkpoints (NFKC on both sides, not recorded) still translate, and a run of the other direction is named so."""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from conftest import _config, _train, corpus_pairs, tatoeba_cfg
from omegaconf import OmegaConf

from seq2seq.checkpoint import load_model, save_checkpoint
from seq2seq.config import ConfigError, check_config, model_config, saved_config
from seq2seq.data.clean import side_normalizations
from seq2seq.data.prepare import prepare_data
from seq2seq.data.tokenizer import LEGACY_NORMALIZATION, build_tokenizers
from seq2seq.inference.predict import translate_sentences
from seq2seq.models import build_model
from seq2seq.paths import CONFIG_DIR


def chinese_column(path: Path) -> list[str]:
    """Every Chinese sentence of the corpus file, as published."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [fields[1] for fields in (line.split("\t") for line in lines) if len(fields) >= 2]


@pytest.mark.corpus
def test_every_tatoeba_chinese_sentence_is_a_target_as_written(corpus_path, cache):
    """The shipped defaults, en->zh: the target tokenizer gives back every Chinese sentence of the corpus (up to
    whitespace runs), so a perfect hypothesis equals its reference; sources are still NFKC-folded."""
    lines: list[str] = []
    prepared = prepare_data(tatoeba_cfg(path=str(corpus_path), src_lang="en", tgt_lang="zh"), log=lines.append)
    target = prepared.tgt_tokenizer
    assert (prepared.src_tokenizer.normalization, target.normalization) == ("NFKC", None)
    assert "direction: en -> zh" in "\n".join(lines)

    chinese = chinese_column(corpus_path)
    assert len(chinese) > 29_000
    folded = [text for text in chinese if unicodedata.normalize("NFKC", text) != text]
    assert len(folded) > 5_000  # what NFKC on the target side used to change
    changed = [text for text in chinese if target.decode(target.encode(text)) != " ".join(text.split())]
    assert changed == []

    test = prepared.splits["test"]
    references = list(test["tgt"])
    assert [target.decode(ids) for ids in test["tgt_ids"]] == [" ".join(text.split()) for text in references]
    for mark in "，？！":  # the model can produce them as single pieces, not only through byte fallback
        assert any(mark in text for text in references)
        assert mark in target.pieces(target.encode(mark))


def test_normalisation_is_a_per_side_choice_that_cleaning_and_tokenizing_share(tmp_path, cache):
    rows = [f"Sentence number {i}, ｆｕｌｌ－ｗｉｄｔｈ!\t第{i}句，好吗？" for i in range(60)]
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    small = {"path": str(path), "split.valid_size": 5, "split.test_size": 5}
    cfg = tatoeba_cfg(src_lang="en", tgt_lang="zh", **small)
    cfg.tokenizer = replace(cfg.tokenizer, src_vocab_size=300, tgt_vocab_size=300)

    default = prepare_data(cfg, log=lambda line: None)
    train = default.splits["train"]
    assert all("full-width!" in text for text in train["src"])  # source folded by cleaning
    assert all("，" in text and "？" in text for text in train["tgt"])  # target kept as written
    source = default.src_tokenizer
    assert source.decode(source.encode("ｆｕｌｌ－ｗｉｄｔｈ")) == "full-width"  # the same form at translate time

    cfg.data.clean.tgt_normalization = "NFKC"
    folded = prepare_data(cfg, log=lambda line: None)
    assert folded.cache_path != default.cache_path
    assert folded.tgt_tokenizer.normalization == "NFKC"
    assert all("," in text and "?" in text for text in folded.splits["train"]["tgt"])

    with pytest.raises(ConfigError, match="data.clean.src_normalization='NFKX' is not one of NFC, NFD, NFKC, NFKD"):
        check_config(asdict(replace(cfg, model={"name": "transformer"}, data=replace(
            cfg.data, clean=replace(cfg.data.clean, src_normalization="NFKX")))))


def test_checkpoints_without_recorded_normalisation_translate_as_before(checkpoints, tmp_path):
    """Files written before the normalisation was recorded folded both sides with NFKC: they still do."""
    loaded = load_model(checkpoints["transformer"])
    assert "src_normalization" not in loaded.checkpoint
    assert loaded.src_tokenizer.normalization == loaded.tgt_tokenizer.normalization == LEGACY_NORMALIZATION
    assert loaded.src_tokenizer.encode("你好，世界！") == loaded.src_tokenizer.encode("你好,世界!")

    recorded = tmp_path / "recorded.pt"
    save_checkpoint(recorded, {**loaded.checkpoint, "src_normalization": "NFKC", "tgt_normalization": None})
    again = load_model(recorded)
    assert (again.src_tokenizer.normalization, again.tgt_tokenizer.normalization) == ("NFKC", None)
    assert again.tgt_tokenizer.decode(again.tgt_tokenizer.encode("Ｆｕｌｌ")) == "Ｆｕｌｌ"
    (translation,) = translate_sentences(again.model, again.src_tokenizer, again.tgt_tokenizer, ["我是学生。"])
    assert isinstance(translation.text, str)


@pytest.mark.slow
@pytest.mark.corpus
def test_a_model_learns_chinese_targets_with_their_punctuation(corpus_path, tmp_path):
    """en->zh in miniature: a tiny Transformer learns 32 Tatoeba pairs whose Chinese has full-width punctuation by
    heart, and greedy decoding writes them back as written (，？ and not , ?)."""
    pairs = [(en, zh) for zh, en in corpus_pairs(corpus_path, 3000) if "，" in zh or "？" in zh][:32]
    tok_cfg = replace(saved_config(_config("transformer")).tokenizer, src_vocab_size=400, tgt_vocab_size=400)
    src_tok, tgt_tok = build_tokenizers([en for en, _ in pairs], [zh for _, zh in pairs], tok_cfg, tmp_path,
                                        ("NFKC", None))
    examples = [{"src_ids": src_tok.encode(en), "tgt_ids": tgt_tok.encode(zh)} for en, zh in pairs]
    torch.manual_seed(0)
    model = build_model(model_config(_config("transformer")["model"]), src_tok.vocab_size, tgt_tok.vocab_size)
    _train(model, _config("transformer"), examples, steps=300)
    outputs = [t.text for t in translate_sentences(model, src_tok, tgt_tok, [en for en, _ in pairs], beam_size=1)]
    learnt = [out for out, (_, zh) in zip(outputs, pairs) if out == " ".join(zh.split())]
    assert len(learnt) >= len(pairs) // 2
    assert any("，" in out or "？" in out for out in learnt)
    assert not any("," in out or "?" in out for out in outputs)


def test_a_checkpoint_config_from_before_the_per_side_keys_folds_both_sides():
    """evaluate --split rebuilds an old checkpoint's splits as it was trained: one normalisation for both sides."""
    old = saved_config({"data": {"clean": {"normalization": "NFKC", "max_chars": 300}}, "model": {"name": "rnn"}})
    assert side_normalizations(old.data.clean) == ("NFKC", "NFKC")
    assert side_normalizations(saved_config({"model": {"name": "rnn"}}).data.clean) == ("NFKC", None)


def test_the_other_direction_names_its_runs():
    data = OmegaConf.load(CONFIG_DIR / "data" / "tatoeba_zh_en.yaml")
    assert data.name == "tatoeba_zh_en"
    data.src_lang, data.tgt_lang = "en", "zh"
    assert data.name == "tatoeba_en_zh"
    for other in ("opus100_zh_en", "wmt19_zh_en"):
        swapped = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "data" / f"{other}.yaml"),
                                  {"src_lang": "en", "tgt_lang": "zh"})
        assert swapped.name == other.replace("zh_en", "en_zh")
