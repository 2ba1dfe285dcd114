"""PyOD models behind the layerscope detector face (``fit`` / ``score``)."""

import copy
import importlib
import inspect

import numpy as np

from ..errors import invalid_param
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

    Notes
    -----
    ``score`` runs ``decision_function`` on a shallow copy of ``model_``
    because some PyOD models (ECOD, COPOD) store intermediate arrays on
    ``self`` while scoring. ECOD and COPOD re-estimate their empirical CDFs
    on the training data *plus* the batch being scored, so a sample's score
    depends slightly on the other samples in ``X``.
    """

    def __init__(self, *, method="knn", params=None):
        self.method = method
        self.params = params

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
        model_class = pyod_class(self.method)
        check_pyod_params(self.method, self.params)
        self.model_ = model_class(**(self.params or {})).fit(X)
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Return PyOD's ``decision_function`` of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = self._validate_score_input(X)
        scores = copy.copy(self.model_).decision_function(X)
        return np.asarray(scores, dtype=np.float64).ravel()
