"""Benchmarks over the user's own data sets: index files, not copies.

With ``generate.benchmark: sources`` (every preset in ``configs/`` but
``digits``), ``generate`` reads each configured data set once through
:func:`pipeline.sources.load_source`, chooses its samples and writes one
:class:`IndexSplit` per split: the chosen indices, their labels, how to load
the data set again, and a content signature of the files behind it. No image is
copied, and nothing written names ``generate.root``: loader arguments are
relative to it, and readers take the root from params when they open the data
(:func:`open_benchmark`), so the same data under another root is the same
benchmark, byte for byte (DVC reruns nothing when only the root moves).

Splits, as in the digits benchmark (so every later stage is the same):

* ``id_train``: the ID train part, capped at ``max_train`` (seeded, shuffled).
* ``id_val``/``id_test``: the ID test part, capped at ``max_test``, then cut
  into ``val_fraction`` for val and the rest for test.
* ``<set>_val``/``<set>_test`` for every near and far OOD set, capped at
  ``max_ood`` (or its own ``n``) and cut the same way. Hyperparameters are
  chosen on val halves; only test halves are reported.
* ``<set>_aux`` for every auxiliary-outlier set (``generate.aux``; seed 002's
  heatmap decoder trains on them): role and part ``"aux"``, labels ``-1``,
  capped like an OOD set and not cut. They are extracted like every split, but
  never reported (:func:`pipeline.report.ood_sets` takes near and far only), and
  ``GenerateConfig`` refuses one that reads a near/far or ID sample.

Caps are seeded uniform choices, never the first ``n`` of a class-sorted set
(METHODS.md), and each set draws from its own named random stream, so adding a
set never changes another one's samples.

:func:`open_benchmark` reads any benchmark directory back, digits (images in
``.npz``) or sources (index files), as torch datasets, after checking every file
it reads against the benchmark's manifest (:func:`pipeline.datasets.check_benchmark`)
and the data behind each index file against its signature.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import typing
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.datasets import (GENERATE_HINT, SplitDataset, _canonical_json, _check_name, _stream, check_benchmark,
                               load_split)
from pipeline.errors import DataError
from pipeline.fingerprint import HashCache
from pipeline.sources import EXPECTED_LAYOUT, data_signature, load_source, source_classes, source_targets

log = logging.getLogger(__name__)

BENCHMARK = "sources"
INDEX_SUFFIX = ".index.npz"
# `dvc repro generate` reruns generate when the data changed: it runs the
# always-changed `inputs` stage first, which fingerprints the files, and
# generate depends on that fingerprint (tests/test_e2e_inputs.py runs this hint).
REGENERATE_HINT = ("rerun generate with `dvc repro generate` (its inputs stage sees the changed files), or "
                   "`layerscope generate` outside DVC")
_INDEX_KEYS = ("name", "indices", "labels", "attrs")


@dataclass(frozen=True)
class IndexSplit:
    """One split of a ``sources`` benchmark: which samples of which data set.

    Attributes
    ----------
    name : str
        ``"id_train"``, ``"id_val"``, ``"id_test"``, ``"<set>_val"``, ``"<set>_test"`` or ``"<set>_aux"``.
    indices : ndarray of shape (n_samples,), int64
        Ascending positions in the uncapped data set.
    labels : ndarray of shape (n_samples,), int64
        The ID class of each sample; ``-1`` for OOD and auxiliary-outlier sets.
    attrs : dict
        As an :class:`~pipeline.datasets.ImageSplit`'s (``role``, ``set``,
        ``part``, ``source``, ``n_samples``, ``image_size``), plus ``loader``
        (the :func:`~pipeline.sources.load_source` arguments but ``root``) and
        ``signature`` (the files' content, see :func:`~pipeline.sources.data_signature`).
    """

    name: str
    indices: np.ndarray
    labels: np.ndarray
    attrs: dict

    kind: typing.ClassVar[str] = "index"

    def save(self, directory) -> pathlib.Path:
        """Write ``directory/<name>.index.npz`` (no pickles)."""
        _check_name(self.name)
        path = pathlib.Path(directory) / f"{self.name}{INDEX_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, name=np.array(self.name), indices=np.asarray(self.indices, np.int64),
                            labels=np.asarray(self.labels, np.int64), attrs=np.array(_canonical_json(self.attrs)))
        return path

    def fingerprint(self) -> str:
        """SHA-256 of the indices, labels and attrs (which hold the loader and the file signature)."""
        digest = hashlib.sha256()
        for array in (self.indices, self.labels):
            array = np.ascontiguousarray(array, dtype="<i8")
            digest.update(f"<i8{array.shape}".encode())
            digest.update(array.tobytes())
        digest.update(_canonical_json(self.attrs).encode())
        return digest.hexdigest()


def load_index(path) -> IndexSplit:
    """Read an index file written by :meth:`IndexSplit.save`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"Index file '{path}' does not exist. Hint: {GENERATE_HINT}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in _INDEX_KEYS}
        attrs = json.loads(str(arrays["attrs"]))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(f"Index file '{path}' is malformed ({exc}). Expected arrays {list(_INDEX_KEYS)}. "
                        f"Hint: {GENERATE_HINT}") from exc
    return IndexSplit(str(arrays["name"]), arrays["indices"], arrays["labels"], attrs)


# ------------------------------------------------------------------ generate

def _loader_args(cfg, spec) -> dict:
    """The :func:`load_source` arguments of one configured data set (without a cap, and without ``root``)."""
    return {"name": spec.source, "part": spec.part, "path": spec.path,
            "image_size": cfg.image_size, "channels": cfg.channels, "resize": cfg.resize,
            "seed": cfg.seed, "n": spec.n if spec.source == "constant" else None,
            "verify_checksums": cfg.verify_checksums}


def _open_source(loader: dict, root, download=False):
    return load_source(**loader, root=root, download=download)


def _choose(n_total, cap, rng) -> np.ndarray:
    """Ascending indices of a uniform choice of ``min(cap, n_total)`` samples."""
    if cap is None or cap >= n_total:
        return np.arange(n_total, dtype=np.int64)
    return np.sort(rng.choice(n_total, size=cap, replace=False)).astype(np.int64)


def _halves(indices, val_fraction, rng, what):
    """Split ``indices`` into (val, test) parts, each ascending and non-empty."""
    if len(indices) < 2:
        raise DataError(f"Data set {what} has {len(indices)} sample(s); at least 2 are needed for its val and "
                        "test parts. Hint: check its files, or raise its cap.")
    n_val = min(max(1, round(val_fraction * len(indices))), len(indices) - 1)
    order = rng.permutation(len(indices))
    return np.sort(indices[order[:n_val]]), np.sort(indices[order[n_val:]])


def _describe(loader, root=None) -> str:
    """The data set in a few words; ``root`` is named only in messages, never in what is written."""
    where = "" if root is None else f" under {root}"
    if loader["name"] == "imagefolder":
        return f"imagefolder {loader['path']}{where}"
    if loader["name"] == "constant":
        return "constant colours"
    return f"{loader['name']} ({loader['part']} part){where}"


def _signature(loader, root, dataset, indices, cache):
    return data_signature(loader["name"], root, loader["part"], dataset, indices, path=loader["path"], cache=cache)


def _split(cfg, name, set_name, part, role, indices, labels, loader, dataset, cache, extra=None):
    attrs = {"benchmark": BENCHMARK, "role": role, "set": set_name, "part": part, "source": _describe(loader),
             "n_samples": int(len(indices)), "image_size": loader["image_size"], "loader": loader,
             "signature": _signature(loader, cfg.root, dataset, indices, cache), **(extra or {})}
    return IndexSplit(name, indices, labels, attrs)


def _id_splits(cfg, cache):
    """``id_train``, ``id_val`` and ``id_test`` with the ID class list."""
    train_loader, test_loader = _loader_args(cfg, cfg.id_train), _loader_args(cfg, cfg.id_test)
    train_ds = _open_source(train_loader, cfg.root, cfg.download)
    test_ds = _open_source(test_loader, cfg.root, cfg.download)
    classes = source_classes(train_ds)
    train_y, test_y = source_targets(train_ds), source_targets(test_ds)
    if classes is None:
        classes = [str(c) for c in np.unique(train_y)]
    if source_classes(test_ds) not in (None, classes) or (len(test_y) and test_y.max() >= len(classes)):
        raise DataError(f"The ID test set {_describe(test_loader, cfg.root)} does not have the classes of the ID "
                        f"train set {_describe(train_loader, cfg.root)} ({len(classes)} classes). Hint: point "
                        "generate.id_test at the same data set's test part.")
    extra = {"classes": classes}
    train_idx = _choose(len(train_ds), cfg.id_train.n or cfg.max_train, _stream(cfg.seed, "id_train"))
    test_idx = _choose(len(test_ds), cfg.id_test.n or cfg.max_test, _stream(cfg.seed, "id_test"))
    val_idx, test_idx = _halves(test_idx, cfg.val_fraction, _stream(cfg.seed, "id_val"),
                                _describe(test_loader, cfg.root))
    return [
        _split(cfg, "id_train", "id", "train", "id", train_idx, train_y[train_idx], train_loader, train_ds, cache,
               extra),
        _split(cfg, "id_val", "id", "val", "id", val_idx, test_y[val_idx], test_loader, test_ds, cache, extra),
        _split(cfg, "id_test", "id", "test", "id", test_idx, test_y[test_idx], test_loader, test_ds, cache, extra),
    ]


def _ood_cap(cfg, spec):
    """The cap of an OOD or aux set: its own ``n`` (which sizes, not caps, ``constant``), else ``max_ood``."""
    return spec.n if spec.n is not None and spec.source != "constant" else cfg.max_ood


def _ood_splits(cfg, set_name, role, spec, cache):
    loader = _loader_args(cfg, spec)
    dataset = _open_source(loader, cfg.root, cfg.download)
    chosen = _choose(len(dataset), _ood_cap(cfg, spec), _stream(cfg.seed, f"ood/{set_name}"))
    val_idx, test_idx = _halves(chosen, cfg.val_fraction, _stream(cfg.seed, f"ood/{set_name}/val"),
                                f"'{set_name}' ({_describe(loader, cfg.root)})")
    return [_split(cfg, f"{set_name}_{part}", set_name, part, role, idx, np.full(len(idx), -1, np.int64), loader,
                   dataset, cache) for part, idx in (("val", val_idx), ("test", test_idx))]


def _aux_split(cfg, set_name, spec, cache):
    """``<set>_aux``: the chosen samples of one auxiliary-outlier set, whole (no val/test cut)."""
    loader = _loader_args(cfg, spec)
    dataset = _open_source(loader, cfg.root, cfg.download)
    chosen = _choose(len(dataset), _ood_cap(cfg, spec), _stream(cfg.seed, f"aux/{set_name}"))
    return _split(cfg, f"{set_name}_aux", set_name, "aux", "aux", chosen, np.full(len(chosen), -1, np.int64), loader,
                  dataset, cache)


def check_sources_present(cfg):
    """Raise one DataError naming every configured data set whose files are missing under ``generate.root``.

    Each is named by its parameter (``generate.far.texture``) with what it is
    and the layout expected; nothing is read (file names only, see
    :func:`pipeline.fingerprint.source_files`).
    """
    from pipeline.fingerprint import source_files

    sets = {"generate.id_train": cfg.id_train, "generate.id_test": cfg.id_test,
            **{f"generate.{role}.{name}": spec for name, (role, spec) in cfg.ood_sets.items()},
            **{f"generate.aux.{name}": spec for name, spec in cfg.aux.items()}}
    missing = []
    for param, spec in sets.items():
        found = source_files(spec.source, cfg.root, spec.part, spec.path)
        if found.missing:
            layout = EXPECTED_LAYOUT[spec.source].replace("PATH", spec.path or "PATH")
            missing.append(f"{param} ({spec.describe()}: expected {layout})")
    if missing:
        where = "" if os.path.isdir(cfg.root) else ", which does not exist"
        raise DataError(f"{len(missing)} of the {len(sets)} configured data sets are missing under generate.root "
                        f"'{cfg.root}'{where}: {'; '.join(missing)}. Hint: point generate.root at the data, put "
                        "the missing sets there, remove the sets you do not use, or set generate.download: true "
                        "(torchvision's sets, on a machine that is online).")


def make_source_benchmark(cfg) -> list[IndexSplit]:
    """Index every configured data set (``generate.benchmark: sources``).

    Parameters
    ----------
    cfg : pipeline.config.GenerateConfig
        With ``id_train``, ``id_test``, at least one near or far set, and any ``aux`` sets.

    Returns
    -------
    list of IndexSplit
        ``id_train``, ``id_val``, ``id_test``, then ``<set>_val``, ``<set>_test`` per OOD set,
        then ``<set>_aux`` per auxiliary-outlier set.

    Raises
    ------
    DataError
        A data set is missing (the message gives the expected layout under
        ``root``), too small, or the ID test set has other classes.
    """
    if not cfg.download:  # every missing set in one message, before any is read
        check_sources_present(cfg)
    with HashCache() as cache:
        splits = _id_splits(cfg, cache)
        for set_name, (role, spec) in cfg.ood_sets.items():
            splits += _ood_splits(cfg, set_name, role, spec, cache)
            log.info("indexed %s (%s): %d samples", set_name, role, sum(s.attrs["n_samples"] for s in splits[-2:]))
        for set_name, spec in cfg.aux.items():
            splits.append(_aux_split(cfg, set_name, spec, cache))
            log.info("indexed %s (aux): %d samples", set_name, splits[-1].attrs["n_samples"])
    return splits


# ------------------------------------------------------------------ read back

class IndexedDataset(torch.utils.data.Dataset):
    """The samples ``indices`` of ``base``, with the labels recorded at generate time.

    Items are ``(image, label)``: the base data set's image tensor (C, S, S) and
    the recorded ``int`` label (the ID class, or -1 for OOD).
    """

    def __init__(self, base, indices, labels):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64).tolist()
        self.labels = np.asarray(labels, dtype=np.int64).tolist()

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.base[self.indices[index]][0], self.labels[index]


