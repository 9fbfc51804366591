"""Attention heatmaps labelled with the real SentencePiece pieces, for TensorBoard, `translate --attention-plot`
and the side-by-side comparison of several models that `seq2seq.inspect` draws.

Chinese needs a CJK font, and a fresh machine has none matplotlib knows of: the `mplfonts` package ships Noto Sans
CJK SC, which is registered here and put first in the tick labels' font list (DejaVu Sans as Latin fallback).
Pieces keep SentencePiece's "▁" word-boundary mark, so what is drawn is exactly what the model saw.
Figures are built without pyplot (Agg canvas), so plotting works in threads, servers and headless runs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font

from seq2seq.analysis.diagnostics import display_width

CJK_FONT_FILE = "NotoSansCJKsc-Regular.otf"
LATIN_FALLBACK = "DejaVu Sans"
CMAP = "viridis"
INCHES_PER_TOKEN = 0.36
MAX_INCHES = 40.0
MAX_TITLE_CHARS = 120


def cjk_font_path() -> Path:
    """Noto Sans CJK SC as shipped by the `mplfonts` package (found without importing it)."""
    spec = find_spec("mplfonts")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the `mplfonts` package is not installed; `pip install mplfonts` to draw Chinese labels.")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "fonts" / CJK_FONT_FILE
        if path.is_file():
            return path
    raise RuntimeError(
        f"`mplfonts` is installed but has no fonts/{CJK_FONT_FILE}; reinstall it (`pip install -U mplfonts`)."
    )


@lru_cache(maxsize=1)
def font_family() -> list[str]:
    """Register the CJK font with matplotlib once and return the family list tick labels use."""
    path = cjk_font_path()
    font_manager.fontManager.addfont(str(path))
    return [font_manager.FontProperties(fname=str(path)).get_name(), LATIN_FALLBACK]


@lru_cache(maxsize=1)
def _drawable_codepoints() -> frozenset[int]:
    """Characters the CJK font or its Latin fallback can draw."""
    cjk = FT2Font(str(cjk_font_path())).get_charmap()
    latin = FT2Font(font_manager.findfont(LATIN_FALLBACK, fallback_to_default=True)).get_charmap()
    return frozenset(cjk) | frozenset(latin)


def display_piece(piece: str) -> str:
    """A label that can be drawn: control characters and characters no font covers (emoji, rare symbols) become
    <U+XXXX> instead of boxes or missing-glyph warnings."""
    drawable = _drawable_codepoints()
    return "".join(
        ch if ord(ch) in drawable and ch.isprintable() else f"<U+{ord(ch):04X}>" for ch in piece
    )


def _as_array(attention) -> np.ndarray:
    if hasattr(attention, "detach"):  # a torch tensor, possibly bf16 or on a GPU
        attention = attention.detach().float().cpu().numpy()
    return np.asarray(attention, dtype=np.float32)


def _check_shape(matrix: np.ndarray, src_pieces: Sequence[str], tgt_pieces: Sequence[str]) -> None:
    if matrix.shape[-2:] != (len(tgt_pieces), len(src_pieces)):
        raise ValueError(
            f"attention of shape {tuple(matrix.shape)} does not match {len(tgt_pieces)} target pieces x "
            f"{len(src_pieces)} source pieces."
        )


def _label_size(n_tokens: int) -> float:
    """Font size that stays inside a cell as the grid grows past what MAX_INCHES allows at full size."""
    inches_per_token = min(INCHES_PER_TOKEN, MAX_INCHES / max(n_tokens, 1))
    return max(3.0, min(9.0, 9.0 * inches_per_token / INCHES_PER_TOKEN))


def _label_inches(label: str, size: float) -> float:
    """Rough printed width: about 0.55 em per narrow character, twice that for wide (CJK) ones."""
    return display_width(label) * 0.55 * size / 72


def _draw(
    ax, matrix: np.ndarray, src_pieces: Sequence[str], tgt_pieces: Sequence[str], label_size: float, cell: float,
    show_y: bool = True,
):
    """One heatmap on `ax`: source pieces along x (top), target pieces down y, thin white cell borders."""
    family = font_family()
    image = ax.imshow(matrix, cmap=CMAP, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    src_labels = [display_piece(p) for p in src_pieces]
    tgt_labels = [display_piece(p) for p in tgt_pieces]
    # Pieces read best upright (Chinese above all); they are slanted only when one would overlap its neighbour.
    rotation = 0 if max((_label_inches(label, label_size) for label in src_labels), default=0) <= cell else 60
    ax.xaxis.tick_top()
    ax.set_xticks(range(len(src_labels)))
    ax.set_xticklabels(
        src_labels, fontfamily=family, fontsize=label_size, rotation=rotation,
        ha="left" if rotation else "center", rotation_mode="anchor",
    )
    ax.set_yticks(range(len(tgt_labels)))
    if show_y:
        ax.set_yticklabels(tgt_labels, fontfamily=family, fontsize=label_size)
    else:
        ax.set_yticklabels([])
    ax.set_xticks(np.arange(-0.5, len(src_labels), 1.0), minor=True)
    ax.set_yticks(np.arange(-0.5, len(tgt_labels), 1.0), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.4, alpha=0.5)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(which="major", length=2)
    return image


def _shorten(text: str, limit: int = MAX_TITLE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _set_title(figure: Figure, title: str) -> None:
    """Suptitle in the CJK font, shortened so a long sentence cannot stretch the figure."""
    figure.suptitle(display_piece(_shorten(title)), fontfamily=font_family(), fontsize=10)


def _canvas_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(min(width, MAX_INCHES), min(height, MAX_INCHES)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def attention_figure(attention, src_pieces: Sequence[str], tgt_pieces: Sequence[str], title: str = "") -> Figure:
    """Heatmap of a (T, S) attention matrix: target pieces (rows) against source pieces (columns), with a colour bar."""
    matrix = _as_array(attention)
    if matrix.ndim != 2:
        raise ValueError(f"attention_figure expects a (T, S) matrix, got shape {tuple(matrix.shape)}.")
    _check_shape(matrix, src_pieces, tgt_pieces)
    longest = max(len(src_pieces), len(tgt_pieces))
    size = _label_size(longest)
    step = INCHES_PER_TOKEN * size / 9.0
    figure = _canvas_figure(2.8 + step * len(src_pieces), 1.8 + step * len(tgt_pieces))
    ax = figure.add_subplot()
    image = _draw(ax, matrix, src_pieces, tgt_pieces, size, step)
    ax.set_xlabel("source", fontsize=9)
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("target", fontsize=9)
    figure.colorbar(image, ax=ax, shrink=0.9, label="attention weight")
    if title:
        _set_title(figure, title)
    return figure


def head_grid_figure(attention, src_pieces: Sequence[str], tgt_pieces: Sequence[str], title: str = "") -> Figure:
    """One heatmap per head of an (H, T, S) tensor, sharing one colour bar: shows what each head specialises in."""
    matrix = _as_array(attention)
    if matrix.ndim != 3:
        raise ValueError(f"head_grid_figure expects an (H, T, S) tensor, got shape {tuple(matrix.shape)}.")
    _check_shape(matrix, src_pieces, tgt_pieces)
    heads = matrix.shape[0]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    size = _label_size(max(len(src_pieces), len(tgt_pieces)) * cols)
    step = INCHES_PER_TOKEN * size / 9.0
    figure = _canvas_figure(
        1.5 + cols * (1.2 + step * len(src_pieces)), 1.2 + rows * (1.2 + step * len(tgt_pieces))
    )
    axes = figure.subplots(rows, cols, squeeze=False)
    image = None
    for head in range(rows * cols):
        ax = axes[head // cols][head % cols]
        if head >= heads:
            ax.set_axis_off()
            continue
        image = _draw(ax, matrix[head], src_pieces, tgt_pieces, size, step, show_y=head % cols == 0)
        ax.set_title(f"head {head + 1}", fontsize=9)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    if title:
        _set_title(figure, title)
    return figure


@dataclass
class Panel:
    """One model's column of a side-by-side figure. `attention` is (T, S) for one heatmap, (H, T, S) for a grid
    of heads, or None for a model without attention, which gets `note` written in its place."""

    title: str
    translation: str
    src_labels: Sequence[str]
    tgt_labels: Sequence[str]
    attention: np.ndarray | None = None
    note: str = ""


PANEL_TITLE_CHARS = 60
HEAD_COLUMNS = 2


def _panel_grid(panel: Panel) -> tuple[int, int]:
    """(rows, columns) of heatmaps in a panel."""
    if panel.attention is None or panel.attention.ndim == 2:
        return 1, 1
    heads = panel.attention.shape[0]
    columns = min(heads, HEAD_COLUMNS)
    return math.ceil(heads / columns), columns


def side_by_side_figure(panels: Sequence[Panel], title: str = "", scale: str = "attention weight",
                        columns: int | None = None) -> Figure:
    """Several models' attention (or attributions) on the same sentence, one panel each with the model's name
    and translation above it, `columns` panels a row (default all in one row), on one colour scale (0 to 1,
    named `scale`) so the maps compare directly."""
    if not panels:
        raise ValueError("side_by_side_figure needs at least one panel.")
    columns = min(columns or len(panels), len(panels))
    rows_of_panels = math.ceil(len(panels) / columns)
    matrices = [None if panel.attention is None else _as_array(panel.attention) for panel in panels]
    for panel, matrix in zip(panels, matrices):
        if matrix is not None:
            if matrix.ndim not in (2, 3):
                raise ValueError(f"panel {panel.title!r}: attention must be (T, S) or (H, T, S), got {matrix.shape}.")
            _check_shape(matrix, panel.src_labels, panel.tgt_labels)
    grids = [_panel_grid(panel) for panel in panels]
    longest = max(max(len(p.src_labels) * cols, len(p.tgt_labels) * rows) for p, (rows, cols) in zip(panels, grids))
    size = _label_size(longest * columns)
    step = INCHES_PER_TOKEN * size / 9.0
    widths = [
        1.4 + cols * (0.3 + step * max(len(p.src_labels), 4)) for p, (rows, cols) in zip(panels, grids)
    ]
    heights = [1.6 + rows * (0.4 + step * max(len(p.tgt_labels), 4)) for p, (rows, cols) in zip(panels, grids)]
    column_widths = [max(widths[start::columns]) for start in range(columns)]
    row_heights = [max(heights[start: start + columns]) for start in range(0, len(panels), columns)]
    figure = _canvas_figure(sum(column_widths) + 1.0, sum(row_heights) + (0.4 if title else 0.0))
    places = figure.subfigures(rows_of_panels, columns, width_ratios=column_widths, height_ratios=row_heights,
                               squeeze=False).ravel()
    image, heatmap_axes = None, []
    for column, panel, matrix, (rows, cols) in zip(places, panels, matrices, grids):
        column.suptitle(
            f"{display_piece(_shorten(panel.title, PANEL_TITLE_CHARS))}\n"
            f"{display_piece(_shorten(panel.translation or '(empty translation)', PANEL_TITLE_CHARS))}",
            fontfamily=font_family(), fontsize=9,
        )
        axes = column.subplots(rows, cols, squeeze=False)
        if matrix is None:
            axes[0][0].set_axis_off()
            axes[0][0].text(0.5, 0.5, panel.note, ha="center", va="center", wrap=True, fontsize=9,
                            fontfamily=font_family(), transform=axes[0][0].transAxes)
            continue
        maps = matrix[None] if matrix.ndim == 2 else matrix
        for index in range(rows * cols):
            ax = axes[index // cols][index % cols]
            if index >= len(maps):
                ax.set_axis_off()
                continue
            image = _draw(ax, maps[index], panel.src_labels, panel.tgt_labels, size, step, show_y=index % cols == 0)
            ax.set_aspect("equal")  # square cells: the panels of models with different lengths stay comparable
            heatmap_axes.append(ax)
            if matrix.ndim == 3:
                ax.set_title(f"head {index + 1}", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=heatmap_axes[-1], shrink=0.8, label=scale)
    if title:
        _set_title(figure, title)
    return figure


def figure_to_png(figure: Figure) -> bytes:
    """Render to PNG bytes and release the figure (it cannot be drawn again afterwards)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    figure.clear()
    return buffer.getvalue()
