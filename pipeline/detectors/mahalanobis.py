"""Class-conditional Mahalanobis distance with a tied covariance.

Lee, Lee, Lee & Shin (2018), "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks", NeurIPS.
"""

import numbers

import numpy as np
from sklearn.utils.validation import column_or_1d

from ..errors import DataError, invalid_param
from .base import BaseDetector


def mahalanobis_scores(X, means, precision):
    """Squared Mahalanobis distance to the closest class mean.

    ``score(x) = min_c (x - mu_c)^T P (x - mu_c)``, computed with the
    expansion ``x'Px - 2 x'P mu_c + mu_c'P mu_c`` (``P`` symmetrised), so
    memory stays at O(n_samples * n_classes). Tiny negative values from
    round-off are clipped to 0.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Samples to score.
    means : ndarray of shape (n_classes, n_features)
        Class means ``mu_c``.
    precision : ndarray of shape (n_features, n_features)
        Precision matrix ``P`` (inverse of the shared covariance).

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        Higher means more out-of-distribution.
    """
    X, means, precision = _check_shapes(X, means, precision)
    P = (precision + precision.T) / 2
    XP = X @ P
    sq = np.einsum("ij,ij->i", XP, X)[:, None] - 2 * XP @ means.T
    sq += np.einsum("kj,kj->k", means @ P, means)[None, :]
    return np.maximum(sq.min(axis=1), 0.0)


def _check_shapes(X, means, precision):
    """Return float64 arrays, or raise ``DataError`` on inconsistent shapes."""
    X, means, precision = (np.asarray(a, dtype=np.float64) for a in (X, means, precision))
    d = X.shape[1] if X.ndim == 2 else -1
    if d < 0 or means.ndim != 2 or means.shape[1] != d or precision.shape != (d, d):
        raise DataError(
            f"mahalanobis_scores expects X (n, d), means (k, d) and precision "
            f"(d, d); got X {X.shape}, means {means.shape}, precision {precision.shape}."
        )
    return X, means, precision


class ClassConditionalMahalanobis(BaseDetector):
    """Mahalanobis distance to the closest class mean (Lee et al., 2018).

    Each class ``c`` is modelled as a Gaussian ``N(mu_c, Sigma)`` with a
    covariance shared by all classes; the score is

    ``score(x) = min_c (x - mu_c)^T P (x - mu_c)``, ``P = pinv(Sigma + reg * I)``,

    the squared distance to the closest class mean (Lee, Lee, Lee & Shin,
    "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018). ``Sigma`` is the biased (divide by
    ``n_samples``) covariance of the class-centred features, as in
    :class:`sklearn.covariance.EmpiricalCovariance`.

    Parameters
    ----------
    reg : float, default=1e-6
        Non-negative ridge added to the covariance's diagonal before the
        pseudo-inverse.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels seen during ``fit``.
    means_ : ndarray of shape (n_classes, n_features)
        Per-class means, in the order of ``classes_``.
    covariance_ : ndarray of shape (n_features, n_features)
        Shared (tied) covariance.
    precision_ : ndarray of shape (n_features, n_features)
        ``pinv(covariance_ + reg * I)``.
    n_features_in_ : int
        Number of features seen during ``fit``.
    """

    requires_labels = True

    def __init__(self, *, reg=1e-6):
        self.reg = reg

    def fit(self, X, y=None):
        """Estimate class means and the tied covariance.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            In-distribution training features.
        y : array-like of shape (n_samples,)
            Class labels; required.

        Returns
        -------
        self : ClassConditionalMahalanobis
        """
        self._check_reg()
        X = self._validate_fit_input(X)
        y = self._check_labels(X, y)
        self.classes_, inverse = np.unique(y, return_inverse=True)
        self.means_ = _class_means(X, inverse, len(self.classes_))
        centred = X - self.means_[inverse]
        self.covariance_ = centred.T @ centred / X.shape[0]
        ridge = self.reg * np.eye(X.shape[1])
        self.precision_ = np.linalg.pinv(self.covariance_ + ridge, hermitian=True)
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Squared Mahalanobis distance to the closest class mean.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = self._validate_score_input(X)
        return mahalanobis_scores(X, self.means_, self.precision_)

    def _check_reg(self):
        """Raise ``ConfigError`` unless ``reg`` is a non-negative real number."""
        reg = self.reg
        if isinstance(reg, bool) or not isinstance(reg, numbers.Real) or not reg >= 0:
            raise invalid_param(
                "reg", "ClassConditionalMahalanobis", "a non-negative float", reg
            )

    def _check_labels(self, X, y):
        """Return ``y`` as a 1-D array matching ``X``, or raise."""
        if y is None:
            raise invalid_param(
                "y", "ClassConditionalMahalanobis.fit",
                "an array of class labels of shape (n_samples,)", y,
                hint="this detector is class-conditional; pass the ID labels.",
            )
        try:
            y = column_or_1d(y)
        except ValueError as exc:
            raise DataError(f"y must be 1-D class labels: {exc}") from exc
        if y.shape[0] != X.shape[0]:
            raise DataError(f"X has {X.shape[0]} samples but y has {y.shape[0]} labels.")
        return y


def _class_means(X, inverse, n_classes):
    """Per-class means of ``X``, shape (n_classes, n_features)."""
    return np.stack([X[inverse == c].mean(axis=0) for c in range(n_classes)])
