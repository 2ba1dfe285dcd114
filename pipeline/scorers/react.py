"""ReAct: clip the penultimate activations at an ID percentile, then energy.

Sun, Guo & Li (2021), "ReAct: Out-of-distribution Detection With Rectified
Activations", NeurIPS.
"""

from __future__ import annotations

import numbers
from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval

from pipeline.errors import invalid_param
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import check_matrix, energy_scores, head_logits, read_head


def react_threshold(a, percentile):
    """The ``percentile``-th percentile of all activation values of ``a`` (flattened).

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
        ID penultimate features.
    percentile : float
        In (0, 100].

    Returns
    -------
    threshold : float
    """
    return float(np.percentile(np.asarray(a, dtype=np.float64).ravel(), percentile))


def react_features(a, threshold):
    """Rectified activations, ``min(a, threshold)`` element-wise.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    threshold : float

    Returns
    -------
    clipped : ndarray of shape (n_samples, n_features), float64
    """
    return np.minimum(np.asarray(a, dtype=np.float64), threshold)


class ReActScorer(BaseScorer):
    """ReAct (Sun et al., NeurIPS 2021): energy of the logits of clipped features.

    ``fit``: ``threshold_`` = the ``p``-th percentile of every ID penultimate
    activation value (all samples and units, flattened). Then

    ``logits = min(a, threshold_) @ W.T + b``, ``score(x) = -logsumexp(logits)``

    The paper's (and OpenOOD's) score is ``logsumexp(logits)``, higher = more
    ID; it is negated here so that higher = more OOD. OpenOOD takes the
    percentile over ID-*val* features; here it is over whatever ``fit`` gets
    (the pipeline passes ID-train). Needs ``Features.penultimate``,
    ``head_weight`` and ``head_bias``.

    Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified
    Activations", NeurIPS 2021.

    Parameters
    ----------
    percentile : float, default=90
        ``p`` in (0, 100] (100 clips at the largest ID activation).

    Attributes
    ----------
    threshold_ : float
        The clipping threshold.
    n_features_in_ : int
        ``D`` seen during ``fit``.
    """

    learns = True  # fit reads ID-train features

    _parameter_constraints = {"percentile": [Interval(Real, 0, 100, closed="right")]}

    def __init__(self, *, percentile=90):
        self.percentile = percentile

    def fit(self, features, y=None):
        """Set ``threshold_`` from the ID penultimate features.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` of shape (n_samples, D).
        y : ignored

        Returns
        -------
        self : ReActScorer
        """
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0 < p <= 100):
            raise invalid_param("percentile", "ReAct", "a float in (0, 100]", p)
        (a,) = features.require("penultimate", owner="ReAct")
        a = check_matrix(a, "penultimate", "ReAct")
        self.threshold_ = react_threshold(a, p)
        self.n_features_in_ = a.shape[1]
        return self

    def score(self, features):
        """Energy of the head's logits on the clipped features.

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
        self._check_fitted()
        a, weight, bias = read_head(features, "ReAct", self.n_features_in_)
        return energy_scores(head_logits(react_features(a, self.threshold_), weight, bias))
