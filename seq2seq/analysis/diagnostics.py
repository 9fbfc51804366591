"""Attention analysis: SentencePiece pieces merged into words, and the diagnostics `seq2seq.inspect` prints.

Words ("units"). Pieces are merged by SentencePiece's "▁" word-boundary mark, which works for any spaced script:
"▁stud" + "ent" is one unit "student". Unspaced CJK text has no words to recover, so every CJK character is a
unit of its own, and a piece of several characters ("一个") is split into them. Punctuation (Unicode category P,
apostrophes and hyphens excepted, so "I'm" and "well-known" stay whole) is a unit of its own, so the final
period is not glued onto the last word. Special pieces such as "</s>" stay single units; byte-fallback pieces
("<0xE5>", for characters outside the vocabulary) are decoded into the characters their bytes spell.

A piece covering several units gives each of them an equal share of its weight. On the source side the weights
of a unit's pieces are summed (the unit receives what its pieces received); on the target side the rows of a
unit's pieces are averaged (the unit's attention is that of its pieces). Both keep every row a distribution.

Chinese words. For the word-level views and the agreement of the inspector, `merge_words` groups runs of CJK
characters into the words the jieba segmenter finds (optional: `pip install "seq2seq[zh]"`; without it the
characters stay units), so "学生" is one word whether a model looks at 学, at 生 or at both.

Diagnostics are always computed on units, which do not depend on the tokenizer, so models with different
vocabularies compare: row entropy, the weight on the source "</s>" and on punctuation, source coverage (total
attention a source unit receives over all target rows; well below 1 suggests it was not translated), and the
agreement of two models' alignments (see `agreement`).
"""

from __future__ import annotations

import difflib
import logging
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from seq2seq.data.tokenizer import UNSPACED_CHARACTER

WORD_BOUNDARY = "▁"
EOS_PIECE = "</s>"
INNER_WORD_PUNCTUATION = frozenset("'’-")
COVERAGE_THRESHOLD = 0.3
AGREEMENT_TOLERANCE = 0.1  # a near tie: the other word's weight within this of the row's maximum still agrees


def is_cjk(char: str) -> bool:
    """A character of a script written without spaces between words (Han, kana): one unit of its own."""
    return UNSPACED_CHARACTER.fullmatch(char) is not None


