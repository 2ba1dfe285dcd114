"""The feature store: the one module that knows the Zarr layout.

Layout (Zarr format 3, one group per split)::

    features.zarr/                  root attrs["layerscope"] = {complete, provenance, splits, layers}
      id_train/                     group attrs: role, set, part, source, n_samples, fingerprint
        layer1        (n, C1)       dims ("sample", "feature_layer1")  pooled activations
        grad.layer1   (n, C1)       dims ("sample", "feature_layer1")  KL gradient summed over H,W (opt-in)
        fc            (n, K)        dims ("sample", "feature_fc")
        penultimate   (n, D)        dims ("sample", "feature_penultimate")  input of the head
        energy        (n, L)        dims ("sample", "layer")           -logsumexp of each full map
        logits        (n, K)        dims ("sample", "class")
        pred, label   (n,)          dims ("sample",)
      textures_test/ ...
      head/weight (K, D), head/bias (K,)   the final linear layer (SCALE, ASH, ReAct, ViM)

Every array is chunked along samples and **sharded**, so one array is a handful
of files (DVC hashes every file of an output). Each array's second dimension has
its own name, so ``xarray.open_zarr(path, group=split)`` opens a whole split.

Writes happen in whole shards only: zarr-python 3 loses data when two writers
touch parts of the same shard (zarr-python issue 3682), so the writer buffers a
shard's rows before it writes them, and one shard has exactly one writer.

A store is built in a *staging* directory beside the output
(``<parent>/.staging/<name>``) and renamed into place only once complete. DVC
deletes a stage's outputs before it runs the stage; the staging directory is not
an output, so an interrupted extraction survives and the rerun resumes from its
last complete shard, while the finished output stays an ordinary, cacheable DVC
output (no ``persist``, so the run cache keeps working).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import StoreError

log = logging.getLogger(__name__)

ATTRS_KEY = "layerscope"
STORE_FORMAT = 1
RESERVED = ("energy", "logits", "pred", "label", "penultimate", "head", "image")
GRAD_PREFIX = "grad."  # `grad.<layer>`: NAC-UE's pooled KL gradient of that layer
MAP_PREFIX = "map."  # `map.<layer>`: the unpooled (C, H, W) output of that layer (seed 002's decoder)
RESUME_HINT = "rerun `layerscope extract` (or `dvc repro extract`) to resume it"


@dataclass(frozen=True)
class ArraySpec:
    """One array of a split: ``width`` None means a 1-D per-sample array.

    ``sample_shape`` (with its ``dims`` names) makes an N-D array of shape
    ``(n_samples, *sample_shape)`` instead, e.g. an unpooled (C, H, W) map.
    """

    name: str
    width: int | None
    dtype: str
    dim: str | None = None
    attrs: dict | None = None
    sample_shape: tuple | None = None
    dims: tuple | None = None


def feature_dim(layer: str) -> str:
    """Name of a layer's feature dimension (unique per layer, as xarray needs)."""
    return f"feature_{layer}"


# --------------------------------------------------------------------------- writing


