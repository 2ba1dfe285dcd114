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

Separate val sets, as OpenOOD v1.5 holds them out, keep its test lists whole:

* with ``generate.id_val``, ``id_val`` is that set (capped at ``max_test`` or
  its own ``n``) and ``id_test`` the whole (capped) ID test set: no cut;
* with ``generate.ood_val``, each of its sets is one ``<set>_val`` split (role
  :data:`pipeline.roles.OOD_VAL`, part ``"val"``, labels ``-1``), which
  :func:`pipeline.report.ood_sets` takes as the val sets of both groups, and
  every near/far set is one whole ``<set>_test`` split.

Data sets may be OpenOOD's image lists (source ``imglist``): an ID list's
labels are its classes, ``0..max label``; an OOD list's labels are ignored (-1).

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

from pipeline.datasets import (
    GENERATE_HINT,
    _canonical_json,
    _check_name,
    _stream,
    check_benchmark,
    load_split,
)
from pipeline.errors import DataError
from pipeline.fingerprint import HashCache
from pipeline.roles import OOD_VAL

# pipeline.sources (torchvision) is imported where the user's data sets are read: a digits benchmark never needs it

log = logging.getLogger(__name__)

BENCHMARK = "sources"
INDEX_SUFFIX = ".index.npz"
# `dvc repro generate` reruns generate when the data changed: it runs the
# always-changed `inputs` stage first, which fingerprints the files, and
# generate depends on that fingerprint (tests/test_e2e_inputs.py runs this hint).
REGENERATE_HINT = ("rerun generate with `dvc repro generate` (its inputs stage sees the changed files), or "
                   "`layerscope generate` outside DVC")
_INDEX_KEYS = ("name", "indices", "labels", "attrs")


class SplitDataset(torch.utils.data.Dataset):
    """A torch ``Dataset`` over an :class:`~pipeline.datasets.ImageSplit` (here, not in :mod:`pipeline.datasets`,
    so that building and checking the digits benchmark never imports torch).

    Parameters
    ----------
    split : ImageSplit
        The split to serve.

    Notes
    -----
    ``__getitem__`` returns ``(image, label)``: a float32 tensor of shape
    (n_channels, image_size, image_size) and a Python ``int``.
    """

    def __init__(self, split):
        self.split = split
        # One conversion up front; np.require copies only if the array is
        # read-only or non-contiguous, which torch.from_numpy cannot share.
        images = np.require(split.images, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
        self._images = torch.from_numpy(images)
        self._labels = [int(label) for label in split.labels]

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, index):
        return self._images[index], self._labels[index]

    def rows(self, start, stop):
        """Rows ``[start, stop)`` at once: images (n, C, S, S) and labels (n,).

        Extraction reads in-memory splits by slicing rather than item by item.
        """
        return self._images[start:stop], torch.as_tensor(self._labels[start:stop], dtype=torch.int64)


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
    """The :func:`load_source` arguments of one configured data set (without a cap, and without ``root``).

    ``list_file`` is there for an image list only, so that the index files of
    other sources (and their fingerprints) are what they were before image lists.
    """
    loader = {"name": spec.source, "part": spec.part, "path": spec.path,
              "image_size": cfg.image_size, "channels": cfg.channels, "resize": cfg.resize,
              "seed": cfg.seed, "n": spec.n if spec.source == "constant" else None,
              "verify_checksums": cfg.verify_checksums}
    return {**loader, "list_file": spec.list} if spec.source == "imglist" else loader


def _open_source(loader: dict, root, download=False):
    from pipeline.sources import load_source

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
    if loader["name"] == "imglist":
        return f"imglist {loader['list_file']}{where}"
    if loader["name"] == "constant":
        return "constant colours"
    return f"{loader['name']} ({loader['part']} part){where}"


def _signature(loader, root, dataset, indices, cache):
    from pipeline.sources import data_signature

    return data_signature(loader["name"], root, loader["part"], dataset, indices, path=loader["path"], cache=cache,
                          list_file=loader.get("list_file"))


def _split(cfg, name, set_name, part, role, indices, labels, loader, dataset, cache, extra=None):
    attrs = {"benchmark": BENCHMARK, "role": role, "set": set_name, "part": part, "source": _describe(loader),
             "n_samples": int(len(indices)), "image_size": loader["image_size"], "loader": loader,
             "signature": _signature(loader, cfg.root, dataset, indices, cache), **(extra or {})}
    return IndexSplit(name, indices, labels, attrs)


class _IdSet:
    """One opened ID data set: its loader arguments, dataset and every sample's label."""

    def __init__(self, cfg, spec):
        from pipeline.sources import source_targets

        self.loader = _loader_args(cfg, spec)
        self.dataset = _open_source(self.loader, cfg.root, cfg.download)
        self.labels = source_targets(self.dataset)
        self.what = _describe(self.loader, cfg.root)


