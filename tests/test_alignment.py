"""Alignment error rate: the Pharaoh reader, the extractions and AER on an example worked out by hand, pieces
mapped onto Pharaoh tokens, forced decoding against the trainer's loss, and `seq2seq.evaluate --alignments`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from seq2seq.analysis.alignment import (AlignmentError, Counts, aer, extract, format_pharaoh, named_maps,
                                        parse_pharaoh, piece_tokens, read_pharaoh, score_alignments, tokens)
from seq2seq.checkpoint import load_model
from seq2seq.data.batching import collate
from seq2seq.inference.forced import force
from seq2seq.training.step import token_loss

# 我 是 学 生 -> "I am a student.": 学 and 生 both sure on "student.", 是 possibly on "a".
REFERENCE = parse_pharaoh("0-0 1-1 2-3 3-3 1?2")
# rows: target words I, am, a, student. ; columns: source characters 我 是 学 生
ATTENTION = np.array([
    [0.7, 0.1, 0.1, 0.1],
    [0.1, 0.6, 0.2, 0.1],
    [0.1, 0.4, 0.3, 0.2],
    [0.0, 0.1, 0.5, 0.4],
])


def test_pharaoh_reader_sure_and_possible(tmp_path):
    assert REFERENCE.sure == {(0, 0), (1, 1), (2, 3), (3, 3)}
    assert REFERENCE.possible == REFERENCE.sure | {(1, 2)}
    assert format_pharaoh(REFERENCE) == "0-0 1-1 2-3 3-3 1?2"
    path = tmp_path / "pairs.align"
    path.write_text("0-0 1-1\n\n2?0\n", encoding="utf-8")
    empty = read_pharaoh(path)[1]
    assert len(read_pharaoh(path)) == 3 and not empty.sure and not empty.possible
    path.write_text("0-0\n0:1\n", encoding="utf-8")
    with pytest.raises(AlignmentError, match=r"pairs.align:2: '0:1'"):
        read_pharaoh(path)


def test_aer_worked_out_by_hand():
    """S = {0-0, 1-1, 2-3, 3-3}, P = S + {1-2}.
    argmax per target word: I->我 0-0, am->是 1-1, a->是 1-2, student.->学 2-3, so A = {0-0, 1-1, 1-2, 2-3}:
      |A∩S| = 3, |A∩P| = 4, AER = 1 - (3 + 4) / (4 + 4) = 1/8; precision 4/4, recall 3/4.
    argmax per source character (columns): 我->I, 是->am, 学->student., 生->student.: {0-0, 1-1, 2-3, 3-3}.
    intersect = {0-0, 1-1, 2-3}: AER = 1 - (3 + 3) / (3 + 4) = 1/7.
    grow-diag-final from the intersection: 1-2 is next to 1-1 and "a" is unaligned, 3-3 is next to 2-3 and 生 is
    unaligned, so both are added: A = union, |A∩S| = 4, |A∩P| = 5, AER = 1 - 9 / 9 = 0."""
    assert extract(ATTENTION, "argmax") == {(0, 0), (1, 1), (1, 2), (2, 3)}
    assert aer(extract(ATTENTION, "argmax"), REFERENCE) == pytest.approx(1 / 8)
    assert extract(ATTENTION, "intersect") == {(0, 0), (1, 1), (2, 3)}
    assert aer(extract(ATTENTION, "intersect"), REFERENCE) == pytest.approx(1 / 7)
    assert extract(ATTENTION, "grow-diag-final") == {(0, 0), (1, 1), (1, 2), (2, 3), (3, 3)}
    assert aer(extract(ATTENTION, "grow-diag-final"), REFERENCE) == 0.0
    counts = Counts()
    counts.add(extract(ATTENTION, "argmax"), REFERENCE)
    assert counts.scores() == {"aer": pytest.approx(1 / 8), "precision": 1.0, "recall": 0.75}


def test_aer_is_pooled_over_pairs_not_averaged():
    """Pair 1 as above (argmax: |A| 4, |S| 4, 3 and 4 matches); pair 2 one sure link, missed by one predicted
    link: |A| 1, |S| 1, no match. Pooled: 1 - (3 + 4 + 0 + 0) / (4 + 4 + 1 + 1) = 0.3, not (1/8 + 1) / 2."""
    counts = Counts()
    counts.add(extract(ATTENTION, "argmax"), REFERENCE)
    counts.add({(0, 1)}, parse_pharaoh("0-0"))
    assert counts.scores()["aer"] == pytest.approx(0.3)


def test_every_head_layer_mean_and_mean_of_all_are_scored():
    layers = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 3, 4))
    names = [name for name, *_ in named_maps(layers)]
    assert names[:3] == ["layer 1 head 1", "layer 1 head 2", "layer 1 head 3"]
    assert names[-3:] == ["layer 1 mean", "layer 2 mean", "mean of all"] and len(names) == 2 * 3 + 2 + 1
    assert [name for name, *_ in named_maps(layers[:1, :1])] == ["attention"]


def test_pieces_map_onto_words_and_characters():
    english = piece_tokens(["▁I", "'", "m", "▁a", "▁stud", "ent", "."], characters=False)
    assert english.labels == ["I'm", "a", "student."] == tokens("I'm a student.", characters=False)
    chinese = piece_tokens(["▁我", "是", "一个", "学生", "。"], characters=True)
    assert chinese.labels == list("我是一个学生。") == tokens("我是 一个学生。", characters=True)
    assert tokens("Ｉ'm  here.", characters=False) == ["Ｉ'm", "here."]  # normalising is the tokenizer's part
    np.testing.assert_allclose(chinese.shares[2], [0, 0, 0.5, 0.5, 0, 0, 0])  # "一个" shared by 一 and 个
    fallback = piece_tokens(["▁", "<0xE5>", "<0xAD>", "<0xA6>", "生"], characters=True)
    assert fallback.labels == ["学", "生"] and fallback.shares[:4, 0].tolist() == [1.0] * 4


def test_forced_decoding_reproduces_the_trainers_loss(checkpoints, corpus_path):
    """The per-pair loss of forced decoding, in a batch of several, is the trainer's token loss of that pair
    alone, and the sum over the incremental decoder's steps; its attention rows are distributions."""
    from conftest import corpus_pairs

    for name in ("transformer", "bahdanau", "rnn"):
        loaded = load_model(checkpoints[name])
        model, src_tok, tgt_tok = loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer
        pairs = [(src_tok.encode(zh), tgt_tok.encode(en)) for zh, en in corpus_pairs(corpus_path, 12)[:6]]
        results = force(model, pairs, torch.device("cpu"))
        for (src_ids, tgt_ids), result in zip(pairs, results):
            batch = collate([{"src_ids": src_ids, "tgt_ids": tgt_ids}])
            with torch.no_grad():
                expected = token_loss(model(batch.src, batch.src_mask, batch.tgt_in).logits, batch.tgt_out).item()
                state = model.encode(batch.src, batch.src_mask)
                stepwise = 0.0
                for position, target in enumerate([*tgt_ids, model.eos_id]):
                    log_probs, _, state = model.decode_step(state, batch.tgt_in[:, position])
                    stepwise -= log_probs[0, target].item()
            assert result.loss == pytest.approx(expected, rel=1e-4)
            assert result.loss == pytest.approx(stepwise, rel=1e-3)
            assert result.tokens == list(tgt_ids)
            if name == "rnn":
                assert result.layers is None
            else:
                assert result.layers.shape[2:] == (len(tgt_ids) + 1, len(src_ids) + 1)
                np.testing.assert_allclose(result.layers.sum(axis=-1), 1.0, atol=1e-4)


