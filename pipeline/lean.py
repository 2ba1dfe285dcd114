"""Deploy-time scorers: fitted detectors compiled once into plain torch arithmetic for the guard's hot path.

A detector's ``score(X)`` validates its input on every call (scikit-learn's
``check_array``, three times for a :class:`~pipeline.detectors.Standardized`
Mahalanobis), which costs far more than the arithmetic on one pooled row.
:func:`compile_scorer` checks a fitted detector **once** and returns a
:class:`LeanScorer`: a function of pooled activations ``(n, C)`` (a torch
tensor, on the model's device) to scores ``(n,)`` in float64 on that device,
with no validation and no host copy. What it computes is the detector's own
formula in float64, rearranged so that a call is a handful of torch ops; its
scores equal ``detector.score`` to round-off (1e-6 relative is checked by the
guard's self-check and by the tests):

* :class:`~pipeline.detectors.ClassConditionalMahalanobis` (Mahalanobis and
  Mahalanobis++), standardised or not: ``min_c (z - mu_c)' P (z - mu_c)``
  clipped at 0 (:func:`~pipeline.detectors.mahalanobis_scores`), in whitened
  coordinates ``w = z L`` (``P = L L'``) with the scaler ``z = (x - m) / s``
  folded into ``L`` and an offset: two matrix products and a row minimum.
  On the CPU it has a numpy twin, which scores every batch there (see
  :data:`SERIAL_MACS` for why), and a scalar twin for one row
  (:meth:`LeanScorer.one`, the guard's batch-1 path: one torch product, then
  Python floats).
* :class:`~pipeline.detectors.KNNL2`: the distance to the k-th nearest row of
  the normalised ID-train bank, from ``|z|^2 - 2 z Z' + |Z|^2`` (the expansion
  scikit-learn's brute-force search uses) and ``torch.kthvalue``, standardised
  or not. Memory: the bank, (n_train, C) float64, on the device.
* Any other detector (PyOD's, rMaha, GMM, SSD, LA-OOD): its own ``score`` on a
  float64 numpy copy of the rows, i.e. what the guard did before (a host copy
  and per-call validation; no gain, no change).

Two cases go to the detector's own ``score``, for the whole batch (see
:meth:`LeanScorer.__call__`): inputs that are not finite, so that it raises its
one-line :class:`~pipeline.errors.DataError` (a compiled scorer never returns
NaN for them); and a score within ``TIE_RTOL`` of the threshold, so that round-off
between numpy and torch never flips a decision: the guard decides exactly as it
did with ``score`` alone.
"""

from __future__ import annotations

import functools
import math
import operator

import numpy as np
import torch

_EPS = 1e-10  # as pipeline.detectors.knn_l2: x / (||x|| + 1e-10)
_NUMPY_DTYPES = (torch.float32, torch.float64)  # what a numpy twin takes as is (numpy has no bfloat16)

#: On the CPU a scorer with a numpy twin runs it at every batch size, and its matrix product is made in row blocks of
#: at most this many multiply-adds each: numpy's OpenBLAS computes such a product on the calling thread
#: (``interface/gemm.c``: 65536 x ``GEMM_MULTITHREAD_THRESHOLD`` 4), above it wakes threads of its own, which then
#: spin on the cores the next convolution needs. torch's float64 product (MKL) is an OpenMP region at any size: on a
#: machine where another process holds a core, each such region, like each of the network's own, can wait a scheduler
#: tick for its second thread (4 to 12 ms measured on 2 cores, against 15 us for the product). The network pays that
#: risk anyway; the guard's scoring should not add to it.
SERIAL_MACS = 1 << 18

#: Compiled scores agree with ``score`` to this relative tolerance (checked by the guard's self-check); a score
#: this close to its threshold is recomputed with ``score``.
TIE_RTOL = 1e-6


