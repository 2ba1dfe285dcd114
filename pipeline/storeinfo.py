"""What is in a feature store, and what its activations look like.

The data behind ``layerscope inspect PATH``:

- :func:`summarize_store` reads metadata and file sizes only (never array data),
  so it is instant on a store of any size: every split's arrays with their
  shape, dtype, chunk and shard shapes, codecs, raw and on-disk bytes.
- :func:`layer_stats` computes per-feature statistics of one layer lazily with
  dask, one task per shard, in one ``dask.compute`` per split, so memory is
  bounded by one shard per task whatever the number of samples.
- :func:`summary_tables` and :func:`stats_tables` turn both into rich tables.

Both dicts hold plain JSON types only (lists, floats, ints, ``None`` for an
undefined statistic such as the mean of an all-NaN feature), so they can be
written with ``json.dumps`` as they are.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import zarr
from rich import box
from rich.table import Column, Table

from pipeline.errors import StoreError
from pipeline.store import FeatureStore, open_store

FEATURE_STATS = ("mean", "std", "min", "max", "nan", "inf", "zero_fraction")


# --------------------------------------------------------------------------- summary (metadata only)


def summarize_store(store, split: str | None = None) -> dict:
    """Describe a store from its metadata and file sizes, without reading array data.

    Parameters
    ----------
    store : FeatureStore or path
        An open store, or the path of one (opened with :func:`open_store`).
    split : str, optional
        Describe this split only (the totals stay the whole store's).

    Returns
    -------
    dict
        ``{"path", "complete", "provenance", "layers", "splits", "totals"}``.
        ``splits[split] = {"attrs": {...}, "arrays": {name: info}}`` where
        ``info`` has ``shape``, ``dtype``, ``chunks``, ``shards``,
        ``dimension_names``, ``compressors`` (short names such as
        ``"zstd(level=3)"``), ``raw_bytes`` (uncompressed size),
        ``stored_bytes`` and ``n_files`` (the files of the array's directory,
        metadata included) and ``ratio`` (raw / stored). ``totals`` has
        ``raw_bytes`` (sum over arrays), and ``stored_bytes`` and ``n_files``
        of the whole store directory (what DVC hashes and caches), and
        ``ratio``.
    """
    store = _as_store(store)
    splits = {name: _summarize_split(store, name) for name in ([split] if split else store.splits)}
    raw = sum(info["raw_bytes"] for s in splits.values() for info in s["arrays"].values())
    stored, n_files = _disk_usage(store.path)
    return {
        "path": str(store.path), "complete": True, "provenance": store.provenance, "layers": store.layers,
        "splits": splits,
        "totals": {"raw_bytes": raw, "stored_bytes": stored, "ratio": _ratio(raw, stored), "n_files": n_files},
    }


def _as_store(store) -> FeatureStore:
    """An open store; a path is opened (and refused if missing or incomplete)."""
    return store if isinstance(store, FeatureStore) else open_store(store)


def _summarize_split(store: FeatureStore, split: str) -> dict:
    names = store.array_names(split)
    return {"attrs": store.split_attrs(split),
            "arrays": {name: array_info(store.array(split, name)) for name in names}}


def array_info(arr: zarr.Array) -> dict:
    """Metadata and on-disk size of one zarr array (no data is read).

    Parameters
    ----------
    arr : zarr.Array
        An array of a store on the local file system.

    Returns
    -------
    dict
        See :func:`summarize_store`.
    """
    stored, n_files = _disk_usage(array_dir(arr))
    return {
        "shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
        "shards": list(arr.shards) if arr.shards else None,
        "dimension_names": list(arr.metadata.dimension_names or ()),
        "compressors": [codec_name(codec) for codec in arr.compressors],
        "raw_bytes": int(arr.nbytes), "stored_bytes": stored, "n_files": n_files,
        "ratio": _ratio(arr.nbytes, stored),
    }


def array_dir(arr: zarr.Array) -> Path:
    """The directory holding a zarr array of a local store (its metadata and shards)."""
    root = getattr(arr.store, "root", None)
    if root is None:
        raise StoreError(f"Array '{arr.path}' is not in a local directory store ({type(arr.store).__name__}). "
                         "Hint: inspect a store on the local file system.")
    return Path(root) / arr.path


def codec_name(codec) -> str:
    """A codec's short name with its set options, e.g. ``"zstd(level=3)"``."""
    spec = codec.to_dict()
    options = {k: v for k, v in (spec.get("configuration") or {}).items() if v not in (False, None)}
    args = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{spec['name']}({args})" if args else spec["name"]


def _disk_usage(path: Path) -> tuple[int, int]:
    """Total size in bytes and number of the files under ``path``."""
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files]
    return sum(sizes), len(sizes)


