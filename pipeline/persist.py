"""Fitted estimators on disk without pickles: skops files, byte-reproducible, loaded from an allowlist.

Our own estimators whose fitted state is plain data are written in a lighter
form instead, :mod:`pipeline.statefile` (read without importing skops); see
:func:`dump`. Everything below is about the skops files.

Why not joblib/pickle: unpickling runs whatever the file says (``__reduce__``
can name ``os.system``), so a crafted ``.joblib`` in a detectors directory runs
code on ``layerscope detect``. A skops file (:mod:`skops.io`) is a zip of
``schema.json`` (a tree of typed nodes) and ``.npy`` arrays (read with
``allow_pickle=False``). :func:`load` audits the tree before anything is built
(``skops.io.get_untrusted_types`` imports nothing) and refuses any type outside
the caller's allowlist, naming the file and the type; ``trusted=True`` is never
used.

Trusting ``sklearn.tree._tree.Tree`` (an isolation forest's trees) or a
neighbours index is trusting their arrays: skops warns that a crafted tree
with out-of-range node indices loads, and then reads out of bounds when
scoring (a crash, not code execution). Files are sealed
(:mod:`pipeline.artifacts`), so only a file rewritten together with its seal
gets that far.

Why canonicalise: skops output is not a function of the estimator alone.

* zip entries carry the wall-clock time of the dump;
* the ``.npy`` members are named after Python ``id()``\\ s, and every node of
  ``schema.json`` holds its object's ``id()`` as ``__id__`` (memory addresses:
  they differ between processes, and often between two dumps in one);
* a set is written in iteration order, which for strings depends on the hash
  seed of the process;
* the padding bytes of a structured array (a fitted tree's ``nodes``: 57
  bytes of fields in a 64-byte record) are whatever memory held.

:func:`dumps` therefore rewrites the archive: set elements in a content order,
``__id__``\\ s renumbered 1, 2, ... and members renamed 0.npy, 1.npy, ... in a
depth-first walk of the schema (in its own key order), entries in that order
with a fixed timestamp and mode, no compression, and padding bytes zeroed (no
field reads them). ``__id__`` only says which
nodes are one object (skops memoises nodes by it on load), so a renumbering
that is one-to-one keeps the meaning; ids start at 1 because skops ignores a
falsy id. The same fitted estimator then gives the same bytes in any process,
so DVC's hash of a fitted detector changes only when the detector does.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import types
import zipfile
from pathlib import Path

from pipeline import statefile
from pipeline.artifacts import atomic_write
from pipeline.errors import IntegrityError

SCHEMA = "schema.json"
SUFFIX = ".skops"
ZIP_EPOCH = statefile.ZIP_EPOCH  # the earliest time a zip entry can hold: no clock reading in the file
_STRUCTURED = b"'descr': ["  # how an .npy header starts the description of a structured dtype
_DEFAULT_HINT = "it was not written by layerscope; rerun the stage that writes it."


def dump(obj, stem, allowlist=()) -> Path:
    """Write ``obj`` next to ``stem`` in the lighter form it fits, atomically; returns the file written.

    Our own estimators whose state is plain data are written as a
    :mod:`pipeline.statefile` archive (``stem.zip``): reading it back does not
    import skops. Anything else is a canonical skops file (``stem.skops``).

    Parameters
    ----------
    obj : object
        A fitted estimator (anything :func:`skops.io.dumps` supports).
    stem : path-like
        The path without its suffix.
    allowlist : collection of str
        The types the file may hold (as for :func:`load`); of these, only our
        own (``pipeline.*``) classes are written as plain data.

    Returns
    -------
    Path
    """
    suffix, data = encode(obj, allowlist)
    stem = Path(stem)
    return atomic_write(stem.with_name(stem.name + suffix), data)


def encode(obj, allowlist=()) -> tuple[str, bytes]:
    """``(suffix, bytes)`` of ``obj``: a plain-data archive when it is one, else canonical skops bytes."""
    ours = [name for name in allowlist if name.startswith("pipeline.")]  # classes whose state we know is data
    try:
        return statefile.SUFFIX, statefile.dumps(obj, ours)
    except statefile.Unsupported:
        return SUFFIX, dumps(obj)


def dumps(obj) -> bytes:
    """The canonical skops bytes of ``obj``: the same object state always gives the same bytes."""
    return canonicalise(_skops_io().dumps(obj))


def load(path, allowlist, *, hint: str = _DEFAULT_HINT):
    """Load a skops file, refusing any type outside ``allowlist`` before anything is built.

    Parameters
    ----------
    path : path-like
    allowlist : collection of str
        Fully qualified type names (``"sklearn.tree._tree.Tree"``) trusted
        beyond skops' own defaults (builtins, numpy, scikit-learn estimators).
    hint : str
        Ends the refusal: how to get a trustworthy file.

    Returns
    -------
    object

    Raises
    ------
    IntegrityError
        ``path`` is not a skops file (e.g. a pickle), is malformed, or declares
        a type outside ``allowlist``: one line naming the file (and the type).
    """
    path = Path(path)
    if path.name.endswith(statefile.SUFFIX):
        return _load_state(path, allowlist, hint)
    skops_io = _skops_io()
    from skops.io.exceptions import UntrustedTypesFoundException

    data = path.read_bytes()
    try:
        # skops audits the whole node tree against the allowlist before it imports or builds anything
        return skops_io.loads(data, trusted=sorted(allowlist))
    except zipfile.BadZipFile:
        raise IntegrityError(f"Refusing to load '{path}': it is not a skops file (pickles and joblib files are never "
                             f"loaded: they can run code). Hint: {hint}") from None
    except UntrustedTypesFoundException:
        refused = sorted(set(skops_io.get_untrusted_types(data=data)) - set(allowlist))
        raise IntegrityError(f"Refusing to load '{path}': it declares type '{refused[0]}'"
                             f"{f' (and {len(refused) - 1} more)' if len(refused) > 1 else ''}, which is not a type "
                             f"layerscope trusts there. Hint: {hint}") from None
    except (KeyError, ValueError, TypeError) as exc:  # a malformed schema, a member it names missing, bad arrays
        raise IntegrityError(f"Refusing to load '{path}': not a valid skops file ({type(exc).__name__}: "
                             f"{_one_line(exc)}). Hint: {hint}") from None


def _load_state(path: Path, allowlist, hint: str):
    """:func:`load` for a plain-data archive (:mod:`pipeline.statefile`); the same one-line refusals."""
    try:
        return statefile.loads(path.read_bytes(), allowlist)
    except zipfile.BadZipFile:
        raise IntegrityError(f"Refusing to load '{path}': it is not a zip archive of arrays (pickles and joblib files "
                             f"are never loaded: they can run code). Hint: {hint}") from None
    except statefile.StaleParams:
        raise  # the caller words it (an older layerscope wrote the file)
    except statefile.DisallowedClass as exc:
        raise IntegrityError(f"Refusing to load '{path}': it declares type '{exc.args[0]}', which is not a type "
                             f"layerscope trusts there. Hint: {hint}") from None
    except (KeyError, ValueError, TypeError, AttributeError, ImportError) as exc:  # malformed state or members
        raise IntegrityError(f"Refusing to load '{path}': not a valid estimator archive ({type(exc).__name__}: "
                             f"{_one_line(exc)}). Hint: {hint}") from None


#: The array-API shims scikit-learn vendors for other array libraries, and the library each one imports.
_SHIMS = {"sklearn.externals.array_api_compat.torch": "torch",
          "sklearn.externals.array_api_compat.dask": "dask.array",
          "sklearn.externals.array_api_compat.cupy": "cupy"}
_SKOPS_IMPORT = threading.Lock()


def _skops_io():
    """:mod:`skops.io`, imported without importing torch or dask.array.

    At import, skops lists scikit-learn's estimators
    (``sklearn.utils.all_estimators``). Its walk over scikit-learn's packages
    imports each package it passes, among them the array-API shims for torch,
    dask and cupy, which import their libraries: seconds for torch (and a GPU
    build's CUDA libraries), about 0.3 s for dask.array, in every ``fit``,
    ``detect``, ``calibrate``, ``guard`` and ``search`` that never uses them.
    While skops imports, a stand-in for each shim whose library is not loaded
    yet (no estimator lives in a shim) stops the walk there; the stand-ins are
    removed afterwards, so a later ``import`` of a shim is real.
    """
    if "skops.io" not in sys.modules:
        with _SKOPS_IMPORT:  # one thread puts the stand-ins in and takes them out
            if "skops.io" not in sys.modules:
                _import_skops_without_shims()
    import skops.io

    return skops.io


def _import_skops_without_shims():
    stand_ins = {}
    for shim, library in _SHIMS.items():
        if shim not in sys.modules and library not in sys.modules:
            stand_ins[shim] = sys.modules[shim] = types.ModuleType(shim)
            stand_ins[shim].__path__ = []
    try:
        import skops.io  # noqa: F401
    finally:
        for shim, stand_in in stand_ins.items():
            if sys.modules.get(shim) is stand_in:
                del sys.modules[shim]


# ------------------------------------------------------------------ canonical form


def canonicalise(raw: bytes) -> bytes:
    """Rewrite skops bytes into their canonical form (see the module's docs)."""
    with zipfile.ZipFile(io.BytesIO(raw)) as src:
        schema = json.loads(src.read(SCHEMA))
        members = {name for name in src.namelist() if name != SCHEMA}
        renamer = _Renamer(members)
        schema = renamer.walk(schema)
        orphans = members - set(renamer.files)
        if orphans:  # skops wrote a member its schema does not name: this code does not know the format
            raise RuntimeError(f"skops wrote members its schema does not name: {sorted(orphans)}")
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            # compact: 3x smaller, faster
            statefile.write_entry(dst, SCHEMA, json.dumps(schema, separators=(",", ":")).encode())
            for old, new in renamer.files.items():  # in walk order
                data = src.read(old)
                statefile.write_entry(dst, new, _zero_padding(data) if new.endswith(".npy") else data)
    return out.getvalue()


def _zero_padding(data: bytes) -> bytes:
    """An ``.npy`` file with the padding bytes of its structured records set to zero (header untouched)."""
    import numpy as np

    if _STRUCTURED not in data[:4096]:  # the header of a plain array (a false hit only costs the parse below)
        return data
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, _, dtype = read_header(buffer)
    if dtype.names is None or dtype.itemsize == 0:
        return data
    padding = ~_covered(dtype)
    if not padding.any():
        return data
    out = bytearray(data)
    records = np.frombuffer(out, dtype=np.uint8, offset=buffer.tell()).reshape(-1, dtype.itemsize)
    records[:, padding] = 0
    return bytes(out)


def _covered(dtype) -> "np.ndarray":
    """``(itemsize,)`` bool: the bytes of one record that some field (at any depth) occupies."""
    import numpy as np

    mask = np.zeros(dtype.itemsize, dtype=bool)
    if dtype.names is None and dtype.subdtype is None:
        mask[:] = True
    elif dtype.subdtype is not None:  # a fixed-size array of ``base``
        base, shape = dtype.subdtype
        mask[:] = np.tile(_covered(base), int(np.prod(shape)))
    else:
        for name in dtype.names:
            field, offset = dtype.fields[name][:2]
            mask[offset:offset + field.itemsize] |= _covered(field)
    return mask


class _Renamer:
    """Depth-first walk of a skops schema: ``__id__`` -> 1, 2, ...; member files -> 0.npy, 1.npy, ...

    A set's elements are put in an order of their content first (not of the
    process's hash seed), so the numbering that follows is fixed too.
    """

    def __init__(self, members):
        self.members = members
        self.ids: dict[int, int] = {}
        self.files: dict[str, str] = {}

    def walk(self, value):
        if isinstance(value, list):
            return [self.walk(v) for v in value]
        if not isinstance(value, dict):
            return value
        node = "__loader__" in value
        if node and value["__loader__"] == "SetNode" and isinstance(value.get("content"), list):
            value = {**value, "content": sorted(value["content"],
                                                key=lambda item: json.dumps(_without_ids(item), sort_keys=True))}
        out = {}
        for key, item in value.items():
            if node and key == "__id__" and isinstance(item, int):
                out[key] = self.ids.setdefault(item, len(self.ids) + 1)
            elif node and key == "file" and item in self.members:
                out[key] = self.files.setdefault(item, f"{len(self.files)}{Path(item).suffix}")
            else:
                out[key] = self.walk(item)
        return out


def _without_ids(value):
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: _without_ids(v) for k, v in value.items() if k not in ("__id__", "file")}


def _one_line(exc) -> str:
    return " ".join(str(exc).split())[:200]
