"""Alignment error rate: the Pharaoh reader, the extractions and AER on examples worked out by hand (grow-diag-final
as the Moses manual defines it), Shift-Att on a model whose attention is known, maps chosen on one part and reported
on the other, pieces mapped onto Pharaoh tokens, forced decoding against the trainer's loss,
`seq2seq.evaluate --alignments` and the AER at every validation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from seq2seq import evaluate
from seq2seq.analysis.alignment import (ATTENTION, HELD_OUT, SELECTION, SHIFT_ATT, AlignmentError,
                                        AlignmentScorer, AlignmentSet, Counts, aer, attention_explanations, extract,
                                        format_pharaoh, grow_diag_final, named_maps, parse_pharaoh, piece_tokens,
                                        read_pharaoh, score_alignments, tokens)
from seq2seq.analysis.diagnostics import Units
from seq2seq.checkpoint import load_model
from seq2seq.data.batching import collate
from seq2seq.inference.forced import force
from seq2seq.models.base import ModelOutput, Seq2SeqModel
from seq2seq.training.update import token_loss

# 我 是 学 生 -> "I am a student.": 学 and 生 both sure on "student.", 是 possibly on "a".
REFERENCE = parse_pharaoh("0-0 1-1 2-3 3-3 1?2")
# rows: target words I, am, a, student. ; columns: source characters 我 是 学 生
WEIGHTS = np.array([
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
    assert extract(WEIGHTS, "argmax") == {(0, 0), (1, 1), (1, 2), (2, 3)}
    assert aer(extract(WEIGHTS, "argmax"), REFERENCE) == pytest.approx(1 / 8)
    assert extract(WEIGHTS, "intersect") == {(0, 0), (1, 1), (2, 3)}
    assert aer(extract(WEIGHTS, "intersect"), REFERENCE) == pytest.approx(1 / 7)
    assert extract(WEIGHTS, "grow-diag-final") == {(0, 0), (1, 1), (1, 2), (2, 3), (3, 3)}
    assert aer(extract(WEIGHTS, "grow-diag-final"), REFERENCE) == 0.0
    counts = Counts()
    counts.add(extract(WEIGHTS, "argmax"), REFERENCE)
    assert counts.scores() == {"aer": pytest.approx(1 / 8), "precision": 1.0, "recall": 0.75}


def test_aer_is_pooled_over_pairs_not_averaged():
    """Pair 1 as above (argmax: |A| 4, |S| 4, 3 and 4 matches); pair 2 one sure link, missed by one predicted
    link: |A| 1, |S| 1, no match. Pooled: 1 - (3 + 4 + 0 + 0) / (4 + 4 + 1 + 1) = 0.3, not (1/8 + 1) / 2."""
    counts = Counts()
    counts.add(extract(WEIGHTS, "argmax"), REFERENCE)
    counts.add({(0, 1)}, parse_pharaoh("0-0"))
    assert counts.scores()["aer"] == pytest.approx(0.3)


def test_grow_diag_final_grows_from_links_added_in_the_same_pass():
    """forward (one link per target token) {0-0, 2-1, 1-2}, backward (one per source token) {0-1, 1-0, 2-1}:
    intersection {2-1}, union adds 0-0, 0-1, 1-0, 1-2. Links i-j: source i, target j.
    GROW-DIAG pass 1 scans (target j, source i) in order. At j=1, i=2 (2-1) the neighbours in Moses' order
    (target, source) (-1,0) 2-0, (0,-1) 1-1, (1,0) 2-2, (0,1) 3-1 are not in the union; (-1,-1) 1-0 is and source 1
    is unaligned: added; (-1,+1) 3-0 no; (+1,-1) 1-2 is, target 2 unaligned: added. The scan goes on to j=2 and
    meets 1-2, added ahead of it: (-1,-1) 0-1 is in the union and source 0 unaligned: added. Every token is now
    aligned, so 0-0 never gets in (neither in pass 2 nor in FINAL): {0-1, 1-0, 1-2, 2-1}.
    Growing from a snapshot instead leaves 1-2 to pass 2, where 1-0 (scanned first, at j=0) adds 0-0 (source 0
    still unaligned), and then 0-1 never gets in: {0-0, 1-0, 1-2, 2-1}."""
    forward, backward = {(0, 0), (2, 1), (1, 2)}, {(0, 1), (1, 0), (2, 1)}
    assert grow_diag_final(forward, backward) == {(0, 1), (1, 0), (1, 2), (2, 1)}


def test_grow_diag_final_applies_final_to_each_direction_in_turn():
    """forward {0-0, 1-1}, backward {0-1, 1-0}: no intersection, nothing to grow. FINAL(forward) adds 0-0 (source
    0 and target 0 unaligned), then 1-1; FINAL(backward) finds 0-1 and 1-0 with both tokens aligned and adds
    neither: {0-0, 1-1}. FINAL over the sorted union would add 0-0, then 0-1 (target 1 unaligned), then 1-0
    (source 1 unaligned), and not 1-1: {0-0, 0-1, 1-0}."""
    assert grow_diag_final({(0, 0), (1, 1)}, {(0, 1), (1, 0)}) == {(0, 0), (1, 1)}
    assert grow_diag_final({(0, 1), (1, 0)}, {(0, 0), (1, 1)}) == {(0, 1), (1, 0)}  # the first direction wins


def test_every_head_layer_mean_and_mean_of_all_are_scored():
    layers = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 3, 4))
    names = list(named_maps(layers))
    assert names[:3] == ["layer 1 head 1", "layer 1 head 2", "layer 1 head 3"]
    assert names[-3:] == ["layer 1 mean", "layer 2 mean", "mean of all"] and len(names) == 2 * 3 + 2 + 1
    assert list(named_maps(layers[:1, :1])) == ["attention"]


class KnownAttention(Seq2SeqModel):
    """A model whose attention is known: the decoder step whose input is token y attends only to the source
    position that holds y (the step whose input is BOS, to the source "</s>")."""

    has_attention = True

    def forward(self, src, src_mask, tgt_in, return_attention=False):
        keys = torch.where(tgt_in == self.bos_id, self.eos_id, tgt_in)
        attention = ((keys[:, :, None] == src[:, None, :]) & src_mask[:, None, :]).float()
        return ModelOutput(torch.zeros(*tgt_in.shape, 16), {"cross": attention} if return_attention else {})


def test_shift_att_reads_the_step_whose_input_is_the_target_token():
    """Source ids 5 6 7 8, target 7 5 8 6: target token t sits at source position 2, 0, 3, 1. The step whose input
    is target token t attends to that position, so Shift-Att links exactly those; the unshifted attention reads
    the step that predicts t, whose input is the token before (BOS, 7, 5, 8): each link one token late."""
    source, target = [5, 6, 7, 8], [7, 5, 8, 6]
    forced = force(KnownAttention(), [(source, target)], torch.device("cpu"))[0]
    assert forced.layers.shape == (1, 1, len(target) + 1, len(source) + 1)
    units = [Units([str(i) for i in range(n)], np.eye(n)) for n in (len(source), len(target))]
    explanations = attention_explanations(forced.layers, *units)
    assert extract(explanations[SHIFT_ATT]["attention"], "argmax") == {(2, 0), (0, 1), (3, 2), (1, 3)}
    assert extract(explanations[ATTENTION]["attention"], "argmax") - {(0, 0)} == {(2, 1), (0, 2), (3, 3)}


def test_the_map_is_chosen_on_one_part_and_reported_on_the_other():
    """Map "early" is right on the selection pairs and wrong on the held-out ones, "late" the other way round:
    "early" is chosen, and its held-out AER (1.0) is reported, not the lower AER of "late" there."""
    right = np.array([[1.0, 0.0], [0.0, 1.0]])
    wrong = right[::-1].copy()
    reference = parse_pharaoh("0-0 1-1")
    scorer = AlignmentScorer()
    scorer.add(SELECTION, {"attention": {"early": right, "late": wrong}}, reference)
    scorer.add(HELD_OUT, {"attention": {"early": wrong, "late": right}}, reference)
    report = scorer.report("first half", "second half", {SELECTION: {}, HELD_OUT: {}})
    assert [(row["map"], row["extraction"]) for row in report.chosen] == [
        ("early", "argmax"), ("early", "intersect"), ("early", "grow-diag-final")]
    assert report.best["map"] == "early" and report.best[SELECTION]["aer"] == 0.0
    assert report.best[HELD_OUT]["aer"] == 1.0
    document = report.as_dict()
    assert document["selection"] == "first half" and document["pairs"] == {SELECTION: 1, HELD_OUT: 1}


def test_halves_are_cut_by_line_and_need_two_pairs():
    pairs = [(f"s{i}", f"t{i}") for i in range(5)]
    whole = AlignmentSet("gold.tsv", pairs, [parse_pharaoh("0-0")] * 5)
    first, second = whole.halves()
    assert first.pairs == pairs[:2] and second.pairs == pairs[2:]
    assert first.name == "gold.tsv, first half (pairs 1-2)" and second.name == "gold.tsv, second half (pairs 3-5)"
    with pytest.raises(AlignmentError, match="needs at least 2"):
        AlignmentSet("one.tsv", pairs[:1], [parse_pharaoh("0-0")]).halves()


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


def _alignment_set(corpus_path, count: int = 20) -> AlignmentSet:
    pairs, lines = _diagonal_pairs(corpus_path, count)
    return AlignmentSet("corpus sample", pairs, [parse_pharaoh(line) for line in lines])


def test_score_alignments_of_a_tiny_transformer(checkpoints, corpus_path):
    loaded = load_model(checkpoints["transformer"])
    selection, held_out = _alignment_set(corpus_path).halves()
    report = score_alignments(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, selection, held_out, "zh",
                              "en", torch.device("cpu"))
    for part, alignment_set in ((SELECTION, selection), (HELD_OUT, held_out)):
        assert report.pairs[part] + sum(report.skipped[part].values()) == len(alignment_set.pairs)
    assert sum(report.pairs.values()) >= 18
    maps = {"layer 1 head 1", "layer 1 head 2", "layer 1 mean", "mean of all"}
    assert {(row["explanation"], row["map"]) for row in report.rows} == {
        (explanation, name) for explanation in (ATTENTION, SHIFT_ATT) for name in maps}
    assert len(report.rows) == 2 * 4 * 3 and len(report.chosen) == 2 * 3
    for row in report.chosen:
        rivals = [other for other in report.rows
                  if (other["explanation"], other["extraction"]) == (row["explanation"], row["extraction"])]
        assert row[SELECTION]["aer"] == min(other[SELECTION]["aer"] for other in rivals)
    assert all(0.0 <= row[part]["aer"] <= 1.0 for row in report.rows for part in (SELECTION, HELD_OUT))
    rnn = load_model(checkpoints["rnn"])
    with pytest.raises(AlignmentError, match="has no attention"):
        score_alignments(rnn.model, rnn.src_tokenizer, rnn.tgt_tokenizer, selection, held_out, "zh", "en",
                         torch.device("cpu"))
    past_the_end = AlignmentSet("past the end", held_out.pairs, [parse_pharaoh("99-0")] * len(held_out.pairs))
    with pytest.raises(AlignmentError, match=r"none of the 10 pairs of past the end can be scored \(10 skipped: links"):
        score_alignments(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, selection, past_the_end, "zh",
                         "en", torch.device("cpu"))


def test_validation_skips_alignment_pairs_it_cannot_score(checkpoints, corpus_path, tmp_path, caplog):
    """Every pair skipped: a warning and no AER at that validation, not a crash of the run."""
    from omegaconf import OmegaConf
    from torch.utils.tensorboard import SummaryWriter

    from seq2seq.training.validation import AlignmentValidation

    loaded = load_model(checkpoints["transformer"])
    pairs, lines = _diagonal_pairs(corpus_path, 8)
    (tmp_path / "gold.tsv").write_text("".join(f"{en}\t{zh}\n" for zh, en in pairs), encoding="utf-8")
    cfg = OmegaConf.merge(loaded.config, {"data": {"alignments_path": str(tmp_path / "gold")}})
    with SummaryWriter(str(tmp_path / "board")) as writer:
        (tmp_path / "gold.align").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        validation = AlignmentValidation(cfg, loaded.src_tokenizer, loaded.tgt_tokenizer, torch.device("cpu"))
        assert 0.0 <= validation.log(loaded.model, writer, 5) <= 1.0
        (tmp_path / "gold.align").write_text("99-0\n" * len(pairs), encoding="utf-8")
        validation = AlignmentValidation(cfg, loaded.src_tokenizer, loaded.tgt_tokenizer, torch.device("cpu"))
        assert validation.log(loaded.model, writer, 10) is None
    assert "no alignment AER at step 10: none of the 4 pairs" in caplog.text


def test_evaluate_prints_the_held_out_table_and_writes_json(checkpoints, corpus_path, tmp_path):
    pairs, lines = _diagonal_pairs(corpus_path, 12)
    (tmp_path / "pairs.tsv").write_text("".join(f"{en}\t{zh}\n" for zh, en in pairs), encoding="utf-8")
    (tmp_path / "pairs.align").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    command = [sys.executable, "-m", "seq2seq.evaluate", "--checkpoint", str(checkpoints["bahdanau"]), "--tsv",
               str(tmp_path / "pairs.tsv"), "--alignments", str(tmp_path / "pairs.align"), "--json",
               str(tmp_path / "aer.json")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    tsv = tmp_path / "pairs.tsv"
    assert f"maps chosen on {tsv}, first half (pairs 1-6): " in run.stdout
    assert f"reported on    {tsv}, second half (pairs 7-12): " in run.stdout
    for explanation in ("attention", "shift-att"):
        for method in ("argmax", "intersect", "grow-diag-final"):
            assert f"| {explanation} | {method} | attention | " in run.stdout
    assert "| shift-att | attention | " in run.stdout and "held out: " in run.stdout
    document = json.loads((tmp_path / "aer.json").read_text(encoding="utf-8"))
    assert sum(document["pairs"].values()) + sum(sum(part.values()) for part in document["skipped"].values()) == 12
    assert {row["extraction"] for row in document["rows"]} == {"argmax", "intersect", "grow-diag-final"}
    assert document["best"] in document["chosen"] and not math.isnan(document["best"]["held_out"]["aer"])

    selected = subprocess.run([*command, "--select-on", str(tmp_path / "pairs")], capture_output=True, text=True,
                              timeout=300)
    assert selected.returncode == 0, selected.stderr
    assert f"maps chosen on {tsv}: " in selected.stdout and f"reported on    {tsv}: " in selected.stdout

    (tmp_path / "pairs.align").write_text("99-0\n" * 12, encoding="utf-8")
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    error = run.stderr.splitlines()[-1]
    assert run.returncode == 2 and error.startswith("error: none of the 6 pairs of") and "no attention" not in error
    (tmp_path / "pairs.align").write_text("0-0\n", encoding="utf-8")
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    error = run.stderr.splitlines()[-1]
    assert run.returncode == 2 and error.startswith("error:") and "has 1 lines" in error


def test_evaluate_refuses_alignments_of_a_model_without_attention_before_decoding(checkpoints, tmp_path):
    """The pairs file does not even exist: the refusal comes first, in one line."""
    run = subprocess.run([sys.executable, "-m", "seq2seq.evaluate", "--checkpoint", str(checkpoints["rnn"]), "--tsv",
                          str(tmp_path / "absent.tsv"), "--alignments", str(tmp_path / "absent.align")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "error: --alignments scores attention, and the rnn model has none (its decoder sees the source only "
        "through one fixed context vector, so there is no alignment to draw); score its attributions instead "
        "(--explain integrated-gradients)."]


def test_evaluate_scores_attributions_in_the_same_table(checkpoints, corpus_path, tmp_path, capsys):
    """--explain adds attribution rows beside every attention map, held out like them, and scores the rnn, which
    has no attention."""
    pairs, lines = _diagonal_pairs(corpus_path, 6)
    (tmp_path / "pairs.tsv").write_text("".join(f"{en}\t{zh}\n" for zh, en in pairs), encoding="utf-8")
    (tmp_path / "pairs.align").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for family, methods, expected in (("rnn", ["integrated-gradients"], {"integrated-gradients"}),
                                      ("bahdanau", ["saliency", "input-x-gradient"],
                                       {"attention", "shift-att", "saliency", "input-x-gradient"})):
        arguments = ["--checkpoint", str(checkpoints[family]), "--tsv", str(tmp_path / "pairs.tsv"), "--alignments",
                     str(tmp_path / "pairs.align"), "--json", str(tmp_path / f"{family}.json")]
        assert evaluate.main(arguments + [item for method in methods for item in ("--explain", method)]) == 0
        stdout = capsys.readouterr().out
        for method in methods:
            for extraction in ("argmax", "intersect", "grow-diag-final"):
                assert f"| {method} | {extraction} | source embedding | " in stdout, stdout
        document = json.loads((tmp_path / f"{family}.json").read_text(encoding="utf-8"))
        assert {row["explanation"] for row in document["chosen"]} == expected
        assert all(0.0 <= row[part]["aer"] <= 1.0 for row in document["rows"] for part in (SELECTION, HELD_OUT))
    assert evaluate.main(["--checkpoint", str(checkpoints["rnn"]), "--tsv", str(tmp_path / "pairs.tsv"),
                          "--explain", "saliency"]) == 2
    assert "--explain scores attributions against reference links" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.corpus
def test_training_logs_aer_per_head_at_every_validation(ws):
    """data.alignments_path=X: X.tsv + X.align scored at each validation, maps chosen on the first half and the
    held-out AER of the second in TensorBoard, with every map's AER on the first half."""
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
    assert {tag for tag in tags if tag.startswith("alignment/held_out/")} == {
        f"alignment/held_out/{explanation}/{method}" for explanation in ("attention", "shift-att")
        for method in ("argmax", "intersect", "grow-diag-final")}
    per_map = {tag for tag in tags if tag.startswith("alignment/selection/shift-att/argmax/")}
    assert per_map == {f"alignment/selection/shift-att/argmax/layer_{layer}_head_{head}" for layer in (1, 2)
                       for head in (1, 2)} | {"alignment/selection/shift-att/argmax/layer_1_mean",
                                              "alignment/selection/shift-att/argmax/layer_2_mean",
                                              "alignment/selection/shift-att/argmax/mean_of_all"}
    assert all(0 <= event.value <= 1 for event in accumulator.Scalars("alignment/aer"))

    (ws.root / "gold.align").write_text("0-0\n", encoding="utf-8")
    result = ws.train("model=tiny_transformer", "trainer.max_steps=2", f"data.alignments_path={ws.root / 'gold'}",
                      f"hydra.run.dir={ws.root / 'broken'}")
    assert result.returncode == 2 and "data.alignments_path" in result.stderr