def _id_classes(train: _IdSet) -> list:
    """The ID class names: the source's own, else ``"0".."max label"`` (SVHN, an image list)."""
    from pipeline.sources import source_classes

    classes = source_classes(train.dataset)
    if classes is not None:
        return classes
    return [str(c) for c in range(int(train.labels.max()) + 1 if len(train.labels) else 0)]


def _check_id_labels(name, part, ids: _IdSet, classes, train: _IdSet):
    """Refuse an ID set with a negative label (an OOD list), or with other classes than ID-train's."""
    from pipeline.sources import source_classes

    if len(ids.labels) and ids.labels.min() < 0:
        at = int(np.argmin(ids.labels))
        raise DataError(f"The ID {part} set {ids.what} has label {int(ids.labels[at])} at sample {at}: expected "
                        f"class indices 0..{max(len(classes) - 1, 0)} (an OOD list's -1 is not a class). Hint: point "
                        f"generate.{name} at an ID data set (OpenOOD: benchmark_imglist/<id>/{part}_<id>.txt).")
    if ids is not train and (source_classes(ids.dataset) not in (None, classes)
                             or (len(ids.labels) and ids.labels.max() >= len(classes))):
        raise DataError(f"The ID {part} set {ids.what} does not have the classes of the ID train set {train.what} "
                        f"({len(classes)} classes). Hint: point generate.{name} at the same data set's "
                        f"{part} part{' or list' if name == 'id_val' else ''}.")


def _id_splits(cfg, cache):
    """``id_train``, ``id_val`` and ``id_test`` with the ID class list.

    ID-val is a ``val_fraction`` cut of the ID test set, or the separate
    ``generate.id_val`` set, whole (the test set is then whole too).
    """
    train, test = _IdSet(cfg, cfg.id_train), _IdSet(cfg, cfg.id_test)
    val = None if cfg.id_val is None else _IdSet(cfg, cfg.id_val)
    classes = _id_classes(train)
    for name, part, ids in (("id_train", "train", train), ("id_test", "test", test), ("id_val", "val", val)):
        if ids is not None:
            _check_id_labels(name, part, ids, classes, train)
    extra = {"classes": classes}
    train_idx = _choose(len(train.dataset), cfg.id_train.n or cfg.max_train, _stream(cfg.seed, "id_train"))
    test_idx = _choose(len(test.dataset), cfg.id_test.n or cfg.max_test, _stream(cfg.seed, "id_test"))
    if val is None:
        val, (val_idx, test_idx) = test, _halves(test_idx, cfg.val_fraction, _stream(cfg.seed, "id_val"), test.what)
    else:
        val_idx = _choose(len(val.dataset), cfg.id_val.n or cfg.max_test, _stream(cfg.seed, "id_val"))
    return [_split(cfg, f"id_{part}", "id", part, "id", idx, ids.labels[idx], ids.loader, ids.dataset, cache, extra)
            for part, ids, idx in (("train", train, train_idx), ("val", val, val_idx), ("test", test, test_idx))]


def _ood_cap(cfg, spec):
    """The cap of an OOD or aux set: its own ``n`` (which sizes, not caps, ``constant``), else ``max_ood``."""
    return spec.n if spec.n is not None and spec.source != "constant" else cfg.max_ood


def _ood_splits(cfg, set_name, role, spec, cache):
    """``<set>_val`` and ``<set>_test`` of a near/far set; ``<set>_test`` whole when ``generate.ood_val`` is set."""
    loader = _loader_args(cfg, spec)
    dataset = _open_source(loader, cfg.root, cfg.download)
    chosen = _choose(len(dataset), _ood_cap(cfg, spec), _stream(cfg.seed, f"ood/{set_name}"))
    if cfg.ood_val:
        parts = [("test", chosen)]
    else:
        parts = zip(("val", "test"), _halves(chosen, cfg.val_fraction, _stream(cfg.seed, f"ood/{set_name}/val"),
                                             f"'{set_name}' ({_describe(loader, cfg.root)})"))
    return [_split(cfg, f"{set_name}_{part}", set_name, part, role, idx, np.full(len(idx), -1, np.int64), loader,
                   dataset, cache) for part, idx in parts]


def _ood_val_split(cfg, set_name, spec, cache):
    """``<set>_val``: the chosen samples of one separate OOD val set, whole (role ``ood_val``, never reported)."""

    loader = _loader_args(cfg, spec)
    dataset = _open_source(loader, cfg.root, cfg.download)
    chosen = _choose(len(dataset), _ood_cap(cfg, spec), _stream(cfg.seed, f"ood_val/{set_name}"))
    return _split(cfg, f"{set_name}_val", set_name, "val", OOD_VAL, chosen, np.full(len(chosen), -1, np.int64),
                  loader, dataset, cache)


