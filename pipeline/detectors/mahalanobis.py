"""Class-conditional Mahalanobis distance with a tied covariance, optionally on L2-normalised features (Mahalanobis++).

Lee, Lee, Lee & Shin (2018), "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks", NeurIPS.
Mueller & Hein (2025), "Mahalanobis++: Improving OOD Detection via Feature
Normalization", ICML.
"""

import numbers
from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import column_or_1d

from ..errors import DataError, invalid_param
from .base import BaseDetector
from .knn_l2 import l2_normalise

#: Values of the ``normalize`` parameter (None means "none").
NORMALIZE = ("none", "l2")


def mahalanobis_scores(X, means, precision):
    """Squared Mahalanobis distance to the closest class mean.

    ``score(x) = min_c (x - mu_c)^T P (x - mu_c)``: the row minimum of
    :func:`mahalanobis_distances`, clipped at 0 (round-off).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Samples to score.
    means : ndarray of shape (n_classes, n_features)
        Class means ``mu_c``.
    precision : ndarray of shape (n_features, n_features)
        Precision matrix ``P`` (inverse of the shared covariance).

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        Higher means more out-of-distribution.
    """
    return np.maximum(mahalanobis_distances(X, means, precision).min(axis=1), 0.0)


def mahalanobis_distances(X, means, precision):
    """Squared Mahalanobis distance of every sample to every mean, with one shared precision.

    ``D[i, k] = (x_i - mu_k)^T P (x_i - mu_k)``, computed with the expansion
    ``x'Px - 2 x'P mu_k + mu_k'P mu_k`` (``P`` symmetrised), so memory stays
    at O(n_samples * n_means): no (n_samples, n_samples) matrix.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    means : ndarray of shape (n_means, n_features)
    precision : ndarray of shape (n_features, n_features)

    Returns
    -------
    distances : ndarray of shape (n_samples, n_means)
        May hold tiny negative values from round-off.
    """
    X, means, precision = _check_shapes(X, means, precision)
    P = (precision + precision.T) / 2
    XP = X @ P
    sq = np.einsum("ij,ij->i", XP, X)[:, None] - 2 * XP @ means.T
    return sq + np.einsum("kj,kj->k", means @ P, means)[None, :]


def _check_shapes(X, means, precision):
    """Return float64 arrays, or raise ``DataError`` on inconsistent shapes."""
    X, means, precision = (np.asarray(a, dtype=np.float64) for a in (X, means, precision))
    d = X.shape[1] if X.ndim == 2 else -1
    if d < 0 or means.ndim != 2 or means.shape[1] != d or precision.shape != (d, d):
        raise DataError(
            f"mahalanobis_scores expects X (n, d), means (k, d) and precision "
            f"(d, d); got X {X.shape}, means {means.shape}, precision {precision.shape}."
        )
    return X, means, precision


