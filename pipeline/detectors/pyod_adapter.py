"""PyOD models behind the layerscope detector face (``fit`` / ``score``)."""

import copy
import importlib
import inspect

import numpy as np

from ..errors import ConfigError, invalid_param
from .base import BaseDetector, check_param_names

#: Short name -> (module, class) of the PyOD models we wrap. Imported lazily:
#: importing PyOD pulls in numba and matplotlib.
PYOD_MODELS = {
    "copod": ("pyod.models.copod", "COPOD"),
    "ecod": ("pyod.models.ecod", "ECOD"),
    "hbos": ("pyod.models.hbos", "HBOS"),
    "iforest": ("pyod.models.iforest", "IForest"),
    "knn": ("pyod.models.knn", "KNN"),
    "lof": ("pyod.models.lof", "LOF"),
    "ocsvm": ("pyod.models.ocsvm", "OCSVM"),
    "pca": ("pyod.models.pca", "PCA"),
}


def pyod_class(method):
    """Return the PyOD class for a short name.

    Parameters
    ----------
    method : str
        One of the keys of :data:`PYOD_MODELS`.

    Returns
    -------
    type
        A subclass of ``pyod.models.base.BaseDetector``.

    Raises
    ------
    pipeline.errors.ConfigError
        If ``method`` is not a known short name.
    """
    if method not in PYOD_MODELS:
        raise invalid_param(
            "method", "PyODDetector", f"one of {sorted(PYOD_MODELS)}", method
        )
    module, name = PYOD_MODELS[method]
    return getattr(importlib.import_module(module), name)


def pyod_param_names(method):
    """Return the sorted ``__init__`` parameter names of a PyOD model.

    Parameters
    ----------
    method : str
        One of the keys of :data:`PYOD_MODELS`.

    Returns
    -------
    list of str
    """
    signature = inspect.signature(pyod_class(method).__init__)
    return sorted(p for p in signature.parameters if p != "self")


def check_pyod_params(method, params):
    """Raise ``ConfigError`` if ``params`` has names the PyOD model rejects.

    Parameters
    ----------
    method : str
        One of the keys of :data:`PYOD_MODELS`.
    params : dict or None
        Keyword arguments for the PyOD model's constructor.
    """
    owner = f"PyOD model {method!r} ({PYOD_MODELS[method][1]})"
    check_param_names(params, pyod_param_names(method), owner)


#: The scikit-learn estimator a PyOD model builds from its params: their constraints check ours, before any data.
PYOD_SKLEARN = {
    "knn": ("sklearn.neighbors", "NearestNeighbors"),
    "lof": ("sklearn.neighbors", "LocalOutlierFactor"),
    "ocsvm": ("sklearn.svm", "OneClassSVM"),
    "iforest": ("sklearn.ensemble", "IsolationForest"),
    "pca": ("sklearn.decomposition", "PCA"),
}


def check_pyod_values(method, params, prefix="", owner=None):
    """Check a PyOD model's param *values* without data (``ConfigError`` naming ``prefix`` + the param).

    Runs the model's constructor (its own checks: contamination, ...) and the
    constraints of the scikit-learn estimator it wraps (``n_neighbors >= 1``,
    ``0 < nu <= 1``, ...).
    """
    from ..errors import check_values

    owner = owner or (prefix.split(".")[0] if prefix else f"PyOD model {method!r}")
    try:
        _build(method, params)
    except ConfigError as exc:
        raise ConfigError(f"{prefix.rstrip('.') or method}: {exc}") from None
    if method not in PYOD_SKLEARN:
        return
    module, name = PYOD_SKLEARN[method]
    constraints = getattr(getattr(importlib.import_module(module), name), "_parameter_constraints", {})
    check_values(constraints, {k: v for k, v in (params or {}).items() if k in constraints}, name, prefix, owner)


def _build(method, params):
    """Instantiate a PyOD model; its constructor's ``ValueError`` becomes ``ConfigError``."""
    model_class = pyod_class(method)
    check_pyod_params(method, params)
    try:
        return model_class(**(params or {}))
    except ValueError as exc:  # e.g. HBOS checks alpha and tol in __init__
        raise ConfigError(f"Invalid params for PyOD model {method!r}: {exc}") from exc


