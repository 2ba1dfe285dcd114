"""OOD detectors on pooled features, and the registry that builds them by name.

Every detector follows the contract in :mod:`pipeline.detectors.base`:
``fit(X, y=None) -> self`` and ``score(X) -> ndarray of shape (n_samples,)``,
where higher means more out-of-distribution.

>>> det = make_detector("knn", {"n_neighbors": 10})   # doctest: +SKIP
>>> det.fit(X_train).score(X_test)                     # doctest: +SKIP
"""

from functools import partial

from ..errors import invalid_param
from .base import BaseDetector, check_param_names
from .mahalanobis import ClassConditionalMahalanobis, mahalanobis_scores
from .pyod_adapter import PYOD_MODELS, PyODDetector, check_pyod_params
from .standardized import Standardized

__all__ = [
    "BaseDetector",
    "ClassConditionalMahalanobis",
    "DETECTORS",
    "PyODDetector",
    "Standardized",
    "available_detectors",
    "mahalanobis_scores",
    "make_detector",
]


def _make_pyod(method, params):
    """Build a ``PyODDetector``, checking parameter names eagerly."""
    check_pyod_params(method, params)
    return PyODDetector(method=method, params=dict(params) if params else None)


def _make_mahalanobis(params):
    """Build a ``ClassConditionalMahalanobis``, checking parameter names."""
    accepted = ClassConditionalMahalanobis().get_params()
    check_param_names(params, accepted, "detector 'mahalanobis' (ClassConditionalMahalanobis)")
    return ClassConditionalMahalanobis(**(params or {}))


#: Short name -> factory taking a params dict (or None) and returning an
#: unfitted detector.
DETECTORS = {name: partial(_make_pyod, name) for name in PYOD_MODELS}
DETECTORS["mahalanobis"] = _make_mahalanobis


def available_detectors():
    """Return the registered detector names.

    Returns
    -------
    list of str
        Sorted short names accepted by :func:`make_detector`.
    """
    return sorted(DETECTORS)


def make_detector(name, params=None, *, standardize=True):
    """Build an unfitted detector by short name.

    Parameters
    ----------
    name : str
        One of :func:`available_detectors`.
    params : dict, optional
        Keyword arguments for the detector; unknown names are rejected.
    standardize : bool, default=True
        Wrap the detector in :class:`Standardized` (per-feature z-scoring).

    Returns
    -------
    BaseDetector
        Unfitted; ``requires_labels`` tells whether ``fit`` needs ``y``.

    Raises
    ------
    pipeline.errors.ConfigError
        If ``name`` is unknown or ``params`` has names the detector rejects.
    """
    if name not in DETECTORS:
        raise invalid_param(
            "fit.detectors", "fit", f"one of {available_detectors()}", name,
            hint="use pipeline.detectors.available_detectors() for the list; "
            "names are lower-case.",
        )
    detector = DETECTORS[name](params)
    return Standardized(detector=detector) if standardize else detector
