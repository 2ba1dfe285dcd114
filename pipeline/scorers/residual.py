"""Residual: the norm of the feature off the ID principal subspace (ViM's baseline).

Wang, Li, Feng & Zhang (2022), "ViM: Out-Of-Distribution with Virtual-logit
Matching", CVPR (the "Residual" score of its section 3).
"""

from __future__ import annotations

from numbers import Integral

from sklearn.utils._param_validation import Interval

from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import read_head
from pipeline.scorers.vim import resolve_dim, vim_origin, vim_residual_space, vim_residuals


class ResidualScorer(BaseScorer):
    """Residual (Wang et al., CVPR 2022): ``||(f(x) - u) @ NS||``, ViM without the energy.

    ``fit`` on ID-train penultimate features ``f`` (D units) with head ``W, b``:
    origin ``u = -pinv(W) @ b``; ``NS`` = eigenvectors of the ``D - dim``
    smallest eigenvalues of the (uncentred) covariance of ``f - u``. Then

    ``score(x) = ||(f(x) - u) @ NS||``

    already higher = more OOD (OpenOOD returns its negation as the ID
    confidence). Uses the same helpers as :class:`~pipeline.scorers.vim.ViMScorer`.
    Follows OpenOOD v1.5's ``openood/postprocessors/residual_postprocessor.py``
    (``configs/postprocessors/residual.yml``: ``dim: 512``, set for a
    2048-unit ImageNet ResNet-50; no sweep), except that (i) OpenOOD fits on
    ID-*val* features, here on whatever ``fit`` gets (the pipeline passes
    ID-train, as the ViM paper and our ViM do) and (ii) the symmetric
    covariance goes through ``eigh`` (OpenOOD: ``eig``; same subspace). Needs
    ``Features.penultimate``, ``head_weight`` and ``head_bias``.

    Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit
    Matching", CVPR 2022.

    Parameters
    ----------
    dim : int or None, default=None
        Dimension of the principal subspace, ``0 < dim < D``. ``None`` means
        ``D // 2``, as :class:`ViMScorer`.

    Attributes
    ----------
    dim_ : int
    origin_ : ndarray of shape (n_features,)
    null_space_ : ndarray of shape (n_features, n_features - dim_)
    n_features_in_ : int
    """

    learns = True  # fit reads ID-train features

    _parameter_constraints = {"dim": [Interval(Integral, 1, None, closed="left"), None]}

    def __init__(self, *, dim=None):
        self.dim = dim

    def fit(self, features, y=None):
        """Learn the origin and the residual space from ID features.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and ``head_bias`` (C,).
        y : ignored

        Returns
        -------
        self : ResidualScorer
        """
        a, weight, bias = read_head(features, "Residual")
        self.dim_ = resolve_dim(self.dim, a.shape[1], "Residual")
        self.origin_ = vim_origin(weight, bias)
        self.null_space_ = vim_residual_space(a - self.origin_, self.dim_)
        self.n_features_in_ = a.shape[1]
        return self

    def score(self, features):
        """Norm of the residual off the principal subspace.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and ``head_bias`` (C,).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        self._check_fitted()
        a, _, _ = read_head(features, "Residual", self.n_features_in_)
        return vim_residuals(a, self.origin_, self.null_space_)
