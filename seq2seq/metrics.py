"""Corpus scores with sacreBLEU, so numbers are comparable with published ones and carry their signatures.

Hypotheses and references are detokenized text (what SentencePiece decodes to); sacreBLEU does its own
tokenization: "zh" for a Chinese target (characters are words there), "13a" otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF


def bleu_tokenizer(target_lang: str) -> str:
    """sacreBLEU's recommended tokenizer for the target language."""
    return "zh" if target_lang.lower().split("-")[0] in {"zh", "cmn"} else "13a"


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references: they must pair up 1:1.")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], target_lang: str) -> float:
    """Corpus BLEU (0-100); 0.0 for an empty corpus."""
    _check_lengths(hypotheses, references)
    if not hypotheses:
        return 0.0
    bleu = BLEU(tokenize=bleu_tokenizer(target_lang), trg_lang=target_lang)
    return float(bleu.corpus_score(list(hypotheses), [list(references)]).score)


def corpus_scores(hypotheses: list[str], references: list[str], target_lang: str) -> dict:
    """BLEU and chrF of a corpus, with the sacreBLEU signatures that say exactly how they were computed."""
    _check_lengths(hypotheses, references)
    bleu = BLEU(tokenize=bleu_tokenizer(target_lang), trg_lang=target_lang)
    chrf = CHRF()
    # sacreBLEU fixes the signature's reference count while scoring, so an empty corpus scores one empty pair.
    hyps, refs = (list(hypotheses), [list(references)]) if hypotheses else ([""], [[""]])
    bleu_score = float(bleu.corpus_score(hyps, refs).score)
    chrf_score = float(chrf.corpus_score(hyps, refs).score)
    if not hypotheses:
        bleu_score = chrf_score = 0.0
    return {
        "bleu": bleu_score,
        "chrf": chrf_score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def length_bucket(length: int, edges: Sequence[int]) -> str:
    """Name of the bucket a source length falls in: "1-10", "11-20", ..., a single length "7", the open-ended "51+"."""
    lower = 1
    for edge in edges:
        if length <= edge:
            return str(edge) if edge == lower else f"{lower}-{edge}"
        lower = edge + 1
    return f"{lower}+"


def balanced_edges(lengths: Sequence[int], buckets: int = 6) -> list[int]:
    """Upper bucket edges that cut `lengths` into at most `buckets` groups of similar size.

    Fixed-width buckets put almost all of a corpus of short sentences (Tatoeba: 90% under 11 tokens) into one bucket
    and leave a handful in the others, so their BLEU is noise; equal-count buckets give every point of the
    BLEU-by-length curve a few hundred sentences. All sentences of one length stay in one bucket.
    """
    ordered = sorted(max(length, 1) for length in lengths)
    edges: list[int] = []
    for k in range(1, buckets if ordered else 1):
        edge = ordered[k * len(ordered) // buckets - 1]
        if edge < ordered[-1] and (not edges or edge > edges[-1]):
            edges.append(edge)
    return edges


def bleu_by_length(
    source_lengths: list[int],
    hypotheses: list[str],
    references: list[str],
    target_lang: str,
    edges: Sequence[int] | None = None,
) -> list[dict]:
    """BLEU per source-length bucket, in bucket order, skipping empty buckets: shows where long inputs break down.

    Lengths are whatever unit the caller counts (source tokens in this project); lengths of 0 count in the first bucket.
    Without `edges`, buckets of similar sentence counts (`balanced_edges`).
    """
    _check_lengths(hypotheses, references)
    if len(source_lengths) != len(hypotheses):
        raise ValueError(f"{len(source_lengths)} source lengths but {len(hypotheses)} hypotheses.")
    if edges is None:
        edges = balanced_edges(source_lengths)
    if list(edges) != sorted(set(edges)) or (edges and edges[0] < 1):
        raise ValueError(f"bucket edges must be increasing positive integers, got {list(edges)}.")
    names = [length_bucket(edge, edges) for edge in edges] + [length_bucket(edges[-1] + 1 if edges else 1, edges)]
    members: dict[str, list[int]] = {name: [] for name in names}
    for row, length in enumerate(source_lengths):
        members[length_bucket(max(length, 1), edges)].append(row)
    return [
        {
            "bucket": name,
            "count": len(rows),
            "bleu": corpus_bleu([hypotheses[i] for i in rows], [references[i] for i in rows], target_lang),
        }
        for name, rows in members.items()
        if rows
    ]
