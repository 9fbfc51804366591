"""Alignment error rate (AER) of attention-derived word alignments against reference alignments, for every
Transformer decoder layer and head, the layer means, the mean of all, and Bahdanau's attention, each read as is
and shifted; the map and extraction are chosen on one part of the pairs and reported on another.

Reference alignments are in Pharaoh format: one line per sentence pair, space-separated links `i-j` (sure) or
`i?j` (possible), `i` indexing the source side (the checkpoint's `data.src_lang`) and `j` the target side,
from 0. Indices count the tokens of a side: the space-separated words of a language written with spaces, every
character (punctuation included, spaces excepted) of Chinese or Japanese (CHARACTER_LANGUAGES), which any
aligner can produce without a segmenter. Texts are taken as the side's tokenizer normalises them
(data.clean.src_normalization / tgt_normalization, NFKC by default); a pair whose pieces do not spell the same
tokens, or whose links point past them, is skipped and counted.

Attention to alignment. The model is forced to produce the reference target (`inference.forced.force`), the
"</s>" column is dropped and the piece map is merged into a token map (`diagnostics.merge_attention`: a source
token's weight sums its pieces', a target token's row averages its pieces' rows). Two explanations come of it
(`attention_explanations`): "attention", the step that predicts each target token, and "shift-att", the step
that reads it as its input (Chen et al. 2020). Links come out of a (target tokens x source tokens) map by one
of EXTRACTIONS:
  - `argmax`: every target token linked to the source token it attends to most;
  - `intersect`: the links that are also the argmax of their source token's column (both directions agree);
  - `grow-diag-final`: both directions symmetrised as Koehn et al. (2005) define it (`grow_diag_final`).
Scores are pooled over the pairs (Och & Ney 2003), with A the predicted links, S the sure and P the possible
ones (P includes S): precision |A∩P|/|A|, recall |A∩S|/|S|, AER = 1 - (|A∩S| + |A∩P|) / (|A| + |S|).

Honest figures. The minimum over dozens of maps and extractions, taken on the pairs it is scored on, flatters
every model. So the pairs come in two parts (`AlignmentSet.halves`, or another set to choose on): per
explanation and extraction the map with the lowest AER on the SELECTION part is chosen, and its AER on the
HELD_OUT part is the figure reported (`AlignmentReport.chosen`, `.best`). Other explanations are scored the same
way: `AlignmentScorer.add` takes any explanation's maps by name. Gradient attributions (`methods`, see
seq2seq/analysis/attribution.py) are explanations of their own, one map each (SOURCE_EMBEDDING, where they are
taken) whose rows are the steps that predict each target token, as ATTENTION's; they score the fixed-context
RNN, which has no attention, too.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seq2seq.analysis.attribution import ATTENTION, attributions
from seq2seq.analysis.diagnostics import Units, merge_attention, piece_texts
from seq2seq.checkpoint import LoadedModel
from seq2seq.config import DataConfig
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.errors import UsageError
from seq2seq.inference import search
from seq2seq.inference.forced import force, target_token_limit
from seq2seq.inference.predict import source_token_limit
from seq2seq.models.base import NO_ATTENTION, Seq2SeqModel

CHARACTER_LANGUAGES = frozenset({"zh", "ja", "cmn", "yue", "wuu", "lzh"})
EXTRACTIONS = ("argmax", "intersect", "grow-diag-final")
LINK = re.compile(r"^(\d+)([-?])(\d+)$")
SHIFT_ATT = "shift-att"  # the step that reads a target token as its input (ATTENTION: the one that predicts it)
SOURCE_EMBEDDING = "source embedding"  # the one map of an attribution method: where it is taken
SELECTION, HELD_OUT = "selection", "held_out"  # the part of the pairs maps are chosen on; the part reported
PARTS = (SELECTION, HELD_OUT)

Link = tuple[int, int]  # (source token, target token)
Maps = dict[str, np.ndarray]  # one pair's maps of one explanation: name -> (target tokens, source tokens) weights


class AlignmentError(UsageError):
    """A reference alignment file that cannot be used; the message says which line and why."""


@dataclass(frozen=True)
class Reference:
    """One pair's reference links: `sure` S and `possible` P, with S ⊆ P."""

    sure: frozenset[Link]
    possible: frozenset[Link]


