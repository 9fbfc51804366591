"""Compare what several trained models attend to on the same sentence: one side-by-side figure and diagnostics.

    python -m seq2seq.inspect --checkpoint rnn.pt --checkpoint bahdanau.pt --checkpoint transformer.pt \\
        我是一个学生。 --out student.png --words --json student.json

Each model translates the sentence with beam search (its checkpoint's test beam unless --beam-size), then the
beam's choice is scored once more with teacher forcing to read the attention of every layer and head (the same
weights the decoder used, see `Seq2SeqModel.forward`). Rows are the target pieces plus the step that emits
"</s>"; columns are the source pieces plus the "</s>" the encoder is given.

What is drawn: Bahdanau's additive attention; for the Transformer the mean over all decoder layers and heads
(--layer N: the mean over the heads of layer N; --heads: one map per head of --layer, default the last layer).
The fixed-context RNN has no attention and gets a panel that says so. --words draws words and CJK characters
instead of SentencePiece pieces (see seq2seq/analysis/diagnostics.py). The diagnostics are computed on words either way, on
the map that is drawn, so models with different vocabularies compare; see `diagnose` for their definitions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seq2seq.analysis import diagnostics as analysis
from seq2seq.inference import search
from seq2seq.atomic import atomic_write
from seq2seq.checkpoint import CheckpointError, LoadedModel, load_model
from seq2seq.cli import UsageError
from seq2seq.data.tokenizer import BOS_ID, EOS_ID
from seq2seq.inference.search import decode
from seq2seq.analysis.plotting import Panel, figure_to_png, side_by_side_figure
from seq2seq.inference.predict import source_token_limit
from seq2seq.runtime import DEVICES, RuntimeSettingError, resolve_device

NO_ATTENTION_NOTE = (
    "no attention:\nthe decoder sees the source only\nthrough the encoder's final state,\n"
    "so there is no alignment to draw"
)


@dataclass
class Inspected:
    """One model's translation of the sentence and its cross-attention, (L, H, T, S) over pieces (None without
    attention; Bahdanau is one layer with one head)."""

    label: str
    family: str
    checkpoint: Path
    translation: str
    src_pieces: list[str]
    tgt_pieces: list[str]
    layers: np.ndarray | None


@dataclass
class View:
    """Which map of a Transformer is drawn: `layer` None = mean of all layers; `heads` = one map per head."""

    layer: int | None = None
    heads: bool = False

    def describe(self) -> str:
        layer = "last layer" if self.layer is None else f"layer {self.layer}"
        if self.heads:
            return f"{layer}, each head"
        return "mean of layers and heads" if self.layer is None else f"{layer}, mean of heads"


def model_label(path: Path, loaded: LoadedModel) -> str:
    """Family and where the checkpoint comes from: `transformer · <run folder>/best.pt` for a run's checkpoint."""
    where = path.name
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        where = f"{path.parent.parent.name}/{path.name}"
    return f"{loaded.config.model.name} · {where}"


def language_pair(loaded: LoadedModel) -> str:
    data = loaded.config.get("data", {}) or {}
    return f"{data.get('src_lang', '?')}→{data.get('tgt_lang', '?')}"


def load_models(paths: Sequence[Path], device: torch.device) -> list[tuple[Path, LoadedModel]]:
    """Every checkpoint, refusing a mix of language pairs (their maps would not share a source sentence)."""
    models = [(path, load_model(path, device=device)) for path in paths]
    pairs = {language_pair(loaded) for _, loaded in models}
    if len(pairs) > 1:
        listing = ", ".join(f"{path} {language_pair(loaded)}" for path, loaded in models)
        raise UsageError(f"the checkpoints translate different language pairs ({listing}); inspect compares models "
                         "of one pair.")
    return models


@torch.inference_mode()
def inspect_model(path: Path, loaded: LoadedModel, sentence: str, beam_size: int | None,
                  device: torch.device) -> Inspected:
    """Beam-search translation of `sentence`, then a teacher-forced pass over it for every layer's attention."""
    model, src_tok, tgt_tok = loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer
    trainer = loaded.config.get("trainer", {}) or {}
    max_len_a = float(trainer.get("max_len_a", search.MAX_LEN_A))
    max_len_b = int(trainer.get("max_len_b", search.MAX_LEN_B))
    ids = src_tok.encode(sentence)[: source_token_limit(model, max_len_a, max_len_b)]
    if not ids:
        raise UsageError("the sentence is empty after normalisation; give a sentence to translate.")
    src = torch.tensor([ids + [EOS_ID]], device=device)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    hypothesis = decode(
        model, src, src_mask, beam_size=beam_size or int(trainer.get("test_beam_size", search.BEAM_SIZE)),
        length_penalty=float(trainer.get("length_penalty", search.LENGTH_PENALTY)), max_len_a=max_len_a,
        max_len_b=max_len_b,
    )[0][0]
    layers = None
    if model.has_attention:
        tgt_in = torch.tensor([[BOS_ID, *hypothesis.tokens]], device=device)
        layers = analysis.layer_head_maps(model(src, src_mask, tgt_in, return_attention=True).attention)
    return Inspected(
        label=model_label(path, loaded), family=str(loaded.config.model.name), checkpoint=path,
        translation=tgt_tok.decode(hypothesis.tokens), src_pieces=src_tok.pieces(ids + [EOS_ID]),
        tgt_pieces=[*tgt_tok.pieces(hypothesis.tokens), analysis.EOS_PIECE], layers=layers,
    )


