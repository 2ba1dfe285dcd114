"""OpenOOD's GMM postprocessor: a tied-covariance Gaussian mixture on the principal components of a layer.

Reference: OpenOOD v1.5 (Zhang et al. 2023, "OpenOOD v1.5: Enhanced Benchmark
for Out-of-Distribution Detection"), ``openood/postprocessors/gmm_postprocessor.py``
and ``configs/postprocessors/gmm.yml``.
"""

from numbers import Integral, Real

import numpy as np
from scipy.special import logsumexp
from sklearn.utils._param_validation import Interval

from ..errors import DataError, invalid_param
from .base import BaseDetector
from .mahalanobis import mahalanobis_distances


def gmm_scores(X, means, precision, weights):
    """Negative log of OpenOOD's GMM confidence: ``-log sum_k w_k exp(-MD_k(x) / 2)``.

    ``MD_k(x) = (x - mu_k)^T P (x - mu_k)`` with the tied precision ``P``;
    computed in log space (``logsumexp``), so it neither underflows nor
    saturates far from the data. This is ``-log p(x)`` up to the constant
    ``log det(2 pi Sigma) / 2``, which a tied mixture shares across components.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    means : ndarray of shape (n_components, n_features)
    precision : ndarray of shape (n_features, n_features)
    weights : ndarray of shape (n_components,)

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        Higher means more out-of-distribution.
    """
    distances = np.maximum(mahalanobis_distances(X, means, precision), 0.0)
    return -logsumexp(np.log(weights)[None, :] - distances / 2, axis=1)


def principal_axes(X, n_axes):
    """The ``n_axes`` leading principal directions of ``X``, as columns, from the (d, d) covariance.

    What ``PCA(n_components=n_axes).fit(X).components_.T`` holds (OpenOOD's
    ``reduce_feature_dim`` with ``pca_<n>``), with the same sign convention
    (each direction's largest entry is positive); memory O(n_features**2)
    beyond ``X``.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    n_axes : int
        1 <= n_axes <= n_features.

    Returns
    -------
    axes : ndarray of shape (n_features, n_axes)
        Orthonormal columns, by decreasing variance.
    """
    centred = X - X.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred / len(X))
    axes = vectors[:, ::-1][:, :n_axes]
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(n_axes)])
    return axes * np.where(signs == 0, 1.0, signs)


class TiedGMM(BaseDetector):
    """OpenOOD's GMM score: a tied-covariance Gaussian mixture on the leading principal components.

    ``z = W^T x``, with ``W`` the ``pca_dim`` leading principal directions of
    ID-train (no centring, as the reference's ``transform_matrix``; no
    reduction when ``pca_dim`` is None or at least the layer's width). A
    scikit-learn :class:`~sklearn.mixture.GaussianMixture` with
    ``n_components`` components and one shared covariance (``covariance_type
    ="tied"``, k-means initialisation, seeded) is fitted to ID-train ``z``, and

    ``score(x) = -log sum_k w_k exp(-(z - mu_k)^T P (z - mu_k) / 2)``

    with the mixture's weights ``w_k``, means ``mu_k`` and precision ``P``
    (which includes ``reg_covar``). Reference: OpenOOD v1.5,
    ``openood/postprocessors/gmm_postprocessor.py`` (``get_GMM_stat``,
    ``compute_GMM_score``), whose confidence is ``log(prob + 1e-45)``
    with ``prob = sum_k w_k exp(-MD_k / 2)``; ``configs/postprocessors/gmm.yml``
    weights only its last layer (``alpha_list: [0, 0, 1]``): 50 components,
    ``pca_50``, ``random_state=0``, scikit-learn's other defaults. Ours is
    that confidence negated, computed in log space: the reference's float32
    ``exp`` underflows to 0 once every ``MD_k > ~207``, and ``log(0 + 1e-45)``
    then gives all such samples the same confidence (about -103.3). Like the
    reference it reads the layer's features as stored (``reads_raw_features``:
    PCA is not scale-invariant, so the registry does not standardise them
    first).

    Memory: ``fit`` holds the layer's ID-train features (EM needs all rows);
    the fitted state is O(n_features * pca_dim + n_components * pca_dim).

    Parameters
    ----------
    n_components : int, default=50
        Mixture components, 1 <= n_components <= n_train.
    pca_dim : int or None, default=50
        Principal directions kept; None (or >= n_features): no reduction.
    reg_covar : float, default=1e-6
        Non-negative ridge the mixture adds to its covariance (scikit-learn's
        default, as the reference).
    random_state : int, RandomState instance or None, default=0
        Seed of the mixture's k-means initialisation (the reference uses 0).

    Attributes
    ----------
    transform_ : ndarray of shape (n_features, n_kept) or None
        ``W``; None when no reduction is made.
    means_ : ndarray of shape (n_components, n_kept)
    precision_ : ndarray of shape (n_kept, n_kept)
    weights_ : ndarray of shape (n_components,)
    converged_ : bool
        Whether EM converged (scikit-learn warns when it did not).
    n_features_in_ : int
    """

    reads_raw_features = True  # as the reference: PCA on the layer's features as stored

    _parameter_constraints = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "pca_dim": [Interval(Integral, 1, None, closed="left"), None],
        "reg_covar": [Interval(Real, 0, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, *, n_components=50, pca_dim=50, reg_covar=1e-6, random_state=0):
        self.n_components = n_components
        self.pca_dim = pca_dim
        self.reg_covar = reg_covar
        self.random_state = random_state

    def fit(self, X, y=None):
        """Project ``X`` on its principal directions and fit the tied mixture there.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : TiedGMM
        """
        self.check_params()
        X = self._validate_fit_input(X)
        if self.n_components > len(X):
            raise invalid_param("n_components", "TiedGMM", f"an integer in [1, n_train] with n_train={len(X)}",
                                self.n_components, hint="lower n_components or fit on more samples.")
        reduce = self.pca_dim is not None and self.pca_dim < X.shape[1]
        self.transform_ = principal_axes(X, self.pca_dim) if reduce else None
        from sklearn.mixture import GaussianMixture  # imported when fitted, not at start-up

        mixture = GaussianMixture(n_components=self.n_components, covariance_type="tied", reg_covar=self.reg_covar,
                                  random_state=self.random_state)
        try:
            mixture.fit(self._project(X))
        except ValueError as exc:  # a collapsed covariance, or too few rows: scikit-learn's words, on one line
            raise DataError(f"TiedGMM could not fit its mixture on {X.shape[0]} samples: "
                            f"{' '.join(str(exc).split())}") from None
        self.means_, self.precision_, self.weights_ = mixture.means_, mixture.precisions_, mixture.weights_
        self.converged_ = bool(mixture.converged_)
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Negative log-likelihood under the mixture, up to a constant.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = self._validate_score_input(X)
        return gmm_scores(self._project(X), self.means_, self.precision_, self.weights_)

    def _project(self, X):
        return X if self.transform_ is None else X @ self.transform_