def parse_pharaoh(line: str, where: str = "line") -> Reference:
    """`0-0 1-2 2?3`: sure links with "-", possible ones with "?" (a sure link is also possible)."""
    sure, possible = set(), set()
    for token in line.split():
        match = LINK.match(token)
        if match is None:
            raise AlignmentError(f"{where}: {token!r} is not a Pharaoh link (i-j sure, i?j possible, from 0).")
        link = (int(match.group(1)), int(match.group(3)))
        possible.add(link)
        if match.group(2) == "-":
            sure.add(link)
    return Reference(frozenset(sure), frozenset(possible))


def read_pharaoh(path: Path) -> list[Reference]:
    """Every line of a Pharaoh file, in order (an empty line: a pair without links)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise AlignmentError(f"cannot read the alignments {path}: {error}.") from error
    return [parse_pharaoh(line, f"{path}:{number}") for number, line in enumerate(lines, start=1)]


def format_pharaoh(reference: Reference) -> str:
    links = [f"{i}-{j}" for i, j in sorted(reference.sure)]
    links += [f"{i}?{j}" for i, j in sorted(reference.possible - reference.sure)]
    return " ".join(links)


def counts_characters(lang: str) -> bool:
    """Whether a language's Pharaoh tokens are its characters (unspaced scripts) rather than its words."""
    return lang.lower().replace("_", "-").split("-")[0] in CHARACTER_LANGUAGES


def tokens(text: str, characters: bool) -> list[str]:
    """The Pharaoh tokens of a side's (normalised) text: its characters without spaces, or its space-separated
    words."""
    return [ch for ch in text if not ch.isspace()] if characters else text.split()


def piece_tokens(pieces: Sequence[str], characters: bool) -> Units:
    """Pieces (without "</s>") grouped into the Pharaoh tokens they spell: `labels` the tokens, `shares[p, u]` the
    share of piece p in token u (a piece spanning several tokens shares its weight equally; a lone "▁" piece
    belongs to the next token)."""
    labels: list[str] = []
    covered: list[list[int]] = [[] for _ in pieces]
    pending: list[int] = []  # pieces of spaces only ("▁"): their weight goes to the token that follows
    boundary = True
    for indices, text in piece_texts(pieces):
        members: list[int] = []
        for char in text.replace("▁", " "):
            if char.isspace():
                boundary = True
                continue
            if characters or boundary or not labels:
                labels.append(char)
            else:
                labels[-1] += char
            boundary = False
            if not members or members[-1] != len(labels) - 1:
                members.append(len(labels) - 1)
        if not members:
            pending.extend(indices)
            continue
        for index in indices:
            covered[index] = members
        for index in pending:
            covered[index] = members[:1]
        pending = []
    shares = np.zeros((len(pieces), len(labels)), dtype=np.float64)
    for index, members in enumerate(covered):
        if members:
            shares[index, members] = 1.0 / len(members)
    return Units(labels, shares)


def argmax_links(matrix: np.ndarray) -> set[Link]:
    """Target token j -> its most attended source token i, for a (target, source) map."""
    return {(int(i), j) for j, i in enumerate(matrix.argmax(axis=1))}


def source_argmax_links(matrix: np.ndarray) -> set[Link]:
    """Source token i -> the target token that attends to it most (the other direction)."""
    return {(i, int(j)) for i, j in enumerate(matrix.argmax(axis=0))}


