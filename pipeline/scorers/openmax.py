"""OpenMax: Weibull-recalibrated logits with an explicit unknown class, from cached logits.

Bendale & Boult (2016), "Towards Open Set Deep Networks", CVPR.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy.optimize import brentq
from scipy.spatial.distance import cdist
from scipy.special import softmax
from scipy.stats import weibull_min
from sklearn.utils._param_validation import Interval, StrOptions

from pipeline.errors import DataError, invalid_param
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import check_matrix

#: libmr's ``MR()`` default shift: the tail is moved so that its smallest value sits at this.
TRANSLATE_AMOUNT = 1.0


def weibull_fit_high(tail):
    """libmr's ``FitHigh``: a 2-parameter Weibull MLE on the tail shifted to start at 1.

    libmr sorts the tail, keeps ``small = min(tail)``, fits ``scale, shape``
    by maximum likelihood (a port of MATLAB's ``wblfit``) to
    ``tail - small + 1``, and later evaluates the CDF at ``x - small + 1``.
    That is ``scipy.stats.weibull_min`` with the location fixed at
    ``small - 1`` (``weibull_min.fit(tail - small + 1, floc=0)`` finds the
    same MLE, to its optimiser's tolerance); here the MLE's shape equation
    ``sum x^k ln x / sum x^k - 1/k - mean(ln x) = 0`` is solved with Brent's
    method to machine precision. ``exponweib`` (a 4-parameter family) is not
    what libmr fits.

    Parameters
    ----------
    tail : ndarray of shape (n_tail,)
        The largest distances of a class, at least two distinct values.

    Returns
    -------
    shape : float
    scale : float
    small : float
        ``min(tail)``.
    """
    small = float(tail.min())
    log_x = np.log(tail - small + TRANSLATE_AMOUNT)
    top = log_x.max()

    def shape_equation(k):
        w = np.exp(k * (log_x - top))
        return (w * log_x).sum() / w.sum() - 1.0 / k - log_x.mean()

    lo, hi = 1.0, 1.0
    while shape_equation(lo) > 0:
        lo /= 2.0
    while shape_equation(hi) < 0:
        hi *= 2.0
    shape = brentq(shape_equation, lo, hi, xtol=1e-14, rtol=4 * np.finfo(float).eps)
    scale = np.exp(top + np.log(np.mean(np.exp(shape * (log_x - top)))) / shape)
    return float(shape), float(scale), small


def openmax_distances(logits, means, distance="euclidean", eu_weight=0.5):
    """Distance of every logit vector to every class's mean activation vector (scipy's definitions).

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)
    means : ndarray of shape (n_means, n_classes)
    distance : {"euclidean", "cosine", "eucos"}, default="euclidean"
        ``eucos`` = ``eu_weight * euclidean + cosine``.
    eu_weight : float, default=0.5

    Returns
    -------
    distances : ndarray of shape (n_samples, n_means)
    """
    if distance == "euclidean":
        return cdist(logits, means)
    if distance == "cosine":
        return cdist(logits, means, "cosine")
    return eu_weight * cdist(logits, means) + cdist(logits, means, "cosine")


def openmax_unknown(logits, w_scores, alpha):
    """OpenMax's unknown-class probability from the logits and their per-class Weibull CDFs.

    The ``alpha`` largest logits of a sample get weights ``(alpha - r) / alpha``
    (rank ``r = 0, 1, ...``), the others 0. With ``v_c = s_c * (1 - w_c * omega_c)``
    and ``v_0 = sum_c (s_c - v_c)``, the probabilities are ``softmax(v_1..v_C, v_0)``.

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)
    w_scores : ndarray of shape (n_samples, n_classes)
        The Weibull CDF of each sample's distance to each class's mean.
    alpha : int
        ``1 <= alpha <= n_classes``.

    Returns
    -------
    unknown : ndarray of shape (n_samples,)
        The unknown class's probability; higher = more OOD.
    """
    ranked = np.argsort(logits, axis=1)[:, ::-1][:, :alpha]
    omega = np.zeros_like(logits)
    np.put_along_axis(omega, ranked, (alpha - np.arange(alpha)) / alpha, axis=1)
    revised = logits * (1.0 - w_scores * omega)
    unknown = (logits - revised).sum(axis=1)
    return softmax(np.c_[revised, unknown], axis=1)[:, -1]


class OpenMaxScorer(BaseScorer):
    """OpenMax (Bendale & Boult, CVPR 2016): the unknown-class probability of recalibrated logits.

    ``fit`` on ID-train logits (activation vectors, AVs) and labels: per class
    ``c``, the mean AV ``mu_c`` of the samples labelled ``c`` and predicted
    ``c``; the ``tailsize`` largest distances of those AVs to ``mu_c``; a
    Weibull fit to them as libmr's ``FitHigh`` (:func:`weibull_fit_high`).
    Then, for logits ``s`` with ``w_c`` = the Weibull CDF of ``d(s, mu_c)``:

    ``v_c = s_c * (1 - w_c * omega_c)``, ``v_0 = sum_c s_c * w_c * omega_c``,
    ``score(x) = exp(v_0) / (exp(v_0) + sum_c exp(v_c))``

    with ``omega`` = ``(alpha - r) / alpha`` on the ``alpha`` top-ranked
    classes (rank ``r``), 0 elsewhere: higher = more OOD. Follows OpenOOD
    v1.5's ``openood/postprocessors/openmax_postprocessor.py``
    (``weibull_tail = 20``, ``weibull_alpha = 3``, hard-coded; its config
    ``configs/postprocessors/openmax.yml`` sets nothing used; one "channel",
    no crops). That code fits and scores with the **euclidean** distance
    (its helpers default to ``eucos`` with ``eu_weight = 0.5``, the paper's
    choice; ``distance='eucos'`` gives it). Deviations: (i) OpenOOD returns
    the *maximum* of the ``C + 1`` OpenMax probabilities as its ID confidence
    (``conf[:, -1]`` is commented out), which counts a confident unknown as
    ID; the unknown-class probability is returned here, the quantity the
    paper rejects on; (ii) the softmax is computed stably (OpenOOD's
    ``exp`` without the max subtracted overflows on large logits); (iii)
    libmr is replaced by :func:`weibull_fit_high`. Reads ``Features.logits``
    and, to fit, ``labels``.

    Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016.

    Parameters
    ----------
    tailsize : int, default=20
        Largest distances per class in the Weibull fit (fewer when a class
        has fewer correct samples, as OpenOOD's ``sort(...)[-tailsize:]``).
    alpha : int, default=3
        Top-ranked classes revised, ``1 <= alpha <= C``. Refit-free.
    distance : {"euclidean", "eucos", "cosine"}, default="euclidean"
    eu_weight : float, default=0.5
        Weight of the euclidean part of ``eucos`` (the original OSDN code
        uses 1/200).

    Attributes
    ----------
    means_ : ndarray of shape (n_classes, n_classes)
        Mean AV of each class.
    shape_, scale_, small_ : ndarray of shape (n_classes,)
        Each class's Weibull fit (``small_`` = the smallest tail distance).
    n_classes_ : int
    """

    learns = True  # fit reads ID-train logits and labels
    refit_free_params = ("alpha",)

    _parameter_constraints = {
        "tailsize": [Interval(Integral, 2, None, closed="left")],
        "alpha": [Interval(Integral, 1, None, closed="left")],
        "distance": [StrOptions({"euclidean", "eucos", "cosine"})],
        "eu_weight": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(self, *, tailsize=20, alpha=3, distance="euclidean", eu_weight=0.5):
        self.tailsize = tailsize
        self.alpha = alpha
        self.distance = distance
        self.eu_weight = eu_weight

    def fit(self, features, y=None):
        """Mean AV and Weibull tail fit of each class.

        Parameters
        ----------
        features : Features
            Needs ``logits`` (n_samples, C) and ``labels`` (n_samples,).
        y : ignored

        Returns
        -------
        self : OpenMaxScorer
        """
        self.check_params(owner="OpenMax")
        logits, labels = features.require("logits", "labels", owner="OpenMax")
        logits = check_matrix(logits, "logits", "OpenMax")
        _check_alpha(self.alpha, logits.shape[1])
        pred = logits.argmax(axis=1)
        correct = np.asarray(labels) == pred
        fits = [self._fit_class(logits[correct & (pred == c)], c) for c in range(logits.shape[1])]
        self.n_classes_ = logits.shape[1]
        self.means_ = np.array([f[0] for f in fits])
        self.shape_, self.scale_, self.small_ = (np.array([f[i] for f in fits]) for i in (1, 2, 3))
        return self

    def set_refit_free(self, *, alpha):
        """Change ``alpha`` on a fitted scorer (the Weibull fits do not depend on it)."""
        self._check_fitted()
        self.alpha = alpha
        self.check_params(owner="OpenMax")
        _check_alpha(alpha, self.n_classes_)
        return self

    def score(self, features):
        """The unknown class's OpenMax probability.

        Parameters
        ----------
        features : Features
            Needs ``logits`` (n_samples, C).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        self._check_fitted()
        self.check_params(owner="OpenMax")
        (logits,) = features.require("logits", owner="OpenMax")
        logits = check_matrix(logits, "logits", "OpenMax")
        if logits.shape[1] != self.n_classes_:
            raise DataError(f"OpenMax was fitted on {self.n_classes_} classes; got logits of {logits.shape[1]}.")
        _check_alpha(self.alpha, self.n_classes_)
        distances = openmax_distances(logits, self.means_, self.distance, self.eu_weight)
        w_scores = weibull_min.cdf(distances - self.small_ + TRANSLATE_AMOUNT, self.shape_, scale=self.scale_)
        return openmax_unknown(logits, w_scores, int(self.alpha))

    def _fit_class(self, avs, c):
        """(mean AV, shape, scale, small) of class ``c`` from its correctly classified AVs."""
        if len(avs) < 2:
            raise DataError(f"OpenMax needs at least 2 correctly classified ID-train samples of each class; class {c} "
                            f"has {len(avs)}.")
        mean = avs.mean(axis=0)
        tail = np.sort(openmax_distances(avs, mean[None], self.distance, self.eu_weight)[:, 0])[-self.tailsize:]
        if np.ptp(tail) == 0:
            raise DataError(f"OpenMax cannot fit a Weibull to class {c}'s tail: its {len(tail)} largest distances "
                            "to the mean are all equal.")
        return (mean, *weibull_fit_high(tail))


def _check_alpha(alpha, n_classes):
    if alpha > n_classes:
        raise invalid_param("alpha", "OpenMax", f"an int in [1, {n_classes}] (at most the number of classes)", alpha)
