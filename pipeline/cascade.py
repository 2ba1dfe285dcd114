"""Thresholds for an early-exit cascade of per-layer detectors, from cached ID-val scores.

An input is flagged OOD by the cascade when **any** guarded layer's score is
above that layer's threshold (the guard stops at the first, but the flag is
the union). Layer ``l`` gets an ID false-alarm budget ``alpha_l = c * w_l``
(``w`` the relative weights, summing to 1), and its threshold is ID-val's
``1 - alpha_l`` quantile. The scale ``c`` is the largest for which the
cascade's false alarms on ID-val, the union over layers, stay within ``1 -
target_tpr``. Layers' false alarms overlap, so ``c`` usually exceeds the
Bonferroni ``1 - target_tpr``; finding it on the union is what keeps the
cascade, not each layer, at the target.

Everything here is numpy on ``(n_samples, n_layers)`` score matrices (higher =
more OOD); nothing touches a model.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from pipeline.errors import DataError, invalid_param

#: Bisection steps on the budget scale: 2**-60 is far below one sample's share of any ID-val split.
STEPS = 60


@dataclass(frozen=True)
class Calibration:
    """Thresholds of a cascade and what they achieve on ID-val.

    Attributes
    ----------
    thresholds : ndarray of shape (n_layers,)
        A sample stops at layer ``l`` when its score is above ``thresholds[l]``.
    budgets : ndarray of shape (n_layers,)
        Per-layer ID false-alarm budgets ``alpha_l``, as spent: the fraction
        of ID-val each layer alone flags.
    scales : ndarray of shape (n_layers,)
        ID-val standard deviation of each layer's scores: puts layers on one
        scale for the cascade's continuous score.
    val_tpr : float
        Fraction of ID-val the cascade lets through (>= the target).
    """

    thresholds: np.ndarray
    budgets: np.ndarray
    scales: np.ndarray
    val_tpr: float


def calibrate(val_scores, target_tpr=0.95, weights=None) -> Calibration:
    """Per-layer thresholds such that the whole cascade keeps ``target_tpr`` of ID-val.

    Parameters
    ----------
    val_scores : ndarray of shape (n_samples, n_layers)
        ID-val scores of each guarded layer's detector.
    target_tpr : float, default=0.95
        Fraction of ID inputs the cascade must let through, in (0, 1).
    weights : array-like of shape (n_layers,), optional
        Relative false-alarm budgets (non-negative, not all zero); equal when None.

    Returns
    -------
    Calibration
    """
    scores = _check_scores(val_scores)
    if isinstance(target_tpr, bool) or not isinstance(target_tpr, numbers.Real) or not 0 < target_tpr < 1:
        raise invalid_param("target_tpr", "calibrate", "a float in (0, 1)", target_tpr)
    w = _check_weights(weights, scores.shape[1])
    allowed = 1.0 - target_tpr + 1e-12  # 1 - 0.9 is 0.0999...98 in floating point: 2 of 20 must still fit
    lo, hi = 0.0, 1.0 / w.max()  # at hi the heaviest layer's budget is 1: every sample flagged
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        if false_alarm_rate(scores, thresholds_at(scores, mid * w)) <= allowed:
            lo = mid
        else:
            hi = mid
    thresholds = thresholds_at(scores, lo * w)
    budgets = (scores > thresholds[None, :]).mean(axis=0)  # what each layer alone flags of ID-val
    scales = scores.std(axis=0)
    return Calibration(thresholds, budgets, np.where(scales > 0, scales, 1.0),
                       1.0 - false_alarm_rate(scores, thresholds))


def thresholds_at(scores, budgets) -> np.ndarray:
    """Each layer's ``1 - alpha_l`` quantile of ID scores (``method="higher"``, so at most ``alpha_l`` lie above).

    A zero budget gives ``+inf``: that layer never stops an input.
    """
    q = np.clip(1.0 - np.asarray(budgets, dtype=np.float64), 0.0, 1.0)
    out = np.array([np.quantile(scores[:, j], q[j], method="higher") for j in range(scores.shape[1])])
    return np.where(q >= 1.0, np.inf, out)


def false_alarm_rate(scores, thresholds) -> float:
    """Fraction of rows flagged by at least one layer (``score > threshold``)."""
    return float(np.mean(np.any(scores > thresholds[None, :], axis=1)))


def exit_layers(scores, thresholds) -> np.ndarray:
    """Index of the first layer whose score is above its threshold, -1 when none is: shape (n_samples,)."""
    flagged = scores > thresholds[None, :]
    return np.where(flagged.any(axis=1), flagged.argmax(axis=1), -1)


def cascade_score(scores, calibration: Calibration) -> np.ndarray:
    """The cascade as one continuous score: ``max_l (s_l - t_l) / sigma_l``, shape (n_samples,).

    Positive exactly when the cascade flags the input, so AUROC and FPR@95
    rank inputs by how far past its nearest threshold each one is.
    """
    return np.max((scores - calibration.thresholds[None, :]) / calibration.scales[None, :], axis=1)


def _check_scores(val_scores):
    scores = np.asarray(val_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] < 2 or scores.shape[1] < 1 or not np.isfinite(scores).all():
        raise DataError(f"calibrate expects finite ID-val scores of shape (n_samples >= 2, n_layers >= 1); got shape "
                        f"{scores.shape}{'' if np.isfinite(scores).all() else ' with NaN or inf'}.")
    return scores


def _check_weights(weights, n_layers):
    if weights is None:
        return np.full(n_layers, 1.0 / n_layers)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_layers,) or (w < 0).any() or not w.sum() > 0 or not np.isfinite(w).all():
        raise invalid_param("weights", "calibrate", f"{n_layers} non-negative numbers, not all zero", weights)
    return w / w.sum()
