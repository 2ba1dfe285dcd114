"""LA-OOD's per-layer One-Class SVM, with gamma chosen on self-adaptive-shifting pseudo-outliers.

Lin, Wang & Lin (2021), "LA-OOD: Layer Adaptive Deep Neural Networks for
Out-of-Distribution Detection", PAKDD. Pseudo-outliers: Wang, Zhang, Huang &
Yeung (2018), "Hyperparameter selection of one-class support vector machine by
self-adaptive data shifting", Pattern Recognition 74.
"""

import math
import numbers
from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from ..errors import DataError, invalid_param
from .base import BaseDetector

_EPS = 1e-8  # the reference's guard against zero distances and zero normals
_BLOCK = 1 << 22  # elements of a (rows, k, C) block of unit vectors


def default_k(n_samples):
    """The reference's neighbour count ``ceil(5 * log10(n_samples))``."""
    return math.ceil(5 * math.log10(n_samples))


def self_adaptive_shifting(X, k=None, edge_threshold=0.01):
    """Pseudo-outliers: edge points of ``X`` pushed outward along their normal.

    For each point ``x_i`` with k nearest neighbours ``x_j`` (itself excluded):
    ``v_ij = (x_i - x_j) / ||x_i - x_j||`` and the normal ``n_i = sum_j v_ij``.
    ``x_i`` is an edge point when the fraction of neighbours on the inner side,
    ``v_ij . n_i >= 0`` (i.e. ``n_i . (x_j - x_i) <= 0``), exceeds
    ``1 - edge_threshold`` (with the default 0.01 and k < 100: all of them)
    and ``n_i`` is not zero (a point whose neighbours balance out, such as
    the middle of a line, has no outward side; the reference counts it as
    an edge and "shifts" it by 0).
    Pseudo-outlier: ``x_i + l * n_i / ||n_i||``, where ``l`` is the mean
    distance of every point to its k neighbours.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    k : int, optional
        Neighbours per point; default ``ceil(5 * log10(n_samples))``.
    edge_threshold : float, default=0.01
        The reference's ``threshold``.

    Returns
    -------
    pseudo_outliers : ndarray of shape (n_edge, n_features)
        May be empty when ``X`` has no edge point.
    """
    X = np.asarray(X, dtype=np.float64)
    k = default_k(len(X)) if k is None else k
    if not 1 <= k < len(X):
        raise DataError(f"self_adaptive_shifting needs more samples than neighbours: "
                        f"k={k} with n_samples={len(X)}.")
    from sklearn.neighbors import NearestNeighbors  # imported when fitted, not at start-up

    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    dist, idx = dist[:, 1:], idx[:, 1:]
    normals, inner = _normals(X, dist, idx)
    norms = np.linalg.norm(normals, axis=1, keepdims=True)
    edge = (inner > 1 - edge_threshold) & (norms[:, 0] > _EPS)
    return X[edge] + dist.mean() * normals[edge] / (norms[edge] + _EPS)


