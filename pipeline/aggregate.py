"""Cross-layer aggregation of per-layer OOD scores.

Layer scores live on different scales, so each layer's score is first
standardised with the mean and standard deviation of its **ID-val** scores
(never test data, never OOD data). Then:

- ``max_z``: the maximum over layers of the standardised scores. This is
  LA-OOD's layer-adaptive combination (seed 001), which takes the max over
  layers of per-layer detector scores.
- ``mean_z``: the mean over layers of the standardised scores (an
  Ag-EBO-style average, seed 000's paper). Applied to the per-layer energies
  this is Ag-EBO; applied to per-layer Mahalanobis scores, a multi-layer
  Mahalanobis ensemble.
- ``max``: the maximum of the raw per-layer scores, without standardisation:
  literally what LA-OOD's code does with its per-layer OCSVM scores.

Both keep the convention: higher = more OOD.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import DataError, invalid_param

AGGREGATIONS = ("max_z", "mean_z", "max")


def fit_standardizer(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer mean and std of reference (ID-val) scores.

    Parameters
    ----------
    reference : ndarray of shape (n_samples, n_layers)

    Returns
    -------
    mean, std : ndarray of shape (n_layers,)
        A constant layer gets std 1 so it contributes zeros, not NaNs.
    """
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 2 or reference.shape[0] < 2:
        raise DataError(f"Reference scores must have shape (n_samples >= 2, n_layers). Got {reference.shape}.")
    std = reference.std(axis=0)
    return reference.mean(axis=0), np.where(std > 0, std, 1.0)


def zscores(scores: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standardise (n_samples, n_layers) scores with per-layer statistics."""
    return (np.asarray(scores, dtype=np.float64) - mean) / std


def aggregate(scores: np.ndarray, reference: np.ndarray, how: str) -> np.ndarray:
    """Combine per-layer scores into one score per sample.

    Parameters
    ----------
    scores : ndarray of shape (n_samples, n_layers)
    reference : ndarray of shape (n_ref, n_layers)
        ID-val scores of the same layers, for the standardisation.
    how : {"max_z", "mean_z", "max"}

    Returns
    -------
    ndarray of shape (n_samples,)
    """
    if how not in AGGREGATIONS:
        raise invalid_param("detect.aggregations", "detect", f"one of {set(AGGREGATIONS)}", how)
    if how == "max":
        return np.asarray(scores, dtype=np.float64).max(axis=1)
    z = zscores(scores, *fit_standardizer(reference))
    return z.max(axis=1) if how == "max_z" else z.mean(axis=1)


def argmax_layer_counts(scores: np.ndarray) -> np.ndarray:
    """How many samples take their maximum score at each layer, shape (n_layers,).

    LA-OOD reports this for its max-over-layers combination.
    """
    scores = np.asarray(scores)
    return np.bincount(scores.argmax(axis=1), minlength=scores.shape[1])
