"""RankFeat: energy after removing the rank-1 part of a feature map (Song, Sebe & Wang, NeurIPS 2022).

The rank-1 part is removed *inside* the network and the rest of the network
runs on what remains, so it cannot be computed from cached features:
``extract.rankfeat`` stores, for each declared layer, the logits of that pass
(:func:`pipeline.extract.rankfeat_logits`), and this scorer fuses them.
Reference code: OpenOOD v1.5's ``openood/postprocessors/rankfeat_postprocessor.py``
(``configs/postprocessors/rankfeat.yml``).
"""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval

from pipeline.errors import ConfigError, DataError, invalid_param
from pipeline.scorers.base import BaseScorer, Features
from pipeline.scorers.energy import check_matrix, energy_scores


class RankFeatScorer(BaseScorer):
    """RankFeat (Song, Sebe & Wang, NeurIPS 2022): energy of the logits with rank-1 feature parts removed.

    For each chosen layer L, extraction replaces its map (C x HW per sample)
    by ``X - s_1 u_1 v_1^T`` and finishes the pass: logits ``f_L(x)``. Then
    ``fused = mean_L f_L(x)`` ("fusion at the logit space") and
    ``score(x) = -T logsumexp(fused / T)``: OpenOOD v1.5's ``conf`` (with its
    exact SVD, ``accelerate: False``), negated so that higher = more OOD.
    OpenOOD uses a ResNet's block 4 and block 3 (``layer4``, ``layer3``).

    The layers' logits are stored separately, so any subset of the extracted
    layers and any temperature are read without a pass (:attr:`refit_free_params`);
    a layer not extracted is refused in one line naming ``extract.rankfeat``.

    Parameters
    ----------
    layers : list of str, optional
        Layers whose logits are averaged; default every extracted one.
    temperature : float, default=1.0
        The energy's temperature (OpenOOD's default).
    """

    refit_free_params = ("layers", "temperature")

    _parameter_constraints = {"layers": [list, tuple, str, None],
                              "temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, *, layers=None, temperature=1.0):
        self.layers = layers
        self.temperature = temperature

    def fit(self, features, y=None):
        """Check the parameters; there is nothing to learn. Returns self."""
        self.check_params()
        return super().fit(features)

    def set_refit_free(self, **params):
        """Change ``layers`` and/or ``temperature``; returns self."""
        unknown = sorted(set(params) - set(self.refit_free_params))
        if unknown:
            raise ConfigError(f"RankFeat can change only {list(self.refit_free_params)} without refitting; "
                              f"got {unknown[0]!r}.")
        self.set_params(**params)
        return self.check_params()

    def fused_logits(self, features: Features) -> np.ndarray:
        """Mean over the chosen layers of their stored logits: shape (n_samples, n_classes)."""
        if not features.rankfeat:
            raise DataError("RankFeat needs logits computed at extraction (extract.rankfeat), which this store does "
                            "not hold. Hint: set extract.rankfeat: {layers: [...]} (e.g. the last two blocks) and "
                            "rerun extract; each layer costs a pass through the network.")
        stored = list(features.rankfeat)
        layers = stored if self.layers is None else [self.layers] if isinstance(self.layers, str) else list(self.layers)
        if not layers or len(set(layers)) != len(layers):
            raise invalid_param("layers", "RankFeat", "None or a non-empty list of distinct layers", self.layers)
        missing = [layer for layer in layers if layer not in stored]
        if missing:
            raise DataError(f"RankFeat's layer {missing[0]!r} was not extracted: the store holds RankFeat logits of "
                            f"{stored}. Hint: each new layer costs a pass through the network: add it to "
                            "extract.rankfeat.layers and rerun extract.")
        parts = [check_matrix(features.rankfeat[layer], f"rankfeat[{layer!r}]", "RankFeat") for layer in layers]
        return np.mean(parts, axis=0)

    def score(self, features: Features) -> np.ndarray:
        """``-T logsumexp(fused / T)``; shape (n_samples,), higher = more OOD."""
        self.check_params()
        return energy_scores(self.fused_logits(features), float(self.temperature))
