"""SCALE: rescale the penultimate features by how peaked they are, then energy.

Xu, Chen, Franchi & Yao (2024), "Scaling for Training Time and Post-hoc
Out-of-distribution Detection Enhancement", ICLR. Also holds the top-k helpers
that ASH shares.
"""

from __future__ import annotations

import numbers
from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval

from pipeline.errors import invalid_param
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import energy_scores, head_logits, read_head


def top_k_count(n_features, percentile):
    """How many units are kept at ``percentile``: ``k = D - round(D * p / 100)``.

    Uses ``np.round`` (halves to even), as OpenOOD's ``scale``/``ash_*`` do.

    Parameters
    ----------
    n_features : int
        ``D``.
    percentile : float
        ``p`` in [0, 100).

    Returns
    -------
    k : int
    """
    return n_features - int(np.round(n_features * percentile / 100.0))


def top_k_mask(a, k):
    """Boolean mask of the ``k`` largest values of each row; ties keep the lower index.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    k : int
        ``0 <= k <= n_features``.

    Returns
    -------
    mask : ndarray of shape (n_samples, n_features), bool
    """
    order = np.argsort(-a, axis=1, kind="stable")[:, :k]
    mask = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def safe_ratio(s1, s2):
    """``s1 / s2``, and 0 where ``s2 == 0`` (so that ``exp`` of it is 1).

    Parameters
    ----------
    s1, s2 : ndarray of shape (n_samples,)

    Returns
    -------
    ratio : ndarray of shape (n_samples,)
    """
    return np.divide(s1, s2, out=np.zeros_like(s1, dtype=np.float64), where=s2 != 0)


def check_percentile(percentile, owner, n_features=None):
    """Raise ``ConfigError`` unless ``percentile`` is in [0, 100) and keeps at least one unit.

    Parameters
    ----------
    percentile : object
        The value to check.
    owner : str
        The scorer, for the message.
    n_features : int, optional
        ``D``; when given, ``k = D - round(D * p / 100)`` must be >= 1.
    """
    p = percentile
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0 <= p < 100):
        raise invalid_param("percentile", owner, "a float in [0, 100)", p)
    if n_features is not None and top_k_count(n_features, p) < 1:
        raise invalid_param("percentile", owner, f"a float that keeps at least one of the {n_features} features "
                            "(k = D - round(D * p / 100) >= 1)", p, hint="lower the percentile.")


def scale_features(a, percentile):
    """SCALE's rescaled features, ``a * exp(s1 / s2)`` (nothing is pruned).

    ``s1 = sum(a)``; ``s2`` = the sum of the ``k = D - round(D * p / 100)``
    largest values of ``a`` (per row). A row with ``s2 == 0`` (for ReLU
    features: an all-zero row) is returned unchanged.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
        Penultimate features (non-negative: after ReLU and pooling).
    percentile : float
        ``p`` in [0, 100), with ``k >= 1``.

    Returns
    -------
    scaled : ndarray of shape (n_samples, n_features), float64
    """
    a = np.asarray(a, dtype=np.float64)
    s1 = a.sum(axis=1)
    s2 = np.where(top_k_mask(a, top_k_count(a.shape[1], percentile)), a, 0.0).sum(axis=1)
    return a * np.exp(safe_ratio(s1, s2))[:, None]


class ScaleScorer(BaseScorer):
    """SCALE (Xu et al., ICLR 2024): energy of the logits of rescaled features.

    On the penultimate features ``a`` (D units, after ReLU and pooling):

    ``s1 = sum(a)``, ``s2`` = sum of the ``k = D - round(D * p / 100)`` largest
    values of ``a``, ``logits = (a * exp(s1 / s2)) @ W.T + b``,

    ``score(x) = -logsumexp(logits)``

    Unlike ASH-S nothing is pruned: the whole vector is scaled. The paper's
    (and OpenOOD's) score is ``logsumexp(logits)``, higher = more ID; it is
    negated here so that higher = more OOD. An all-zero feature row
    (``s2 == 0``) is left unscaled, so its logits are the bias ``b``. Needs
    ``Features.penultimate``, ``head_weight`` and ``head_bias``; nothing to fit.

    Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc
    Out-of-distribution Detection Enhancement", ICLR 2024.

    Parameters
    ----------
    percentile : float, default=85
        ``p`` in [0, 100). The paper picked 85 on ImageNet and 65 on CIFAR
        (searched in 50..95 by 5).
    """

    _parameter_constraints = {"percentile": [Interval(Real, 0, 100, closed="left")]}

    def __init__(self, *, percentile=85):
        self.percentile = percentile

    def fit(self, features, y=None):
        """Check the parameters; there is nothing to learn.

        Parameters
        ----------
        features : Features
        y : ignored

        Returns
        -------
        self : ScaleScorer
        """
        check_percentile(self.percentile, "SCALE")
        return super().fit(features)

    def score(self, features):
        """Energy of the head's logits on the rescaled features.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and
            ``head_bias`` (C,).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        check_percentile(self.percentile, "SCALE")
        a, weight, bias = read_head(features, "SCALE")
        check_percentile(self.percentile, "SCALE", a.shape[1])
        return energy_scores(head_logits(scale_features(a, self.percentile), weight, bias))