class ClassConditionalMahalanobis(BaseDetector):
    """Mahalanobis distance to the closest class mean (Lee et al., 2018), or Mahalanobis++ (Mueller & Hein, 2025).

    Each class ``c`` is modelled as a Gaussian ``N(mu_c, Sigma)`` with a
    covariance shared by all classes; the score is

    ``score(x) = min_c (z - mu_c)^T P (z - mu_c)``, ``P = pinv(Sigma + reg * I)``,

    the squared distance to the closest class mean (Lee, Lee, Lee & Shin,
    "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018). ``Sigma`` is the biased (divide by
    ``n_samples``) covariance of the class-centred features, as in
    :class:`sklearn.covariance.EmpiricalCovariance`.

    ``z = x`` by default. With ``normalize="l2"``, ``z = x / ||x||_2`` for
    training and scored rows alike, before anything else: Mahalanobis++
    (Mueller & Hein, "Mahalanobis++: Improving OOD Detection via Feature
    Normalization", ICML 2025; reference code ``mueller-mp/maha-norm``,
    ``OpenOOD/openood/postprocessors/mdsn_postprocessor.py``). The norm is
    then the layer's pooled features' own, so the registry does not
    standardise them first (``reads_raw_features``). ``reg=0`` reproduces the
    reference (``EmpiricalCovariance``'s pseudo-inverse); note that unit-norm
    features have a covariance of trace at most 1, so the default ridge
    weighs more next to its smallest eigenvalues than on z-scored features.

    Parameters
    ----------
    reg : float, default=1e-6
        Non-negative ridge added to the covariance's diagonal before the
        pseudo-inverse.
    normalize : {"none", "l2"} or None, default="none"
        ``"l2"``: divide every row by its Euclidean norm (plus 1e-10, so a
        zero row stays zero) first, as Mahalanobis++.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels seen during ``fit``.
    means_ : ndarray of shape (n_classes, n_features)
        Per-class means of ``z``, in the order of ``classes_``.
    covariance_ : ndarray of shape (n_features, n_features)
        Shared (tied) covariance of ``z``.
    precision_ : ndarray of shape (n_features, n_features)
        ``pinv(covariance_ + reg * I)``.
    n_features_in_ : int
        Number of features seen during ``fit``.
    """

    requires_labels = True
    supports_dask = True  # fit_dask: out of core, from a dask array

    _parameter_constraints = {"reg": [Interval(Real, 0, None, closed="left")],
                              "normalize": [StrOptions(set(NORMALIZE)), None]}

    def __init__(self, *, reg=1e-6, normalize="none"):
        self.reg = reg
        self.normalize = normalize

    @property
    def reads_raw_features(self):
        """bool: with ``normalize="l2"``, fit and score the layer's features as stored (not z-scored)."""
        return self.normalize == "l2"

    def fit(self, X, y=None):
        """Estimate class means and the tied covariance.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            In-distribution training features.
        y : array-like of shape (n_samples,)
            Class labels; required.

        Returns
        -------
        self : ClassConditionalMahalanobis
        """
        self._check_reg()
        X = normalise_rows(self._validate_fit_input(X), self.normalize, type(self).__name__)
        y = self._check_labels(X, y)
        self.classes_, inverse = np.unique(y, return_inverse=True)
        self.means_ = _class_means(X, inverse, len(self.classes_))
        centred = X - self.means_[inverse]
        self.covariance_ = centred.T @ centred / X.shape[0]
        ridge = self.reg * np.eye(X.shape[1])
        self.precision_ = np.linalg.pinv(self.covariance_ + ridge, hermitian=True)
        self.n_features_in_ = X.shape[1]
        return self

    def fit_dask(self, X, y=None, transform=None):
        """Fit out of core, block by block (what ``fit`` computes, summed differently): see :func:`blockwise_sum`.

        Per block: the class counts, the class sums and the scatter ``X'X``; the
        blocks' statistics are then added up, so memory holds one block plus
        O(n_features**2), whatever the number of samples. The covariance is
        ``(sum x x' - sum_c n_c mu_c mu_c') / n``.

        Parameters
        ----------
        X : dask.array.Array or pipeline.store.ShardedArray of shape (n_samples, n_features)
            In-distribution training features, chunked along samples only.
        y : array-like of shape (n_samples,)
            Class labels; required (n_samples integers fit in memory).
        transform : callable, optional
            Applied to each block first (e.g. a fitted scaler's ``transform``),
            before the ``normalize`` step.

        Returns
        -------
        self : ClassConditionalMahalanobis
        """
        self._check_reg()
        prepare = block_transform(transform, self.normalize, type(self).__name__)
        y = self._check_labels(X, y)
        self.classes_, inverse = np.unique(y, return_inverse=True)
        counts, sums, scatter = blockwise_sum(_class_stats, X, inverse, len(self.classes_), transform=prepare)
        self.means_ = sums / counts[:, None]
        self.covariance_ = (scatter - (self.means_.T * counts) @ self.means_) / X.shape[0]
        ridge = self.reg * np.eye(X.shape[1])
        self.precision_ = np.linalg.pinv(self.covariance_ + ridge, hermitian=True)
        self.n_features_in_ = X.shape[1]
        return self

    def score(self, X):
        """Squared Mahalanobis distance to the closest class mean.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher means more out-of-distribution.
        """
        X = self._validate_score_input(X)
        return mahalanobis_scores(normalise_rows(X, self.normalize, type(self).__name__), self.means_,
                                  self.precision_)

    def _check_reg(self):
        """Raise ``ConfigError`` unless ``reg`` is a non-negative real number."""
        reg = self.reg
        if isinstance(reg, bool) or not isinstance(reg, numbers.Real) or not reg >= 0:
            raise invalid_param(
                "reg", "ClassConditionalMahalanobis", "a non-negative float", reg
            )

    def _check_labels(self, X, y):
        """Return ``y`` as a 1-D array matching ``X``, or raise."""
        return check_labels(X, y, type(self).__name__)


