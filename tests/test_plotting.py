"""Heatmaps: Chinese labels drawn with a font that has the glyphs, valid PNGs, sizes that grow with the sentence."""

import io
import logging
import warnings

import numpy as np
import pytest
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.image import imread

from seq2seq.analysis.plotting import attention_figure, cjk_font_path, display_piece, figure_to_png, head_grid_figure

SRC = ["▁我", "是", "一个", "学生", "。"]
TGT = ["▁I", "▁am", "▁a", "▁student", "."]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _attention(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(cols), size=rows)


def _render_capturing(figure, caplog) -> tuple[bytes, list[str]]:
    """PNG bytes and every warning or log record emitted while drawing."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        png = figure_to_png(figure)
    return png, [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]


def test_cjk_font_has_chinese_glyphs():
    charmap = FT2Font(str(cjk_font_path())).get_charmap()
    assert all(ord(ch) in charmap for ch in "我是一个学生學▁")


def test_tick_labels_use_a_font_with_the_glyphs(caplog):
    figure = attention_figure(_attention(5, 5), SRC, TGT, title="我是一个学生。")
    FigureCanvasAgg(figure).draw()
    labels = [t for ax in figure.axes[:1] for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert [t.get_text() for t in labels[: len(SRC)]] == SRC
    for label in labels:
        path = font_manager.findfont(label.get_fontproperties(), fallback_to_default=False)
        charmap = FT2Font(path).get_charmap()
        assert all(ord(ch) in charmap for ch in label.get_text()), (label.get_text(), path)
    _, messages = _render_capturing(figure, caplog)
    assert not [m for m in messages if "missing" in m.lower()], messages


def test_missing_glyph_detection_works(caplog):
    """The check above must be able to fail: Chinese drawn with a Latin-only font is reported."""
    figure = Figure()
    FigureCanvasAgg(figure)
    figure.add_subplot().set_title("学生", fontfamily="DejaVu Sans")
    _, messages = _render_capturing(figure, caplog)
    assert any("missing" in m.lower() for m in messages)


def test_png_is_valid_and_decodes():
    png = figure_to_png(attention_figure(_attention(5, 5), SRC, TGT))
    assert png.startswith(PNG_MAGIC)
    image = imread(io.BytesIO(png), format="png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_figure_grows_with_tokens():
    small = attention_figure(_attention(5, 5), SRC, TGT).get_size_inches()
    src30 = [f"▁w{i}" for i in range(30)]
    big = attention_figure(_attention(30, 30), src30, src30).get_size_inches()
    assert big[0] > 2 * small[0] and big[1] > 2 * small[1]


def test_head_grid_has_one_panel_per_head(caplog):
    figure = head_grid_figure(np.stack([_attention(5, 5, seed) for seed in range(6)]), SRC, TGT)
    panels = [ax for ax in figure.axes if ax.images and ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(1, 7)]  # from 1, like --layer
    png, messages = _render_capturing(figure, caplog)
    assert png.startswith(PNG_MAGIC)
    assert not [m for m in messages if "missing" in m.lower()], messages


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="5 target pieces x 4 source pieces"):
        attention_figure(_attention(5, 5), SRC[:4], TGT)
    with pytest.raises(ValueError, match="H, T, S"):
        head_grid_figure(_attention(5, 5), SRC, TGT)


def test_undrawable_characters_are_spelled_out(caplog):
    assert display_piece("▁学生") == "▁学生"
    assert display_piece("a🧠") == "a<U+1F9E0>"
    figure = attention_figure(_attention(2, 2), ["🧠", "学"], ["▁smile", "▁study"])
    _, messages = _render_capturing(figure, caplog)
    assert not [m for m in messages if "missing" in m.lower()], messages


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    attention = torch.tensor(_attention(5, 5), dtype=torch.bfloat16)
    assert figure_to_png(attention_figure(attention, SRC, TGT)).startswith(PNG_MAGIC)


def test_long_sentences_stay_within_bounds(caplog):
    pieces = [f"▁词{i}" for i in range(250)]
    figure = attention_figure(_attention(250, 250), pieces, pieces, title="长" * 500)
    width, height = figure.get_size_inches()
    assert width <= 40 and height <= 40
    assert len(figure.get_suptitle()) <= 120
