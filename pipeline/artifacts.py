"""What layerscope writes: checked before the work, published atomically, verified on read.

The three directories the pipeline hands on (the benchmark, the feature store
and the fitted detectors) share one mechanism, so each promise is kept in one
place:

* **Never destroy what layerscope did not write.** :func:`check_output` runs
  before any work: an output path that exists must be an artifact of the same
  kind (recognised by its own marker) or an empty directory; a regular file, a
  user's folder or an artifact of another kind is refused in one line. The
  parent must be writable, so a read-only ``cache/`` fails at once, not after
  the work.
* **Atomic publish.** A directory is built elsewhere and :func:`publish_dir`
  swaps it in: the old one is renamed aside, the new one renamed into place,
  then the old one deleted. Each step is one rename on one filesystem, so a
  reader sees the old artifact, the new one, or nothing: never a mixture, never
  a half-deleted directory.
* **A manifest written last.** :func:`seal` deletes what is not part of the
  artifact (temporary files such as zarr's ``*.partial``), then writes
  ``layerscope.json``: the kind, every other file with its size and SHA-256,
  and a digest of the manifest itself. :func:`check_sealed` compares the
  files with it: names and sizes always (a ``stat`` per file), contents too
  when ``deep`` (:command:`layerscope verify`).
* **Failpoints**, for fault-injection tests only: with the environment variable
  ``LAYERSCOPE_FAILPOINT=<name>`` (or ``<name>@<n>``, the n-th time), the
  process SIGKILLs itself at the :func:`failpoint` of that name, e.g.
  ``publish:after-aside``. Unset, each point costs one dictionary lookup.

The manifest lists relative paths only and no clock reading, so the same
inputs give the same bytes (DVC's hashes stay put).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import IntegrityError, OutputError

log = logging.getLogger(__name__)

SEAL = "layerscope.json"
SEAL_FORMAT = 1
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Kind:
    """One kind of directory artifact.

    Attributes
    ----------
    name : str
        How messages call it, e.g. ``"feature store"``; also the manifest's ``kind``.
    marker : callable, optional
        ``marker(path) -> bool``: recognises an artifact of this kind written before
        manifests existed (so it may be replaced).
    hint : str
        How to rebuild it, ending a message about a damaged one.
    """

    name: str
    hint: str
    marker: Callable[[Path], bool] | None = None

    def recognises(self, path: Path) -> bool:
        """Whether ``path`` is a directory this kind may replace."""
        sealed = read_seal(path, missing_ok=True, damaged_ok=True)
        if sealed is not None:
            return sealed.get("kind") == self.name
        return self.marker is not None and self.marker(path)


# ------------------------------------------------------------------ before the work


def is_url(path) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://...``, ``file:///...``) rather than a local path."""
    return "://" in str(path)


def location(path):
    """A URL stays a string (``Path`` would fold its ``//``); anything else becomes a ``Path``.

    Here, not in :mod:`pipeline.store`, so that a command resolves its paths without importing zarr.
    """
    return str(path) if is_url(path) else Path(path)


def check_output(path, kind: Kind, option: str = "--out") -> Path:
    """Refuse, before any work, an output path this run would destroy or cannot write.

    Parameters
    ----------
    path : path-like
        Where the artifact goes.
    kind : Kind
    option : str
        The option or parameter that named ``path``, for the message.

    Returns
    -------
    Path

    Raises
    ------
    OutputError
        ``path`` is a file, or a non-empty directory that is not a ``kind``
        written by layerscope, or its parent cannot be written.
    """
    path = Path(path)
    if path.is_symlink() or path.exists():
        if not path.is_dir():
            raise OutputError(f"{option} '{path}' is an existing file; expected a {kind.name} directory (or a new "
                              f"path). Hint: choose another {option}, or move the file away.")
        if any(path.iterdir()) and not kind.recognises(path):
            raise OutputError(f"Refusing to replace '{path}' ({option}): it is a non-empty directory that is not a "
                              f"{kind.name} written by layerscope (no {SEAL} of kind '{kind.name}'). Hint: choose "
                              f"another {option}, or move that directory away.")
    check_writable_parent(path, option)
    return path


def check_file_output(path, what: str, option: str = "--out") -> Path:
    """Refuse a file output that is a directory, or whose directory cannot be written, before any work."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} '{path}' is a directory; expected a file path for the {what}. Hint: name a "
                          "file (a new file inside that directory is fine).")
    check_writable_parent(path, option)
    return path


def check_dir_output(path, what: str, option: str = "--out") -> Path:
    """Refuse, before any work, a directory to write files into that is a file or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} '{path}' is an existing file; expected a directory for the {what}. "
                          f"Hint: choose another {option}.")
    check_writable_parent(path / "x", option)
    return path


