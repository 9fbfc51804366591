"""Translations as output lines: the format of `seq2seq.translate` (one line per input, or RANK<TAB>SCORE<TAB>TEXT
lines with --n-best) and a writer that can never fail on the terminal's locale."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from seq2seq.errors import UsageError
from seq2seq.inference.predict import Translation

# Everything str.splitlines() treats as a line break: none may reach the output, or line counts would drift.
LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")


class OutputError(UsageError):
    """A file that output was to go to cannot be written; the message names it and why."""


def one_line(text: str) -> str:
    return LINE_BREAKS.sub(" ", text)


def format_translation(translation: Translation, n_best: int) -> str:
    """The output line of one input, or its `n_best` lines RANK<TAB>SCORE<TAB>TEXT, best first."""
    if n_best == 1:
        return one_line(translation.text) + "\n"
    return "".join(
        f"{rank}\t{hypothesis.score:.4f}\t{one_line(hypothesis.text)}\n"
        for rank, hypothesis in enumerate(translation.hypotheses[:n_best], start=1)
    )


class TranslationWriter:
    """UTF-8 lines to stdout or a file, written as bytes so the terminal's locale can never make writing fail."""

    def __init__(self, path: Path | None, setting: str = "--output") -> None:
        self.path = path
        if path is None:
            self.stream = sys.stdout.buffer
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(path, "wb")
        except OSError as error:
            raise OutputError(f"cannot write {setting} {path}: {error.strerror or error}.") from error

    def write(self, text: str) -> None:
        self.stream.write(text.encode("utf-8", errors="replace"))
        self.stream.flush()

    def close(self) -> None:
        if self.path is not None:
            self.stream.close()