# Steps to the neighbours of a link as (target, source) offsets, in the order of Koehn's GROW-DIAG pseudocode.
NEIGHBOURS = ((-1, 0), (0, -1), (1, 0), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def grow_diag_final(forward: set[Link], backward: set[Link]) -> set[Link]:
    """Koehn's symmetrisation as the Moses manual defines it (Koehn et al. 2005). `forward` has one link per
    target token (fast_align's forward direction, `argmax_links`), `backward` one per source token.

    GROW-DIAG starts from the intersection and scans the grid, target tokens outer and source tokens inner:
    every aligned link adds the union links next to it (diagonals included) of which a token is still unaligned.
    A link added ahead of the scan grows in the same pass; passes repeat until one adds nothing. Then
    FINAL(forward) and FINAL(backward), in that order, add their own links whose source or target token is still
    unaligned, in grid order."""
    union = forward | backward
    alignment: set[Link] = set()
    aligned_src: set[int] = set()
    aligned_tgt: set[int] = set()

    def add(link: Link) -> None:
        alignment.add(link)
        aligned_src.add(link[0])
        aligned_tgt.add(link[1])

    for link in forward & backward:
        add(link)
    grown = True
    while grown:
        grown = False
        scan = [(j, i) for i, j in alignment]  # grid positions, popped in scan order
        heapq.heapify(scan)
        while scan:
            j, i = heapq.heappop(scan)
            for dj, di in NEIGHBOURS:
                link = (i + di, j + dj)
                if link in union and link not in alignment and (link[0] not in aligned_src
                                                                or link[1] not in aligned_tgt):
                    add(link)
                    grown = True
                    if (j + dj, i + di) > (j, i):  # not yet reached by this pass's scan
                        heapq.heappush(scan, (j + dj, i + di))
    for direction in (forward, backward):
        for j, i in sorted((j, i) for i, j in direction):
            if i not in aligned_src or j not in aligned_tgt:
                add((i, j))
    return alignment


def extract(matrix: np.ndarray, method: str) -> set[Link]:
    """Links of a (target tokens, source tokens) weight map by one of EXTRACTIONS."""
    forward = argmax_links(matrix)
    if method == "argmax":
        return forward
    if method == "intersect":
        return forward & source_argmax_links(matrix)
    if method == "grow-diag-final":
        return grow_diag_final(forward, source_argmax_links(matrix))
    raise ValueError(f"unknown extraction {method!r}; one of {', '.join(EXTRACTIONS)}.")


@dataclass
class Counts:
    """Pooled link counts of one map and extraction: |A|, |S|, |A∩S|, |A∩P|."""

    predicted: int = 0
    sure: int = 0
    predicted_sure: int = 0
    predicted_possible: int = 0

    def add(self, predicted: set[Link], reference: Reference) -> None:
        self.predicted += len(predicted)
        self.sure += len(reference.sure)
        self.predicted_sure += len(predicted & reference.sure)
        self.predicted_possible += len(predicted & reference.possible)

    def scores(self) -> dict[str, float]:
        total = self.predicted + self.sure
        return {
            "aer": 1.0 - (self.predicted_sure + self.predicted_possible) / total if total else 1.0,
            "precision": self.predicted_possible / self.predicted if self.predicted else 0.0,
            "recall": self.predicted_sure / self.sure if self.sure else 0.0,
        }


def aer(predicted: set[Link], reference: Reference) -> float:
    """AER of one sentence pair (the pooled form is `Counts`)."""
    counts = Counts()
    counts.add(predicted, reference)
    return counts.scores()["aer"]


def named_maps(layers: np.ndarray) -> Maps:
    """Every map scored of (L, H, T, S) attention: each head, each layer's mean, the mean of all (layers and heads
    from 1); a single map (Bahdanau) is just "attention"."""
    num_layers, num_heads = layers.shape[:2]
    if (num_layers, num_heads) == (1, 1):
        return {"attention": layers[0, 0]}
    maps = {f"layer {layer + 1} head {head + 1}": layers[layer, head]
            for layer in range(num_layers) for head in range(num_heads)}
    maps |= {f"layer {layer + 1} mean": layers[layer].mean(axis=0) for layer in range(num_layers)}
    maps["mean of all"] = layers.mean(axis=(0, 1))
    return maps


def attention_explanations(layers: np.ndarray, src_units: Units, tgt_units: Units) -> dict[str, Maps]:
    """A forced pair's (L, H, T+1, S+1) piece attention as token maps, read two ways. Row t is the decoder step
    whose input is target piece t-1 (BOS for t = 0) and which predicts piece t; row T predicts "</s>". ATTENTION
    takes rows 0..T-1 (the step that predicts each target token), SHIFT_ATT rows 1..T (the step that reads it as
    its input: Shift-Att, Chen et al. 2020). The source "</s>" column is dropped from both."""
    pieces = layers[..., :-1]
    return {ATTENTION: named_maps(merge_attention(pieces[:, :, :-1], src_units, tgt_units)),
            SHIFT_ATT: named_maps(merge_attention(pieces[:, :, 1:], src_units, tgt_units))}


def attribution_explanations(model: Seq2SeqModel, src_ids: Sequence[int], tgt_ids: Sequence[int], src_units: Units,
                             tgt_units: Units, methods: Sequence[str]) -> dict[str, Maps]:
    """Each attribution method's token map of a pair (`attribution.attributions`, rows: the steps that predict
    each target token), the "</s>" row and column dropped as attention's are."""
    return {method: {SOURCE_EMBEDDING: merge_attention(
        attributions(model, src_ids, tgt_ids, method)[:-1, :-1].cpu().numpy(), src_units, tgt_units)}
        for method in methods}


@dataclass(frozen=True)
class AlignmentSet:
    """Sentence pairs with their reference links, and the name reports give them."""

    name: str
    pairs: list[tuple[str, str]]
    references: list[Reference]

    def __post_init__(self) -> None:
        if len(self.pairs) != len(self.references):
            raise AlignmentError(f"{self.name}: {len(self.pairs)} sentence pairs but {len(self.references)} "
                                 "alignment lines; give one line per pair, in order.")

    def halves(self) -> tuple[AlignmentSet, AlignmentSet]:
        """The first half of the pairs, to choose maps on, and the second, to report them on; cut by line, so
        every model is chosen and reported on the same pairs."""
        count = len(self.pairs)
        if count < 2:
            raise AlignmentError(f"{self.name} has {count} pair(s): choosing the map on one half and reporting it "
                                 "on the other needs at least 2.")
        middle = count // 2
        return (AlignmentSet(f"{self.name}, first half (pairs 1-{middle})", self.pairs[:middle],
                             self.references[:middle]),
                AlignmentSet(f"{self.name}, second half (pairs {middle + 1}-{count})", self.pairs[middle:],
                             self.references[middle:]))


def _rounded(counts: Counts) -> dict[str, float]:
    return {key: round(value, 4) for key, value in counts.scores().items()}


@dataclass
class AlignmentScorer:
    """Pooled counts of every explanation, map and extraction on the part the maps are chosen on (SELECTION)
    and the part they are reported on (HELD_OUT). An explanation is any per-pair weighting of source tokens for
    each target token: a name and its maps, map name -> (target tokens, source tokens) matrix."""

    extractions: Sequence[str] = EXTRACTIONS
    counts: dict[tuple[str, str, str, str], Counts] = field(default_factory=dict)  # (part, explanation, map, method)
    pairs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))

    def add(self, part: str, explanations: Mapping[str, Maps], reference: Reference) -> None:
        """One pair of `part`: every map of every explanation, by every extraction, against its reference."""
        self.pairs[part] += 1
        for explanation, maps in explanations.items():
            for name, matrix in maps.items():
                for method in self.extractions:
                    key = (part, explanation, name, method)
                    self.counts.setdefault(key, Counts()).add(extract(matrix, method), reference)

    def report(self, selection: str, held_out: str, skipped: dict[str, dict[str, int]]) -> AlignmentReport:
        scored = dict.fromkeys(key[1:] for key in self.counts)  # (explanation, map, method), first seen first
        rows = [{"explanation": explanation, "map": name, "extraction": method,
                 **{part: _rounded(self.counts.get((part, explanation, name, method), Counts())) for part in PARTS}}
                for explanation, name, method in scored]
        return AlignmentReport(selection, held_out, dict(self.pairs), skipped, rows)


