"""Figures, drawn on explicit :class:`matplotlib.figure.Figure` objects.

pyplot is never imported: a ``Figure`` built directly has no global state to
leak between calls and renders with the Agg canvas whatever the user's
backend, so stages can run headless.

Drawing speed (the detect stage draws one figure per method and OOD set):

- the layout is computed here from the measured sizes of the few texts around
  the axes. Constrained layout measured every text again and drew the figure
  twice per save: a third of the time of a figure;
- :func:`plot_layer_auroc` keeps one built chart per list of layers
  (:class:`_Chart`) and redraws only what depends on the AUROCs and title over
  a saved image of the rest (matplotlib's blitting). Its PNG is byte for byte
  what ``layer_auroc_figure(...).savefig(path, dpi=DPI, pil_kwargs=PNG_KWARGS)``
  writes, which tests/test_plots.py checks.
"""

from __future__ import annotations

import functools
import logging
import threading
from operator import attrgetter
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import ScaledTranslation

from pipeline.errors import DataError, invalid_param

log = logging.getLogger(__name__)

BEATS_COLOR = "tab:green"
REFERENCE_COLOR = "dimgray"
OTHER_COLOR = "lightsteelblue"
DPI = 120
# zlib level 1 encodes in about 0.7 of the time of PIL's default (6); files are ~10% larger.
# The PNG's only text chunk is matplotlib's "Software" (no date): same inputs, same bytes.
PNG_KWARGS = {"compress_level": 1}
# Points between the figure's edge and the outermost text (constrained layout's default pad).
EDGE_PAD = 3.0
# The axes are never shorter than this, in inches: the figure grows taller instead.
MIN_AXES_HEIGHT = 2.0
# Tall glyphs whose ascent the room above the axes holds, whatever the title's text.
TITLE_PROBE = "bdfhkl|()[]{}"


def bar_colors(aurocs, reference_index):
    """Colour of each bar of the per-layer AUROC chart.

    Parameters
    ----------
    aurocs : array-like of shape (n_layers,)
        AUROC per layer, in network order.
    reference_index : int
        Position of the reference layer in ``aurocs``.

    Returns
    -------
    list of str
        ``BEATS_COLOR`` for layers strictly above the reference AUROC,
        ``REFERENCE_COLOR`` for the reference itself, ``OTHER_COLOR`` otherwise.
    """
    aurocs = np.asarray(aurocs, dtype=float)
    reference = aurocs[reference_index]
    colors = [BEATS_COLOR if value > reference else OTHER_COLOR for value in aurocs]
    colors[reference_index] = REFERENCE_COLOR
    return colors


def _check_inputs(layers, aurocs, reference_layer):
    """Validate the chart's inputs; return the AUROCs as floats and the reference index."""
    layers = list(layers)
    aurocs = np.asarray(aurocs, dtype=float)
    if aurocs.ndim != 1 or len(layers) != aurocs.size:
        raise DataError(f"Got {len(layers)} layer names but aurocs of shape {aurocs.shape}; they must match.")
    if not layers:
        raise DataError("layers is empty: there is nothing to plot.")
    if len(set(layers)) != len(layers):
        raise DataError(f"Layer names must be unique. Got {layers}.")
    if not np.all((aurocs >= 0) & (aurocs <= 1)):
        raise DataError(f"Every AUROC must be a number in [0, 1]. Got {aurocs.tolist()}.")
    if reference_layer is None:
        # The seed-000 figure compares every layer with the final one.
        return layers, aurocs, len(layers) - 1
    if reference_layer not in layers:
        raise invalid_param("reference_layer", "plot_layer_auroc", f"one of {layers}", reference_layer)
    return layers, aurocs, layers.index(reference_layer)


def _legend_labels(layers, aurocs, ref):
    """Legend texts: the reference line, the count of layers beating it, the others."""
    role = "final layer" if ref == len(layers) - 1 else "reference layer"
    n_beat = int(np.sum(aurocs > aurocs[ref]))
    return [
        f"{role} ({layers[ref]}): {aurocs[ref]:.2f}",
        f"beats {layers[ref]} ({n_beat} of {len(layers) - 1} other layers)",
        "does not beat it",
    ]


