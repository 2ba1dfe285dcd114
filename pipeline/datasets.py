"""The embedded "digits" benchmark: ID splits, near-OOD and far-OOD sets, and their files.

Everything here is built from data bundled with installed packages (scikit-learn's
digits, scikit-image's sample images), so generating the benchmark never touches
the network.

* **ID**: scikit-learn's 8x8 digits minus the held-out classes, relabelled to
  ``0..K-1`` in ascending order, split into stratified train/val/test parts.
* **Near-OOD** (``digits89`` by default): the held-out digits.
* **Far-OOD**: ``textures``, ``photos``, ``faces``, ``gaussian``, ``uniform`` and
  ``constant`` images.

Every OOD set is cut into a ``val`` and a ``test`` half: hyperparameters are
chosen on val, and only test is reported.

Each split is one ``<name>.npz`` file (``images``, ``labels``, plus ``name`` and
``attrs`` as JSON strings; no pickles) and a benchmark directory also holds
``manifest.json`` with every split's attrs and fingerprint, and ``layerscope.json``
(the seal of :mod:`pipeline.artifacts`: every file's size and SHA-256), which
readers check before they trust a file (:func:`check_benchmark`).
"""

import hashlib
import json
import logging
import math
import numbers
import pathlib
import shutil
import typing
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.artifacts import (
    SEAL,
    Kind,
    artifact_lock,
    check_output,
    check_sealed,
    file_sha256,
    publish_dir,
    seal,
    staging_dir,
)
from pipeline.errors import DataError, IntegrityError, invalid_param

logger = logging.getLogger(__name__)

BENCHMARK = "digits"
MANIFEST = "manifest.json"
GENERATE_HINT = "run `layerscope generate` (or `dvc repro generate`)."
_OWNER = "make_digits_benchmark"
_NPZ_KEYS = ("name", "images", "labels", "attrs")
_REQUIRED_ATTRS = ("role", "set", "part", "source", "n_samples", "image_size")

# Crop sides in pixels of the source image: small crops look like fine texture,
# large ones keep object structure, so the far-OOD sets span both scales.
CROP_SIDE = (32, 128)
TEXTURE_SOURCES = ("brick", "grass", "gravel")
PHOTO_SOURCES = ("camera", "astronaut", "coffee", "chelsea", "rocket")
# Per-image Gaussian noise: the mean and spread vary between images so that the
# set is not a single point in feature space (which any detector would catch).
GAUSSIAN_MEAN = (0.3, 0.7)
GAUSSIAN_STD = (0.1, 0.3)


@dataclass(frozen=True)
class ImageSplit:
    """One split of a benchmark: images, labels and JSON-serialisable attrs.

    Attributes
    ----------
    name : str
        Split key: ``"id_train"``, ``"id_val"``, ``"id_test"`` or ``"<set>_val"``,
        ``"<set>_test"`` for an OOD set (e.g. ``"textures_test"``).
    images : ndarray of shape (n_samples, n_channels, image_size, image_size)
        float32 pixel values in [0, 1].
    labels : ndarray of shape (n_samples,)
        int64 ID class index in ``0..K-1``; ``-1`` for every OOD sample.
    attrs : dict
        ``role`` (``"id"``, ``"near"`` or ``"far"``), ``set``, ``part``,
        ``source``, ``n_samples``, ``image_size`` and set-specific information.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    attrs: dict

    kind: typing.ClassVar[str] = "images"  # the manifest's "kind": how open_split reads it back

    def save(self, directory):
        """Write to ``directory/<name>.npz``; see :func:`save_split`."""
        return save_split(self, directory)

    def fingerprint(self):
        """See :func:`split_fingerprint`."""
        return split_fingerprint(self)


# --------------------------------------------------------------------------
# Parameter validation
# --------------------------------------------------------------------------


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_holdout(holdout_classes):
    """Return the held-out digits as a sorted list, or raise ConfigError."""
    expected = (
        "a non-empty list of distinct digits in 0..9 that leaves at least 2 ID classes"
    )
    try:
        holdout = list(holdout_classes)
    except TypeError:
        holdout = None
    valid = (
        holdout is not None
        and len(holdout) > 0
        and all(_is_int(c) and 0 <= c <= 9 for c in holdout)
        and len(set(holdout)) == len(holdout)
        and len(holdout) <= 8
    )
    if not valid:
        raise invalid_param("generate.holdout_classes", _OWNER, expected, holdout_classes)
    return sorted(int(c) for c in holdout)


def _check_fractions(val_fraction, test_fraction):
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (_is_real(value) and 0 < value < 1):
            raise invalid_param(
                f"generate.{name}", _OWNER, "a float in the open interval (0, 1)", value
            )
    if val_fraction + test_fraction >= 1:
        raise invalid_param(
            "generate.val_fraction",
            _OWNER,
            f"smaller than 1 - test_fraction = {1 - test_fraction:g} "
            "so that the training split is not empty",
            val_fraction,
        )


def _check_int(name, value, minimum):
    if not (_is_int(value) and value >= minimum):
        raise invalid_param(f"generate.{name}", _OWNER, f"an int >= {minimum}", value)


def digits_set_names(holdout_classes) -> list[str]:
    """The OOD sets of the digits benchmark, near first: their val halves serve as auxiliary outliers."""
    return ["digits" + "".join(map(str, sorted(holdout_classes))), "textures", "photos", "faces", "gaussian",
            "uniform", "constant"]


def check_digits_params(**params):
    """Validate ``make_digits_benchmark``'s parameters without building anything (what ``init`` checks)."""
    return _check_params(**params)


