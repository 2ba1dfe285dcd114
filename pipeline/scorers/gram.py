"""Gram matrices: per-class bounds of Gram row sums (Sastry & Oore, ICML 2020).

The statistics come from the store: extraction keeps, for each ``extract.gram``
layer and power p, ``sign(s) |s|^(1/p)`` with ``s`` the row sums of
``F^p (F^p)^T`` (:func:`pipeline.extract.gram_rowsums`). Reference code: the
authors' notebooks (``VectorInstitute/gram-ood-detection``,
``ResNet_Cifar10.ipynb``: ``G_p``, ``get_min_max``, ``get_deviations``,
``detect``), and OpenOOD v1.5's ``openood/postprocessors/gram_postprocessor.py``.
"""

from __future__ import annotations

import numbers
from numbers import Real

import numpy as np
from scipy.special import logsumexp
from sklearn.utils._param_validation import Interval

from pipeline.errors import ConfigError, DataError, invalid_param
from pipeline.scorers.base import BaseScorer, Features

EPS_BOUND = 1e-6  # the reference's |bound + 1e-6| denominators
EPS_EXPECTED = 1e-7  # the reference's validation.mean(axis=0) + 1e-7


def class_bounds(g, classes, n_classes):
    """Per-class minimum and maximum of Gram features over samples.

    Parameters
    ----------
    g : ndarray of shape (n_samples, n_powers, n_channels)
        In any float dtype (read as stored: no float64 copy of the whole array).
    classes : ndarray of shape (n_samples,)
        Each sample's class (the reference: the predicted class); rows with a
        negative class are left out (held out).
    n_classes : int

    Returns
    -------
    mins, maxs : ndarray of shape (n_classes, n_powers, n_channels), float64
        A class with no sample gets the bounds over all samples.
    empty : list of int
        Those classes.
    """
    g, classes = np.asarray(g), np.asarray(classes)
    mins, maxs = np.empty((2, n_classes, *g.shape[1:]))
    rows = [np.flatnonzero(classes == c) for c in range(n_classes)]
    empty = [c for c in range(n_classes) if not len(rows[c])]
    present = [c for c in range(n_classes) if len(rows[c])]
    if not present:
        raise DataError("GramScorer.fit needs ID-train rows with a class in [0, n_classes); it got none.")
    for c in present:
        mins[c], maxs[c] = g[rows[c]].min(axis=0), g[rows[c]].max(axis=0)
    mins[empty], maxs[empty] = mins[present].min(axis=0), maxs[present].max(axis=0)
    return mins, maxs, empty


def gram_deviations(g, mins, maxs):
    """Deviation of each sample from its bounds, per power (the paper's delta before normalisation).

    ``d_p(x) = sum_c relu(min_pc - g_pc) / |min_pc + 1e-6| + relu(g_pc - max_pc) / |max_pc + 1e-6|``,
    as the reference's ``get_deviations``.

    Parameters
    ----------
    g : ndarray of shape (n_samples, n_powers, n_channels)
    mins, maxs : ndarray of shape (n_samples, n_powers, n_channels)
        The bounds of each sample's class.

    Returns
    -------
    deviations : ndarray of shape (n_samples, n_powers)
        Non-negative; 0 inside the bounds.
    """
    below = np.maximum(mins - g, 0.0) / np.abs(mins + EPS_BOUND)
    above = np.maximum(g - maxs, 0.0) / np.abs(maxs + EPS_BOUND)
    return (below + above).sum(axis=2)


