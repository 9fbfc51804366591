"""Alignment error rate (AER) of attention-derived word alignments against reference alignments, for every
Transformer decoder layer and head, the layer means, the mean of all, and Bahdanau's attention.

Reference alignments are in Pharaoh format: one line per sentence pair, space-separated links `i-j` (sure) or
`i?j` (possible), `i` indexing the source side (the checkpoint's `data.src_lang`) and `j` the target side,
from 0. Indices count the tokens of a side: the space-separated words of a language written with spaces, every
character (punctuation included, spaces excepted) of Chinese or Japanese (CHARACTER_LANGUAGES), which any
aligner can produce without a segmenter. Texts are taken as the side's tokenizer normalises them
(data.clean.src_normalization / tgt_normalization, NFKC by default); a pair whose pieces do not spell the same
tokens, or whose links point past them, is skipped and counted.

Attention to alignment. The model is forced to produce the reference target (`inference.forced.force`); the
"</s>" row and column are dropped and the piece map is merged into a token map (`diagnostics.merge_attention`:
a source token's weight sums its pieces', a target token's row averages its pieces' rows). Links come out of a
(target tokens x source tokens) map by one of EXTRACTIONS:
  - `argmax`: every target token linked to the source token it attends to most;
  - `intersect`: the links that are also the argmax of their source token's column (both directions agree);
  - `grow-diag-final`: the intersection grown with neighbouring links of the union of both directions, then
    union links of still-unaligned tokens (Koehn et al. 2005), the symmetrisation statistical aligners use.
Scores are pooled over the pairs (Och & Ney 2003), with A the predicted links, S the sure and P the possible
ones (P includes S): precision |A∩P|/|A|, recall |A∩S|/|S|, AER = 1 - (|A∩S| + |A∩P|) / (|A| + |S|).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seq2seq.analysis.diagnostics import Units, merge_attention, piece_texts
from seq2seq.checkpoint import LoadedModel
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.inference import search
from seq2seq.inference.forced import force
from seq2seq.inference.predict import source_token_limit
from seq2seq.models.base import Seq2SeqModel

CHARACTER_LANGUAGES = frozenset({"zh", "ja", "cmn", "yue", "wuu", "lzh"})
EXTRACTIONS = ("argmax", "intersect", "grow-diag-final")
LINK = re.compile(r"^(\d+)([-?])(\d+)$")

Link = tuple[int, int]  # (source token, target token)


class AlignmentError(Exception):
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


NEIGHBOURS = ((-1, 0), (0, -1), (1, 0), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def grow_diag_final(forward: set[Link], backward: set[Link]) -> set[Link]:
    """Koehn et al.'s symmetrisation: start from both directions' intersection, add union links next to
    (diagonal included) an aligned link while one of their tokens is unaligned, then union links of tokens
    still unaligned."""
    union = forward | backward
    alignment = forward & backward
    aligned_src = {i for i, _ in alignment}
    aligned_tgt = {j for _, j in alignment}
    grown = True
    while grown:
        grown = False
        for i, j in sorted(alignment):
            for di, dj in NEIGHBOURS:
                link = (i + di, j + dj)
                if link in union and link not in alignment and (link[0] not in aligned_src
                                                                or link[1] not in aligned_tgt):
                    alignment.add(link)
                    aligned_src.add(link[0])
                    aligned_tgt.add(link[1])
                    grown = True
    for link in sorted(union):
        if link[0] not in aligned_src or link[1] not in aligned_tgt:
            alignment.add(link)
            aligned_src.add(link[0])
            aligned_tgt.add(link[1])
    return alignment


def extract(matrix: np.ndarray, method: str) -> set[Link]:
    """Links of a (target tokens, source tokens) attention map by one of EXTRACTIONS."""
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


def named_maps(layers: np.ndarray) -> list[tuple[str, int | None, int | None, np.ndarray]]:
    """(name, layer, head, (T, S) map) of every map scored: each head, each layer's mean, the mean of all;
    a single map (Bahdanau) is just "attention". Layers and heads from 1."""
    num_layers, num_heads = layers.shape[:2]
    if (num_layers, num_heads) == (1, 1):
        return [("attention", None, None, layers[0, 0])]
    maps = [(f"layer {layer + 1} head {head + 1}", layer + 1, head + 1, layers[layer, head])
            for layer in range(num_layers) for head in range(num_heads)]
    maps += [(f"layer {layer + 1} mean", layer + 1, None, layers[layer].mean(axis=0)) for layer in range(num_layers)]
    maps.append(("mean of all", None, None, layers.mean(axis=(0, 1))))
    return maps


@dataclass
class AlignmentReport:
    """AER, precision and recall of every map and extraction, best first, and how many pairs were scored."""

    rows: list[dict]
    pairs: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def best(self) -> dict:
        return self.rows[0]

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "skipped": self.skipped, "rows": self.rows,
                "best": self.rows[0] if self.rows else None}


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


def score_alignments(model: Seq2SeqModel, src_tok: Tokenizer, tgt_tok: Tokenizer,
                     pairs: Sequence[tuple[str, str]], references: Sequence[Reference], src_lang: str,
                     tgt_lang: str, device: torch.device, max_len_a: float = search.MAX_LEN_A,
                     max_len_b: int = search.MAX_LEN_B) -> AlignmentReport:
    """AER of the model's attention on (source, target) pairs against their reference links, every map and
    extraction; rows sorted by AER, best first. A model without attention gets no rows."""
    if len(pairs) != len(references):
        raise AlignmentError(f"{len(pairs)} sentence pairs but {len(references)} alignment lines; they must align.")
    if not model.has_attention:
        return AlignmentReport([], 0)
    src_chars, tgt_chars = counts_characters(src_lang), counts_characters(tgt_lang)
    tgt_limit = model.max_target_positions - 1 if model.max_target_positions else None
    src_limit = source_token_limit(model, max_len_a, max_len_b)
    kept, skipped = [], {}
    for (src_text, tgt_text), reference in zip(pairs, references):
        prepared = _prepared(src_text, tgt_text, reference, src_tok, tgt_tok, src_chars, tgt_chars, src_limit,
                             tgt_limit)
        if isinstance(prepared, str):
            skipped[prepared] = skipped.get(prepared, 0) + 1
        else:
            kept.append((*prepared, reference))
    counts: dict[tuple[str, str], Counts] = {}
    where: dict[str, tuple[int | None, int | None]] = {}
    forced = force(model, [(src_ids, tgt_ids) for src_ids, tgt_ids, *_ in kept], device)
    for (_, _, src_units, tgt_units, reference), result in zip(kept, forced):
        token_maps = merge_attention(result.layers[:, :, :-1, :-1], src_units, tgt_units)
        for name, layer, head, matrix in named_maps(token_maps):
            where[name] = (layer, head)
            for method in EXTRACTIONS:
                counts.setdefault((name, method), Counts()).add(extract(matrix, method), reference)
    rows = [{"map": name, "layer": where[name][0], "head": where[name][1], "extraction": method,
             **{key: round(value, 4) for key, value in count.scores().items()}}
            for (name, method), count in counts.items()]
    rows.sort(key=lambda row: (row["aer"], row["map"], EXTRACTIONS.index(row["extraction"])))
    return AlignmentReport(rows, len(kept), skipped)


def score_checkpoint(loaded: LoadedModel, pairs: Sequence[tuple[str, str]], references: Sequence[Reference],
                     device: torch.device) -> AlignmentReport:
    """`score_alignments` with the languages and length limits a checkpoint was trained with."""
    data = loaded.config.data
    trainer = loaded.config.get("trainer", {}) or {}
    return score_alignments(
        loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, pairs, references, str(data.src_lang),
        str(data.tgt_lang), device, float(trainer.get("max_len_a", search.MAX_LEN_A)),
        int(trainer.get("max_len_b", search.MAX_LEN_B)),
    )


def format_alignment_table(report: dict, title: str) -> str:
    """A markdown table of `AlignmentReport.as_dict()`, one row per map with its extractions side by side
    (percent), the map with the lowest AER first."""
    if not report["rows"]:
        return f"{title}: no attention, so no alignment to score."
    by_map: dict[str, dict[str, dict]] = {}
    for row in report["rows"]:  # best first, so maps come in the order of their best extraction
        by_map.setdefault(row["map"], {})[row["extraction"]] = row
    skipped = ", ".join(f"{count} skipped: {why}" for why, count in report["skipped"].items())
    lines = [f"{title}: {report['pairs']} pairs" + (f" ({skipped})" if skipped else ""), "",
             "| map | " + " | ".join(f"{method} AER | P | R" for method in EXTRACTIONS) + " |",
             "|---|" + "---:|---:|---:|" * len(EXTRACTIONS)]
    for name, methods in by_map.items():
        cells = [f"{100 * methods[method][key]:.1f}" for method in EXTRACTIONS for key in ("aer", "precision", "recall")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    best = report["best"]
    lines += ["", f"best: {best['map']} with {best['extraction']}, AER {100 * best['aer']:.1f} "
              "(percent, lower is better; P precision, R recall)"]
    return "\n".join(lines)


def read_alignment_set(prefix: str | Path, data_cfg) -> tuple[list[tuple[str, str]], list[Reference]]:
    """`data.alignments_path=X`: the pairs of X.tsv (the corpus layout, data.columns, every line as given) and
    the links of X.align, one line per pair. Problems are `CorpusError`s, which training reports in one line."""
    from seq2seq.data.corpus import CorpusError, load_tsv_pairs  # loads `datasets`, which AER itself does not need

    prefix = Path(prefix)
    tsv, align = prefix.with_name(prefix.name + ".tsv"), prefix.with_name(prefix.name + ".align")
    pairs_read, _ = load_tsv_pairs(tsv, data_cfg)
    pairs = list(zip(pairs_read.texts("src"), pairs_read.texts("tgt")))
    try:
        references = read_pharaoh(align)
    except AlignmentError as error:
        raise CorpusError(f"data.alignments_path: {error}") from error
    if len(pairs) != len(references) or not pairs:
        raise CorpusError(f"data.alignments_path: {tsv} has {len(pairs)} pairs but {align} has {len(references)} "
                          "lines; give one alignment line per pair (scripts/reference_alignments.py writes both).")
    return pairs, references
