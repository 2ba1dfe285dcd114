"""The face of every network-level scorer, and the cached features it reads.

A scorer never sees the classifier. It reads a :class:`Features` bundle that the
feature store holds for one split: logits, the penultimate features, the final
linear layer (``head``), pooled activations per layer and, when extraction
stored them, the pooled gradients NAC-UE needs and what the opt-in
extraction-time methods kept (Gram row sums, ODIN's confidences, RankFeat's
logits).

Contract (scikit-learn style): ``__init__`` only stores its arguments;
``fit(features) -> self`` learns state ending in ``_`` from ID-train features;
``score(features) -> ndarray of shape (n_samples,)`` where **higher = more
OOD**. A scorer with per-layer parts may also expose ``score_layers(features)
-> {layer: (n_samples,)}``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from pipeline.errors import DataError


class LazyArrays(Mapping):
    """A read-only ``name -> ndarray`` mapping whose arrays are read on first access, then kept.

    What the store holds but only some scorers read (Gram row sums, RankFeat's
    logits) comes this way: a :class:`Features` bundle costs nothing for them
    until a scorer asks.

    Parameters
    ----------
    names : iterable of str
        The keys, in order.
    load : callable
        ``load(name) -> ndarray``.
    """

    def __init__(self, names, load):
        self._names, self._load, self._arrays, self._lock = tuple(names), load, {}, threading.Lock()

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        with self._lock:
            if name not in self._arrays:
                self._arrays[name] = self._load(name)
            return self._arrays[name]

    def __contains__(self, name):  # Mapping's own would read the array
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def __repr__(self):
        return f"LazyArrays({list(self._names)}, read: {sorted(self._arrays)})"


def _join_mappings(a, b):
    """Row-wise concatenation of the keys both hold; lazy when either is (nothing is read here)."""
    names = [k for k in a if k in b]
    if isinstance(a, LazyArrays) or isinstance(b, LazyArrays):
        return LazyArrays(names, lambda k: np.concatenate([a[k], b[k]]))
    return {k: np.concatenate([a[k], b[k]]) for k in names}


@dataclass(frozen=True)
class Features:
    """What the store holds for one split (arrays are read-only views).

    Attributes
    ----------
    logits : ndarray of shape (n_samples, n_classes), optional
    penultimate : ndarray of shape (n_samples, n_features), optional
        The input of the final linear layer.
    head_weight : ndarray of shape (n_classes, n_features), optional
    head_bias : ndarray of shape (n_classes,), optional
    layers : dict of str -> ndarray of shape (n_samples, n_channels)
        Pooled activations (mean over H, W), in network order.
    grads : dict of str -> ndarray of shape (n_samples, n_channels)
        Gradient of KL(uniform || softmax(logits)) w.r.t. the layer's output,
        summed over H, W (NAC-UE). Only layers extraction kept it for.
    spatial_size : dict of str -> int
        H * W of each layer's map (1 for vectors): the pooled mean times this
        is the sum over H, W.
    labels : ndarray of shape (n_samples,), optional
        Class labels (ID splits); -1 for OOD and auxiliary outliers.
    pred : ndarray of shape (n_samples,), optional
        The classifier's predicted class.
    maps : dict of str -> ndarray of shape (n_samples, C, H, W)
        Unpooled feature maps (``extract.maps``), float32. Read only for
        scorers that ask for them (``reads_maps``).
    images : ndarray of shape (n_samples, C, S, S), optional
        The input images as the classifier saw them (``extract.images``), float32.
    gram : mapping of str -> ndarray of shape (n_samples, n_powers, n_channels)
        Gram row sums of each ``extract.gram`` layer, one row per power of
        ``gram_powers`` (Sastry & Oore), float32 as stored; read when first accessed.
    gram_powers : tuple of int
        The powers of ``gram``'s second axis.
    odin : ndarray of shape (n_samples, n_temperatures, n_noises), optional
        ODIN's confidence (higher = more ID) for every pair of ``odin_grid``.
    odin_grid : tuple
        ``(temperatures, noises)``: the settings of ``odin``'s two last axes.
    rankfeat : mapping of str -> ndarray of shape (n_samples, n_classes)
        Logits with each ``extract.rankfeat`` layer's rank-1 part removed
        (RankFeat), float64; read when first accessed.
    """

    logits: np.ndarray | None = None
    penultimate: np.ndarray | None = None
    head_weight: np.ndarray | None = None
    head_bias: np.ndarray | None = None
    layers: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    spatial_size: dict = field(default_factory=dict)
    labels: np.ndarray | None = None
    pred: np.ndarray | None = None
    maps: dict = field(default_factory=dict)
    images: np.ndarray | None = None
    gram: Mapping = field(default_factory=dict)
    gram_powers: tuple = ()
    odin: np.ndarray | None = None
    odin_grid: tuple = ()
    rankfeat: Mapping = field(default_factory=dict)

    def require(self, *names, owner="scorer"):
        """Raise a one-line DataError unless every named field is present."""
        missing = [n for n in names if getattr(self, n) is None or (isinstance(getattr(self, n), Mapping)
                                                                     and not getattr(self, n))]
        if missing:
            raise DataError(f"{owner} needs {missing} from the feature store, which it does not hold. "
                            "Hint: check extract.head / extract.grad_layers / extract.maps / extract.images / "
                            "extract.gram / extract.odin / extract.rankfeat in params.yaml and rerun extract.")
        return tuple(getattr(self, n) for n in names)

    def concat(self, other: Features) -> Features:
        """The rows of ``self`` then those of ``other`` (the head is shared, so ``self``'s is kept).

        Fields present in only one of the two are dropped: the result holds
        what both hold (Gram and ODIN arrays only when both have the same
        powers, or the same grid). Lazy fields stay lazy.
        """
        def join(a, b):
            return None if a is None or b is None else np.concatenate([a, b])

        same_powers, same_grid = self.gram_powers == other.gram_powers, self.odin_grid == other.odin_grid
        return Features(
            logits=join(self.logits, other.logits), penultimate=join(self.penultimate, other.penultimate),
            head_weight=self.head_weight, head_bias=self.head_bias, layers=_join_mappings(self.layers, other.layers),
            grads=_join_mappings(self.grads, other.grads), spatial_size=dict(self.spatial_size),
            labels=join(self.labels, other.labels), pred=join(self.pred, other.pred),
            maps=_join_mappings(self.maps, other.maps), images=join(self.images, other.images),
            gram=_join_mappings(self.gram, other.gram) if same_powers else {},
            gram_powers=self.gram_powers if same_powers else (),
            odin=join(self.odin, other.odin) if same_grid else None, odin_grid=self.odin_grid if same_grid else (),
            rankfeat=_join_mappings(self.rankfeat, other.rankfeat),
        )


class BaseScorer(BaseEstimator):
    """Base class: ``fit(features) -> self``, ``score(features) -> (n,)``, higher = more OOD."""

    #: Params that :meth:`set_refit_free` can change on a fitted scorer (a search shares the fit).
    refit_free_params: tuple = ()
    #: Whether ``fit`` learns from ID-train features; when no configured scorer does, none are read.
    learns = False
    #: Whether the scorer reads unpooled maps and input images (large: read only when asked for).
    reads_maps = False
    #: Whether ``fit`` is a training run (the ``fit`` stage's job, saved with :meth:`save`), not a statistic.
    trained = False

    def set_refit_free(self, **params):
        """Change refit-free params of a fitted scorer in place; returns self."""
        raise NotImplementedError(f"{type(self).__name__} has no refit-free parameters")

    def fit_rows(self, labels):
        """ID-train rows ``fit`` reads, given ID-train's labels (n,): None means all of them."""
        return None

    #: scikit-learn style constraints on the params, checked by :meth:`check_params` before any data is read.
    _parameter_constraints: dict = {}

    def check_params(self, prefix="", owner=None):
        """Raise ``ConfigError`` on a bad hyperparameter (named after ``prefix``) before any work; returns self.

        Checks what can be checked without data (``_parameter_constraints``);
        bounds that depend on the data (a dimension below the feature count)
        are checked when fitting.
        """
        from pipeline.errors import check_constraints

        return check_constraints(self, prefix, owner or (prefix.split(".")[0] if prefix else type(self).__name__))

    def outlier_sets(self) -> tuple:
        """Auxiliary-outlier sets ``fit`` also learns from (their rows come with label -1); none by default."""
        return ()

    def outlier_rows(self, sizes: dict) -> dict:
        """Rows of each outlier set ``fit`` reads, given ``set -> n_rows``: all of them by default."""
        return {name: np.arange(n) for name, n in sizes.items()}

    def fit(self, features: Features, y=None):
        """Learn from ID-train features. The default learns nothing."""
        self.fitted_ = True
        return self

    def score(self, features: Features) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_layers(self, features: Features) -> dict:
        """Per-layer scores, for methods built from layers; none by default."""
        return {}

    def _check_fitted(self):
        check_is_fitted(self)
