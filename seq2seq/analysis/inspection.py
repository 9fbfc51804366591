"""The inspector's library: load several checkpoints of one language pair, read each model's attention on a
sentence (its own translation, or a given reference by forced decoding), diagnose it on words and compare the
models. `seq2seq.inspect` (command line, HTML page, local server) and `scripts/compare.py` are built on it.

Rows of a map are the target pieces plus the step that emits "</s>"; columns are the source pieces plus the
"</s>" the encoder is given. A `View` picks the map that is drawn and diagnosed: for the Transformer the mean
over all decoder layers and heads, one layer (mean of its heads), one head, or every head of a layer; layers and
heads are numbered from 1. Bahdanau's single additive attention is its map in every view. The fixed-context
RNN has no attention. Beside attention, gradient attributions (seq2seq/analysis/attribution.py: saliency,
input x gradient, integrated gradients) explain the same target over the same source tokens, for every family.

A model's own translation comes from `search.explore`, which also records the search (the beam tree and the
top-k words of every step, `Inspected.search`) and can force a target prefix first; the page draws it.
"""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seq2seq.analysis import diagnostics as analysis
from seq2seq.analysis.attribution import ATTENTION, attributions
from seq2seq.analysis.plotting import Panel, side_by_side_figure
from seq2seq.checkpoint import LoadedModel, load_model
from seq2seq.errors import UsageError
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.inference import search
from seq2seq.inference.forced import attend
from seq2seq.inference.predict import source_token_limit
from seq2seq.models.base import NO_ATTENTION, Seq2SeqModel

NO_ATTENTION_NOTE = "no attention:\n" + textwrap.fill(NO_ATTENTION, 34)  # a figure panel's lines
MAX_FIGURE_UNITS = 60  # rows and columns drawn per heatmap: beyond this a PNG cell is too small to read
NOT_A_NUMBER = ("the search finished no translation: the model's scores are not numbers (NaN), its weights have "
                "diverged; load an earlier checkpoint")


@dataclass
class Inspected:
    """One model on one sentence: the target it produced (`forced`: the given reference instead), its
    cross-attention (L, H, T, S) over pieces (None without attention), the loss of that target (nats, summed
    over its pieces and "</s>"), the source pieces cut off by the model's length limit (`cut`, 0 if none), the
    reference pieces beyond its target positions, not forced (`reference_cut`, 0 if none), and the (T, S) piece
    map of every attribution method asked for (`attribution.attributions`)."""

    label: str
    family: str
    checkpoint: Path
    sentence: str
    translation: str
    src_pieces: list[str]
    tgt_pieces: list[str]
    layers: np.ndarray | None
    forced: bool = False
    loss: float = 0.0
    cut: int = 0
    cut_before: str = ""
    reference_cut: int = 0
    attributions: dict[str, np.ndarray] = field(default_factory=dict)
    search: dict | None = None
    prefix: str | None = None


@dataclass
class View:
    """Which map of a Transformer is drawn and diagnosed: `layer`/`head` from 1 (None: mean of all layers, or of
    the heads of `layer`; a `head` without `layer` is in the last layer); `heads`: one map per head of `layer`."""

    layer: int | None = None
    head: int | None = None
    heads: bool = False

    def describe(self) -> str:
        layer = "last layer" if self.layer is None else f"layer {self.layer}"
        if self.heads:
            return f"{layer}, each head"
        if self.head is not None:
            return f"{layer}, head {self.head}"
        return "mean of layers and heads" if self.layer is None else f"{layer}, mean of heads"


def model_label(path: Path, loaded: LoadedModel) -> str:
    """Family and where the checkpoint comes from: `transformer · <run folder>/best.pt` for a run's checkpoint."""
    where = path.name
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        where = f"{path.parent.parent.name}/{path.name}"
    return f"{loaded.config.model.name} · {where}"


def language_pair(loaded: LoadedModel) -> str:
    return f"{loaded.config.data.src_lang}→{loaded.config.data.tgt_lang}"


