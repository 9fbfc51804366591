"""What the trainer shows in TensorBoard: its scalar curves, the layout TensorBoard opens on (its CUSTOM SCALARS
tab: valid BLEU, loss, tokens/s and resident memory of every run, one chart each), sample translations, attention heatmaps, the test
scores as a text summary and the HPARAMS row (figures of one point each, never scalar charts). Figures go through the
shared PNG renderer (the one `translate --attention-plot` uses), so TensorBoard and the command line show the same
pictures.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from seq2seq.analysis.diagnostics import training_summary
from seq2seq.config import RunConfig
from seq2seq.data.tokenizer import EOS_ID, Tokenizer
from seq2seq.inference.forced import attend
from seq2seq.models.base import NO_ATTENTION, Seq2SeqModel
from seq2seq.analysis.plotting import attention_figure, figure_to_png, head_grid_figure
from seq2seq.inference.predict import source_token_limit

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

ATTENTION_SAMPLE_TOKENS = (3, 30)  # source lengths drawn as heatmaps: long enough to be interesting, short to read

# What users compare across runs (`tensorboard --logdir runs`, CUSTOM SCALARS tab): each chart draws the scalar
# tags its regular expressions match, for every run; the trainer and validation write these tags.
COMPARISON_LAYOUT: dict[str, dict[str, list]] = {
    "compare runs": {
        "valid BLEU": ["Multiline", [r"^valid/bleu$"]],
        "loss (train and valid)": ["Multiline", [r"^train/loss$", r"^valid/loss$"]],
        "target tokens/s": ["Multiline", [r"^train/tokens_per_s$"]],
        "resident memory (GiB)": ["Multiline", [r"^system/resident_gib$", r"^system/peak_resident_gib$"]],
    },
}


def open_writer(run_dir: Path, purge_step: int | None = None) -> SummaryWriter:
    """The run's event writer; a new run's starts with the comparison layout. `purge_step` (a resume) drops the
    interrupted run's events from that step on, so the curves go on without a fold; its layout stays."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
    if purge_step is None:
        writer.add_custom_scalars(COMPARISON_LAYOUT)
    return writer


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def attention_sources(sources: Sequence[str], source_ids: Sequence[Sequence[int]], wanted: int,
                      examples: Sequence[str]) -> list[str]:
    """Fixed sentences drawn at every validation: the first `wanted` sources of readable length, then the
    configured examples (e.g. 我是一个学生。)."""
    low, high = ATTENTION_SAMPLE_TOKENS
    picked: list[str] = []
    for source, ids in zip(sources, source_ids):
        if len(picked) >= wanted:
            break
        if low <= len(ids) <= high:
            picked.append(source)
    return picked + [str(s) for s in examples]


def log_samples(writer: SummaryWriter, sources: list[str], references: list[str], hypotheses: list[str],
                step: int, limit: int) -> None:
    rows = ["| # | source | reference | hypothesis |", "|---|---|---|---|"]
    for i, (src, ref, hyp) in enumerate(zip(sources, references, hypotheses)):
        if i >= limit:
            break
        rows.append(f"| {i} | {_markdown_cell(src)} | {_markdown_cell(ref)} | {_markdown_cell(hyp)} |")
    writer.add_text("valid/samples", "\n".join(rows), step)


def add_figure(writer: SummaryWriter, tag: str, figure, step: int) -> None:
    image = np.asarray(Image.open(io.BytesIO(figure_to_png(figure))).convert("RGB"))
    writer.add_image(tag, image, step, dataformats="HWC")


def log_attention(writer: SummaryWriter, model: Seq2SeqModel, model_name: str, src_tok: Tokenizer,
                  tgt_tok: Tokenizer, sentences: list[str], device: torch.device, max_len_a: float, max_len_b: int,
                  step: int) -> None:
    """Greedy translations of the fixed sentences with the attention behind them (`forced.attend`), drawn per
    layer and per head of the last layer, and their word-level entropy (per layer and head) and coverage as
    scalars, averaged over the sentences."""
    if not model.has_attention:
        writer.add_text(
            "attention",
            f"The {model_name} model has no attention: {NO_ATTENTION}.",
            step,
        )
        return
    limit = source_token_limit(model, max_len_a, max_len_b)
    summaries = []
    for i, sentence in enumerate(sentences):
        ids = src_tok.encode(sentence)[:limit]
        if not ids:
            continue
        result = attend(model, ids, device, beam_size=1, length_penalty=1.0, max_len_a=max_len_a,
                        max_len_b=max_len_b)
        src_pieces = src_tok.pieces(ids + [EOS_ID])
        tgt_pieces = tgt_tok.pieces(result.tokens) + ["</s>"]
        title = f"{sentence} → {tgt_tok.decode(result.tokens)}"
        tag = f"attention/{i:02d}"
        summaries.append(training_summary(result.layers, src_pieces, tgt_pieces))
        layers = result.layers
        if layers.shape[:2] == (1, 1):  # Bahdanau: one map
            add_figure(writer, tag, attention_figure(layers[0, 0], src_pieces, tgt_pieces, title), step)
            continue
        for layer, heads in enumerate(layers, start=1):
            figure = attention_figure(heads.mean(0), src_pieces, tgt_pieces, f"{title} (layer {layer}, mean of heads)")
            add_figure(writer, f"{tag}/layer_{layer}", figure, step)
        figure = head_grid_figure(layers[-1], src_pieces, tgt_pieces, f"{title} (layer {len(layers)} heads)")
        add_figure(writer, f"{tag}/heads_layer_{len(layers)}", figure, step)
    if summaries:
        log_attention_scalars(writer, summaries, step)