def _diagonal_pairs(corpus_path, count: int = 20) -> tuple[list[tuple[str, str]], list[str]]:
    """Corpus pairs with a made-up reference: source character i sure on target word min(i, last)."""
    from conftest import corpus_pairs

    pairs = corpus_pairs(corpus_path, 200)[:count]
    lines = []
    for zh, en in pairs:
        last = len(tokens(en, characters=False)) - 1
        lines.append(" ".join(f"{i}-{min(i, last)}" for i in range(len(tokens(zh, characters=True)))))
    return pairs, lines


def test_score_alignments_of_a_tiny_transformer(checkpoints, corpus_path):
    loaded = load_model(checkpoints["transformer"])
    pairs, lines = _diagonal_pairs(corpus_path)
    report = score_alignments(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, pairs,
                              [parse_pharaoh(line) for line in lines], "zh", "en", torch.device("cpu"))
    assert report.pairs + sum(report.skipped.values()) == len(pairs) and report.pairs >= len(pairs) - 2
    maps = {row["map"] for row in report.rows}
    assert maps == {"layer 1 head 1", "layer 1 head 2", "layer 1 mean", "mean of all"}
    assert len(report.rows) == 4 * 3
    assert [row["aer"] for row in report.rows] == sorted(row["aer"] for row in report.rows)
    assert all(0.0 <= row["aer"] <= 1.0 for row in report.rows)
    rnn = load_model(checkpoints["rnn"])
    assert score_alignments(rnn.model, rnn.src_tokenizer, rnn.tgt_tokenizer, pairs,
                            [parse_pharaoh(line) for line in lines], "zh", "en", torch.device("cpu")).rows == []