def load_models(paths: Sequence[Path], device: torch.device) -> list[tuple[Path, LoadedModel]]:
    """Every checkpoint, refusing a mix of language pairs (their maps would not share a source sentence)."""
    models = [(path, load_model(path, device=device)) for path in paths]
    pairs = {language_pair(loaded) for _, loaded in models}
    if len(pairs) > 1:
        listing = ", ".join(f"{path} {language_pair(loaded)}" for path, loaded in models)
        raise UsageError(f"the checkpoints translate different language pairs ({listing}); inspect compares models "
                         "of one pair.")
    return models


def search_document(tree: search.SearchTree, tokenizer: Tokenizer) -> dict:
    """A recorded search as JSON for the page: its nodes with pieces, probabilities and scores (rounded)."""
    def probability(log_prob: float) -> float:
        return round(math.exp(log_prob), 4)

    nodes = [{
        "id": node.index, "parent": node.parent, "step": node.step, "token": node.token,
        "piece": "<s>" if node.token is None else tokenizer.pieces([node.token])[0],
        "p": probability(node.log_prob), "score": round(node.score, 4),
        "final": None if node.final_score is None else round(node.final_score, 4), "forced": node.forced,
        "attention": None if node.attention is None else rounded(node.attention),
        "next": [{"token": token, "piece": piece, "p": probability(log_prob)} for (token, log_prob), piece
                 in zip(node.next_words or [], tokenizer.pieces(t for t, _ in node.next_words or []))],
    } for node in tree.nodes]
    return {"beam_size": tree.beam_size, "prefix_length": tree.prefix_length, "best_path": tree.best_path,
            "nodes": nodes, "note": NOT_A_NUMBER if tree.best is None else None}


def _prefix_ids(model: Seq2SeqModel, tokenizer: Tokenizer, prefix: str | Sequence[int]) -> list[int]:
    ids = tokenizer.encode(prefix) if isinstance(prefix, str) else list(prefix)
    words = range(model.eos_id + 1, tokenizer.vocab_size)
    if any(i not in words for i in ids):
        raise UsageError(f"the prefix ids must be target pieces of this model ({words.start}..{words.stop - 1}).")
    return ids


def inspect_model(path: Path, loaded: LoadedModel, sentence: str, beam_size: int | None, device: torch.device,
                  reference: str | None = None, methods: Sequence[str] = (),
                  prefix: str | Sequence[int] | None = None, top_k: int = search.TOP_K) -> Inspected:
    """The model's translation of `sentence` (beam search, its checkpoint's test beam unless `beam_size`, with
    `prefix` forced first: text or target piece ids) or, with `reference`, that reference by forced decoding;
    then every layer's attention behind it and the attributions of each of `methods` (attribution.METHODS)."""
    model, src_tok, tgt_tok = loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer
    trainer = loaded.config.trainer  # a checkpoint older than a key has the schema's default for it
    max_len_a, max_len_b = trainer.max_len_a, trainer.max_len_b
    all_ids = src_tok.encode(sentence)
    ids = all_ids[: source_token_limit(model, max_len_a, max_len_b)]
    if not ids:
        raise UsageError("the sentence is empty after normalisation; give a sentence to translate.")
    tree, prefix_ids = None, _prefix_ids(model, tgt_tok, prefix or ())
    if reference is not None:
        reference_ids = tgt_tok.encode(reference)
        if not reference_ids:
            raise UsageError("the reference is empty after normalisation; give the translation to force.")
    else:
        src = torch.tensor([[*ids, model.eos_id]], device=device)
        try:
            tree = search.explore(
                model, src, torch.ones_like(src, dtype=torch.bool), beam_size=beam_size or trainer.test_beam_size,
                length_penalty=trainer.length_penalty, max_len_a=max_len_a, max_len_b=max_len_b, prefix=prefix_ids,
                top_k=top_k,
            )
        except ValueError as error:  # a prefix the model cannot read
            raise UsageError(f"{model_label(path, loaded)}: {error}.") from None
        reference_ids = tree.best.tokens if tree.best is not None else []
    result = attend(model, ids, device, reference_ids=reference_ids)
    return Inspected(
        label=model_label(path, loaded), family=loaded.config.model.name, checkpoint=path, sentence=sentence,
        translation=tgt_tok.decode(result.tokens), src_pieces=src_tok.pieces([*ids, model.eos_id]),
        tgt_pieces=[*tgt_tok.pieces(result.tokens), analysis.EOS_PIECE], layers=result.layers,
        forced=reference is not None, loss=result.loss, cut=len(all_ids) - len(ids),
        cut_before=src_tok.decode(all_ids[len(ids): len(ids) + 8]), reference_cut=result.cut,
        attributions={method: attributions(model, ids, result.tokens, method).cpu().numpy() for method in methods},
        search=None if tree is None else search_document(tree, tgt_tok),
        prefix=tgt_tok.decode(prefix_ids) if prefix_ids else None,
    )


