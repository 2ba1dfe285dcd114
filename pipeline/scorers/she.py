"""SHE: similarity to the stored pattern (mean correct ID-train feature) of the predicted class.

Zhang, Fu, Wu, Chen & Li (2023), "Out-of-distribution Detection based on
In-distribution Data Patterns Memorization with Modern Hopfield Energy", ICLR.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils._param_validation import StrOptions

from pipeline.errors import DataError
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import head_logits, read_head

#: ``torch.cosine_similarity``'s floor of ``||x|| * ||y||``.
COSINE_EPS = 1e-8


def she_patterns(a, labels, pred, n_classes):
    """Stored patterns: per class, the mean feature of the ID samples whose label and prediction are that class.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    labels : ndarray of shape (n_samples,)
    pred : ndarray of shape (n_samples,)
    n_classes : int

    Returns
    -------
    patterns : ndarray of shape (n_classes, n_features)

    Raises
    ------
    DataError
        When a class has no correctly classified sample.
    """
    correct = np.asarray(labels) == pred
    counts = np.bincount(pred[correct], minlength=n_classes)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise DataError(f"SHE needs at least one correctly classified ID-train sample per class; classes {missing} "
                        "have none, so their stored pattern is undefined.")
    sums = np.zeros((n_classes, a.shape[1]))
    np.add.at(sums, pred[correct], a[correct])
    return sums / counts[:, None]


def she_similarity(a, targets, metric):
    """Row-wise similarity of ``a`` to ``targets`` (higher = more alike), as the reference's ``distance``.

    Parameters
    ----------
    a, targets : ndarray of shape (n_samples, n_features)
    metric : {"inner_product", "euclidean", "cosine"}
        ``a . t``; ``-||a - t||``; ``a . t / max(||a|| ||t||, 1e-8)``.

    Returns
    -------
    similarity : ndarray of shape (n_samples,)
    """
    dot = (a * targets).sum(axis=1)
    if metric == "inner_product":
        return dot
    if metric == "euclidean":
        return -np.linalg.norm(a - targets, axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(targets, axis=1)
    return dot / np.maximum(norms, COSINE_EPS)


class SHEScorer(BaseScorer):
    """SHE (Zhang et al., ICLR 2023): simplified Hopfield energy against the stored class patterns.

    ``fit``: the stored pattern of class ``c`` is the mean penultimate feature
    of the ID-train samples labelled ``c`` *and* predicted ``c``. Then, with
    ``pred`` the predicted class of the feature ``z``:

    ``score(x) = -(z . pattern[pred])``

    The paper's score is higher = more ID; it is negated here. Follows OpenOOD
    v1.5's ``openood/postprocessors/she_postprocessor.py`` (``configs/
    postprocessors/she.yml``: ``metric: inner_product``; no sweep), whose
    ``euclidean`` and ``cosine`` metrics are offered too. Predictions are the
    argmax of the cached head's logits. Needs ``Features.penultimate``,
    ``head_weight``, ``head_bias`` and, to fit, ``labels``.

    Zhang, Fu, Wu, Chen & Li, "Out-of-distribution Detection based on
    In-distribution Data Patterns Memorization with Modern Hopfield Energy",
    ICLR 2023.

    Parameters
    ----------
    metric : {"inner_product", "euclidean", "cosine"}, default="inner_product"
        Similarity to the stored pattern. Refit-free.

    Attributes
    ----------
    patterns_ : ndarray of shape (n_classes, n_features)
    n_features_in_ : int
    """

    learns = True  # fit reads ID-train features
    refit_free_params = ("metric",)

    _parameter_constraints = {"metric": [StrOptions({"inner_product", "euclidean", "cosine"})]}

    def __init__(self, *, metric="inner_product"):
        self.metric = metric

    def fit(self, features, y=None):
        """Store the mean correctly classified ID feature of each class.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D), ``head_bias`` (C,) and ``labels``.
        y : ignored

        Returns
        -------
        self : SHEScorer
        """
        self.check_params(owner="SHE")
        a, weight, bias = read_head(features, "SHE")
        (labels,) = features.require("labels", owner="SHE")
        if len(labels) != len(a):
            raise DataError(f"SHE got {len(labels)} labels for {len(a)} penultimate features.")
        pred = head_logits(a, weight, bias).argmax(axis=1)
        self.patterns_ = she_patterns(a, labels, pred, weight.shape[0])
        self.n_features_in_ = a.shape[1]
        return self

    def set_refit_free(self, *, metric):
        """Change ``metric`` on a fitted scorer (the patterns do not depend on it)."""
        self._check_fitted()
        self.metric = metric
        self.check_params(owner="SHE")
        return self

    def score(self, features):
        """Negated similarity to the predicted class's stored pattern.

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
        self.check_params(owner="SHE")
        a, weight, bias = read_head(features, "SHE", self.n_features_in_)
        if weight.shape[0] != len(self.patterns_):
            raise DataError(f"SHE was fitted on a head of {len(self.patterns_)} classes; got {weight.shape[0]}.")
        pred = head_logits(a, weight, bias).argmax(axis=1)
        return -she_similarity(a, self.patterns_[pred], self.metric)