def _blank_figure(layers):
    """The chart's figure for ``layers``, with every artist but no AUROC, reference or title yet."""
    # Width grows with the layer count so 41 rotated names stay legible.
    fig = Figure(figsize=(max(6.0, 0.3 * len(layers) + 2.0), 4.5), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    ax.bar(x, np.zeros(len(layers)), edgecolor="none")
    ax.axhline(0.0, color=REFERENCE_COLOR, linestyle=":", linewidth=1.5)
    # A fixed 0-1 axis keeps figures comparable across data sets and methods.
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks(x, layers, rotation=90, fontsize=8)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylabel("AUROC (OOD positive)")
    ax.set_xlabel("layer (network order)")
    handles = [Line2D([], [], color=REFERENCE_COLOR, linestyle=":", label="reference"),
               Patch(color=BEATS_COLOR, label="beats"), Patch(color=OTHER_COLOR, label="does not beat it")]
    ax.legend(handles=handles, loc="lower left", fontsize=8)
    return fig


def _set_content(ax, layers, aurocs, ref, title):
    """Set everything that depends on the AUROCs, the reference and the title."""
    bars = ax.containers[0]
    for bar, height, color in zip(bars, aurocs, bar_colors(aurocs, ref)):
        bar.set_height(height)
        bar.set_facecolor(color)
        bar.set_hatch(None)
    bars[ref].set_hatch("//")
    ax.get_lines()[0].set_ydata([aurocs[ref], aurocs[ref]])
    for text, label in zip(ax.get_legend().get_texts(), _legend_labels(layers, aurocs, ref)):
        text.set_text(label)
    # At y=1, where _fit_layout makes room for it (the automatic placement, which
    # measures the axes at each draw, puts it there too: no ticks are on top).
    ax.set_title(title or "", y=1.0)


def _max_extent(texts, renderer, attr):
    """Largest ``width`` or ``height`` (``attr``) of the texts' boxes, in pixels; 0 if none."""
    return max((getattr(text.get_window_extent(renderer), attr) for text in texts), default=0.0)


def _tick_offset(axis):
    """Points between the spine and the tick labels: the tick's pad plus its length outside the axes."""
    tick = axis.get_major_ticks()[0]
    return tick.get_pad() + tick.get_tick_padding()


def _axis_margins(fig, ax):
    """Pin the axis labels off the tick labels; return the left and bottom margins, in pixels.

    From the figure's edge inwards, a margin stacks ``EDGE_PAD``, the axis label,
    its labelpad, the largest tick label and the tick's offset. The labels go where
    matplotlib's automatic placement puts them, which otherwise measures every tick
    label again at each draw.
    """
    renderer = fig.canvas.get_renderer()
    dpi = fig.dpi
    # From the spines to the axis labels, in inches.
    below = ((_tick_offset(ax.xaxis) + ax.xaxis.labelpad) / 72
             + _max_extent(ax.get_xticklabels(), renderer, "height") / dpi)
    beside = ((_tick_offset(ax.yaxis) + ax.yaxis.labelpad) / 72
              + _max_extent(ax.get_yticklabels(), renderer, "width") / dpi)
    ax.xaxis.set_label_coords(0.5, 0.0, ax.transAxes + ScaledTranslation(0.0, -below, fig.dpi_scale_trans))
    ax.yaxis.set_label_coords(0.0, 0.5, ax.transAxes + ScaledTranslation(-beside, 0.0, fig.dpi_scale_trans))
    pad = EDGE_PAD * dpi / 72
    left = pad + beside * dpi + ax.yaxis.label.get_window_extent(renderer).width
    bottom = pad + below * dpi + ax.xaxis.label.get_window_extent(renderer).height
    return left, bottom


def _fit_layout(fig, ax, base_size, left, bottom):
    """Place the axes within margins ``left`` / ``bottom`` (pixels) and room for the title.

    The figure, of ``base_size`` inches otherwise, widens when the title is wider
    than it allows around the axes' centre, and grows taller when long layer
    names would leave the axes shorter than ``MIN_AXES_HEIGHT``.

    Returns
    -------
    tuple
        The figure's size and subplot parameters, which the drawing depends on.
    """
    renderer = fig.canvas.get_renderer()
    dpi = fig.dpi
    right = pad = EDGE_PAD * dpi / 72
    title = [ax.title] if ax.title.get_text() else []
    if title:
        # The title's baseline is titlepad above the axes. Room for the font's ascent, not this
        # title's, keeps the axes in place (and the saved background valid) from title to title.
        height, descent = renderer.get_text_width_height_descent(TITLE_PROBE, ax.title.get_fontproperties(),
                                                                 ismath=False)[1:]
        top = pad + mpl.rcParams["axes.titlepad"] * dpi / 72 + height - descent
    else:
        # The top tick label ("1.0") is centred on the top spine.
        top = pad + _max_extent(ax.get_yticklabels()[-1:], renderer, "height") / 2
    # The title is centred on the axes, which sit right of the figure's centre by (left - right) / 2.
    width = max(base_size[0] * dpi, _max_extent(title, renderer, "width") + 2 * pad + left - right)
    height = max(base_size[1] * dpi, bottom + top + MIN_AXES_HEIGHT * dpi)
    fig.set_size_inches(width / dpi, height / dpi)
    params = {"left": left / width, "right": 1 - right / width, "bottom": bottom / height, "top": 1 - top / height}
    fig.subplots_adjust(**params)
    return (width, height, *params.values())


def layer_auroc_figure(layers, aurocs, *, reference_layer=None, title=None):
    """Bar chart of the AUROC of each layer, in network order (seed 000's figure).

    Parameters
    ----------
    layers : sequence of str of length n_layers
        Layer names in network order; they label the x axis.
    aurocs : array-like of shape (n_layers,)
        AUROC of each layer, in [0, 1].
    reference_layer : str, optional
        Layer whose AUROC is drawn as a dotted line; bars strictly above it are
        green. Defaults to the last of ``layers`` (the final layer).
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        On an Agg canvas, at ``DPI``. The bars are the first container of
        ``fig.axes[0]``, in layer order.

    Raises
    ------
    DataError
        If lengths differ, names repeat, or an AUROC is outside [0, 1].
    ConfigError
        If ``reference_layer`` is not one of ``layers``.
    """
    layers, aurocs, ref = _check_inputs(layers, aurocs, reference_layer)
    fig = _blank_figure(layers)
    ax = fig.axes[0]
    _set_content(ax, layers, aurocs, ref, title)
    _fit_layout(fig, ax, fig.get_size_inches(), *_axis_margins(fig, ax))
    return fig


class _Chart:
    """The figure of one list of layers, redrawn for each AUROC set, reference and title.

    Building a figure costs about as much as drawing it, and the axes' frame,
    ticks and labels are the same for every figure of a list of layers. They
    are drawn once into a saved background (redrawn only when a title changes
    the layout); each :meth:`render` restores it and draws the "animated"
    artists on top, in the order a full draw uses. Every render sets all the
    state those artists depend on, so the image does not depend on earlier
    renders.
    """

    def __init__(self, layers):
        self.layers = layers
        self.fig = _blank_figure(layers)
        self.ax = self.fig.axes[0]
        self.base_size = self.fig.get_size_inches()
        self.margins = _axis_margins(self.fig, self.ax)
        dynamic = [*self.ax.containers[0], *self.ax.get_lines(), *self.ax.spines.values(),
                   self.ax.get_legend(), self.ax.title]
        for artist in dynamic:
            artist.set_animated(True)
        # The order of Axes.draw: its children sorted by zorder, ties in child order.
        self.dynamic = sorted((a for a in self.ax.get_children() if a.get_animated()), key=attrgetter("zorder"))
        self.layout = self.background = None

    def render(self, aurocs, ref, title):
        """Draw the chart; return the canvas' RGBA buffer, of shape (height, width, 4)."""
        _set_content(self.ax, self.layers, aurocs, ref, title)
        layout = _fit_layout(self.fig, self.ax, self.base_size, *self.margins)
        canvas = self.fig.canvas
        if layout != self.layout:
            canvas.draw()  # animated artists are left out
            self.layout, self.background = layout, canvas.copy_from_bbox(self.fig.bbox)
        canvas.restore_region(self.background)
        for artist in self.dynamic:
            self.ax.draw_artist(artist)
        return canvas.buffer_rgba()


@functools.lru_cache(maxsize=4)
def _chart(layers):
    """The :class:`_Chart` of a tuple of layer names, built on first use."""
    return _Chart(layers)


# Charts are shared by every caller of plot_layer_auroc; one render and save at a time.
_CHART_LOCK = threading.Lock()


def plot_layer_auroc(layers, aurocs, path, *, reference_layer=None, title=None):
    """Draw :func:`layer_auroc_figure` and save it as a PNG.

    Parameters
    ----------
    layers : sequence of str of length n_layers
        Layer names in network order.
    aurocs : array-like of shape (n_layers,)
        AUROC of each layer, in [0, 1].
    path : str or pathlib.Path
        Where to write the PNG; must end in ``.png``. Parent directories are
        created.
    reference_layer : str, optional
        Defaults to the last of ``layers``.
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
        The path written. Its bytes are those of
        ``layer_auroc_figure(...).savefig(path, dpi=DPI, pil_kwargs=PNG_KWARGS)``.

    Raises
    ------
    DataError, ConfigError
        As :func:`layer_auroc_figure`; ConfigError also if ``path`` is not a ``.png``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise invalid_param("path", "plot_layer_auroc", "a file name ending in '.png'", str(path))
    layers, aurocs, ref = _check_inputs(layers, aurocs, reference_layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _CHART_LOCK:
        rgba = _chart(tuple(layers)).render(aurocs, ref, title)
        # What savefig does after drawing (FigureCanvasAgg.print_png).
        imsave(path, rgba, format="png", origin="upper", dpi=DPI, pil_kwargs=PNG_KWARGS)
    log.debug("Wrote per-layer AUROC figure to %s", path)
    return path
