"""GEN: the generalized entropy of the top-M softmax probabilities.

Liu, Lochman & Zach (2023), "GEN: Pushing the Limits of Softmax-Based
Out-of-Distribution Detection", CVPR. Reference code: OpenOOD v1.5's
``openood/postprocessors/gen_postprocessor.py`` (``configs/postprocessors/gen.yml``),
pytorch-ood's ``src/pytorch_ood/detector/gen.py``.
"""

from __future__ import annotations

import numbers
from numbers import Integral, Real

import numpy as np
from scipy.special import log_softmax, logsumexp
from sklearn.utils._param_validation import Interval

from pipeline.errors import ConfigError, invalid_param
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import check_matrix


def log_complement(log_p):
    """``log(1 - p)`` from ``log p``, accurate also where ``p`` is within rounding of 1.

    For each row's top class, ``1 - p`` is the mass of the other classes (a
    ``logsumexp`` of theirs): ``1 - p`` computed by subtraction would be 0 or
    pure rounding error for a confident prediction. The other classes have
    ``p <= 1/2``, where ``log1p(-p)`` is accurate.

    Parameters
    ----------
    log_p : ndarray of shape (n_samples, n_classes)
        ``log_softmax`` of the logits.

    Returns
    -------
    log_q : ndarray of shape (n_samples, n_classes)
        ``-inf`` where ``p == 1`` (a single class).
    """
    rows, top = np.arange(len(log_p)), log_p.argmax(axis=1)
    with np.errstate(divide="ignore"):
        log_q = np.log1p(-np.exp(log_p))
        others = log_p.copy()
        others[rows, top] = -np.inf
        log_q[rows, top] = logsumexp(others, axis=1)
    return log_q


def gen_scores(logits, gamma=0.1, M=100):
    """Generalized entropy ``G = sum_{j in top-M} p_j^gamma (1 - p_j)^gamma``; higher = more OOD.

    ``p = softmax(logits)``; the sum runs over the ``min(M, n_classes)``
    largest ``p_j`` (as OpenOOD's ``probs_sorted[:, -M:]``, which takes every
    class when ``M >= n_classes``). Each term is computed as
    ``exp(gamma * (log p_j + log(1 - p_j)))``: no overflow for huge logits, and
    a probability too small for float64 still counts (``p^0.1`` of
    ``exp(-1000)`` is ``exp(-100)``, not 0).

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)
    gamma : float, default=0.1
        ``gamma > 0``.
    M : int, default=100
        ``M >= 1``; values above ``n_classes`` mean every class.

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        float64 in [0, min(M, n_classes) / 4**gamma]; higher = more OOD.
    """
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    log_terms = gamma * (log_p + log_complement(log_p))
    m = min(int(M), log_p.shape[1])
    top = np.argpartition(-log_p, m - 1, axis=1)[:, :m]
    return np.exp(np.take_along_axis(log_terms, top, axis=1)).sum(axis=1)


class GENScorer(BaseScorer):
    """GEN (Liu, Lochman & Zach, CVPR 2023): generalized entropy of the top-M softmax probabilities.

    ``score(x) = sum_{j in top-M} p_j(x)^gamma (1 - p_j(x))^gamma``,
    ``p(x) = softmax(logits(x))``

    This is OpenOOD v1.5's ``GENPostprocessor.generalized_entropy``
    (``openood/postprocessors/gen_postprocessor.py``) exactly: a sum over the
    ``M`` largest probabilities, no clipping. OpenOOD returns ``-G`` as the
    confidence (higher = more ID); ``G`` itself is the score here, so that
    higher = more OOD. (pytorch-ood's ``GEN`` clips ``p`` to ``[1e-7, 1 - 1e-7]``
    and averages instead of summing: a different score, not followed.)

    ``M`` above the number of classes takes every class, as OpenOOD's slice
    does: with 10 classes (CIFAR-10) every ``M >= 10`` gives the same score,
    so only ``M < n_classes`` changes anything there. Reads
    ``Features.logits`` only; nothing to fit, so a search shares one fit
    across ``gamma`` and ``M`` (:attr:`refit_free_params`).

    Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based
    Out-of-Distribution Detection", CVPR 2023.

    Parameters
    ----------
    gamma : float, default=0.1
        The exponent, ``> 0`` (the paper's and OpenOOD's default).
    M : int, default=100
        Number of largest probabilities summed, ``>= 1`` (the paper's
        ImageNet value; clipped to the number of classes).
    """

    #: Nothing is learned: gamma and M are changed on a fitted scorer without refitting.
    refit_free_params = ("gamma", "M")

    _parameter_constraints = {"gamma": [Interval(Real, 0, None, closed="neither")],
                              "M": [Interval(Integral, 1, None, closed="left")]}

    def __init__(self, *, gamma=0.1, M=100):
        self.gamma = gamma
        self.M = M

    def fit(self, features, y=None):
        """Check the parameters; there is nothing to learn.

        Parameters
        ----------
        features : Features
        y : ignored

        Returns
        -------
        self : GENScorer
        """
        self._check_params()
        return super().fit(features)

    def set_refit_free(self, **params):
        """Change ``gamma`` and/or ``M`` in place (nothing was learned from them); returns self."""
        unknown = sorted(set(params) - set(self.refit_free_params))
        if unknown:
            raise ConfigError(f"GEN can change only {list(self.refit_free_params)} without refitting; "
                              f"got {unknown[0]!r}.")
        self.set_params(**params)
        self._check_params()
        return self

    def score(self, features):
        """Generalized entropy of the softmax of the logits.

        Parameters
        ----------
        features : Features
            Needs ``logits`` of shape (n_samples, n_classes).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        self._check_params()
        (logits,) = features.require("logits", owner="GEN")
        return gen_scores(check_matrix(logits, "logits", "GEN"), float(self.gamma), int(self.M))

    def _check_params(self):
        g, m = self.gamma, self.M
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not (0 < g < np.inf):
            raise invalid_param("gamma", "GEN", "a positive finite float", g)
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise invalid_param("M", "GEN", "an int >= 1", m)
