"""Energy score (EBO), plus the logit-space helpers the head-based scorers share.

Liu, Wang, Owens & Li (2020), "Energy-based Out-of-distribution Detection",
NeurIPS.
"""

from __future__ import annotations

import numbers
from numbers import Real

import numpy as np
from scipy.special import logsumexp
from sklearn.utils._param_validation import Interval

from pipeline.errors import DataError, invalid_param
from pipeline.scorers.base import BaseScorer


def energy_scores(logits, temperature=1.0):
    """Free energy ``E(x) = -T * logsumexp(logits / T)``; higher = more OOD.

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)
    temperature : float, default=1.0
        ``T > 0``.

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        float64 energies (the negated ID-ness ``T * logsumexp(logits / T)``).
    """
    logits = np.asarray(logits, dtype=np.float64)
    return -temperature * logsumexp(logits / temperature, axis=1)


def check_matrix(x, name, owner):
    """Return ``x`` as a finite float64 array of shape (n_samples, n_columns), or raise ``DataError``.

    Parameters
    ----------
    x : array-like of shape (n_samples, n_columns)
    name : str
        The field's name, for the message (e.g. ``"logits"``).
    owner : str
        The scorer, for the message (e.g. ``"MSP"``).

    Returns
    -------
    x : ndarray of shape (n_samples, n_columns), float64
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise DataError(f"{owner} expects {name} of shape (n_samples, n_columns) with n_columns >= 1; "
                        f"got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise DataError(f"{owner} got non-finite values (NaN or inf) in {name}.")
    return x


def read_head(features, owner, n_features=None):
    """The penultimate features and the final linear layer, checked to fit together.

    Parameters
    ----------
    features : Features
        Needs ``penultimate``, ``head_weight`` and ``head_bias``.
    owner : str
        The scorer, for error messages.
    n_features : int, optional
        The width a fitted scorer saw; a different width is refused.

    Returns
    -------
    a : ndarray of shape (n_samples, n_features), float64
    weight : ndarray of shape (n_classes, n_features), float64
    bias : ndarray of shape (n_classes,), float64
    """
    a, weight, bias = features.require("penultimate", "head_weight", "head_bias", owner=owner)
    a, weight = check_matrix(a, "penultimate", owner), check_matrix(weight, "head_weight", owner)
    bias = np.asarray(bias, dtype=np.float64)
    if weight.shape[1] != a.shape[1] or bias.shape != (weight.shape[0],):
        raise DataError(f"{owner} expects penultimate (n, d), head_weight (c, d) and head_bias (c,); got "
                        f"penultimate {a.shape}, head_weight {weight.shape}, head_bias {bias.shape}.")
    if n_features is not None and a.shape[1] != n_features:
        raise DataError(f"{owner} was fitted on {n_features} penultimate features; got {a.shape[1]}.")
    return a, weight, bias


def head_logits(a, weight, bias):
    """Logits of the final linear layer, ``a @ weight.T + bias``.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    weight : ndarray of shape (n_classes, n_features)
    bias : ndarray of shape (n_classes,)

    Returns
    -------
    logits : ndarray of shape (n_samples, n_classes)
    """
    return a @ weight.T + bias


class EnergyScorer(BaseScorer):
    """Energy score (Liu et al., NeurIPS 2020).

    ``score(x) = -T * logsumexp(logits(x) / T)``

    The paper's ID score is ``T * logsumexp(logits / T)`` (the negative free
    energy); it is negated here so that higher = more OOD. OpenOOD's ``ebo``
    postprocessor uses ``T = 1``. Reads ``Features.logits`` only.

    Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection",
    NeurIPS 2020.

    Parameters
    ----------
    temperature : float, default=1.0
        ``T > 0``.
    """

    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, *, temperature=1.0):
        self.temperature = temperature

    def fit(self, features, y=None):
        """Check the parameters; there is nothing to learn.

        Parameters
        ----------
        features : Features
        y : ignored

        Returns
        -------
        self : EnergyScorer
        """
        self._check_temperature()
        return super().fit(features)

    def score(self, features):
        """Energy of the logits.

        Parameters
        ----------
        features : Features
            Needs ``logits`` of shape (n_samples, n_classes).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        self._check_temperature()
        (logits,) = features.require("logits", owner="Energy")
        return energy_scores(check_matrix(logits, "logits", "Energy"), float(self.temperature))

    def _check_temperature(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (0 < t < np.inf):
            raise invalid_param("temperature", "Energy", "a positive finite float", t)
