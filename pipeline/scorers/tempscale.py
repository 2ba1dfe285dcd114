"""Temperature scaling: MSP of ``logits / T``, with ``T`` fitted by NLL on labelled ID data.

Guo, Pleiss, Sun & Weinberger (2017), "On Calibration of Modern Neural
Networks", ICML. Reference code: OpenOOD v1.5's
``openood/postprocessors/temp_scaling_postprocessor.py``
(``TemperatureScalingPostprocessor``, ``configs/postprocessors/temp_scaling.yml``:
no arguments), pytorch-ood's ``src/pytorch_ood/detector/tscaling.py``.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp, softmax

from pipeline.errors import DataError
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import check_matrix
from pipeline.scorers.msp import msp_scores

#: The range ``T`` is searched in (a log-scale bracket wide enough for any logit scale met in practice).
T_BOUNDS = (1e-4, 1e4)

log = logging.getLogger(__name__)


def temperature_nll(logits, labels, temperature):
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)``.

    ``NLL(T) = mean_i [logsumexp(z_i / T) - z_{i, y_i} / T]`` (cross-entropy,
    as OpenOOD's ``nn.CrossEntropyLoss``); stable for huge logits.

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,)
        Class indices in ``[0, n_classes)``.
    temperature : float
        ``T > 0``.

    Returns
    -------
    nll : float
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), labels]))


def temperature_nll_slope(logits, labels, beta):
    """Derivative of :func:`temperature_nll` in ``beta = 1 / T``: ``mean_i (E_{softmax(beta z_i)}[z_i] - z_{i, y_i})``.

    The NLL is convex in ``beta`` (a mean of ``logsumexp`` of linear
    functions minus a linear one), so this is non-decreasing in ``beta``.

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,)
    beta : float
        ``1 / T > 0``.

    Returns
    -------
    slope : float
    """
    z = np.asarray(logits, dtype=np.float64)
    return float(np.mean((softmax(beta * z, axis=1) * z).sum(axis=1) - z[np.arange(len(z)), labels]))


def fit_temperature(logits, labels, bounds=T_BOUNDS):
    """The ``T`` in ``bounds`` that minimises :func:`temperature_nll`.

    The NLL is convex in ``beta = 1 / T``: its minimum is the root of
    :func:`temperature_nll_slope`, found by Brent's method along ``log beta``
    (to float precision). When the slope keeps one sign over ``bounds`` the
    nearer bound is returned: ``T -> 0`` when no row is misclassified
    (:func:`labelled_rows` refuses that case),
    ``T -> inf`` for labels worse than chance.

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,)
    bounds : tuple of float, default=T_BOUNDS

    Returns
    -------
    temperature : float
    """
    def slope(log_beta):
        return temperature_nll_slope(logits, labels, np.exp(log_beta))

    lo, hi = -np.log(bounds[1]), -np.log(bounds[0])  # log beta
    if slope(lo) >= 0:
        return float(bounds[1])
    if slope(hi) <= 0:
        return float(bounds[0])
    return float(np.exp(-brentq(slope, lo, hi, xtol=1e-14)))


def labelled_rows(features):
    """The logits and labels of the rows labelled with a class (>= 0), checked to admit a fitted ``T``.

    Parameters
    ----------
    features : Features
        Needs ``logits`` (n_samples, n_classes) and ``labels`` (n_samples,).

    Returns
    -------
    logits : ndarray of shape (n_labelled, n_classes), float64
    labels : ndarray of shape (n_labelled,)

    Raises
    ------
    DataError
        No labelled row, or a label out of range.
    """
    logits, labels = features.require("logits", "labels", owner="TempScale")
    logits, labels = check_matrix(logits, "logits", "TempScale"), np.asarray(labels)
    known = labels >= 0
    if not known.any():
        raise DataError("TempScale needs ID rows with class labels (>= 0) to fit its temperature; got none.")
    if labels.max() >= logits.shape[1]:
        raise DataError(f"TempScale got label {labels.max()} for logits with {logits.shape[1]} classes.")
    return logits[known], labels[known]


def has_errors(logits, labels) -> bool:
    """Whether any row's arg max is not its label: without one, the NLL has no minimum (it falls as ``T -> 0``)."""
    return bool((logits.max(axis=1) > logits[np.arange(len(labels)), labels]).any())


