"""Reference word alignments for the attention AER: eflomal over the corpus, Pharaoh links for one split.

    pip install -e ".[align]"                                   # eflomal, built from source (a C compiler)
    python scripts/reference_alignments.py --out data/align/tatoeba_valid
    python -m seq2seq.evaluate --checkpoint best.pt --tsv data/align/tatoeba_valid.tsv \\
        --alignments data/align/tatoeba_valid.align
    python -m seq2seq.train data.alignments_path=data/align/tatoeba_valid      # AER in TensorBoard
    python scripts/reference_alignments.py --out en_zh_valid data.src_lang=en data.tgt_lang=zh   # other direction
    python scripts/reference_alignments.py --out data/align/tatoeba_test --split test --checkpoint best.pt

Writes OUT.tsv, the split's pairs in the corpus layout (data.columns, as `evaluate --tsv` and
`data.alignments_path` read them), and OUT.align, one Pharaoh line per pair with the `data.src_lang` side first.
The split is the one training makes from the same data config (the arguments after the options are the
training command's Hydra overrides). Tokens are counted as seq2seq/analysis/alignment.py counts them:
characters of a Chinese or Japanese side, space-separated words otherwise, after the normalisation of the model
that will be scored: with --checkpoint, that checkpoint's tokenizers' (what `evaluate --alignments` normalises
with), else the config's data.clean.src_normalization / tgt_normalization (what a training run with these
overrides uses for data.alignments_path). A different form could move the indices (NFKC turns "…" into "...",
one Chinese character into three). The aligner sees the tokens lowercased.

eflomal (Östling & Tiedemann 2016, a Bayesian IBM model with fertility and HMM distortion) aligns the training
and the chosen split together (unsupervised: more text, better statistics; no test text is used unless asked),
in both directions. Sure links are those both directions find; possible links are their grow-diag-final
symmetrisation. This is a silver reference, not a gold one: Tatoeba has no hand alignments, so the figures
measure agreement with a good statistical aligner, and the aligner's own error is unknown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from seq2seq.analysis.alignment import (Reference, counts_characters, format_pharaoh, grow_diag_final,
                                        parse_pharaoh, tokens)
from seq2seq.atomic import atomic_write
from seq2seq.checkpoint import CheckpointError, checkpoint_tokenizers, load_checkpoint
from seq2seq.config import check_config
from seq2seq.data.clean import side_normalizations
from seq2seq.data.corpus import CorpusError, load_corpus
from seq2seq.data.tokenizer import normalize_text
from seq2seq.paths import CONFIG_DIR


def aligner_input(texts: list[str], characters: bool, form: str | None) -> list[str]:
    """One line per sentence, its tokens (after the side's normalisation `form`) lowercased and joined by
    spaces; a sentence without tokens is "-", as eflomal cannot read an empty line (its links are dropped)."""
    return [" ".join(tokens(normalize_text(text, form), characters)).lower() or "-" for text in texts]


def scored_normalizations(checkpoint: Path | None, data_cfg) -> tuple[str | None, str | None]:
    """The (source, target) normalisation link indices count tokens after: the scored checkpoint's tokenizers',
    else the config's data.clean (a run trained with it scores with its own)."""
    if checkpoint is None:
        return side_normalizations(data_cfg.clean)
    try:
        payload = load_checkpoint(checkpoint)
        src_tok, tgt_tok = checkpoint_tokenizers(payload)
    except CheckpointError as error:
        sys.exit(f"reference_alignments: {error}")
    saved = payload["config"]["data"]
    if (saved["src_lang"], saved["tgt_lang"]) != (data_cfg.src_lang, data_cfg.tgt_lang):
        sys.exit(f"reference_alignments: {checkpoint} translates {saved['src_lang']}→{saved['tgt_lang']} but the "
                 f"config aligns {data_cfg.src_lang}→{data_cfg.tgt_lang}; add data.src_lang={saved['src_lang']} "
                 f"data.tgt_lang={saved['tgt_lang']}.")
    return src_tok.normalization, tgt_tok.normalization


def run_eflomal(src_lines: list[str], tgt_lines: list[str]) -> tuple[list[str], list[str]]:
    """Forward and reverse links, Pharaoh lines in source-target order, one per input pair."""
    try:
        from eflomal import Aligner
    except ImportError:
        sys.exit('reference_alignments: eflomal is not installed; `pip install -e ".[align]"` '
                 "(it builds from source and needs a C compiler).")
    with tempfile.TemporaryDirectory(prefix="seq2seq-align-") as folder:
        forward, reverse = Path(folder) / "forward", Path(folder) / "reverse"
        Aligner().align(src_lines, tgt_lines, links_filename_fwd=str(forward), links_filename_rev=str(reverse),
                        quiet=True)
        return (forward.read_text(encoding="utf-8").splitlines(), reverse.read_text(encoding="utf-8").splitlines())


def symmetrised(forward: str, reverse: str) -> Reference:
    """Sure: links of both directions; possible: their grow-diag-final union (which includes the sure ones)."""
    first, second = set(parse_pharaoh(forward).sure), set(parse_pharaoh(reverse).sure)
    return Reference(frozenset(first & second), frozenset(grow_diag_final(first, second)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.tsv and OUT.align")
    parser.add_argument("--split", choices=("valid", "test"), default="valid", help="the split to align (default valid)")
    parser.add_argument("--checkpoint", type=Path, help="the checkpoint the links will score: tokens are counted "
                        "after its normalisation (default: the config's data.clean)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training command, e.g. data.src_lang=en")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = check_config(compose(config_name="train", overrides=args.overrides))
    data = cfg.data
    src_lang, tgt_lang = data.src_lang, data.tgt_lang
    src_form, tgt_form = scored_normalizations(args.checkpoint, data)
    print(f"tokens counted after normalisation {src_form} ({src_lang}) and {tgt_form} ({tgt_lang})", file=sys.stderr)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seq2seq-align-corpus-") as folder:
        try:
            splits, report = load_corpus(data, Path(folder))
        except CorpusError as error:
            sys.exit(f"reference_alignments: {error}")
        print(report.summary(), file=sys.stderr)
        train, chosen = splits["train"], splits[args.split]
        train_src, train_tgt = train.texts("src"), train.texts("tgt")
        sources, targets = chosen.texts("src"), chosen.texts("tgt")
    src_chars, tgt_chars = counts_characters(src_lang), counts_characters(tgt_lang)
    print(f"aligning {len(train_src):,} training + {len(sources):,} {args.split} pairs with eflomal "
          f"({src_lang}: {'characters' if src_chars else 'words'}, {tgt_lang}: {'characters' if tgt_chars else 'words'})",
          file=sys.stderr)
    src_lines = aligner_input(train_src + sources, src_chars, src_form)
    tgt_lines = aligner_input(train_tgt + targets, tgt_chars, tgt_form)
    forward, reverse = run_eflomal(src_lines, tgt_lines)
    empty = Reference(frozenset(), frozenset())
    references = [empty if "-" in (src_lines[i], tgt_lines[i]) else symmetrised(forward[i], reverse[i])
                  for i in range(len(train_src), len(src_lines))]
    columns = [str(column) for column in data.columns]
    by_lang = {src_lang: sources, tgt_lang: targets}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tsv, align = args.out.with_name(args.out.name + ".tsv"), args.out.with_name(args.out.name + ".align")
    with atomic_write(tsv) as handle:
        handle.write("".join("\t".join(by_lang[column][i] if column in by_lang else "" for column in columns) + "\n"
                             for i in range(len(sources))).encode("utf-8"))
    with atomic_write(align) as handle:
        handle.write("".join(format_pharaoh(reference) + "\n" for reference in references).encode("utf-8"))
    sure = sum(len(reference.sure) for reference in references)
    possible = sum(len(reference.possible) for reference in references)
    print(f"wrote {tsv} and {align}: {len(references):,} pairs, {sure:,} sure and {possible - sure:,} more possible "
          f"links, {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