def check_writable_parent(path: Path, option: str):
    """The nearest existing ancestor of ``path`` must be a directory this process can write into."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} '{path}' cannot be created: '{parent}' is a file, not a directory. "
                          f"Hint: choose another {option}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} '{path}' cannot be written: no write permission on '{parent}'. "
                          f"Hint: fix the permissions, or choose another {option}.")


# ------------------------------------------------------------------ publishing


def control_dir(path) -> Path:
    """``<parent>/.staging``: where builds, locks and displaced artifacts live, beside their target.

    Beside, so renames between them stay on one filesystem (atomic).
    """
    return Path(path).parent / ".staging"


@contextlib.contextmanager
def artifact_lock(path, what: str):
    """Hold an exclusive lock on the artifact at ``path`` (one writer at a time).

    The lock file (``.staging/<name>.lock``) is never deleted: deleting it while
    held would let a second writer lock a new file of the same name.
    """
    lock_path = control_dir(path) / f"{Path(path).name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_path, "a")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"The {what} '{path}' is being written by another process (lock held on "
                              f"'{lock_path}'). Hint: wait for it to finish; two writers would corrupt it.") from None
        yield lock_path
    finally:
        fh.close()  # closing releases the lock, after everything above (staging included) is cleaned up


def staging_dir(path, tag: str = "build") -> Path:
    """A fresh, private directory to build the artifact ``path`` in (``.staging/<name>.<tag>-XXXX``).

    Call it holding :func:`artifact_lock`: builds that a killed writer left
    behind are deleted first (no other writer can be using them).
    """
    root = control_dir(path)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{Path(path).name}.{tag}-*"):
        log.info("deleting a build left by an interrupted run: %s", stale)
        _remove(stale)
    staged = Path(tempfile.mkdtemp(dir=root, prefix=f"{Path(path).name}.{tag}-"))
    staged.chmod(0o755)  # mkdtemp's 0700 would make the published artifact private
    return staged


def publish_dir(staged, path) -> Path:
    """Swap the directory ``staged`` in at ``path``: old aside, new in, old deleted.

    A reader sees the old artifact, the new one, or (between the two renames)
    none, which it reports as missing: never a mixture. A kill during the last
    step leaves the displaced copy in ``.staging/``, which the next publish
    deletes. Call :func:`check_output` first; hold :func:`artifact_lock`.
    """
    staged, path = Path(staged), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    displaced = control_dir(path) / f"{path.name}.replaced"
    _remove(displaced)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        os.replace(path, displaced)
        failpoint("publish:after-aside")
    os.replace(staged, path)
    _fsync_dir(path.parent)
    failpoint("publish:after-swap")
    _remove(displaced)
    return path


def _remove(path: Path):
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data: bytes | str) -> Path:
    """Write a file so that it is either the old one or the whole new one (temp file, fsync, rename).

    The temporary file is unique and removed on failure, so nothing ``*.tmp`` is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------ the manifest


def seal(directory, kind: Kind, keep: Callable[[str], bool] | None = None) -> dict:
    """Write ``layerscope.json`` into ``directory``, last: its kind and every file's size and SHA-256.

    Parameters
    ----------
    directory : path-like
        A finished build, not yet published.
    kind : Kind
    keep : callable, optional
        ``keep(relative posix path) -> bool``; files it rejects (temporary
        leftovers of an interrupted write) are deleted, never published.

    Returns
    -------
    dict
        The manifest written.
    """
    directory = Path(directory)
    files = {}
    for rel in _walk(directory):
        if rel == SEAL:
            continue
        if keep is not None and not keep(rel):
            log.warning("not publishing a leftover file of an interrupted write: %s", directory / rel)
            (directory / rel).unlink()
            continue
        files[rel] = {"size": (directory / rel).stat().st_size, "sha256": file_sha256(directory / rel)}
    manifest = manifest_for(kind, files)
    failpoint("seal:before-manifest")
    atomic_write(directory / SEAL, manifest_bytes(manifest))
    return manifest


def manifest_for(kind: Kind, files: dict) -> dict:
    """The manifest of ``files`` (``relative path -> {"size", "sha256"}``), with its self-digest."""
    body = {"kind": kind.name, "format": SEAL_FORMAT, "files": files}
    return {**body, "digest": _digest(body)}


