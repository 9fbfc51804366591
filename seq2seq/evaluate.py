"""Score a checkpoint: `python -m seq2seq.evaluate` (console script `seq2seq-evaluate`).

    seq2seq-evaluate --checkpoint best.pt                          # the test split it was trained with
    seq2seq-evaluate --checkpoint best.pt --split valid --beam-size 1
    seq2seq-evaluate --checkpoint best.pt --src test.zh --ref test.en --output hyps.en --json scores.json
    seq2seq-evaluate --checkpoint best.pt --tsv other-cmn-eng.tsv  # manythings layout, every line scored as given
    seq2seq-evaluate --checkpoint best.pt --tsv test.tsv --alignments test.align   # attention AER, no BLEU
    seq2seq-evaluate --checkpoint best.pt --tsv test.tsv --alignments test.align --select-on data/align/valid
    seq2seq-evaluate --checkpoint best.pt --tsv test.tsv --alignments test.align --explain integrated-gradients

Prints sacreBLEU BLEU and chrF with their signatures, and BLEU by source length (SentencePiece tokens). The
checkpoint carries its tokenizers and data config, so it works when copied alone; --split rebuilds the split from
that config (same corpus, cleaning and seed give the same split), finding the corpus as training does
(data.path, $SEQ2SEQ_DATA_MIRROR, data/, download).

With --alignments (Pharaoh reference links of the pairs, one line each; see seq2seq/analysis/alignment.py) the
references are forced through the model instead of translating, and the alignment error rate of its attention,
as predicted and shifted (Shift-Att), is scored for every decoder layer and head, the layer means and the mean of
all, by every extraction. Per extraction the map is chosen on one part of the pairs (the first half, or the pairs
of --select-on) and its AER printed on the other (the second half, or every given pair): a held-out figure.
--explain METHOD adds the gradient attributions of METHOD (saliency, input-x-gradient, integrated-gradients; see
seq2seq/analysis/attribution.py) to the same table, for the RNN (no attention) too; integrated gradients cost
about 50 forward and backward passes per target token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from seq2seq.analysis.alignment import (AlignmentSet, format_alignment_table, read_alignment_set,
                                        read_pharaoh, score_checkpoint)
from seq2seq.analysis.attribution import METHODS
from seq2seq.checkpoint import LoadedModel
from seq2seq.metrics import bleu_by_length, corpus_scores
from seq2seq.inference.predict import translate_sentences, with_progress
from seq2seq.cli import add_decoding_arguments, decoding_options, load, read_file_lines, run_command
from seq2seq.errors import UsageError
from seq2seq.inference.output import one_line
from seq2seq.models.base import NO_ATTENTION

log = logging.getLogger("seq2seq.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2seq-evaluate",
        description="Translate a test set with a checkpoint and score it with sacreBLEU (BLEU, chrF).",
    )
    add_decoding_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", choices=("test", "valid"),
                        help="a split of the checkpoint's own corpus (default: test)")
    source.add_argument("--src", type=Path, help="source sentences, one a line (with --ref)")
    source.add_argument("--tsv", type=Path, help="a TSV in the training corpus layout (data.columns of the checkpoint)")
    parser.add_argument("--ref", type=Path, help="reference translations, one a line, aligned with --src")
    parser.add_argument("--data-path", type=Path,
                        help="corpus file for --split, where the checkpoint's data config cannot find it")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N pairs (a quick look)")
    parser.add_argument("--output", type=Path, help="write the hypotheses here, one a line")
    parser.add_argument("--json", type=Path, help="write the scores here as JSON")
    parser.add_argument("--alignments", type=Path, metavar="FILE.align",
                        help="Pharaoh reference alignments of the pairs (one line each): score the attention's "
                        "alignment error rate per layer and head instead of translating")
    parser.add_argument("--explain", action="append", choices=METHODS, metavar="METHOD",
                        help=f"with --alignments: also score these attributions ({', '.join(METHODS)}); repeat "
                        "for several")
    parser.add_argument("--select-on", type=Path, metavar="PREFIX",
                        help="with --alignments: choose each extraction's map on PREFIX.tsv + PREFIX.align (e.g. the "
                        "validation pairs) and report it on every given pair (default: choose on the first half of "
                        "the given pairs, report on the second)")
    return parser


def load_pairs(args: argparse.Namespace, loaded: LoadedModel) -> tuple[list[str], list[str], str]:
    """Sources, references and a description of where they came from."""
    if args.ref is not None and args.src is None:
        raise UsageError("--ref needs --src (the source sentences it translates).")
    if args.src is not None:
        if args.ref is None:
            raise UsageError("--src needs --ref (the reference translations to score against).")
        for path in (args.src, args.ref):
            if not path.is_file():
                raise UsageError(f"{path} does not exist or is not a file.")
        sources, references = list(read_file_lines(args.src)), list(read_file_lines(args.ref))
        if len(sources) != len(references):
            raise UsageError(
                f"{args.src} has {len(sources)} lines but {args.ref} has {len(references)}; they must align."
            )
        return sources, references, f"{args.src} / {args.ref}"
    # Imported here: the corpus code loads `datasets`, which scoring --src/--ref files does not need.
    import datasets

    from seq2seq.data.corpus import CorpusError, load_corpus, load_tsv_pairs

    if not args.verbose:
        datasets.disable_progress_bars()
    data_cfg = loaded.config.data
    if args.data_path is not None:
        data_cfg = dataclasses.replace(data_cfg, path=str(args.data_path))
    try:
        if args.tsv is not None:
            pairs, report = load_tsv_pairs(args.tsv, data_cfg)
            print(report.summary(), file=sys.stderr)
            return pairs.texts("src"), pairs.texts("tgt"), str(args.tsv)
        split = args.split or "test"
        with tempfile.TemporaryDirectory(prefix="seq2seq-evaluate-") as folder:
            splits, report = load_corpus(data_cfg, Path(folder))
            log.info(report.summary())
            return splits[split].texts("src"), splits[split].texts("tgt"), f"{split} split of {data_cfg.name}"
    except CorpusError as error:
        hint = "" if args.tsv is not None else " (seq2seq-evaluate: --data-path FILE points --split at the corpus file)"
        raise UsageError(f"{error}{hint}") from error


def evaluate(args: argparse.Namespace) -> dict:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}.")
    if args.select_on is not None and args.alignments is None:
        raise UsageError("--select-on needs --alignments (it chooses the attention map that --alignments scores).")
    if args.explain and args.alignments is None:
        raise UsageError("--explain scores attributions against reference links; give them with --alignments.")
    loaded, device = load(args)
    if args.alignments is not None and not loaded.model.has_attention and not args.explain:
        raise UsageError(f"--alignments scores attention, and the {loaded.config.model.name} model has none "
                         f"({NO_ATTENTION}); score its attributions instead (--explain integrated-gradients).")
    options = decoding_options(args, loaded, device)
    sources, references, where = load_pairs(args, loaded)
    if args.limit is not None:
        sources, references = sources[: args.limit], references[: args.limit]
    if not sources:
        raise UsageError(f"nothing to evaluate: {where} has no sentence pairs.")
    if args.alignments is not None:
        result = evaluate_alignments(args, loaded, device, sources, references, where)
        _write_json(args, result)
        return result
    target_lang = loaded.config.data.tgt_lang
    print(f"translating {len(sources)} sentences of {where} ...", file=sys.stderr)
    start = time.perf_counter()
    hypotheses, lengths = [], []
    translations = translate_sentences(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, sources, **options)
    for translation in with_progress(translations, len(sources), "translating"):
        hypotheses.append(one_line(translation.text))
        lengths.append(translation.num_src_tokens)
    seconds = time.perf_counter() - start
    scores = corpus_scores(hypotheses, references, target_lang)
    by_length = bleu_by_length(lengths, hypotheses, references, target_lang)
    if args.output is not None:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
        except OSError as error:
            raise UsageError(f"cannot write --output {args.output}: {error.strerror or error}.") from error
    result = {
        "checkpoint": str(args.checkpoint),
        "model": loaded.config.model.name,
        "data": where,
        "sentences": len(sources),
        **scores,
        "by_length": by_length,
        "decoding": {k: v for k, v in options.items() if k not in ("device", "decoder")}
        | {"device": str(device), "engine": args.engine},
        "seconds": round(seconds, 3),
    }
    _write_json(args, result)
    return result


def _write_json(args: argparse.Namespace, result: dict) -> None:
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as error:
            raise UsageError(f"cannot write --json {args.json}: {error.strerror or error}.") from error


def evaluate_alignments(args: argparse.Namespace, loaded: LoadedModel, device, sources: list[str],
                        references: list[str], where: str) -> dict:
    """AER of the checkpoint's attention against the --alignments links: each extraction's map chosen on the
    first half of the pairs (or on --select-on) and reported on the rest."""
    links = read_pharaoh(args.alignments)
    if args.limit is not None:
        links = links[: args.limit]
    if len(links) != len(sources):
        raise UsageError(f"{where} has {len(sources)} sentence pairs but {args.alignments} has {len(links)} lines; "
                         "give one alignment line per pair, in order.")
    given = AlignmentSet(where, list(zip(sources, references)), links)
    if args.select_on is None:
        selection, held_out = given.halves()
    else:
        selection, held_out = read_alignment_set(args.select_on, loaded.config.data), given
    print(f"forcing {len(selection.pairs) + len(held_out.pairs)} references through the model ...", file=sys.stderr)
    start = time.perf_counter()
    report = score_checkpoint(loaded, selection, held_out, device, list(dict.fromkeys(args.explain or [])))
    return {"checkpoint": str(args.checkpoint), "model": loaded.config.model.name, "data": where,
            "alignments": str(args.alignments), **report.as_dict(), "seconds": round(time.perf_counter() - start, 3)}


def format_report(result: dict) -> str:
    lines = [
        f"{result['model']} on {result['data']}: {result['sentences']} sentences, "
        f"beam {result['decoding']['beam_size']}",
        f"BLEU  {result['bleu']:6.2f}  {result['bleu_signature']}",
        f"chrF  {result['chrf']:6.2f}  {result['chrf_signature']}",
        "",
        "BLEU by source length (SentencePiece tokens):",
        f"  {'tokens':<8}{'count':>7}{'BLEU':>8}",
    ]
    lines += [f"  {row['bucket']:<8}{row['count']:>7}{row['bleu']:>8.2f}" for row in result["by_length"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), report, argv)


def report(args: argparse.Namespace) -> None:
    """Evaluate and print the scores (or the alignment error rates)."""
    result = evaluate(args)
    if "alignments" in result:
        print(format_alignment_table(result, f"{result['model']} on {result['data']}, alignment error rate"))
        return
    print(format_report(result))
    if args.verbose:
        print(f"{result['sentences'] / max(result['seconds'], 1e-9):.1f} sentences/s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
