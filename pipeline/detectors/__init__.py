"""OOD detectors on pooled features, and the registry that builds them by name.

Every detector follows the contract in :mod:`pipeline.detectors.base`:
``fit(X, y=None) -> self`` and ``score(X) -> ndarray of shape (n_samples,)``,
where higher means more out-of-distribution.

:func:`make_detector` standardises features first (:class:`Standardized`)
unless the detector is in :data:`SELF_NORMALISING`: those define their own
normalisation, which z-scoring would change.

>>> det = make_detector("knn", {"n_neighbors": 10})   # doctest: +SKIP
>>> det.fit(X_train).score(X_test)                     # doctest: +SKIP
"""

from functools import partial

from ..errors import invalid_param
from .base import BaseDetector, check_param_names
from .knn_l2 import KNNL2, l2_normalise
from .laood import LAOODOCSVM, self_adaptive_shifting
from .mahalanobis import ClassConditionalMahalanobis, mahalanobis_scores
from .pyod_adapter import PYOD_MODELS, PyODDetector, check_pyod_params
from .standardized import Standardized

__all__ = [
    "BaseDetector",
    "ClassConditionalMahalanobis",
    "DETECTORS",
    "KNNL2",
    "LAOODOCSVM",
    "PyODDetector",
    "SELF_NORMALISING",
    "Standardized",
    "available_detectors",
    "l2_normalise",
    "mahalanobis_scores",
    "make_detector",
    "self_adaptive_shifting",
]


def _make_pyod(method, params):
    """Build a ``PyODDetector``, checking parameter names eagerly."""
    check_pyod_params(method, params)
    return PyODDetector(method=method, params=dict(params) if params else None)


def _make_native(name, cls, params):
    """Build one of our own detectors, checking parameter names eagerly."""
    check_param_names(params, cls().get_params(), f"detector {name!r} ({cls.__name__})")
    return cls(**(params or {}))


#: Short name -> factory taking a params dict (or None) and returning an
#: unfitted detector.
DETECTORS = {name: partial(_make_pyod, name) for name in PYOD_MODELS}
DETECTORS["mahalanobis"] = partial(_make_native, "mahalanobis", ClassConditionalMahalanobis)
DETECTORS["laood_ocsvm"] = partial(_make_native, "laood_ocsvm", LAOODOCSVM)
DETECTORS["knn_l2"] = partial(_make_native, "knn_l2", KNNL2)

#: Detectors that normalise their own input (KNN-L2 divides each row by its
#: norm): :func:`make_detector` never wraps them in :class:`Standardized`.
SELF_NORMALISING = frozenset({"knn_l2"})


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
        Wrap the detector in :class:`Standardized` (per-feature z-scoring);
        ignored for the detectors in :data:`SELF_NORMALISING`.

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
    return Standardized(detector=detector) if standardize and name not in SELF_NORMALISING else detector