def test_reference_links_count_tokens_as_the_scored_checkpoint_normalises(checkpoints, tmp_path):
    """The config folds the source with NFKC, the checkpoint keeps it as written: scripts/reference_alignments.py
    --checkpoint counts "…" as the one character evaluate will score, not as NFKC's "..." (three)."""
    import importlib.util
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "scripts" / "reference_alignments.py"
    spec = importlib.util.spec_from_file_location("reference_alignments", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    payload = torch.load(checkpoints["transformer"], weights_only=False)
    payload["src_normalization"] = None
    torch.save(payload, tmp_path / "as_written.pt")
    data_cfg = OmegaConf.create(payload["config"]["data"])
    data_cfg.clean.src_normalization = "NFKC"
    form, _ = script.scored_normalizations(tmp_path / "as_written.pt", data_cfg)
    assert form is None and script.aligner_input(["等等…"], True, form) == ["等 等 …"]
    configured, _ = script.scored_normalizations(None, data_cfg)
    assert configured == "NFKC" and script.aligner_input(["等等…"], True, configured) == ["等 等 . . ."]
    data_cfg.src_lang, data_cfg.tgt_lang = "en", "zh"
    with pytest.raises(SystemExit, match="translates zh→en but the config aligns en→zh"):
        script.scored_normalizations(tmp_path / "as_written.pt", data_cfg)
