"""fDBD: the mean feature-space distance to the decision boundaries, over the distance to the ID mean.

Liu & Qin (2024), "Fast Decision Boundary based Out-of-Distribution Detector",
ICML.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from pipeline.errors import DataError
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import head_logits, read_head

#: Floor of the normaliser ``||z - mean||``, so that a feature exactly at the mean scores finitely.
NORM_FLOOR = 1e-12


def boundary_denominators(weight):
    """``||w_p - w_c||`` for every pair of classes, with 1 on the diagonal (as the references).

    Parameters
    ----------
    weight : ndarray of shape (n_classes, n_features)

    Returns
    -------
    denominators : ndarray of shape (n_classes, n_classes)

    Raises
    ------
    DataError
        When two classes have the same weight row (their boundary is undefined).
    """
    denominators = cdist(weight, weight)
    np.fill_diagonal(denominators, 1.0)
    if not (denominators > 0).all():
        p, c = np.argwhere(denominators <= 0)[0]
        raise DataError(f"fDBD needs distinct head weight rows; classes {p} and {c} have the same weight, so "
                        "their decision boundary is undefined.")
    return denominators


def fdbd_scores(a, weight, bias, denominators, centre):
    """Negated fDBD, ``-mean_{c != pred} |l_pred - l_c| / ||w_pred - w_c|| / ||a - centre||``.

    ``|l_pred - l_c| / ||w_pred - w_c||`` with ``l = W a + b`` is the distance
    from ``a`` to the hyperplane where classes ``pred`` and ``c`` tie.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    weight : ndarray of shape (n_classes, n_features)
    bias : ndarray of shape (n_classes,)
    denominators : ndarray of shape (n_classes, n_classes)
        From :func:`boundary_denominators`.
    centre : ndarray of shape (n_features,)
        The ID-train mean (or zeros for the feature norm).

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        Higher = more OOD.
    """
    logits = head_logits(a, weight, bias)
    pred = logits.argmax(axis=1)
    gaps = np.abs(logits - logits[np.arange(len(a)), pred][:, None])  # 0 at pred
    distance = (gaps / denominators[pred]).sum(axis=1) / (weight.shape[0] - 1)
    return -distance / np.maximum(np.linalg.norm(a - centre, axis=1), NORM_FLOOR)


class FDBDScorer(BaseScorer):
    """fDBD (Liu & Qin, ICML 2024): mean distance to the decision boundaries, regularised.

    For the feature ``z``, the head ``W, b``, logits ``l = W z + b`` and the
    predicted class ``pred``:

    ``score(z) = -(1 / (C - 1)) * sum_{c != pred} |l_pred - l_c| / ||w_pred - w_c|| / ||z - mu||``

    where ``mu`` is the mean ID-train feature (``||z||`` instead with
    ``distance_as_normalizer=False``). The paper's score is higher = more ID;
    it is negated here. Follows the authors' ``run_cifar.py``
    (github.com/litianliu/fDBD-OOD) and OpenOOD v1.5's
    ``openood/postprocessors/fdbd_postprocessor.py`` (``configs/
    postprocessors/fdbd.yml``: ``distance_as_normalizer: True``, sweep
    ``[True, False]``). Both codes *sum* over classes (the predicted one adds
    0); the paper's formula averages over the ``C - 1`` others, as here: a
    constant factor, the same ranking. A feature exactly at ``mu`` (or at 0)
    divides by ``max(||.||, 1e-12)`` rather than by 0. Needs
    ``Features.penultimate``, ``head_weight`` and ``head_bias``.

    Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector",
    ICML 2024.

    Parameters
    ----------
    distance_as_normalizer : bool, default=True
        Divide by ``||z - mu||`` (the paper's); False divides by ``||z||``
        (OpenOOD's alternative). Refit-free.

    Attributes
    ----------
    train_mean_ : ndarray of shape (n_features,)
    denominators_ : ndarray of shape (n_classes, n_classes)
        ``||w_p - w_c||``, 1 on the diagonal.
    n_features_in_ : int
    """

    learns = True  # fit reads ID-train features
    refit_free_params = ("distance_as_normalizer",)

    _parameter_constraints = {"distance_as_normalizer": ["boolean"]}

    def __init__(self, *, distance_as_normalizer=True):
        self.distance_as_normalizer = distance_as_normalizer

    def fit(self, features, y=None):
        """The mean ID-train feature and the pairwise weight distances.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and ``head_bias`` (C,).
        y : ignored

        Returns
        -------
        self : FDBDScorer
        """
        self.check_params(owner="fDBD")
        a, weight, _ = read_head(features, "fDBD")
        if weight.shape[0] < 2:
            raise DataError(f"fDBD needs at least 2 classes in the head; got {weight.shape[0]}.")
        self.train_mean_ = a.mean(axis=0)
        self.denominators_ = boundary_denominators(weight)
        self.n_features_in_ = a.shape[1]
        return self

    def set_refit_free(self, *, distance_as_normalizer):
        """Change the normaliser on a fitted scorer (the fit keeps both)."""
        self._check_fitted()
        self.distance_as_normalizer = distance_as_normalizer
        self.check_params(owner="fDBD")
        return self

    def score(self, features):
        """Negated regularised mean distance to the decision boundaries.

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
        self.check_params(owner="fDBD")
        a, weight, bias = read_head(features, "fDBD", self.n_features_in_)
        if weight.shape[0] != len(self.denominators_):
            raise DataError(f"fDBD was fitted on a head of {len(self.denominators_)} classes; got {weight.shape[0]}.")
        centre = self.train_mean_ if self.distance_as_normalizer else np.zeros_like(self.train_mean_)
        return fdbd_scores(a, weight, bias, self.denominators_, centre)