def truncation_warning(item: Inspected) -> str | None:
    """A line for the user when the model could read only the start of the sentence, or force only the start of
    the reference."""
    warnings = []
    if item.cut:
        kept = len(item.src_pieces) - 1
        warnings.append(f"reads the first {kept} of {kept + item.cut} source pieces; the sentence is cut before "
                        f"“{item.cut_before}…”. Give a shorter sentence to see all of it")
    if item.reference_cut:
        kept = len(item.tgt_pieces) - 1
        warnings.append(f"has target positions for the first {kept} of {kept + item.reference_cut} reference "
                        "pieces; the rest is not forced. Give a shorter reference to see all of it")
    return f"warning: {item.label} " + "; it ".join(warnings) + "." if warnings else None


def check_view(view: View, inspected: Sequence[Inspected]) -> None:
    shapes = [item.layers.shape for item in inspected if item.layers is not None]
    deepest = max((shape[0] for shape in shapes), default=0)
    widest = max((shape[1] for shape in shapes), default=0)
    if view.layer is not None and not 1 <= view.layer <= deepest:
        raise UsageError(f"--layer {view.layer} is out of range: the deepest model here has {deepest} decoder "
                         "layer(s), numbered from 1.")
    if view.head is not None and not 1 <= view.head <= widest:
        raise UsageError(f"--head {view.head} is out of range: the models here have at most {widest} head(s) per "
                         "layer, numbered from 1.")


def _layer(layers: np.ndarray, view: View) -> np.ndarray:
    """(H, T, S) maps of the view's layer (the last one by default, and for models with fewer layers)."""
    return layers[min(view.layer or layers.shape[0], layers.shape[0]) - 1]


def selected_map(layers: np.ndarray, view: View) -> np.ndarray:
    """The (T, S) map the diagnostics describe (and the figure draws unless `view.heads`)."""
    if view.layer is None and view.head is None and not view.heads:
        return layers.mean(axis=(0, 1))
    heads = _layer(layers, view)
    if view.head is not None:
        return heads[min(view.head, heads.shape[0]) - 1]
    return heads.mean(axis=0)


def drawn_map(layers: np.ndarray, view: View) -> np.ndarray:
    if view.heads and layers.shape[1] > 1:
        return _layer(layers, view)
    return selected_map(layers, view)


def _panel(title: str, item: Inspected, matrix: np.ndarray, words: bool) -> tuple[Panel, bool]:
    """A heatmap panel of one (T, S) or (H, T, S) piece map of `item`, on words when asked; cut to its first
    MAX_FIGURE_UNITS rows and columns (and said so in its title) beyond that. Also whether it was cut."""
    src_labels, tgt_labels = item.src_pieces, item.tgt_pieces
    if words:
        src_units, tgt_units = analysis.merge_words(item.src_pieces), analysis.merge_words(item.tgt_pieces)
        matrix = analysis.merge_attention(matrix, src_units, tgt_units)
        src_labels, tgt_labels = src_units.labels, tgt_units.labels
    if max(len(src_labels), len(tgt_labels)) <= MAX_FIGURE_UNITS:
        return Panel(title, item.translation, src_labels, tgt_labels, matrix), False
    title = f"{title} ({len(tgt_labels)}×{len(src_labels)}, first {MAX_FIGURE_UNITS} drawn)"
    src_labels, tgt_labels = src_labels[:MAX_FIGURE_UNITS], tgt_labels[:MAX_FIGURE_UNITS]
    matrix = matrix[..., : len(tgt_labels), : len(src_labels)]
    return Panel(title, item.translation, src_labels, tgt_labels, matrix), True


