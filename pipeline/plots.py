"""Figures, drawn on explicit :class:`matplotlib.figure.Figure` objects.

pyplot is never imported: a ``Figure`` built directly has no global state to
leak between calls and renders with the Agg canvas whatever the user's
backend, so stages can run headless.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pipeline.errors import DataError, invalid_param

log = logging.getLogger(__name__)

BEATS_COLOR = "tab:green"
REFERENCE_COLOR = "dimgray"
OTHER_COLOR = "lightsteelblue"
DPI = 120


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


def _legend_handles(layers, aurocs, ref):
    """Legend entries: the reference line and the count of layers beating it."""
    role = "final layer" if ref == len(layers) - 1 else "reference layer"
    n_beat = int(np.sum(aurocs > aurocs[ref]))
    return [
        Line2D([], [], color=REFERENCE_COLOR, linestyle=":", label=f"{role} ({layers[ref]}): {aurocs[ref]:.2f}"),
        Patch(color=BEATS_COLOR, label=f"beats {layers[ref]} ({n_beat} of {len(layers) - 1} other layers)"),
        Patch(color=OTHER_COLOR, label="does not beat it"),
    ]


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
        The bars are the first container of ``fig.axes[0]``, in layer order.

    Raises
    ------
    DataError
        If lengths differ, names repeat, or an AUROC is outside [0, 1].
    ConfigError
        If ``reference_layer`` is not one of ``layers``.
    """
    layers, aurocs, ref = _check_inputs(layers, aurocs, reference_layer)
    # Width grows with the layer count so 41 rotated names stay legible.
    fig = Figure(figsize=(max(6.0, 0.3 * len(layers) + 2.0), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    bars = ax.bar(x, aurocs, color=bar_colors(aurocs, ref), edgecolor="none")
    bars[ref].set_hatch("//")
    ax.axhline(aurocs[ref], color=REFERENCE_COLOR, linestyle=":", linewidth=1.5)
    # A fixed 0-1 axis keeps figures comparable across data sets and methods.
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks(x, layers, rotation=90, fontsize=8)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylabel("AUROC (OOD positive)")
    ax.set_xlabel("layer (network order)")
    ax.legend(handles=_legend_handles(layers, aurocs, ref), loc="lower left", fontsize=8)
    if title:
        ax.set_title(title)
    return fig


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
        The path written.

    Raises
    ------
    DataError, ConfigError
        As :func:`layer_auroc_figure`; ConfigError also if ``path`` is not a ``.png``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise invalid_param("path", "plot_layer_auroc", "a file name ending in '.png'", str(path))
    fig = layer_auroc_figure(layers, aurocs, reference_layer=reference_layer, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    log.debug("Wrote per-layer AUROC figure to %s", path)
    return path