@dataclass
class AlignmentReport:
    """AER, precision and recall of every explanation, map and extraction on both parts (`rows`), the parts'
    names, how many pairs each scored and why the others were skipped."""

    selection: str
    held_out: str
    pairs: dict[str, int]
    skipped: dict[str, dict[str, int]]
    rows: list[dict]

    @property
    def chosen(self) -> list[dict]:
        """Per explanation and extraction, the row of the map with the lowest AER on the selection part (the first
        such map on a tie): its held-out scores are the honest figure."""
        best: dict[tuple[str, str], dict] = {}
        for row in self.rows:
            key = (row["explanation"], row["extraction"])
            if key not in best or row[SELECTION]["aer"] < best[key][SELECTION]["aer"]:
                best[key] = row
        return list(best.values())

    @property
    def best(self) -> dict | None:
        """The explanation, map and extraction with the lowest AER on the selection part; None without rows."""
        return min(self.chosen, key=lambda row: row[SELECTION]["aer"], default=None)

    def as_dict(self) -> dict:
        return {"selection": self.selection, "held_out": self.held_out, "pairs": self.pairs,
                "skipped": self.skipped, "chosen": self.chosen, "best": self.best, "rows": self.rows}


def _prepared(src_text: str, tgt_text: str, reference: Reference, src_tok: Tokenizer, tgt_tok: Tokenizer,
              src_chars: bool, tgt_chars: bool, src_limit: int, tgt_limit: int | None):
    """(src ids, tgt ids, source units, target units) of a pair that can be scored, else the reason to skip it."""
    src_ids, tgt_ids = src_tok.encode(src_text), tgt_tok.encode(tgt_text)
    if not src_ids or not tgt_ids:
        return "empty side"
    if len(src_ids) > src_limit or (tgt_limit is not None and len(tgt_ids) > tgt_limit):
        return "longer than the model reads"
    src_units = piece_tokens(src_tok.pieces(src_ids), src_chars)
    tgt_units = piece_tokens(tgt_tok.pieces(tgt_ids), tgt_chars)
    if (src_units.labels != tokens(src_tok.normalize(src_text), src_chars)
            or tgt_units.labels != tokens(tgt_tok.normalize(tgt_text), tgt_chars)):
        return "pieces do not spell the tokens"
    if any(i >= len(src_units.labels) or j >= len(tgt_units.labels) for i, j in reference.possible):
        return "links past the last token"
    return src_ids, tgt_ids, src_units, tgt_units


