"""The attention inspector: word merging keeps rows distributions, the diagnostics mean what they say, and
`python -m seq2seq.inspect` draws the three tiny checkpoints of conftest.py side by side with legible Chinese."""

from __future__ import annotations

import io
import json
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from seq2seq import inspect as inspect_cli
from seq2seq.analysis import inspection as inspect_lib
from seq2seq.analysis.diagnostics import (agreement, chinese_segmenter, merge_attention, merge_pieces, row_entropy,
                                          uncovered)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SENTENCE = "我是一个学生。"
ZH = ["▁我", "是", "一个", "学生", "。", "</s>"]
EN = ["▁I", "'", "m", "▁a", "▁stud", "ent", ".", "</s>"]


def _rows(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(cols), size=rows)


def test_english_merges_into_words_and_chinese_splits_into_characters():
    assert merge_pieces(EN).labels == ["I'm", "a", "student", ".", "</s>"]
    assert merge_pieces(ZH).labels == ["我", "是", "一", "个", "学", "生", "。", "</s>"]
    assert merge_pieces(["▁", "▁iPhone", "很", "好", "▁"]).labels == ["iPhone", "很", "好"]


def test_merged_rows_still_sum_to_one():
    src, tgt = merge_pieces(ZH), merge_pieces(EN)
    merged = merge_attention(_rows(len(EN), len(ZH)), src, tgt)
    assert merged.shape == (len(tgt.labels), len(src.labels))
    np.testing.assert_allclose(merged.sum(axis=-1), 1.0, atol=1e-9)
    stacked = np.stack([_rows(len(EN), len(ZH), seed) for seed in range(6)]).reshape(2, 3, len(EN), len(ZH))
    layers = merge_attention(stacked, src, tgt)
    np.testing.assert_allclose(layers.sum(axis=-1), 1.0, atol=1e-9)


def test_merging_sums_sources_and_averages_targets():
    attention = np.zeros((len(EN), len(ZH)))
    attention[4, 3] = 1.0  # "▁stud" -> "学生"
    attention[5, 0] = 1.0  # "ent" -> "▁我"
    merged = merge_attention(attention, merge_pieces(ZH), merge_pieces(EN))
    student = merged[2]  # the average of its two pieces' rows; 学生's weight split between 学 and 生
    np.testing.assert_allclose(student[[0, 4, 5]], [0.5, 0.25, 0.25])


def test_uniform_row_has_entropy_log_n_and_a_peak_zero():
    np.testing.assert_allclose(row_entropy(np.full((3, 7), 1 / 7)), math.log(7))
    assert row_entropy(np.eye(4)).tolist() == [0.0] * 4


def test_coverage_flags_the_source_word_that_is_skipped():
    labels = ["我", "是", "学", "生", "。", "</s>"]
    attention = np.full((5, 6), 0.02)
    for row, column in enumerate([0, 1, 3, 4, 5]):  # 学 never gets more than the background
        attention[row, column] = 0.9
    attention /= attention.sum(axis=1, keepdims=True)
    assert [labels[i] for i in uncovered(attention, labels, 0.3)] == ["学"]
    assert uncovered(np.full((6, 6), 1 / 6), labels, 0.3) == []


def _one_hot(indices: list[int], width: int = 4) -> np.ndarray:
    return np.eye(width)[indices]


def test_agreement_compares_matched_target_words_only():
    result = agreement(["I", "am", "</s>"], _one_hot([0, 1, 2]), ["I", "am", "</s>"], _one_hot([0, 2, 2]))
    assert (result["agreement"], result["overlap"], result["compared"]) == (0.5, 0.5, 2)
    result = agreement(["I", "am", "a", "student"], _one_hot([0, 1, 2, 3]), ["I", "'m", "a", "student"],
                       _one_hot([0, 1, 3, 3]))
    assert result["compared"] == 3 and result["agreement"] == pytest.approx(2 / 3)
    assert agreement(["yes"], _one_hot([0]), ["no"], _one_hot([0]))["agreement"] is None


def test_agreement_does_not_flip_on_a_near_tie():
    """The issue's 学生 (source words 我 是 学 生): one model on 学, the other on 学 and 生 about equally."""
    first = np.array([[0.0, 0.0, 0.9, 0.1]])
    second = np.array([[0.02, 0.02, 0.47, 0.49]])
    result = agreement(["student"], first, ["student"], second)
    assert first.argmax() != second.argmax() and result["agreement"] == 1.0
    assert result["overlap"] == pytest.approx(0.57)
    far = np.array([[0.0, 0.0, 0.2, 0.8]])
    assert agreement(["student"], first, ["student"], far)["agreement"] == 0.0