def check_view(view: View, inspected: Sequence[Inspected]) -> None:
    deepest = max((item.layers.shape[0] for item in inspected if item.layers is not None), default=0)
    if view.layer is not None and not 1 <= view.layer <= deepest:
        raise UsageError(f"--layer {view.layer} is out of range: the deepest model here has {deepest} decoder "
                         "layer(s), numbered from 1.")


def selected_map(layers: np.ndarray, view: View) -> np.ndarray:
    """The (T, S) map the diagnostics describe (and the figure draws unless --heads): see the module doc."""
    if view.layer is None and not view.heads:
        return layers.mean(axis=(0, 1))
    return layers[min(view.layer or layers.shape[0], layers.shape[0]) - 1].mean(axis=0)


def drawn_map(layers: np.ndarray, view: View) -> np.ndarray:
    if view.heads and layers.shape[1] > 1:
        return layers[min(view.layer or layers.shape[0], layers.shape[0]) - 1]
    return selected_map(layers, view)


def comparison_figure(inspected: Sequence[Inspected], sentence: str, view: View, words: bool):
    panels = []
    for item in inspected:
        if item.layers is None:
            panels.append(Panel(item.label, item.translation, [], [], None, NO_ATTENTION_NOTE))
            continue
        matrix = drawn_map(item.layers, view)
        src_labels, tgt_labels = item.src_pieces, item.tgt_pieces
        title = item.label if item.layers.shape[:2] == (1, 1) else f"{item.label} ({view.describe()})"
        if words:
            src_units, tgt_units = analysis.merge_pieces(item.src_pieces), analysis.merge_pieces(item.tgt_pieces)
            matrix = analysis.merge_attention(matrix, src_units, tgt_units)
            src_labels, tgt_labels = src_units.labels, tgt_units.labels
        panels.append(Panel(title, item.translation, src_labels, tgt_labels, matrix))
    return side_by_side_figure(panels, title=sentence)


def _rounded(values) -> list:
    return np.round(np.asarray(values, dtype=np.float64), 4).tolist()


def diagnose(inspected: Sequence[Inspected], view: View, threshold: float) -> list[dict]:
    """Per model, on words (CJK characters) of the drawn map: each target word's entropy (nats; log of the
    number of source words if uniform) and the source word it attends to most; the mean share of weight on the
    source "</s>" and on punctuation; every source word's coverage (attention received over all rows) and those
    below `threshold`; and the mean entropy of every layer and head."""
    reports = []
    for item in inspected:
        report: dict = {"model": item.label, "family": item.family, "checkpoint": str(item.checkpoint),
                        "translation": item.translation, "has_attention": item.layers is not None}
        reports.append(report)
        if item.layers is None:
            continue
        src, tgt = analysis.merge_pieces(item.src_pieces), analysis.merge_pieces(item.tgt_pieces)
        all_maps = analysis.merge_attention(item.layers, src, tgt)
        matrix = analysis.merge_attention(selected_map(item.layers, view), src, tgt)
        received = analysis.coverage(matrix)
        report.update({
            "source_words": src.labels,
            "target_words": tgt.labels,
            "row_entropy": _rounded(analysis.row_entropy(matrix)),
            "uniform_entropy": round(math.log(len(src.labels)), 4),
            "argmax": [src.labels[i] for i in matrix.argmax(axis=-1)],
            "argmax_index": matrix.argmax(axis=-1).tolist(),
            "eos_share": round(float(matrix[:, src.labels.index(analysis.EOS_PIECE)].mean()), 4)
            if analysis.EOS_PIECE in src.labels else 0.0,
            "punctuation_share": round(float(matrix[:, src.is_punctuation].sum(axis=-1).mean()), 4),
            "coverage": _rounded(received),
            "uncovered": [src.labels[i] for i in analysis.uncovered(matrix, src.labels, threshold)],
            "layer_head_entropy": _rounded(analysis.row_entropy(all_maps).mean(axis=-1)),
        })
    return reports


