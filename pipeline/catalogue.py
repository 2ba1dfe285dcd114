"""Every method layerscope scores, what it reads from the feature store, and its paper.

One row per registered name (:data:`pipeline.scorers.SCORERS`, the detectors of
:func:`pipeline.detectors.available_detectors`, and the per-layer ``energy``
extraction computes). ``layerscope methods`` prints it; a test keeps it equal to
the registries, so a method cannot be added without saying what it reads.

``reads`` names store arrays: ``logits``, ``penultimate`` (the head's input),
``head`` (``head/weight``, ``head/bias``), ``label`` (ID-train's, to fit),
``layer`` (each chosen layer's pooled features), ``grad`` (NAC-UE's
``grad.<layer>``), ``map``/``image`` (unpooled maps and inputs), ``energy``,
and what the opt-in extraction-time options store: ``gram`` (``extract.gram``),
``odin`` (``extract.odin``), ``rankfeat`` (``extract.rankfeat``).
Nothing here loads the network.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """What one method reads and where it comes from.

    Attributes
    ----------
    reads : tuple of str
        Store arrays it reads (see the module docstring).
    per_layer : bool
        Scored on every chosen layer (with the ``max_z``/``mean_z``/``max``
        aggregations), rather than once per sample.
    paper : str
        Short citation.
    configured_in : str
        The params section that turns it on.
    """

    reads: tuple[str, ...]
    per_layer: bool
    paper: str
    configured_in: str = "detect.methods"


_LOGITS, _HEAD = ("logits",), ("penultimate", "head")
_LAYER = ("layer",)

METHODS: dict[str, Method] = {
    # logits
    "msp": Method(_LOGITS, False, "Hendrycks & Gimpel, ICLR 2017"),
    "maxlogit": Method(_LOGITS, False, "Hendrycks et al., ICML 2022"),
    "ebo": Method(_LOGITS, False, "Liu et al., NeurIPS 2020 (energy)"),
    "tempscale": Method((*_LOGITS, "label"), False, "Guo et al., ICML 2017"),
    "entropy": Method(_LOGITS, False, "predictive entropy (e.g. Malinin & Gales, NeurIPS 2018)"),
    "gen": Method(_LOGITS, False, "Liu, Lochman & Zach, CVPR 2023"),
    "klm": Method(_LOGITS, False, "Hendrycks et al., ICML 2022 (KL matching)"),
    "openmax": Method((*_LOGITS, "label"), False, "Bendale & Boult, CVPR 2016"),
    # penultimate features and the head
    "scale": Method(_HEAD, False, "Xu et al., ICLR 2024 (seed 003)"),
    "ash_p": Method(_HEAD, False, "Djurisic et al., ICLR 2023"),
    "ash_b": Method(_HEAD, False, "Djurisic et al., ICLR 2023"),
    "ash_s": Method(_HEAD, False, "Djurisic et al., ICLR 2023"),
    "react": Method(_HEAD, False, "Sun, Guo & Li, NeurIPS 2021"),
    "vim": Method(_HEAD, False, "Wang et al., CVPR 2022"),
    "residual": Method(_HEAD, False, "Wang et al., CVPR 2022 (ViM's Residual)"),
    "dice": Method(_HEAD, False, "Sun & Li, ECCV 2022"),
    "gradnorm": Method(_HEAD, False, "Huang, Geng & Li, NeurIPS 2021"),
    "fdbd": Method(_HEAD, False, "Liu & Qin, ICML 2024"),
    "nnguide": Method(_HEAD, False, "Park, Jung & Teoh, ICCV 2023"),
    "relation": Method(_HEAD, False, "Kim et al., NeurIPS 2023"),
    "she": Method((*_HEAD, "label"), False, "Zhang et al., ICLR 2023"),
    # several layers
    "nac_ue": Method(("layer", "grad", "logits"), True, "Liu et al., ICLR 2024 (seed 004)"),
    "heatmap": Method(("map", "image"), False, "Hornauer & Belagiannis, WACV 2023 (seed 002)",
                      "fit.heatmap + detect.methods"),
    "energy": Method(("energy",), True, "Guglielmo & Masana (seed 000); Ag-EBO is its mean_z", "always on"),
    # stored at extraction (opt-in): each new ODIN/RankFeat setting costs a pass through the network
    "gram": Method(("gram", "logits"), False, "Sastry & Oore, ICML 2020", "extract.gram + detect.methods"),
    "odin": Method(("odin",), False, "Liang, Li & Srikant, ICLR 2018", "extract.odin + detect.methods"),
    "rankfeat": Method(("rankfeat",), False, "Song, Sebe & Wang, NeurIPS 2022", "extract.rankfeat + detect.methods"),
    # per-layer detectors
    "mahalanobis": Method((*_LAYER, "label"), True, "Lee et al., NeurIPS 2018", "fit.detectors"),
    "mahalanobis_pp": Method((*_LAYER, "label"), True, "Mueller & Hein, 2025 (Mahalanobis++)", "fit.detectors"),
    "rmds": Method((*_LAYER, "label"), True, "Ren et al., 2021 (relative Mahalanobis)", "fit.detectors"),
    "rmds_pp": Method((*_LAYER, "label"), True, "Mueller & Hein, 2025 (rMaha++)", "fit.detectors"),
    "gmm": Method(_LAYER, True, "OpenOOD v1.5's GMM (Yang et al., 2022)", "fit.detectors"),
    "ssd": Method(_LAYER, True, "Sehwag, Chiang & Mittal, ICLR 2021", "fit.detectors"),
    "knn_l2": Method(_LAYER, True, "Sun et al., ICML 2022", "fit.detectors"),
    "laood_ocsvm": Method(_LAYER, True, "LA-OOD: Layer Adaptive Deep Neural Networks for OOD Detection (seed 001)", "fit.detectors"),
    "iforest": Method(_LAYER, True, "Liu, Ting & Zhou, ICDM 2008 (PyOD)", "fit.detectors"),
    "ecod": Method(_LAYER, True, "Li et al., TKDE 2022 (PyOD)", "fit.detectors"),
    "copod": Method(_LAYER, True, "Li et al., ICDM 2020 (PyOD)", "fit.detectors"),
    "knn": Method(_LAYER, True, "Ramaswamy et al., SIGMOD 2000 (PyOD)", "fit.detectors"),
    "lof": Method(_LAYER, True, "Breunig et al., SIGMOD 2000 (PyOD)", "fit.detectors"),
    "ocsvm": Method(_LAYER, True, "Schölkopf et al., 2001 (PyOD)", "fit.detectors"),
    "hbos": Method(_LAYER, True, "Goldstein & Dengel, 2012 (PyOD)", "fit.detectors"),
    "pca": Method(_LAYER, True, "Shyu et al., 2003 (PyOD)", "fit.detectors"),
}


def registered() -> set[str]:
    """Every name the registries accept, plus ``energy`` (computed at extraction, always on)."""
    from pipeline.detectors import available_detectors
    from pipeline.scorers import SCORERS

    return {*SCORERS, *available_detectors(), "energy"}
