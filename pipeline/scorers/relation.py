"""Relation: the summed kernel relations of a sample to the ID-train graph (features and probabilities).

Kim, Park, Song & Song (2023), "Neural Relation Graph: A Unified Framework
for Identifying Label Noise and Outlier Data", NeurIPS.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy.special import softmax
from sklearn.utils._param_validation import Interval

from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import head_logits, read_head
from pipeline.scorers.nnguide import bank_rows, block_rows


def relation_normalise(x):
    """Rows divided by ``sqrt(sum x^2 + 1e-10)``, as the reference's ``normalize``.

    Parameters
    ----------
    x : ndarray of shape (n_samples, n_features)

    Returns
    -------
    normalised : ndarray of shape (n_samples, n_features)
    """
    return x / np.sqrt((x ** 2).sum(axis=1, keepdims=True) + 1e-10)


def relation_scores(feat, prob, bank_feat, bank_prob, power=1.0, threshold=0.03):
    """Negated relation-graph score, ``-sum_i [k_i > t] * k_i ** power``; higher = more OOD.

    The kernel to ID-train sample ``i`` is ``k_i = max(f . f_i, 0) * (p . p_i)``
    (normalised features ``f``, softmax probabilities ``p``); edges at most
    ``threshold`` are cut. Computed in blocks of test rows, so that a block
    against the bank holds at most 2**22 kernel values.

    Parameters
    ----------
    feat : ndarray of shape (n_samples, n_features)
        Normalised test features (:func:`relation_normalise`).
    prob : ndarray of shape (n_samples, n_classes)
    bank_feat : ndarray of shape (n_bank, n_features)
        Normalised ID-train features.
    bank_prob : ndarray of shape (n_bank, n_classes)
    power : float, default=1.0
        The kernel's temperature ``pow``.
    threshold : float, default=0.03

    Returns
    -------
    scores : ndarray of shape (n_samples,)
    """
    out = np.empty(len(feat))
    step = block_rows(len(bank_feat))
    for start in range(0, len(feat), step):
        stop = start + step
        kernel = np.maximum(feat[start:stop] @ bank_feat.T, 0.0) * (prob[start:stop] @ bank_prob.T)
        kept = np.where(kernel > threshold, kernel, 0.0)
        out[start:stop] = -(kept ** power).sum(axis=1)
    return out


class RelationScorer(BaseScorer):
    """Relation (Kim et al., NeurIPS 2023): how strongly a sample relates to the ID-train graph.

    ``fit`` keeps the normalised ID-train features ``f_i`` and softmax
    probabilities ``p_i`` (all rows, or a seeded sample of ``bank_size``).
    For a test sample (``f``, ``p``):

    ``k_i = max(f . f_i, 0) * (p . p_i)``,  ``score(x) = -sum_i [k_i > t] * k_i ** pow``

    with ``f = a / sqrt(||a||^2 + 1e-10)`` and ``t = 0.03``. The reference's
    score is higher = more ID (the authors' ``1 / (sum + 1e-6)`` is already an
    OOD score with the same ranking); it is negated here. Follows OpenOOD
    v1.5's ``openood/postprocessors/relation_postprocessor.py`` (code from
    github.com/snu-mllab/Neural-Relation-Graph, ``relation.py``, kernel
    ``cos_p``; ``configs/postprocessors/relation.yml``: ``pow: 1``, sweep
    ``pow_list: [1, 2, 4, 6, 8]``), on all of ID-train by default. The kernel
    is computed in blocks of test rows (the reference's ``chunk``), so memory
    beyond the bank stays at 32 MiB; ``bank_size`` bounds the bank itself
    (the authors subsample with a stride, ``--hop``; here a seeded sample).
    Probabilities come from the cached head's logits. Needs
    ``Features.penultimate``, ``head_weight`` and ``head_bias``.

    Kim, Park, Song & Song, "Neural Relation Graph: A Unified Framework for
    Identifying Label Noise and Outlier Data", NeurIPS 2023.

    Parameters
    ----------
    power : float, default=1
        The kernel's temperature ``pow`` (> 0); the authors warn that values
        other than 1 are not optimal for OOD detection. Refit-free.
    threshold : float, default=0.03
        Edges with kernel value at most this are cut (>= 0). Refit-free.
    bank_size : int or None, default=None
        ID-train rows kept; None keeps all of them (as the reference).
    seed : int or None, default=0
        Seed of that sample.

    Attributes
    ----------
    bank_feat_ : ndarray of shape (n_bank, n_features)
    bank_prob_ : ndarray of shape (n_bank, n_classes)
    train_indices_ : ndarray of shape (n_bank,)
    n_features_in_ : int
    """

    learns = True  # fit reads ID-train features
    refit_free_params = ("power", "threshold")

    _parameter_constraints = {
        "power": [Interval(Real, 0, None, closed="neither")],
        "threshold": [Interval(Real, 0, None, closed="left")],
        "bank_size": [Interval(Integral, 1, None, closed="left"), None],
        "seed": [Interval(Integral, 0, None, closed="left"), None],
    }

    def __init__(self, *, power=1, threshold=0.03, bank_size=None, seed=0):
        self.power = power
        self.threshold = threshold
        self.bank_size = bank_size
        self.seed = seed

    def fit_rows(self, labels):
        """The bank's rows (None, all of ID-train, unless ``bank_size`` is set)."""
        self.check_params(owner="Relation")
        return None if self.bank_size is None else bank_rows(len(labels), self.bank_size, self.seed)

    def fit(self, features, y=None):
        """Keep the normalised features and probabilities of the ID rows.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and ``head_bias`` (C,).
        y : ignored

        Returns
        -------
        self : RelationScorer
        """
        self.check_params(owner="Relation")
        a, weight, bias = read_head(features, "Relation")
        self.train_indices_ = bank_rows(len(a), self.bank_size, self.seed)
        a = a[self.train_indices_]
        self.bank_feat_ = relation_normalise(a)
        self.bank_prob_ = softmax(head_logits(a, weight, bias), axis=1)
        self.n_features_in_ = a.shape[1]
        return self

    def set_refit_free(self, *, power=None, threshold=None):
        """Change ``power`` and/or ``threshold`` on a fitted scorer (the bank does not depend on them)."""
        self._check_fitted()
        if power is not None:
            self.power = power
        if threshold is not None:
            self.threshold = threshold
        self.check_params(owner="Relation")
        return self

    def score(self, features):
        """Negated sum of the kept relations to the ID bank.

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
        self.check_params(owner="Relation")
        a, weight, bias = read_head(features, "Relation", self.n_features_in_)
        prob = softmax(head_logits(a, weight, bias), axis=1)
        return relation_scores(relation_normalise(a), prob, self.bank_feat_, self.bank_prob_,
                               float(self.power), float(self.threshold))