def comparison_figure(inspected: Sequence[Inspected], title: str, view: View, words: bool,
                      explanations: Sequence[str] = (ATTENTION,)):
    """The models side by side, a row of panels per explanation (their attention in `view`, or an attribution
    method that `inspect_model` computed); a map with more than MAX_FIGURE_UNITS rows or columns shows its first
    ones and says so in its title (the HTML page and the JSON keep all of them)."""
    panels, cut = [], False
    for explanation in explanations:
        for item in inspected:
            if explanation != ATTENTION:
                panel, panel_cut = _panel(f"{item.label} · {explanation}", item, item.attributions[explanation],
                                          words)
            elif item.layers is None:
                panel, panel_cut = Panel(item.label, item.translation, [], [], None, NO_ATTENTION_NOTE), False
            else:
                label = item.label if len(explanations) == 1 else f"{item.label} · {ATTENTION}"
                described = label if item.layers.shape[:2] == (1, 1) else f"{label} ({view.describe()})"
                panel, panel_cut = _panel(described, item, drawn_map(item.layers, view), words)
            panels.append(panel)
            cut = cut or panel_cut
    if cut:
        title = f"[maps cut to their first {MAX_FIGURE_UNITS} rows and columns; see --html or --json for all] {title}"
    scale = "attention weight" if list(explanations) == [ATTENTION] else "weight (each row sums to 1)"
    return side_by_side_figure(panels, title=title, scale=scale, columns=len(inspected))


def rounded(values) -> list:
    return np.round(np.asarray(values, dtype=np.float64), 4).tolist()


def diagnose(inspected: Sequence[Inspected], view: View, threshold: float) -> list[dict]:
    """Per model, on words (`diagnostics.merge_words`) of the selected map: the map itself (`weights`, rows =
    target words), each target word's entropy (nats; log of the number of source words if uniform) and the
    source word it attends to most; the mean share of weight on the source "</s>" and on punctuation; every
    source word's coverage (attention received over all rows) and those below `threshold`; and the mean
    entropy of every layer and head. Each attribution method's word map (`attributions`: its `weights` and
    the source word each target word owes most to, `argmax`), for models with or without attention."""
    reports = []
    for item in inspected:
        src, tgt = analysis.merge_words(item.src_pieces), analysis.merge_words(item.tgt_pieces)
        report: dict = {"model": item.label, "family": item.family, "checkpoint": str(item.checkpoint),
                        "translation": item.translation, "forced": item.forced, "loss": round(item.loss, 4),
                        "target_pieces": len(item.tgt_pieces), "source_pieces_cut": item.cut,
                        "reference_pieces_cut": item.reference_cut,
                        "has_attention": item.layers is not None, "source_words": src.labels,
                        "target_words": tgt.labels, "attributions": {}}
        for method, pieces in item.attributions.items():
            matrix = analysis.merge_attention(pieces, src, tgt)
            report["attributions"][method] = {"weights": rounded(matrix),
                                              "argmax": [src.labels[i] for i in matrix.argmax(axis=-1)]}
        reports.append(report)
        if item.layers is None:
            continue
        all_maps = analysis.merge_attention(item.layers, src, tgt)
        matrix = analysis.merge_attention(selected_map(item.layers, view), src, tgt)
        received = analysis.coverage(matrix)
        report.update({
            "weights": rounded(matrix),
            "row_entropy": rounded(analysis.row_entropy(matrix)),
            "uniform_entropy": round(math.log(len(src.labels)), 4),
            "argmax": [src.labels[i] for i in matrix.argmax(axis=-1)],
            "argmax_index": matrix.argmax(axis=-1).tolist(),
            "eos_share": round(float(matrix[:, src.labels.index(analysis.EOS_PIECE)].mean()), 4)
            if analysis.EOS_PIECE in src.labels else 0.0,
            "punctuation_share": round(float(matrix[:, src.is_punctuation].sum(axis=-1).mean()), 4),
            "coverage": rounded(received),
            "uncovered": [src.labels[i] for i in analysis.uncovered(matrix, src.labels, threshold)],
            "layer_head_entropy": rounded(analysis.row_entropy(all_maps).mean(axis=-1)),
        })
    return reports


