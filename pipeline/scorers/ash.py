"""ASH: activation shaping (prune, then binarise or rescale), then energy.

Djurisic, Bozanic, Ashok & Liu (2023), "Extremely Simple Activation Shaping for
Out-of-Distribution Detection", ICLR.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from pipeline.errors import invalid_param
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import energy_scores, head_logits, read_head
from pipeline.scorers.scale import check_percentile, safe_ratio, top_k_count, top_k_mask

VARIANTS = ("p", "b", "s")


def ash_p(a, percentile):
    """ASH-P: keep the ``k = D - round(D * p / 100)`` largest values of each row, zero the rest.

    Ties keep the lower index.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    percentile : float
        ``p`` in [0, 100), with ``k >= 1``.

    Returns
    -------
    shaped : ndarray of shape (n_samples, n_features), float64
    """
    a = np.asarray(a, dtype=np.float64)
    return np.where(top_k_mask(a, top_k_count(a.shape[1], percentile)), a, 0.0)


def ash_b(a, percentile):
    """ASH-B: the kept top-``k`` positions all get ``s1 / k`` (``s1 = sum(a)`` before pruning), the rest 0.

    When fewer than ``k`` units of a row are non-zero, tied zeros are kept too
    (the lower indices first), so some ``s1 / k`` lands on them; OpenOOD's
    ``torch.topk`` picks those tied positions in an unspecified order.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    percentile : float
        ``p`` in [0, 100), with ``k >= 1``.

    Returns
    -------
    shaped : ndarray of shape (n_samples, n_features), float64
    """
    a = np.asarray(a, dtype=np.float64)
    k = top_k_count(a.shape[1], percentile)
    return np.where(top_k_mask(a, k), (a.sum(axis=1) / k)[:, None], 0.0)


def ash_s(a, percentile):
    """ASH-S: prune as ASH-P, then multiply by ``exp(s1 / s2)``.

    ``s1 = sum(a)`` before pruning, ``s2`` = sum after. A row with ``s2 == 0``
    (an all-zero ReLU row) is returned pruned but unscaled.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    percentile : float
        ``p`` in [0, 100), with ``k >= 1``.

    Returns
    -------
    shaped : ndarray of shape (n_samples, n_features), float64
    """
    a = np.asarray(a, dtype=np.float64)
    pruned = ash_p(a, percentile)
    return pruned * np.exp(safe_ratio(a.sum(axis=1), pruned.sum(axis=1)))[:, None]


SHAPERS = {"p": ash_p, "b": ash_b, "s": ash_s}


class AshScorer(BaseScorer):
    """ASH (Djurisic et al., ICLR 2023): energy of the logits of shaped features.

    On the penultimate features ``a`` (D units, after ReLU and pooling), with
    ``k = D - round(D * p / 100)`` and ``s1 = sum(a)``:

    - ``variant="p"``: keep the top-``k`` values, zero the rest;
    - ``variant="b"``: the top-``k`` positions get ``s1 / k``, the rest 0;
    - ``variant="s"``: prune as ``"p"``, then multiply by ``exp(s1 / s2)``
      with ``s2`` the sum after pruning;

    then ``logits = shaped @ W.T + b`` and ``score(x) = -logsumexp(logits)``.

    The paper's (and OpenOOD's) score is ``logsumexp(logits)``, higher = more
    ID; it is negated here so that higher = more OOD. Needs
    ``Features.penultimate``, ``head_weight`` and ``head_bias``; nothing to fit.

    Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for
    Out-of-Distribution Detection", ICLR 2023.

    Parameters
    ----------
    variant : {"p", "b", "s"}, default="p"
    percentile : float, default=90
        ``p`` in [0, 100) (OpenOOD's CIFAR setting is 90).
    """

    _parameter_constraints = {"percentile": [Interval(Real, 0, 100, closed="left")], "variant": [StrOptions({"p", "b", "s"})]}

    def __init__(self, *, variant="p", percentile=90):
        self.variant = variant
        self.percentile = percentile

    def fit(self, features, y=None):
        """Check the parameters; there is nothing to learn.

        Parameters
        ----------
        features : Features
        y : ignored

        Returns
        -------
        self : AshScorer
        """
        self._check_params()
        return super().fit(features)

    def score(self, features):
        """Energy of the head's logits on the shaped features.

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
        self._check_params()
        a, weight, bias = read_head(features, "ASH")
        check_percentile(self.percentile, "ASH", a.shape[1])
        shaped = SHAPERS[self.variant](a, self.percentile)
        return energy_scores(head_logits(shaped, weight, bias))

    def _check_params(self):
        if not isinstance(self.variant, str) or self.variant not in VARIANTS:
            raise invalid_param("variant", "ASH", "one of {'p', 'b', 's'}", self.variant)
        check_percentile(self.percentile, "ASH")
