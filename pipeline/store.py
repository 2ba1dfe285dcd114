"""The feature store: the one module that knows the Zarr layout.

Layout (Zarr format 3, one group per split)::

    features.zarr/                  root attrs["layerscope"] = {format, complete, key, provenance, splits, layers}
      layerscope.json               the manifest, written last: every other file's size and SHA-256
      id_train/                     group attrs: role, set, part, source, n_samples, fingerprint
        layer1        (n, C1)       dims ("sample", "feature_layer1")  pooled activations
        grad.layer1   (n, C1)       dims ("sample", "feature_layer1")  KL gradient summed over H,W (opt-in)
        gram.layer1   (n, P, C1)    dims ("sample", "gram_power", "feature_layer1")  Gram row sums (opt-in)
        rankfeat.layer3 (n, K)      dims ("sample", "class")           logits after rank-1 removal (opt-in)
        odin          (n, T, E)     dims ("sample", "odin_temperature", "odin_noise")  ODIN confidences (opt-in)
        fc            (n, K)        dims ("sample", "feature_fc")
        penultimate   (n, D)        dims ("sample", "feature_penultimate")  input of the head
        energy        (n, L)        dims ("sample", "layer")           -logsumexp of each full map
        logits        (n, K)        dims ("sample", "class")
        pred, label   (n,)          dims ("sample",)
      textures_test/ ...
      head/weight (K, D), head/bias (K,)   the final linear layer (SCALE, ASH, ReAct, ViM)

Every array is chunked along samples and **sharded**, so one array is a handful
of files (DVC hashes every file of an output). Each array's second dimension has
its own name, so ``xarray.open_zarr(path, group=split)`` opens a whole split
(zarr and xarray ignore the manifest, which is not a zarr key).

Writes happen in whole shards only: zarr-python 3 loses data when two writers
touch parts of the same shard (zarr-python issue 3682), so the writer buffers a
shard's rows before it writes them, and one shard has exactly one writer.
:class:`WriteBehind` writes them on a background thread, one shard behind the
computation, and records each shard only once it is written.

**Resumable.** A store is built in a *staging* directory beside the output
(``<parent>/.staging/<name>/store.zarr``, with ``progress.json``). DVC deletes
a stage's outputs before it runs the stage; the staging directory is not an
output, so an interrupted extraction survives and the rerun resumes from its
last complete shard, while the finished output stays an ordinary, cacheable DVC
output (no ``persist``, so the run cache keeps working).

**Trusted on read** (format 2). Chunks are Zstd frames with checksums and the
shard index carries a crc32c, so a flipped byte fails the read. The store is
sealed (:func:`pipeline.artifacts.seal`) before it is published with
:func:`pipeline.artifacts.publish_dir` (old aside, new in, old deleted), and
:func:`open_store` compares the files with the manifest (one ``stat`` each):
a deleted, truncated or grown file, a half-deleted store or a missing manifest
is refused at open, so a missing shard never reads back as zeros (which is what
zarr does with a missing chunk; the check is at open, so a file deleted while a
process holds the store open is not seen until the next open).
:func:`verify_store` checks every byte. Every
zarr, codec or JSON error while reading becomes one :class:`IntegrityError`
naming the array and the store. Nothing in a store records a clock reading:
the same inputs give the same bytes, resumed or not.

**URL stores** (``s3://...``, ``file:///...``) cannot be renamed into place:
they are written in place, and the manifest, written last through fsspec
after the ``complete`` flag, is the commit point; it is checked on open the
same way (names and sizes, from one listing). The limits: no lock across
machines (the lock is local, under ``./.staging``); no atomic swap, so while a
URL store is rewritten readers see it incomplete (and refuse it) rather than
the old one; and no pruning of temporary files (fsspec writes none).

**Fault injection.** ``LAYERSCOPE_FAILPOINT`` (see
:func:`pipeline.artifacts.failpoint`) also knows ``write:after-partial``: the
process kills itself inside zarr's write of a chunk file, once the
``*.partial`` file is written and before it is renamed; and
``finalize:after-attrs``, once the staged store is marked complete and before
its metadata is consolidated.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.core.sync import sync as zarr_sync

from pipeline import artifacts
from pipeline.artifacts import is_url, location
from pipeline.errors import IntegrityError, LayerscopeError, StoreError

log = logging.getLogger(__name__)

ATTRS_KEY = "layerscope"
# 2: Zstd frame checksums, a manifest (layerscope.json), no clock in the provenance; 3: xarray-native (every
# array has dimension names; ``layer`` and ``sample`` coordinates in each split: xr.open_datatree opens it all)
STORE_FORMAT = 3
# The ``layer`` coordinate is text: zarr-python's fixed-length UTF-32 data type, which has no v3
# specification yet (other zarr libraries may not read that one small array). zarr warns on every
# read and write of it; the choice is made once, here, so the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message=r"The data type \(FixedLengthUTF32")
RESERVED = ("energy", "logits", "pred", "label", "penultimate", "head", "image", "odin", "gram_power",
            "odin_temperature", "odin_noise")
GRAD_PREFIX = "grad."  # `grad.<layer>`: NAC-UE's pooled KL gradient of that layer
MAP_PREFIX = "map."  # `map.<layer>`: the unpooled (C, H, W) output of that layer (seed 002's decoder)
# extraction-time methods (opt-in; a store without them has none of these arrays or coordinates):
GRAM_PREFIX = "gram."  # `gram.<layer>` (n, P, C): Sastry & Oore's Gram row sums per power, coordinate `gram_power`
RANKFEAT_PREFIX = "rankfeat."  # `rankfeat.<layer>` (n, K): the logits after RankFeat's rank-1 removal at that layer
ODIN = "odin"  # `odin` (n, T, E): ODIN's confidence per (temperature, noise), coordinates `odin_temperature`, `odin_noise`
RESUME_HINT = "rerun `layerscope extract` (or `dvc repro extract`) to resume it"
REEXTRACT_HINT = "re-extract it: `dvc repro extract` (or `layerscope extract`)."
# what reading a damaged store raises, from zarr (BaseZarrError is a ValueError), its codecs
# (numcodecs' Zstd: RuntimeError on a checksum mismatch), JSON and the file system
_DAMAGE = (ValueError, TypeError, KeyError, RuntimeError, OSError, EOFError)


def _is_layerscope_zarr(path: Path) -> bool:
    """A zarr group whose root attributes hold ours: a store written before manifests existed."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_bytes())
        return isinstance(meta.get("attributes"), dict) and ATTRS_KEY in meta["attributes"]
    except (OSError, ValueError, AttributeError):
        return False


