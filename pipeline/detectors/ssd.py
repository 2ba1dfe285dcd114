"""SSD: Mahalanobis distance to the closest k-means cluster of ID-train features, each with its own covariance.

Sehwag, Chiang & Mittal (2021), "SSD: A Unified Framework for Self-Supervised
Outlier Detection", ICLR.
"""

from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import Interval

from ..errors import invalid_param
from .base import BaseDetector
from .knn_l2 import l2_normalise

_EPS = 1e-10  # the reference's guard: x / (||x|| + 1e-10) and (x - m) / (s + 1e-10)


def cluster_mahalanobis_scores(X, means, precisions):
    """Squared Mahalanobis distance to the closest cluster, each cluster with its own precision.

    ``score(x) = min_k (x - mu_k)^T P_k (x - mu_k)``, one cluster at a time
    (memory O(n_samples * n_features), never (n_samples, n_samples)); tiny
    negative values from round-off are clipped to 0.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    means : ndarray of shape (n_clusters, n_features)
    precisions : ndarray of shape (n_clusters, n_features, n_features)

    Returns
    -------
    scores : ndarray of shape (n_samples,)
    """
    best = np.full(len(X), np.inf)
    for mean, precision in zip(means, precisions, strict=True):
        diff = X - mean
        best = np.minimum(best, np.einsum("ij,ij->i", diff @ ((precision + precision.T) / 2), diff))
    return np.maximum(best, 0.0)


class SSD(BaseDetector):
    """SSD's cluster-conditioned Mahalanobis distance, without labels (Sehwag et al., ICLR 2021).

    ``z = (u - m) / (s + 1e-10)`` with ``u = x / (||x||_2 + 1e-10)`` and
    ``m``, ``s`` the per-feature mean and (biased) standard deviation of the
    ID-train ``u``. ID-train ``z`` are split into ``n_clusters`` clusters
    by k-means (seeded); cluster ``k`` gets its own mean ``mu_k`` and biased
    covariance ``Sigma_k``, and

    ``score(x) = min_k (z - mu_k)^T pinv(Sigma_k + reg * I) (z - mu_k)``

    (Sehwag, Chiang & Mittal, "SSD: A Unified Framework for Self-Supervised
    Outlier Detection", ICLR 2021; reference code ``inspire-group/SSD``,
    ``eval_ssd.py``: ``get_eval_results`` for the normalisation,
    ``get_scores_multi_cluster`` / ``get_scores_one_cluster`` for the score;
    ``reg=0`` is its ``np.linalg.pinv``). It normalises its own input, so
    the registry does not standardise it first.

    Where this differs from the reference: k-means is scikit-learn's (k-means++
    initialisation, seeded by ``random_state``, at most 100 iterations),
    not faiss' (random initialisation, 100 iterations, unseeded); a feature
    constant on ID-train is centred but not divided by 1e-10 (its ``s`` is
    taken as 1), so that a ridge ``reg > 0`` does not turn a test sample that
    moves it into an astronomically large score (the reference's
    pseudo-inverse ignores such a feature; the ridge counts it). The authors'
    code uses the class labels as clusters for a cross-entropy classifier
    (``--training-mode SupCE``); that variant is class-conditional
    Mahalanobis with per-class covariances, not offered here.

    Memory: ``fit`` holds the layer's ID-train features (k-means needs all rows)
    and keeps one (n_features, n_features) precision per cluster.

    Parameters
    ----------
    n_clusters : int, default=1
        Number of k-means clusters, 1 <= n_clusters <= n_train; 1 (one
        Gaussian for all of ID-train) is the reference's default.
    reg : float, default=1e-6
        Non-negative ridge added to every cluster covariance's diagonal before
        the pseudo-inverse. A cluster with fewer samples than features has a
        singular covariance; with ``reg=0`` its pseudo-inverse ignores every
        direction the cluster does not span.
    random_state : int, RandomState instance or None, default=0
        Seed of k-means.

    Attributes
    ----------
    mean_, scale_ : ndarray of shape (n_features,)
        ``m`` and ``s + 1e-10`` of the normalisation (``scale_`` is 1 for a
        feature constant on ID-train).
    means_ : ndarray of shape (n_found, n_features)
        Cluster means of ``z``; ``n_found <= n_clusters`` (fewer when
        duplicate rows leave k-means clusters empty).
    precisions_ : ndarray of shape (n_found, n_features, n_features)
        ``pinv(Sigma_k + reg * I)``.
    cluster_sizes_ : ndarray of shape (n_found,)
        ID-train samples per cluster.
    n_features_in_ : int
    """

    reads_raw_features = True  # normalises its own input (L2, then z-scores)

    _parameter_constraints = {
        "n_clusters": [Interval(Integral, 1, None, closed="left")],
        "reg": [Interval(Real, 0, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, *, n_clusters=1, reg=1e-6, random_state=0):
        self.n_clusters = n_clusters
        self.reg = reg
        self.random_state = random_state

    def fit(self, X, y=None):
        """Normalise ``X``, cluster it, and fit one Gaussian per cluster.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored
            SSD uses no labels.

        Returns
        -------
        self : SSD
        """
        self.check_params()
        X = self._validate_fit_input(X)
        if self.n_clusters > len(X):
            raise invalid_param("n_clusters", "SSD", f"an integer in [1, n_train] with n_train={len(X)}",
                                self.n_clusters, hint="lower n_clusters or fit on more samples.")
        U = l2_normalise(X)
        self.mean_ = U.mean(axis=0)
        std = U.std(axis=0)
        self.scale_ = np.where(std > _EPS, std + _EPS, 1.0)
        Z = (U - self.mean_) / self.scale_
        labels = self._clusters(Z)
        found = np.unique(labels)  # as the reference: the clusters k-means filled (duplicate rows can leave one empty)
        self.cluster_sizes_ = np.bincount(labels)[found]
        self.means_ = np.stack([Z[labels == k].mean(axis=0) for k in found])
        self.precisions_ = np.stack([self._precision(Z[labels == k] - mean)
                                     for k, mean in zip(found, self.means_, strict=True)])
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Squared Mahalanobis distance to the closest cluster.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = self._validate_score_input(X)
        Z = (l2_normalise(X) - self.mean_) / self.scale_
        return cluster_mahalanobis_scores(Z, self.means_, self.precisions_)

    def _clusters(self, Z):
        """k-means labels of the rows of ``Z`` (all 0 for one cluster, as the reference: no k-means)."""
        if self.n_clusters == 1:
            return np.zeros(len(Z), dtype=np.int64)
        from sklearn.cluster import KMeans  # imported when fitted, not at start-up

        kmeans = KMeans(n_clusters=self.n_clusters, n_init=1, max_iter=100, random_state=self.random_state)
        return kmeans.fit(Z).labels_

    def _precision(self, centred):
        covariance = centred.T @ centred / len(centred)
        return np.linalg.pinv(covariance + self.reg * np.eye(centred.shape[1]), hermitian=True)