def describe_skipped(skipped: Mapping[str, int]) -> str:
    return ", ".join(f"{count} skipped: {why}" for why, count in skipped.items())


def score_alignments(model: Seq2SeqModel, src_tok: Tokenizer, tgt_tok: Tokenizer, selection: AlignmentSet,
                     held_out: AlignmentSet, src_lang: str, tgt_lang: str, device: torch.device,
                     max_len_a: float = search.MAX_LEN_A, max_len_b: int = search.MAX_LEN_B,
                     methods: Sequence[str] = ()) -> AlignmentReport:
    """AER of the model's attention, as predicted and shifted (`attention_explanations`), and of the attributions
    of `methods` (attribution.METHODS), every map and extraction, on the pairs maps are chosen on (`selection`)
    and on those they are reported on (`held_out`). An AlignmentError, before anything is decoded, when there is
    nothing to score (no attention and no `methods`) or a part has no pair that can be scored."""
    if not model.has_attention and not methods:
        raise AlignmentError(f"the model has no attention ({NO_ATTENTION}); score its attributions instead "
                             "(evaluate --explain).")
    src_chars, tgt_chars = counts_characters(src_lang), counts_characters(tgt_lang)
    tgt_limit = target_token_limit(model)
    src_limit = source_token_limit(model, max_len_a, max_len_b)
    kept: dict[str, list] = {}
    skipped: dict[str, dict[str, int]] = {}
    for part, alignment_set in ((SELECTION, selection), (HELD_OUT, held_out)):
        kept[part], skipped[part] = [], {}
        for (src_text, tgt_text), reference in zip(alignment_set.pairs, alignment_set.references):
            prepared = _prepared(src_text, tgt_text, reference, src_tok, tgt_tok, src_chars, tgt_chars, src_limit,
                                 tgt_limit)
            if isinstance(prepared, str):
                skipped[part][prepared] = skipped[part].get(prepared, 0) + 1
            else:
                kept[part].append((*prepared, reference))
        if not kept[part]:
            raise AlignmentError(f"none of the {len(alignment_set.pairs)} pairs of {alignment_set.name} can be "
                                 f"scored ({describe_skipped(skipped[part])}); see seq2seq/analysis/alignment.py "
                                 "for how pairs and links are read.")
    scorer = AlignmentScorer()
    for part, pairs in kept.items():
        forced = force(model, [(src_ids, tgt_ids) for src_ids, tgt_ids, *_ in pairs], device)
        for (src_ids, tgt_ids, src_units, tgt_units, reference), result in zip(pairs, forced):
            explanations = {} if result.layers is None else attention_explanations(result.layers, src_units,
                                                                                    tgt_units)
            explanations |= attribution_explanations(model, src_ids, tgt_ids, src_units, tgt_units, methods)
            scorer.add(part, explanations, reference)
    return scorer.report(selection.name, held_out.name, skipped)


