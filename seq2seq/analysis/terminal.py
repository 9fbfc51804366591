"""Attention of a translation where `seq2seq.translate` puts it: as text on a terminal (per target piece the most
attended source piece, and a shaded grid) and as heatmap files."""

from __future__ import annotations

import bisect
import sys
from pathlib import Path

from seq2seq.analysis.diagnostics import display_width
from seq2seq.inference.output import OutputError
from seq2seq.inference.predict import Translation
from seq2seq.models.base import NO_ATTENTION

SHADES = " ░▒▓█"
SHADE_LEVELS = (0.05, 0.15, 0.3, 0.5)  # attention weight at which each next shade starts


def pad(text: str, width: int) -> str:
    return text + " " * max(width - display_width(text), 0)


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
                raise OutputError(f"cannot write --attention-plot {path}: {error.strerror or error}.") from error
            self.written.append(path)

    def report(self) -> None:
        if self.written:
            shown = ", ".join(str(p) for p in self.written[:3]) + (" ..." if len(self.written) > 3 else "")
            print(f"wrote {len(self.written)} attention plot(s): {shown}", file=sys.stderr)
