"""NNGuide: the energy, guided by the similarity to confidence-scaled ID-train neighbours.

Park, Jung & Teoh (2023), "Nearest Neighbor Guidance for Out-of-Distribution
Detection", ICCV. Also holds the seeded bank subsample and the blockwise top-k
mean that Relation shares.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
from scipy.special import logsumexp
from sklearn.utils._param_validation import Interval

from pipeline.errors import DataError, invalid_param
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import head_logits, read_head

#: Entries of a (test rows x bank rows) block computed at once: 2**22 float64 = 32 MiB.
BLOCK_ENTRIES = 2 ** 22


def bank_rows(n_rows, bank_size, seed):
    """Seeded uniform sample of ``bank_size`` of ``n_rows`` rows (sorted); all of them when it is None or larger.

    Applying it twice with the same arguments keeps the first draw (a sample
    of ``bank_size`` rows is all kept), so ``fit_rows`` and ``fit`` agree.

    Parameters
    ----------
    n_rows : int
    bank_size : int or None
    seed : int or None

    Returns
    -------
    rows : ndarray of shape (min(n_rows, bank_size),)
    """
    if bank_size is None or bank_size >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, bank_size, replace=False))


def block_rows(n_bank):
    """How many query rows go in one block against a bank of ``n_bank`` rows (at least 1)."""
    return max(1, BLOCK_ENTRIES // max(n_bank, 1))


def l2_normalise(x):
    """Rows scaled to unit L2 norm; all-zero rows stay zero.

    Parameters
    ----------
    x : ndarray of shape (n_samples, n_features)

    Returns
    -------
    normalised : ndarray of shape (n_samples, n_features)
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)


def top_k_mean_similarity(queries, bank, k):
    """Mean of the ``k`` largest inner products of each query with the bank, in blocks of bounded memory.

    Parameters
    ----------
    queries : ndarray of shape (n_samples, n_features)
    bank : ndarray of shape (n_bank, n_features)
    k : int
        ``1 <= k <= n_bank``.

    Returns
    -------
    means : ndarray of shape (n_samples,)
    """
    out = np.empty(len(queries))
    step = block_rows(len(bank))
    for start in range(0, len(queries), step):
        sims = queries[start:start + step] @ bank.T
        out[start:start + step] = np.partition(sims, len(bank) - k, axis=1)[:, len(bank) - k:].mean(axis=1)
    return out


def nnguide_bank(a, logits):
    """The guide bank: L2-normalised ID features, each scaled by its energy confidence ``logsumexp(logits)``.

    Parameters
    ----------
    a : ndarray of shape (n_bank, n_features)
    logits : ndarray of shape (n_bank, n_classes)

    Returns
    -------
    bank : ndarray of shape (n_bank, n_features)
    """
    return l2_normalise(a) * logsumexp(logits, axis=1)[:, None]


def nnguide_scores(a, logits, bank, k):
    """Negated NNGuide, ``-logsumexp(logits) * mean top-k (normalise(a) . bank)``; higher = more OOD.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
    logits : ndarray of shape (n_samples, n_classes)
    bank : ndarray of shape (n_bank, n_features)
        From :func:`nnguide_bank`.
    k : int

    Returns
    -------
    scores : ndarray of shape (n_samples,)
    """
    return -logsumexp(logits, axis=1) * top_k_mean_similarity(l2_normalise(a), bank, k)


class NNGuideScorer(BaseScorer):
    """NNGuide (Park et al., ICCV 2023): energy times the similarity to a guided ID bank.

    ``fit``: a seeded sample of ``bank_size`` ID-train rows; bank entry
    ``g_i = (f_i / ||f_i||) * logsumexp(l_i)`` (feature ``f_i``, logits ``l_i``).
    Then, for a test feature ``f`` with logits ``l``:

    ``score(x) = -logsumexp(l) * mean of the k largest (f / ||f||) . g_i``

    The paper's score is higher = more ID; it is negated here. Follows OpenOOD
    v1.5's ``openood/postprocessors/nnguide_postprocessor.py`` (``configs/
    postprocessors/nnguide.yml``: ``K: 100``, ``alpha: 0.01``, sweep
    ``K_list: [100]``, ``alpha_list: [0.01]``), with a faiss ``IndexFlatIP``
    search there and an exact blockwise top-k here. Deviations: (i) OpenOOD's
    bank is the first batches of its (shuffled) train loader, about a fraction
    ``alpha = 1%`` of ID-train; here it is a seeded uniform sample of
    ``bank_size`` rows, a row count so that ``fit_rows`` (the pipeline reads
    only those rows) and ``fit`` agree; 500 is 1% of CIFAR's 50,000 (ImageNet-1K's
    1% is 12,811); (ii) OpenOOD's normaliser ``x / ||x|| + 1e-10`` adds 1e-10
    to every entry (a slip); here rows are divided by their norm, all-zero rows
    stay zero. The logits are the cached head's. Needs
    ``Features.penultimate``, ``head_weight`` and ``head_bias``.

    Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution
    Detection", ICCV 2023.

    Parameters
    ----------
    k : int, default=100
        Neighbours averaged, ``1 <= k <= bank rows``. Refit-free.
    bank_size : int or None, default=500
        ID-train rows in the bank; None keeps all of them.
    seed : int or None, default=0
        Seed of the bank sample.

    Attributes
    ----------
    bank_ : ndarray of shape (n_bank, n_features)
    train_indices_ : ndarray of shape (n_bank,)
        Rows of ID-train in the bank.
    n_features_in_ : int
    """

    learns = True  # fit reads ID-train features
    refit_free_params = ("k",)

    _parameter_constraints = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "bank_size": [Interval(Integral, 1, None, closed="left"), None],
        "seed": [Interval(Integral, 0, None, closed="left"), None],
    }

    def __init__(self, *, k=100, bank_size=500, seed=0):
        self.k = k
        self.bank_size = bank_size
        self.seed = seed

    def fit_rows(self, labels):
        """The bank's rows: only these ID-train rows are read to fit."""
        self.check_params(owner="NNGuide")
        return bank_rows(len(labels), self.bank_size, self.seed)

    def fit(self, features, y=None):
        """Build the guide bank from a seeded sample of ID features.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and ``head_bias`` (C,).
        y : ignored

        Returns
        -------
        self : NNGuideScorer
        """
        self.check_params(owner="NNGuide")
        a, weight, bias = read_head(features, "NNGuide")
        rows = bank_rows(len(a), self.bank_size, self.seed)
        self._check_k(self.k, len(rows))
        self.bank_ = nnguide_bank(a[rows], head_logits(a[rows], weight, bias))
        self.train_indices_ = rows
        self.n_features_in_ = a.shape[1]
        return self

    def set_refit_free(self, *, k):
        """Change ``k`` on a fitted scorer (the bank does not depend on it)."""
        self._check_fitted()
        self.k = k
        self.check_params(owner="NNGuide")
        self._check_k(k, len(self.bank_))
        return self

    def score(self, features):
        """Negated guided energy.

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
        a, weight, bias = read_head(features, "NNGuide", self.n_features_in_)
        return nnguide_scores(a, head_logits(a, weight, bias), self.bank_, self.k)

    @staticmethod
    def _check_k(k, n_bank):
        if n_bank < 1:
            raise DataError("NNGuide got no ID-train rows to build its bank from.")
        if k > n_bank:
            raise invalid_param("k", "NNGuide", f"an int in [1, {n_bank}] (at most the bank's {n_bank} rows)", k,
                                hint="lower k or raise bank_size.")