class StoreWriter:
    """Build a store in its staging directory, shard by shard, then publish it.

    Parameters
    ----------
    path : path
        Final location of the store (the DVC output).
    key : str
        Fingerprint of everything that determines the content (checkpoint, data,
        layer spec, format). A staged store with another key is discarded.
    chunk_rows, shard_rows : int
        Samples per chunk and per shard.
    compression_level : int
        Zstd level.
    """

    def __init__(self, path, key, *, chunk_rows=512, shard_rows=4096, compression_level=3):
        self.path = location(path)
        self.key = key
        self.chunk_rows, self.shard_rows = chunk_rows, shard_rows
        self.compressor = zarr.codecs.ZstdCodec(level=compression_level)
        self.staging = _control_dir(self.path)
        # a URL store is written in place (object stores cannot rename a tree): its
        # "complete" flag is the commit point, and readers refuse it until then
        self.staged_store = self.path if is_url(self.path) else self.staging / "store.zarr"
        self._lock_fh = None
        self._published = False
        self.progress = {}

    def __enter__(self):
        self.staging.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.staging / "lock", "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise StoreError(
                f"Feature store '{self.path}' is being written by another process (lock held on "
                f"'{self.staging / 'lock'}'). Hint: wait for it to finish; two writers would corrupt shards."
            ) from None
        self._load_or_reset()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
        self._lock_fh.close()
        if self._published:  # nothing left to resume: drop the staging directory
            shutil.rmtree(self.staging, ignore_errors=True)

    def _load_or_reset(self):
        progress_file = self.staging / "progress.json"
        state = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
        if state.get("key") == self.key and _exists(self.staged_store):
            self.progress = {k: set(v) for k, v in state["splits"].items()}
            log.info("resuming staged store %s (%d splits started)", self.staged_store, len(self.progress))
            return
        if _exists(self.staged_store):
            log.warning("discarding a staged store built from other inputs: %s", self.staged_store)
        _open_group(self.staged_store, mode="w", zarr_format=3)  # mode "w" deletes what was there
        self.progress = {}
        self._save_progress()

    def _save_progress(self):
        state = {"key": self.key, "splits": {k: sorted(v) for k, v in self.progress.items()}}
        _atomic_write_text(self.staging / "progress.json", json.dumps(state))

    def n_shards(self, n_samples: int) -> int:
        return -(-n_samples // self.shard_rows)

    def shard_range(self, index: int, n_samples: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of shard ``index``."""
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, n_samples)

    def pending_shards(self, split: str, n_samples: int) -> list[int]:
        """Shards of ``split`` not yet written completely."""
        done = self.progress.get(split, set())
        return [i for i in range(self.n_shards(n_samples)) if i not in done]

    def create_split(self, split: str, n_samples: int, specs: list[ArraySpec], attrs: dict):
        """Create the split's group and arrays, unless a resumed run already did."""
        if split in self.progress:
            return
        root = _open_group(self.staged_store, mode="r+")
        group = root.create_group(split, overwrite=True, attributes=_jsonable(attrs))
        for spec in specs:
            self._create_array(group, spec, n_samples)
        self.progress[split] = set()
        self._save_progress()

    def _create_array(self, group, spec: ArraySpec, n_samples: int):
        # a 0-sample split still needs valid (non-zero) chunk shapes
        rows = max(1, min(self.chunk_rows, n_samples))
        shard = max(1, min(self.shard_rows, -(-n_samples // rows) * rows))
        shape, chunks, shards, dims = (n_samples,), (rows,), (shard,), ("sample",)
        if spec.sample_shape is not None:
            trailing = tuple(spec.sample_shape)
            shape, chunks, shards = (n_samples, *trailing), (rows, *trailing), (shard, *trailing)
            dims = ("sample", *spec.dims)
        elif spec.width is not None:
            shape, chunks, shards = (n_samples, spec.width), (rows, spec.width), (shard, spec.width)
            dims = ("sample", spec.dim or feature_dim(spec.name))
        group.create_array(
            spec.name, shape=shape, chunks=chunks, shards=shards, dtype=spec.dtype,
            compressors=self.compressor, dimension_names=dims, attributes=_jsonable(spec.attrs or {}),
        )

    def write_constants(self, name: str, arrays: dict[str, np.ndarray]):
        """Write small per-store arrays (e.g. the head's weight and bias) into group ``name``."""
        root = _open_group(self.staged_store, mode="r+")
        group = root.require_group(name)
        for key, values in arrays.items():
            group.create_array(key, data=np.asarray(values), compressors=self.compressor, overwrite=True)

    def write_shard(self, split: str, index: int, data: dict[str, np.ndarray]):
        """Write one whole shard of every array of ``split``, then record it as done."""
        write_shard_data(self.staged_store, split, index, self.shard_rows, data)
        self.mark_done(split, index)

    def mark_done(self, split: str, index: int):
        """Record shard ``index`` of ``split`` as completely written (by this process or a worker)."""
        self.progress[split].add(index)
        self._save_progress()

    def finalize(self, provenance: dict, layers: list[str]):
        """Mark the staged store complete, consolidate metadata and move it into place."""
        root = _open_group(self.staged_store, mode="r+")
        root.attrs[ATTRS_KEY] = _jsonable({
            "format": STORE_FORMAT, "complete": True, "key": self.key, "layers": list(layers),
            "splits": sorted(self.progress), "provenance": {**provenance, "created": _now()},
        })
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # consolidated metadata is not in the v3 spec yet
            zarr.consolidate_metadata(root.store)
        if is_url(self.path):  # written in place; the flag above published it
            (self.staging / "progress.json").unlink(missing_ok=True)
            self._published = True
            log.info("feature store complete: %s", self.path)
            return self.path
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.staged_store, self.path)
        (self.staging / "progress.json").unlink(missing_ok=True)
        self._published = True
        log.info("feature store complete: %s", self.path)
        return self.path


def write_shard_data(store_path, split: str, index: int, shard_rows: int, data: dict[str, np.ndarray]):
    """Write rows of shard ``index`` of every array in ``data``: one whole shard each.

    This is what a Dask worker runs (see :mod:`pipeline.extract`): it touches only
    its own shard, so writers never share a shard file (zarr-python issue 3682).
    Groups and arrays must exist already; the caller records progress.

    Parameters
    ----------
    store_path : path or str
        The staged store (any location zarr opens).
    data : dict
        ``array name -> (rows, ...)`` where ``rows`` is the shard's row count.
    """
    group = _open_group(store_path, mode="r+", path=split)
    n_samples = group.attrs["n_samples"]
    start, stop = index * shard_rows, min((index + 1) * shard_rows, n_samples)
    for name, values in data.items():
        arr = group[name]
        if values.shape[0] != stop - start:
            raise ValueError(f"shard {index} of {split}/{name} needs {stop - start} rows, got {values.shape[0]}")
        arr[start:stop] = values.astype(arr.dtype, copy=False)


# --------------------------------------------------------------------------- reading


class FeatureStore:
    """A complete feature store, opened read-only.

    Use :func:`open_store`. Arrays come as zarr arrays (:meth:`array`), dask arrays
    chunked by shard (:meth:`to_dask`) or numpy arrays (:meth:`to_numpy`), and
    :meth:`iter_blocks` reads one shard at a time so memory stays bounded.
    """

    def __init__(self, path, root):
        self.path = location(path)
        self._root = root
        self._meta = dict(root.attrs.get(ATTRS_KEY, {}))

    @property
    def splits(self) -> list[str]:
        return list(self._meta["splits"])

    @property
    def layers(self) -> list[str]:
        """Layer names in network order."""
        return list(self._meta["layers"])

    @property
    def provenance(self) -> dict:
        return dict(self._meta["provenance"])

    @property
    def key(self) -> str:
        """Fingerprint of everything that determined the content (see :class:`StoreWriter`): its identity."""
        return str(self._meta["key"])

    @property
    def grad_layers(self) -> list[str]:
        """Layers whose NAC-UE gradients were stored."""
        return list(self._meta["provenance"].get("grad_layers", []))

    def head(self) -> dict | None:
        """``{"weight": (K, D), "bias": (K,)}`` of the final linear layer, if stored."""
        if "head" not in self._root:
            return None
        group = self._root["head"]
        return {key: _read(group[key], slice(None), f"head/{key}", self.path) for key in ("weight", "bias")}

    def has(self, split: str, name: str) -> bool:
        return name in self._group(split)

    def split_attrs(self, split: str) -> dict:
        return dict(self._group(split).attrs)

    def array_names(self, split: str) -> list[str]:
        """Arrays of a split: its layers in network order, then the others sorted."""
        present = set(self._group(split).array_keys())
        layers = [name for name in self.layers if name in present]
        return layers + sorted(present - set(layers))

    def array(self, split: str, name: str) -> zarr.Array:
        group = self._group(split)
        if name not in group:
            raise StoreError(f"Split '{split}' of store '{self.path}' has no array '{name}'. "
                             f"It has {sorted(group.array_keys())}.")
        return group[name]

    def to_numpy(self, split: str, name: str) -> np.ndarray:
        """The whole array in memory, shape (n_samples,) or (n_samples, n_features)."""
        arr = self.array(split, name)
        return _read(arr, slice(None), f"{split}/{name}", self.path)

    def to_dask(self, split: str, name: str):
        """A dask array chunked by shard (dask would otherwise chunk by inner chunk)."""
        import dask.array as da

        arr = self.array(split, name)
        return da.from_zarr(arr, chunks=arr.shards or arr.chunks)

    def block_ranges(self, split: str) -> list[tuple[int, int]]:
        """``(start, stop)`` of every shard of ``split``: the unit of out-of-core work."""
        arr = self.array(split, "label")
        step = (arr.shards or arr.chunks)[0]
        return [(start, min(start + step, arr.shape[0])) for start in range(0, arr.shape[0], step)]

    def rows(self, split: str, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of one array, as numpy."""
        return _read(self.array(split, name), slice(start, stop), f"{split}/{name}", self.path)

    def take(self, split: str, name: str, index: np.ndarray) -> np.ndarray:
        """The rows ``index`` (sorted ints) of one array, read without loading the others."""
        arr = self.array(split, name)
        selection = (index,) + (slice(None),) * (arr.ndim - 1)
        try:
            return arr.get_orthogonal_selection(selection)
        except Exception as exc:
            raise StoreError(f"Array '{split}/{name}' of store '{self.path}' could not be read "
                             f"({type(exc).__name__}: {exc}).") from exc

    def iter_blocks(self, split: str, name: str):
        """Yield ``(start, block)`` one shard at a time."""
        arr = self.array(split, name)
        step = (arr.shards or arr.chunks)[0]
        for start in range(0, arr.shape[0], step):
            yield start, _read(arr, slice(start, start + step), f"{split}/{name}", self.path)

    def _group(self, split: str):
        if split not in self._meta["splits"]:
            raise StoreError(f"Store '{self.path}' has no split '{split}'. It has {self.splits}.")
        return self._root[split]


def open_store(path) -> FeatureStore:
    """Open a complete feature store (a local path or an fsspec URL); refuse a missing or incomplete one."""
    path = location(path)
    if is_url(path):
        return _open_url_store(path)
    staged = path.parent / ".staging" / path.name / "store.zarr"
    if not (path / "zarr.json").is_file():
        if staged.is_dir():
            raise StoreError(f"Feature store '{path}' is incomplete: an interrupted extraction is staged at "
                             f"'{staged}'. Hint: {RESUME_HINT}.")
        raise StoreError(f"Feature store '{path}' does not exist. Hint: run `layerscope extract` "
                         "(or `dvc repro extract`).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        root = zarr.open_group(path, mode="r", use_consolidated=None)
    meta = root.attrs.get(ATTRS_KEY, {})
    if not meta.get("complete"):
        raise StoreError(f"Feature store '{path}' is incomplete (not marked complete). Hint: {RESUME_HINT}.")
    return FeatureStore(path, root)


def _open_url_store(url: str) -> FeatureStore:
    if not _exists(url):
        raise StoreError(f"Feature store '{url}' does not exist. Hint: run `layerscope extract --out {url}`.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        root = _open_group(url, mode="r", use_consolidated=None)
    if not root.attrs.get(ATTRS_KEY, {}).get("complete"):
        raise StoreError(f"Feature store '{url}' is incomplete (not marked complete). Hint: {RESUME_HINT}.")
    return FeatureStore(url, root)


def _read(arr, rows, name, path):
    try:
        return arr[rows]
    except Exception as exc:  # zarr/codec errors on truncated or garbled shards
        raise StoreError(f"Array '{name}' of store '{path}' could not be read ({type(exc).__name__}: {exc}). "
                         "Hint: the store is corrupt; delete it and rerun `dvc repro extract`.") from exc


# --------------------------------------------------------------------------- helpers


def is_url(path) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://...``, ``file:///...``) rather than a local path."""
    return "://" in str(path)


def location(path):
    """A URL stays a string (``Path`` would fold its ``//``); anything else becomes a ``Path``."""
    return str(path) if is_url(path) else Path(path)


def _storage_kwargs(where) -> dict:
    """zarr's ``storage_options`` for a URL: local ``file://`` stores need parent directories made."""
    if is_url(where) and str(where).startswith("file://"):
        return {"storage_options": {"auto_mkdir": True}}
    return {}


def _open_group(where, **kwargs):
    return zarr.open_group(where, **_storage_kwargs(where), **kwargs)


def _exists(where) -> bool:
    """Whether a zarr group exists at a local path or URL."""
    if not is_url(where):
        return Path(where).is_dir()
    try:
        _open_group(where, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return False
    return True


def _control_dir(path) -> Path:
    """Local directory for the lock and progress of a store being written.

    Beside a local store (``<parent>/.staging/<name>``); for a URL store, under
    ``.staging/`` in the working directory, named by the URL's hash.
    """
    if is_url(path):
        import hashlib

        return Path(".staging") / ("url-" + hashlib.sha256(str(path).encode()).hexdigest()[:16])
    return path.parent / ".staging" / path.name


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _jsonable(obj):
    """Round-trip through JSON so numpy scalars and tuples become plain JSON types."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