def open_index_split(split: IndexSplit, what: str, root, cache: HashCache | None = None) -> IndexedDataset:
    """Reopen the data set behind ``split`` under ``root``, after checking its files' content is unchanged.

    Parameters
    ----------
    split : IndexSplit
    what : str
        How messages name the split, e.g. ``"'id_train'"``.
    root : str or path-like
        ``generate.root`` now: the data may have moved since generate.
    cache : pipeline.fingerprint.HashCache, optional
        Files unchanged since they were hashed are not read again.

    Raises
    ------
    DataError
        The data set has fewer samples than indexed, or its chosen files'
        names, sizes or content differ from those recorded by generate.
    """
    loader = split.attrs["loader"]
    base = _open_source(loader, root)
    if len(split.indices) and split.indices.max() >= len(base):
        raise DataError(f"Split {what} indexes sample {split.indices.max()} but {_describe(loader, root)} has "
                        f"{len(base)} samples: the data changed since generate. Hint: {REGENERATE_HINT}.")
    found = _signature(loader, root, base, split.indices, cache)
    if found != split.attrs["signature"]:
        raise DataError(f"The files behind split {what} ({_describe(loader, root)}) changed since generate (their "
                        f"content digest is {found['sha256'][:12]}, generate recorded "
                        f"{split.attrs['signature'].get('sha256', '?')[:12]}). Hint: {REGENERATE_HINT}.")
    return IndexedDataset(base, split.indices, split.labels)