class PyODDetector(BaseDetector):
    """Any PyOD outlier detector, chosen by short name.

    The score is PyOD's ``decision_function(X)``, whose convention ("the
    higher, the more abnormal") is ours. The methods, and their papers:

    - ``iforest``: Isolation Forest (Liu, Ting & Zhou, ICDM 2008).
    - ``ecod``: ECOD (Li et al., TKDE 2022).
    - ``copod``: COPOD (Li et al., ICDM 2020).
    - ``knn``: distance to the k-th nearest neighbour (Ramaswamy et al., SIGMOD 2000).
    - ``lof``: Local Outlier Factor (Breunig et al., SIGMOD 2000).
    - ``ocsvm``: One-class SVM (Schoelkopf et al., Neural Computation 2001).
    - ``hbos``: Histogram-based Outlier Score (Goldstein & Dengel, KI 2012).
    - ``pca``: weighted distance to the principal components
      (Shyu et al., 2003).

    Memory: PyOD's models fit on all of a layer's ID-train rows at once, so
    ``fit`` holds them in memory; scoring is block by block.

    Parameters
    ----------
    method : str, default="knn"
        Short name, one of :data:`PYOD_MODELS`.
    params : dict, optional
        Keyword arguments for the PyOD model's constructor. Names are checked
        at fit time against the PyOD class's ``__init__`` signature.

    Attributes
    ----------
    model_ : pyod.models.base.BaseDetector
        The fitted PyOD model.
    n_features_in_ : int
        Number of features seen during ``fit``.

    ecdf_reference_ : dict or None
        For ``ecod`` and ``copod`` only: the sorted training columns and
        their centred moments (see :func:`ecdf_scores`).

    Notes
    -----
    PyOD's ECOD and COPOD re-estimate their empirical CDFs on the training
    data *plus the whole batch being scored*, so in PyOD a sample's score
    depends on the other samples in the batch (by ~20% on the test blobs).
    For these two methods ``score`` instead returns, for every row, exactly
    what PyOD's ``decision_function`` gives for that row scored on its own
    (:func:`ecdf_scores`, vectorised), so scores do not depend on batching.
    Other methods call ``decision_function`` on a shallow copy of ``model_``,
    so that scoring never changes the fitted state.
    """

    def __init__(self, *, method="knn", params=None):
        self.method = method
        self.params = params

    def check_params(self, prefix="", owner=None):
        """Check names and values of ``params`` without data (see :func:`check_pyod_values`); returns self."""
        check_pyod_values(self.method, self.params, prefix, owner)
        return self

    def fit(self, X, y=None):
        """Build and fit the PyOD model on ``X``; ``y`` is ignored.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            In-distribution training features.
        y : None
            Ignored (PyOD warns when given labels).

        Returns
        -------
        self : PyODDetector
        """
        X = self._validate_fit_input(X)
        try:
            self.model_ = _build(self.method, self.params).fit(X)
        except ValueError as exc:  # a param that does not fit this data, e.g. more neighbours than samples
            raise ConfigError(f"PyOD model '{self.method}' with params {self.params or {}} cannot be fitted on "
                              f"{X.shape[0]} samples of {X.shape[1]} features: {exc}. Hint: choose values this data "
                              "allows (e.g. fewer neighbours than ID-train samples).") from None
        is_ecdf = self.method in ECDF_METHODS
        self.ecdf_reference_ = ecdf_reference(X) if is_ecdf else None
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Return PyOD's ``decision_function`` of ``X`` (row by row for ECOD/COPOD).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = self._validate_score_input(X)
        if self.ecdf_reference_ is not None:
            return ecdf_scores(self.ecdf_reference_, X, self.method)
        scores = copy.copy(self.model_).decision_function(X)
        return np.asarray(scores, dtype=np.float64).ravel()


ECDF_METHODS = ("copod", "ecod")


def ecdf_reference(X_train):
    """What :func:`ecdf_scores` needs from the training data.

    Parameters
    ----------
    X_train : ndarray of shape (n_samples, n_features)

    Returns
    -------
    dict
        ``sorted`` (n_samples, n_features) columns sorted ascending; ``mean``,
        ``s2``, ``s3`` (n_features,) the column means and the sums of squared
        and cubed deviations from them.
    """
    mean = X_train.mean(axis=0)
    dev = X_train - mean
    return {"sorted": np.sort(X_train, axis=0), "mean": mean,
            "s2": (dev ** 2).sum(axis=0), "s3": (dev ** 3).sum(axis=0)}


def ecdf_scores(reference, X, method):
    """ECOD / COPOD scores of each row of ``X`` against the training data alone.

    With ``F`` the empirical CDF of the training column plus the row itself,
    ``U_l = -log F(x_j)``, ``U_r = -log(1 - F(x_j^-))`` and ``U_s`` = ``U_l``,
    ``U_r`` or ``U_l + U_r`` as the column's skewness is negative, positive or
    zero. ECOD (Li et al., TKDE 2022) scores ``sum_j max(U_l, U_r, U_s)``;
    COPOD (Li et al., ICDM 2020) ``sum_j max(U_s, (U_l + U_r) / 2)``. This is
    PyOD's ``decision_function`` applied to each row on its own.

    Parameters
    ----------
    reference : dict
        From :func:`ecdf_reference`.
    X : ndarray of shape (n_samples, n_features)
    method : {"ecod", "copod"}

    Returns
    -------
    scores : ndarray of shape (n_samples,)
    """
    U_l, U_r = _tail_surprise(reference["sorted"], X)
    sign = _skewness_sign(reference, X)
    U_s = np.where(sign < 0, U_l, np.where(sign > 0, U_r, U_l + U_r))
    if method == "ecod":
        return np.maximum(np.maximum(U_l, U_r), U_s).sum(axis=1)
    return np.maximum(U_s, (U_l + U_r) / 2).sum(axis=1)


def _tail_surprise(sorted_train, X):
    """``-log`` of the left and right tail ECDFs, each row joining the training data."""
    n = sorted_train.shape[0]
    pairs = zip(sorted_train.T, X.T)
    below = np.column_stack([np.searchsorted(c, x, side="right") for c, x in pairs])
    pairs = zip(sorted_train.T, X.T)
    above = n - np.column_stack([np.searchsorted(c, x, side="left") for c, x in pairs])
    return -np.log((below + 1) / (n + 1)), -np.log((above + 1) / (n + 1))


def _skewness_sign(reference, X):
    """Sign of each column's skewness once the row joins the training data."""
    n = reference["sorted"].shape[0]
    dev = X - reference["mean"]
    shift = dev / (n + 1)  # how far the mean moves when the row joins
    third = reference["s3"] - 3 * shift * reference["s2"] - n * shift ** 3 + (dev - shift) ** 3
    return np.sign(third)