FEATURE_STORE = artifacts.Kind("feature store", hint=REEXTRACT_HINT, marker=_is_layerscope_zarr)


def is_zarr_file(rel: str) -> bool:
    """Whether a store's file (relative posix path) is zarr's: metadata, or a chunk/shard under ``c/``.

    Anything else is a leftover of an interrupted write, e.g. zarr's
    ``c/0/0.<uuid>.partial``, and is never published.
    """
    parts = rel.split("/")
    if parts[-1] == "zarr.json":
        return True
    if "c" not in parts:
        return False
    after = parts[len(parts) - 1 - parts[::-1].index("c") + 1:]
    return bool(after) and all(part.isdigit() for part in after)


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
        # a checksum per Zstd frame (chunk): a flipped byte fails the read
        self.compressor = zarr.codecs.ZstdCodec(level=compression_level, checksum=True)
        self.staging = _control_dir(self.path)
        # a URL store is written in place (object stores cannot rename a tree): its
        # manifest, written last, is the commit point, and readers refuse it until then
        self.staged_store = self.path if is_url(self.path) else self.staging / "store.zarr"
        self._held = None
        self._published = False
        self.progress = {}
        self._arrays = {}  # split -> SplitArrays, opened by its first shard write

    def __enter__(self):
        if not is_url(self.path):
            artifacts.check_output(self.path, FEATURE_STORE)
        self._held = contextlib.ExitStack()
        # the lock file sits beside the staging directory (.staging/<name>.lock), never in it
        self._held.enter_context(artifacts.artifact_lock(self.staging.parent.parent / self.staging.name,
                                                         "feature store"))
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            self._load_or_reset()
        except BaseException:
            self._held.close()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self._published:  # nothing left to resume: drop the staging directory, still locked
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._held.close()

    def _load_or_reset(self):
        progress_file = self.staging / "progress.json"
        state = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
        if state.get("key") == self.key and _exists(self.staged_store):
            self.progress = {k: set(v) for k, v in state["splits"].items()}
            log.info("resuming staged store %s (%d splits started)", self.staged_store, len(self.progress))
            return
        if _exists(self.staged_store):
            log.warning("discarding a staged store built from other inputs: %s", self.staged_store)
        if is_url(self.staged_store):  # first the manifest: a reader must not trust the old files meanwhile
            _url_remove(self.staged_store, artifacts.SEAL)
        _open_group(self.staged_store, mode="w", zarr_format=3)  # mode "w" deletes what was there
        self.progress = {}
        self._arrays = {}
        self._save_progress()

    def _save_progress(self):
        state = {"key": self.key, "splits": {k: sorted(v) for k, v in self.progress.items()}}
        artifacts.atomic_write(self.staging / "progress.json", json.dumps(state))

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

    def create_split(self, split: str, n_samples: int, specs: list[ArraySpec], attrs: dict, coords=None):
        """Create the split's group and arrays, unless a resumed run already did.

        ``coords`` maps a dimension name to its (small, constant) coordinate
        values, written now: e.g. ``{"layer": names}`` for ``energy``'s columns.
        """
        self.create_splits({split: (n_samples, attrs)}, specs, coords)

    def create_splits(self, splits: dict, specs: list[ArraySpec], coords=None):
        """:meth:`create_split` of every split of ``splits`` (``name -> (n_samples, attrs)``), in one batch.

        The splits a resumed run already created are left as they are. The
        others are built in memory, then written to the store at once
        (:func:`_create_splits`), and recorded in the progress file once.
        """
        todo = {name: entry for name, entry in splits.items() if name not in self.progress}
        if not todo:
            return
        coords = [{"name": name, "data": np.asarray(values), "compressors": self.compressor,
                   "dimension_names": (name,)} for name, values in (coords or {}).items()]
        groups = {name: (_jsonable(attrs), [self._array_kwargs(spec, n) for spec in specs] + coords)
                  for name, (n, attrs) in todo.items()}
        zarr_sync(_create_splits(self.staged_store, groups))
        for name in todo:
            self._arrays.pop(name, None)
            self.progress[name] = set()
        self._save_progress()

    def _array_kwargs(self, spec: ArraySpec, n_samples: int) -> dict:
        """``create_array``'s arguments for ``spec``: chunked along samples, one shard per ``shard_rows``."""
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
        return {"name": spec.name, "shape": shape, "chunks": chunks, "shards": shards, "dtype": spec.dtype,
                "compressors": self.compressor, "dimension_names": dims, "attributes": _jsonable(spec.attrs or {})}

    def write_constants(self, name: str, arrays: dict[str, np.ndarray], dims: dict | None = None):
        """Write small per-store arrays (e.g. the head's weight and bias) into group ``name``.

        ``dims`` names each array's dimensions (xarray needs them); default ``<array>_<axis>``.
        """
        _open_group(self.staged_store, mode="r+").require_group(name)
        kwargs = []
        for key, values in arrays.items():
            values = np.asarray(values)
            names = (dims or {}).get(key) or tuple(f"{key}_{axis}" for axis in range(values.ndim))
            kwargs.append({"name": key, "data": values, "compressors": self.compressor, "overwrite": True,
                           "dimension_names": tuple(names)})
        zarr_sync(_create_arrays(self.staged_store, name, kwargs))  # one round trip to zarr's loop for them all

    def write_shard(self, split: str, index: int, data: dict[str, np.ndarray], pool=None):
        """Write one whole shard of every array of ``split``, then record it as done.

        ``pool`` (an executor) encodes the arrays' files in parallel; default: one after the other, here.
        """
        # the split's arrays are opened once, not once per shard (reopening cost as much as writing a small shard)
        self._arrays[split] = write_shard_data(self.staged_store, split, index, self.shard_rows, data,
                                               self._arrays.get(split), pool=pool)
        self.mark_done(split, index)

    def mark_done(self, split: str, index: int):
        """Record shard ``index`` of ``split`` as completely written (by this process or a worker)."""
        self.progress[split].add(index)
        self._save_progress()

    def finalize(self, provenance: dict, layers: list[str]):
        """Mark the staged store complete, consolidate its metadata, seal it, then swap it into place.

        ``provenance`` must hold no clock reading: a store's bytes are a pure
        function of its inputs (DVC's hashes, and a resumed store equal to an
        uninterrupted one, depend on it).
        """
        root = _open_group(self.staged_store, mode="r+")
        root.attrs[ATTRS_KEY] = _jsonable({
            "format": STORE_FORMAT, "complete": True, "key": self.key, "layers": list(layers),
            "splits": sorted(self.progress), "provenance": provenance,
        })
        artifacts.failpoint("finalize:after-attrs")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # consolidated metadata is not in the v3 spec yet
            zarr.consolidate_metadata(root.store)
        if is_url(self.path):  # written in place: the manifest, written last, publishes it
            _url_seal(self.path)
            (self.staging / "progress.json").unlink(missing_ok=True)
            self._published = True
            log.info("feature store complete: %s", self.path)
            return self.path
        artifacts.seal(self.staged_store, FEATURE_STORE, keep=is_zarr_file)
        artifacts.publish_dir(self.staged_store, self.path)
        (self.staging / "progress.json").unlink(missing_ok=True)
        self._published = True
        log.info("feature store complete: %s", self.path)
        return self.path