def score_checkpoint(loaded: LoadedModel, selection: AlignmentSet, held_out: AlignmentSet,
                     device: torch.device, methods: Sequence[str] = ()) -> AlignmentReport:
    """`score_alignments` with the languages and length limits a checkpoint was trained with."""
    data, trainer = loaded.config.data, loaded.config.trainer
    return score_alignments(
        loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, selection, held_out, data.src_lang, data.tgt_lang,
        device, trainer.max_len_a, trainer.max_len_b, methods,
    )


def _percent(scores: Mapping[str, float], keys: Sequence[str] = ("aer", "precision", "recall")) -> list[str]:
    return [f"{100 * scores[key]:.1f}" for key in keys]


def format_alignment_table(report: dict, title: str) -> str:
    """`AlignmentReport.as_dict()` in markdown (percent): per explanation and extraction the map chosen on the
    selection part with its AER there and its held-out AER, precision and recall; the overall choice; then every
    map on the selection part, the figures the choice was made on."""
    parts = {part: f"{report[part]}: {report['pairs'][part]} pairs scored" + (
        f" ({describe_skipped(report['skipped'][part])})" if report["skipped"][part] else "") for part in PARTS}
    lines = [f"{title} (percent, lower is better; P precision, R recall)",
             f"maps chosen on {parts[SELECTION]}", f"reported on    {parts[HELD_OUT]}", "",
             "| explanation | extraction | map chosen | AER where chosen | held-out AER | P | R |",
             "|---|---|---|---:|---:|---:|---:|"]
    for row in report["chosen"]:
        lines.append(f"| {row['explanation']} | {row['extraction']} | {row['map']} | "
                     f"{_percent(row[SELECTION], ('aer',))[0]} | " + " | ".join(_percent(row[HELD_OUT])) + " |")
    best = report["best"]
    lines += ["", f"held out: {best['explanation']}, {best['map']} with {best['extraction']}: AER "
              f"{100 * best[HELD_OUT]['aer']:.1f} (chosen where it scored {100 * best[SELECTION]['aer']:.1f})", "",
              f"every map on {report[SELECTION]} (what the choice was made on):", "",
              "| explanation | map | " + " | ".join(f"{method} AER | P | R" for method in EXTRACTIONS) + " |",
              "|---|---|" + "---:|---:|---:|" * len(EXTRACTIONS)]
    by_map: dict[tuple[str, str], dict[str, dict]] = {}
    for row in report["rows"]:
        by_map.setdefault((row["explanation"], row["map"]), {})[row["extraction"]] = row[SELECTION]
    for (explanation, name), methods in by_map.items():
        cells = [cell for method in EXTRACTIONS for cell in _percent(methods[method])]
        lines.append(f"| {explanation} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_alignment_set(prefix: str | Path, data_cfg: DataConfig) -> AlignmentSet:
    """PREFIX.tsv's pairs (the corpus layout, data.columns, every line as given) with PREFIX.align's links, one
    line per pair (`data.alignments_path`, `evaluate --select-on`). Problems are `CorpusError`s, which training
    reports in one line."""
    from seq2seq.data.corpus import CorpusError, load_tsv_pairs  # loads `datasets`, which AER itself does not need

    prefix = Path(prefix)
    tsv, align = prefix.with_name(prefix.name + ".tsv"), prefix.with_name(prefix.name + ".align")
    pairs_read, _ = load_tsv_pairs(tsv, data_cfg)
    pairs = list(zip(pairs_read.texts("src"), pairs_read.texts("tgt")))
    try:
        references = read_pharaoh(align)
    except AlignmentError as error:
        raise CorpusError(f"{prefix}: {error}") from error
    if len(pairs) != len(references) or not pairs:
        raise CorpusError(f"{tsv} has {len(pairs)} pairs but {align} has {len(references)} lines; give one "
                          "alignment line per pair (scripts/reference_alignments.py writes both).")
    return AlignmentSet(str(tsv), pairs, references)