def check_labels(X, y, owner):
    """Return ``y`` as a 1-D array matching ``X``; ``ConfigError`` without labels, ``DataError`` on bad ones.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,) or None
    owner : str
        The class-conditional detector, for the message.
    """
    if y is None:
        raise invalid_param(
            "y", f"{owner}.fit",
            "an array of class labels of shape (n_samples,)", y,
            hint="this detector is class-conditional; pass the ID labels.",
        )
    try:
        y = column_or_1d(y)
    except ValueError as exc:
        raise DataError(f"y must be 1-D class labels: {exc}") from exc
    if y.shape[0] != X.shape[0]:
        raise DataError(f"X has {X.shape[0]} samples but y has {y.shape[0]} labels.")
    return y


def normalise_rows(X, normalize, owner):
    """``X`` itself, or its rows divided by their L2 norm (``normalize="l2"``); ``ConfigError`` on another value.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    normalize : {"none", "l2"} or None
    owner : str
        The detector, for the message.

    Returns
    -------
    ndarray of shape (n_samples, n_features)
    """
    if normalize is None or (isinstance(normalize, str) and normalize == "none"):
        return X
    if isinstance(normalize, str) and normalize == "l2":
        return l2_normalise(X)
    raise invalid_param("normalize", owner, f"one of {sorted(NORMALIZE)} or None", normalize)


def block_transform(transform, normalize, owner):
    """What ``fit_dask`` applies to each block: ``transform`` (if any), then :func:`normalise_rows`.

    The ``normalize`` value is checked at once, before any block is read.
    """
    normalise_rows(np.zeros((1, 1)), normalize, owner)
    if transform is None and normalize in (None, "none"):
        return None
    return lambda block: normalise_rows(block if transform is None else transform(block), normalize, owner)


def _class_means(X, inverse, n_classes):
    """Per-class means of ``X``, shape (n_classes, n_features)."""
    return np.stack([X[inverse == c].mean(axis=0) for c in range(n_classes)])


def _class_stats(X, inverse, n_classes):
    """Class counts (k,), class sums (k, d) and scatter (d, d) of one block."""
    X = np.asarray(X, dtype=np.float64)
    onehot = np.zeros((n_classes, len(X)))
    onehot[inverse, np.arange(len(X))] = 1.0
    return onehot.sum(axis=1), onehot @ X, X.T @ X


def blockwise_sum(stats, X, labels, *args, transform=None):
    """Sum ``stats(block, block_labels, *args)`` (a tuple of arrays) over the sample blocks of ``X``.

    Blocks are read one after the other and added to a running total, so one
    block is in memory at a time, whatever the number of samples. The
    parallelism is one level up: each call is one task of a fit fanned out over
    a cluster (:func:`pipeline.scoring.fit_detectors`).

    Parameters
    ----------
    stats : callable
    X : dask.array.Array or array with ``iter_blocks()`` of shape (n_samples, n_features)
        Chunked along samples only: a dask array, or a feature store's
        :class:`~pipeline.store.ShardedArray` (whose ``iter_blocks`` yields
        ``(start, block)``: no dask needed).
    labels : ndarray of shape (n_samples,)
    transform : callable, optional
        Applied to each float64 block before ``stats``.
    """
    if X.ndim != 2 or len(X.chunks[1]) != 1:
        raise DataError(f"blockwise fitting needs a 2-D array chunked along samples only; got chunks {X.chunks}.")
    total = None
    for lo, block in _sample_blocks(X):
        block = np.asarray(block, dtype=np.float64)
        part = stats(block if transform is None else transform(block), labels[lo:lo + len(block)], *args)
        total = part if total is None else tuple(a + b for a, b in zip(total, part, strict=True))
    return total


def _sample_blocks(X):
    """Yield ``(start, block)`` of ``X``'s sample blocks, each read when its turn comes."""
    if hasattr(X, "iter_blocks"):
        yield from X.iter_blocks()
        return
    from dask.local import get_sync  # X is a dask array: dask is loaded

    for i, lo in enumerate(np.cumsum([0, *X.chunks[0][:-1]])):
        # dask's local synchronous scheduler, passed as the function it is: named ("sync"), dask first
        # imports distributed to look for a client (a third of a second in every fit)
        yield int(lo), X.blocks[i].compute(scheduler=get_sync)
