"""Tests for pipeline.plots: colouring rule, rendered bars, PNG output, errors."""

import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from pipeline.errors import ConfigError, DataError
from pipeline.plots import (
    BEATS_COLOR,
    OTHER_COLOR,
    REFERENCE_COLOR,
    bar_colors,
    layer_auroc_figure,
    plot_layer_auroc,
)

G, O, R = BEATS_COLOR, OTHER_COLOR, REFERENCE_COLOR
LAYERS = ["conv1", "layer1.0.conv2", "layer1.0.bn2", "layer4.1.bn2", "fc"]
AUROCS = [0.60, 0.94, 0.78, 0.80, 0.78]


def test_bar_colors_known_answer():
    # Reference fc = 0.78. 0.94 and 0.80 beat it; 0.78 ties it and does not
    # (strictly greater only); 0.60 is below.
    assert bar_colors(AUROCS, 4) == [O, G, O, G, R]


def test_bar_colors_other_reference():
    assert bar_colors(AUROCS, 0) == [R, G, G, G, G]


def test_three_colours_are_distinct():
    assert len({to_rgba(c) for c in (G, O, R)}) == 3


def test_figure_bars_follow_network_order_and_colours():
    fig = layer_auroc_figure(LAYERS, AUROCS)
    ax = fig.axes[0]
    bars = list(ax.containers[0])
    assert [bar.get_height() for bar in bars] == pytest.approx(AUROCS)
    assert [label.get_text() for label in ax.get_xticklabels()] == LAYERS
    assert [bar.get_facecolor() for bar in bars] == [to_rgba(c) for c in bar_colors(AUROCS, 4)]
    green = [name for name, bar in zip(LAYERS, bars) if bar.get_facecolor() == to_rgba(G)]
    assert green == ["layer1.0.conv2", "layer4.1.bn2"]
    assert bars[4].get_hatch() == "//"


def test_figure_draws_dotted_reference_line_and_label():
    fig = layer_auroc_figure(LAYERS, AUROCS, title="CIFAR-10 vs SVHN")
    ax = fig.axes[0]
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1
    assert np.allclose(dotted[0].get_ydata(), 0.78)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[0] == "final layer (fc): 0.78"
    assert labels[1] == "beats fc (2 of 4 other layers)"
    assert ax.get_ylim() == (0.0, 1.0)
    assert ax.get_title() == "CIFAR-10 vs SVHN"


def test_explicit_reference_layer():
    fig = layer_auroc_figure(LAYERS, AUROCS, reference_layer="layer4.1.bn2")
    ax = fig.axes[0]
    greens = [bar.get_facecolor() == to_rgba(G) for bar in ax.containers[0]]
    assert greens == [False, True, False, False, False]
    assert ax.get_legend().get_texts()[0].get_text() == "reference layer (layer4.1.bn2): 0.80"


def test_plot_writes_png(tmp_path):
    path = tmp_path / "nested" / "dir" / "layer_auroc.png"
    written = plot_layer_auroc(LAYERS, AUROCS, str(path))
    assert written == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    # 6 x 4.5 inches at 120 dpi, give or take the layout engine's rounding.
    assert image.shape[0] == pytest.approx(540, abs=5)
    assert image.shape[1] == pytest.approx(720, abs=5)


@pytest.mark.parametrize(
    ("layers", "aurocs", "match"),
    [
        (["a", "b"], [0.5], r"Got 2 layer names but aurocs of shape \(1,\)"),
        ([], [], r"layers is empty"),
        (["a", "a"], [0.5, 0.6], r"Layer names must be unique"),
        (["a", "b"], [0.5, 1.2], r"Every AUROC must be a number in \[0, 1\]"),
        (["a", "b"], [0.5, np.nan], r"Every AUROC must be a number in \[0, 1\]"),
    ],
)
def test_bad_inputs_raise_data_error(tmp_path, layers, aurocs, match):
    with pytest.raises(DataError, match=match):
        plot_layer_auroc(layers, aurocs, tmp_path / "x.png")


def test_unknown_reference_layer_lists_layers(tmp_path):
    match = r"The 'reference_layer' parameter of plot_layer_auroc must be one of \['a', 'b'\]. Got 'fc' instead."
    with pytest.raises(ConfigError, match=match):
        plot_layer_auroc(["a", "b"], [0.5, 0.6], tmp_path / "x.png", reference_layer="fc")


def test_non_png_path_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"'path' parameter of plot_layer_auroc must be a file name ending in '.png'"):
        plot_layer_auroc(["a"], [0.5], tmp_path / "x.pdf")
    assert not (tmp_path / "x.pdf").exists()
