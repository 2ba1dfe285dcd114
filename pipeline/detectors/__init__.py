"""OOD detectors on pooled features, and the registry that builds them by name.

Every detector follows the contract in :mod:`pipeline.detectors.base`:
``fit(X, y=None) -> self`` and ``score(X) -> ndarray of shape (n_samples,)``,
where higher means more out-of-distribution.

:func:`make_detector` standardises features first (:class:`Standardized`)
unless the detector reads the layer's features as stored: those in
:data:`SELF_NORMALISING` (they define their own normalisation, which z-scoring
would change), and any whose ``reads_raw_features`` is true for the params given
(Mahalanobis++ and rMaha++ L2-normalise the pooled features as stored; GMM's
PCA, as OpenOOD's, is on them too).

>>> det = make_detector("knn", {"n_neighbors": 10})   # doctest: +SKIP
>>> det.fit(X_train).score(X_test)                     # doctest: +SKIP
"""

from functools import partial

from .. import _sklearn  # noqa: F401  (first: scikit-learn without pandas, see there)
from ..errors import ConfigError, invalid_param
from .base import BaseDetector, check_param_names
from .gmm import TiedGMM, gmm_scores
from .knn_l2 import KNNL2, l2_normalise
from .laood import LAOODOCSVM, self_adaptive_shifting
from .mahalanobis import ClassConditionalMahalanobis, mahalanobis_distances, mahalanobis_scores
from .pyod_adapter import PYOD_MODELS, PyODDetector, check_pyod_params, pyod_param_names
from .rmds import RelativeMahalanobis, relative_mahalanobis_scores
from .ssd import SSD, cluster_mahalanobis_scores
from .standardized import Standardized

__all__ = [
    "BaseDetector",
    "ClassConditionalMahalanobis",
    "DETECTORS",
    "KNNL2",
    "LAOODOCSVM",
    "PyODDetector",
    "RelativeMahalanobis",
    "SELF_NORMALISING",
    "SSD",
    "Standardized",
    "TiedGMM",
    "available_detectors",
    "cluster_mahalanobis_scores",
    "gmm_scores",
    "l2_normalise",
    "mahalanobis_distances",
    "mahalanobis_scores",
    "make_detector",
    "relative_mahalanobis_scores",
    "self_adaptive_shifting",
]


def _make_pyod(method, params):
    """Build a ``PyODDetector``, checking parameter names eagerly."""
    check_pyod_params(method, params)
    return PyODDetector(method=method, params=dict(params) if params else None)


def _make_native(name, cls, params, defaults=None):
    """Build one of our own detectors, checking parameter names eagerly; ``defaults`` come before ``params``."""
    check_param_names(params, cls().get_params(), f"detector {name!r} ({cls.__name__})")
    return cls(**{**(defaults or {}), **(params or {})})


#: Short name -> factory taking a params dict (or None) and returning an
#: unfitted detector.
DETECTORS = {name: partial(_make_pyod, name) for name in PYOD_MODELS}
DETECTORS["mahalanobis"] = partial(_make_native, "mahalanobis", ClassConditionalMahalanobis)
DETECTORS["laood_ocsvm"] = partial(_make_native, "laood_ocsvm", LAOODOCSVM)
DETECTORS["knn_l2"] = partial(_make_native, "knn_l2", KNNL2)
DETECTORS["rmds"] = partial(_make_native, "rmds", RelativeMahalanobis)
DETECTORS["gmm"] = partial(_make_native, "gmm", TiedGMM)
DETECTORS["ssd"] = partial(_make_native, "ssd", SSD)
# Mahalanobis++ and rMaha++ under names of their own, so that fit.detectors can hold them next to the plain ones:
# the same classes with normalize: l2 as the default.
DETECTORS["mahalanobis_pp"] = partial(_make_native, "mahalanobis_pp", ClassConditionalMahalanobis,
                                      defaults={"normalize": "l2"})
DETECTORS["rmds_pp"] = partial(_make_native, "rmds_pp", RelativeMahalanobis, defaults={"normalize": "l2"})

#: Detectors that normalise their own input (KNN-L2 divides each row by its
#: norm; SSD L2-normalises, then z-scores): :func:`make_detector` never wraps
#: them in :class:`Standardized`.
SELF_NORMALISING = frozenset({"knn_l2", "ssd"})


def detector_param_names(name):
    """The sorted parameter names detector ``name`` accepts."""
    if name in PYOD_MODELS:
        return pyod_param_names(name)
    return sorted(DETECTORS[name].args[1]().get_params())


def available_detectors():
    """Return the registered detector names.

    Returns
    -------
    list of str
        Sorted short names accepted by :func:`make_detector`.
    """
    return sorted(DETECTORS)


def make_detector(name, params=None, *, standardize=True, where="fit.detectors"):
    """Build an unfitted detector by short name.

    Parameters
    ----------
    name : str
        One of :func:`available_detectors`.
    params : dict, optional
        Keyword arguments for the detector; unknown names are rejected.
    standardize : bool, default=True
        Wrap the detector in :class:`Standardized` (per-feature z-scoring);
        ignored for the detectors in :data:`SELF_NORMALISING` and those whose
        ``reads_raw_features`` is true with these ``params``.
    where : str, default="fit.detectors"
        Where the user wrote the params, for messages (``"search.methods"``).

    Returns
    -------
    BaseDetector
        Unfitted; ``requires_labels`` tells whether ``fit`` needs ``y``.

    Raises
    ------
    pipeline.errors.ConfigError
        If ``name`` is unknown, or ``params`` has names the detector rejects
        or values out of range (checked before any data is seen).
    """
    if name not in DETECTORS:
        raise invalid_param(
            where, where.split(".")[0], f"one of {available_detectors()}", name,
            hint="names are lower-case; network-level methods (msp, ebo, ...) go under detect.methods.",
        )
    accepted = detector_param_names(name)
    unknown = sorted(set(params or {}) - set(accepted))
    if unknown:
        raise ConfigError(f"Unknown parameter '{where}.{name}.{unknown[0]}'. Valid parameters of '{where}.{name}' "
                          f"are {accepted}.")
    detector = DETECTORS[name](params).check_params(prefix=f"{where}.{name}.")
    raw = name in SELF_NORMALISING or getattr(detector, "reads_raw_features", False)
    return Standardized(detector=detector) if standardize and not raw else detector
