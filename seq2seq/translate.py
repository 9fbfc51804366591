"""Translate with a trained checkpoint: `python -m seq2seq.translate` (console script `seq2seq-translate`).

    seq2seq-translate --checkpoint runs/.../best.pt 我是一个学生。 他昨天去了图书馆。
    seq2seq-translate --checkpoint best.pt < input.zh > output.en        # one translation per input line
    seq2seq-translate --checkpoint best.pt --input input.zh --output output.en --verbose
    seq2seq-translate --checkpoint best.pt --interactive                 # a "> " prompt; quit or Ctrl-D ends
    seq2seq-translate --checkpoint best.pt --attention-plot heat.png --show-attention 我是一个学生。
    seq2seq-translate --checkpoint best.pt --n-best 3 我是一个学生。

Output: exactly one line per input line, in order (an empty input line gives an empty output line). With
--n-best K each input gives up to K lines `RANK<TAB>SCORE<TAB>TEXT`, ranks 1..K best first (so a new input starts
at rank 1), SCORE the length-normalised log-probability the beam search ranks by; an empty input gives the
single line `1<TAB>0.0000<TAB>`. Progress, warnings, --show-attention and --verbose go to stderr, so stdout can
be piped. Errors a user can fix (missing or damaged checkpoint, unreadable input) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from seq2seq.checkpoint import LoadedModel
from seq2seq.analysis.terminal import AttentionOutput
from seq2seq.cli import add_decoding_arguments, decoding_options, load, read_file_lines, read_lines, run_command
from seq2seq.errors import UsageError
from seq2seq.inference.output import TranslationWriter, format_translation
from seq2seq.inference.predict import translate_sentences

log = logging.getLogger("seq2seq.translate")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2seq-translate",
        description="Translate sentences with a trained seq2seq checkpoint.",
        epilog="Reads SENTENCE arguments, else --input FILE, else standard input (one sentence a line), and writes "
        "one translation a line. With --n-best K: up to K lines RANK<TAB>SCORE<TAB>TEXT per input, best first.",
    )
    add_decoding_arguments(parser)
    parser.add_argument("sentences", nargs="*", metavar="SENTENCE", help="sentences to translate")
    parser.add_argument("--input", type=Path, help="read sentences from this file, one a line (UTF-8)")
    parser.add_argument("--output", type=Path, help="write translations to this file instead of stdout")
    parser.add_argument("--interactive", action="store_true",
                        help="prompt for sentences (the default when stdin is a terminal)")
    parser.add_argument("--n-best", type=int, default=1, metavar="K", help="print the K best hypotheses with scores")
    parser.add_argument("--attention-plot", type=Path, metavar="PATH",
                        help="save attention heatmaps: FILE.png for one sentence (several: FILE-0001.png, ... "
                        "numbered by input line), or a folder (one NNNN.png per input line)")
    parser.add_argument("--show-attention", action="store_true",
                        help="print each target piece's most attended source piece, and a shaded grid, to stderr")
    parser.add_argument("--chunk-size", type=int, default=2000,
                        help="sentences read (and sorted by length) at a time; 1 answers each line at once "
                        "(default 2000)")
    return parser


def input_sentences(args: argparse.Namespace) -> tuple[Iterable[str], bool]:
    """The sentences to translate and whether the count is known to be one (for the attention plot name)."""
    if args.sentences:
        if args.input is not None:
            raise UsageError("give sentences as arguments or with --input FILE, not both.")
        return list(args.sentences), len(args.sentences) == 1
    if args.input is not None:
        if not args.input.is_file():
            raise UsageError(f"--input {args.input} does not exist or is not a file.")
        return read_file_lines(args.input), False
    return read_lines(sys.stdin.buffer), False


def run_batch(args: argparse.Namespace, loaded: LoadedModel, options: dict) -> None:
    sentences, single = input_sentences(args)
    attention = AttentionOutput(
        args.attention_plot, args.show_attention, loaded.model.has_attention, loaded.config.model.name, single
    )
    out = TranslationWriter(args.output)
    stats = {"sentences": 0, "src_tokens": 0, "tgt_tokens": 0}
    progress = None
    if sys.stderr.isatty() and not args.sentences:
        from tqdm import tqdm

        progress = tqdm(unit=" sent", file=sys.stderr, leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for number, translation in enumerate(
            translate_sentences(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, sentences,
                                n_best=args.n_best, chunk_size=args.chunk_size, **options),
            start=1,
        ):
            out.write(format_translation(translation, args.n_best))
            attention.handle(number, translation)
            stats["sentences"] += 1
            stats["src_tokens"] += translation.num_src_tokens
            stats["tgt_tokens"] += len(translation.best.pieces)
            if progress is not None:
                progress.update()
    finally:
        if progress is not None:
            progress.close()
        out.close()
    attention.report()
    if args.verbose:
        report_speed(stats, time.perf_counter() - start, options)


def engine_name(options: dict) -> str:
    """What decodes: our search's precision, or CTranslate2 and what it computes in."""
    decoder = options.get("decoder")
    return f"ctranslate2 {decoder.compute_type}" if decoder is not None else options["precision"]


def report_speed(stats: dict, seconds: float, options: dict) -> None:
    seconds = max(seconds, 1e-9)
    print(
        f"translated {stats['sentences']} sentences in {seconds:.2f} s: "
        f"{stats['sentences'] / seconds:.1f} sentences/s, "
        f"{stats['src_tokens'] / seconds:.0f} source tokens/s, {stats['tgt_tokens'] / seconds:.0f} target tokens/s "
        f"(beam {options['beam_size']}, {options['device']}, {engine_name(options)})",
        file=sys.stderr,
    )


def run_interactive(args: argparse.Namespace, loaded: LoadedModel, options: dict) -> None:
    """A prompt loop for exploring a model: each line is translated as soon as it is entered."""
    attention = AttentionOutput(
        args.attention_plot, args.show_attention, loaded.model.has_attention, loaded.config.model.name, True
    )
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # a mistyped byte must not end the session
    print(f"{loaded.config.model.name} model, beam {options['beam_size']}. Type a sentence; 'quit' or Ctrl-D ends.",
          file=sys.stderr)
    while True:
        try:
            print("> ", end="", file=sys.stderr, flush=True)  # the prompt is not output: stdout holds translations only
            line = input()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip().lower() in ("quit", "exit", ":q"):
            return
        if not line.strip():
            continue
        (translation,) = translate_sentences(
            loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, [line], n_best=args.n_best, **options
        )
        sys.stdout.write(format_translation(translation, args.n_best))
        sys.stdout.flush()
        attention.handle(1, translation)
        attention.report()
        attention.written.clear()


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), translate, argv)


def translate(args: argparse.Namespace) -> None:
    """Translate the command line's sentences, a file or stdin, or talk to the user."""
    if args.n_best < 1 or args.chunk_size < 1:
        raise UsageError("--n-best and --chunk-size must be at least 1.")
    if args.engine == "ctranslate2" and (args.attention_plot or args.show_attention):
        raise UsageError("--engine ctranslate2 returns no attention; drop --attention-plot / --show-attention, or "
                         "the --engine option.")
    loaded, device = load(args)
    options = decoding_options(args, loaded, device)
    options["beam_size"] = max(options["beam_size"], args.n_best)
    interactive = args.interactive or (not args.sentences and args.input is None and sys.stdin.isatty())
    if interactive:
        run_interactive(args, loaded, options)
    else:
        run_batch(args, loaded, options)


if __name__ == "__main__":
    sys.exit(main())