@dataclass(frozen=True)
class BenchmarkSplit:
    """A split ready for the model: a torch dataset, its labels (n_samples,), attrs and fingerprint."""

    dataset: torch.utils.data.Dataset
    labels: np.ndarray
    attrs: dict
    fingerprint: str


def open_split(directory, name, entry, root=None, cache=None) -> BenchmarkSplit:
    """Open one split of a benchmark directory, whatever its kind.

    Parameters
    ----------
    directory : str or path-like
        A directory written by :func:`pipeline.datasets.write_benchmark`
        (checked by :func:`open_benchmark`; this reads the file as it is).
    name : str
        The split's name.
    entry : dict
        Its manifest entry (``file``, ``kind``, ``fingerprint``).
    root : str or path-like, optional
        The data root of an index split (``generate.root``); unused by image splits.
    cache : pipeline.fingerprint.HashCache, optional
    """
    path = pathlib.Path(directory) / entry["file"]
    kind = entry.get("kind", "images")
    if kind == "images":
        split = load_split(path)
        return BenchmarkSplit(SplitDataset(split), split.labels, split.attrs, entry["fingerprint"])
    if kind == "index":
        split = load_index(path)
        return BenchmarkSplit(open_index_split(split, f"'{name}'", root, cache), split.labels, split.attrs,
                              entry["fingerprint"])
    raise DataError(f"Split '{name}' in '{directory}' has unknown kind {kind!r}; expected 'images' or 'index'. "
                    f"Hint: {GENERATE_HINT}")


