"""Fit per-layer detectors on cached ID-train features, score cached splits.

Nothing here touches the classifier: detectors read ``(n_samples, n_features)``
arrays from the feature store. A fitted set is saved with the identity of the
store it was fitted on (its key and checkpoint), and refuses to score another
store (:mod:`pipeline.provenance`).

On disk (:func:`save_detectors`), a detectors directory is an artifact of
:mod:`pipeline.artifacts`: built aside, sealed last (every file's size and
SHA-256), published atomically. Each fitted detector is one file
(:mod:`pipeline.persist`: a plain-data archive for ours, else a skops file),
never a pickle, loaded from an allowlist of the
types our detectors are made of (:func:`trusted_types`). Every load checks
every file's SHA-256 against the seal: the files are small.

The per-layer energy (seed 000) needs no fitting: its scores are the store's
``energy`` array, one column per layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import pipeline._sklearn  # noqa: F401, I001  (before scikit-learn: it then comes without pandas, see there)
from sklearn.base import clone
from tqdm.auto import tqdm

from pipeline import artifacts, persist, provenance
from pipeline.detectors import make_detector
from pipeline.errors import DataError, IntegrityError, in_context, invalid_param
from pipeline.scorers import SCORERS, Features, make_scorer
from pipeline.scorers.base import LazyArrays
from pipeline.store import GRAD_PREFIX, GRAM_PREFIX, MAP_PREFIX, ODIN, RANKFEAT_PREFIX

log = logging.getLogger(__name__)

ENERGY = "energy"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 1: joblib pickles, no seal (refused)
SCORER_DIR = "methods"  # trained network-level methods, one folder each


def _is_detectors_manifest(path: Path, *, legacy=False) -> bool:
    """A ``manifest.json`` with a ``detectors`` key: a detectors directory, possibly from before seals.

    With ``legacy``: one written before seals (no ``format``: joblib pickles).
    """
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
        return "detectors" in manifest and not (legacy and "format" in manifest)
    except (OSError, ValueError, TypeError):
        return False


DETECTORS = artifacts.Kind("detectors directory", marker=_is_detectors_manifest,
                           hint="rerun `layerscope fit` (or `dvc repro -f -s fit`).")


@dataclass
class FittedDetectors:
    """Fitted detectors keyed by ``(detector name, layer)``, plus where their features came from.

    ``scorers`` holds the network-level methods that ``fit`` trains (``name ->
    scorer``, e.g. the heatmap decoder); ``detect`` scores with them as they are.

    Attributes
    ----------
    provenance : dict
        The store's provenance (its ``checkpoint_sha256`` among it).
    store_key : str or None
        The key of the store fitted on.
    digest : str or None
        The seal digest of the saved directory (its identity; thresholds
        record it), once saved or loaded.
    source : str or None
        The directory it was saved to or loaded from, for messages.
    """

    detectors: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    names: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    scorers: dict = field(default_factory=dict)
    store_key: str | None = None
    digest: str | None = None
    source: str | None = None

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.provenance.get("checkpoint_sha256")

    def check_compatible(self, store):
        """Refuse to score a store other than the one fitted on (checkpoint, then key), naming both hashes."""
        provenance.check_detectors_store(self, store)


def train_features(store, layer, *, max_samples=None, seed=0):
    """ID-train features of one layer and their labels, optionally subsampled (seeded)."""
    X, y = store.to_numpy("id_train", layer), store.to_numpy("id_train", "label")
    if max_samples is not None and len(X) > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(X), max_samples, replace=False))
        X, y = X[keep], y[keep]
    return X.astype(np.float64), y


def fit_detectors(store, detector_params: dict, *, standardize=True, max_samples=None, seed=0,
                  runner=None) -> FittedDetectors:
    """Fit every configured detector on every layer's ID-train features: one task per (layer, detector).

    Detectors that can (``supports_dask``: Mahalanobis, alone or standardised)
    are fitted out of core from the store, one shard at a time (:meth:`~pipeline.store.FeatureStore.sharded`).
    The others hold the layer's ID-train features in memory while they fit
    (PyOD's models, LA-OOD's OCSVM, KNN: their fit needs all rows at once).

    Parameters
    ----------
    store : FeatureStore
    detector_params : dict
        ``detector name -> params`` (e.g. ``{"knn": {"n_neighbors": 5}}``).
    standardize : bool
        Standardise each layer's features (fitted on ID-train) before the detector.
    max_samples : int, optional
        Fit on a seeded subsample of ID-train of at most this size (in memory).
    seed : int
    runner : pipeline.compute.Runner, optional
        Where the tasks run; default: this process, one task at a time.
    """
    from pipeline.compute import Runner

    # build all detectors first, so a bad name or param fails before any work
    prototypes = {name: make_detector(name, params or {}, standardize=standardize)
                  for name, params in detector_params.items()}
    fitted = FittedDetectors(layers=store.layers, names=list(prototypes), provenance=store.provenance,
                             store_key=store.key)
    job = FitJob(str(store.path), prototypes, max_samples, seed)
    tasks = [(name, layer) for layer in store.layers for name in prototypes]
    fanned = (runner or Runner()).map_unordered(job, tasks, desc="fit", unit="detector", threads=1)
    for task, detector in fanned:
        fitted.detectors[task] = detector
    return fitted


@dataclass(frozen=True)
class FitJob:
    """Fit one (detector, layer) pair, in whichever process runs it; returns the fitted detector."""

    store: str
    prototypes: dict
    max_samples: int | None
    seed: int

    def __call__(self, task):
        from pipeline.store import open_shared

        name, layer = task
        store = open_shared(self.store)
        detector = clone(self.prototypes[name])
        with in_context(f"Fitting fit.detectors.{name} on layer '{layer}' of split 'id_train' (store '{store.path}')"):
            if getattr(detector, "supports_dask", False) and self.max_samples is None:
                labels = store.to_numpy("id_train", "label")
                return detector.fit_dask(store.sharded("id_train", layer), labels if detector.requires_labels else None)
            X, y = train_features(store, layer, max_samples=self.max_samples, seed=self.seed)
            return detector.fit(X, y if detector.requires_labels else None)


def score_split(store, split: str, fitted: FittedDetectors) -> dict[str, np.ndarray]:
    """Scores of one split: ``method -> (n_samples, n_layers)``, layers in network order.

    Includes the per-layer ``energy`` read from the store. Higher = more OOD.
    """
    out = {name: np.empty((_n(store, split), len(fitted.layers))) for name in fitted.names}
    for j, layer in enumerate(fitted.layers):
        for start, block in store.iter_blocks(split, layer):
            for name in fitted.names:
                with in_context(f"Scoring layer '{layer}' of split '{split}' (store '{store.path}') with {name}"):
                    scores = fitted.detectors[name, layer].score(block.astype(np.float64))
                out[name][start:start + len(block), j] = scores
    energy = store.to_numpy(split, ENERGY)
    out[ENERGY] = energy[:, [store.layers.index(layer) for layer in fitted.layers]].astype(np.float64)
    return out


@dataclass(frozen=True)
class ScoreJob:
    """Score one split with the fitted detectors and scorers, in whichever process runs it.

    Returns ``(per-layer scores, method columns)``: :func:`score_split` and
    :func:`score_methods` of that split. The fitted detectors are loaded from
    ``detectors`` once per process; with ``digest``, they must still be the
    set the run started with (not republished by a ``fit`` meanwhile).
    """

    store: str
    detectors: str
    scorers: dict
    digest: str | None = None

    def __call__(self, split):
        from pipeline.store import open_shared

        store = open_shared(self.store)
        fitted = _cached_detectors(self.detectors)
        if self.digest is not None:
            provenance.require_same(
                provenance.Claim(f"the detectors '{self.detectors}'", "now have digest", fitted.digest),
                provenance.Claim("the ones this run started with", "had digest", self.digest),
                hint="they were replaced while scoring (a `layerscope fit` at the same time?); run detect again.")
        return score_split(store, split, fitted), score_methods(store, split, self.scorers)


_DETECTOR_CACHE: dict = {}


def _cached_detectors(directory):
    sealed = artifacts.read_seal(directory, missing_ok=True, damaged_ok=True) or {}
    key = (str(Path(directory).resolve()), sealed.get("digest"))  # a republished set has another digest
    if key not in _DETECTOR_CACHE:
        _DETECTOR_CACHE.clear()
        _DETECTOR_CACHE[key] = load_detectors(directory)
    return _DETECTOR_CACHE[key]


def score_splits(store, detectors_dir, scorers: dict, splits, *, runner=None, digest=None) -> dict:
    """``split -> (per-layer scores, method columns)`` for every split: one task per split (see :class:`ScoreJob`)."""
    from pipeline.compute import Runner

    job = ScoreJob(str(store.path), str(detectors_dir), scorers, digest)
    return dict((runner or Runner()).map_unordered(job, list(splits), desc="score", unit="split", threads=1))


def load_features(store, split: str, rows=None, *, maps=False) -> Features:
    """What the store holds for ``split`` (or some rows of it), as a :class:`Features` bundle (float64).

    Parameters
    ----------
    rows : (start, stop) or ndarray of int, optional
        A block of samples, or sorted row indices; the whole split when None.
    maps : bool, default=False
        Also read the unpooled maps and the input images (float32), if stored:
        they are far larger than the pooled features, so only scorers that
        ``reads_maps`` ask for them.

    Gram row sums and RankFeat's logits (``extract.gram``, ``extract.rankfeat``)
    come as :class:`~pipeline.scorers.base.LazyArrays`: read only when a scorer
    asks for them (the Gram arrays are ``n_powers`` times a layer's pooled
    features). ODIN's confidences, a few values per sample, are read when stored.
    """
    if rows is not None and not isinstance(rows, tuple):
        index = np.asarray(rows, dtype=np.int64)

        def read(name):
            return store.take(split, name, index)
    else:
        start, stop = rows if rows is not None else (0, _n(store, split))

        def read(name):
            return store.rows(split, name, start, stop)

    head = store.head() or {}
    layers = {layer: read(layer).astype(np.float64) for layer in store.layers}
    grads = {layer: read(f"{GRAD_PREFIX}{layer}").astype(np.float64) for layer in store.grad_layers}
    spatial = {layer: int(store.array(split, layer).attrs.get("spatial_size", 1)) for layer in store.layers}
    penultimate = read("penultimate").astype(np.float64) if store.has(split, "penultimate") else None
    logits = read("logits").astype(np.float64) if store.has(split, "logits") else None
    unpooled = {layer: read(f"{MAP_PREFIX}{layer}").astype(np.float32)
                for layer in store.provenance.get("maps", []) if maps and store.has(split, f"{MAP_PREFIX}{layer}")}
    images = read("image").astype(np.float32) if maps and store.has(split, "image") else None
    return Features(
        logits=logits, penultimate=penultimate,
        head_weight=head.get("weight"), head_bias=head.get("bias"), layers=layers, grads=grads,
        spatial_size=spatial, labels=read("label"), pred=read("pred") if store.has(split, "pred") else None,
        maps=unpooled, images=images, **_method_features(store, split, read),
    )


def _method_features(store, split, read) -> dict:
    """The opt-in extraction-time fields of :class:`Features` that ``split`` holds (none for a default store)."""
    names = store.array_names(split)

    def lazy(prefix, dtype):
        layers = [name[len(prefix):] for name in names if name.startswith(prefix)]
        return LazyArrays(layers, lambda layer: read(f"{prefix}{layer}").astype(dtype, copy=False))

    # Gram row sums stay float32 as stored: n_powers times a layer's pooled features
    out = {"gram": lazy(GRAM_PREFIX, np.float32), "rankfeat": lazy(RANKFEAT_PREFIX, np.float64)}
    if out["gram"]:
        out["gram_powers"] = tuple(int(p) for p in store.to_numpy(split, "gram_power"))
    if ODIN in names:
        out["odin"] = read(ODIN).astype(np.float64)
        out["odin_grid"] = (tuple(float(t) for t in store.to_numpy(split, "odin_temperature")),
                            tuple(float(e) for e in store.to_numpy(split, "odin_noise")))
    return out


def fit_scorers(store, method_params: dict, trained=None) -> dict:
    """Build every configured network-level scorer and fit it on ID-train features.

    When a configured scorer learns from ID-train (ReAct's percentile, ViM's
    principal subspace, NAC-UE's class-balanced histograms), this holds
    ID-train's features in memory: those fits need all of it at once. Scoring
    is out of core (:func:`score_methods`).

    Scorers whose fit is a training run (``trained``: the heatmap decoder) are
    not fitted here: they come from ``trained`` (``name -> scorer``, what the
    ``fit`` stage saved), and their params belong to ``fit.<name>``.
    """
    scorers = {name: make_scorer(name, params) for name, params in method_params.items()}
    trained = trained or {}
    for name, scorer in scorers.items():
        if scorer.trained:
            scorers[name] = _trained_scorer(name, method_params[name], trained)
    cache = {}
    to_fit = [s for s in scorers.values() if not s.trained]
    for scorer in tqdm(to_fit, desc="fit methods", unit="method", disable=None):
        fit_on_train(store, scorer, cache)
    return scorers


def _trained_scorer(name, params, trained):
    """The scorer ``fit`` trained as ``name``; one-line errors if it did not, or if params were given here."""
    if params:
        raise invalid_param(f"detect.methods.{name}", "detect", "{} (it is trained by the fit stage)", dict(params),
                            hint=f"set its parameters under fit.{name} instead.")
    if name not in trained:
        raise DataError(f"detect.methods lists '{name}', but the fit stage trained no {name} model. "
                        f"Hint: add a fit.{name} section to params.yaml and rerun fit (or `dvc repro`).")
    return trained[name]


def fit_on_train(store, scorer, cache=None, lock=None):
    """Fit one scorer on what it needs of ID-train (and its auxiliary outliers), and no more.

    MSP, MaxLogit, energy, SCALE and ASH learn nothing: nothing is read. NAC-UE
    reads its class-balanced subset only (``fit_rows``). ReAct and ViM read all
    of ID-train. The heatmap decoder also reads its maps and images, and the
    rows of its auxiliary-outlier sets (``outlier_sets``), labelled -1.
    ``cache`` (a dict) shares what was read between scorers; ``lock`` guards it
    when threads share it.
    """
    if not scorer.learns:
        return scorer.fit(Features())
    cache = {} if cache is None else cache
    rows = scorer.fit_rows(store.to_numpy("id_train", "label"))
    key = (scorer.reads_maps, None if rows is None else tuple(rows.tolist()))
    with lock or contextlib.nullcontext():
        if key not in cache:
            cache[key] = load_features(store, "id_train", rows, maps=scorer.reads_maps)
    features = cache[key]
    if scorer.outlier_sets():
        features = features.concat(load_outliers(store, scorer))
    scorer.fit(features)
    if rows is not None and hasattr(scorer, "train_indices_"):
        scorer.train_indices_ = rows[scorer.train_indices_]  # rows of the subset -> rows of ID-train
    return scorer


def outlier_splits(store, names) -> dict[str, str]:
    """``set -> split`` for auxiliary-outlier sets: the set's ``aux`` split, else its ``val`` half, never a test split.

    Raises
    ------
    DataError
        When a set has neither in the store.
    """
    by_set = {}
    for split in store.splits:
        attrs = store.split_attrs(split)
        usable = attrs.get("part") in ("aux", "val") and attrs.get("role") != "id"
        if usable and (attrs["set"] not in by_set or attrs["part"] == "aux"):  # an aux split wins over a val half
            by_set[attrs["set"]] = split
    missing = [name for name in names if name not in by_set]
    if missing:
        raise DataError(f"Auxiliary-outlier set {missing[0]!r} has no aux or val split in store '{store.path}'; "
                        f"sets that have one: {sorted(by_set)}. Hint: name one of those in aux_sets, or add it "
                        "under generate.aux and rerun generate and extract.")
    return {name: by_set[name] for name in names}


def load_outliers(store, scorer) -> Features:
    """The auxiliary-outlier rows ``scorer`` asks for, from every set of its ``outlier_sets()``, labelled -1."""
    splits = outlier_splits(store, scorer.outlier_sets())
    chosen = scorer.outlier_rows({name: _n(store, split) for name, split in splits.items()})
    parts = [load_features(store, splits[name], np.sort(np.asarray(rows, dtype=np.int64)), maps=scorer.reads_maps)
             for name, rows in chosen.items() if len(rows)]
    if not parts:
        raise DataError(f"{type(scorer).__name__} chose no auxiliary-outlier rows from {list(splits)}.")
    out = parts[0]
    for part in parts[1:]:
        out = out.concat(part)
    return dataclasses.replace(out, labels=np.full(len(out.labels), -1, dtype=np.int64))


def score_methods(store, split: str, scorers: dict) -> dict[str, dict[str, np.ndarray]]:
    """``method -> column -> (n,)``: per-layer parts (if any), then the method's own ``score``.

    Out of core: the split is read one shard of rows at a time (every fitted
    scorer scores each sample on its own), so memory holds one block of every
    array plus the (n,) scores.
    """
    if not scorers:
        return {}
    maps = any(scorer.reads_maps for scorer in scorers.values())
    parts = []
    for rows in store.block_ranges(split):
        features = load_features(store, split, rows, maps=maps)
        parts.append({name: {**scorer.score_layers(features), "score": scorer.score(features)}
                      for name, scorer in scorers.items()})
    return {name: {col: np.concatenate([p[name][col] for p in parts]) for col in parts[0][name]}
            for name in scorers}


def _n(store, split):
    return int(store.split_attrs(split)["n_samples"])


def save_detectors(fitted: FittedDetectors, directory) -> Path:
    """Write one file per (detector, layer), the trained scorers and ``manifest.json``; seal; publish.

    Built in a private staging directory and sealed last
    (:func:`pipeline.artifacts.seal`), then swapped in atomically under the
    artifact's lock: a reader sees the old set, the new one or none, never a
    mixture. Refuses (before writing) a ``directory`` that is not a detectors
    directory. The same fitted set always gives the same bytes (no clock, no
    pickles; :mod:`pipeline.persist`). Sets ``fitted.digest`` and
    ``fitted.source``: the identity the thresholds of ``calibrate`` record.
    """
    directory = artifacts.check_output(directory, DETECTORS)
    with artifacts.artifact_lock(directory, DETECTORS.name):
        staged = artifacts.staging_dir(directory)
        try:
            _write_detectors(fitted, staged)
            sealed = artifacts.seal(staged, DETECTORS)
            artifacts.publish_dir(staged, directory)
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # gone (published) unless something failed
    fitted.digest, fitted.source = sealed["digest"], str(directory)
    log.info("saved %d fitted detectors to %s (digest %s)", len(fitted.detectors), directory, sealed["digest"])
    return directory


def _write_detectors(fitted: FittedDetectors, directory: Path):
    files = {}
    for name in fitted.names:  # a fixed order, not the order the fits finished in
        for layer in fitted.layers:
            (directory / name).mkdir(exist_ok=True)
            written = persist.dump(fitted.detectors[name, layer], directory / name / layer, trusted_types())
            files.setdefault(name, {})[layer] = f"{name}/{written.name}"
    for name, scorer in sorted(fitted.scorers.items()):
        scorer.save(directory / SCORER_DIR / name)
    manifest = {"format": MANIFEST_FORMAT, "layers": fitted.layers, "detectors": fitted.names, "files": files,
                "store_key": fitted.store_key, "provenance": fitted.provenance,
                "scorers": {name: f"{SCORER_DIR}/{name}" for name in sorted(fitted.scorers)}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@functools.cache
def trusted_types() -> frozenset[str]:
    """The types a saved detector may contain beyond skops' defaults (builtins, numpy, sklearn estimators).

    Built from the registry: our detector classes, the PyOD models of
    ``PYOD_MODELS``, and the scikit-learn internals they hold (a tree's
    ``Tree``; a neighbours index and its distance metric). Anything else in a
    detector file is refused on load.
    """
    from sklearn.metrics._dist_metrics import METRIC_MAPPING64

    from pipeline import detectors

    ours = [cls for cls in vars(detectors).values()
            if isinstance(cls, type) and issubclass(cls, detectors.BaseDetector) and cls is not detectors.BaseDetector]
    pyod = [f"{module}.{name}" for module, name in detectors.PYOD_MODELS.values()]
    metrics = {f"{cls.__module__}.{cls.__name__}" for cls in METRIC_MAPPING64.values()}
    internals = ["sklearn.tree._tree.Tree", "sklearn.neighbors._kd_tree.KDTree",
                 "sklearn.neighbors._ball_tree.BallTree"]
    return frozenset([*(f"{cls.__module__}.{cls.__qualname__}" for cls in ours), *pyod, *metrics, *internals])


def read_manifest(directory) -> tuple[dict, dict]:
    """``(manifest.json, seal)`` of a detectors directory, after checking every file's SHA-256 against the seal.

    Raises
    ------
    DataError
        Nothing was fitted into ``directory``.
    IntegrityError
        Written by an older layerscope (joblib pickles: never loaded), or a
        file missing, truncated or altered.
    """
    directory = Path(directory)
    if not (directory / MANIFEST).is_file() and not (directory / artifacts.SEAL).is_file():
        from pipeline.files import what_is_at

        raise DataError(f"No fitted detectors in '{directory}': it {what_is_at(directory, MANIFEST)}. "
                        "Hint: run `layerscope fit` (or `dvc repro fit`).")
    if not (directory / artifacts.SEAL).exists() and _is_detectors_manifest(directory, legacy=True):
        raise IntegrityError(f"The detectors '{directory}' were written by an older layerscope, as joblib pickles "
                             "(which can run code when loaded): not loaded. Hint: " + DETECTORS.hint)
    sealed = artifacts.check_sealed(directory, DETECTORS, deep=True)  # small files: hash them all
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    except (ValueError, AttributeError) as exc:
        raise IntegrityError(f"The detectors '{directory}' have an unreadable {MANIFEST} ({exc}). "
                             f"Hint: {DETECTORS.hint}") from None
    return manifest, sealed


def load_detectors(directory, scorers=(), only=None) -> FittedDetectors:
    """Load what :func:`save_detectors` wrote, after checking every file against the seal.

    Of the trained network-level methods, only those named in ``scorers`` that
    were saved are loaded (the heatmap decoder needs torch: nothing else does).
    With ``only`` (detector names), only those detectors are loaded: the guard's
    one need not import skops for the PyOD ones. ``names`` still lists every
    fitted detector, and every file is still checked against the seal.

    Raises
    ------
    DataError
        Nothing was fitted into ``directory``.
    IntegrityError
        The directory is damaged, from an older layerscope, or holds a file
        that is not a detector file of our detectors' types (one line naming it).
    """
    directory = Path(directory)
    manifest, sealed = read_manifest(directory)
    detectors = {(name, layer): _load_one(directory / rel)
                 for name, per_layer in manifest["files"].items() if only is None or name in only
                 for layer, rel in per_layer.items()}
    trained = {name: SCORERS[name][0].load(directory / rel) for name, rel in manifest["scorers"].items()
               if name in scorers}
    return FittedDetectors(detectors, manifest["layers"], manifest["detectors"], manifest["provenance"], trained,
                           store_key=manifest["store_key"], digest=sealed["digest"], source=str(directory))


def _load_one(path):
    try:  # a file from before a detector gained a parameter lacks it: refuse it rather than fail mid-score
        detector = persist.load(path, trusted_types(), hint=f"this is not a detector `layerscope fit` wrote; "
                                                            f"{DETECTORS.hint}")
        _check_params_present(detector)
    except AttributeError as exc:
        raise IntegrityError(f"Detector file '{path}' was written by an older layerscope ({exc}). Hint: "
                             f"{DETECTORS.hint}") from None
    return detector


def _check_params_present(estimator):
    """Raise AttributeError unless ``estimator`` and every estimator it holds (fitted ones too) has all its params."""
    from sklearn.base import BaseEstimator

    estimator.get_params(deep=False)  # reads every constructor parameter
    for value in vars(estimator).values():
        if isinstance(value, BaseEstimator):
            _check_params_present(value)


def verify_detectors(directory) -> dict:
    """Check a detectors directory completely: every file's SHA-256, then load every detector and trained method.

    For :command:`layerscope verify`. Raises what :func:`load_detectors`
    raises; returns a summary.

    Returns
    -------
    dict
        ``kind``, ``path``, ``digest``, ``files`` (count), ``detectors``,
        ``layers``, ``methods`` and the ``checkpoint_sha256`` and ``store_key``
        fitted on.
    """
    fitted = load_detectors(directory, scorers=tuple(SCORERS))  # every file's SHA-256, every detector, every method
    sealed = artifacts.read_seal(directory)
    return {"kind": DETECTORS.name, "path": str(directory), "digest": fitted.digest, "files": len(sealed["files"]),
            "detectors": fitted.names, "layers": fitted.layers, "methods": sorted(fitted.scorers),
            "checkpoint_sha256": fitted.checkpoint_sha256, "store_key": fitted.store_key}
