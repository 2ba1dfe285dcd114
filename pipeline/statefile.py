"""A fitted estimator as plain data: class name, params and fitted arrays in a zip, no code.

Most of our detectors (Mahalanobis, RMDS, SSD, the tied GMM, KNN on
normalised features, and the standardising wrapper around them) hold nothing
but numpy arrays, numbers and strings once fitted. For them this is a second
on-disk form beside skops (:mod:`pipeline.persist` picks it when an estimator
fits it, skops otherwise), for one reason: it is read and written without
importing ``skops.io``, which lists and imports every scikit-learn estimator
at import (about 0.6 s on 2 cores, paid by every ``fit``, ``detect`` and
``calibrate`` before it touches a detector).

The archive (stored, not compressed; fixed timestamps) holds ``state.json``
and one ``<i>.npy`` per array, numbered in a depth-first walk of the state
with keys sorted, so the same fitted estimator always gives the same bytes.
``state.json`` is ``{"format": FORMAT, "root": node}`` where a node is

- a JSON string, bool, int, finite float or null, as itself;
- ``{"list": [...]}``, ``{"tuple": [...]}``, ``{"dict": {str: node}}``;
- ``{"float": "nan" | "inf" | "-inf"}``;
- ``{"scalar": dtype, "value": v}``, a numpy scalar (``np.float64(0.5)``);
- ``{"array": "3.npy"}``, read with ``allow_pickle=False`` (plain dtypes only);
- ``{"estimator": "module.Class", "params": node, "attrs": node}``: built as
  ``Class(**params)``, then its fitted attributes set; only classes the
  caller's allowlist names (and :data:`SKLEARN_CLASSES`) are built;
- ``{"neighbors": "sklearn...NearestNeighbors", "params": node, "data": node}``:
  a neighbours index, refitted on its training rows at load (its KD- or
  ball-tree is C state, not data; refitting on the same rows gives the same
  index and the same answers).

Loading never runs code a file names: a class is imported only when the
allowlist names it, and arrays are never unpickled.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import numbers
import zipfile

import numpy as np

FORMAT = "layerscope-estimator/1"
STATE = "state.json"
SUFFIX = ".zip"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold: no clock reading in the file
NEIGHBORS = "sklearn.neighbors._unsupervised.NearestNeighbors"
#: scikit-learn classes this form knows how to rebuild: a scaler (arrays only) and a neighbours index
SKLEARN_CLASSES = frozenset({"sklearn.preprocessing._data.StandardScaler", NEIGHBORS})
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class Unsupported(TypeError):
    """The estimator holds a value this form cannot write (a C object, a callable...): use skops."""


# ------------------------------------------------------------------ writing


def dumps(estimator, allowlist) -> bytes:
    """The archive bytes of ``estimator``.

    Parameters
    ----------
    estimator : BaseEstimator
        Fitted (or not); every class in it must be in ``allowlist`` or
        :data:`SKLEARN_CLASSES`.
    allowlist : collection of str
        Fully qualified class names that may be written (and later built).

    Raises
    ------
    Unsupported
        Something in it is not plain data or not an allowed class.
    """
    writer = _Writer(frozenset(allowlist) | SKLEARN_CLASSES)
    state = {"format": FORMAT, "root": writer.node(estimator)}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        write_entry(archive, STATE, json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
        for name, array in writer.arrays:
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            write_entry(archive, name, buffer.getvalue())
    return out.getvalue()


class _Writer:
    def __init__(self, allowlist):
        self.allowlist, self.arrays = allowlist, []

    def node(self, value):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.ndarray):
            return self._array(value)
        if isinstance(value, np.generic):
            return self._scalar(value)
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, (list, tuple)):
            return {type(value).__name__: [self.node(v) for v in value]}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise Unsupported(f"a dict with non-string keys: {sorted(map(repr, value))[:3]}")
            return {"dict": {k: self.node(value[k]) for k in sorted(value)}}
        return self._object(value)

    def _array(self, array):
        if array.dtype.kind not in "biufc" or array.dtype.names is not None:
            raise Unsupported(f"an array of dtype {array.dtype}")
        name = f"{len(self.arrays)}.npy"
        self.arrays.append((name, array))
        return {"array": name}

    def _scalar(self, value):
        if value.dtype.kind not in "biuf":
            raise Unsupported(f"a numpy scalar of dtype {value.dtype}")
        item = value.item()
        return {"scalar": value.dtype.str, "value": item if math.isfinite(item) else repr(item)}

    def _object(self, obj):
        name = qualified_name(type(obj))
        if name not in self.allowlist or not hasattr(obj, "get_params"):
            raise Unsupported(f"an object of type {name}")
        try:
            params = obj.get_params(deep=False)
        except AttributeError as exc:  # a parameter missing: not an estimator this code wrote
            raise Unsupported(str(exc)) from None
        if name == NEIGHBORS:  # C state (a tree): keep the rows it was fitted on, refit at load
            return {"neighbors": name, "params": self.node(params), "data": self.node(obj._fit_X)}
        attrs = {k: v for k, v in vars(obj).items() if k not in params}
        return {"estimator": name, "params": self.node(params), "attrs": self.node(attrs)}


def qualified_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def write_entry(archive, name, data):
    """One stored zip entry with no clock reading and fixed attributes: the same data, the same bytes."""
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # unix, whatever the platform
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


# ------------------------------------------------------------------ reading


def loads(data: bytes, allowlist):
    """Build the estimator ``data`` holds, refusing any class outside ``allowlist`` (and :data:`SKLEARN_CLASSES`).

    Raises
    ------
    zipfile.BadZipFile
        ``data`` is not a zip.
    ValueError
        A malformed archive, or a class it names is not allowed (the message
        says which).
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        try:
            state = json.loads(archive.read(STATE))
        except KeyError:
            raise ValueError(f"no {STATE} in the archive") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{STATE} is not of format {FORMAT!r}")
        return _Reader(archive, frozenset(allowlist) | SKLEARN_CLASSES).node(state.get("root"))


