"""Tests for pipeline.plots: colouring rule, rendered bars, layout, PNG output and its bytes, errors."""

import io
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from pipeline import plots
from pipeline.errors import ConfigError, DataError
from pipeline.plots import (
    BEATS_COLOR,
    DPI,
    MIN_AXES_HEIGHT,
    OTHER_COLOR,
    PNG_KWARGS,
    REFERENCE_COLOR,
    bar_colors,
    layer_auroc_figure,
    plot_layer_auroc,
)

REPO = Path(__file__).resolve().parents[1]

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
    # 6 x 4.5 inches at 120 dpi.
    assert image.shape[:2] == (540, 720)


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


def _savefig_bytes(layers, aurocs, **kwargs):
    """The PNG of a new figure saved the plain way, which plot_layer_auroc must reproduce."""
    buffer = io.BytesIO()
    layer_auroc_figure(layers, aurocs, **kwargs).savefig(buffer, dpi=DPI, format="png", pil_kwargs=PNG_KWARGS)
    return buffer.getvalue()


LONG_TITLE = "mahalanobis_ensemble_standardized: ID vs openimage_o_and_more (AUROC per layer)"
# One chart per list of layers is reused across calls: every call changes what a stale
# reuse would get wrong (heights, colours, hatched reference, line, legend, title, width).
CALLS = [
    (LAYERS, AUROCS, {"title": "knn: ID vs textures (AUROC per layer)"}),
    (LAYERS, [0.9, 0.2, 0.2, 0.95, 0.5], {"title": "msp: ID vs svhn (AUROC per layer)", "reference_layer": "conv1"}),
    (LAYERS, [0.2, 0.2, 0.2, 0.2, 0.2], {}),
    (LAYERS, [1.0, 0.0, 0.4, 0.6, 1.0], {"title": LONG_TITLE}),
    (["conv1", "fc"], [0.3, 0.8], {"title": "energy: ID vs places365 (AUROC per layer)"}),
    (LAYERS, AUROCS, {"title": "knn: ID vs textures (AUROC per layer)"}),
]


def test_reused_chart_writes_what_savefig_writes(tmp_path):
    # Guards the blitting in plot_layer_auroc: a missed artist, a wrong drawing order
    # or state left over from the previous figure changes the bytes.
    plots._chart.cache_clear()
    for i, (layers, aurocs, kwargs) in enumerate(CALLS):
        path = plot_layer_auroc(layers, aurocs, tmp_path / f"{i}.png", **kwargs)
        assert path.read_bytes() == _savefig_bytes(layers, aurocs, **kwargs), f"call {i}: {kwargs}"


def test_same_inputs_same_bytes(tmp_path):
    # Figures are DVC outputs: a rerun must not change them.
    args = (LAYERS, AUROCS)
    first = plot_layer_auroc(*args, tmp_path / "a.png", title="t").read_bytes()
    assert plot_layer_auroc(*args, tmp_path / "b.png", title="t").read_bytes() == first
    plots._chart.cache_clear()
    assert plot_layer_auroc(*args, tmp_path / "c.png", title="t").read_bytes() == first
    assert plot_layer_auroc(*args, tmp_path / "d.png", title="u").read_bytes() != first


def test_same_bytes_in_another_process(tmp_path):
    here = plot_layer_auroc(LAYERS, AUROCS, tmp_path / "here.png", title="knn: ID vs svhn").read_bytes()
    code = ("import sys; from pipeline.plots import plot_layer_auroc; "
            f"plot_layer_auroc({LAYERS!r}, {AUROCS!r}, sys.argv[1], title='knn: ID vs svhn')")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there.png")], env=env, cwd=REPO, check=True,
                   timeout=120)
    assert (tmp_path / "there.png").read_bytes() == here


def test_png_metadata_has_no_date(tmp_path):
    path = plot_layer_auroc(LAYERS, AUROCS, tmp_path / "x.png", title="t")
    with Image.open(path) as image:
        assert set(image.text) == {"Software"}
        # pHYs stores pixels per metre: 120 dpi reads back as 119.99.
        assert image.info["dpi"] == pytest.approx((DPI, DPI), abs=0.05)


def test_saved_bars_have_their_colours(tmp_path):
    # The colouring rule, read back from the PNG: the bars' pixels, just below their tops.
    aurocs = [0.60, 0.94, 0.78, 0.80, 0.78]
    fig = layer_auroc_figure(LAYERS, aurocs)
    rgb = np.asarray(Image.open(plot_layer_auroc(LAYERS, aurocs, tmp_path / "x.png")).convert("RGB"))
    centres = fig.axes[0].transData.transform([(i, value - 0.05) for i, value in enumerate(aurocs)])
    sampled = [rgb[rgb.shape[0] - 1 - int(y), int(x)] for x, y in centres[:-1]]
    expected = [np.round(np.array(to_rgba(c)[:3]) * 255) for c in [O, G, O, G]]
    assert np.abs(np.array(sampled) - np.array(expected)).max() <= 1


@pytest.mark.parametrize(
    ("layers", "title"),
    [
        (LAYERS, "knn: ID vs textures (AUROC per layer)"),
        (LAYERS, None),
        (LAYERS, LONG_TITLE),
        ([f"layer{i // 10 + 1}.{i % 10}.conv{i % 3 + 1}" for i in range(40)] + ["fc"], "knn: ID vs svhn"),
        (["conv1", "model.backbone.encoder.layers.11.attention.output.dense.projection", "fc"], "t"),
    ],
)
def test_no_text_is_clipped(layers, title):
    fig = layer_auroc_figure(layers, np.linspace(0.3, 1.0, len(layers)), title=title)
    fig.canvas.draw()
    renderer, ax = fig.canvas.get_renderer(), fig.axes[0]
    texts = [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label, ax.title, ax.get_legend()]
    for text in texts:
        box = text.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, text
        assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, text
    assert ax.get_window_extent(renderer).height >= MIN_AXES_HEIGHT * DPI - 1
    # The axis labels sit clear of the tick labels.
    assert ax.xaxis.label.get_window_extent(renderer).y1 < min(
        label.get_window_extent(renderer).y0 for label in ax.get_xticklabels())
    assert ax.yaxis.label.get_window_extent(renderer).x1 < min(
        label.get_window_extent(renderer).x0 for label in ax.get_yticklabels())
