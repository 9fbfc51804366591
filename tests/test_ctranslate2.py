"""The CTranslate2 export and engine: the exported Transformer decodes as our own search does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import _config, _train, corpus_pairs
from seq2seq import export, translate
from seq2seq.checkpoint import LoadedModel, load_model, save_checkpoint
from seq2seq.config import model_config, saved_config
from seq2seq.data.tokenizer import EOS_ID, PAD_ID, build_tokenizers
from seq2seq.inference.ctranslate2_engine import CTranslate2Decoder
from seq2seq.inference.predict import translate_sentences
from seq2seq.models import build_model

ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (the [ct2] extra) is not installed")

SCORE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def sources(corpus_path) -> dict[str, list[str]]:
    """40 sentences of each language, from pairs the tiny checkpoints were not trained on."""
    pairs = corpus_pairs(corpus_path, 1000)[300:340]
    return {"zh": [zh for zh, _ in pairs], "en": [en for _, en in pairs]}


@pytest.fixture(scope="module")
def en_zh_checkpoint(tmp_path_factory, corpus_path) -> Path:
    """A second configuration: English to Chinese, post-norm, learned positions, one embedding for both sides
    (a joint tokenizer) and the output projection tied to it."""
    pairs = [(en, zh) for zh, en in corpus_pairs(corpus_path)]
    folder = tmp_path_factory.mktemp("en-zh")
    config = _config("transformer")
    config["model"] |= {"norm_first": False, "positional": "learned", "share_embeddings": True}
    config["tokenizer"] |= {"joint": True}
    config["data"] |= {"src_lang": "en", "tgt_lang": "zh"}
    src_tok, tgt_tok = build_tokenizers([en for en, _ in pairs], [zh for _, zh in pairs],
                                        saved_config(config).tokenizer, folder / "cache", ("NFKC", None))
    examples = [{"src_ids": src_tok.encode(en), "tgt_ids": tgt_tok.encode(zh), "index": i}
                for i, (en, zh) in enumerate(pairs)]
    torch.manual_seed(0)
    model = build_model(model_config(config["model"]), src_tok.vocab_size, tgt_tok.vocab_size)
    _train(model, config, examples)
    path = folder / "transformer.pt"
    save_checkpoint(path, {
        "config": config, "model": model.state_dict(), "src_tokenizer": src_tok.proto, "tgt_tokenizer": tgt_tok.proto,
        "src_normalization": "NFKC", "tgt_normalization": None, "step": 60, "epoch": 0, "best_valid_bleu": None,
        "metrics": {},
    })
    return path


def both_engines(checkpoint: Path | LoadedModel, folder: Path, sentences: list[str], quantization: str = "float32",
                 **options) -> tuple[list, list]:
    """Best hypotheses of our search (fp32) and of the CTranslate2 export of `checkpoint`, sentence by sentence."""
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint)
    exported = export.export(loaded, "checkpoint", folder / quantization, quantization)
    compute_type = "int8" if quantization == "int8" else "float32"
    decoder = CTranslate2Decoder(exported, loaded.src_tokenizer, loaded.tgt_tokenizer, torch.device("cpu"),
                                 compute_type, threads=1)
    decoded = []
    for engine in ({}, {"decoder": decoder}):
        translations = translate_sentences(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, sentences,
                                           attention=False, **options, **engine)
        decoded.append([translation.best for translation in translations])
    return decoded[0], decoded[1]


def assert_same(ours: list, theirs: list) -> None:
    for mine, other in zip(ours, theirs, strict=True):
        assert other.pieces == mine.pieces
        assert other.score == pytest.approx(mine.score, abs=SCORE_TOLERANCE)


@pytest.mark.corpus
@pytest.mark.parametrize("beam_size, length_penalty", [(1, 1.0), (4, 0.0)])
def test_export_decodes_as_our_search(checkpoints, sources, tmp_path, beam_size, length_penalty):
    """Greedy, and beam search ranking by log-probability: the same tokens and scores, limits and empty outputs
    included (the tiny model runs into its length limit on some sentences)."""
    ours, theirs = both_engines(checkpoints["transformer"], tmp_path, sources["zh"], beam_size=beam_size,
                                length_penalty=length_penalty)
    assert_same(ours, theirs)


@pytest.mark.corpus
def test_export_of_a_second_configuration(en_zh_checkpoint, sources, tmp_path):
    """Post-norm, learned positions and shared embeddings map as well (en -> zh)."""
    for beam_size in (1, 4):
        ours, theirs = both_engines(en_zh_checkpoint, tmp_path, sources["en"], beam_size=beam_size,
                                    length_penalty=0.0)
        assert_same(ours, theirs)


@pytest.mark.corpus
def test_length_penalty_reranks_as_ours(checkpoints, sources, tmp_path):
    """With the GNMT penalty CTranslate2's beam stops once `beam` hypotheses are finished, ours when none open
    can win: outputs mostly identical (then with equal scores), and where not, ours found the better one."""
    ours, theirs = both_engines(checkpoints["transformer"], tmp_path, sources["zh"], beam_size=4, length_penalty=1.0)
    same = [mine.pieces == other.pieces for mine, other in zip(ours, theirs)]
    assert sum(same) >= 0.8 * len(same)
    for mine, other, identical in zip(ours, theirs, same):
        if identical:
            assert other.score == pytest.approx(mine.score, abs=SCORE_TOLERANCE)
        else:
            assert mine.score >= other.score - SCORE_TOLERANCE


@pytest.mark.corpus
def test_pad_is_never_an_output(checkpoints, sources, tmp_path):
    """A model that favours PAD (its output row twice EOS's): CTranslate2 emits it, the engine decodes those
    sentences again with PAD and BOS suppressed, so the tokens are ours (ours never produces PAD)."""
    loaded = load_model(checkpoints["transformer"])
    with torch.no_grad():
        loaded.model.output_projection.weight[PAD_ID] = 2 * loaded.model.output_projection.weight[EOS_ID]
    ours, theirs = both_engines(loaded, tmp_path, sources["zh"], beam_size=1)
    plain = ctranslate2.Translator(str(tmp_path / "float32")).translate_batch(
        [loaded.src_tokenizer.pieces(loaded.src_tokenizer.encode(sentence)) for sentence in sources["zh"]],
        max_decoding_length=20)
    assert any("<pad>" in output.hypotheses[0] for output in plain)
    assert [other.pieces for other in theirs] == [mine.pieces for mine in ours]


@pytest.mark.corpus
def test_int8_export_translates(checkpoints, sources, tmp_path, capsys):
    """`python -m seq2seq.export --quantization int8` writes a folder CTranslate2 loads; most outputs stay."""
    folder = tmp_path / "int8"
    assert export.main([str(checkpoints["transformer"]), str(folder), "--quantization", "int8"]) == 0
    assert "int8" in capsys.readouterr().err
    assert {"model.bin", "config.json", "source.spm", "target.spm"} <= {path.name for path in folder.iterdir()}
    ours, theirs = both_engines(checkpoints["transformer"], tmp_path, sources["zh"], quantization="int8",
                                beam_size=1)
    assert all(other.pieces for other in theirs)
    assert sum(mine.pieces == other.pieces for mine, other in zip(ours, theirs)) >= len(ours) // 2


@pytest.mark.corpus
def test_translate_engine_option(checkpoints, sources, cache, capsys):
    """`translate --engine ctranslate2` prints what our search prints, from an export cached by content."""
    outputs = []
    for engine in ("torch", "ctranslate2", "ctranslate2"):
        argv = ["--checkpoint", str(checkpoints["transformer"]), "--beam-size", "1", "--precision", "fp32",
                "--engine", engine, *sources["zh"][:8]]
        assert translate.main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(list((cache / "ctranslate2").iterdir())) == 1


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["rnn", "bahdanau"])
def test_other_families_are_refused(checkpoints, tmp_path, capsys, name):
    assert export.main([str(checkpoints[name]), str(tmp_path / "out")]) == 2
    assert translate.main(["--checkpoint", str(checkpoints[name]), "--engine", "ctranslate2", "x"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2
    assert all(line.startswith("error: CTranslate2 export is for the Transformer;") for line in errors)
    assert not (tmp_path / "out").exists()