def _ratio(raw: int, stored: int) -> float | None:
    return raw / stored if stored else None


# --------------------------------------------------------------------------- statistics (lazy, by shard)


def layer_stats(store, layer: str, split: str | None = None) -> dict:
    """Per-feature summary statistics of one layer (or any array of the store), computed lazily with dask.

    An array that is not a pooled layer (an unpooled map ``map.<layer>``, the
    input ``image``, ``logits``, ``energy``, ``label``) is read as
    ``(n_samples, prod(trailing dims))``: every value of a sample is a feature.

    Each split is one ``dask.compute`` over a graph with one read task per
    shard, so memory is bounded by a shard per task, not by ``n_samples``.
    ``mean``, ``std``, ``min`` and ``max`` ignore non-finite values (inf is
    masked to NaN, then NaN-aware reductions are used); ``std`` is the
    population standard deviation (ddof=0).

    Parameters
    ----------
    store : FeatureStore or path
    layer : str
        One of ``store.layers``.
    split : str, optional
        One split; default: every split of the store.

    Returns
    -------
    dict
        ``{"path", "layer", "splits": {split: {"summary": {...}, "features": {...}}}}``.
        ``summary`` has ``n_samples``, ``n_features``, ``mean``, ``std``,
        ``min``, ``max`` (over every finite value), ``nan``, ``inf`` (total
        counts), ``dead_units`` (features equal to 0 on every sample) and
        ``dead_fraction``. ``features`` maps each of ``mean``, ``std``,
        ``min``, ``max``, ``nan``, ``inf``, ``zero_fraction`` (fraction of
        samples where the unit is exactly 0) to a list of length
        ``n_features``. Undefined values (no finite sample) are ``None``.

    Raises
    ------
    StoreError
        If ``layer`` is not a layer of the store, or ``split`` not one of its splits.
    """
    store = _as_store(store)
    splits = store.splits if split is None else [split]
    for name in splits:
        _check_array(store, name, layer)
    return {"path": str(store.path), "layer": layer,
            "splits": {name: _split_stats(_as_rows(store.to_dask(name, layer))) for name in splits}}


def _check_array(store: FeatureStore, split: str, name: str):
    arrays = store.array_names(split)  # also refuses an unknown split, listing the store's
    if name in arrays:
        return
    hint = ("features exist only for the layers in params.yaml's `extract.layers`; add it there and rerun "
            "`dvc repro extract`." if not name.startswith(("map.", "image")) else
            "unpooled maps and images exist only when extract.maps / extract.images ask for them.")
    raise StoreError(f"Array {name!r} is not in split '{split}' of store '{store.path}'. It has {arrays}. "
                     f"Hint: {hint}")


def _as_rows(x):
    """A dask array as (n_samples, n_values): 1-D arrays get one column, N-D arrays are flattened per sample."""
    if x.ndim == 1:
        return x[:, None]
    return x if x.ndim == 2 else x.reshape(x.shape[0], -1)


def _split_stats(x) -> dict:
    """Statistics of a dask array of shape (n_samples, n_features), in one compute."""
    import dask  # dask: only for --stats (inspect's summary reads metadata only)

    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features: the statistic is None
        features, overall = dask.compute(*lazy_feature_stats(x))
    n_samples, n_features = x.shape
    dead = int(np.sum(features["zero_fraction"] == 1.0)) if n_samples else 0
    summary = {"n_samples": int(n_samples), "n_features": int(n_features), **overall, "dead_units": dead,
               "dead_fraction": dead / n_features if n_features else 0.0}
    return {"summary": _plain(summary), "features": _plain(features)}


