"""A meta-detector that standardises features before the wrapped detector."""

from sklearn.base import clone
from sklearn.preprocessing import StandardScaler

from .base import BaseDetector


class Standardized(BaseDetector):
    """Standardise each feature, then score with a wrapped detector.

    ``score(x) = detector.score((x - m) / s)``, where ``m`` and ``s`` are the
    per-feature mean and standard deviation of the training features
    (:class:`sklearn.preprocessing.StandardScaler`). Pooled activations have
    very different scales across channels; distance- and density-based
    detectors (kNN, LOF, OCSVM) otherwise let a few channels dominate.

    Parameters
    ----------
    detector : BaseDetector
        The detector to wrap. It is cloned at fit time and left untouched.

    Attributes
    ----------
    scaler_ : sklearn.preprocessing.StandardScaler
        The scaler fitted on the training features.
    detector_ : BaseDetector
        A fitted clone of ``detector``.
    n_features_in_ : int
        Number of features seen during ``fit``.
    """

    def __init__(self, *, detector):
        self.detector = detector

    @property
    def requires_labels(self):
        """bool: whether the wrapped detector needs labels at fit time."""
        return self.detector.requires_labels

    def check_params(self, prefix="", owner=None):
        """The wrapped detector's :meth:`~pipeline.detectors.base.BaseDetector.check_params`; returns self."""
        self.detector.check_params(prefix, owner)
        return self

    def fit(self, X, y=None):
        """Fit the scaler, then a clone of ``detector`` on the scaled ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            In-distribution training features.
        y : array-like of shape (n_samples,), optional
            Class labels, passed on only if the detector ``requires_labels``.

        Returns
        -------
        self : Standardized
        """
        X = self._validate_fit_input(X)
        self.scaler_ = StandardScaler().fit(X)
        labels = y if self.requires_labels else None
        self.detector_ = clone(self.detector).fit(self.scaler_.transform(X), labels)
        self.n_features_in_ = X.shape[1]
        return self

    @property
    def supports_dask(self):
        """bool: the wrapped detector can be fitted out of core (``fit_dask``)."""
        return hasattr(self.detector, "fit_dask")

    def fit_dask(self, X, y=None):
        """Out of core: the scaler from blockwise sums, then the wrapped detector's ``fit_dask``.

        Parameters
        ----------
        X : dask.array.Array or pipeline.store.ShardedArray of shape (n_samples, n_features)
            Chunked along samples only.
        y : array-like of shape (n_samples,), optional

        Returns
        -------
        self : Standardized
        """
        import numpy as np

        from .mahalanobis import blockwise_sum

        n = X.shape[0]
        dummy = np.zeros(n, dtype=np.int64)
        total, total_sq = blockwise_sum(_moments, X, dummy)
        mean = total / n
        var = np.maximum(total_sq / n - mean * mean, 0.0)
        self.scaler_ = _fitted_scaler(mean, var, n)
        labels = y if self.requires_labels else None
        self.detector_ = clone(self.detector).fit_dask(X, labels, transform=self.scaler_.transform)
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Scale ``X`` with ``scaler_`` and score it with ``detector_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = self._validate_score_input(X)
        return self.detector_.score(self.scaler_.transform(X))


def _moments(X, _labels):
    return X.sum(axis=0), (X * X).sum(axis=0)


def _fitted_scaler(mean, var, n):
    """A StandardScaler with the given statistics (as ``StandardScaler().fit`` would set them)."""
    import numpy as np

    scaler = StandardScaler()
    scaler.mean_, scaler.var_ = mean, var
    scaler.scale_ = np.where(var > 10 * np.finfo(np.float64).eps, np.sqrt(var), 1.0)
    scaler.n_samples_seen_, scaler.n_features_in_ = n, len(mean)
    return scaler
