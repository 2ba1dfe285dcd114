"""Seed 002's heatmap detector as a scorer: a decoder trained from the feature store.

Hornauer & Belagiannis (WACV 2023), "Heatmap-based Out-of-Distribution
Detection". The maths is in :mod:`pipeline.heatmap`; this wraps it in the
scorer contract. ``fit`` trains the decoder on ID-train rows (label >= 0) and
auxiliary-outlier rows (label -1, from ``aux_sets``): it reads penultimate
features, predicted classes, input images and the ``fw_layers`` deepest
stored maps, never the classifier. ``score`` is ``mean_pixels max_channels
|h|``: higher = more OOD.

Training is a run, not a statistic (``trained = True``): the ``fit`` stage does
it and saves the decoder's state_dict with :meth:`HeatmapScorer.save`; ``detect``
loads it with :meth:`HeatmapScorer.load`. The training rows are held in memory
(features, maps and images of ID-train plus the outliers).
"""

from __future__ import annotations

import json
import logging
import numbers
import time
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, invalid_param
from pipeline.scorers.base import BaseScorer

# torch (and pipeline.heatmap, which needs it) is imported inside the methods: the other
# scorers score without torch, and importing this module must not change that

log = logging.getLogger(__name__)

WEIGHTS = "decoder.pt"
META = "heatmap.json"
SCORE_BATCH = 256