class LeanScorer:
    """A fitted detector's score as a torch function, with the detector kept for the validated path.

    Parameters
    ----------
    detector : fitted detector
        ``score(X (n, C)) -> (n,)``; called for non-finite scores and by the fallback.
    fn : callable or None
        ``(n, C) float64 tensor -> (n,) float64 tensor``; None: the detector's own ``score``.
    n_features : int or None
        Width the detector was fitted on.

    Attributes
    ----------
    compiled : bool
        Whether the scores come from torch arithmetic (False: the detector's ``score``).
    """

    def __init__(self, detector, fn, n_features):
        self.detector, self.fn, self.n_features = detector, fn, n_features
        self.compiled = fn is not None
        self._small = getattr(fn, "numpy_twin", None)  # CPU only (set by the compiler)
        self._one = getattr(fn, "scalar_one", None)  # one row (1, C) tensor -> float

    def __call__(self, pooled: torch.Tensor, threshold=math.inf) -> tuple[np.ndarray, np.ndarray]:
        """Scores of ``pooled`` (n, C) and which of them are above ``threshold``.

        The whole batch goes to ``detector.score`` instead when the width is
        not the fitted one or a score is not finite (NaN or inf activations:
        it raises the same one-line error as without the lean path), or when
        a score is within ``TIE_RTOL`` of a finite ``threshold`` (the decision
        is then the detector's own).

        Returns
        -------
        scores : ndarray of shape (n,), float64
            On the host: the one copy from the device (a view on the CPU).
        above : ndarray of shape (n,), bool
            ``scores > threshold``.
        """
        if self.fn is not None and pooled.shape[1] == self.n_features:
            if self._small is not None and pooled.dtype in _NUMPY_DTYPES:  # the CPU (see SERIAL_MACS)
                scores = self._small(pooled.numpy())  # float32 rows, promoted to float64 by the twin
            else:
                scores = self.fn(pooled.double()).cpu().numpy()
            if _clear(scores, threshold):
                return scores, scores > threshold
        scores = self.validated(pooled)
        return scores, scores > threshold

    def one(self, pooled: torch.Tensor, threshold=math.inf) -> tuple[float, bool]:
        """:meth:`__call__` for one row ``pooled`` (1, C): the score as a Python float, and ``score > threshold``.

        The guard's latency path: with a scalar twin (the z-scored and plain
        Mahalanobis on the CPU) it costs one matrix product in torch and a few
        Python operations on the floats it gives; otherwise it is :meth:`__call__`'s.
        """
        if self._one is not None and pooled.shape[1] == self.n_features:
            value = self._one(pooled)
            if math.isfinite(value) and (not math.isfinite(threshold)  # _clear_one, inline: this is the hot path
                                         or abs(value - threshold) > TIE_RTOL * abs(threshold)):
                return value, value > threshold
        scores, above = self(pooled, threshold)
        return float(scores[0]), bool(above[0])

    def uncompiled(self) -> LeanScorer:
        """The same detector scored by its own ``score`` only."""
        return LeanScorer(self.detector, None, None)

    def validated(self, pooled: torch.Tensor) -> np.ndarray:
        """``detector.score`` on a float64 numpy copy of ``pooled``: what the guard did before, validation included."""
        return np.asarray(self.detector.score(pooled.float().cpu().numpy().astype(np.float64)), dtype=np.float64)


def _clear(scores, threshold) -> bool:
    """Finite scores, none within ``TIE_RTOL`` of a finite threshold (NaN fails every comparison)."""
    if len(scores) == 1:  # one input: Python floats
        return _clear_one(float(scores[0]), threshold)
    if not len(scores):
        return False
    if not math.isfinite(threshold):
        return math.isfinite(scores.sum())
    gap = np.abs(scores - threshold)
    return gap.min() > TIE_RTOL * abs(threshold) and gap.max() < math.inf


def _clear_one(value: float, threshold: float) -> bool:
    """:func:`_clear` of one score. An infinite threshold has no tie band (``inf - inf`` is NaN, never within it)."""
    return math.isfinite(value) and (not math.isfinite(threshold) or abs(value - threshold) > TIE_RTOL * abs(threshold))