def agreements(reports: Sequence[dict]) -> list[dict]:
    """For every pair of models with attention: `attention.agreement` of their argmax source words, when both
    split the source into the same words (always so for one language pair, whatever the vocabularies)."""
    pairs = []
    for first, second in itertools.combinations([r for r in reports if r["has_attention"]], 2):
        share, compared = None, 0
        if first["source_words"] == second["source_words"]:
            share, compared = analysis.agreement(first["target_words"], first["argmax_index"],
                                                 second["target_words"], second["argmax_index"])
        pairs.append({"models": [first["model"], second["model"]],
                      "agreement": None if share is None else round(share, 4), "compared_words": compared})
    return pairs


def format_table(reports: Sequence[dict], pairs: Sequence[dict], threshold: float) -> str:
    """The diagnostics for a reader: one summary line per model, then its alignment word by word."""
    width = max(len(r["model"]) for r in reports) + 2
    lines = [f"{'model':<{width}}{'entropy':>8}{'uniform':>8}{'</s>':>7}{'punct':>7}  uncovered (< {threshold:g})"]
    for report in reports:
        if not report["has_attention"]:
            lines.append(f"{report['model']:<{width}}  no attention (fixed-context RNN)")
            continue
        lines.append(
            f"{report['model']:<{width}}{np.mean(report['row_entropy']):>8.2f}{report['uniform_entropy']:>8.2f}"
            f"{report['eos_share']:>7.2f}{report['punctuation_share']:>7.2f}  {' '.join(report['uncovered']) or '-'}"
        )
    for report in reports:
        lines.append(f"\n{report['model']}: {report['translation']}")
        if not report["has_attention"]:
            continue
        for word, source, entropy in zip(report["target_words"], report["argmax"], report["row_entropy"]):
            lines.append(f"  {word:<16} → {source:<12} entropy {entropy:.2f}")
        grid = report["layer_head_entropy"]
        if len(grid) > 1 or len(grid[0]) > 1:
            for layer, heads in enumerate(grid, start=1):
                lines.append(f"  layer {layer} mean entropy per head: " + " ".join(f"{h:.2f}" for h in heads))
    if pairs:
        lines.append("\nagreement (share of matched target words with the same argmax source word):")
        for pair in pairs:
            share = "n/a" if pair["agreement"] is None else f"{pair['agreement']:.2f}"
            lines.append(f"  {pair['models'][0]} vs {pair['models'][1]}: {share} over {pair['compared_words']} words")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m seq2seq.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentence", help="the source sentence, e.g. 我是一个学生。")
    parser.add_argument("--checkpoint", action="append", required=True, type=Path,
                        help="a checkpoint; repeat for each model to compare (same language pair)")
    parser.add_argument("--out", type=Path, help="write the side-by-side figure here (PNG)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the diagnostics here as JSON")
    parser.add_argument("--words", action="store_true", help="draw words and CJK characters instead of pieces")
    parser.add_argument("--layer", type=int, help="Transformer: draw this decoder layer (from 1), mean of heads")
    parser.add_argument("--heads", action="store_true",
                        help="Transformer: one map per head of --layer (default: the last layer)")
    parser.add_argument("--coverage-threshold", type=float, default=analysis.COVERAGE_THRESHOLD,
                        help="flag source words that receive less attention than this in total "
                        f"(default {analysis.COVERAGE_THRESHOLD})")
    parser.add_argument("--beam-size", type=int, help="beam width, 1 = greedy (default: each checkpoint's test beam)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto = the GPU when one is visible")
    return parser


def _write(path: Path, data: bytes, option: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            handle.write(data)
    except OSError as error:
        raise UsageError(f"cannot write {option} {path}: {error.strerror or error}.") from error


def run(args: argparse.Namespace) -> None:
    if args.beam_size is not None and args.beam_size < 1:
        raise UsageError(f"--beam-size must be at least 1, got {args.beam_size}.")
    try:
        device = resolve_device(args.device, setting="--device")
    except RuntimeSettingError as error:
        raise UsageError(str(error)) from error
    view = View(args.layer, args.heads)
    models = load_models(args.checkpoint, device)
    inspected = [inspect_model(path, loaded, args.sentence, args.beam_size, device) for path, loaded in models]
    check_view(view, inspected)
    reports = diagnose(inspected, view, args.coverage_threshold)
    pairs = agreements(reports)
    sys.stdout.flush()  # the table goes out as UTF-8 bytes, whatever the locale's encoding
    sys.stdout.buffer.write((format_table(reports, pairs, args.coverage_threshold) + "\n").encode("utf-8"))
    sys.stdout.flush()
    if args.json:
        document = {"sentence": args.sentence, "view": view.describe(),
                    "coverage_threshold": args.coverage_threshold, "models": reports, "agreement": pairs}
        _write(args.json, (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8"), "--json")
    if args.out:
        _write(args.out, figure_to_png(comparison_figure(inspected, args.sentence, view, args.words)), "--out")
        print(f"wrote {args.out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CheckpointError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