def test_evaluate_prints_the_table_and_writes_json(checkpoints, corpus_path, tmp_path):
    pairs, lines = _diagonal_pairs(corpus_path, 12)
    (tmp_path / "pairs.tsv").write_text("".join(f"{en}\t{zh}\n" for zh, en in pairs), encoding="utf-8")
    (tmp_path / "pairs.align").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    command = [sys.executable, "-m", "seq2seq.evaluate", "--checkpoint", str(checkpoints["bahdanau"]), "--tsv",
               str(tmp_path / "pairs.tsv"), "--alignments", str(tmp_path / "pairs.align"), "--json",
               str(tmp_path / "aer.json")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "| attention |" in run.stdout and "best: attention with" in run.stdout
    document = json.loads((tmp_path / "aer.json").read_text(encoding="utf-8"))
    assert document["pairs"] + sum(document["skipped"].values()) == 12
    assert {row["extraction"] for row in document["rows"]} == {"argmax", "intersect", "grow-diag-final"}
    assert document["best"] == document["rows"][0] and not math.isnan(document["best"]["aer"])
    (tmp_path / "pairs.align").write_text("0-0\n", encoding="utf-8")
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    error = run.stderr.splitlines()[-1]
    assert run.returncode == 2 and error.startswith("error:") and "has 1 lines" in error


@pytest.mark.slow
@pytest.mark.corpus
def test_training_logs_aer_per_head_at_every_validation(ws):
    """data.alignments_path=X: X.tsv + X.align scored at each validation, best and per map in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = (ws.root / "slice.tsv").read_text(encoding="utf-8").splitlines()[1000:1016]
    pairs = [(line.split("\t")[1], line.split("\t")[0]) for line in lines]
    links = []
    for zh, en in pairs:
        last = len(tokens(en, characters=False)) - 1
        links.append(" ".join(f"{i}-{min(i, last)}" for i in range(len(tokens(zh, characters=True)))))
    (ws.root / "gold.tsv").write_text("".join(f"{en}\t{zh}\n" for zh, en in pairs), encoding="utf-8")
    (ws.root / "gold.align").write_text("".join(line + "\n" for line in links), encoding="utf-8")
    run_dir = ws.root / "aligned"
    result = ws.train("model=tiny_transformer", "trainer.max_steps=10", "trainer.eval_every=5",
                      "trainer.average_last=0", f"data.alignments_path={ws.root / 'gold'}",
                      f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert [event.step for event in accumulator.Scalars("alignment/aer")] == [5, 10]
    per_map = {tag for tag in tags if tag.startswith("alignment/argmax/")}
    assert per_map == {f"alignment/argmax/layer_{layer}_head_{head}" for layer in (1, 2) for head in (1, 2)} | {
        "alignment/argmax/layer_1_mean", "alignment/argmax/layer_2_mean", "alignment/argmax/mean_of_all"}
    assert all(0 <= event.value <= 1 for event in accumulator.Scalars("alignment/aer"))

    (ws.root / "gold.align").write_text("0-0\n", encoding="utf-8")
    result = ws.train("model=tiny_transformer", "trainer.max_steps=2", f"data.alignments_path={ws.root / 'gold'}",
                      f"hydra.run.dir={ws.root / 'broken'}")
    assert result.returncode == 2 and "data.alignments_path" in result.stderr
