"""One look for every figure: the style file, column widths, fixed colours, and saving.

Every figure is drawn inside :func:`styled` (``paper.mplstyle`` next to this file: DejaVu Sans,
nothing below 8 pt) at the printed width of a single column (:data:`SINGLE`, 3.3 in) or a
whole page (:data:`DOUBLE`, 6.9 in), so the sizes in the style file are the sizes on paper.
Colours come from Okabe & Ito's colour-blind-safe palette ("Color Universal Design", 2008;
B. Wong, "Points of view: Color blindness", Nature Methods 8, 441, 2011), extended with Paul
Tol's "muted" colours where more are needed, and are fixed: base, unlearned and oracle always
look the same, and so does each method (colour and marker), in every figure of every run.

:func:`save_figure` writes each figure as vector PDF, SVG and a 200 dpi PNG (the formats of
:func:`formats`, set from ``--fig-format``), each exactly the figure's size.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.text import Text

from core.cli_options import FIG_FORMATS

matplotlib.use("Agg")  # headless; the analysis modules never import pyplot

STYLE_FILE = Path(__file__).with_name("paper.mplstyle")
SINGLE = 3.3  # inches: one column of a two-column paper
DOUBLE = 6.9  # inches: the whole text width
WIDTHS = (SINGLE, DOUBLE)
MIN_FONT_PT = 8.0
PNG_DPI = 200

# Okabe & Ito
BLACK, ORANGE, SKY, GREEN = "#000000", "#E69F00", "#56B4E9", "#009E73"
YELLOW, BLUE, VERMILLION, PURPLE = "#F0E442", "#0072B2", "#D55E00", "#CC79A7"
# Tol "muted"
INDIGO, CYAN, TEAL, DARK_GREEN = "#332288", "#88CCEE", "#44AA99", "#117733"
OLIVE, SAND, WINE, MAGENTA = "#999933", "#DDCC77", "#882255", "#AA4499"
GREY = "#7F7F7F"

ROLES = ("base", "unlearned", "oracle")
ROLE_COLORS = {"base": GREY, "unlearned": BLUE, "oracle": GREEN}
ROLE_MARKERS = {"base": "s", "unlearned": "o", "oracle": "D"}
ROLE_TITLES = {"base": "base", "unlearned": "unlearned", "oracle": "retrain oracle"}
# the forget set stands out in vermillion, which no class of a t-SNE map and no role uses
FORGET_COLOR = VERMILLION
TEST_COLOR = SKY

# (colour, marker) per method: variants of one idea share a colour and differ in marker
METHOD_STYLE: dict[str, tuple[str, str]] = {
    "ft": (ORANGE, "o"),
    "ga": (SKY, "s"),
    "rl_split": (PURPLE, "^"),
    "rl": (BLUE, "D"),
    "l1_sparse": (VERMILLION, "v"),
    "ga_small": (SKY, "<"),
    "bad_teacher": (BLACK, "P"),
    "boundary_shrink": (INDIGO, "X"),
    "freeze_salient": (WINE, "h"),
    "kit_ft": (ORANGE, ">"),
    "prune_reinit": (OLIVE, "p"),
    "scrub": (TEAL, "*"),
    "ssd": (SAND, "d"),
    "uniform_forget": (MAGENTA, "H"),
    "retrain": (GREEN, "8"),
}
_SPARE_COLORS = (ORANGE, SKY, PURPLE, BLUE, VERMILLION, BLACK, INDIGO, WINE, OLIVE, TEAL, MAGENTA)
_SPARE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "p", "*", "<", ">")

# class colours for maps coloured by class; none of them is close to FORGET_COLOR
CLASS_COLORS = (BLUE, SKY, DARK_GREEN, PURPLE, INDIGO, OLIVE, TEAL, WINE, BLACK,
                ORANGE, CYAN, SAND, MAGENTA, GREY)  # fmt: skip


def method_style(method: str) -> tuple[str, str]:
    """The fixed (colour, marker) of a method; a method not listed gets one from its name's
    hash, so it too looks the same in every figure and run."""
    if method in METHOD_STYLE:
        return METHOD_STYLE[method]
    h = int(hashlib.sha256(method.encode()).hexdigest(), 16)
    return _SPARE_COLORS[h % len(_SPARE_COLORS)], _SPARE_MARKERS[(h // 97) % len(_SPARE_MARKERS)]


def class_colors(num_classes: int, forget_classes: Sequence[int] = ()) -> np.ndarray:
    """One RGBA colour per class; forgotten classes in FORGET_COLOR, the others from
    CLASS_COLORS in order (a continuous map beyond its length)."""
    others = [c for c in range(num_classes) if c not in set(forget_classes)]
    out = np.zeros((num_classes, 4))
    if len(others) <= len(CLASS_COLORS):
        for k, c in enumerate(others):
            out[c] = to_rgba(CLASS_COLORS[k])
    else:
        cmap = matplotlib.colormaps["viridis"]
        for k, c in enumerate(others):
            out[c] = cmap(k / max(1, len(others) - 1))
    for c in forget_classes:
        if 0 <= c < num_classes:
            out[c] = to_rgba(FORGET_COLOR)
    return out


# ---------------------------------------------------------------------------------------------
# Applying the style

F = TypeVar("F", bound=Callable[..., Any])


def styled(fn: F) -> F:
    """Run a plotting function inside the style (fonts and sizes are read when artists are
    made, so the whole function runs in it)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context(fname=str(STYLE_FILE)):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def figure(width: float, height: float) -> Figure:
    """A figure of a printed width (SINGLE or DOUBLE) with constrained layout."""
    if width not in WIDTHS:
        raise ValueError(f"figure width {width} in is not a column width {WIDTHS}")
    return Figure(figsize=(width, height), layout="constrained")