def _normals(X, dist, idx):
    """Normals ``n_i`` (n, C) and the inner-side fraction of each point's neighbours (n,), in row blocks."""
    normals, inner = np.empty_like(X), np.empty(len(X))
    step = max(1, _BLOCK // (idx.shape[1] * X.shape[1]))
    for a in range(0, len(X), step):
        b = min(a + step, len(X))
        v = (X[a:b, None, :] - X[idx[a:b]]) / (dist[a:b, :, None] + _EPS)
        normals[a:b] = v.sum(axis=1)
        inner[a:b] = (np.einsum("ikc,ic->ik", v, normals[a:b]) >= 0).mean(axis=1)
    return normals, inner


def selection_error(model, pseudo_outliers, holdout):
    """``0.5 * P(pseudo-outlier accepted) + 0.5 * P(hold-out rejected)`` of a fitted OCSVM.

    Parameters
    ----------
    model : sklearn.svm.OneClassSVM
        Fitted; ``predict`` gives +1 for inliers, -1 for outliers.
    pseudo_outliers : ndarray of shape (n_pseudo, n_features)
    holdout : ndarray of shape (n_holdout, n_features)
        ID samples not used to fit ``model``.

    Returns
    -------
    error : float in [0, 1]
    """
    return 0.5 * np.mean(model.predict(pseudo_outliers) == 1) + 0.5 * np.mean(model.predict(holdout) == -1)


class LAOODOCSVM(BaseDetector):
    """One-Class SVM with gamma chosen on pseudo-outliers, as in LA-OOD (Lin et al., PAKDD 2021).

    ``score(x) = -f(x)``, where ``f`` is the decision function of an RBF
    One-Class SVM (``nu``, ``gamma_``) fitted on all ID-train features. ``gamma_``
    minimises ``0.5 * err_pseudo + 0.5 * err_holdout`` over ``gammas`` for a
    model fitted on a seeded ``1 - holdout`` part: ``err_pseudo`` is the share
    of pseudo-outliers (:func:`self_adaptive_shifting`, Wang et al., Pattern
    Recognition 2018) predicted inlier, ``err_holdout`` the share of the ID
    hold-out predicted outlier; ties go to the smaller gamma (Lin, Wang & Lin,
    "LA-OOD: Layer Adaptive Deep Neural Networks for Out-of-Distribution
    Detection", PAKDD 2021). Meant for standardised features (the registry
    wraps it in :class:`~pipeline.detectors.Standardized`).

    Memory: the OCSVM and its gamma selection need all of a layer's ID-train
    rows at once, so ``fit`` holds them in memory; scoring is block by block.

    Parameters
    ----------
    nu : float, default=0.001
        OCSVM's bound on the share of training outliers, in (0, 1].
    gammas : sequence of float, default=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
        Positive RBF widths to choose from.
    holdout : float, default=0.3
        Share of ``X`` held out for the selection, in (0, 1).
    pseudo_from : {"train", "holdout"}, default="train"
        Which part pseudo-outliers are shifted from; the reference code uses "holdout".
    seed : int or None, default=0
        Seed of the train / hold-out split.

    Attributes
    ----------
    gamma_ : float
    selection_errors_ : dict of float -> float
        Selection error of each gamma, in [0, 1].
    pseudo_outliers_ : ndarray of shape (n_pseudo, n_features)
    model_ : sklearn.svm.OneClassSVM
        Fitted on all of ``X`` with ``gamma_``.
    n_features_in_ : int
    """

    _parameter_constraints = {
        "nu": [Interval(Real, 0, 1, closed="right")],
        "holdout": [Interval(Real, 0, 1, closed="neither")],
        "pseudo_from": [StrOptions({"train", "holdout"})],
        "gammas": ["array-like"],
        "seed": ["random_state"],
    }

    def __init__(self, *, nu=0.001, gammas=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
                 holdout=0.3, pseudo_from="train", seed=0):
        self.nu = nu
        self.gammas = gammas
        self.holdout = holdout
        self.pseudo_from = pseudo_from
        self.seed = seed

    def fit(self, X, y=None):
        """Choose ``gamma_`` on a split of ``X``, then fit ``model_`` on all of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            In-distribution training features (standardised).
        y : ignored

        Returns
        -------
        self : LAOODOCSVM
        """
        gammas = self._check_params()
        X = self._validate_fit_input(X)
        train, held = self._split(X)
        self.pseudo_outliers_ = self_adaptive_shifting(held if self.pseudo_from == "holdout" else train)
        if len(self.pseudo_outliers_) == 0:
            raise DataError("LAOODOCSVM found no edge point to shift into a pseudo-outlier; "
                            "the features look degenerate (e.g. all rows equal).")
        self.selection_errors_ = {g: selection_error(self._ocsvm(g).fit(train), self.pseudo_outliers_, held)
                                  for g in gammas}
        best = min(self.selection_errors_.values())
        self.gamma_ = min(g for g, err in self.selection_errors_.items() if err == best)
        self.model_ = self._ocsvm(self.gamma_).fit(X)
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Negated OCSVM decision function.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = self._validate_score_input(X)
        return -self.model_.decision_function(X)

    def _ocsvm(self, gamma):
        from sklearn.svm import OneClassSVM

        return OneClassSVM(kernel="rbf", nu=self.nu, gamma=gamma)

    def _split(self, X):
        """Seeded (train, hold-out) rows; the hold-out has ``ceil(holdout * n)`` rows."""
        n_held = math.ceil(self.holdout * len(X))
        if not 1 <= n_held < len(X):
            raise DataError(f"LAOODOCSVM cannot hold out {self.holdout} of {len(X)} samples.")
        order = np.random.default_rng(self.seed).permutation(len(X))
        return X[order[n_held:]], X[order[:n_held]]

    def _check_params(self):
        """Validate the parameters; return ``gammas`` as a tuple of floats."""
        if not _real_in(self.nu, 0, 1, closed_right=True):
            raise invalid_param("nu", "LAOODOCSVM", "a float in (0, 1]", self.nu)
        if not _real_in(self.holdout, 0, 1):
            raise invalid_param("holdout", "LAOODOCSVM", "a float in (0, 1)", self.holdout)
        if self.pseudo_from not in ("train", "holdout"):
            raise invalid_param("pseudo_from", "LAOODOCSVM", "one of ['holdout', 'train']", self.pseudo_from)
        gammas = self.gammas
        if isinstance(gammas, (str, bytes)) or not np.iterable(gammas) or len(gammas) == 0 \
                or not all(_real_in(g, 0, math.inf) for g in gammas):
            raise invalid_param("gammas", "LAOODOCSVM", "a non-empty sequence of positive floats", gammas)
        return tuple(float(g) for g in gammas)


def _real_in(x, low, high, closed_right=False):
    """Whether ``x`` is a real number (not bool) with ``low < x < high`` (or ``<= high``)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    return low < x <= high if closed_right else low < x < high