def write_shard_data(store_path, split: str, index: int, shard_rows: int, data: dict[str, np.ndarray], arrays=None,
                     pool=None):
    """Write rows of shard ``index`` of every array in ``data``: one whole shard each.

    This is what a Dask worker runs (see :mod:`pipeline.extract`): it touches only
    its own shard, so writers never share a shard file (zarr-python issue 3682).
    Groups and arrays must exist already; the caller records progress.

    Each array's shard file is encoded here, in the caller's thread
    (:func:`encode_shard`: the bytes zarr would write, 4x less CPU than its
    write path), then every file is stored concurrently on zarr's event loop,
    one round trip for the whole shard. An array of another layout is
    written by zarr itself, in that same round trip.

    Parameters
    ----------
    store_path : path or str
        The staged store (any location zarr opens).
    data : dict
        ``array name -> (rows, ...)`` where ``rows`` is the shard's row count.
    arrays : SplitArrays, optional
        The split's arrays opened already (:meth:`StoreWriter.write_shard` keeps
        one per split); opened here when None.
    pool : concurrent.futures.Executor, optional
        Encodes the arrays' files concurrently (Zstd releases the GIL), the
        largest first; default: one after the other, in this thread.

    Returns
    -------
    SplitArrays
        The split's arrays, to pass as ``arrays`` for its next shard.
    """
    _chunk_failpoint()
    arrays = zarr_sync(_open_split(store_path, split, list(data), arrays))
    start, stop = index * shard_rows, min((index + 1) * shard_rows, arrays.n_samples)
    for name, values in data.items():
        if values.shape[0] != stop - start:
            raise ValueError(f"shard {index} of {split}/{name} needs {stop - start} rows, got {values.shape[0]}")
    data = {name: values.astype(arrays.arrays[name].dtype, copy=False) for name, values in data.items()}
    names = sorted(data, key=lambda name: -data[name].nbytes)  # largest first: the pool's threads end together
    encoded = (pool.map if pool is not None else map)(lambda name: encode_shard(arrays.arrays[name], start, data[name]),
                                                      names)
    files = dict(zip(names, encoded))
    zarr_sync(_store_shard(arrays, start, stop, data, files))
    return arrays


@dataclass
class SplitArrays:
    """One split's arrays opened on zarr's event loop: ``n_samples`` and ``name -> AsyncArray``."""

    n_samples: int
    arrays: dict