def test_chinese_words_come_from_the_segmenter_with_characters_as_fallback(monkeypatch):
    from seq2seq.analysis import diagnostics

    pytest.importorskip("jieba", reason="jieba (the [zh] extra) is not installed")
    words = diagnostics.merge_words(ZH)
    assert words.labels == ["我", "是", "一个", "学生", "。", "</s>"]
    np.testing.assert_allclose(words.shares.sum(axis=1), 1.0)
    np.testing.assert_allclose(words.shares[3], [0, 0, 0, 1, 0, 0])  # the piece "学生" is the word 学生
    monkeypatch.setattr(diagnostics, "chinese_segmenter", lambda: None)
    assert diagnostics.merge_words(ZH).labels == merge_pieces(ZH).labels


def _inspect(capsysbinary, *args) -> tuple[int, str, str]:
    code = inspect_cli.main([str(a) for a in args])
    captured = capsysbinary.readouterr()
    return code, captured.out.decode("utf-8"), captured.err.decode("utf-8")


def _three(checkpoints) -> list:
    return [arg for name in ("rnn", "bahdanau", "transformer") for arg in ("--checkpoint", checkpoints[name])]


def test_three_models_side_by_side_with_chinese_glyphs(checkpoints, tmp_path, capsysbinary, caplog):
    out, report = tmp_path / "student.png", tmp_path / "student.json"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        code, stdout, stderr = _inspect(capsysbinary, *_three(checkpoints), SENTENCE, "--out", out, "--words",
                                        "--json", report)
    assert code == 0, stderr
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower()], messages  # every glyph, Chinese included, drawn
    png = out.read_bytes()
    assert png.startswith(PNG_MAGIC) and imread(io.BytesIO(png), format="png").shape[1] > 600
    document = json.loads(report.read_text(encoding="utf-8"))
    rnn, bahdanau, transformer = document["models"]
    assert rnn["has_attention"] is False and "no attention" in stdout
    expected = ["我", "是", "一个", "学生", "。", "</s>"] if chinese_segmenter() else list("我是一个学生。") + ["</s>"]
    assert bahdanau["source_words"] == transformer["source_words"] == expected
    assert len(transformer["layer_head_entropy"]) == 1 and len(transformer["layer_head_entropy"][0]) == 2
    assert [p["models"] for p in document["agreement"]] == [[bahdanau["model"], transformer["model"]]]
    for model in (bahdanau, transformer):
        assert len(model["row_entropy"]) == len(model["target_words"])
        assert max(model["row_entropy"]) <= model["uniform_entropy"] + 1e-6
        assert model["model"] in stdout


def test_explain_draws_and_reports_attributions_for_every_family(checkpoints, tmp_path, capsysbinary):
    out, report = tmp_path / "why.png", tmp_path / "why.json"
    code, stdout, stderr = _inspect(capsysbinary, *_three(checkpoints), SENTENCE, "--reference", "I am a student.",
                                    "--explain", "attention", "--explain", "integrated-gradients", "--out", out,
                                    "--json", report)
    assert code == 0, stderr
    png = out.read_bytes()
    assert png.startswith(PNG_MAGIC)
    document = json.loads(report.read_text(encoding="utf-8"))
    assert document["explain"] == ["attention", "integrated-gradients"]
    for model in document["models"]:  # the rnn too, which has no attention
        explained = model["attributions"]["integrated-gradients"]
        weights = np.array(explained["weights"])
        assert weights.shape == (len(model["target_words"]), len(model["source_words"]))
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-3)
        assert explained["argmax"] == [model["source_words"][i] for i in weights.argmax(axis=1)]
    assert "integrated-gradients → " in stdout
    both = imread(io.BytesIO(png), format="png").shape  # a row of 3 models per explanation: 2 rows
    _inspect(capsysbinary, *_three(checkpoints), SENTENCE, "--reference", "I am a student.", "--out", out)
    attention_only = imread(io.BytesIO(out.read_bytes()), format="png").shape
    assert both[0] > 1.5 * attention_only[0] and both[1] < 1.5 * attention_only[1]
    with pytest.raises(SystemExit) as refused:
        _inspect(capsysbinary, "--checkpoint", checkpoints["rnn"], SENTENCE, "--explain", "gradcam")
    assert refused.value.code == 2 and "invalid choice: 'gradcam'" in capsysbinary.readouterr().err.decode()