def agreements(reports: Sequence[dict], tolerance: float = analysis.AGREEMENT_TOLERANCE) -> list[dict]:
    """For every pair of models with attention: `diagnostics.agreement` of their word maps, when both split the
    source into the same words (always so for one language pair, whatever the vocabularies)."""
    pairs = []
    for first, second in itertools.combinations([r for r in reports if r["has_attention"]], 2):
        result: dict = {"agreement": None, "overlap": None, "compared": 0}
        if first["source_words"] == second["source_words"]:
            result = analysis.agreement(first["target_words"], first["weights"], second["target_words"],
                                        second["weights"], tolerance)
        pairs.append({"models": [first["model"], second["model"]],
                      "agreement": None if result["agreement"] is None else round(result["agreement"], 4),
                      "overlap": None if result["overlap"] is None else round(result["overlap"], 4),
                      "compared_words": result["compared"], "tolerance": tolerance})
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
        what = "reference (forced)" if report["forced"] else "translation"
        lines.append(f"\n{report['model']}: {what}: {report['translation']}  (loss {report['loss']:.2f} nats)")
        if report["has_attention"] or report["attributions"]:
            for row, word in enumerate(report["target_words"]):
                line = f"  {word:<16}"
                if report["has_attention"]:
                    line += f" → {report['argmax'][row]:<12} entropy {report['row_entropy'][row]:.2f}"
                lines.append(line + "".join(f"  {method} → {maps['argmax'][row]}"
                                            for method, maps in report["attributions"].items()))
        if not report["has_attention"]:
            continue
        grid = report["layer_head_entropy"]
        if len(grid) > 1 or len(grid[0]) > 1:
            for layer, heads in enumerate(grid, start=1):
                lines.append(f"  layer {layer} mean entropy per head: "
                             + " ".join(f"h{head} {value:.2f}" for head, value in enumerate(heads, start=1)))
    if pairs:
        lines.append("\nagreement (matched target words whose argmax source words match, or nearly tie within "
                     f"{pairs[0]['tolerance']:g}) and overlap (mean shared attention mass):")
        for pair in pairs:
            share = "n/a" if pair["agreement"] is None else f"{pair['agreement']:.2f}"
            overlap = "n/a" if pair["overlap"] is None else f"{pair['overlap']:.2f}"
            lines.append(f"  {pair['models'][0]} vs {pair['models'][1]}: agreement {share}, overlap {overlap} "
                         f"over {pair['compared_words']} words")
    return "\n".join(lines)


@dataclass
class Inspection:
    """Every model on one sentence: what each produced, their diagnostics and their pairwise agreement."""

    sentence: str
    reference: str | None
    inspected: list[Inspected]
    reports: list[dict]
    agreement: list[dict]


def inspect_sentence(models: Sequence[tuple[Path, LoadedModel]], sentence: str, reference: str | None,
                     view: View, threshold: float, beam_size: int | None, device: torch.device,
                     methods: Sequence[str] = (), prefix: str | None = None,
                     prefix_ids: Sequence[int] | None = None, prefix_model: int | None = None,
                     top_k: int = search.TOP_K) -> Inspection:
    """`inspect_model` for every model (with the attributions of `methods`), then `diagnose` and `agreements` on
    the selected view. A target prefix is forced on every model: `prefix` text, or `prefix_ids` (pieces of model
    number `prefix_model`, from 0), which the other models get as text."""
    prefixes: list[str | Sequence[int] | None] = [prefix] * len(models)
    if prefix_ids is not None:
        if prefix_model is None or not 0 <= prefix_model < len(models):
            raise UsageError(f"the prefix belongs to model {prefix_model}, but the models are numbered 0.."
                             f"{len(models) - 1}.")
        text = models[prefix_model][1].tgt_tokenizer.decode(prefix_ids)
        prefixes = [prefix_ids if number == prefix_model else text for number in range(len(models))]
    inspected = [inspect_model(path, loaded, sentence, beam_size, device, reference, methods, forced, top_k)
                 for (path, loaded), forced in zip(models, prefixes)]
    check_view(view, inspected)
    reports = diagnose(inspected, view, threshold)
    return Inspection(sentence, reference, inspected, reports, agreements(reports))