# Coroutines below run on zarr's own event loop through ``zarr_sync``, as zarr's synchronous API runs its own.
async def _open_split(store_path, split: str, names, known: SplitArrays | None = None) -> SplitArrays:
    """``known`` with every array of ``names`` it lacks opened (all of them, and the group, when None)."""
    if known is not None and all(name in known.arrays for name in names):
        return known
    group = await zarr.api.asynchronous.open_group(store_path, mode="r+", path=split, **_storage_kwargs(store_path))
    missing = [name for name in names if known is None or name not in known.arrays]
    opened = await asyncio.gather(*(group.getitem(name) for name in missing))
    arrays = {**(known.arrays if known else {}), **dict(zip(missing, opened))}
    return SplitArrays(int(group.attrs["n_samples"]), arrays)


async def _create_splits(store_path, groups: dict):
    """Create each split's group and arrays: ``groups`` is ``name -> (attributes, [create_array's arguments])``.

    zarr creates a node in several round trips to the store (existence checks,
    its parents' documents), each on a thread of its own: 17 splits of 7 arrays
    took 0.4 to 0.6 s, more than extracting a small benchmark. So the splits
    are built in a memory store first, and their documents (and coordinate
    chunks) then written to the store in one concurrent batch, after removing
    whatever an interrupted run left at their paths. A split is recorded as
    created only after that (:meth:`StoreWriter.create_splits`): a run stopped
    midway creates it again.
    """
    memory = zarr.storage.MemoryStore()
    scratch = await zarr.api.asynchronous.open_group(memory, mode="w", zarr_format=3)

    async def build(name, attributes, arrays):
        group = await scratch.create_group(name, attributes=attributes)
        await asyncio.gather(*(group.create_array(**kwargs) for kwargs in arrays))

    await asyncio.gather(*(build(name, *entry) for name, entry in groups.items()))
    root = await zarr.api.asynchronous.open_group(store_path, mode="r+", **_storage_kwargs(store_path))
    await asyncio.gather(*((root.store_path / name).delete_dir() for name in groups))
    prototype = zarr.core.buffer.default_buffer_prototype()
    keys = [key async for key in memory.list() if key.split("/", 1)[0] in groups]  # not the scratch root's

    async def copy(key):
        await (root.store_path / key).set(await memory.get(key, prototype=prototype))

    await asyncio.gather(*(copy(key) for key in keys))


async def _create_arrays(store_path, split: str, arrays: list[dict]):
    """Create the arrays of ``split`` concurrently (``create_array``'s arguments, one dict each)."""
    group = await zarr.api.asynchronous.open_group(store_path, mode="r+", path=split, **_storage_kwargs(store_path))
    await asyncio.gather(*(group.create_array(**kwargs) for kwargs in arrays))


async def _store_shard(split_arrays: SplitArrays, start: int, stop: int, data: dict, files: dict):
    """Store every encoded shard file of ``files`` (delete it when empty); zarr writes the arrays encoded as None."""
    async def store(name):
        arr, file = split_arrays.arrays[name], files[name]
        if file is None:
            return await arr.setitem(slice(start, stop), data[name])
        key, blob = file
        target = arr.store_path / key
        return await (target.delete() if blob is None else target.set(_BUFFER.from_bytes(blob)))

    await asyncio.gather(*(store(name) for name in data))


# --------------------------------------------------------------------------- shard files, encoded here


_MAX_UINT64 = 2**64 - 1  # an empty chunk's offset and length in a shard index
_BUFFER = zarr.core.buffer.default_buffer_prototype().buffer


@dataclass(frozen=True)
class ShardLayout:
    """What :func:`encode_shard` needs of an array whose shards it can encode: rows per shard and chunk, Zstd."""

    shard_rows: int
    chunk_rows: int
    zstd: object  # numcodecs.Zstd, configured as the array's Zstd codec
    dtype: np.dtype  # little-endian
    write_empty_chunks: bool


def shard_layout(arr) -> ShardLayout | None:
    """The layout of ``arr`` (a zarr ``AsyncArray``) if it is the one :class:`StoreWriter` creates, else None.

    That layout is: sharding only along the first axis, with the index (bytes,
    crc32c) at the end; inner chunks of bytes then Zstd; a zero fill value of
    a numeric type. Anything else is left to zarr.
    """
    from numcodecs import Zstd
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    if getattr(meta, "zarr_format", None) != 3 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding, shard_shape = codecs[0], tuple(meta.chunk_grid.chunk_shape)
    inner = sharding.codecs
    dtype = np.dtype(arr.dtype)
    zero_fill = not np.asarray([meta.fill_value], dtype=dtype).view(np.uint8).any()
    if not (dtype.kind in "biuf" and zero_fill and arr.ndim >= 1
            and sharding.index_location == ShardingCodecIndexLocation.end
            and [type(c) for c in sharding.index_codecs] == [BytesCodec, Crc32cCodec]
            and [type(c) for c in inner] == [BytesCodec, ZstdCodec]
            and all(_little_endian(c) for c in (inner[0], sharding.index_codecs[0]))
            and tuple(sharding.chunk_shape[1:]) == shard_shape[1:] == tuple(arr.shape[1:])):
        return None
    return ShardLayout(shard_shape[0], sharding.chunk_shape[0], Zstd(level=inner[1].level, checksum=inner[1].checksum),
                       dtype.newbyteorder("<"), bool(arr.config.write_empty_chunks))


def _little_endian(bytes_codec) -> bool:
    """Whether a zarr ``BytesCodec`` lays values out little-endian (None: one-byte values, no order)."""
    endian = bytes_codec.endian
    return endian is None or getattr(endian, "value", endian) == "little"