def test_heads_and_layer_views(checkpoints, tmp_path, capsysbinary):
    transformer = checkpoints["transformer"]
    code, _, stderr = _inspect(capsysbinary, "--checkpoint", transformer, "--checkpoint", checkpoints["bahdanau"],
                               SENTENCE, "--heads", "--layer", "1", "--out", tmp_path / "heads.png")
    assert code == 0, stderr
    assert (tmp_path / "heads.png").read_bytes().startswith(PNG_MAGIC)
    code, _, stderr = _inspect(capsysbinary, "--checkpoint", transformer, SENTENCE, "--layer", "5")
    assert code == 2 and "--layer 5" in stderr and stderr.count("\n") == 1
    code, stdout, stderr = _inspect(capsysbinary, "--checkpoint", transformer, SENTENCE, "--layer", "1", "--head", "2",
                                    "--json", tmp_path / "head.json")
    assert code == 0, stderr
    assert "h1 " in stdout and "h2 " in stdout and "h0" not in stdout  # heads counted from 1, like layers
    assert json.loads((tmp_path / "head.json").read_text(encoding="utf-8"))["view"] == "layer 1, head 2"
    code, _, stderr = _inspect(capsysbinary, "--checkpoint", transformer, SENTENCE, "--head", "3")
    assert code == 2 and "--head 3" in stderr and "numbered from 1" in stderr


def test_reference_is_forced_and_scored(checkpoints, tmp_path, capsysbinary):
    from seq2seq.checkpoint import load_model
    from seq2seq.inference.forced import force

    report = tmp_path / "forced.json"
    code, stdout, stderr = _inspect(capsysbinary, *_three(checkpoints), SENTENCE, "--reference", "I am a student.",
                                    "--json", report)
    assert code == 0, stderr
    assert "reference (forced): I am a student." in stdout
    models = json.loads(report.read_text(encoding="utf-8"))["models"]
    assert all(model["forced"] and model["translation"] == "I am a student." for model in models)
    loaded = load_model(checkpoints["transformer"])
    expected = force(loaded.model, [(loaded.src_tokenizer.encode(SENTENCE), loaded.tgt_tokenizer.encode(
        "I am a student."))], "cpu")[0].loss
    assert models[2]["loss"] == pytest.approx(expected, abs=1e-3)
    assert models[2]["target_words"][:4] == ["I", "am", "a", "student"]


def test_pairs_file_gives_one_report_and_figure_per_pair(checkpoints, tmp_path, capsysbinary):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("I am a student.\t我是一个学生。\nHe went to the library yesterday.\t他昨天去了图书馆。\n",
                     encoding="utf-8")
    code, stdout, stderr = _inspect(capsysbinary, "--checkpoint", checkpoints["bahdanau"], "--pairs", pairs,
                                    "--json", tmp_path / "pairs.json", "--out", tmp_path / "pair.png")
    assert code == 0, stderr
    documents = json.loads((tmp_path / "pairs.json").read_text(encoding="utf-8"))["pairs"]
    assert [d["sentence"] for d in documents] == ["我是一个学生。", "他昨天去了图书馆。"]
    assert [d["models"][0]["translation"] for d in documents] == ["I am a student.", "He went to the library yesterday."]
    assert all((tmp_path / f"pair_{n}.png").read_bytes().startswith(PNG_MAGIC) for n in (1, 2))
    code, _, stderr = _inspect(capsysbinary, "--checkpoint", checkpoints["bahdanau"], "--pairs", pairs, SENTENCE)
    assert code == 2 and "--pairs brings its own sentences" in stderr


def test_a_2000_character_sentence_warns_where_it_is_cut_and_stays_readable(checkpoints, tmp_path, capsysbinary):
    sentence = ("我是一个学生。" * 300)[:2000]
    out = tmp_path / "long.png"
    code, _, stderr = _inspect(capsysbinary, "--checkpoint", checkpoints["bahdanau"], "--checkpoint",
                               checkpoints["transformer"], sentence, "--out", out, "--words",
                               "--json", tmp_path / "long.json")
    assert code == 0, stderr
    warnings_ = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 2 and all("source pieces; the sentence is cut before" in w for w in warnings_)
    models = json.loads((tmp_path / "long.json").read_text(encoding="utf-8"))["models"]
    assert all(model["source_pieces_cut"] > 0 for model in models)
    height, width = imread(io.BytesIO(out.read_bytes()), format="png").shape[:2]
    columns = 2 * inspect_lib.MAX_FIGURE_UNITS
    assert width / columns >= 12 and height >= 12 * min(inspect_lib.MAX_FIGURE_UNITS, 20)  # cells of 12+ pixels


def test_a_reference_past_the_models_positions_is_cut_with_a_warning(checkpoints, tmp_path, capsysbinary):
    """The tiny Transformer has 64 target positions (BOS and 63 pieces): a longer reference is forced up to there
    and the user is told how much is left out."""
    reference = "I am a student. " * 30
    code, _, stderr = _inspect(capsysbinary, "--checkpoint", checkpoints["transformer"], SENTENCE, "--reference",
                               reference, "--json", tmp_path / "cut.json")
    assert code == 0, stderr
    model = json.loads((tmp_path / "cut.json").read_text(encoding="utf-8"))["models"][0]
    assert model["target_pieces"] == 64 and model["reference_pieces_cut"] > 0  # 63 pieces and "</s>"
    warning = next(line for line in stderr.splitlines() if line.startswith("warning:"))
    assert (f"has target positions for the first 63 of {63 + model['reference_pieces_cut']} reference pieces; the "
            "rest is not forced") in warning