def _aux_split(cfg, set_name, spec, cache):
    """``<set>_aux``: the chosen samples of one auxiliary-outlier set, whole (no val/test cut)."""
    loader = _loader_args(cfg, spec)
    dataset = _open_source(loader, cfg.root, cfg.download)
    chosen = _choose(len(dataset), _ood_cap(cfg, spec), _stream(cfg.seed, f"aux/{set_name}"))
    return _split(cfg, f"{set_name}_aux", set_name, "aux", "aux", chosen, np.full(len(chosen), -1, np.int64), loader,
                  dataset, cache)


def _absent(spec, found) -> str:
    """What is missing of one data set, for :func:`check_sources_present`: the whole set, or some listed images."""
    if spec.source != "imglist":
        return ""
    if not found.files:
        return "the list file is missing; "
    return (f"{len(found.missing)} of the {len(found.files) - 1 + len(found.missing)} images it names are missing, "
            f"e.g. '{found.missing[0]}'; ")


def check_sources_present(cfg):
    """Raise one DataError naming every configured data set whose files are missing under ``generate.root``.

    Each is named by its parameter (``generate.far.texture``) with what it is
    and the layout expected; nothing is read (file names only, see
    :func:`pipeline.fingerprint.source_files`), but image lists, which name
    the images: a missing list, or images it names that are missing, are
    reported the same way, and a malformed list is an error naming its parameter.
    """
    from pipeline.errors import in_context
    from pipeline.fingerprint import source_files
    from pipeline.sources import EXPECTED_LAYOUT

    sets = cfg.specs
    missing = {}
    for param, spec in sets.items():
        with in_context(param):
            found = source_files(spec.source, cfg.root, spec.part, spec.path, spec.list)
        if found.missing:
            layout = EXPECTED_LAYOUT[spec.source].replace("PATH", spec.path or "PATH")
            layout = layout.replace("LIST", spec.list) if spec.list else layout
            missing[param] = f"{param} ({spec.describe()}: {_absent(spec, found)}expected {layout})"
    if missing:
        where = "" if os.path.isdir(cfg.root) else ", which does not exist"
        # only torchvision's sets download; image folders and lists are fetched by hand
        download = any(sets[param].source not in ("imagefolder", "imglist") for param in missing)
        raise DataError(f"{len(missing)} of the {len(sets)} configured data sets are missing under generate.root "
                        f"'{cfg.root}'{where}: {'; '.join(missing.values())}. Hint: point generate.root at the data, "
                        "put the missing sets there, remove the sets you do not use"
                        + (", or set generate.download: true (torchvision's sets, on a machine that is online)."
                           if download else "."))


def make_source_benchmark(cfg) -> list[IndexSplit]:
    """Index every configured data set (``generate.benchmark: sources``).

    Parameters
    ----------
    cfg : pipeline.config.GenerateConfig
        With ``id_train``, ``id_test`` (and any ``id_val``), at least one near
        or far set, and any ``ood_val`` and ``aux`` sets.

    Returns
    -------
    list of IndexSplit
        ``id_train``, ``id_val``, ``id_test``, then ``<set>_val``, ``<set>_test`` per OOD set
        (``<set>_test`` only with ``ood_val``), then ``<set>_val`` per ``ood_val`` set, then
        ``<set>_aux`` per auxiliary-outlier set.

    Raises
    ------
    DataError
        A data set is missing (the message gives the expected layout under
        ``root``), too small, an image list is malformed, or an ID set has
        other classes (or OOD labels).
    """
    if not cfg.download:  # every missing set in one message, before any is read
        check_sources_present(cfg)
    with HashCache() as cache:
        splits = _id_splits(cfg, cache)
        for set_name, (role, spec) in cfg.ood_sets.items():
            indexed = _ood_splits(cfg, set_name, role, spec, cache)
            splits += indexed
            log.info("indexed %s (%s): %d samples", set_name, role, sum(s.attrs["n_samples"] for s in indexed))
        for set_name, spec in cfg.ood_val.items():
            splits.append(_ood_val_split(cfg, set_name, spec, cache))
            log.info("indexed %s (OOD val): %d samples", set_name, splits[-1].attrs["n_samples"])
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

    Sums are accumulated in float64, so the result does not depend on the
    batching, and by numpy on one thread, so it does not depend on torch's
    thread count either: a torch reduction splits its sum one chunk per
    thread, and these statistics become the model's input normalisation.

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
        x = np.asarray(x, dtype=np.float64)
        sums, sq = x.sum(axis=(0, 2, 3)), np.square(x).sum(axis=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.tolist(), std.tolist()