def lazy_feature_stats(x) -> tuple[dict, dict]:
    """The lazy reductions behind :func:`layer_stats`.

    Parameters
    ----------
    x : dask array of shape (n_samples, n_features)

    Returns
    -------
    features : dict of dask arrays of shape (n_features,)
        ``mean``, ``std``, ``min``, ``max``, ``nan``, ``inf``, ``zero_fraction``.
    overall : dict of dask scalars
        ``mean``, ``std``, ``min``, ``max`` over all finite values, ``nan``, ``inf``.
    """
    import dask.array as da

    if x.shape[0] == 0:
        return _empty_stats(x.shape[1])
    x = x.astype(np.float64)
    finite = da.where(da.isfinite(x), x, np.nan)
    nan, inf = da.isnan(x), da.isinf(x)
    features = {"mean": da.nanmean(finite, axis=0), "std": da.nanstd(finite, axis=0),
                "min": da.nanmin(finite, axis=0), "max": da.nanmax(finite, axis=0),
                "nan": nan.sum(axis=0), "inf": inf.sum(axis=0), "zero_fraction": (x == 0).mean(axis=0)}
    overall = {"mean": da.nanmean(finite), "std": da.nanstd(finite), "min": da.nanmin(finite),
               "max": da.nanmax(finite), "nan": nan.sum(), "inf": inf.sum()}
    return features, overall


def _empty_stats(n_features: int) -> tuple[dict, dict]:
    """Statistics of a split without samples: undefined values, zero counts."""
    undefined, zeros = np.full(n_features, np.nan), np.zeros(n_features, dtype=np.int64)
    features = {name: zeros if name in ("nan", "inf") else undefined for name in FEATURE_STATS}
    return features, {"mean": np.nan, "std": np.nan, "min": np.nan, "max": np.nan, "nan": 0, "inf": 0}


def _plain(values: dict) -> dict:
    """numpy values as JSON types: arrays become lists, NaN becomes None."""
    return {key: _plain_value(value) for key, value in values.items()}


def _plain_value(value):
    if isinstance(value, np.ndarray) and value.ndim:
        return [_plain_value(v) for v in value.tolist()]
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


# --------------------------------------------------------------------------- rich renderables


#: Below this terminal width the arrays table drops chunk, shard, raw and ratio (and joins split/array):
#: nine columns squeezed into 80 would be truncated to "c… sh… s…".
WIDE = 110


def summary_tables(summary: dict, width: int | None = None) -> list[Table]:
    """Rich tables of :func:`summarize_store`'s result: the arrays, then the provenance.

    Parameters
    ----------
    summary : dict
        As returned by :func:`summarize_store`.
    width : int, optional
        The terminal's width: below :data:`WIDE`, a narrow arrays table
        (``split/array``, shape, dtype, stored) that is read without truncation.

    Returns
    -------
    list of rich.table.Table
    """
    arrays = _narrow_arrays_table(summary) if width is not None and width < WIDE else _arrays_table(summary)
    return [arrays, _provenance_table(summary["provenance"])]


def _narrow_arrays_table(summary: dict) -> Table:
    totals = summary["totals"]
    table = Table(Column("array", overflow="fold"), Column("shape", no_wrap=True), Column("dtype", no_wrap=True),
                  Column("stored", no_wrap=True, justify="right"), box=box.SIMPLE_HEAD,
                  title=f"feature store {summary['path']}",
                  caption=f"total: {human_bytes(totals['stored_bytes'])} stored in {totals['n_files']} files "
                          f"({_fmt_ratio(totals['ratio'])}); chunking: `layerscope inspect --json`")
    for split, content in summary["splits"].items():
        for name, info in content["arrays"].items():
            table.add_row(f"{split}/{name}", _fmt_shape(info["shape"]), info["dtype"],
                          human_bytes(info["stored_bytes"]))
        table.add_section()
    return table


