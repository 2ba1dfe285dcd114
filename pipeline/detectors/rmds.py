"""Relative Mahalanobis distance: class-conditional Gaussians minus one background Gaussian.

Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan (2021), "A Simple Fix to
Mahalanobis Distance for Improving Near-OOD Detection", arXiv:2106.09022.
"""

from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from .base import BaseDetector
from .mahalanobis import (
    NORMALIZE,
    _class_means,
    _class_stats,
    block_transform,
    blockwise_sum,
    check_labels,
    mahalanobis_scores,
    normalise_rows,
)


def relative_mahalanobis_scores(X, means, precision, background_mean, background_precision):
    """``min_k MD_k(x) - MD_0(x)``: distance to the closest class mean, relative to the background Gaussian.

    ``MD_k(x) = (x - mu_k)^T P (x - mu_k)`` with the shared class precision
    ``P``; ``MD_0(x) = (x - mu_0)^T P_0 (x - mu_0)`` with the mean and
    precision of all ID-train features. ``MD_0`` does not depend on ``k``, so
    ``min_k (MD_k - MD_0) = min_k MD_k - MD_0``. Memory: O(n_samples * n_classes).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    means : ndarray of shape (n_classes, n_features)
    precision : ndarray of shape (n_features, n_features)
    background_mean : ndarray of shape (n_features,)
    background_precision : ndarray of shape (n_features, n_features)

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        Higher means more out-of-distribution; may be negative.
    """
    background = mahalanobis_scores(X, np.atleast_2d(background_mean), background_precision)
    return mahalanobis_scores(X, means, precision) - background


class RelativeMahalanobis(BaseDetector):
    """Relative Mahalanobis distance, RMDS (Ren et al., 2021), optionally on L2-normalised features (rMaha++).

    ``score(x) = min_k (MD_k(z) - MD_0(z))``, where ``MD_k`` is the squared
    Mahalanobis distance to class mean ``mu_k`` under the covariance shared by
    the classes (as :class:`~pipeline.detectors.ClassConditionalMahalanobis`)
    and ``MD_0`` the one to the single Gaussian fitted to all ID-train
    features, ``N(mu_0, Sigma_0)`` (Ren et al., "A Simple Fix to Mahalanobis
    Distance for Improving Near-OOD Detection", 2021). Both covariances are
    the biased (divide by ``n_samples``) estimates and ``P = pinv(Sigma +
    reg * I)``. Reference code: OpenOOD v1.5,
    ``openood/postprocessors/rmds_postprocessor.py`` (``configs/postprocessors/rmds.yml``
    has no parameter), whose confidence ``max_k (MD_0 - MD_k)`` is our score
    negated; ``reg=0`` is its ``EmpiricalCovariance`` pseudo-inverse.

    ``z = x`` by default. With ``normalize="l2"``, ``z = x / ||x||_2``
    first: rMaha++ of Mueller & Hein ("Mahalanobis++: Improving OOD Detection
    via Feature Normalization", ICML 2025; ``mueller-mp/maha-norm``,
    ``OpenOOD/openood/postprocessors/rmdsn_postprocessor.py``), on the layer's
    features as stored (``reads_raw_features``: the registry does not
    standardise them). Without it, standardising first changes nothing but
    round-off: both distances are invariant to per-feature scaling.

    Parameters
    ----------
    reg : float, default=1e-6
        Non-negative ridge added to both covariances' diagonals before the
        pseudo-inverse.
    normalize : {"none", "l2"} or None, default="none"
        ``"l2"``: divide every row by its Euclidean norm (plus 1e-10) first.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    means_ : ndarray of shape (n_classes, n_features)
        Class means of ``z``, in the order of ``classes_``.
    precision_ : ndarray of shape (n_features, n_features)
        Of the shared class covariance.
    background_mean_ : ndarray of shape (n_features,)
    background_precision_ : ndarray of shape (n_features, n_features)
        Of the covariance of all ID-train ``z``.
    n_features_in_ : int
    """

    requires_labels = True
    supports_dask = True  # fit_dask: the same block sums as ClassConditionalMahalanobis

    _parameter_constraints = {"reg": [Interval(Real, 0, None, closed="left")],
                              "normalize": [StrOptions(set(NORMALIZE)), None]}

    def __init__(self, *, reg=1e-6, normalize="none"):
        self.reg = reg
        self.normalize = normalize

    @property
    def reads_raw_features(self):
        """bool: with ``normalize="l2"``, fit and score the layer's features as stored (not z-scored)."""
        return self.normalize == "l2"

    def fit(self, X, y=None):
        """Estimate the class means, the shared covariance and the background Gaussian.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            In-distribution training features.
        y : array-like of shape (n_samples,)
            Class labels; required.

        Returns
        -------
        self : RelativeMahalanobis
        """
        self.check_params()
        X = normalise_rows(self._validate_fit_input(X), self.normalize, type(self).__name__)
        y = self._check_labels(X, y)
        self.classes_, inverse = np.unique(y, return_inverse=True)
        self.means_ = _class_means(X, inverse, len(self.classes_))
        centred = X - self.means_[inverse]
        self.precision_ = self._pinv(centred.T @ centred / len(X))
        self.background_mean_ = X.mean(axis=0)
        centred = X - self.background_mean_
        self.background_precision_ = self._pinv(centred.T @ centred / len(X))
        self.n_features_in_ = X.shape[1]
        return self

    def fit_dask(self, X, y=None, transform=None):
        """Fit out of core, block by block: class counts, class sums and ``X'X`` (:func:`.blockwise_sum`).

        The background mean is ``sum x / n`` and its covariance ``sum x x' / n -
        mu_0 mu_0'``; the class covariance is ``(sum x x' - sum_k n_k mu_k
        mu_k') / n``. Memory: one block plus O(n_features**2).

        Parameters
        ----------
        X : dask.array.Array or pipeline.store.ShardedArray of shape (n_samples, n_features)
            Chunked along samples only.
        y : array-like of shape (n_samples,)
            Class labels; required.
        transform : callable, optional
            Applied to each block first, before the ``normalize`` step.

        Returns
        -------
        self : RelativeMahalanobis
        """
        self.check_params()
        prepare = block_transform(transform, self.normalize, type(self).__name__)
        y = self._check_labels(X, y)
        self.classes_, inverse = np.unique(y, return_inverse=True)
        counts, sums, scatter = blockwise_sum(_class_stats, X, inverse, len(self.classes_), transform=prepare)
        n = X.shape[0]
        self.means_ = sums / counts[:, None]
        self.precision_ = self._pinv((scatter - (self.means_.T * counts) @ self.means_) / n)
        self.background_mean_ = sums.sum(axis=0) / n
        self.background_precision_ = self._pinv(scatter / n - np.outer(self.background_mean_, self.background_mean_))
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Relative Mahalanobis distance to the closest class.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = normalise_rows(self._validate_score_input(X), self.normalize, type(self).__name__)
        return relative_mahalanobis_scores(X, self.means_, self.precision_, self.background_mean_,
                                           self.background_precision_)

    def _pinv(self, covariance):
        return np.linalg.pinv(covariance + self.reg * np.eye(len(covariance)), hermitian=True)

    def _check_labels(self, X, y):
        return check_labels(X, y, type(self).__name__)