def display_width(text: str) -> int:
    """Columns a text takes on a terminal or a tick label: wide (CJK) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


def _is_special(piece: str) -> bool:
    return len(piece) > 2 and piece.startswith("<") and piece.endswith(">")


def _char_kind(char: str) -> str:
    if is_cjk(char):
        return "cjk"
    if unicodedata.category(char).startswith("P") and char not in INNER_WORD_PUNCTUATION:
        return "punct"
    return "word"


def _segments(text: str) -> list[tuple[str, str]]:
    """(kind, text) runs of a piece: one per CJK character, maximal runs of punctuation or of word characters."""
    segments: list[tuple[str, str]] = []
    for char in text:
        kind = _char_kind(char)
        if segments and kind != "cjk" and segments[-1][0] == kind:
            segments[-1] = (kind, segments[-1][1] + char)
        else:
            segments.append((kind, char))
    return segments


@dataclass
class Units:
    """Pieces merged into units: `labels[u]` is a unit's text, `shares[p, u]` the share of piece p in unit u
    (each piece's shares sum to 1)."""

    labels: list[str]
    shares: np.ndarray

    @property
    def is_punctuation(self) -> np.ndarray:
        return np.array([is_punctuation(label) for label in self.labels], dtype=bool)


def _byte_value(piece: str) -> int | None:
    """The byte of a byte-fallback piece such as "<0xE5>", else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


def piece_texts(pieces: Sequence[str]) -> list[tuple[list[int], str]]:
    """(piece indices, text) in order: a run of byte-fallback pieces is decoded together into the characters
    its bytes spell (a character's bytes are one UTF-8 sequence), every other piece stands alone."""
    texts: list[tuple[list[int], str]] = []
    run: list[int] = []
    for index, piece in enumerate([*pieces, ""]):
        if index < len(pieces) and _byte_value(piece) is not None:
            run.append(index)
            continue
        if run:
            texts.append((run, bytes(_byte_value(pieces[i]) for i in run).decode("utf-8", errors="replace")))
            run = []
        if index < len(pieces):
            texts.append(([index], piece))
    return texts


def merge_pieces(pieces: Sequence[str]) -> Units:
    """Group SentencePiece pieces into words (spaced scripts), characters (CJK) and punctuation marks."""
    labels: list[str] = []
    kinds: list[str] = []
    members: list[list[int]] = [[] for _ in pieces]  # per piece: the units it covers
    pending: list[int] = []  # lone "▁" pieces: they belong to the unit that follows (or, at the end, precedes)
    for indices, text in piece_texts(pieces):
        if _is_special(text):
            segments = [("special", text)]
        else:
            segments = _segments(text.replace(WORD_BOUNDARY, " ").strip())
        if not segments:
            pending.extend(indices)
            continue
        starts_word = text.startswith(WORD_BOUNDARY) or bool(pending)
        covered = []
        for position, (kind, segment) in enumerate(segments):
            if position == 0 and not starts_word and kinds and kinds[-1] == kind == "word":
                labels[-1] += segment
            else:
                labels.append(segment)
                kinds.append(kind)
            covered.append(len(labels) - 1)
        for index in indices:
            members[index] = covered
        for lone in pending:
            members[lone] = covered[:1]
        pending = []
    if pending and not labels:
        labels.append(WORD_BOUNDARY)
    for lone in pending:
        members[lone] = [len(labels) - 1]
    shares = np.zeros((len(pieces), len(labels)), dtype=np.float64)
    for piece_index, covered in enumerate(members):
        shares[piece_index, covered] = 1.0 / len(covered)
    return Units(labels, shares)


@lru_cache(maxsize=1)
def chinese_segmenter() -> Callable[[str], list[str]] | None:
    """jieba's word segmentation of a run of CJK characters, or None when jieba is not installed."""
    try:
        import jieba
    except ImportError:
        return None
    jieba.setLogLevel(logging.WARNING)  # it logs the loading of its dictionary at INFO
    return lambda text: list(jieba.cut(text))


def merge_words(pieces: Sequence[str]) -> Units:
    """`merge_pieces`, then each run of adjacent CJK character units grouped into the segmenter's words (a run
    the segmenter does not split back into the same characters stays characters)."""
    units = merge_pieces(pieces)
    segmenter = chinese_segmenter()
    if segmenter is None:
        return units
    groups: list[list[int]] = []
    start = 0
    while start < len(units.labels):
        end = start
        while end < len(units.labels) and len(units.labels[end]) == 1 and is_cjk(units.labels[end]):
            end += 1
        if end == start:
            groups.append([start])
            start += 1
            continue
        words = segmenter("".join(units.labels[start:end]))
        if "".join(words) != "".join(units.labels[start:end]):
            words = units.labels[start:end]
        for word in words:
            groups.append(list(range(start, start + len(word))))
            start += len(word)
    grouping = np.zeros((len(units.labels), len(groups)), dtype=np.float64)
    for word, members in enumerate(groups):
        grouping[members, word] = 1.0
    return Units(["".join(units.labels[i] for i in members) for members in groups], units.shares @ grouping)


def merge_attention(attention: np.ndarray, src: Units, tgt: Units) -> np.ndarray:
    """(..., T, S) piece attention -> (..., T', S') unit attention: summed over a source unit's pieces, averaged
    over a target unit's pieces (weighted by their shares), so rows that summed to 1 still do."""
    target_average = tgt.shares.T / tgt.shares.sum(axis=0)[:, None]
    return np.einsum("ut,...ts,sv->...uv", target_average, np.asarray(attention, dtype=np.float64), src.shares)


def row_entropy(attention: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row over the last axis: 0 when all weight is on one position, log n when uniform."""
    p = np.clip(np.asarray(attention, dtype=np.float64), 0.0, None)
    return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(axis=-1)


def coverage(attention: np.ndarray) -> np.ndarray:
    """Total attention each source position receives over all target rows of a (T, S) map."""
    return np.asarray(attention, dtype=np.float64).sum(axis=-2)


def uncovered(attention: np.ndarray, src_labels: Sequence[str], threshold: float = COVERAGE_THRESHOLD) -> list[int]:
    """Source units (not "</s>", not punctuation) whose coverage is below `threshold`: likely left untranslated."""
    received = coverage(attention)
    return [
        i for i, label in enumerate(src_labels)
        if label != EOS_PIECE and not is_punctuation(label) and received[i] < threshold
    ]


def training_summary(layers: np.ndarray, src_pieces: Sequence[str], tgt_pieces: Sequence[str],
                     threshold: float = COVERAGE_THRESHOLD) -> dict[str, np.ndarray | float]:
    """Word-level scalars of one sentence for the training curves: the mean row entropy of every layer and head
    (L, H) of a (L, H, T, S) map, that of their mean map, and the share of source words it leaves uncovered."""
    src, tgt = merge_pieces(src_pieces), merge_pieces(tgt_pieces)
    maps = merge_attention(layers, src, tgt)
    mean_map = maps.mean(axis=(0, 1))
    words = [label for label in src.labels if label != EOS_PIECE and not is_punctuation(label)]
    return {
        "layer_head_entropy": row_entropy(maps).mean(axis=-1),
        "entropy": float(row_entropy(mean_map).mean()),
        "uncovered_share": len(uncovered(mean_map, src.labels, threshold)) / max(len(words), 1),
    }


def agreement(
    first_tgt: Sequence[str], first_weights: np.ndarray, second_tgt: Sequence[str], second_weights: np.ndarray,
    tolerance: float = AGREEMENT_TOLERANCE,
) -> dict[str, float | int | None]:
    """How far two models' word-level (T, S) maps over the same source words align alike, on the target words
    both translations share. The translations may differ: their target words are matched by a longest-common-
    subsequence alignment (difflib, no junk heuristics), "</s>" excluded; with identical translations that is
    every target word. Per matched word:
      - `agreement`: share of words whose argmax source words are the same, or a near tie: either model puts
        within `tolerance` of its row maximum on the other's argmax (0.45 on 学 against 0.47 on 生 agrees with
        a model that picks 学), so one rounding-size difference cannot flip the answer;
      - `overlap`: the mean attention mass the two rows share, sum over sources of min(a, b), 1 for equal rows.
    None for both when no word matches; `compared` says how many words were matched."""
    first_rows = [i for i, w in enumerate(first_tgt) if w != EOS_PIECE]
    second_rows = [j for j, w in enumerate(second_tgt) if w != EOS_PIECE]
    matcher = difflib.SequenceMatcher(a=[first_tgt[i] for i in first_rows], b=[second_tgt[j] for j in second_rows],
                                      autojunk=False)
    pairs = [(first_rows[block.a + k], second_rows[block.b + k])
             for block in matcher.get_matching_blocks() for k in range(block.size)]
    if not pairs:
        return {"agreement": None, "overlap": None, "compared": 0}
    first, second = np.asarray(first_weights, dtype=np.float64), np.asarray(second_weights, dtype=np.float64)
    same, shared = 0, 0.0
    for i, j in pairs:
        a, b = first[i], second[j]
        same += bool(a[b.argmax()] >= a.max() - tolerance or b[a.argmax()] >= b.max() - tolerance)
        shared += float(np.minimum(a, b).sum())
    return {"agreement": same / len(pairs), "overlap": shared / len(pairs), "compared": len(pairs)}