def _arrays_table(summary: dict) -> Table:
    totals = summary["totals"]
    names = [Column(h, no_wrap=True) for h in ("split", "array", "shape", "dtype")]
    table = Table(*names, "chunk", "shard", "stored", "raw", "ratio", box=box.SIMPLE_HEAD,
                  title=f"feature store {summary['path']}",
                  caption=f"total: {human_bytes(totals['stored_bytes'])} stored in {totals['n_files']} files, "
                          f"{human_bytes(totals['raw_bytes'])} raw ({_fmt_ratio(totals['ratio'])})")
    for split, content in summary["splits"].items():
        for i, (name, info) in enumerate(content["arrays"].items()):
            table.add_row(split if i == 0 else "", name, _fmt_shape(info["shape"]), info["dtype"], _fmt_shape(info["chunks"]),
                          _fmt_shape(info["shards"]), human_bytes(info["stored_bytes"]),
                          human_bytes(info["raw_bytes"]), _fmt_ratio(info["ratio"]))
        table.add_section()
    return table


def _provenance_table(provenance: dict) -> Table:
    table = Table("key", "value", title="provenance")
    for key, value in flatten(provenance).items():
        table.add_row(key, str(value))
    return table


def flatten(mapping: dict, prefix: str = "") -> dict:
    """Nested dicts as one level with dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stats_tables(stats: dict, max_features: int = 32) -> list[Table]:
    """Rich tables of :func:`layer_stats`'s result: one summary row per split, then each split's features.

    Parameters
    ----------
    stats : dict
        As returned by :func:`layer_stats`.
    max_features : int, default=32
        Rows of each per-feature table; the caption says how many were left out.

    Returns
    -------
    list of rich.table.Table
    """
    per_split = [_features_table(stats["layer"], split, content["features"], max_features)
                 for split, content in stats["splits"].items()]
    return [_stats_summary_table(stats), *per_split]


def _stats_summary_table(stats: dict) -> Table:
    table = Table("split", "samples", "features", "mean", "std", "min", "max", "NaN", "inf", "dead units",
                  title=f"layer {stats['layer']!r} of {stats['path']}")
    for split, content in stats["splits"].items():
        s = content["summary"]
        table.add_row(split, str(s["n_samples"]), str(s["n_features"]),
                      *(_fmt_num(s[key]) for key in ("mean", "std", "min", "max")), str(s["nan"]), str(s["inf"]),
                      f"{s['dead_units']} ({_fmt_percent(s['dead_fraction'])})")
    return table


def _features_table(layer: str, split: str, features: dict, max_features: int) -> Table:
    n_features = len(features["mean"])
    shown = min(n_features, max(0, max_features))
    omitted = n_features - shown
    caption = f"{omitted} of {n_features} features not shown (max_features={max_features})" if omitted else None
    table = Table("feature", *(header for header, _ in FEATURE_COLUMNS.values()),
                  title=f"{split}: {layer} per feature", caption=caption)
    for i in range(shown):
        table.add_row(str(i), *(fmt(features[name][i]) for name, (_, fmt) in FEATURE_COLUMNS.items()))
    return table


def human_bytes(n: int | None) -> str:
    """A byte count in binary units: ``1536 -> "1.5 KiB"``; None gives ``"-"``."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024:
            break
    return f"{value:.1f} {unit}"


def _fmt_num(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fmt_percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _fmt_ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt_shape(shape) -> str:
    return "-" if not shape else "x".join(map(str, shape))


# per-feature table: statistic -> (column header, formatter)
FEATURE_COLUMNS = {"mean": ("mean", _fmt_num), "std": ("std", _fmt_num), "min": ("min", _fmt_num),
                   "max": ("max", _fmt_num), "nan": ("NaN", str), "inf": ("inf", str),
                   "zero_fraction": ("zero", _fmt_percent)}
