"""ViM: virtual-logit matching (the residual off the principal subspace vs the energy).

Wang, Li, Feng & Zhang (2022), "ViM: Out-Of-Distribution with Virtual-logit
Matching", CVPR.
"""

from __future__ import annotations

import numbers
from numbers import Integral

import numpy as np
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from sklearn.utils._param_validation import Interval

from pipeline.errors import DataError, invalid_param
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import head_logits, read_head


def vim_null_space(covariance, dim):
    """Eigenvectors of the ``D - dim`` smallest eigenvalues of a symmetric covariance.

    Parameters
    ----------
    covariance : ndarray of shape (n_features, n_features)
    dim : int
        Dimension of the principal subspace left out, ``0 < dim < D``.

    Returns
    -------
    null_space : ndarray of shape (n_features, n_features - dim)
        Orthonormal columns, smallest eigenvalue first.
    """
    _, vectors = np.linalg.eigh(covariance)  # eigenvalues ascending
    return np.ascontiguousarray(vectors[:, :covariance.shape[0] - dim])


def vim_origin(weight, bias):
    """ViM's origin ``u = -pinv(W) @ b``: the feature the head maps closest to all-zero logits.

    Parameters
    ----------
    weight : ndarray of shape (n_classes, n_features)
    bias : ndarray of shape (n_classes,)

    Returns
    -------
    origin : ndarray of shape (n_features,)
    """
    return -np.linalg.pinv(weight) @ bias


def vim_residual_space(centred, dim):
    """``NS``: the residual space of the (uncentred) covariance of ``centred = a - origin``.

    Parameters
    ----------
    centred : ndarray of shape (n_samples, n_features)
        ID features minus the origin.
    dim : int
        Dimension of the principal subspace left out, ``0 < dim < D``.

    Returns
    -------
    null_space : ndarray of shape (n_features, n_features - dim)
    """
    covariance = EmpiricalCovariance(assume_centered=True).fit(centred).covariance_
    return vim_null_space(covariance, dim)


def vim_residuals(a, origin, null_space):
    """Norm of each feature's projection onto the residual space, ``||(a - origin) @ NS||``.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    origin : ndarray of shape (n_features,)
    null_space : ndarray of shape (n_features, n_null)

    Returns
    -------
    residuals : ndarray of shape (n_samples,)
    """
    return np.linalg.norm((a - origin) @ null_space, axis=1)


def resolve_dim(dim, n_features, owner):
    """The principal dimension: ``dim``, or ``D // 2`` when None; ``ConfigError`` unless ``0 < dim < D``.

    Parameters
    ----------
    dim : int or None
    n_features : int
        ``D``.
    owner : str
        The scorer, for the message.

    Returns
    -------
    dim : int
    """
    resolved = n_features // 2 if dim is None else dim
    if (isinstance(resolved, bool) or not isinstance(resolved, numbers.Integral)
            or not (0 < resolved < n_features)):
        raise invalid_param("dim", owner, f"None or an int in [1, {n_features - 1}] (0 < dim < D = {n_features})",
                            dim)
    return int(resolved)


def vim_scores(a, weight, bias, origin, null_space, alpha):
    """ViM's score, ``alpha * ||(a - origin) @ NS|| - logsumexp(a @ W.T + b)``; higher = more OOD.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    weight : ndarray of shape (n_classes, n_features)
    bias : ndarray of shape (n_classes,)
    origin : ndarray of shape (n_features,)
    null_space : ndarray of shape (n_features, n_null)
    alpha : float

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        float64; the negation of ViM's ID score (energy minus virtual logit).
    """
    return alpha * vim_residuals(a, origin, null_space) - logsumexp(head_logits(a, weight, bias), axis=1)


class ViMScorer(BaseScorer):
    """ViM (Wang et al., CVPR 2022): virtual logit from the residual, minus the energy.

    ``fit`` on ID penultimate features ``f`` (D units) with head ``W, b``:
    origin ``u = -pinv(W) @ b``; ``NS`` = eigenvectors of the ``D - dim``
    smallest eigenvalues of the (uncentred) covariance of ``f - u``;
    ``alpha = mean(max logit) / mean(||(f - u) @ NS||)``. Then

    ``score(x) = alpha * ||(f(x) - u) @ NS|| - logsumexp(f(x) @ W.T + b)``

    The paper's (and OpenOOD's) score is ``logsumexp(logits) - alpha * ||.||``,
    higher = more ID; it is negated here so that higher = more OOD. Matches
    OpenOOD's ``VIMPostprocessor``, except that the symmetric covariance goes
    through ``eigh`` (OpenOOD: ``eig``; same subspace). Needs
    ``Features.penultimate``, ``head_weight`` and ``head_bias``.

    Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit
    Matching", CVPR 2022.

    Parameters
    ----------
    dim : int or None, default=None
        Dimension of the principal subspace, ``0 < dim < D``. ``None`` means
        ``D // 2`` (OpenOOD uses 256 of 512 for a CIFAR ResNet-18).

    Attributes
    ----------
    dim_ : int
        The principal dimension used.
    origin_ : ndarray of shape (n_features,)
        ``u = -pinv(W) @ b``.
    null_space_ : ndarray of shape (n_features, n_features - dim_)
        ``NS``.
    alpha_ : float
        Scale of the virtual logit.
    n_features_in_ : int
        ``D`` seen during ``fit``.
    """

    learns = True  # fit reads ID-train features

    _parameter_constraints = {"dim": [Interval(Integral, 1, None, closed="left"), None]}

    def __init__(self, *, dim=None):
        self.dim = dim

    def fit(self, features, y=None):
        """Learn the origin, the residual space and ``alpha_`` from ID features.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and
            ``head_bias`` (C,).
        y : ignored

        Returns
        -------
        self : ViMScorer
        """
        a, weight, bias = read_head(features, "ViM")
        self.dim_ = resolve_dim(self.dim, a.shape[1], "ViM")
        self.origin_ = vim_origin(weight, bias)
        centred = a - self.origin_
        self.null_space_ = vim_residual_space(centred, self.dim_)
        residual = vim_residuals(a, self.origin_, self.null_space_).mean()
        if not residual > 1e-12 * np.linalg.norm(centred, axis=1).mean():
            raise DataError(f"ViM's ID features have no residual off their {self.dim_}-dimensional principal "
                            "subspace, so alpha is undefined. Hint: lower 'dim'.")
        self.alpha_ = float(head_logits(a, weight, bias).max(axis=1).mean() / residual)
        self.n_features_in_ = a.shape[1]
        return self

    def score(self, features):
        """Virtual logit minus the energy (the negated ViM score).

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and
            ``head_bias`` (C,).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        self._check_fitted()
        a, weight, bias = read_head(features, "ViM", self.n_features_in_)
        return vim_scores(a, weight, bias, self.origin_, self.null_space_, self.alpha_)
