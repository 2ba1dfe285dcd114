"""DICE: sparsify the head by each weight's mean contribution on ID data, then energy.

Sun & Li (2022), "DICE: Leveraging Sparsification for Out-of-Distribution
Detection", ECCV.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval

from pipeline.errors import DataError
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import energy_scores, head_logits, read_head


def dice_contributions(mean_activation, weight):
    """Contribution of each weight on ID data, ``V[c, j] = mean_activation[j] * W[c, j]``.

    Parameters
    ----------
    mean_activation : ndarray of shape (n_features,)
        Mean ID-train penultimate feature.
    weight : ndarray of shape (n_classes, n_features)

    Returns
    -------
    contributions : ndarray of shape (n_classes, n_features)
    """
    return mean_activation[None, :] * weight


def dice_mask(contributions, percentile):
    """Keep the weights whose contribution is above the ``percentile``-th percentile of all ``C * D`` of them.

    Parameters
    ----------
    contributions : ndarray of shape (n_classes, n_features)
    percentile : float
        ``p`` in [0, 100): about ``(100 - p)%`` of the weights are kept.

    Returns
    -------
    mask : ndarray of shape (n_classes, n_features), bool
        Strictly above the threshold (``np.percentile``, linear), as the reference.
    """
    return contributions > np.percentile(contributions, percentile)


class DICEScorer(BaseScorer):
    """DICE (Sun & Li, ECCV 2022): energy of the logits of a sparsified head.

    ``fit`` on ID-train penultimate features ``a`` with head ``W, b``:
    ``V = mean(a) * W`` (per class and unit), ``M = V > percentile(V, p)``
    (over all ``C * D`` entries). Then

    ``score(x) = -logsumexp(a(x) @ (W * M).T + b)``

    The paper's (and the references') score is ``logsumexp``, higher = more
    ID; it is negated here so that higher = more OOD. Follows OpenOOD v1.5's
    ``openood/postprocessors/dice_postprocessor.py`` (``configs/postprocessors/
    dice.yml``: ``p: 90``, sweep ``p_list: [90]``) and the authors'
    ``RouteDICE`` layer (github.com/deeplearning-wisc/dice), which compute the
    same mask from the mean ID-train feature. The paper used p = 90 on CIFAR
    and p = 70 on ImageNet. Needs ``Features.penultimate``, ``head_weight``
    and ``head_bias``.

    Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution
    Detection", ECCV 2022.

    Parameters
    ----------
    percentile : float, default=90
        ``p`` in [0, 100), the sparsity: about ``(100 - p)%`` of the weights
        are kept. Refit-free (the mean feature does not depend on it).

    Attributes
    ----------
    mean_activation_ : ndarray of shape (n_features,)
    contributions_ : ndarray of shape (n_classes, n_features)
    mask_ : ndarray of shape (n_classes, n_features), bool
        The weights kept.
    n_features_in_ : int
    """

    learns = True  # fit reads ID-train features
    refit_free_params = ("percentile",)

    _parameter_constraints = {"percentile": [Interval(Real, 0, 100, closed="left")]}

    def __init__(self, *, percentile=90):
        self.percentile = percentile

    def fit(self, features, y=None):
        """Mean ID-train feature, each weight's contribution and the mask.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and ``head_bias`` (C,).
        y : ignored

        Returns
        -------
        self : DICEScorer
        """
        self.check_params(owner="DICE")
        a, weight, _ = read_head(features, "DICE")
        self.mean_activation_ = a.mean(axis=0)
        self.contributions_ = dice_contributions(self.mean_activation_, weight)
        self.mask_ = dice_mask(self.contributions_, self.percentile)
        self.n_features_in_ = a.shape[1]
        return self

    def set_refit_free(self, *, percentile):
        """Change ``percentile`` on a fitted scorer: the mask is recomputed from the kept contributions."""
        self._check_fitted()
        self.percentile = percentile
        self.check_params(owner="DICE")
        self.mask_ = dice_mask(self.contributions_, percentile)
        return self

    def score(self, features):
        """Energy of the sparsified head's logits.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and ``head_bias`` (C,).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        self._check_fitted()
        a, weight, bias = read_head(features, "DICE", self.n_features_in_)
        if weight.shape != self.mask_.shape:
            raise DataError(f"DICE was fitted on a head of shape {self.mask_.shape}; got {weight.shape}.")
        return energy_scores(head_logits(a, weight * self.mask_, bias))