def manifest_bytes(manifest: dict) -> bytes:
    """How a manifest is written: sorted keys, so the same files give the same bytes."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def parse_seal(data: bytes, where) -> dict:
    """A manifest from its bytes, its digest checked; :class:`IntegrityError` naming ``where`` if damaged."""
    try:
        manifest = json.loads(data)
        body = {k: manifest[k] for k in ("kind", "format", "files")}
        if manifest.get("digest") != _digest(body) or not isinstance(body["files"], dict):
            raise ValueError("its digest does not match its content")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"Manifest '{where}' is damaged ({_reason(exc)}).") from None
    return manifest


def read_seal(directory, *, missing_ok=False, damaged_ok=False) -> dict | None:
    """The manifest of ``directory``; None if absent and ``missing_ok``, or unreadable and ``damaged_ok``."""
    path = Path(directory) / SEAL
    try:
        return parse_seal(path.read_bytes(), path)
    except (FileNotFoundError, NotADirectoryError):  # no manifest, or ``directory`` is a file
        if missing_ok:
            return None
        raise
    except IsADirectoryError as exc:
        if damaged_ok:
            return None
        raise IntegrityError(f"Manifest '{path}' is damaged ({_reason(exc)}).") from None
    except IntegrityError:
        if damaged_ok:
            return None
        raise


def check_sealed(directory, kind: Kind, *, deep: bool = False) -> dict:
    """Check ``directory`` against its manifest; return the manifest.

    Names and sizes are always compared (one ``stat`` per file). With ``deep``,
    every file's SHA-256 too, and files the manifest does not list are reported.

    Raises
    ------
    IntegrityError
        The manifest is missing, damaged or of another kind, or a file is
        missing, truncated, grown or (``deep``) altered. The message names the
        file and ends with ``kind.hint``.
    """
    directory = Path(directory)
    try:
        manifest = read_seal(directory)
    except FileNotFoundError:
        raise IntegrityError(f"The {kind.name} '{directory}' has no {SEAL}: it was never completely published "
                             f"(or was written by an older layerscope). Hint: {kind.hint}") from None
    except IntegrityError as exc:
        raise IntegrityError(f"The {kind.name} '{directory}' cannot be trusted: {exc} Hint: {kind.hint}") from None
    if manifest["kind"] != kind.name:
        raise IntegrityError(f"'{directory}' is a {manifest['kind']}, not a {kind.name}. Hint: {kind.hint}")
    root = os.fspath(directory)
    for rel, entry in manifest["files"].items():
        problem = _file_problem(os.path.join(root, rel), entry, deep)  # str paths: half the cost of pathlib
        if problem:
            raise IntegrityError(f"The {kind.name} '{directory}' is damaged: file '{rel}' {problem}. "
                                 f"Hint: {kind.hint}")
    if deep:
        extra = sorted(set(_walk(directory)) - set(manifest["files"]) - {SEAL})
        if extra:
            raise IntegrityError(f"The {kind.name} '{directory}' holds {len(extra)} file(s) it was not published with, "
                                 f"e.g. '{extra[0]}'. Hint: {kind.hint}")
    return manifest


def _file_problem(path: str, entry: dict, deep: bool) -> str | None:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "is missing"
    if size != entry["size"]:
        return f"has {size} bytes, expected {entry['size']}"
    if deep and file_sha256(path) != entry["sha256"]:
        return "has been altered (its SHA-256 differs from the manifest's)"
    return None


def _walk(directory: Path):
    """Every file under ``directory``, as sorted relative posix paths."""
    out = []
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            out.append((Path(dirpath) / name).relative_to(directory).as_posix())
    return sorted(out)


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _reason(exc) -> str:
    return str(exc) if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError) else (
        f"not valid JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ fault injection (tests)

FAILPOINT_ENV = "LAYERSCOPE_FAILPOINT"
_failpoint_hits: dict = {}


def failpoint(name: str):
    """SIGKILL this process here if ``LAYERSCOPE_FAILPOINT`` names this point (fault-injection tests).

    The value is ``<name>`` (the first time the point is reached) or
    ``<name>@<n>`` (the n-th time). A SIGKILL, not an exception: no ``finally``
    or ``__exit__`` runs, exactly as when the machine or the OOM killer stops
    the process. Unset (always, outside tests), this is one dictionary lookup.
    """
    wanted = os.environ.get(FAILPOINT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _failpoint_hits[name] = _failpoint_hits.get(name, 0) + 1
    if _failpoint_hits[name] == int(nth or 1):
        log.warning("failpoint %s: killing process %d", wanted, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