class TempScaleScorer(BaseScorer):
    """Temperature scaling (Guo et al., ICML 2017) as an OOD score: MSP of ``logits / T``.

    ``fit``: ``temperature_ = argmin_T mean_i -log softmax(z_i / T)_{y_i}`` over
    the labelled ID rows (label >= 0) ``fit`` gets. Then

    ``score(x) = -max_c softmax(logits(x) / temperature_)_c``

    This is OpenOOD v1.5's ``TemperatureScalingPostprocessor``
    (``openood/postprocessors/temp_scaling_postprocessor.py``): the same
    objective (``nn.CrossEntropyLoss`` of ``logits / T``) and the same score
    (its confidence ``max softmax(logits / T)``, negated here so that higher =
    more OOD). Two differences, both deliberate:

    - OpenOOD fits ``T`` on ID-*val*; here it is fitted on what ``fit`` gets,
      which the pipeline makes ID-train (ID-val is kept for standardisation and
      selection). A network that fits its training set closely is more
      confident there than on held-out data, so this ``T`` is lower than a
      held-out one. If no labelled row is misclassified, the NLL falls
      without end as ``T -> 0`` (every score would become -1): no temperature
      is identifiable, so ``fit`` keeps ``T = 1`` (the scorer is then MSP),
      sets ``identifiable_ = False`` and logs a warning saying so.
    - OpenOOD runs one ``LBFGS(lr=0.01, max_iter=50)`` step from ``T = 1.5``,
      which can stop well short of the minimum; here the one-dimensional
      objective is minimised to float precision (:func:`fit_temperature`).

    Needs ``Features.logits``, and ``labels`` to fit.

    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural
    Networks", ICML 2017.

    Attributes
    ----------
    temperature_ : float
        The fitted ``T`` (1.0 when not identifiable).
    identifiable_ : bool
        Whether some labelled row was misclassified, so that the NLL has a minimum.
    n_classes_ : int
        Logit columns seen during ``fit``.
    """

    learns = True  # fit reads ID-train logits and labels

    _parameter_constraints: dict = {}

    def fit(self, features, y=None):
        """Fit ``temperature_`` by NLL on the labelled ID rows.

        Parameters
        ----------
        features : Features
            Needs ``logits`` (n_samples, n_classes) and ``labels`` (n_samples,);
            rows labelled -1 (OOD, outliers) are ignored.
        y : ignored

        Returns
        -------
        self : TempScaleScorer
        """
        logits, labels = labelled_rows(features)
        self.identifiable_ = has_errors(logits, labels)
        if self.identifiable_:
            self.temperature_ = fit_temperature(logits, labels)
        else:
            log.warning("TempScale: all %d labelled ID rows are classified correctly, so the NLL falls as T -> 0 "
                        "and no temperature is identifiable; keeping T = 1 (the scores are MSP's).", len(labels))
            self.temperature_ = 1.0
        self.n_classes_ = logits.shape[1]
        return self

    def score(self, features):
        """Negated maximum softmax probability of ``logits / temperature_``.

        Parameters
        ----------
        features : Features
            Needs ``logits`` of shape (n_samples, n_classes).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        self._check_fitted()
        (logits,) = features.require("logits", owner="TempScale")
        logits = check_matrix(logits, "logits", "TempScale")
        if logits.shape[1] != self.n_classes_:
            raise DataError(f"TempScale was fitted on {self.n_classes_} logit columns; got {logits.shape[1]}.")
        return msp_scores(logits / self.temperature_)