# ---------------------------------------------------------------------------------------------
# Saving

_FORMATS: ContextVar[tuple[str, ...]] = ContextVar("fig_formats", default=FIG_FORMATS)


@contextlib.contextmanager
def formats(chosen: Sequence[str]) -> Iterator[None]:
    """Save every figure made inside in `chosen` formats (of FIG_FORMATS)."""
    token = _FORMATS.set(tuple(f for f in FIG_FORMATS if f in chosen))
    try:
        yield
    finally:
        _FORMATS.reset(token)


@dataclass
class Plot:
    """One figure of a report: its files (by format), what it shows, where it goes."""

    path: Path  # the PNG, else the SVG, else the PDF: the file a page or W&B shows
    caption: str
    section: str
    title: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    experiment: str = ""  # "" for a figure of the whole run folder
    seed: int | None = None  # None for a figure aggregated over seeds

    def file(self, *prefer: str) -> Path:
        """The first of the `prefer` formats that was written (else ``path``)."""
        for f in prefer:
            if f in self.files:
                return self.files[f]
        return self.path


def primary(files: dict[str, Path]) -> Path:
    for f in ("png", "svg", "pdf"):
        if f in files:
            return files[f]
    raise ValueError("no figure file written")


# deterministic files: no creation dates in the metadata
_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {"Software": None}}


def save_figure(fig: Figure, path: Path) -> dict[str, Path]:
    """Write `fig` as ``<path stem>.<format>`` for every chosen format; PNG at 200 dpi."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    with matplotlib.rc_context(fname=str(STYLE_FILE)):
        # lay the figure out once: the same positions for every format, and 3x less work
        fig.draw_without_rendering()
        fig.set_layout_engine("none")
        for fmt in _FORMATS.get():
            out = path.with_suffix("." + fmt)
            fig.savefig(out, format=fmt, dpi=PNG_DPI, metadata=_METADATA[fmt])
            written[fmt] = out
    return written


def text_sizes(fig: Figure) -> list[tuple[str, float]]:
    """(text, size in pt) of every visible, non-empty text of a figure (ticks, labels,
    titles, legends, annotations), as drawn."""
    fig.draw_without_rendering()  # tick labels get their text only when drawn
    return [
        (t.get_text(), float(t.get_fontsize()))
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip()
    ]