def max_softmax(logits):
    """``max_c softmax(logits)_c`` per row, shape (n_samples,)."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(logits.max(axis=1) - logsumexp(logits, axis=1))


def holdout_split(n, fraction, seed):
    """Seeded ``(held-out rows, bound rows)`` of ``n`` ID-train rows, both sorted and non-empty."""
    n_held = int(round(fraction * n))
    n_held = min(max(n_held, 1), n - 1)
    if n < 2:
        raise DataError(f"GramScorer.fit needs at least 2 ID-train samples (bounds and a held-out part); got {n}.")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_held]), np.sort(order[n_held:])


class GramScorer(BaseScorer):
    """Gram matrices (Sastry & Oore, ICML 2020): total normalised deviation from per-class bounds.

    With ``G_{L,p}(x)`` the stored Gram row sums of layer L at power p (C
    values), and ``c(x)`` the predicted class:

    - fit: ``min/max_{L,p,c}`` over ID-train samples predicted as class c, per
      channel (the authors' ``compute_minmaxs``, on ``train_preds``);
    - ``delta_L(x) = sum_p d_p(x) / conf(x)``, :func:`gram_deviations` against
      the bounds of ``c(x)``, divided by the max softmax probability ``conf``
      as the authors' code does (``confidence=True``);
    - ``score(x) = sum_L delta_L(x) / (E[delta_L] + 1e-7)`` (``normalize=True``):
      each layer's deviation over its mean on held-out ID data. Higher = more OOD.

    The reference takes ``E[delta_L]`` on a random 10% of the ID *test* set;
    here it is a seeded ``holdout`` fraction of ID-train, kept out of the
    bounds (fit reads ID-train only; a row inside the bounds it built would
    deviate by 0). OpenOOD v1.5's port differs and is not followed: it bounds
    by the true label, flattens the channels into one scalar bound per
    (class, layer, power) and does not normalise.

    The bounds and expectations are kept for every stored layer and power, so
    ``layers``, ``powers``, ``normalize`` and ``confidence`` change without
    refitting (:attr:`refit_free_params`): a search over them shares one fit.

    Parameters
    ----------
    layers : list of str, optional
        Layers summed; default every layer extraction kept (``extract.gram.layers``).
    powers : list of int, optional
        Powers summed; default every stored one (``extract.gram.powers``; the paper's 1..10).
    normalize : bool, default=True
        Divide each layer's deviation by its mean on held-out ID-train.
    confidence : bool, default=True
        Divide deviations by the max softmax probability (the authors' code).
    holdout : float, default=0.1
        Fraction of ID-train held out of the bounds, for the expectations.
    seed : int, default=0
        Seed of that split.

    Attributes
    ----------
    layers_, powers_ : list
        Every stored layer and power (what was fitted).
    mins_, maxs_ : dict of str -> ndarray of shape (n_classes, n_powers, n_channels)
    expected_, expected_conf_ : dict of str -> ndarray of shape (n_powers,)
        Mean held-out deviation per power, without and with the confidence division.
    empty_classes_ : list of int
        Classes no bound row was predicted as: they use the bounds over all rows.
    """

    learns = True
    refit_free_params = ("layers", "powers", "normalize", "confidence")

    _parameter_constraints = {
        "layers": [list, tuple, None],
        "powers": [list, tuple, None],
        "normalize": ["boolean"],
        "confidence": ["boolean"],
        "holdout": [Interval(Real, 0, 1, closed="neither")],
        "seed": ["random_state"],
    }

    def __init__(self, *, layers=None, powers=None, normalize=True, confidence=True, holdout=0.1, seed=0):
        self.layers = layers
        self.powers = powers
        self.normalize = normalize
        self.confidence = confidence
        self.holdout = holdout
        self.seed = seed

    def fit(self, features: Features, y=None):
        """Per-class bounds of every stored layer and power, and the held-out expectations.

        Parameters
        ----------
        features : Features
            ID-train, with ``gram``, ``gram_powers`` and ``logits``.

        Returns
        -------
        self : GramScorer
        """
        self.check_params()
        gram, logits = features.require("gram", "logits", owner="GramScorer")
        self.layers_, self.powers_ = list(gram), list(features.gram_powers)
        self._selection()
        held, _ = holdout_split(len(logits), float(self.holdout), self.seed)
        classes, conf = np.asarray(logits).argmax(axis=1), max_softmax(logits)
        bound_classes = classes.copy()
        bound_classes[held] = -1  # the held-out rows build no bound
        self.n_classes_ = logits.shape[1]
        self.mins_, self.maxs_, self.expected_, self.expected_conf_, empty = {}, {}, {}, {}, set()
        for layer in self.layers_:
            g = self._check_gram(gram[layer], layer)
            self.mins_[layer], self.maxs_[layer], missing = class_bounds(g, bound_classes, self.n_classes_)
            dev = gram_deviations(g[held], self.mins_[layer][classes[held]], self.maxs_[layer][classes[held]])
            self.expected_[layer], self.expected_conf_[layer] = dev.mean(axis=0), (dev / conf[held, None]).mean(axis=0)
            empty.update(missing)
        self.empty_classes_ = sorted(empty)
        return self

    def set_refit_free(self, **params):
        """Change ``layers``, ``powers``, ``normalize`` or ``confidence`` of a fitted scorer; returns self."""
        self._check_fitted()
        unknown = sorted(set(params) - set(self.refit_free_params))
        if unknown:
            raise ConfigError(f"GramScorer can change only {list(self.refit_free_params)} without refitting; "
                              f"got {unknown[0]!r}.")
        self.set_params(**params)
        self.check_params()
        self._selection()
        return self

    def score_layers(self, features: Features) -> dict:
        """Each chosen layer's deviation ``delta_L``, normalised when ``normalize``: ``layer -> (n_samples,)``."""
        self._check_fitted()
        gram, logits = features.require("gram", "logits", owner="GramScorer")
        if list(features.gram_powers) != self.powers_:
            raise DataError(f"GramScorer was fitted on Gram powers {self.powers_}, but these features hold "
                            f"{list(features.gram_powers)}. Hint: score features of the store it was fitted on.")
        layers, cols = self._selection()
        classes = np.asarray(logits).argmax(axis=1)
        conf = max_softmax(logits) if self.confidence else 1.0
        out = {}
        for layer in layers:
            if layer not in gram:
                raise DataError(f"GramScorer needs Gram features of layer {layer!r}, which these features lack.")
            g = self._check_gram(gram[layer], layer)[:, cols]
            mins, maxs = self.mins_[layer][:, cols], self.maxs_[layer][:, cols]
            delta = gram_deviations(g, mins[classes], maxs[classes]).sum(axis=1) / conf
            expected = (self.expected_conf_ if self.confidence else self.expected_)[layer][cols].sum()
            out[layer] = delta / (expected + EPS_EXPECTED) if self.normalize else delta
        return out

    def score(self, features: Features) -> np.ndarray:
        """Total deviation ``sum_L delta_L``; shape (n_samples,), higher = more OOD."""
        return np.sum(np.stack(list(self.score_layers(features).values())), axis=0)

    def _selection(self):
        """``(layers, power columns)`` chosen among the stored ones; a one-line DataError for one not extracted."""
        layers = self.layers_ if self.layers is None else _names(self.layers, "layers")
        powers = self.powers_ if self.powers is None else _names(self.powers, "powers")
        for kind, chosen, stored, where in (("layer", layers, self.layers_, "extract.gram.layers"),
                                            ("power", powers, self.powers_, "extract.gram.powers")):
            missing = [v for v in chosen if v not in stored]
            if missing:
                raise DataError(f"Gram features of {kind} {missing[0]!r} were not extracted: the store holds "
                                f"{kind}s {stored}. Hint: add it to {where} and rerun extract (Gram statistics "
                                "are computed from the full maps at extraction).")
        return list(layers), [self.powers_.index(p) for p in powers]

    def _check_gram(self, g, layer):
        g = np.asarray(g)  # as stored (float32): the bounds are float64, and so is every difference
        expected = (len(self.powers_), self.mins_[layer].shape[2]) if layer in getattr(self, "mins_", {}) else None
        if g.ndim != 3 or g.shape[1] != len(self.powers_) or (expected and g.shape[1:] != expected):
            raise DataError(f"Gram features of layer {layer!r} have shape {g.shape}; GramScorer expects "
                            f"(n_samples, {len(self.powers_)}, n_channels)"
                            + (f" with {expected[1]} channels (as fitted)." if expected else "."))
        if not np.isfinite(g).all():
            raise DataError(f"Gram features of layer {layer!r} hold non-finite values (NaN or inf).")
        return g


def _names(values, param):
    """A non-empty list from ``layers`` / ``powers`` (a lone value is a one-element list)."""
    values = [values] if isinstance(values, (str, numbers.Integral)) else list(values)
    if not values or len(set(values)) != len(values):
        raise invalid_param(param, "GramScorer", "None or a non-empty list of distinct stored values", values)
    return values
