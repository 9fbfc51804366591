"""sacreBLEU wrappers: same numbers as sacreBLEU itself, the right tokenizer per language, length buckets."""

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

from seq2seq.metrics import balanced_edges, bleu_by_length, bleu_tokenizer, corpus_scores, length_bucket

HYPS = ["the cat sat on the mat", "a dog is running in the park", "I like green tea very much", "he went home"]
REFS = ["the cat sat on the mat", "the dog runs in the park", "I really like green tea", "he went to school"]


def test_english_scores_match_sacrebleu():
    scores = corpus_scores(HYPS, REFS, "en")
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert 0 < scores["bleu"] < 100
    assert "tok:13a" in scores["bleu_signature"]
    assert scores["chrf_signature"].startswith("nrefs:1")


def test_identical_corpus_scores_100():
    scores = corpus_scores(REFS, REFS, "en")
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)


def test_chinese_target_uses_zh_tokenizer():
    hyps = ["我是一个学生。", "他昨天去了图书馆。"]
    refs = ["我是一名学生。", "他昨天去图书馆了。"]
    scores = corpus_scores(hyps, refs, "zh")
    assert "tok:zh" in scores["bleu_signature"]
    assert scores["bleu"] == pytest.approx(BLEU(tokenize="zh").corpus_score(hyps, [refs]).score)
    # With 13a an unsegmented Chinese sentence is one "word": partial matches would score nothing.
    assert BLEU(tokenize="13a").corpus_score(hyps, [refs]).score == 0.0
    assert scores["bleu"] > 0.0
    assert bleu_tokenizer("zh") == "zh" and bleu_tokenizer("en") == "13a"


def test_empty_corpus_and_mismatch():
    empty = corpus_scores([], [], "en")
    assert empty["bleu"] == 0.0 and empty["chrf"] == 0.0 and "tok:13a" in empty["bleu_signature"]
    with pytest.raises(ValueError, match="pair up"):
        corpus_scores(["a"], ["a", "b"], "en")


TENS = (10, 20, 30, 40, 50)


def test_length_bucket_names():
    assert [length_bucket(n, TENS) for n in (1, 10, 11, 20, 50, 51, 400)] == [
        "1-10", "1-10", "11-20", "11-20", "41-50", "51+", "51+"
    ]
    assert length_bucket(7, edges=(5,)) == "6+"
    assert [length_bucket(n, (4, 5, 7)) for n in (5, 6)] == ["5", "6-7"]


def test_balanced_edges_give_buckets_of_similar_size():
    # Tatoeba-like: most sentences short, a long tail.
    lengths = [3] * 100 + [4] * 200 + [5] * 250 + [6] * 250 + [7] * 200 + [9] * 250 + [12] * 200 + [30] * 50
    edges = balanced_edges(lengths, buckets=6)
    assert edges == sorted(set(edges)) and edges[-1] < 30
    counts = [row["count"] for row in bleu_by_length(lengths, ["a"] * len(lengths), ["a"] * len(lengths), "en", edges)]
    assert len(counts) == 6 and sum(counts) == len(lengths)
    assert max(counts) <= 2 * min(counts)
    # One length only, or nothing at all: a single bucket, no edges.
    assert balanced_edges([5] * 40) == [] and balanced_edges([]) == []


def test_bleu_by_length_buckets_and_scores():
    lengths = [3, 10, 15, 60]
    rows = bleu_by_length(lengths, HYPS, REFS, "en", TENS)
    assert [(row["bucket"], row["count"]) for row in rows] == [("1-10", 2), ("11-20", 1), ("51+", 1)]
    expected_first = BLEU().corpus_score(HYPS[:2], [REFS[:2]]).score
    assert rows[0]["bleu"] == pytest.approx(expected_first)
    assert rows[2]["bleu"] == pytest.approx(BLEU().corpus_score(HYPS[3:], [REFS[3:]]).score)
    assert sum(row["count"] for row in rows) == len(HYPS)


def test_bleu_by_length_checks_inputs():
    with pytest.raises(ValueError):
        bleu_by_length([1, 2], HYPS, REFS, "en")
    with pytest.raises(ValueError):
        bleu_by_length([1, 2, 3, 4], HYPS, REFS, "en", edges=(20, 10))


def test_chrf_signature_is_sacrebleu_default():
    chrf = CHRF()
    chrf.corpus_score(HYPS, [REFS])
    assert corpus_scores(HYPS, REFS, "en")["chrf_signature"] == str(chrf.get_signature())