@pytest.mark.parametrize("problem", ["missing", "garbage"])
def test_unusable_checkpoint_is_one_line_and_exit_2(checkpoints, tmp_path, problem):
    path = tmp_path / "broken.pt"
    if problem == "garbage":
        path.write_text("not a checkpoint\n")
    run = subprocess.run([sys.executable, "-m", "seq2seq.inspect", "--checkpoint", str(checkpoints["rnn"]),
                          "--checkpoint", str(path), SENTENCE], capture_output=True, timeout=300)
    assert run.returncode == 2
    stderr = run.stderr.decode("utf-8")
    assert stderr.startswith("error:") and str(path) in stderr and stderr.count("\n") == 1


def test_language_pairs_must_match(checkpoints, tmp_path, capsysbinary):
    import torch

    payload = torch.load(checkpoints["bahdanau"], weights_only=False)
    payload["config"]["data"] = {**payload["config"]["data"], "src_lang": "en", "tgt_lang": "zh"}
    flipped = tmp_path / "en_zh.pt"
    torch.save(payload, flipped)
    code, _, stderr = _inspect(capsysbinary, "--checkpoint", checkpoints["transformer"], "--checkpoint", flipped,
                               SENTENCE)
    assert code == 2 and "different language pairs" in stderr


class _RecordingWriter:
    """Stands in for a SummaryWriter: keeps the scalars, ignores images and text."""

    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = value

    def add_image(self, *args, **kwargs) -> None:
        pass

    def add_text(self, *args, **kwargs) -> None:
        pass


def test_validation_logs_entropy_per_layer_and_head_and_coverage(checkpoints):
    from seq2seq.training import board
    from seq2seq.checkpoint import load_model

    loaded = load_model(checkpoints["transformer"])
    writer = _RecordingWriter()
    board.log_attention(writer, loaded.model, "transformer", loaded.src_tokenizer, loaded.tgt_tokenizer,
                        [SENTENCE, "他昨天去了图书馆。"], "cpu", 1.2, 10, step=7)
    assert set(writer.scalars) == {
        "attention/entropy", "attention/uncovered_share",
        "attention/entropy_by_head/layer_1_head_1", "attention/entropy_by_head/layer_1_head_2",
    }
    assert 0 <= writer.scalars["attention/uncovered_share"] <= 1
    assert 0 < writer.scalars["attention/entropy"] <= math.log(len(SENTENCE) + 1)


def test_compare_script_draws_the_attention_examples(checkpoints, tmp_path):
    import torch

    for name in ("rnn", "bahdanau", "transformer"):
        run_dir = tmp_path / "runs" / "tatoeba_zh_en" / name / "2026-01-01_00-00-00"
        (run_dir / "checkpoints").mkdir(parents=True)
        payload = torch.load(checkpoints[name], weights_only=False)
        payload["config"]["attention_examples"] = [SENTENCE]
        torch.save(payload, run_dir / "checkpoints" / "best.pt")
        (run_dir / "results.json").write_text(json.dumps({
            "data": "tatoeba_zh_en", "model": name, "parameters": 1000, "train_minutes": 1.0, "steps": 60,
            "target_tokens_per_s": 100.0, "valid_bleu": 1.0, "valid_chrf": 2.0, "test_bleu": 1.0, "test_chrf": 2.0,
            "test_bleu_by_length": [{"bucket": "1-4", "bleu": 1.0, "count": 3}],
        }))
    (tmp_path / "gold.tsv").write_text("I am a student.\t我是一个学生。\nHe is ill.\t他病了。\n", encoding="utf-8")
    (tmp_path / "gold.align").write_text("0-0 1-1 2-2 3-2 4-3 5-3 6-3\n0-0 1-2 2-2 3-2\n", encoding="utf-8")
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), "--alignments", str(tmp_path / "gold")],
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    figure = tmp_path / "runs" / "attention_tatoeba_zh_en_0.png"
    assert figure.read_bytes().startswith(PNG_MAGIC)
    markdown = (tmp_path / "runs" / "comparison.md").read_text(encoding="utf-8")
    assert f"### tatoeba_zh_en: {SENTENCE}" in markdown and "no attention" in markdown
    assert "## Alignment error rate of the attention" in markdown and "| rnn | no attention |" in markdown
    assert "| model | chosen on the first half | extraction | held-out AER |" in markdown
    assert "| bahdanau | attention, attention |" in markdown or "| bahdanau | shift-att, attention |" in markdown
    assert "| transformer | attention, layer 1 " in markdown or "| transformer | shift-att, layer 1 " in markdown
    assert list((tmp_path / "runs" / "comparison").glob("events.out.tfevents.*"))
