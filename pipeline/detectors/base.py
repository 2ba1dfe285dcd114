"""The detector contract, shared by every detector in :mod:`pipeline.detectors`.

Detectors work on pooled features, never on a network: they take float arrays
``X`` of shape ``(n_samples, n_features)`` read from the feature store.

The contract follows scikit-learn's estimator API:

``__init__(self, *, ...)``
    Only stores its keyword arguments; no validation, no work.
``fit(X, y=None) -> self``
    Validates ``X`` (and ``y`` when the detector has ``requires_labels``) and
    learns state, stored in attributes whose names end in ``_`` (always
    including ``n_features_in_``). Returns ``self``.
``score(X) -> ndarray of shape (n_samples,)``
    OOD scores where **higher means more out-of-distribution**. Raises
    :class:`sklearn.exceptions.NotFittedError` before ``fit`` and
    :class:`pipeline.errors.DataError` when ``X`` has a different number of
    features than at fit time. ``score`` never changes the fitted state.

Inputs are checked with :func:`sklearn.utils.validation.check_array` (2-D,
finite, converted to float64); its complaints are re-raised as
:class:`~pipeline.errors.DataError` so that the CLI reports them in one line.
Because every detector is a :class:`sklearn.base.BaseEstimator`,
``get_params``, ``set_params`` and :func:`sklearn.base.clone` work.
"""

import abc

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_array, check_is_fitted

from ..errors import DataError, invalid_param


class BaseDetector(BaseEstimator, abc.ABC):
    """Abstract base class of all detectors: ``fit(X, y=None)``, ``score(X)``.

    Attributes
    ----------
    requires_labels : bool
        Class attribute: whether ``fit`` needs the class labels ``y``.
    n_features_in_ : int
        Number of features seen during ``fit`` (set by subclasses).
    """

    requires_labels: bool = False

    #: scikit-learn style constraints on the params, checked by :meth:`check_params` before any data is read.
    _parameter_constraints: dict = {}

    def check_params(self, prefix="", owner=None):
        """Raise ``ConfigError`` on a bad hyperparameter (named after ``prefix``) before any work; returns self.

        Checks what needs no data (``_parameter_constraints``); bounds that
        depend on the data (``k`` up to the number of training rows) are
        checked by ``fit``.
        """
        from ..errors import check_constraints

        return check_constraints(self, prefix, owner or (prefix.split(".")[0] if prefix else type(self).__name__))

    @abc.abstractmethod
    def fit(self, X, y=None):
        """Learn the detector's state from in-distribution features.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            In-distribution training features.
        y : array-like of shape (n_samples,), optional
            Class labels; used only when ``requires_labels`` is true.

        Returns
        -------
        self : BaseDetector
            The fitted detector.
        """

    @abc.abstractmethod
    def score(self, X):
        """Score samples; higher means more out-of-distribution.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features to score.

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            OOD scores.
        """

    def _validate_fit_input(self, X):
        """Check ``X`` at fit time: 2-D, finite, float64.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), float64
        """
        return _check_X(X)

    def _validate_score_input(self, X):
        """Check that ``self`` is fitted and that ``X`` matches the fit data.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), float64

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If ``fit`` has not been called.
        pipeline.errors.DataError
            If ``X`` is not a finite 2-D array or has the wrong feature count.
        """
        check_is_fitted(self)
        X = _check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise DataError(
                f"X has {X.shape[1]} features, but {type(self).__name__} was "
                f"fitted with {self.n_features_in_} features."
            )
        return X


def _check_X(X):
    """Run ``check_array`` (2-D, finite, float64), raising ``DataError``."""
    try:
        return check_array(X, dtype=np.float64, input_name="X")
    except ValueError as exc:
        hint = (" Hint: the model produced NaN or infinite activations here (a diverged training run, or float16 "
                "overflow with extract.dtype: float16); `layerscope inspect --stats --layer NAME` shows them."
                if "NaN" in str(exc) or "infinity" in str(exc) else "")
        raise DataError(f"{exc}{hint}") from None


def check_param_names(params, accepted, owner):
    """Raise ``ConfigError`` if ``params`` has keys outside ``accepted``.

    Parameters
    ----------
    params : dict or None
        Keyword arguments meant for ``owner``.
    accepted : iterable of str
        The parameter names ``owner`` accepts.
    owner : str
        Who the parameters are for, e.g. ``"PyOD model 'knn' (KNN)"``.

    Raises
    ------
    pipeline.errors.ConfigError
        Naming the unknown keys and listing the accepted ones.
    """
    accepted = sorted(accepted)
    unknown = sorted(set(params or {}) - set(accepted))
    if unknown:
        raise invalid_param(
            "params", owner, f"a dict with keys among {accepted}", params,
            hint=f"unknown key(s) {unknown}.",
        )
