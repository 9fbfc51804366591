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
import bisect
import logging
import os
import sys
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from seq2seq.checkpoint import CheckpointError, LoadedModel
from seq2seq.cli import UsageError, add_decoding_arguments, decoding_options, load, one_line, read_file_lines, read_lines
from seq2seq.inference.predict import Translation, translate_sentences
from seq2seq.models.base import NO_ATTENTION

log = logging.getLogger("seq2seq.translate")

SHADES = " ░▒▓█"
SHADE_LEVELS = (0.05, 0.15, 0.3, 0.5)  # attention weight at which each next shade starts


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


class AttentionOutput:
    """Where heatmaps go and what to say about them; reports once when the model has no attention."""

    def __init__(self, plot: Path | None, show: bool, has_attention: bool, model_name: str, single: bool) -> None:
        self.plot, self.show, self.written = plot, show, []
        self.enabled = (plot is not None or show) and has_attention
        self.single = single
        if (plot is not None or show) and not has_attention:
            print(
                f"note: the {model_name} model has no attention: {NO_ATTENTION}; no plot was written.",
                file=sys.stderr,
            )

    def path_for(self, number: int) -> Path:
        if self.plot.suffix.lower() != ".png":
            return self.plot / f"{number:04d}.png"
        if self.single:
            return self.plot
        return self.plot.with_name(f"{self.plot.stem}-{number:04d}.png")

    def handle(self, number: int, translation: Translation) -> None:
        hypothesis = translation.best
        if not self.enabled or hypothesis.attention is None or not translation.src_pieces:
            return
        if self.show:
            print(alignment_text(translation), file=sys.stderr)
        if self.plot is not None:
            from seq2seq.analysis.plotting import attention_figure, figure_to_png

            figure = attention_figure(
                hypothesis.attention, translation.src_pieces, hypothesis.attention_pieces,
                title=f"{shorten(translation.source)} → {shorten(hypothesis.text)}",
            )
            path = self.path_for(number)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(figure_to_png(figure))
            except OSError as error:
                raise UsageError(f"cannot write --attention-plot {path}: {error.strerror or error}.") from error
            self.written.append(path)

    def report(self) -> None:
        if self.written:
            shown = ", ".join(str(p) for p in self.written[:3]) + (" ..." if len(self.written) > 3 else "")
            print(f"wrote {len(self.written)} attention plot(s): {shown}", file=sys.stderr)


def display_width(text: str) -> int:
    """Terminal columns: wide (CJK) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, width: int) -> str:
    return text + " " * max(width - display_width(text), 0)


def alignment_text(translation: Translation) -> str:
    """Terminal view of an alignment: per target piece the most attended source piece and its weight, then a
    shaded row over the numbered source pieces (blank < 0.05 <= ░ < 0.15 <= ▒ < 0.3 <= ▓ < 0.5 <= █)."""
    hypothesis = translation.best
    attention = hypothesis.attention
    tgt, src = hypothesis.attention_pieces, translation.src_pieces
    tgt_width = max(display_width(piece) for piece in tgt)
    src_width = max(display_width(piece) for piece in src)
    lines = [f"{translation.source} → {hypothesis.text}"]
    for row, piece in enumerate(tgt):
        weights = attention[row]
        best = int(weights.argmax())
        cells = "".join(SHADES[bisect.bisect_right(SHADE_LEVELS, float(w))] * 2 for w in weights)
        lines.append(f"  {pad(piece, tgt_width)} → {pad(src[best], src_width)} {float(weights[best]):.2f} |{cells}|")
    lines.append("  source: " + " ".join(f"{i}:{piece}" for i, piece in enumerate(src)))
    return "\n".join(lines)


def format_translation(translation: Translation, n_best: int) -> str:
    if n_best == 1:
        return one_line(translation.text) + "\n"
    return "".join(
        f"{rank}\t{hypothesis.score:.4f}\t{one_line(hypothesis.text)}\n"
        for rank, hypothesis in enumerate(translation.hypotheses[:n_best], start=1)
    )


class Output:
    """UTF-8 lines to stdout or a file, written as bytes so the terminal's locale can never make writing fail."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is None:
            self.stream = sys.stdout.buffer
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(path, "wb")
        except OSError as error:
            raise UsageError(f"cannot write --output {path}: {error.strerror or error}.") from error

    def write(self, text: str) -> None:
        self.stream.write(text.encode("utf-8", errors="replace"))
        self.stream.flush()

    def close(self) -> None:
        if self.path is not None:
            self.stream.close()


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
    out = Output(args.output)
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


def report_speed(stats: dict, seconds: float, options: dict) -> None:
    seconds = max(seconds, 1e-9)
    print(
        f"translated {stats['sentences']} sentences in {seconds:.2f} s: "
        f"{stats['sentences'] / seconds:.1f} sentences/s, "
        f"{stats['src_tokens'] / seconds:.0f} source tokens/s, {stats['tgt_tokens'] / seconds:.0f} target tokens/s "
        f"(beam {options['beam_size']}, {options['device']}, {options['precision']})",
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    try:
        if args.n_best < 1 or args.chunk_size < 1:
            raise UsageError("--n-best and --chunk-size must be at least 1.")
        loaded, device = load(args)
        options = decoding_options(args, loaded, device)
        options["beam_size"] = max(options["beam_size"], args.n_best)
        interactive = args.interactive or (not args.sentences and args.input is None and sys.stdin.isatty())
        if interactive:
            run_interactive(args, loaded, options)
        else:
            run_batch(args, loaded, options)
    except (CheckpointError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
