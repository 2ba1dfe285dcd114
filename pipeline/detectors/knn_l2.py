"""Deep nearest neighbours on L2-normalised features.

Sun, Ming, Zhu & Li (2022), "Out-of-Distribution Detection with Deep Nearest
Neighbors", ICML.
"""

import numbers
from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import Interval

from ..errors import invalid_param
from .base import BaseDetector

_EPS = 1e-10  # as the paper's code: x / (||x|| + 1e-10), so a zero row stays zero


def l2_normalise(X):
    """Rows divided by their Euclidean norm (plus 1e-10, so zero rows stay zero).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)

    Returns
    -------
    Z : ndarray of shape (n_samples, n_features)
    """
    X = np.asarray(X, dtype=np.float64)
    return X / (np.linalg.norm(X, axis=1, keepdims=True) + _EPS)


def kth_neighbour_distance(Z, Z_train, k):
    """Euclidean distance of each row of ``Z`` to its k-th nearest row of ``Z_train``.

    Parameters
    ----------
    Z : ndarray of shape (n_samples, n_features)
    Z_train : ndarray of shape (n_train, n_features)
    k : int
        1 <= k <= n_train.

    Returns
    -------
    distances : ndarray of shape (n_samples,)
    """
    from sklearn.neighbors import NearestNeighbors  # imported when fitted, not at start-up

    return NearestNeighbors(n_neighbors=k).fit(Z_train).kneighbors(Z)[0][:, -1]


class KNNL2(BaseDetector):
    """Distance to the k-th nearest ID-train sample, on L2-normalised features (Sun et al., ICML 2022).

    ``score(x) = || z - z_(k) ||_2`` with ``z = x / ||x||_2`` and ``z_(k)`` the
    k-th nearest normalised training sample ("Out-of-Distribution Detection
    with Deep Nearest Neighbors", ICML 2022). The paper's score is the
    negation (higher = more ID). It normalises its own input, so the registry
    does not standardise it first.

    Memory: ``fit`` keeps every normalised ID-train row (that is the index), so
    the layer's ID-train features are held in memory; scoring is block by block.

    Parameters
    ----------
    k : int, default=50
        Neighbour rank, 1 <= k <= n_train (the paper's CIFAR-10 value is 50).

    Attributes
    ----------
    index_ : sklearn.neighbors.NearestNeighbors
        Fitted on the normalised training features.
    n_features_in_ : int
    """

    _parameter_constraints = {"k": [Interval(Integral, 1, None, closed="left")]}

    def __init__(self, *, k=50):
        self.k = k

    def fit(self, X, y=None):
        """Normalise ``X`` and index it.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : KNNL2
        """
        X = self._validate_fit_input(X)
        k = self.k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= len(X):
            raise invalid_param("k", "KNNL2", f"an integer in [1, n_train] with n_train={len(X)}", k,
                                hint="lower k or fit on more samples.")
        from sklearn.neighbors import NearestNeighbors

        self.index_ = NearestNeighbors(n_neighbors=int(k)).fit(l2_normalise(X))
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Distance to the k-th nearest normalised training sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = self._validate_score_input(X)
        return self.index_.kneighbors(l2_normalise(X))[0][:, -1]