def compile_scorer(detector, device="cpu") -> LeanScorer:
    """Check ``detector`` once and compile its ``score`` into torch arithmetic on ``device``.

    Parameters
    ----------
    detector : fitted detector
    device : str or torch.device, default="cpu"
        Where the scorer's constants live: the guarded model's device.

    Returns
    -------
    LeanScorer
        Compiled for the kinds the module docstring lists; the detector's own
        ``score`` for every other kind (``compiled`` is then False).
    """
    fn = _compile(detector, torch.device(device))
    return LeanScorer(detector, fn, getattr(detector, "n_features_in_", None) if fn else None)


def _compile(detector, device, affine=None):
    """The torch function of ``detector``'s score, or None when it has no lean form (or is not fitted).

    ``affine``: ``(a, b)``, float64 arrays of shape (n_features,): the rows the
    detector sees are ``x * a + b`` (an enclosing scaler's), folded in here.
    """
    from pipeline.detectors import KNNL2, ClassConditionalMahalanobis, Standardized

    kind = type(detector)  # exact types: a subclass may score differently
    if kind is Standardized and _fitted(detector, "scaler_", "detector_"):
        a, b = _scaler_affine(detector.scaler_)
        return _compile(detector.detector_, device, (a, b) if affine is None else (affine[0] * a, affine[1] * a + b))
    if kind is ClassConditionalMahalanobis and _fitted(detector, "means_", "precision_"):
        return _mahalanobis(detector, device, affine)
    if kind is KNNL2 and _fitted(detector, "index_"):
        return _knn_l2(detector, device, affine)
    return None


def _fitted(detector, *attributes):
    return hasattr(detector, "n_features_in_") and all(hasattr(detector, a) for a in attributes)


def _tensor(array, device):
    return torch.as_tensor(np.ascontiguousarray(array, dtype=np.float64), device=device)


def _scaler_affine(scaler):
    """``StandardScaler.transform`` as ``x * a + b``: ``a = 1 / s``, ``b = -m / s``."""
    d = scaler.n_features_in_
    mean = np.asarray(scaler.mean_, dtype=np.float64) if scaler.with_mean else np.zeros(d)
    scale = np.asarray(scaler.scale_, dtype=np.float64) if scaler.with_std and scaler.scale_ is not None else np.ones(d)
    return 1.0 / scale, -mean / scale


def _elementwise(affine, device):
    """``x -> x * a + b`` on tensors, or None for no affine step."""
    if affine is None:
        return None
    a, b = _tensor(affine[0], device), _tensor(affine[1], device)
    return lambda x: torch.addcmul(b, x, a)


def _l2_normalise(x):
    """:func:`pipeline.detectors.l2_normalise` on a tensor."""
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + _EPS)


def _mahalanobis(det, device, affine):
    """``min_c |w - nu_c|^2`` with ``w = (z - c) L``, ``nu_c = (mu_c - c) L``, ``P = L L'``, clipped at 0.

    :func:`~pipeline.detectors.mahalanobis_scores` in whitened coordinates:
    ``(z - mu_c)' P (z - mu_c) = |w - nu_c|^2``, expanded as ``|w|^2 - 2 w nu_c'
    + |nu_c|^2``. Centring on the mean of the class means ``c`` keeps the
    expansion's terms small. Without L2 normalisation, an enclosing scaler
    ``z = x * a + b`` is folded into ``L`` and the offset, and the cross terms
    ``q_c = -2 w nu_c' + |nu_c|^2`` into the same product: a score is one
    matrix product ``[w, q] = x G + g``, a row minimum and a row norm.
    """
    if det.normalize not in (None, "none", "l2"):
        return None
    means = np.asarray(det.means_, dtype=np.float64)
    P = np.asarray(det.precision_, dtype=np.float64)
    if means.ndim != 2 or P.shape != (means.shape[1],) * 2 or means.shape[1] != det.n_features_in_:
        return None
    if not (np.isfinite(means).all() and np.isfinite(P).all()):  # a degenerate fit: its own score says what it says
        return None
    values, vectors = np.linalg.eigh((P + P.T) / 2)
    L = vectors * np.sqrt(np.clip(values, 0.0, None))  # P = L L' (round-off below 0 clipped)
    centre = means.mean(axis=0)
    nu = (means - centre) @ L
    l2 = det.normalize == "l2"
    pre = _elementwise(affine, device) if l2 else None
    a, b = (np.ones(len(P)), np.zeros(len(P))) if affine is None or l2 else affine
    W, w0 = a[:, None] * L, (b - centre) @ L
    cross, nu_sq = -2.0 * nu.T, np.einsum("kj,kj->k", nu, nu)
    G = np.ascontiguousarray(np.concatenate([W, W @ cross], axis=1))  # (C, d + n_classes)
    g = np.concatenate([w0, w0 @ cross + nu_sq])
    if not (np.isfinite(G).all() and np.isfinite(g).all()):  # overflow: the scalar twin needs finite constants
        return None
    d = W.shape[1]
    G_t, g_t = _tensor(G, device), _tensor(g, device)

    def score(x):
        if l2:
            x = _l2_normalise(x if pre is None else pre(x))
        wq = torch.addmm(g_t, x, G_t)
        w = wq[:, :d]
        return wq[:, d:].amin(dim=1).add_((w * w).sum(dim=1)).clamp_min_(0.0)

    if device.type == "cpu" and not l2:  # the deployed default (z-scored Mahalanobis) and the plain one
        score.numpy_twin = functools.partial(_whitened_min, G=G, g=g, d=d)
        score.scalar_one = functools.partial(_whitened_min_one, G=G_t, g=g_t, d=d)
    return score


