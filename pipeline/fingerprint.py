"""Content fingerprints of the inputs DVC cannot see, with a stat-keyed hash cache.

DVC hashes what ``dvc.yaml`` names, but two inputs live outside it: the data
under ``generate.root`` (a path given in params, often on another mount) and a
user's checkpoint (``train.checkpoint``, or the file torchvision caches for
``train.weights``). Naming their paths as params would make DVC see a *path*,
not the bytes: overwriting a file in place would go unnoticed, and moving
identical data elsewhere would rerun everything. So the ``inputs`` stage
(``always_changed``, cheap) writes what those files *contain* into small JSON
files (:func:`generate_inputs`, :func:`train_inputs`), and the stages that read
them depend on those files. Paths in them are relative to the data set's own
directory, never absolute, so the same bytes under another root give the same
JSON (and DVC reruns nothing).

Hashing a 100k-file root on every ``dvc repro`` would be slow, so
:class:`HashCache` remembers each file's SHA-256 in a small SQLite database
outside the repository, keyed by the file's real path and its ``stat`` (size,
mtime and ctime in ns, inode, device): a file is read again only when one of
them changed. Any write to a file changes its mtime and ctime, so a changed
file always misses the cache, whatever its size, with one exception the cache
guards against as git does ("racily clean" entries): a write within the same
timestamp tick as the hash. An entry is therefore stored only for files whose
mtime and ctime are :data:`RACY_SECONDS` older than the hashing.

Which files a data set's loader reads is worked out here too, without torch
(:func:`source_files`), including the image lists of OpenOOD v1.5
(:func:`read_imglist`): the list file and every image it names.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.errors import DataError

log = logging.getLogger(__name__)

CACHE_ENV = "LAYERSCOPE_HASH_CACHE"
# A write within this many seconds of the stat could share its timestamp tick
# (1-2 s on some filesystems, a few ms on ext4): such entries are not stored.
RACY_SECONDS = 2.0
# Above this many files (or bytes) to hash, a progress bar is shown.
PROGRESS_FILES = 500
PROGRESS_BYTES = 256 << 20
_BATCH = 500  # paths per SQL query (below SQLite's variable limit)
_BLOCK = 1 << 20
_SCHEMA = "CREATE TABLE IF NOT EXISTS sha256 (path TEXT PRIMARY KEY, stat TEXT NOT NULL, digest TEXT NOT NULL)"


def default_cache_path() -> Path:
    """``$LAYERSCOPE_HASH_CACHE``, else ``$XDG_CACHE_HOME/layerscope/hashes.sqlite3`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "layerscope" / "hashes.sqlite3"


def _stat_key(st: os.stat_result) -> str:
    # One text column: inode numbers may exceed SQLite's signed 64-bit integers.
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


class HashCache:
    """SHA-256 of files, remembered per (real path, stat) in SQLite.

    Parameters
    ----------
    path : path-like, optional
        The database file; :func:`default_cache_path` when None. Created on
        first use. If it cannot be opened (read-only home, a damaged file),
        hashing still works, uncached, with one warning.
    racy_seconds : float, default=RACY_SECONDS
        Files modified less than this long before the hash are not remembered.

    Attributes
    ----------
    hits, misses : int
        Files served from the cache, and files read, since construction.
    """

    def __init__(self, path=None, *, racy_seconds=RACY_SECONDS):
        self.path = Path(path) if path is not None else default_cache_path()
        self.racy_ns = int(racy_seconds * 1e9)
        self.hits = self.misses = 0
        self._db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")  # concurrent readers (dvc queue -j N) with one writer
            self._db.execute(_SCHEMA)
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            log.warning("hash cache '%s' unusable (%s): hashing every file", self.path, exc)
            self.close()

    def close(self):
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def hash_files(self, paths) -> list[tuple[int, str]]:
        """The size and SHA-256 of each file in ``paths``, reading only those the cache cannot vouch for.

        Parameters
        ----------
        paths : sequence of path-like
            Existing regular files (symlinks followed); best given as real paths,
            so the same file reached another way hits the same entry.

        Returns
        -------
        list of (int, str)
            Per path, in order: its size in bytes and its SHA-256 (64 hex characters).

        Raises
        ------
        DataError
            A file vanished or cannot be read.
        """
        paths = [os.fspath(p) for p in paths]
        start_ns = time.time_ns()
        stats = [_stat(p) for p in paths]
        keys = [_stat_key(st) for st in stats]
        known = self._lookup(paths)  # path -> (stat key, digest) as remembered
        digests = []
        for path, key in zip(paths, keys):
            remembered, digest = known.get(path, (None, None))
            digests.append(digest if remembered == key else None)
        todo = [i for i, d in enumerate(digests) if d is None]
        self.hits += len(paths) - len(todo)
        self.misses += len(todo)
        for i, digest in zip(todo, self._hash_all([paths[i] for i in todo], [stats[i].st_size for i in todo])):
            digests[i] = digest
        self._remember([(paths[i], keys[i], digests[i]) for i in todo
                        if self._storable(paths[i], stats[i], start_ns)])
        return [(st.st_size, digest) for st, digest in zip(stats, digests)]

    def _lookup(self, paths) -> dict:
        if self._db is None or not paths:
            return {}
        found = {}
        try:
            for lo in range(0, len(paths), _BATCH):
                batch = paths[lo:lo + _BATCH]
                rows = self._db.execute(f"SELECT path, stat, digest FROM sha256 WHERE path IN "
                                        f"({','.join('?' * len(batch))})", batch)
                found.update((path, (stat, digest)) for path, stat, digest in rows)
        except sqlite3.Error as exc:
            self._give_up(exc)
        return found

    def _hash_all(self, paths, sizes) -> list[str]:
        total = sum(sizes)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="sha256 of inputs", leave=False,
                   disable=len(paths) < PROGRESS_FILES and total < PROGRESS_BYTES)
        # Threads overlap the reads (GIL released in read() and in hashlib for large blocks).
        with bar, ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
            out = []
            for digest, size in zip(pool.map(_file_sha256, paths), sizes):
                out.append(digest)
                bar.update(size)
        return out

    def _storable(self, path, before, start_ns) -> bool:
        """Unchanged while being read, and old enough that a later write cannot share its timestamps."""
        try:
            after = os.stat(path)
        except OSError:
            return False
        if _stat_key(after) != _stat_key(before):
            log.warning("'%s' changed while it was being hashed: not caching it", path)
            return False
        return max(before.st_mtime_ns, before.st_ctime_ns) < start_ns - self.racy_ns

    def _remember(self, rows):
        if self._db is None or not rows:
            return
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO sha256 (path, stat, digest) VALUES (?, ?, ?)", rows)
        except sqlite3.Error as exc:
            self._give_up(exc)

    def _give_up(self, exc):
        log.warning("hash cache '%s' failed (%s): hashing without it", self.path, exc)
        self.close()


def _stat(path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise DataError(f"Cannot read '{path}' to fingerprint it ({exc.strerror}). Hint: check the file is there "
                        "and readable (it was listed a moment ago: is something writing the data?).") from None


def _file_sha256(path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(_BLOCK):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"Cannot read '{path}' to fingerprint it ({exc.strerror}). Hint: check its "
                        "permissions.") from None
    return digest.hexdigest()


@contextlib.contextmanager
def _cache_or(cache):
    """``cache`` as given, or a default one opened (and closed) for this call."""
    if cache is not None:
        yield cache
        return
    with HashCache() as opened:
        yield opened


def digest_files(base, relpaths, cache: HashCache | None = None) -> dict:
    """One content digest of a set of files, independent of where ``base`` is.

    Parameters
    ----------
    base : path-like
        The directory the files are relative to (symlinks resolved once, for the cache).
    relpaths : iterable of str
        Files under ``base``; order and duplicates do not matter.
    cache : HashCache, optional
        Opened for this call when None.

    Returns
    -------
    dict
        ``{"files": n, "bytes": total size, "sha256": digest}``: the digest is
        the SHA-256 of the sorted lines ``relpath NUL size NUL sha256``, so a
        renamed, added, removed or altered file changes it, and nothing else does.
    """
    relpaths = sorted(set(os.fspath(p).replace(os.sep, "/") for p in relpaths))
    real = os.path.realpath(base)
    with _cache_or(cache) as hashes:
        entries = hashes.hash_files([os.path.join(real, rel) for rel in relpaths])
    digest = hashlib.sha256()
    for rel, (size, sha) in zip(relpaths, entries):
        digest.update(f"{rel}\0{size}\0{sha}\n".encode())
    return {"files": len(relpaths), "bytes": sum(size for size, _ in entries), "sha256": digest.hexdigest()}


def file_entry(path, cache: HashCache | None = None) -> dict:
    """``{"bytes", "sha256"}`` of one file, or ``{"missing": true}``; no path (the caller's params hold it)."""
    if not os.path.isfile(path):
        return {"missing": True}
    with _cache_or(cache) as hashes:
        ((size, sha),) = hashes.hash_files([os.path.realpath(path)])
    return {"bytes": size, "sha256": sha}


# ------------------------------------------------------------------ which files each source reads
# Kept free of torch: the inputs stage runs on every `dvc repro` and must start fast.


@dataclass(frozen=True)
class SourceFiles:
    """The files one data set's loader reads (see :func:`source_files`).

    Attributes
    ----------
    base : str
        The directory they are relative to (under ``root``, as given).
    location : str
        ``base`` relative to ``root`` (as configured: an absolute
        ``imagefolder`` path stays absolute); never the root itself.
    files : list of str
        Present files, relative to ``base``, sorted.
    missing : list of str
        Expected files that are absent, relative to ``base`` (``"."`` for a
        missing image folder, or one without class folders).
    """

    base: str
    location: str
    files: list
    missing: list


# Per torchvision set: (folder under root, {part: files read}, files every part reads). torchvision's
# MNIST also checks that the other part's files exist, and CIFAR checks every file's md5 (any edit
# fails the load), but only these bytes become images (tests/test_sources.py empties every other file).
_TORCHVISION_FILES = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                ["batches.meta"]),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, ["meta"]),
    "svhn": (".", {"train": ["train_32x32.mat"], "test": ["test_32x32.mat"]}, []),
    **{name: (f"{folder}/raw", {part: [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
                                for part, prefix in (("train", "train"), ("test", "t10k"))}, [])
       for name, folder in (("mnist", "MNIST"), ("fashionmnist", "FashionMNIST"))},
}
# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder takes (case-insensitive)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _folder_files(base):
    """What ``ImageFolder(base)`` reads, walked as torchvision's ``find_classes``/``make_dataset`` walk it."""
    try:
        classes = sorted(entry.name for entry in os.scandir(base) if entry.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        classes = []
    if not classes:
        return [], ["."]
    files = []
    for cls in classes:
        for root, _, names in sorted(os.walk(os.path.join(base, cls), followlinks=True)):
            files += [os.path.relpath(os.path.join(root, n), base) for n in sorted(names)
                      if n.lower().endswith(IMG_EXTENSIONS)]
    return files, []


# ------------------------------------------------------------------ image lists (OpenOOD v1.5)

IMGLIST_FORMAT = "'<image path> <label>' (OpenOOD v1.5's format: an int label, -1 for OOD, or a {'label': int} dict)"
IMGLIST_HINT = ("fix that line: each line names one image, relative to the set's path (its image root), then its "
                "label; OpenOOD's benchmark_imglist/ lists are in this format")


@dataclass(frozen=True)
class ImageList:
    """The entries of an image list file, in file order.

    Attributes
    ----------
    file : str
        The list file, as given.
    images : list of str
        Each entry's image path, relative to the set's image root (``path``).
    labels : ndarray of shape (n_entries,), int64
        Each entry's label: the ID class, or ``-1`` (any negative) for OOD.
    """

    file: str
    images: list
    labels: np.ndarray


def _malformed(file, number, got, expected=IMGLIST_FORMAT) -> DataError:
    return DataError(f"Image list '{file}' is malformed at line {number}: expected {expected}, got {got!r}. "
                     f"Hint: {IMGLIST_HINT}.")


def _imglist_label(rest: str):
    """The label of a line's text after its image path, or None if it is not one.

    OpenOOD's ``ImglistDataset`` reads ``int(rest)``, or ``ast.literal_eval(rest)``
    when that is a dict of extras holding ``label``; ``int`` is tried first, so a
    1.28M-line ImageNet list is not parsed by ``ast``.
    """
    try:
        return int(rest)
    except ValueError:
        pass
    if not rest.startswith("{"):
        return None
    try:
        extras = ast.literal_eval(rest)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    label = extras.get("label") if isinstance(extras, dict) else None
    return label if isinstance(label, int) and not isinstance(label, bool) else None


def read_imglist(file) -> ImageList:
    """Parse an image list: one ``<image path> <label>`` per line, OpenOOD v1.5's ``benchmark_imglist`` format.

    The first whitespace-separated token is the image path (relative to the
    set's image root), the rest of the line its label (see :func:`_imglist_label`).
    Blank lines are skipped.

    Parameters
    ----------
    file : str or path-like

    Returns
    -------
    ImageList

    Raises
    ------
    DataError
        A line without a label, with a label that is not an int, or with an
        absolute image path (it would escape the image root), naming the file
        and the line; or a list without any entry.
    OSError
        The file cannot be read (the caller names the data set).
    """
    file = os.fspath(file)
    images, labels = [], []
    with open(file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            tokens = line.split(None, 1)
            if not tokens:
                continue
            label = _imglist_label(tokens[1].strip()) if len(tokens) == 2 else None
            if label is None:
                raise _malformed(file, number, line.rstrip("\r\n"))
            if os.path.isabs(tokens[0]):
                raise _malformed(file, number, tokens[0], "an image path relative to the set's path (its image "
                                 "root), as OpenOOD's lists have")
            images.append(tokens[0])
            labels.append(label)
    if not images:
        raise DataError(f"Image list '{file}' names no image: expected lines {IMGLIST_FORMAT}. Hint: point the "
                        "set's list at a non-empty list file.")
    return ImageList(file, images, np.asarray(labels, dtype=np.int64))


@dataclass(frozen=True)
class ImglistLayout:
    """Where an image list set's files are, relative to one base directory (see :func:`imglist_layout`).

    Attributes
    ----------
    base : str
        The deepest directory holding both the list file and the image root.
    location : str
        ``base`` relative to ``root`` (``"."`` for OpenOOD's layout); absolute
        when the list or the image root is configured absolute.
    list_file : str
        The list file, relative to ``base``.
    image_root : str
        The image root, relative to ``base`` (image paths are joined to it).
    """

    base: str
    location: str
    list_file: str
    image_root: str

    def image(self, relpath: str) -> str:
        """An image named by the list, relative to ``base``."""
        return os.path.normpath(os.path.join(self.image_root, relpath))


def imglist_layout(root, path, list_file) -> ImglistLayout:
    """The files of an ``imglist`` set relative to a directory that holds them all, wherever ``root`` is.

    OpenOOD keeps the lists (``benchmark_imglist/``) beside the images
    (``images_classic/``), so the base is usually ``root`` itself, and the same
    data under another root gives the same relative paths (and fingerprints).
    """
    root = os.fspath(root)
    listed = os.path.abspath(os.path.join(root, list_file))
    images = os.path.abspath(os.path.join(root, path or "."))
    base = os.path.commonpath([os.path.dirname(listed), images])
    absolute = os.path.isabs(list_file) or os.path.isabs(path or ".")
    location = base if absolute else os.path.relpath(base, os.path.abspath(root))
    return ImglistLayout(base, location, os.path.relpath(listed, base), os.path.relpath(images, base))


def _imglist_files(root, path, list_file) -> SourceFiles:
    """The list file and every image it names; the list is read (to know the images), no image is."""
    layout = imglist_layout(root, path, list_file)
    if not os.path.isfile(os.path.join(layout.base, layout.list_file)):
        return SourceFiles(layout.base, layout.location, [], [layout.list_file])
    present, missing = [layout.list_file], []
    for rel in dict.fromkeys(layout.image(rel) for rel in read_imglist(os.path.join(root, list_file)).images):
        (present if os.path.isfile(os.path.join(layout.base, rel)) else missing).append(rel)
    return SourceFiles(layout.base, layout.location, sorted(present), missing)


def source_files(name, root, part="test", path=None, list_file=None) -> SourceFiles:
    """The files :func:`pipeline.sources.load_source` reads for one data set, found without reading them.

    Parameters
    ----------
    name : str
        A source name (``"cifar10"``, ``"imagefolder"``, ``"imglist"``, ...).
    root : str or path-like
    part : {"train", "test"}
        Ignored by ``imagefolder`` and ``imglist``.
    path : str, optional
        The ``imagefolder`` directory, or the ``imglist`` image root (relative
        to ``root`` unless absolute; ``root`` itself when None for ``imglist``).
    list_file : str, optional
        The ``imglist`` list file (relative to ``root`` unless absolute).

    Returns
    -------
    SourceFiles
        For ``imagefolder`` every image under its class folders, in
        ``ImageFolder``'s order; for ``imglist`` the list file and every image
        it names (``missing``: the list, or the images absent, in list order);
        for the torchvision sets the files of ``part`` and their meta file;
        nothing for ``constant``.

    Raises
    ------
    DataError
        An ``imglist`` list file is malformed (see :func:`read_imglist`).
    """
    root = os.fspath(root)
    if name == "imagefolder":
        base = os.path.join(root, path)
        files, missing = _folder_files(base)
        return SourceFiles(base, os.fspath(path), files, missing)
    if name == "imglist":
        return _imglist_files(root, path, list_file)
    if name not in _TORCHVISION_FILES:  # constant: generated, nothing on disk
        return SourceFiles(root, ".", [], [])
    location, per_part, common = _TORCHVISION_FILES[name]
    base = os.path.normpath(os.path.join(root, location))
    names = per_part[part] + common
    present = [f for f in names if os.path.isfile(os.path.join(base, f))]
    return SourceFiles(base, location, sorted(present), sorted(set(names) - set(present)))


# ------------------------------------------------------------------ what the inputs stage writes


def input_key(spec) -> str:
    """How ``generate.json`` names the files of one data set.

    ``"cifar10:train"``, ``"imagefolder:texture"``, or for an image list its
    list and image root, ``"imglist:benchmark_imglist/cifar10/test_tin.txt@images_classic"``
    (two sets with one key read the same files).
    """
    if spec.source == "imglist":
        return f"imglist:{spec.list}@{spec.path or '.'}"
    return f"imagefolder:{spec.path}" if spec.source == "imagefolder" else f"{spec.source}:{spec.part}"


def generate_inputs(cfg, cache: HashCache | None = None) -> dict:
    """Everything ``generate`` reads, except where: its params without ``root``, and the data's content.

    Parameters
    ----------
    cfg : pipeline.config.GenerateConfig
    cache : HashCache, optional

    Returns
    -------
    dict
        ``{"params": {...}, "data": {input_key: {"location", "files", "bytes",
        "sha256", "missing"}}}``. ``location`` is relative to ``generate.root``
        (as configured), ``missing`` lists the expected files that are absent
        (torchvision downloads them with ``generate.download: true``). The
        ``digits`` benchmark reads no files: ``data`` is empty.
    """
    params = dataclasses.asdict(cfg)
    del params["root"]  # where the data is, not what it is: the content below covers it
    data = {}
    if cfg.benchmark == "sources":
        with _cache_or(cache) as hashes:
            for spec in cfg.specs.values():
                key = input_key(spec)
                if spec.source == "constant" or key in data:
                    continue
                found = source_files(spec.source, cfg.root, spec.part, spec.path, spec.list)
                data[key] = {"location": found.location, **digest_files(found.base, found.files, hashes),
                             "missing": found.missing}
    return {"params": params, "data": dict(sorted(data.items()))}


# torchvision weights enums of the backbones that take ``train.weights`` (see pipeline.backbones)
_WEIGHTS_ENUMS = {"resnet50_imagenet": "ResNet50_Weights", "vit_b16_imagenet": "ViT_B_16_Weights"}


def weights_file(arch: str, name: str) -> Path | None:
    """Where torchvision keeps the weights ``name`` of ``arch`` once downloaded; None if unknown.

    torchvision's ``load_state_dict_from_url`` saves them as
    ``<torch.hub.get_dir()>/checkpoints/<basename of the URL>``.
    """
    import urllib.parse

    import torch
    import torchvision

    enum = getattr(torchvision.models, _WEIGHTS_ENUMS.get(arch, ""), None)
    if enum is None or (name != "DEFAULT" and name not in enum.__members__):
        return None  # train reports the bad name itself
    weights = enum.DEFAULT if name == "DEFAULT" else enum[name]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(weights.url).path)


def train_inputs(cfg, cache: HashCache | None = None) -> dict:
    """The content of the weights ``train`` imports (``train.checkpoint`` or ``train.weights``).

    Parameters
    ----------
    cfg : pipeline.config.TrainConfig

    Returns
    -------
    dict
        ``{"checkpoint": null | {"bytes", "sha256"} | {"missing": true},
        "weights": null | {"name", "file", "bytes", "sha256"} | ...}``. Paths
        are not recorded: ``train.checkpoint`` is a param ``train`` depends on.
    """
    out = {"checkpoint": None, "weights": None}
    with _cache_or(cache) as hashes:
        if cfg.checkpoint is not None:
            out["checkpoint"] = file_entry(cfg.checkpoint, hashes)
        if cfg.weights is not None:
            path = weights_file(cfg.arch, cfg.weights)
            out["weights"] = {"name": cfg.weights}
            if path is not None:  # absent until torchvision downloads it: train then reruns once
                out["weights"].update({"file": path.name, **file_entry(path, hashes)})
    return out