class _Reader:
    def __init__(self, archive, allowlist):
        self.archive, self.allowlist = archive, allowlist

    def node(self, node):
        if node is None or isinstance(node, (bool, str, int, float)):
            return node
        if not isinstance(node, dict) or len(node) == 0:
            raise ValueError(f"a malformed node: {str(node)[:80]}")
        if "list" in node or "tuple" in node:
            items = [self.node(v) for v in node.get("list", node.get("tuple"))]
            return items if "list" in node else tuple(items)
        if "dict" in node:
            return {k: self.node(v) for k, v in node["dict"].items()}
        if "float" in node:
            return _NON_FINITE[node["float"]]
        if "scalar" in node:
            value = node["value"]
            return np.dtype(node["scalar"]).type(_NON_FINITE.get(value, value) if isinstance(value, str) else value)
        if "array" in node:
            with self.archive.open(node["array"]) as fh:
                return np.load(io.BytesIO(fh.read()), allow_pickle=False)
        if "neighbors" in node:
            return self._class(node["neighbors"])(**self.node(node["params"])).fit(self.node(node["data"]))
        if "estimator" in node:
            cls = self._class(node["estimator"])
            params = self.node(node["params"])
            missing = sorted(set(cls._get_param_names()) - set(params))
            if missing:  # written before the class gained a parameter: its default may not be what was fitted
                raise StaleParams(f"'{cls.__name__}' object has no attribute '{missing[0]}'")
            estimator = cls(**params)
            for key, value in self.node(node["attrs"]).items():
                setattr(estimator, key, value)
            return estimator
        raise ValueError(f"a node of unknown kind {sorted(node)[:3]}")

    def _class(self, name):
        """The class ``name``, imported only when the allowlist names it."""
        if not isinstance(name, str) or name not in self.allowlist:
            raise DisallowedClass(name)
        module, _, qualname = name.rpartition(".")
        return getattr(importlib.import_module(module), qualname)


class StaleParams(AttributeError):
    """The archive lacks a parameter the class has now (written by an older version)."""


class DisallowedClass(ValueError):
    """The archive names a class outside the allowlist; ``args[0]`` is its name."""
