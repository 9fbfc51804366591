"""Compare what several trained models attend to on the same sentence: a side-by-side figure, diagnostics, an
interactive page and a local server.

    python -m seq2seq.inspect --checkpoint rnn.pt --checkpoint bahdanau.pt --checkpoint transformer.pt \\
        我是一个学生。 --out student.png --words --json student.json --html student.html
    python -m seq2seq.inspect --checkpoint transformer.pt 我是一个学生。 --reference "I am a student."
    python -m seq2seq.inspect --checkpoint transformer.pt --pairs valid.tsv --html valid.html
    python -m seq2seq.inspect --checkpoint bahdanau.pt --checkpoint transformer.pt --serve --port 8000
    python -m seq2seq.inspect --checkpoint rnn.pt --checkpoint transformer.pt 我是一个学生。 --out why.png \
        --explain attention --explain integrated-gradients

Each model translates the sentence with beam search (its checkpoint's test beam unless --beam-size), then its
choice is scored once more with teacher forcing to read the attention of every layer and head. With --reference
(or --pairs, a TSV in the checkpoint's corpus layout) the given translation is forced instead: the attention the
model puts on the source while producing that reference, and the loss it gives it.

What is drawn and diagnosed: Bahdanau's additive attention; for the Transformer the mean over all decoder layers
and heads (--layer N: the mean over the heads of layer N; --head H: one head of --layer, default the last;
--heads: one map per head; all numbered from 1). The fixed-context RNN has no attention and gets a panel that
says so. --words draws words instead of SentencePiece pieces; Chinese words come from the jieba segmenter when
installed (`pip install "seq2seq[zh]"`), else characters. Diagnostics are on words either way (see
seq2seq/analysis/inspection.py). --html writes one self-contained page (hover, switch layer / head / mean,
pieces / words); --serve serves it on 127.0.0.1 with a form for new sentences.

--explain puts gradient attributions beside attention (or instead of it): saliency, input-x-gradient or
integrated-gradients (Captum; seq2seq/analysis/attribution.py), how much each target piece's log-probability owes
to each source piece, rows summing to 1 like attention; for every family, the RNN included. Repeat it for several;
each is a panel of the figure and an entry of "attributions" in --json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seq2seq.analysis import diagnostics as analysis
from seq2seq.analysis import inspection, page, server
from seq2seq.analysis.attribution import ATTENTION, EXPLANATIONS
from seq2seq.analysis.plotting import figure_to_png
from seq2seq.atomic import atomic_write
from seq2seq.checkpoint import LoadedModel
from seq2seq.errors import Seq2SeqError, UsageError
from seq2seq.inference import search
from seq2seq.runtime import DEVICES, resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m seq2seq.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentence", nargs="?", help="the source sentence, e.g. 我是一个学生。 (or --sentence)")
    parser.add_argument("--sentence", dest="sentence_option", metavar="TEXT", help="the source sentence")
    parser.add_argument("--checkpoint", action="append", required=True, type=Path,
                        help="a checkpoint; repeat for each model to compare (same language pair)")
    parser.add_argument("--reference", metavar="TEXT",
                        help="a translation of the sentence to force: attention and loss of this target")
    parser.add_argument("--prefix", metavar="TEXT",
                        help="force the translation to begin with this text, then let the search go on (\"what if\")")
    parser.add_argument("--top-k", type=int, default=search.TOP_K,
                        help=f"the page: next words shown per search step (default {search.TOP_K})")
    parser.add_argument("--pairs", type=Path, metavar="FILE.tsv",
                        help="many sentences with references, a TSV in the checkpoint's corpus layout (data.columns)")
    parser.add_argument("--out", type=Path, help="write the side-by-side figure here (PNG; with --pairs, one "
                        "file per pair: NAME_1.png, ...)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the diagnostics here as JSON")
    parser.add_argument("--html", type=Path, metavar="FILE", help="write the interactive page here")
    parser.add_argument("--serve", action="store_true", help="serve the interactive page with a form for new sentences")
    parser.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="--serve: port (default 8000; 0 = any free port)")
    parser.add_argument("--max-chars", type=int, default=server.MAX_SENTENCE_CHARS,
                        help=f"--serve: longest sentence accepted (default {server.MAX_SENTENCE_CHARS} characters)")
    parser.add_argument("--words", action="store_true", help="draw words instead of pieces")
    parser.add_argument("--layer", type=int, help="Transformer: this decoder layer (from 1), mean of its heads")
    parser.add_argument("--head", type=int, help="Transformer: this head (from 1) of --layer (default the last layer)")
    parser.add_argument("--heads", action="store_true",
                        help="Transformer: one map per head of --layer (default: the last layer)")
    parser.add_argument("--coverage-threshold", type=float, default=analysis.COVERAGE_THRESHOLD,
                        help="flag source words that receive less attention than this in total "
                        f"(default {analysis.COVERAGE_THRESHOLD})")
    parser.add_argument("--explain", action="append", choices=EXPLANATIONS, metavar="METHOD",
                        help=f"what explains the translation: {', '.join(EXPLANATIONS)} (default attention; "
                        "repeat for several side by side)")
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


def _print(text: str) -> None:
    sys.stdout.flush()  # the table goes out as UTF-8 bytes, whatever the locale's encoding
    sys.stdout.buffer.write((text + "\n").encode("utf-8"))
    sys.stdout.flush()


def read_pairs(path: Path, loaded: LoadedModel) -> list[tuple[str, str]]:
    """(source, reference) pairs of a TSV in the corpus layout of the checkpoint, every line as given."""
    from seq2seq.data.corpus import CorpusError, load_tsv_pairs  # loads `datasets`, which one sentence does not need

    try:
        pairs, _ = load_tsv_pairs(path, loaded.config.data)
    except CorpusError as error:
        raise UsageError(f"--pairs: {error}") from error
    result = list(zip(pairs.texts("src"), pairs.texts("tgt")))
    if not result:
        raise UsageError(f"--pairs {path} has no sentence pairs.")
    return result


def _inputs(args: argparse.Namespace, models) -> list[tuple[str, str | None]]:
    sentence = args.sentence_option if args.sentence_option is not None else args.sentence
    if args.sentence is not None and args.sentence_option is not None:
        raise UsageError("give the sentence once: as the argument or as --sentence.")
    if args.pairs is not None:
        if sentence is not None or args.reference is not None:
            raise UsageError("--pairs brings its own sentences and references; drop the sentence and --reference.")
        return read_pairs(args.pairs, models[0][1])
    if sentence is None:
        if args.serve:
            return []
        raise UsageError("give a sentence to inspect (or --pairs FILE.tsv, or --serve).")
    return [(sentence, args.reference)]


def _numbered(path: Path, number: int, count: int) -> Path:
    return path if count == 1 else path.with_name(f"{path.stem}_{number}{path.suffix}")


def run(args: argparse.Namespace) -> None:
    if args.beam_size is not None and args.beam_size < 1:
        raise UsageError(f"--beam-size must be at least 1, got {args.beam_size}.")
    if args.max_chars < 1:
        raise UsageError(f"--max-chars must be at least 1, got {args.max_chars}.")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}.")
    if args.prefix is not None and (args.reference is not None or args.pairs is not None):
        raise UsageError("--prefix starts the model's own translation; drop --reference / --pairs (whole targets).")
    device = resolve_device(args.device, setting="--device")
    view = inspection.View(args.layer, args.head, args.heads)
    explanations = list(dict.fromkeys(args.explain or [ATTENTION]))
    methods = [name for name in explanations if name != ATTENTION]
    models = inspection.load_models(args.checkpoint, device)
    inputs = _inputs(args, models)

    def inspect(query: server.Query) -> inspection.Inspection:
        result = inspection.inspect_sentence(models, query.sentence, query.reference, view, args.coverage_threshold,
                                             args.beam_size, device, methods, query.prefix,
                                             query.prefix_ids, query.prefix_model, args.top_k)
        for item in result.inspected:
            if (warning := inspection.truncation_warning(item)) is not None:
                print(warning, file=sys.stderr)
        return result

    results = [inspect(server.Query(sentence, reference, args.prefix)) for sentence, reference in inputs]
    for result in results:
        if len(results) > 1:
            _print(f"\n== {result.sentence}  |  {result.reference}")
        _print(inspection.format_table(result.reports, result.agreement, args.coverage_threshold))
    documents = [{"sentence": r.sentence, "reference": r.reference, "view": view.describe(),
                  "explain": explanations, "coverage_threshold": args.coverage_threshold, "models": r.reports,
                  "agreement": r.agreement}
                 for r in results]
    if args.json:
        document = documents[0] if args.pairs is None else {"pairs": documents}
        _write(args.json, (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8"), "--json")
    for number, result in enumerate(results, start=1):
        if args.out:
            path = _numbered(args.out, number, len(results))
            figure = inspection.comparison_figure(result.inspected, result.sentence, view, args.words, explanations)
            _write(path, figure_to_png(figure), "--out")
            print(f"wrote {path}", file=sys.stderr)
    title = "attention: " + ", ".join(inspection.model_label(path, loaded) for path, loaded in models)
    page_view = page.page_view(view, args.words or args.serve)
    if args.html:
        html = page.render_page([page.page_item(result) for result in results], page_view, title)
        _write(args.html, html.encode("utf-8"), "--html")
        print(f"wrote {args.html}", file=sys.stderr)
    if args.serve:
        live_page = page.render_page([page.page_item(result) for result in results], page_view, title,
                                     live=True, max_chars=args.max_chars)
        server.serve(live_page, lambda query: page.page_item(inspect(query)), args.host, args.port, args.max_chars)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except Seq2SeqError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