def data_root(params="params.yaml") -> str:
    """``generate.root`` from ``params``: where a sources benchmark's data is now (it is never written down)."""
    from pipeline.config import load_section

    return load_section("generate", params).root


def open_benchmark(directory, names=None, *, root=None, params="params.yaml") -> dict[str, BenchmarkSplit]:
    """Every split (or the ``names`` given) of a benchmark directory, sorted by name (the manifest's order).

    Every file read is first checked against the manifest generate sealed
    (:func:`pipeline.datasets.check_benchmark`): a split file replaced, edited
    or truncated by hand is refused, not read.

    Parameters
    ----------
    directory : str or path-like
    names : sequence of str, optional
        The splits to open; all when None.
    root : str or path-like, optional
        Where a sources benchmark's data sets are; ``generate.root`` of
        ``params`` when None (read only if an index split is opened).
    params : str, path-like or mapping, default="params.yaml"

    Raises
    ------
    DataError
        A requested split is absent, or the data behind an index file changed
        since ``generate``.
    IntegrityError
        A benchmark file is missing or differs from what generate wrote.
    """
    manifest = check_benchmark(directory, names)
    splits = manifest["splits"]
    names = list(names or splits)
    if root is None and any(splits[n].get("kind") == "index" for n in names):
        root = data_root(params)
    with HashCache() as cache:
        return {n: open_split(directory, n, splits[n], root, cache) for n in names}


def channel_stats(dataset, batch_size=256, num_workers=0) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a dataset's images, in one streamed pass.

    Sums are accumulated in float64, so the result does not depend on the batching.

    Returns
    -------
    mean, std : list of float
        One value per channel.
    """
    if hasattr(dataset, "rows"):
        batches = [dataset.rows(0, len(dataset))]
    else:
        batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    total = total_sq = None
    count = 0
    for x, _ in batches:
        x = x.to(torch.float64)
        sums, sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()