def encode_shard(arr, start: int, values: np.ndarray) -> tuple[str, bytes | None] | None:
    """The key and bytes zarr would store for ``arr[start:start + len(values)] = values``, one whole shard.

    zarr-python's own write path spends most of a shard's time in Python per
    chunk (a task and a thread hand-off each, a fill-value check that builds
    an array): this computes the same bytes directly. The file is the Zstd
    frame of each inner chunk in order (chunks along the first axis only, so
    Morton order is row order), the last chunk padded with the fill value
    (zero) to its full rows, a chunk all of zero bytes left out unless the
    array writes empty chunks, then the index of ``(offset, length)`` pairs
    (``2**64 - 1`` twice for a chunk left out) and its crc32c. The tests
    compare these bytes with zarr's.

    Parameters
    ----------
    arr : zarr AsyncArray
    start : int
        First row; the start of one of ``arr``'s shards.
    values : ndarray of shape (rows, *arr.shape[1:])
        Every row of the shard that lies inside the array.

    Returns
    -------
    (key, bytes) or None
        ``bytes`` None: every chunk is empty (zarr deletes the file). None:
        not :func:`shard_layout`'s layout, or not a whole shard; zarr must write it.
    """
    import google_crc32c

    layout = shard_layout(arr)
    if layout is None or start % layout.shard_rows or len(values) != min(layout.shard_rows, arr.shape[0] - start):
        return None
    values = np.ascontiguousarray(values, dtype=layout.dtype)
    n_chunks = -(-len(values) // layout.chunk_rows)
    index = np.full((layout.shard_rows // layout.chunk_rows, 2), _MAX_UINT64, dtype="<u8")
    frames, offset = [], 0
    for i in range(n_chunks):
        chunk = _padded(values[i * layout.chunk_rows:(i + 1) * layout.chunk_rows], layout.chunk_rows)
        if not layout.write_empty_chunks and not chunk.view(np.uint8).any():
            continue
        frames.append(layout.zstd.encode(chunk))
        index[i] = offset, len(frames[-1])
        offset += len(frames[-1])
    key = arr.metadata.encode_chunk_key((start // layout.shard_rows,) + (0,) * (arr.ndim - 1))
    if not frames:
        return key, None
    index_bytes = index.tobytes()
    return key, b"".join([*frames, index_bytes, google_crc32c.value(index_bytes).to_bytes(4, "little")])


def _padded(chunk: np.ndarray, rows: int) -> np.ndarray:
    """``chunk`` with zero rows appended up to ``rows`` (zarr pads a chunk past the array's end with its fill value)."""
    if len(chunk) == rows:
        return chunk
    full = np.zeros((rows, *chunk.shape[1:]), dtype=chunk.dtype)
    full[:len(chunk)] = chunk
    return full


class WriteBehind:
    """Write a :class:`StoreWriter`'s whole shards on one background thread while the caller computes the next.

    Compressing and writing a shard then overlaps the forward passes of the
    next one instead of stalling them. What stays as it was:

    - **bounded memory**: :meth:`submit` first waits until fewer than ``depth``
      shards are queued or being written, so at most ``depth`` shards wait
      here besides the one the caller is computing;
    - **errors propagate**: a failed write is raised by the next
      :meth:`submit`, or on leaving the ``with`` block;
    - **resume**: the background thread records a shard as done
      (:meth:`StoreWriter.mark_done`) only once every array of it is written,
      one shard after the other, so a run killed anywhere resumes from the
      shards recorded, exactly as with blocking writes. Nothing here touches
      the ``complete`` flag: only :meth:`StoreWriter.finalize` sets it, after
      this block has waited for the last write.

    Parameters
    ----------
    writer : StoreWriter
        An entered writer whose splits and arrays exist already.
    depth : int
        Shards that may wait or be written at a time (1: double buffering;
        0: each shard is written by :meth:`submit` itself, in the caller's thread).
    encoders : int
        Threads that encode a shard's files (Zstd releases the GIL); 1: the
        writing thread alone. More pay when the cores they would take are
        idle meanwhile: the caller's with depth 0 (it waits), the lanes' at
        the last shard.
    """

    def __init__(self, writer: StoreWriter, depth: int = 1, encoders: int = 1):
        self.writer, self.depth, self.encoders = writer, depth, encoders
        self._pool = self._encoders = None
        self._pending = collections.deque()

    def __enter__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerscope-shard-writer")
        if self.encoders > 1:
            self._encoders = ThreadPoolExecutor(max_workers=self.encoders, thread_name_prefix="layerscope-encoder")
        return self

    def submit(self, split: str, index: int, data: dict[str, np.ndarray]):
        """Queue shard ``index`` of ``split`` for writing; ``data`` must not be changed afterwards.

        Blocks while ``depth`` shards are pending; raises the error of a
        failed earlier write.
        """
        if self.depth == 0:  # no core to spare: write here, now
            self.writer.write_shard(split, index, data, pool=self._encoders)
            return
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self.writer.write_shard, split, index, data, self._encoders))

    def __exit__(self, exc_type, exc, tb):
        try:
            while self._pending:
                future = self._pending.popleft()
                if exc_type is None:
                    future.result()
                elif future.exception() is not None:  # waits for it; the caller's own error is the one raised
                    log.error("writing a shard failed too: %s", _one_line(future.exception()))
        finally:
            self._pool.shutdown(wait=True)
            if self._encoders is not None:
                self._encoders.shutdown(wait=True)


# --------------------------------------------------------------------------- reading


class FeatureStore:
    """A complete feature store, opened read-only.

    Use :func:`open_store`. Arrays come as zarr arrays (:meth:`array`), dask arrays
    chunked by shard (:meth:`to_dask`) or numpy arrays (:meth:`to_numpy`), and
    :meth:`iter_blocks` reads one shard at a time so memory stays bounded. Every
    read that meets damaged data raises :class:`~pipeline.errors.IntegrityError`
    naming the array (``split/name``) and the store.
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
        with _reading("group 'head'", self.path):
            if "head" not in self._root:
                return None
            group = self._root["head"]
            arrays = {key: group[key] for key in ("weight", "bias")}
        return {key: _read(arr, slice(None), f"head/{key}", self.path) for key, arr in arrays.items()}

    def has(self, split: str, name: str) -> bool:
        return name in self._group(split)

    def split_attrs(self, split: str) -> dict:
        return dict(self._group(split).attrs)

    def array_names(self, split: str) -> list[str]:
        """Arrays of a split: its layers in network order, then the others sorted."""
        with _reading(f"split '{split}'", self.path):
            present = set(self._group(split).array_keys())
        layers = [name for name in self.layers if name in present]
        return layers + sorted(present - set(layers))

    def array(self, split: str, name: str) -> zarr.Array:
        group = self._group(split)
        if name not in group:
            raise StoreError(f"Split '{split}' of store '{self.path}' has no array '{name}'. "
                             f"It has {sorted(group.array_keys())}.")
        with _reading(f"array '{split}/{name}'", self.path):
            return group[name]

    def to_numpy(self, split: str, name: str) -> np.ndarray:
        """The whole array in memory, shape (n_samples,) or (n_samples, n_features)."""
        arr = self.array(split, name)
        return _read(arr, slice(None), f"{split}/{name}", self.path)

    def to_dask(self, split: str, name: str):
        """A dask array chunked by shard (dask would otherwise chunk by inner chunk).

        Its tasks read through the same check as :meth:`to_numpy`: damaged data
        raises :class:`~pipeline.errors.IntegrityError` at compute time.
        """
        import dask.array as da
        from dask.base import tokenize

        arr = self.array(split, name)
        checked = CheckedArray(arr, f"{split}/{name}", str(self.path))
        token = tokenize(str(self.path), self.key, split, name)
        return da.from_array(checked, chunks=arr.shards or arr.chunks, name=f"layerscope-{split}/{name}-{token}",
                             meta=np.empty((0,) * arr.ndim, dtype=arr.dtype), asarray=False)

    def sharded(self, split: str, name: str) -> ShardedArray:
        """One array as its shards, read one at a time as numpy: :meth:`to_dask`'s blocks, without dask.

        What out-of-core fits take (``fit_dask``, through
        :func:`~pipeline.detectors.mahalanobis.blockwise_sum`): they read block
        after block on their own thread, which needs no task graph, and
        importing dask.array costs 0.3 to 0.4 s, more than fitting a small store.
        """
        arr = self.array(split, name)
        return ShardedArray(arr, f"{split}/{name}", str(self.path), (arr.shards or arr.chunks)[0])

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
        with _reading(f"array '{split}/{name}'", self.path):
            return arr.get_orthogonal_selection(selection)

    def iter_blocks(self, split: str, name: str):
        """Yield ``(start, block)`` one shard at a time."""
        arr = self.array(split, name)
        step = (arr.shards or arr.chunks)[0]
        for start in range(0, arr.shape[0], step):
            yield start, _read(arr, slice(start, start + step), f"{split}/{name}", self.path)

    def all_arrays(self) -> list[tuple[str, zarr.Array]]:
        """``(path, array)`` of every array of the store (``split/name``, ``head/weight``), sorted."""
        with _reading("its arrays", self.path):
            members = self._root.members(max_depth=None)
            return sorted((path, node) for path, node in members if isinstance(node, zarr.Array))

    def _group(self, split: str):
        if split not in self._meta["splits"]:
            raise StoreError(f"Store '{self.path}' has no split '{split}'. It has {self.splits}. Hint: pass one of "
                             "them (`layerscope inspect` lists each split's arrays).")
        with _reading(f"split '{split}'", self.path):
            return self._root[split]


@dataclass(frozen=True)
class CheckedArray:
    """A zarr array whose reads raise :class:`IntegrityError` on damage: what :meth:`FeatureStore.to_dask` wraps.

    Small and picklable (the zarr array pickles as its location), so dask
    workers read through the same check.
    """

    array: zarr.Array
    name: str
    store: str

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def ndim(self):
        return self.array.ndim

    def __getitem__(self, selection):
        return _read(self.array, selection, self.name, self.store)


@dataclass(frozen=True)
class ShardedArray(CheckedArray):
    """A :class:`CheckedArray` chunked along samples by ``step`` rows (a shard): see :meth:`FeatureStore.sharded`.

    Besides the shape attributes of a dask array (``shape``, ``ndim``,
    ``dtype``, ``chunks``), it has :meth:`iter_blocks` for its blocks.
    """

    step: int

    @property
    def chunks(self) -> tuple:
        """Rows of each block, then the full extent of every other axis, as dask writes its ``chunks``."""
        n = self.shape[0]
        rows = tuple(min(self.step, n - start) for start in range(0, n, self.step)) or (0,)
        return (rows, *((extent,) for extent in self.shape[1:]))

    def iter_blocks(self):
        """Yield ``(start, block)``, one per entry of ``chunks[0]`` (an empty array: one empty block, as dask's),
        each read (and checked) when its turn comes."""
        start = 0
        for rows in self.chunks[0]:
            yield start, self[start:start + rows]
            start += rows


def open_store(path) -> FeatureStore:
    """Open a complete feature store (a local path or an fsspec URL).

    Checks, in this order: the store exists and is marked complete; it has this
    version's format; its files match its manifest (names and sizes, one
    ``stat`` each). Array data is checked as it is read (Zstd checksums, the
    shard index's crc32c); :func:`verify_store` checks everything.

    Raises
    ------
    StoreError
        Missing, incomplete (an interrupted extraction) or of another format.
    IntegrityError
        Damaged: metadata that zarr cannot read, a file missing, truncated or
        grown, a manifest missing or damaged.
    """
    path = location(path)
    if is_url(path):
        return _open_url_store(path)
    if not (path / "zarr.json").is_file():
        if (path / artifacts.SEAL).is_file():
            artifacts.check_sealed(path, FEATURE_STORE)  # half deleted: names a missing file
        staged = _control_dir(path) / "store.zarr"
        if staged.is_dir():
            raise StoreError(f"Feature store '{path}' is incomplete: an interrupted extraction is staged at "
                             f"'{staged}'. Hint: {RESUME_HINT}.")
        if path.exists():
            from pipeline.files import what_is_at

            raise StoreError(f"'{path}' is not a feature store: it {what_is_at(path, 'zarr.json')}. Hint: run "
                             "`layerscope extract` (or `dvc repro extract`), or name a store written by it.")
        raise StoreError(f"Feature store '{path}' does not exist. Hint: run `layerscope extract` "
                         "(or `dvc repro extract`).")
    root = _open_root(path)
    artifacts.check_sealed(path, FEATURE_STORE)
    return FeatureStore(path, root)


_SHARED: dict = {}  # (resolved path, manifest digest) -> FeatureStore: open_shared's, one store at a time
_SHARED_LOCK = threading.Lock()


def open_shared(path) -> FeatureStore:
    """:func:`open_store` for the tasks of one process: a local store is opened once and shared by them.

    Opening parses the consolidated metadata of every array: 20 to 30 ms for
    a store of 17 splits, which scoring paid in each split's task (on threads,
    one after the other: the parse holds the GIL). Each call still checks the
    files against the manifest (a ``stat`` each, as :func:`open_store` does);
    a store republished since (another manifest digest) is opened afresh. A
    URL store is opened each time.
    """
    if is_url(location(path)):
        return open_store(path)
    path = Path(path).resolve()
    try:
        digest = artifacts.check_sealed(path, FEATURE_STORE).get("digest")
    except (LayerscopeError, OSError):
        return open_store(path)  # whatever is wrong, said as opening says it
    with _SHARED_LOCK:
        store = _SHARED.get((path, digest))
        if store is None:
            store = open_store(path)
            _SHARED.clear()
            _SHARED[path, digest] = store
    return store


def _open_url_store(url: str) -> FeatureStore:
    if not _exists(url):
        raise StoreError(f"Feature store '{url}' does not exist. Hint: run `layerscope extract --out {url}`.")
    root = _open_root(url)
    _url_check_sealed(url)
    return FeatureStore(url, root)


def _open_root(path):
    """The root group, refused if it is damaged, incomplete or of another format."""
    with _reading("its root metadata (zarr.json)", path), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        root = _open_group(path, mode="r", use_consolidated=None)
        meta = root.attrs.get(ATTRS_KEY, {})
        if not isinstance(meta, dict):
            raise TypeError(f"attribute '{ATTRS_KEY}' is a {type(meta).__name__}, not a mapping")
    if not meta.get("complete"):
        raise StoreError(f"Feature store '{path}' is incomplete (not marked complete). Hint: {RESUME_HINT}.")
    found = meta.get("format")
    if found != STORE_FORMAT:
        newer = isinstance(found, int) and found > STORE_FORMAT
        raise StoreError(f"Feature store '{path}' has format {found}; this layerscope reads format "
                         f"{STORE_FORMAT} only (checksummed chunks, a manifest). Hint: "
                         + ("upgrade layerscope, or re-extract the store with this one: `dvc repro extract` (or "
                            "`layerscope extract`)." if newer else REEXTRACT_HINT))
    return root


def verify_store(path) -> dict:
    """Check every byte of a store: what ``layerscope verify`` runs.

    Beyond :func:`open_store`'s checks: every file's SHA-256 against the
    manifest, no file the manifest does not list, and every chunk of every
    array decoded (so the Zstd checksums and shard-index crc32c run), one
    shard at a time.

    Parameters
    ----------
    path : path-like or str
        A store, local or an fsspec URL.

    Returns
    -------
    dict
        ``{"path", "arrays", "files", "bytes"}``: arrays decoded, files and
        bytes checked against the manifest.

    Raises
    ------
    StoreError, IntegrityError
        At the first problem found, naming it.
    """
    store = open_store(path)
    if is_url(store.path):
        manifest = _url_check_sealed(store.path, deep=True)
    else:
        manifest = artifacts.check_sealed(store.path, FEATURE_STORE, deep=True)
    arrays = store.all_arrays()
    for name, arr in arrays:
        if arr.ndim == 0:
            _read(arr, (), name, store.path)
            continue
        step = (arr.shards or arr.chunks)[0]
        for start in range(0, arr.shape[0], step):
            _read(arr, slice(start, start + step), name, store.path)
    files = manifest["files"]
    return {"path": str(store.path), "arrays": len(arrays), "files": len(files),
            "bytes": sum(entry["size"] for entry in files.values())}


@contextlib.contextmanager
def _reading(what: str, path):
    """Turn what zarr, its codecs or JSON raise on damaged data into one :class:`IntegrityError` line."""
    try:
        yield
    except _DAMAGE as exc:
        if isinstance(exc, LayerscopeError):  # ConfigError and DataError are ValueErrors too
            raise
        raise IntegrityError(f"Feature store '{path}': {what} could not be read, the store is damaged "
                             f"({_one_line(exc)}). Hint: {REEXTRACT_HINT}") from exc


def _read(arr, rows, name, path):
    with _reading(f"array '{name}'", path):
        return arr[rows]


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- URL stores: the manifest via fsspec


def _url_fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _url_listing(url: str) -> dict[str, int]:
    """Every file of a URL store: relative posix path -> size, from one listing."""
    fs, root = _url_fs(url)
    root = root.rstrip("/")
    return {full[len(root) + 1:]: int(info["size"]) for full, info in fs.find(root, detail=True).items()
            if info.get("type", "file") == "file"}


def _url_sha256(url: str, rel: str) -> str:
    fs, root = _url_fs(url)
    digest = hashlib.sha256()
    with fs.open(f"{root.rstrip('/')}/{rel}", "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _url_remove(url: str, rel: str):
    fs, root = _url_fs(url)
    target = f"{root.rstrip('/')}/{rel}"
    if fs.exists(target):
        fs.rm(target)


def _url_seal(url: str) -> dict:
    """:func:`pipeline.artifacts.seal` for a store written in place at a URL (no temporary files to prune there)."""
    files = {rel: {"size": size, "sha256": _url_sha256(url, rel)}
             for rel, size in sorted(_url_listing(url).items()) if rel != artifacts.SEAL}
    manifest = artifacts.manifest_for(FEATURE_STORE, files)
    fs, root = _url_fs(url)
    fs.pipe_file(f"{root.rstrip('/')}/{artifacts.SEAL}", artifacts.manifest_bytes(manifest))
    return manifest


def _url_check_sealed(url: str, deep: bool = False) -> dict:
    """:func:`pipeline.artifacts.check_sealed` for a URL store: names and sizes from one listing (SHA-256 if deep)."""
    listing = _url_listing(url)
    hint = FEATURE_STORE.hint
    if artifacts.SEAL not in listing:
        raise IntegrityError(f"The feature store '{url}' has no {artifacts.SEAL}: it was never completely "
                             f"published. Hint: {hint}")
    fs, root = _url_fs(url)
    try:
        manifest = artifacts.parse_seal(fs.cat_file(f"{root.rstrip('/')}/{artifacts.SEAL}"),
                                        f"{url}/{artifacts.SEAL}")
    except IntegrityError as exc:
        raise IntegrityError(f"The feature store '{url}' cannot be trusted: {exc} Hint: {hint}") from None
    if manifest["kind"] != FEATURE_STORE.name:
        raise IntegrityError(f"'{url}' is a {manifest['kind']}, not a feature store. Hint: {hint}")
    for rel, entry in manifest["files"].items():
        problem = ("is missing" if rel not in listing else
                   f"has {listing[rel]} bytes, expected {entry['size']}" if listing[rel] != entry["size"] else
                   "has been altered (its SHA-256 differs from the manifest's)"
                   if deep and _url_sha256(url, rel) != entry["sha256"] else None)
        if problem:
            raise IntegrityError(f"The feature store '{url}' is damaged: file '{rel}' {problem}. Hint: {hint}")
    extra = sorted(set(listing) - set(manifest["files"]) - {artifacts.SEAL})
    if deep and extra:
        raise IntegrityError(f"The feature store '{url}' holds {len(extra)} file(s) it was not published with, "
                             f"e.g. '{extra[0]}'. Hint: {hint}")
    return manifest


# --------------------------------------------------------------------------- helpers


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
    """Local directory for the progress (and staged copy) of a store being written.

    Beside a local store (``<parent>/.staging/<name>``); for a URL store, under
    ``.staging/`` in the working directory, named by the URL's hash. The lock
    is the file beside it, ``<that>.lock``.
    """
    if is_url(path):
        return Path(".staging") / ("url-" + hashlib.sha256(str(path).encode()).hexdigest()[:16])
    return artifacts.control_dir(path) / path.name


def _jsonable(obj):
    """Round-trip through JSON so numpy scalars and tuples become plain JSON types."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# --------------------------------------------------------------------------- fault injection (tests only)


_chunk_failpoint_installed = False


def _chunk_failpoint():
    """``write:after-partial``: SIGKILL inside zarr's atomic write of a chunk file, before its rename.

    zarr's local store writes ``<key>.<uuid>.partial`` and renames it; this
    wraps that step (a private zarr function) so the kill lands between the
    two, as a real kill can. Installed only when that failpoint is asked for
    (checked once per shard written: one dictionary lookup).
    """
    global _chunk_failpoint_installed
    if _chunk_failpoint_installed or not os.environ.get(artifacts.FAILPOINT_ENV, "").startswith("write:"):
        return
    from zarr.storage import _local

    original = _local._atomic_write

    @contextlib.contextmanager
    def atomic_write(path, mode, exclusive=False):
        with original(path, mode, exclusive) as fh:
            yield fh
            if path.name.isdigit():  # a chunk or shard file (metadata is zarr.json)
                fh.flush()
                artifacts.failpoint("write:after-partial")

    _local._atomic_write = atomic_write
    _chunk_failpoint_installed = True