def _whitened_min(x, G, g, d):
    """``score`` of :func:`_mahalanobis` in numpy: ``x`` (n, C) float32 or float64, on the calling thread.

    The product is made in row blocks of at most :data:`SERIAL_MACS` multiply-adds.
    """
    x = x.astype(np.float64)  # float32 -> float64 is exact
    block = max(1, SERIAL_MACS // G.size)
    if len(x) <= block:
        wq = x @ G
    else:
        wq = np.empty((len(x), G.shape[1]))
        for start in range(0, len(x), block):
            np.matmul(x[start:start + block], G, out=wq[start:start + block])
    wq += g
    w = wq[:, :d]
    out = wq[:, d:].min(axis=1)
    out += (w * w).sum(axis=1)
    return np.maximum(out, 0.0, out=out)


def _whitened_min_one(pooled, G, g, d) -> float:
    """:func:`_whitened_min` of one row ``pooled`` (1, C), a tensor, as a Python float (NaN stays NaN).

    One torch call for the product (``G``, ``g`` as tensors), then Python on
    its ``d + n_classes`` floats. Between the model's kernels this is cheaper
    than numpy: each numpy call, and each torch call beyond the one product,
    runs code the convolutions have evicted from the caches (about 40 us for
    the numpy twin of a digits ResNet layer at batch 1, against 5 us alone).
    A NaN or inf row makes the square norm NaN or inf, so the caller sees it
    (``G`` and ``g`` are finite: :func:`_mahalanobis` checks).
    """
    wq = torch.addmm(g, pooled.double(), G).tolist()[0]
    w = wq[:d]
    return max(min(wq[d:]) + sum(map(operator.mul, w, w)), 0.0)


def _knn_l2(det, device, affine):
    """Distance to the k-th nearest row of the normalised ID-train bank ``Z``: ``|z|^2 - 2 z Z' + |Z|^2``."""
    index = det.index_
    if getattr(index, "effective_metric_", None) != "euclidean" or getattr(index, "_fit_X", None) is None:
        return None
    bank = np.asarray(index._fit_X, dtype=np.float64)  # the normalised ID-train rows the index searches
    k = int(index.n_neighbors)
    if bank.ndim != 2 or bank.shape[1] != det.n_features_in_ or not 1 <= k <= len(bank):
        return None
    pre = _elementwise(affine, device)
    bank_t, bank_sq = _tensor(-2.0 * bank.T, device), _tensor(np.einsum("ij,ij->i", bank, bank), device)

    def score(x):
        z = _l2_normalise(x if pre is None else pre(x))
        d2 = torch.addmm(bank_sq, z, bank_t).kthvalue(k, dim=1).values
        return d2.add_((z * z).sum(dim=1)).clamp_min_(0.0).sqrt_()

    return score