def log_attention_scalars(writer: SummaryWriter, summaries: list[dict], step: int) -> None:
    """Curves of how sharp the attention gets (entropy in nats, words as units) and how much of the source it
    leaves untouched (share of source words whose coverage is under the inspector's default threshold)."""
    writer.add_scalar("attention/entropy", float(np.mean([s["entropy"] for s in summaries])), step)
    writer.add_scalar("attention/uncovered_share", float(np.mean([s["uncovered_share"] for s in summaries])), step)
    grid = np.mean([s["layer_head_entropy"] for s in summaries], axis=0)
    if grid.size > 1:
        for (layer, head), value in np.ndenumerate(grid):
            writer.add_scalar(f"attention/entropy_by_head/layer_{layer + 1}_head_{head + 1}", float(value), step)


def log_alignment(writer: SummaryWriter, report: dict, step: int) -> None:
    """Attention AER against data.alignments_path (`AlignmentReport.as_dict()`), held-out figures only where a
    choice was made: `alignment/aer` of the explanation, map and extraction chosen on the selection part,
    `alignment/held_out/<explanation>/<extraction>` of each extraction's chosen map; and each map's own AER on
    the selection part (`alignment/selection/<explanation>/<extraction>/layer_1_head_2`, heads from 1), so
    TensorBoard shows which head learns to align and when."""
    best = report["best"]
    writer.add_scalar("alignment/aer", best["held_out"]["aer"], step)
    writer.add_text("alignment/best", f"{best['explanation']}, {best['map']} with {best['extraction']}: held-out "
                    f"AER {100 * best['held_out']['aer']:.1f} % on {report['held_out']} (chosen on "
                    f"{report['selection']}, where it scored {100 * best['selection']['aer']:.1f} %)", step)
    for row in report["chosen"]:
        writer.add_scalar(f"alignment/held_out/{row['explanation']}/{row['extraction']}", row["held_out"]["aer"], step)
    for row in report["rows"]:
        name = row["map"].replace(" ", "_")
        writer.add_scalar(f"alignment/selection/{row['explanation']}/{row['extraction']}/{name}",
                          row["selection"]["aer"], step)


def log_test(writer: SummaryWriter, scores: dict[str, Any], buckets: list[dict[str, Any]], step: int) -> None:
    """Test BLEU/chrF and BLEU by source length as one text summary: figures of one point each, which as scalar
    charts would crowd out the curves (the HPARAMS row carries test BLEU and chrF too)."""
    rows = [f"test BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}", "",
            "| source tokens | sentences | BLEU |", "|---|---|---|"]
    for bucket in buckets:
        rows.append(f"| {bucket['bucket']} | {bucket['count']} | {bucket['bleu']:.2f} |")
    writer.add_text("test/scores", "\n".join(rows), step)


def log_training(writer: SummaryWriter, step: int, **scalars: float) -> None:
    """The training curves of one logging interval, under train/ (loss, lr, grad_norm, tokens_per_s, ...)."""
    for name, value in scalars.items():
        writer.add_scalar(f"train/{name}", value, step)


def log_memory(writer: SummaryWriter, step: int, resident_gib: float, peak_gib: float) -> None:
    """Resident memory of the training process now and its peak so far (runtime.resident_memory), under system/."""
    writer.add_scalar("system/resident_gib", resident_gib, step)
    writer.add_scalar("system/peak_resident_gib", peak_gib, step)


def log_hparams(writer: SummaryWriter, cfg: RunConfig, results: dict[str, Any], step: int) -> None:
    """One HPARAMS row per run, in the run's own folder, so TensorBoard lines variants up side by side."""
    hparams: dict[str, Any] = {"model": results["model"], "data": results["data"], "params": results["parameters"]}
    for key, value in asdict(cfg.model).items():
        if key != "name":
            hparams[f"model.{key}"] = _hparam_value(value)
    for key in ("lr", "schedule", "warmup_steps", "weight_decay"):
        hparams[f"optim.{key}"] = _hparam_value(getattr(cfg.optim, key))
    for key in ("max_tokens", "accumulate", "label_smoothing", "grad_clip", "seed"):
        hparams[f"trainer.{key}"] = _hparam_value(getattr(cfg.trainer, key))
    hparams["precision"] = results["precision"]
    metrics = {
        "hparam/valid_bleu": float(results["valid_bleu"] or 0.0),
        "hparam/test_bleu": float(results["test_bleu"] or 0.0),
        "hparam/test_chrf": float(results["test_chrf"] or 0.0),
        "hparam/train_minutes": float(results["train_minutes"]),
        "hparam/params": float(results["parameters"]),
    }
    writer.add_hparams(hparams, metrics, run_name=".", global_step=step)
