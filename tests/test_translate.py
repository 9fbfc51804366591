"""Translating and evaluating with real (tiny) checkpoints: the CLI contract (one line out per line in, order,
bad input, errors), attention plots, n-best output, and BLEU that matches sacreBLEU on the same outputs.

The checkpoints are the tiny ones of conftest.py's `checkpoints` fixture (skipped without the corpus).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import sacrebleu
import torch
from matplotlib.image import imread

from seq2seq import evaluate as evaluate_cli
from seq2seq import translate as translate_cli
from seq2seq.checkpoint import load_model
from seq2seq.inference.predict import translate_sentences

from conftest import corpus_pairs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SENTENCES = ["我是一个学生。", "", "他昨天去了图书馆。", "你好！", "   ", "我们走吧。"]
@pytest.fixture(scope="session")
def transformer(checkpoints):
    return load_model(checkpoints["transformer"])


def _start(module: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", f"seq2seq.{module}", *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},  # output must be UTF-8 whatever the locale says
    )


def _finish(process: subprocess.Popen, stdin: bytes = b"") -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(stdin, timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _cli(module: str, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return _finish(_start(module, *args), stdin)


def _lines(stdout: bytes) -> list[str]:
    text = stdout.decode("utf-8")
    assert text.endswith("\n") or not text
    return text.split("\n")[:-1]


def _main(capsysbinary, module, *args) -> tuple[int, list[str], str]:
    """Run a CLI in-process (cheaper than a subprocess): exit code, stdout lines, stderr text."""
    code = module.main([str(a) for a in args])
    captured = capsysbinary.readouterr()
    return code, _lines(captured.out), captured.err.decode("utf-8")


# --- translate: the line contract -------------------------------------------------------------------------------

def test_arguments_stdin_and_file_agree(checkpoints, tmp_path):
    ckpt = checkpoints["transformer"]
    stdin = "".join(s + "\n" for s in SENTENCES).encode()
    source = tmp_path / "input.zh"
    source.write_bytes(stdin)
    out = tmp_path / "out" / "output.en"
    # The three start together: most of each run is Python and torch starting up.
    processes = [
        _start("translate", "--checkpoint", ckpt, *SENTENCES),
        _start("translate", "--checkpoint", ckpt),
        _start("translate", "--checkpoint", ckpt, "--input", source, "--output", out, "--chunk-size", "2"),
    ]
    by_args, by_stdin, by_file = (_finish(p, stdin if i == 1 else b"") for i, p in enumerate(processes))
    for run in (by_args, by_stdin, by_file):
        assert run.returncode == 0, run.stderr.decode()
    lines = _lines(by_args.stdout)
    assert lines == _lines(by_stdin.stdout) == _lines(out.read_bytes())
    assert by_file.stdout == b""
    assert len(lines) == len(SENTENCES)
    assert [bool(line) for line in lines] == [bool(s.strip()) for s in SENTENCES]
    assert all(any(ch.isalpha() for ch in line) for line in lines if line)


def test_bad_input_never_crashes(checkpoints, capsysbinary, monkeypatch, caplog):
    lines = [
        b"\xff\xfe\xc3( broken utf-8 \xe6\x88",
        "学".encode() * 10_000,
        b"",
        "😀 Hello 學生們 mixed ABC 123 ½ ﬁ".encode(),
        "我".encode() * 300 + "很好".encode(),
        b"\r",
        "最后一行没有换行".encode(),  # no final newline
    ]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n".join(lines))))
    with caplog.at_level(logging.WARNING):
        code, out, err = _main(capsysbinary, translate_cli, "--checkpoint", checkpoints["transformer"],
                               "--beam-size", "2")
    assert code == 0, err
    assert len(out) == len(lines)
    assert [bool(line) for line in out] == [True, True, False, True, True, False, True]
    assert len([r for r in caplog.records if "truncated" in r.getMessage()]) == 1
    warned = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert warned == ["stdin line 1 is not valid UTF-8: its bad bytes are translated as U+FFFD"]


def test_empty_input_gives_empty_output(checkpoints, capsysbinary, monkeypatch):
    for stdin, expected in ((b"", []), (b"\n\n", ["", ""])):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        assert _main(capsysbinary, translate_cli, "--checkpoint", checkpoints["transformer"])[:2] == (0, expected)


def test_interactive_prompts_go_to_stderr(checkpoints, capsysbinary, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好\n我是一个学生。\nquit\n".encode())))
    code, out, err = _main(capsysbinary, translate_cli, "--checkpoint", checkpoints["transformer"], "--interactive")
    assert code == 0 and len(out) == 2 and not any(line.startswith(">") for line in out)
    assert err.count("> ") == 3


def test_missing_checkpoint_exits_2_without_traceback(tmp_path):
    path = tmp_path / "runs" / "best.pt"
    run = _cli("translate", "--checkpoint", path, "你好")
    stderr = run.stderr.decode()
    assert run.returncode == 2 and run.stdout == b""
    assert str(path) in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("problem, says", [
    ("truncated", "truncated or damaged"), ("empty", "is empty"), ("text", "not a seq2seq checkpoint"),
    ("plain_pickle", "not a seq2seq checkpoint"), ("foreign_pickle", "not a seq2seq checkpoint"), ("folder", "folder"),
])
def test_unusable_checkpoint_exits_2_naming_the_file(checkpoints, tmp_path, capsysbinary, problem, says):
    path = tmp_path / f"{problem}.pt"
    if problem == "truncated":
        data = checkpoints["transformer"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif problem == "empty":
        path.write_bytes(b"")
    elif problem == "text":
        path.write_text("this is not a checkpoint\n")
    elif problem == "plain_pickle":
        path.write_bytes(pickle.dumps({"weights": [0.0, 1.0]}))
    elif problem == "foreign_pickle":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.mkdir()
    for module in (translate_cli, evaluate_cli):
        sentences = ["你好"] if module is translate_cli else []
        code, out, err = _main(capsysbinary, module, "--checkpoint", path, *sentences)
        assert (code, out) == (2, [])
        assert str(path) in err and says in err
        assert len(err.strip().splitlines()) == 1
        assert "weights_only" not in err and "torch.load" not in err  # our words, never torch's advice


# --- translate: attention, n-best --------------------------------------------------------------------------------

def test_attention_plot_is_a_png(checkpoints, tmp_path, capsysbinary):
    plot = tmp_path / "heat.png"
    code, out, err = _main(capsysbinary, translate_cli, "--checkpoint", checkpoints["transformer"],
                           "--attention-plot", plot, "--show-attention", "我是一个学生。")
    assert code == 0 and len(out) == 1
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC)
    image = imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    assert "→" in err and "</s>" in err and any(shade in err for shade in "░▒▓█")


def test_attention_plots_into_a_folder_one_per_sentence(checkpoints, tmp_path, capsysbinary):
    folder = tmp_path / "plots"
    code, out, _ = _main(capsysbinary, translate_cli, "--checkpoint", checkpoints["bahdanau"],
                         "--attention-plot", folder, "我是一个学生。", "", "你好！")
    assert code == 0 and len(out) == 3
    assert sorted(p.name for p in folder.iterdir()) == ["0001.png", "0003.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in folder.iterdir())


def test_rnn_says_it_has_no_attention(checkpoints, tmp_path, capsysbinary):
    plot = tmp_path / "rnn.png"
    code, out, err = _main(capsysbinary, translate_cli, "--checkpoint", checkpoints["rnn"],
                           "--attention-plot", plot, "我是一个学生。")
    assert code == 0 and len(out) == 1 and out[0]
    assert "no attention" in err
    assert not plot.exists()


def test_n_best_prints_k_sorted_hypotheses(checkpoints, capsysbinary):
    code, out, _ = _main(capsysbinary, translate_cli, "--checkpoint", checkpoints["transformer"],
                         "--n-best", "3", "我是一个学生。", "他昨天去了图书馆。")
    assert code == 0
    assert len(out) == 6
    rows = [line.split("\t") for line in out]
    assert all(len(row) == 3 for row in rows)
    for group in (rows[:3], rows[3:]):
        assert [int(rank) for rank, _, _ in group] == [1, 2, 3]
        scores = [float(score) for _, score, _ in group]
        assert scores == sorted(scores, reverse=True)
        assert len({text for _, _, text in group}) == 3


# --- predict: streaming, order, truncation -----------------------------------------------------------------------

def test_streaming_keeps_order_and_reads_lazily(transformer):
    sentences = ["我是一个学生。", "你好", "", "他昨天去了图书馆，然后回家了。", "我们走吧。", "谢谢"] * 2
    pulled = []

    def source():
        for sentence in sentences:
            pulled.append(sentence)
            yield sentence

    stream = translate_sentences(transformer.model, transformer.src_tokenizer, transformer.tgt_tokenizer, source(),
                                 beam_size=2, chunk_size=4, max_tokens=12)
    first = next(stream)
    assert len(pulled) == 4  # one chunk read, not the whole input
    streamed = [first, *stream]
    whole = list(translate_sentences(transformer.model, transformer.src_tokenizer, transformer.tgt_tokenizer,
                                     sentences, beam_size=2, chunk_size=1000))
    assert [t.source for t in streamed] == sentences
    assert [t.text for t in streamed] == [t.text for t in whole]
    assert [bool(t.text) for t in whole] == [bool(s) for s in sentences]


def test_empty_sentences_do_not_call_the_model(transformer, monkeypatch):
    import seq2seq.inference.predict as predict

    calls = []
    monkeypatch.setattr(predict, "decode", lambda *a, **k: calls.append(1) or [])
    result = list(translate_sentences(transformer.model, transformer.src_tokenizer, transformer.tgt_tokenizer,
                                      ["", "  ", "\t"]))
    assert calls == [] and [t.text for t in result] == ["", "", ""]


def test_long_inputs_truncated_with_one_warning(transformer, caplog):
    with caplog.at_level(logging.WARNING, logger="seq2seq.inference.predict"):
        result = list(translate_sentences(transformer.model, transformer.src_tokenizer, transformer.tgt_tokenizer,
                                          ["学生" * 500, "你好", "图书馆" * 400], beam_size=1))
    assert [t.truncated for t in result] == [True, False, True]
    assert len([r for r in caplog.records if "truncated" in r.getMessage()]) == 1
    assert len(result[0].src_pieces) <= transformer.config.model.max_positions


def test_attention_matches_pieces(transformer):
    (translation,) = translate_sentences(transformer.model, transformer.src_tokenizer, transformer.tgt_tokenizer,
                                         ["我是一个学生。"], beam_size=3)
    best = translation.best
    assert translation.src_pieces[-1] == "</s>"
    assert best.attention.shape == (len(best.attention_pieces), len(translation.src_pieces))
    assert torch.allclose(best.attention.sum(dim=1), torch.ones(best.attention.shape[0]), atol=1e-3)


def test_bf16_outputs_stay_sane(transformer, corpus_path):
    """bf16 autocast decodes what fp32 decodes, up to near-ties: a tiny model's repetitive outputs have many, so
    most (not all) sentences agree, with sequence scores within a few per cent."""
    sentences = ["我是一个学生。", "你好！"] + [zh for zh, _ in corpus_pairs(corpus_path, 40)[:20]]
    args = (transformer.model, transformer.src_tokenizer, transformer.tgt_tokenizer, sentences)
    fp32 = list(translate_sentences(*args, beam_size=1))
    bf16 = list(translate_sentences(*args, beam_size=1, precision="bf16"))
    assert all(t.text for t in bf16) and len(bf16) == len(fp32)
    agree = [(a.best.score, b.best.score) for a, b in zip(fp32, bf16) if a.text == b.text]
    assert len(agree) >= 0.6 * len(sentences)
    assert all(abs(a - b) <= 0.05 * abs(a) + 0.05 for a, b in agree)
    assert [t.text for t in bf16[:2]] == [t.text for t in fp32[:2]]
    assert next(transformer.model.parameters()).dtype == torch.float32


# --- evaluate ----------------------------------------------------------------------------------------------------

def test_evaluate_matches_sacrebleu_on_a_copied_checkpoint(checkpoints, corpus_path, tmp_path, capsysbinary):
    alone = tmp_path / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    shutil.copy(checkpoints["transformer"], alone)
    pairs = corpus_pairs(corpus_path, 40)[5:25]
    src, ref = tmp_path / "test.zh", tmp_path / "test.en"
    src.write_text("".join(zh + "\n" for zh, _ in pairs), encoding="utf-8")
    ref.write_text("".join(en + "\n" for _, en in pairs), encoding="utf-8")
    hyps, scores = tmp_path / "hyps.en", tmp_path / "scores.json"
    code, out, err = _main(capsysbinary, evaluate_cli, "--checkpoint", alone, "--src", src, "--ref", ref,
                           "--beam-size", "2", "--output", hyps, "--json", scores)
    assert code == 0, err
    result = json.loads(scores.read_text(encoding="utf-8"))
    hypotheses = hyps.read_text(encoding="utf-8").splitlines()
    references = [en for _, en in pairs]
    assert len(hypotheses) == len(pairs) == result["sentences"]
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    assert "tok:13a" in result["bleu_signature"]
    assert sum(row["count"] for row in result["by_length"]) == len(pairs)
    printed = "\n".join(out)
    assert result["bleu_signature"] in printed and "BLEU by source length" in printed

    code, translated, _ = _main(capsysbinary, translate_cli, "--checkpoint", alone, "--beam-size", "2",
                                "--input", src)
    assert translated == hypotheses


def test_evaluate_tsv_is_kept_whole(checkpoints, corpus_path, tmp_path, capsysbinary):
    """Evaluation files are scored as given: duplicates and empty sides stay; a line without its columns is an error."""
    pairs = corpus_pairs(corpus_path, 40)[:12]
    lines = [f"{en}\t{zh}\tCC-BY 2.0 (France) Attribution: tatoeba.org" for zh, en in pairs]
    lines += [lines[0], f"{pairs[1][1]}\t"]  # a duplicate and an empty source side
    tsv = tmp_path / "extra.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    scores, hyps = tmp_path / "scores.json", tmp_path / "hyps.txt"
    code, _, err = _main(capsysbinary, evaluate_cli, "--checkpoint", checkpoints["bahdanau"], "--tsv", tsv,
                         "--beam-size", "1", "--json", scores, "--output", hyps)
    assert code == 0, err
    result = json.loads(scores.read_text())
    hypotheses = hyps.read_text(encoding="utf-8").split("\n")[:-1]
    references = [line.split("\t")[0] for line in lines]  # as written, the duplicate included
    assert result["sentences"] == len(hypotheses) == len(lines)
    assert hypotheses[-1] == "" and hypotheses[len(pairs)] == hypotheses[0]  # empty source; duplicate alike
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)

    tsv.write_text("\n".join(lines + ["a line without any tab"]) + "\n", encoding="utf-8")
    code, out, err = _main(capsysbinary, evaluate_cli, "--checkpoint", checkpoints["bahdanau"], "--tsv", tsv)
    assert (code, out) == (2, [])
    assert f"line {len(lines) + 1}" in err and "Traceback" not in err


@pytest.mark.corpus
def test_evaluate_rebuilds_the_test_split(checkpoints, tmp_path, capsysbinary):
    scores = tmp_path / "scores.json"
    code, out, err = _main(capsysbinary, evaluate_cli, "--checkpoint", checkpoints["transformer"], "--split", "test",
                           "--limit", "15", "--beam-size", "1", "--json", scores)
    assert code == 0, err
    result = json.loads(scores.read_text())
    assert result["sentences"] == 15 and result["data"] == "test split of tatoeba_zh_en"


def test_evaluate_reports_misaligned_files(checkpoints, tmp_path, capsysbinary):
    src, ref = tmp_path / "a.zh", tmp_path / "b.en"
    src.write_text("你好\n谢谢\n", encoding="utf-8")
    ref.write_text("Hello.\n", encoding="utf-8")
    code, out, err = _main(capsysbinary, evaluate_cli, "--checkpoint", checkpoints["transformer"],
                           "--src", src, "--ref", ref)
    assert code == 2 and out == []
    assert "2 lines" in err and str(ref) in err