class HeatmapScorer(BaseScorer):
    """Heatmap decoder OOD score, trained on ID-train and auxiliary outliers.

    Parameters
    ----------
    fw_layers : int, default=2
        How many stored maps (``extract.maps``), deepest first, enter the
        decoder as skips; 0 = the penultimate feature and class only.
    epochs : int, default=20
    n_aux : int or None, default=1000
        Auxiliary outliers drawn (seeded) from all ``aux_sets`` rows; None = all.
    aux_sets : sequence of str, default=()
        Sets the outliers come from: a set's ``aux`` split (``generate.aux``)
        or else its **val** half; never a test split.
    batch_size : int, default=64
    lr : float, default=2e-4
    betas : sequence of two floats, default=(0.5, 0.999)
        Adam's, as the paper's.
    width : int, default=32
        Decoder channel scale (its first maps have ``4 * width`` channels).
    seed : int, default=0
        Seeds the decoder's weights, the outlier draw and the shuffling.
    device : str, default="auto"
        CUDA when present.
    threads : int, default=1
        torch's CPU threads while training: part of the result (the learned
        weights depend on the count), so a parameter, not the free cores.

    Attributes
    ----------
    decoder_ : HeatmapDecoder
    skip_layers_ : list of str
        The maps used as skips, deepest first.
    n_classes_ : int
    history_ : list of float
        Mean training loss per epoch.
    fit_seconds_ : float
        Wall time of the training loop (logged; not saved: a clock reading
        would make the saved files differ between identical runs).
    n_train_, n_outliers_ : int
        ID-train and outlier rows trained on.
    """

    learns = True
    reads_maps = True
    trained = True

    def __init__(self, fw_layers=2, epochs=20, n_aux=1000, aux_sets=(), batch_size=64, lr=2e-4, betas=(0.5, 0.999),
                 width=32, seed=0, device="auto", threads=1):
        self.fw_layers = fw_layers
        self.epochs = epochs
        self.n_aux = n_aux
        self.aux_sets = aux_sets
        self.batch_size = batch_size
        self.lr = lr
        self.betas = betas
        self.width = width
        self.seed = seed
        self.device = device
        self.threads = threads

    def check_params(self, prefix=""):
        """Raise ``ConfigError`` on a bad hyperparameter, naming it (after ``prefix``); returns self."""
        for name in ("epochs", "batch_size", "width", "threads"):
            _check_int(prefix + name, getattr(self, name), low=1)
        _check_int(prefix + "fw_layers", self.fw_layers, low=0)
        if self.n_aux is not None:
            _check_int(prefix + "n_aux", self.n_aux, low=1)
        if (isinstance(self.aux_sets, str) or not isinstance(self.aux_sets, (list, tuple)) or not self.aux_sets
                or not all(isinstance(s, str) for s in self.aux_sets)):
            raise invalid_param(prefix + "aux_sets", "heatmap", "a non-empty list of set names (their val or aux splits)",
                                self.aux_sets, hint="e.g. aux_sets: [gaussian, uniform, textures] on the default "
                                "data; never a test OOD set's data.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not self.lr > 0:
            raise invalid_param(prefix + "lr", "heatmap", "a positive float", self.lr)
        betas = self.betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in betas)):
            raise invalid_param(prefix + "betas", "heatmap", "two floats in [0, 1)", betas)
        if not isinstance(self.device, str):
            raise invalid_param(prefix + "device", "heatmap", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        return self

    def outlier_sets(self) -> tuple:
        return tuple(self.aux_sets)

    def outlier_rows(self, sizes: dict) -> dict:
        """A seeded draw of ``n_aux`` rows from all sets together (every row when ``n_aux`` is None or larger)."""
        total = sum(sizes.values())
        n = total if self.n_aux is None else min(self.n_aux, total)
        chosen = np.sort(np.random.default_rng(self.seed).choice(total, n, replace=False))
        offsets = np.cumsum([0, *sizes.values()])
        return {name: chosen[(chosen >= lo) & (chosen < hi)] - lo
                for name, lo, hi in zip(sizes, offsets[:-1], offsets[1:])}

    def fit(self, features, y=None):
        """Train the decoder on ID-train rows (label >= 0) and outlier rows (label -1).

        Parameters
        ----------
        features : Features
            With ``penultimate`` (n, D), ``logits`` (n, K), ``pred`` (n,),
            ``labels`` (n,), ``images`` (n, C, S, S) and at least ``fw_layers`` maps.
        """
        from pipeline.heatmap import decoder_inputs, init_decoder, train_decoder
        from pipeline.models import resolve_device

        self.check_params()
        z, pred, images, labels, logits = features.require("penultimate", "pred", "images", "labels", "logits",
                                                           owner="heatmap")
        skips, self.skip_layers_ = self._skips(features)
        outlier = np.asarray(labels) < 0
        if outlier.all() or not outlier.any():
            raise DataError(f"heatmap needs ID-train rows and auxiliary-outlier rows; got {int((~outlier).sum())} "
                            f"ID and {int(outlier.sum())} outlier rows. Hint: check aux_sets.")
        self.n_classes_ = int(logits.shape[1])
        ident = ~outlier
        data = decoder_inputs(z, pred, self.n_classes_, skips, images, outlier, train_features=z[ident],
                              train_pred=pred[ident], train_images=images[ident])
        self.decoder_ = init_decoder(z.shape[1], self.n_classes_, images.shape[1:], [s.shape[1:] for s in skips],
                                     self.width, seed=self.seed)
        start = time.perf_counter()
        self.history_ = train_decoder(self.decoder_, data, epochs=self.epochs, batch_size=self.batch_size,
                                      lr=self.lr, betas=tuple(self.betas), seed=self.seed,
                                      device=resolve_device(self.device), threads=self.threads)
        self.fit_seconds_ = time.perf_counter() - start
        self.decoder_.cpu()
        self.n_train_, self.n_outliers_ = int(ident.sum()), int(outlier.sum())
        log.info("heatmap decoder: %d epochs on %d ID + %d outlier rows in %.1f s, loss %.4f -> %.4f", self.epochs,
                 self.n_train_, self.n_outliers_, self.fit_seconds_, self.history_[0], self.history_[-1])
        return self

    def _skips(self, features):
        """The ``fw_layers`` deepest (smallest) stored maps, deepest first, and their layer names."""
        stored = sorted(features.maps, key=lambda layer: features.maps[layer].shape[-1])
        if self.fw_layers > len(stored):
            raise DataError(f"heatmap's fw_layers={self.fw_layers} needs {self.fw_layers} stored maps; the store "
                            f"holds {len(stored)} ({stored}). Hint: list more layers in extract.maps and rerun "
                            "extract, or lower fw_layers.")
        layers = stored[:self.fw_layers]
        return [features.maps[layer] for layer in layers], layers

    def score(self, features):
        """``mean_pixels max_channels |h|`` per row, shape (n,); higher = more OOD."""
        from pipeline.heatmap import score_heatmaps
        from pipeline.models import resolve_device

        self._check_fitted()
        z, pred = features.require("penultimate", "pred", owner="heatmap")
        missing = [layer for layer in self.skip_layers_ if layer not in features.maps]
        if missing:
            raise DataError(f"heatmap was trained with the maps of {self.skip_layers_}, but {missing} are not in "
                            "the store. Hint: keep extract.maps as it was, or rerun fit.")
        skips = [features.maps[layer] for layer in self.skip_layers_]
        return score_heatmaps(self.decoder_, z, pred, self.n_classes_, skips, batch_size=SCORE_BATCH,
                              device=resolve_device(self.device))

    def save(self, directory) -> Path:
        """Write ``decoder.pt`` (the state_dict) and ``heatmap.json`` (params, shapes, loss history).

        No clock reading goes in (the training time is logged by :meth:`fit`):
        saving the same decoder twice gives the same bytes in both files
        (``torch.save`` of a state_dict is deterministic: fixed zip timestamps,
        the archive named after the file).
        """
        import torch

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.decoder_.state_dict(), directory / WEIGHTS)
        d = self.decoder_
        meta = {"params": {**self.get_params(), "betas": list(self.betas), "aux_sets": list(self.aux_sets)},
                "decoder": {"feature_dim": d.feature_dim, "n_classes": d.n_classes, "image_shape": list(d.image_shape),
                            "skip_shapes": [list(s) for s in d.skip_shapes], "width": d.width},
                "skip_layers": self.skip_layers_, "history": self.history_, "n_train": self.n_train_,
                "n_outliers": self.n_outliers_}
        (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory) -> HeatmapScorer:
        """A fitted scorer from what :meth:`save` wrote (weights loaded with ``weights_only=True``)."""
        import torch

        from pipeline.heatmap import HeatmapDecoder

        directory = Path(directory)
        if not (directory / META).is_file() or not (directory / WEIGHTS).is_file():
            raise DataError(f"No trained heatmap decoder in '{directory}' (expected {META} and {WEIGHTS}). "
                            "Hint: add fit.heatmap to params.yaml and run `layerscope fit` (or `dvc repro fit`).")
        meta = json.loads((directory / META).read_text())
        scorer = cls(**meta["params"])
        scorer.decoder_ = HeatmapDecoder(**meta["decoder"])
        scorer.decoder_.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
        scorer.decoder_.eval()
        scorer.skip_layers_, scorer.n_classes_ = meta["skip_layers"], meta["decoder"]["n_classes"]
        scorer.history_ = meta["history"]
        scorer.n_train_, scorer.n_outliers_ = meta["n_train"], meta["n_outliers"]
        return scorer


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise invalid_param(name, "heatmap", f"an int >= {low}", value)
