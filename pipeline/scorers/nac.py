"""NAC-UE: neuron activation coverage (Liu et al., ICLR 2024).

The maths lives in pure functions (:func:`nac_thresholds`, :func:`neuron_states`,
:func:`histogram_counts`, :func:`coverage`, :func:`coverage_scores`,
:func:`balanced_subset`); :class:`NACScorer` wires them to a
:class:`~pipeline.scorers.base.Features` bundle.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np
from scipy.special import expit
from sklearn.utils._param_validation import Interval

from pipeline.errors import DataError, invalid_param
from pipeline.scorers.base import BaseScorer, Features

#: The per-layer settings of the reference's CIFAR-10 ResNet-18 config
#: (``configs/postprocessors/nac/resnet/nac_cifar10.yml`` of BierOne/ood_coverage).
#: Pass e.g. ``alpha={l: v["alpha"] for l, v in REFERENCE_CIFAR10.items()}``.
REFERENCE_CIFAR10 = {
    "avgpool": {"alpha": 100.0, "M": 50, "O": 50},
    "layer3": {"alpha": 1000.0, "M": 500, "O": 100},
    "layer2": {"alpha": 0.001, "M": 50, "O": 5},
    "layer1": {"alpha": 0.001, "M": 500, "O": 100},
}


def nac_thresholds(M, base=1e3):
    """The reference's log-spaced bin edges on [0, 1.2] (its ``logspace(1e3, M)``).

    With ``h = M // 2``: ``left = log_base(linspace(1, sqrt(base), h))`` runs
    from 0 to 0.5, ``right = (1 - left)[::-1]`` from 0.5 to 1; the edges are
    ``left[:-1]`` then ``right``, the last one raised to 1.01, then 1.2
    appended. That is ``2 h`` edges (= M for even M) and M - 1 intervals
    ``[e_t, e_{t+1})``: wide near 0 and 1 (saturated sigmoid), narrow around
    0.5 (``o * g`` near 0). The last interval, [1.01, 1.2), never holds a
    sigmoid value, so only M - 2 intervals can be covered.

    Parameters
    ----------
    M : int
        Number of edges; even and >= 4.
    base : float, default=1e3
        Base of the logarithm (the reference's 1e3).

    Returns
    -------
    thresholds : ndarray of shape (M,)
        Increasing bin edges.
    """
    left = np.log(np.linspace(1.0, np.sqrt(base), num=M // 2)) / np.log(base)
    edges = np.concatenate([left[:-1], (1.0 - left)[::-1]])
    edges[-1] += 1e-2
    return np.append(edges, 1.2)


def neuron_states(o, g, alpha):
    """NAC's neuron states ``s = sigmoid(alpha * o * g)``.

    Parameters
    ----------
    o : array-like of shape (n_samples, n_neurons)
        Layer output summed over H, W.
    g : array-like of shape (n_samples, n_neurons)
        Gradient of KL(uniform || softmax(logits)) w.r.t. the output, summed over H, W.
    alpha : float
        Steepness of the sigmoid.

    Returns
    -------
    states : ndarray of shape (n_samples, n_neurons)
        Values in [0, 1], float64.
    """
    o, g = np.asarray(o, dtype=np.float64), np.asarray(g, dtype=np.float64)
    if o.ndim != 2 or o.shape != g.shape:
        raise DataError(f"neuron_states expects o and g of one shape (n, C); got {o.shape} and {g.shape}.")
    return expit(alpha * o * g)


def bin_index(states, thresholds):
    """Index ``t`` of the interval with ``thresholds[t] <= s < thresholds[t + 1]``, or -1.

    Parameters
    ----------
    states : ndarray of shape (n_samples, n_neurons)
    thresholds : ndarray of shape (n_edges,)
        Increasing edges (one set shared by every neuron).

    Returns
    -------
    bins : ndarray of shape (n_samples, n_neurons), int
        -1 where the state lies outside every interval (or is NaN).
    """
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 2:
        raise DataError(f"states must be a 2-D array (n, C); got shape {states.shape}.")
    bins = np.searchsorted(thresholds, states, side="right") - 1
    bins[bins >= len(thresholds) - 1] = -1
    return bins


def histogram_counts(states, thresholds):
    """How many states fall in each interval, per neuron.

    Parameters
    ----------
    states : ndarray of shape (n_samples, n_neurons)
    thresholds : ndarray of shape (n_edges,)

    Returns
    -------
    counts : ndarray of shape (n_edges - 1, n_neurons), int64
        States outside every interval are not counted.
    """
    bins = bin_index(states, thresholds)
    n_bins, n_neurons = len(thresholds) - 1, bins.shape[1]
    rows, cols = np.nonzero(bins >= 0)
    flat = bins[rows, cols] * n_neurons + cols
    return np.bincount(flat, minlength=n_bins * n_neurons).reshape(n_bins, n_neurons)


def coverage(counts, O):
    """Coverage of each bin: ``min(count / O, 1)``.

    Parameters
    ----------
    counts : ndarray of shape (n_bins, n_neurons)
    O : float
        Positive count at which a bin counts as fully covered.

    Returns
    -------
    coverage : ndarray of shape (n_bins, n_neurons), in [0, 1]
    """
    return np.minimum(np.asarray(counts, dtype=np.float64) / O, 1.0)


def coverage_scores(states, thresholds, coverage):
    """NAC's ID-ness: mean over neurons of the coverage of each state's bin.

    ``ID(x) = (1 / C) * sum_c coverage[t_c(x), c]``, 0 for a state outside
    every bin. Higher = more in-distribution.

    Parameters
    ----------
    states : ndarray of shape (n_samples, n_neurons)
    thresholds : ndarray of shape (n_bins + 1,)
    coverage : ndarray of shape (n_bins, n_neurons)

    Returns
    -------
    scores : ndarray of shape (n_samples,)
    """
    bins = bin_index(states, thresholds)
    if coverage.shape != (len(thresholds) - 1, bins.shape[1]):
        raise DataError(f"coverage has shape {coverage.shape}; expected {(len(thresholds) - 1, bins.shape[1])}.")
    covered = coverage[np.maximum(bins, 0), np.arange(bins.shape[1])]
    return np.where(bins >= 0, covered, 0.0).mean(axis=1)


def balanced_subset(labels, n_train, seed):
    """Seeded class-balanced sample: ``min(n_train // n_classes, smallest class)`` per class.

    As the reference's ``TrainSubset(valid_num=n_train, balanced=True)``.
    Negative labels (OOD) are ignored.

    Parameters
    ----------
    labels : ndarray of shape (n_samples,)
    n_train : int
    seed : int or None

    Returns
    -------
    indices : ndarray of shape (n_chosen,)
        Sorted row indices, ``n_chosen <= n_train``.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    if len(classes) == 0:
        raise DataError("NACScorer.fit needs ID-train labels (>= 0); every label is negative.")
    if n_train < len(classes):
        raise invalid_param("n_train", "NACScorer", f"at least the number of classes ({len(classes)})", n_train,
                            hint="the fit subset takes an equal number of samples from every class.")
    per_class = min(n_train // len(classes), counts.min())
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen))


class NACScorer(BaseScorer):
    """Neuron activation coverage, NAC-UE (Liu, Tian, Ding & Zhang, ICLR 2024).

    For layer ``l`` with output ``o`` and gradient ``g`` of KL(uniform ||
    softmax(logits)), both summed over H, W, neuron states are
    ``s = sigmoid(alpha_l * o * g)``. The states of a class-balanced ID-train
    subset are binned per neuron into the M_l - 1 intervals of
    :func:`nac_thresholds`; a bin's coverage is ``min(count / O_l, 1)``.

    ``score_l(x) = -(1 / C_l) * sum_c coverage_l[bin(s_c(x)), c]`` and
    ``score(x) = mean_l score_l(x)``: the negated NAC-UE ID-ness ("Neuron
    Activation Coverage: Rethinking Out-of-distribution Detection and
    Generalization", ICLR 2024), so higher = more OOD.

    Parameters
    ----------
    layers : list of str, optional
        Layers to use; default every layer with stored gradients.
    alpha : float or dict of str -> float, default=100.0
        Sigmoid steepness (> 0), one for all layers or one per layer. The
        default is the reference's avgpool value; see :data:`REFERENCE_CIFAR10`.
    M : int or dict of str -> int, default=50
        Number of bin edges, even and >= 4 (M - 1 intervals).
    O : float or dict of str -> float, default=50
        Count (> 0) at which a bin is fully covered.
    n_train : int, default=1000
        Size of the class-balanced ID-train subset that builds the histograms.
    seed : int or None, default=0
        Seed of that subset.

    Attributes
    ----------
    layers_ : list of str
    alpha_, M_, O_ : dict of str -> number
        The per-layer values used.
    train_indices_ : ndarray of shape (n_chosen,)
        Rows of the ID-train features that built the histograms.
    thresholds_ : dict of str -> ndarray of shape (M_l,)
    counts_ : dict of str -> ndarray of shape (M_l - 1, C_l)
        Histograms; :func:`coverage` turns them into coverage for any O
        without refitting.
    coverage_ : dict of str -> ndarray of shape (M_l - 1, C_l)
    n_neurons_ : dict of str -> int
    """

    learns = True  # fit reads ID-train features

    #: Params a fitted scorer can change without refitting (the histograms do not depend on O).
    refit_free_params = ("O",)

    _parameter_constraints = {  # a value for every layer, or one per layer
        "alpha": [Interval(Real, 0, None, closed="neither"), dict],
        "M": [Interval(Integral, 1, None, closed="left"), dict],
        "O": [Interval(Integral, 1, None, closed="left"), dict],
        "n_train": [Interval(Integral, 1, None, closed="left")],
        "layers": [list, tuple, None],
        "seed": ["random_state"],
    }

    def __init__(self, *, layers=None, alpha=100.0, M=50, O=50, n_train=1000, seed=0):
        self.layers = layers
        self.alpha = alpha
        self.M = M
        self.O = O
        self.n_train = n_train
        self.seed = seed

    def fit(self, features: Features, y=None):
        """Build per-layer histograms of the states of a class-balanced ID-train subset.

        Parameters
        ----------
        features : Features
            ID-train features with ``grads``, ``layers``, ``spatial_size`` and ``labels``.

        Returns
        -------
        self : NACScorer
        """
        grads, labels = features.require("grads", "labels", owner="NACScorer")
        self.layers_ = self._check_layers(grads)
        self.alpha_ = self._per_layer("alpha", self.alpha, _positive_real, "a positive float")
        self.M_ = self._per_layer("M", self.M, _even_edges, "an even integer >= 4")
        self.O_ = self._per_layer("O", self.O, _positive_real, "a positive float")
        self.train_indices_ = balanced_subset(labels, _check_n_train(self.n_train), self.seed)
        self.thresholds_, self.counts_, self.coverage_, self.n_neurons_ = {}, {}, {}, {}
        for layer in self.layers_:
            states = self._states(features, layer, self.train_indices_)
            self.thresholds_[layer] = nac_thresholds(self.M_[layer])
            self.counts_[layer] = histogram_counts(states, self.thresholds_[layer])
            self.coverage_[layer] = coverage(self.counts_[layer], self.O_[layer])
            self.n_neurons_[layer] = states.shape[1]
        return self

    def fit_rows(self, labels):
        """The class-balanced subset: only these ID-train rows are read (and held) to fit."""
        return balanced_subset(labels, _check_n_train(self.n_train), self.seed)

    def set_refit_free(self, *, O):
        """Change O on a fitted scorer: coverage is recomputed from the kept histograms."""
        self._check_fitted()
        self.O = O
        self.O_ = self._per_layer("O", O, _positive_real, "a positive float")
        self.coverage_ = {layer: coverage(self.counts_[layer], self.O_[layer]) for layer in self.layers_}
        return self

    def score_layers(self, features: Features) -> dict:
        """Negated coverage per layer.

        Parameters
        ----------
        features : Features

        Returns
        -------
        scores : dict of str -> ndarray of shape (n_samples,)
            Higher = more OOD; values in [-1, 0].
        """
        self._check_fitted()
        features.require("grads", owner="NACScorer")
        out = {}
        for layer in self.layers_:
            states = self._states(features, layer)
            if states.shape[1] != self.n_neurons_[layer]:
                raise DataError(f"Layer {layer!r} has {states.shape[1]} neurons, but NACScorer was fitted "
                                f"with {self.n_neurons_[layer]}.")
            out[layer] = -coverage_scores(states, self.thresholds_[layer], self.coverage_[layer])
        return out

    def score(self, features: Features) -> np.ndarray:
        """Mean over layers of :meth:`score_layers`.

        Parameters
        ----------
        features : Features

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        return np.mean(np.stack(list(self.score_layers(features).values())), axis=0)

    def _states(self, features, layer, rows=None):
        """States ``sigmoid(alpha * o * g)`` of one layer, optionally for some rows only."""
        missing = [name for name in ("grads", "layers", "spatial_size") if layer not in getattr(features, name)]
        if missing:
            raise DataError(f"NACScorer needs layer {layer!r} in Features.{missing[0]}, which does not hold it.")
        rows = slice(None) if rows is None else rows
        o = np.asarray(features.layers[layer][rows], dtype=np.float64) * features.spatial_size[layer]
        return neuron_states(o, features.grads[layer][rows], self.alpha_[layer])

    def _check_layers(self, grads):
        """``layers`` as a list, each with stored gradients."""
        if self.layers is None:
            return list(grads)
        layers = self.layers
        if isinstance(layers, str) or not layers or any(name not in grads for name in layers):
            raise invalid_param("layers", "NACScorer", f"None or a non-empty list of names among {list(grads)}",
                                layers, hint="only layers listed in extract.grad_layers have gradients.")
        return list(layers)

    def _per_layer(self, name, value, is_valid, expected):
        """A scalar or a layer -> value mapping, as a checked dict over ``layers_``."""
        values = dict(value) if isinstance(value, Mapping) else dict.fromkeys(self.layers_, value)
        bad = [layer for layer in self.layers_ if layer not in values or not is_valid(values[layer])]
        if bad:
            raise invalid_param(name, "NACScorer", f"{expected}, or a dict giving one for each of {self.layers_}",
                                value, hint=f"the value for layer {bad[0]!r} is missing or invalid.")
        return {layer: values[layer] for layer in self.layers_}


def _positive_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and np.isfinite(x) and x > 0


def _even_edges(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 4 and x % 2 == 0


def _check_n_train(n_train):
    if not isinstance(n_train, numbers.Integral) or isinstance(n_train, bool) or n_train < 1:
        raise invalid_param("n_train", "NACScorer", "a positive integer", n_train)
    return int(n_train)