def _check_params(holdout_classes, image_size, val_fraction, test_fraction, n_synthetic, seed):
    """Validate every parameter of make_digits_benchmark; return the sorted holdout."""
    holdout = _check_holdout(holdout_classes)
    _check_fractions(val_fraction, test_fraction)
    _check_int("image_size", image_size, 8)
    _check_int("n_synthetic", n_synthetic, 2)
    _check_int("seed", seed, 0)
    return holdout


# --------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------


def _stream(seed, name):
    """An independent generator per named stream.

    Keying the stream by name (not by call order) means that adding or resizing
    one set never changes the samples of another.
    """
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _resize(image, size):
    """Resize one grey image to a square.

    Parameters
    ----------
    image : ndarray of shape (height, width)
        Values in [0, 1].
    size : int
        Output side.

    Returns
    -------
    ndarray of shape (size, size)
        float32 in [0, 1].
    """
    if image.shape != (size, size):
        from skimage import transform  # scikit-image, scikit-learn: imported only where the digits are built

        # Anti-aliasing only where shrinking: blurring an upscale only loses detail.
        shrinking = image.shape[0] > size or image.shape[1] > size
        image = transform.resize(image, (size, size), order=1, anti_aliasing=shrinking)
    # Interpolation can overshoot [0, 1] by a rounding error.
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _resize_all(images, size):
    """(n, height, width) in [0, 1] -> (n, 1, size, size) float32."""
    out = np.empty((len(images), 1, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        out[i, 0] = _resize(image, size)
    return out


def _grey(name):
    """A scikit-image sample image by name, as (height, width) float64 in [0, 1]."""
    from skimage import color, data, util

    image = getattr(data, name)()
    if image.ndim == 3:
        return color.rgb2gray(image)
    return util.img_as_float(image)


def _random_crops(images, n, size, rng):
    """Crops of random side and position, balanced over the source images.

    Parameters
    ----------
    images : list of ndarray of shape (height, width)
        Grey sources in [0, 1], each at least ``CROP_SIDE[1]`` pixels per side.
    n : int
        Number of crops.
    size : int
        Side of the resized crops.
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of shape (n, 1, size, size)
        float32 in [0, 1].
    """
    which = rng.permutation(np.arange(n) % len(images))
    sides = rng.integers(CROP_SIDE[0], CROP_SIDE[1] + 1, size=n)
    crops = []
    for k, side in zip(which, sides):
        image = images[k]
        top = rng.integers(0, image.shape[0] - side + 1)
        left = rng.integers(0, image.shape[1] - side + 1)
        crops.append(image[top : top + side, left : left + side])
    return _resize_all(crops, size)


# --------------------------------------------------------------------------
# Building the splits
# --------------------------------------------------------------------------


def _split(name, set_name, part, role, images, labels, attrs):
    """Assemble an ImageSplit; attrs go through JSON so that they are plain, unshared
    and equal to what load_split will read back (tuples become lists)."""
    attrs = {
        "role": role,
        "set": set_name,
        "part": part,
        "n_samples": int(len(images)),
        "image_size": int(images.shape[-1]),
        **attrs,
    }
    return ImageSplit(name, images, labels.astype(np.int64), json.loads(_canonical_json(attrs)))


def _load_digit_images():
    """scikit-learn's digits as (1797, 8, 8) float64 in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts of set bits in 4x4 blocks: 0..16.
    return digits.images / 16.0, digits.target


def _id_sizes(n, val_fraction, test_fraction, n_classes):
    """Exact split sizes, so that a too-small split fails with a clear message."""
    n_val = math.ceil(val_fraction * n)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_val - n_test
    for name, value, size in (
        ("val_fraction", val_fraction, n_val),
        ("test_fraction", test_fraction, n_test),
        ("val_fraction", val_fraction, n_train),
    ):
        if size < n_classes:
            raise invalid_param(
                f"generate.{name}",
                _OWNER,
                f"such that every ID split gets at least {n_classes} of the {n} "
                "ID images (one per class)",
                value,
            )
    return n_val, n_test


def _id_splits(images, labels, holdout, params):
    """Stratified train/val/test splits of the non-held-out digits."""
    from sklearn.model_selection import train_test_split

    classes = [c for c in range(10) if c not in holdout]
    keep = np.isin(labels, classes)
    x, y = images[keep], np.searchsorted(classes, labels[keep])
    n_val, n_test = _id_sizes(len(y), params["val_fraction"], params["test_fraction"], len(classes))
    rng = _stream(params["seed"], "id")
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=2)]
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=n_test, stratify=y, random_state=seeds[0]
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=n_val, stratify=y_rest, random_state=seeds[1]
    )
    source = (
        f"scikit-learn load_digits (UCI optical digits, 8x8, 0..16 scaled to [0, 1]), "
        f"digits {classes} relabelled 0..{len(classes) - 1}, "
        f"resized to {params['image_size']}x{params['image_size']}"
    )
    attrs = {"source": source, "classes": classes, "holdout_classes": holdout, **_common(params)}
    parts = (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))
    return [
        _split(f"id_{part}", "id", part, "id", _resize_all(x_p, params["image_size"]), y_p, attrs)
        for part, x_p, y_p in parts
    ]


def _halves(set_name, role, images, attrs, rng):
    """Shuffle an OOD set and cut it into val and test halves (test gets any odd one)."""
    images = images[rng.permutation(len(images))]
    n_val = len(images) // 2
    labels = np.full(len(images), -1, dtype=np.int64)
    return [
        _split(f"{set_name}_val", set_name, "val", role, images[:n_val], labels[:n_val], attrs),
        _split(f"{set_name}_test", set_name, "test", role, images[n_val:], labels[n_val:], attrs),
    ]


def _near_set(images, labels, holdout, params):
    """The held-out digits, e.g. set ``digits89``."""
    set_name = "digits" + "".join(map(str, holdout))
    size = params["image_size"]
    x = _resize_all(images[np.isin(labels, holdout)], size)
    source = f"scikit-learn load_digits, held-out digits {holdout}, resized to {size}x{size}"
    attrs = {"source": source, "digits": holdout, **_common(params)}
    return _halves(set_name, "near", x, attrs, _stream(params["seed"], set_name))


def _crop_set(set_name, sources, params):
    """Random grey crops of scikit-image sample images."""
    rng = _stream(params["seed"], set_name)
    greys = [_grey(name) for name in sources]
    images = _random_crops(greys, params["n_synthetic"], params["image_size"], rng)
    source = (
        f"scikit-image sample images {list(sources)} (grey), random square crops of "
        f"{CROP_SIDE[0]}..{CROP_SIDE[1]} px, balanced over sources, resized"
    )
    attrs = {"source": source, "sources": list(sources), "crop_side": list(CROP_SIDE)}
    attrs.update(_common(params))
    return _halves(set_name, "far", images, attrs, rng)


def _faces_set(params):
    """All 200 faces of scikit-image's ``lfw_subset``."""
    from skimage import data

    faces = data.lfw_subset()
    # Rescale by the set's own range: the bundled copy is in [0, 1] already, but
    # nothing in its documentation promises that.
    faces = (faces - faces.min()) / (faces.max() - faces.min())
    images = _resize_all(faces, params["image_size"])
    source = "scikit-image lfw_subset (200 faces, 25x25, Labeled Faces in the Wild), resized"
    attrs = {"source": source, **_common(params)}
    return _halves("faces", "far", images, attrs, _stream(params["seed"], "faces"))


def _noise_images(kind, n, size, rng):
    """Synthetic images, shape (n, 1, size, size), float32 in [0, 1]."""
    shape = (n, 1, size, size)
    if kind == "gaussian":
        mean = rng.uniform(*GAUSSIAN_MEAN, size=(n, 1, 1, 1))
        std = rng.uniform(*GAUSSIAN_STD, size=(n, 1, 1, 1))
        pixels = rng.normal(mean, std, size=shape)
    elif kind == "uniform":
        pixels = rng.uniform(0.0, 1.0, size=shape)
    else:
        pixels = np.broadcast_to(rng.uniform(0.0, 1.0, size=(n, 1, 1, 1)), shape)
    return np.clip(pixels, 0.0, 1.0).astype(np.float32)


_NOISE_SOURCES = {
    "gaussian": (
        f"synthetic: per image mean ~ U{GAUSSIAN_MEAN} and std ~ U{GAUSSIAN_STD}, "
        "pixels i.i.d. N(mean, std^2) clipped to [0, 1]"
    ),
    "uniform": "synthetic: pixels i.i.d. U(0, 1)",
    "constant": "synthetic: each image a single grey value ~ U(0, 1) (LA-OOD's pure colour)",
}


def _noise_set(kind, params):
    rng = _stream(params["seed"], kind)
    images = _noise_images(kind, params["n_synthetic"], params["image_size"], rng)
    attrs = {"source": _NOISE_SOURCES[kind], **_common(params)}
    return _halves(kind, "far", images, attrs, rng)


def _common(params):
    return {"benchmark": BENCHMARK, "seed": params["seed"]}


def make_digits_benchmark(
    *,
    holdout_classes=(8, 9),
    image_size=16,
    val_fraction=0.2,
    test_fraction=0.2,
    n_synthetic=400,
    seed=0,
):
    """Build the embedded "digits" benchmark from bundled data only.

    Parameters
    ----------
    holdout_classes : sequence of int, default=(8, 9)
        Digits left out of the ID classes; they form the near-OOD set
        ``"digits" + "".join(sorted digits)``. At least 2 ID classes must remain.
    image_size : int, default=16
        Side of every output image (>= 8).
    val_fraction, test_fraction : float, default=0.2
        Fractions of the ID images in the val and test splits (rounded up);
        train gets the rest. Both in (0, 1), with a sum below 1.
    n_synthetic : int, default=400
        Images in each crop and noise set (>= 2). ``faces`` always has 200.
    seed : int, default=0
        Seeds every random choice; the same seed gives identical splits.

    Returns
    -------
    list of ImageSplit
        ``id_train``, ``id_val``, ``id_test``, then ``<set>_val`` and
        ``<set>_test`` for the near set and for ``textures``, ``photos``,
        ``faces``, ``gaussian``, ``uniform``, ``constant``. Images have shape
        (n_samples, 1, image_size, image_size).

    Raises
    ------
    ConfigError
        If a parameter is invalid.
    """
    holdout = _check_params(
        holdout_classes, image_size, val_fraction, test_fraction, n_synthetic, seed
    )
    params = {
        "image_size": int(image_size),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "n_synthetic": int(n_synthetic),
        "seed": int(seed),
    }
    images, labels = _load_digit_images()
    splits = _id_splits(images, labels, holdout, params)
    splits += _near_set(images, labels, holdout, params)
    splits += _crop_set("textures", TEXTURE_SOURCES, params)
    splits += _crop_set("photos", PHOTO_SOURCES, params)
    splits += _faces_set(params)
    for kind in ("gaussian", "uniform", "constant"):
        splits += _noise_set(kind, params)
    logger.info("built %d splits of the %s benchmark (seed %d)", len(splits), BENCHMARK, seed)
    return splits


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def split_fingerprint(split):
    """SHA-256 of a split's content.

    Covers the images and labels (dtype, shape and little-endian bytes, so that a
    reshaped array or another platform's byte order cannot collide or differ)
    and the canonical JSON of the attrs. The name is not included.

    Parameters
    ----------
    split : ImageSplit

    Returns
    -------
    str
        64 hexadecimal characters.
    """
    digest = hashlib.sha256()
    for array, dtype in ((split.images, "<f4"), (split.labels, "<i8")):
        array = np.ascontiguousarray(array, dtype=dtype)
        digest.update(f"{dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(_canonical_json(split.attrs).encode())
    return digest.hexdigest()


def _check_name(name):
    # The name becomes a file name: a separator would write outside the directory.
    if not name or name != pathlib.Path(name).name or name.startswith("."):
        raise DataError(f"Split name {name!r} cannot be used as a file name.")


def save_split(split, directory):
    """Write a split to ``directory/<name>.npz`` (compressed, no pickles).

    Parameters
    ----------
    split : ImageSplit
    directory : str or path-like
        Created if missing.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    _check_name(split.name)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{split.name}.npz"
    np.savez_compressed(
        path,
        name=np.array(split.name),
        images=np.ascontiguousarray(split.images, dtype=np.float32),
        labels=np.ascontiguousarray(split.labels, dtype=np.int64),
        attrs=np.array(_canonical_json(split.attrs)),
    )
    return path


def _malformed(path, problem):
    return DataError(
        f"Split file '{path}' is malformed: {problem}. Expected an .npz written by "
        f"save_split with arrays {list(_NPZ_KEYS)}. Hint: {GENERATE_HINT}"
    )


def _read_npz(path):
    """The raw arrays of a split file, as a dict."""
    # np.load raises ValueError for non-npz content (it refuses to unpickle) and
    # OSError/BadZipFile/EOFError for truncated or foreign binaries.
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
    try:
        npz = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise _malformed(path, f"not a readable .npz archive ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise _malformed(path, "it holds a single .npy array, not an .npz archive")
    with npz:
        missing = [key for key in _NPZ_KEYS if key not in npz.files]
        if missing:
            raise _malformed(path, f"missing arrays {missing}")
        try:
            return {key: npz[key] for key in _NPZ_KEYS}
        except unreadable as exc:
            raise _malformed(path, f"an array cannot be read ({exc})") from exc


def _check_arrays(path, images, labels, attrs):
    if images.dtype != np.float32 or images.ndim != 4:
        got = f"{images.dtype} {images.shape}"
        raise _malformed(path, f"images must be float32 of shape (n, C, S, S), got {got}")
    if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
        got = f"{labels.dtype} {labels.shape}"
        raise _malformed(path, f"labels must be int64 of shape ({len(images)},), got {got}")
    if not isinstance(attrs, dict) or any(key not in attrs for key in _REQUIRED_ATTRS):
        raise _malformed(path, f"attrs must be a JSON object with keys {list(_REQUIRED_ATTRS)}")


def load_split(path):
    """Read a split written by :func:`save_split`.

    Parameters
    ----------
    path : str or path-like
        The ``<name>.npz`` file.

    Returns
    -------
    ImageSplit

    Raises
    ------
    DataError
        If the file is missing or does not hold a valid split.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(
            f"Split file '{path}' does not exist. Expected an .npz written by "
            f"save_split. Hint: {GENERATE_HINT}"
        )
    arrays = _read_npz(path)
    try:
        attrs = json.loads(str(arrays["attrs"]))
    except json.JSONDecodeError as exc:
        raise _malformed(path, f"attrs are not valid JSON ({exc})") from exc
    _check_arrays(path, arrays["images"], arrays["labels"], attrs)
    return ImageSplit(str(arrays["name"]), arrays["images"], arrays["labels"], attrs)


def _benchmark_name(splits):
    names = {split.attrs.get("benchmark", BENCHMARK) for split in splits}
    if len(names) != 1:
        raise DataError(
            f"Splits from different benchmarks cannot share a directory: {sorted(names)}."
        )
    return names.pop()


def _check_splits(splits):
    if not splits:
        raise DataError("write_benchmark needs at least one split; got none.")
    names = [split.name for split in splits]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"Split names must be unique; repeated: {duplicates}.")
    _benchmark_name(splits)


def _write_all(splits, directory):
    """Write every split and the manifest (last) into ``directory``."""
    entries = {}
    for split in splits:
        path = split.save(directory)
        entry = {"file": path.name, "kind": split.kind, "fingerprint": split.fingerprint()}
        entries[split.name] = {**entry, **split.attrs}
    manifest = {"benchmark": _benchmark_name(splits), "splits": entries}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _is_old_benchmark(path):
    return (path / MANIFEST).is_file()


# The DVC run cache holds every benchmark generate wrote, so `dvc repro generate`
# puts a damaged one back ("Stage 'generate' is cached - skipping run, checking
# out outputs"), or reruns generate if it is not cached (tests/test_e2e_inputs.py
# runs this hint); outside DVC, generate rewrites it.
KIND = Kind("benchmark", marker=_is_old_benchmark,
            hint="run `dvc repro generate` (it restores the benchmark from the DVC cache, or rewrites it), or "
                 "`layerscope generate` outside DVC.")


def write_benchmark(splits, directory):
    """Write every split and ``manifest.json`` to ``directory``, atomically, sealed.

    The files are built in a staging directory, sealed (``layerscope.json``:
    every file's size and SHA-256, see :func:`pipeline.artifacts.seal`) and
    swapped in by :func:`pipeline.artifacts.publish_dir`, so a reader sees the
    old benchmark, the new one or none, never a mixture. An existing benchmark
    directory is replaced; anything else at ``directory`` is refused.

    Parameters
    ----------
    splits : list of ImageSplit or IndexSplit
        Uniquely named splits of one benchmark: anything with ``name``,
        ``attrs``, ``kind``, ``save(directory) -> Path`` and ``fingerprint()``.
    directory : str or path-like

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    DataError
        If split names repeat.
    OutputError
        ``directory`` exists and is not a benchmark (or cannot be written).
    """
    _check_splits(splits)
    directory = check_output(directory, KIND)
    with artifact_lock(directory, KIND.name):
        staged = staging_dir(directory)
        try:
            _write_all(splits, staged)
            seal(staged, KIND)
            publish_dir(staged, directory)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    logger.info("wrote %d splits to %s", len(splits), directory)
    return directory


def check_benchmark(directory, names=None):
    """Check a benchmark directory against its seal before reading it; return its manifest.

    Every file's name and size is compared with what generate sealed; the
    SHA-256 of the manifest and of the split files in ``names`` (all when
    None) too, so a split file replaced by another one (even of the same size)
    or edited by hand is refused instead of being read as if generate wrote it.
    Reading a few MB of ``.npz`` or index files costs milliseconds.

    Parameters
    ----------
    directory : str or path-like
    names : sequence of str, optional
        The splits about to be read.

    Returns
    -------
    dict
        As :func:`read_manifest`.

    Raises
    ------
    DataError
        The directory holds no manifest, or no split of a requested name.
    IntegrityError
        A file is missing, resized or altered since generate sealed it.
    """
    directory = pathlib.Path(directory)
    if not (directory / MANIFEST).is_file():
        read_manifest(directory)  # its own one-line error: not a (complete) benchmark
    sealed = check_sealed(directory, KIND)
    _check_sha256(directory, sealed, MANIFEST)
    manifest = read_manifest(directory)
    splits = manifest["splits"]
    missing = [n for n in (names or ()) if n not in splits]
    if missing:
        raise DataError(f"Benchmark '{directory}' has no split {missing[0]!r}; it has {sorted(splits)}. "
                        f"Hint: {GENERATE_HINT}")
    for name in names or splits:
        _check_sha256(directory, sealed, splits[name]["file"])
    return manifest


def _check_sha256(directory, sealed, rel):
    entry = sealed["files"].get(rel)
    if entry is None:
        raise IntegrityError(f"The benchmark '{directory}' holds '{rel}', which generate did not write (it is not "
                             f"in {SEAL}). Hint: {KIND.hint}")
    if file_sha256(directory / rel) != entry["sha256"]:
        raise IntegrityError(f"The benchmark '{directory}' is damaged: file '{rel}' has been altered since "
                             f"generate wrote it (its SHA-256 differs from {SEAL}'s). Hint: {KIND.hint}")


def read_manifest(directory):
    """Read ``directory/manifest.json`` written by :func:`write_benchmark`.

    Parameters
    ----------
    directory : str or path-like

    Returns
    -------
    dict
        ``{"benchmark": str, "splits": {name: {"file", "fingerprint", **attrs}}}``.

    Raises
    ------
    DataError
        If the manifest is missing or malformed.
    """
    path = pathlib.Path(directory) / MANIFEST
    if not path.is_file():
        from pipeline.files import what_is_at

        raise DataError(f"Benchmark directory '{directory}' {what_is_at(directory, MANIFEST)}: it is not a complete "
                        f"benchmark. Hint: {GENERATE_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"Benchmark manifest '{path}' is not valid JSON ({exc}). Hint: {GENERATE_HINT}"
        ) from exc
    if not isinstance(manifest, dict) or not {"benchmark", "splits"} <= manifest.keys():
        raise DataError(
            f"Benchmark manifest '{path}' is malformed: expected keys 'benchmark' and "
            f"'splits'. Hint: {GENERATE_HINT}"
        )
    return manifest
