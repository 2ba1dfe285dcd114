"""Real benchmark data sources, read by torchvision's own loaders.

Each source in :data:`SOURCES` builds a torch ``Dataset`` whose items have the
same shape as :class:`pipeline.userdata.SplitDataset`'s: ``(image, label)``, with
``image`` a float32 tensor of shape (channels, image_size, image_size) in [0, 1]
and ``label`` a Python ``int``.

* ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashionmnist``: torchvision's
  ``CIFAR10``, ``CIFAR100``, ``SVHN``, ``MNIST`` and ``FashionMNIST``, with ``root``
  passed as it is, so the files sit where torchvision puts them
  (:data:`EXPECTED_LAYOUT`).
* ``imagefolder``: torchvision's ``ImageFolder`` at ``path`` (one sub-folder per
  class), for LSUN-crop/resize, iSUN, Textures/DTD, Places365, TinyImageNet,
  iNaturalist, SUN, OpenImage-O, TinyImages-300k and the like.
* ``imglist``: an image list file (``list``), one ``<image path> <label>`` per
  line with paths relative to ``path``: OpenOOD v1.5's
  ``benchmark_imglist/<id>/<split>_<set>.txt`` over ``images_classic/`` or
  ``images_largescale/`` (:class:`ImageListDataset`). Its labels are the list's.
* ``constant``: LA-OOD's synthetic constant-colour set, generated from a seed.

Every image goes through the same transform (:func:`make_transform`): it is
converted to ``channels`` channels (a grey image is repeated to RGB, an RGB image
is turned grey with PIL's ITU-R 601-2 luma), resized so that its shorter side is
``image_size`` and centre-cropped to a square (``transforms.Resize`` then
``CenterCrop``; a square image is thus plainly resized), and turned into a tensor
by ``ToTensor``. Nothing is normalised here: the model holds the ID statistics.

Nothing is downloaded unless ``download=True``; missing files raise a one-line
:class:`~pipeline.errors.DataError` that names the data set and its layout.
"""

import logging
import numbers
import os
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import datasets, transforms

from pipeline.errors import DataError, invalid_param
from pipeline.fingerprint import digest_files, imglist_layout, read_imglist, source_files

log = logging.getLogger(__name__)

_OWNER = "load_source"
PARTS = ("train", "test")
CHANNELS = (1, 3)
# Size of the constant set when ``n`` is not given: that of the CIFAR test sets.
CONSTANT_DEFAULT_N = 10_000
MISSING_HINT = "pass download: true on a machine that is online, or point root at the data"
# ImageFolder has no download: its data sets are fetched by hand.
FOLDER_HINT = "point root (and path) at the extracted data"
LIST_HINT = ("point root at the data, list at the image list file and path at the folder its image paths are "
             "relative to (OpenOOD v1.5: list: benchmark_imglist/<id>/test_<set>.txt, path: images_classic)")

EXPECTED_LAYOUT = {
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
    "cifar100": "ROOT/cifar-100-python/{train, test, meta}",
    "svhn": "ROOT/{train_32x32.mat, test_32x32.mat}",
    "mnist": "ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "fashionmnist": "ROOT/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "imagefolder": "PATH/<class>/<image>.{png,jpg,...} (PATH relative to ROOT unless absolute)",
    "imglist": "LIST: one '<image path> <label>' per line, naming PATH/<image path> (both relative to ROOT unless "
               "absolute)",
    "constant": "nothing on disk: the images are generated from the seed",
}


@dataclass(frozen=True)
class SourceRequest:
    """Everything a builder in :data:`SOURCES` may need.

    Attributes
    ----------
    root : str
        Directory that holds the data (see :data:`EXPECTED_LAYOUT`).
    part : {"train", "test"}
        Which part of the data set to read.
    download : bool
        Let torchvision download missing files.
    transform : callable
        PIL image -> float32 tensor (channels, image_size, image_size).
    path : str or None
        The ``imagefolder`` directory, or the ``imglist`` image root.
    n : int or None
        The ``constant`` set's size.
    seed : int
        The ``constant`` set's seed.
    image_size : int
        Side of the square output images.
    channels : int
        1 or 3.
    verify_checksums : bool
        Refuse CIFAR/SVHN files whose md5 differs from the official archives'
        (True), or use them with a warning naming each (False).
    list_file : str or None
        The ``imglist`` list file.
    """

    root: str
    part: str
    download: bool
    transform: object
    path: object
    n: object
    seed: int
    image_size: int
    channels: int
    verify_checksums: bool = True
    list_file: object = None


class ConstantColours(torch.utils.data.Dataset):
    """LA-OOD's constant-colour set: each image is one uniformly random colour.

    Parameters
    ----------
    n : int
        Number of images.
    seed : int
        Seed of the colours; the same seed gives the same set.
    image_size : int
        Side of the square images.
    channels : int
        3 gives random RGB colours, 1 random grey levels.

    Notes
    -----
    Items are ``(image, -1)``: an OOD set has no ID class.
    """

    def __init__(self, n, seed, image_size, channels):
        rng = np.random.default_rng(seed)
        self.colours = torch.from_numpy(rng.random((n, channels), dtype=np.float32))
        self.image_size = image_size

    def __len__(self):
        return len(self.colours)

    def __getitem__(self, index):
        colour = self.colours[index][:, None, None]
        return colour.expand(-1, self.image_size, self.image_size).clone(), -1


class ChecksumError(DataError):
    """A data file parses, but its md5 is not the official archive's (and ``verify_checksums`` is on)."""


def _md5_policy(entries, module, verify: bool, what: str) -> dict:
    """Check ``(path, official md5)`` entries the way torchvision does, under the ``verify_checksums`` policy.

    torchvision checks the md5 of every CIFAR/SVHN file against the official
    archives and reports any difference as "not found or corrupted ... use
    download=True": the wrong diagnosis for a repacked, subsampled or converted
    copy. Here a missing file is still "not found" (returns None); a file with
    another md5 is refused naming it, both md5s and the switch, or, with
    ``verify=False``, accepted with a warning naming it.

    ``module`` is torchvision's dataset module: its ``check_integrity`` is the
    check (looked up at call time, as torchvision's own code does).

    Returns
    -------
    dict or None
        ``path -> actual md5`` of the accepted mismatches; None if a file is missing.
    """
    from torchvision.datasets.utils import calculate_md5

    if not all(os.path.isfile(path) for path, _ in entries):
        return None
    accepted = {}
    for path, md5 in entries:
        if module.check_integrity(path, md5):
            continue
        actual = calculate_md5(path)
        if verify:
            raise ChecksumError(
                f"{what} file '{path}' has md5 {actual}, not the official archive's {md5}: a repacked, subsampled "
                "or converted copy (or a damaged download). Hint: set generate.verify_checksums: false to use "
                "files that parse but differ from the official ones (each is then named in a warning).")
        log.warning("%s file %s has md5 %s, not the official %s: used anyway (generate.verify_checksums: false)",
                    what, path, actual, md5)
        accepted[path] = actual
    return accepted


class _PolicyCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 under the ``verify_checksums`` policy; checks only the part it reads, and the meta.

    torchvision also requires the other part's files; a copy holding only the test
    batch is a legitimate OOD set.
    """

    def __init__(self, root, *, verify_checksums=True, **kwargs):
        self.verify_checksums = verify_checksums
        super().__init__(root, **kwargs)

    def _check_integrity(self) -> bool:
        from torchvision.datasets import cifar

        folder = os.path.join(self.root, self.base_folder)
        files = [*(self.train_list if self.train else self.test_list), (self.meta["filename"], self.meta["md5"])]
        accepted = _md5_policy([(os.path.join(folder, name), md5) for name, md5 in files], cifar,
                               self.verify_checksums, type(self).__name__.removeprefix("_Policy"))
        if accepted is None:
            return False
        meta = os.path.join(folder, self.meta["filename"])
        if meta in accepted:  # torchvision's _load_meta checks it again: against the md5 accepted here
            self.meta = {**self.meta, "md5": accepted[meta]}
        return True


class _PolicyCIFAR100(_PolicyCIFAR10, datasets.CIFAR100):
    """torchvision's CIFAR-100 under the ``verify_checksums`` policy."""


class _PolicySVHN(datasets.SVHN):
    """torchvision's SVHN under the ``verify_checksums`` policy."""

    def __init__(self, root, *, verify_checksums=True, **kwargs):
        self.verify_checksums = verify_checksums
        super().__init__(root, **kwargs)

    def _check_integrity(self) -> bool:
        from torchvision.datasets import svhn

        entries = [(os.path.join(self.root, self.filename), self.split_list[self.split][2])]
        return _md5_policy(entries, svhn, self.verify_checksums, "SVHN") is not None


class _TrainPart:
    """A torchvision set whose part is chosen by ``train=`` (CIFAR-10/100, MNIST, FashionMNIST)."""

    def __init__(self, cls, checked=False):
        self.cls, self.checked = cls, checked

    def __call__(self, req):
        policy = {"verify_checksums": req.verify_checksums} if self.checked else {}
        return self.cls(req.root, train=req.part == "train", transform=req.transform, download=req.download,
                        **policy)


def _svhn(req):
    return _PolicySVHN(req.root, split=req.part, transform=req.transform, download=req.download,
                       verify_checksums=req.verify_checksums)


def _imagefolder(req):
    if req.path is None:
        raise invalid_param("path", _OWNER, "a directory for source 'imagefolder'", None)
    return datasets.ImageFolder(os.path.join(req.root, req.path), transform=req.transform)


class ImageListDataset(torch.utils.data.Dataset):
    """The images an image list names, with its labels (OpenOOD v1.5's ``ImglistDataset``, without its extras).

    Parameters
    ----------
    root : str
        ``generate.root``.
    path : str or None
        The image root the list's paths are relative to (relative to ``root``
        unless absolute); ``root`` itself when None.
    list_file : str
        The list file (relative to ``root`` unless absolute), parsed by
        :func:`pipeline.fingerprint.read_imglist`.
    transform : callable
        PIL image -> tensor (:func:`make_transform`).

    Attributes
    ----------
    samples : list of (str, int)
        Each entry's image file and label, in list order (as ``ImageFolder``'s).
    targets : list of int
        The labels: class indices for an ID list, ``-1`` for an OOD one.
    classes : None
        A list names no classes; the ID classes are ``0..max label``
        (:func:`pipeline.userdata.make_source_benchmark`).

    Notes
    -----
    Images are opened as ``ImageFolder`` opens them (``pil_loader``: PIL, RGB),
    then ``transform`` makes them grey or RGB of the benchmark's size.
    """

    classes = None

    def __init__(self, root, path, list_file, transform):
        entries = read_imglist(os.path.join(root, list_file))
        images = os.path.join(root, path or ".")
        self.samples = [(os.path.join(images, rel), label) for rel, label in zip(entries.images,
                                                                                 entries.labels.tolist())]
        self.targets = entries.labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        file, label = self.samples[index]
        return self.transform(datasets.folder.pil_loader(file)), label


def _imglist(req):
    if req.list_file is None:
        raise invalid_param("list_file", _OWNER, "an image list file for source 'imglist'", None)
    return ImageListDataset(req.root, req.path, req.list_file, req.transform)


def _constant(req):
    n = CONSTANT_DEFAULT_N if req.n is None else req.n
    return ConstantColours(n, req.seed, req.image_size, req.channels)


SOURCES = {
    "cifar10": _TrainPart(_PolicyCIFAR10, checked=True),
    "cifar100": _TrainPart(_PolicyCIFAR100, checked=True),
    "svhn": _svhn,
    "mnist": _TrainPart(datasets.MNIST),
    "fashionmnist": _TrainPart(datasets.FashionMNIST),
    "imagefolder": _imagefolder,
    "imglist": _imglist,
    "constant": _constant,
}


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_args(name, part, image_size, channels, n):
    """Raise ConfigError for the first invalid argument of :func:`load_source`."""
    if name not in SOURCES:
        raise invalid_param("name", _OWNER, f"one of {sorted(SOURCES)}", name)
    if part not in PARTS:
        raise invalid_param("part", _OWNER, f"one of {list(PARTS)}", part)
    if not (_is_int(image_size) and image_size > 0):
        raise invalid_param("image_size", _OWNER, "a positive int", image_size)
    if channels not in CHANNELS or not _is_int(channels):
        raise invalid_param("channels", _OWNER, f"one of {list(CHANNELS)}", channels)
    if n is not None and not (_is_int(n) and n > 0):
        raise invalid_param("n", _OWNER, "None or a positive int", n)


class _ConvertMode:
    """PIL ``convert`` as a picklable transform (DataLoader workers pickle it)."""

    def __init__(self, mode):
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)


def make_transform(image_size, channels, resize=None):
    """The transform every file-backed source applies.

    Parameters
    ----------
    image_size : int
        Side of the square output.
    channels : {1, 3}
        Output channels: grey images are repeated to RGB, RGB images made grey.
    resize : int, optional
        Shorter side before the centre crop; ``image_size`` when None.
        ImageNet's evaluation transform is ``resize=256, image_size=224``.

    Returns
    -------
    transforms.Compose
        PIL image -> float32 tensor (channels, image_size, image_size) in [0, 1].
    """
    return transforms.Compose([
        _ConvertMode("L" if channels == 1 else "RGB"),
        transforms.Resize(image_size if resize is None else resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
    ])


_HINTS = {"imagefolder": FOLDER_HINT, "imglist": LIST_HINT}


def _missing(name, exc, root):
    """A one-line DataError for a data set whose files are missing or unreadable, naming where it looked."""
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    # torchvision's text advises download=True whatever the cause: say what it found instead
    reason = reason.replace("Dataset not found or corrupted. You can use download=True to download it",
                            "files not found, or not the official files")
    where = "which does not exist" if not os.path.isdir(root) else "under it"
    return DataError(
        f"Could not read data set '{name}' under generate.root '{root}' ({where}; {reason}). Expected "
        f"{EXPECTED_LAYOUT[name]}. Hint: {_HINTS.get(name, MISSING_HINT)}."
    )


def load_source(name, *, root, part="test", download=False, image_size=32, channels=3,
                n=None, seed=0, path=None, resize=None, verify_checksums=True, list_file=None):
    """Load one benchmark data set as a torch ``Dataset``.

    Parameters
    ----------
    name : str
        A key of :data:`SOURCES`.
    root : str or path-like
        Directory holding the data, laid out as :data:`EXPECTED_LAYOUT` says.
    part : {"train", "test"}, default="test"
        torchvision's ``train=True/False`` (SVHN: ``split``). Ignored by
        ``imagefolder``, ``imglist`` and ``constant``.
    download : bool, default=False
        Let torchvision download missing files (needs a network).
    image_size : int, default=32
        Side of the square output images (the ID size).
    channels : {1, 3}, default=3
        Channels of the output images.
    n : int, optional
        At most this many samples, chosen by :func:`capped_subset` with ``seed``;
        for ``constant``, the set's size (default :data:`CONSTANT_DEFAULT_N`).
    seed : int, default=0
        Seed of the cap and of the constant colours.
    path : str or path-like, optional
        The ``imagefolder`` directory, or the ``imglist`` image root (``root``
        itself when None), relative to ``root`` unless absolute.
    resize : int, optional
        Shorter side before the centre crop (see :func:`make_transform`).
    verify_checksums : bool, default=True
        CIFAR-10/100 and SVHN: refuse a file whose md5 is not the official
        archive's (a :class:`ChecksumError` naming it), or, when False, use it
        if it parses and name it in a warning.
    list_file : str or path-like, optional
        The ``imglist`` list file, relative to ``root`` unless absolute.

    Returns
    -------
    torch.utils.data.Dataset
        Items ``(image, label)``: float32 tensor (channels, image_size,
        image_size) in [0, 1], and an ``int`` (the data set's own class index,
        or the list's label; ``-1`` for ``constant``).

    Raises
    ------
    ConfigError
        An unknown name or an invalid argument.
    DataError
        The files are missing or unreadable, or an image list is malformed.
    """
    _check_args(name, part, image_size, channels, n)
    if resize is not None and not (_is_int(resize) and resize >= image_size):
        raise invalid_param("resize", _OWNER, f"None or an int >= image_size={image_size}", resize)
    req = SourceRequest(os.fspath(root), part, download, make_transform(image_size, channels, resize),
                        path, n, seed, image_size, channels, verify_checksums, list_file)
    try:
        dataset = SOURCES[name](req)
    except ChecksumError:
        raise
    except (RuntimeError, OSError) as exc:
        raise _missing(name, exc, req.root) from exc
    if n is None or name == "constant":
        return dataset
    return capped_subset(dataset, n, seed)


def capped_subset(dataset, n, seed):
    """A seeded random choice of at most ``n`` samples of ``dataset``.

    The choice is uniform without replacement, so a class-sorted data set does
    not give its first classes only; the chosen indices are returned in ascending
    order so that reading stays sequential.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Any sized dataset.
    n : int
        Maximum number of samples; all of them are kept if there are fewer.
    seed : int
        Seed of the choice.

    Returns
    -------
    torch.utils.data.Subset
        ``min(n, len(dataset))`` samples, indices ascending.
    """
    if not (_is_int(n) and n > 0):
        raise invalid_param("n", "capped_subset", "a positive int", n)
    size = len(dataset)
    if n >= size:
        return torch.utils.data.Subset(dataset, list(range(size)))
    chosen = np.random.default_rng(seed).choice(size, size=n, replace=False)
    return torch.utils.data.Subset(dataset, np.sort(chosen).tolist())


def source_targets(dataset):
    """Every item's own class index, read without decoding an image.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        A data set of :data:`SOURCES`, before any cap.

    Returns
    -------
    ndarray of shape (len(dataset),), int64
        torchvision's ``targets`` (``labels`` for SVHN), an image list's labels;
        ``-1`` for ``constant``.
    """
    if isinstance(dataset, ConstantColours):
        return np.full(len(dataset), -1, dtype=np.int64)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = dataset.labels  # SVHN
    return np.asarray(targets, dtype=np.int64).reshape(-1)


def source_classes(dataset):
    """Class names of a source, or None for one without classes (``constant``, SVHN, ``imglist``)."""
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else None


def data_signature(name, root, part, dataset, indices, path=None, cache=None, list_file=None):
    """The content of the files behind the chosen samples, wherever ``root`` is.

    Parameters
    ----------
    name : str
        A key of :data:`SOURCES`.
    root : str or path-like
        The data root the source was read from.
    part : {"train", "test"}
    dataset : torch.utils.data.Dataset
        The uncapped source (``imagefolder``, ``imglist``: its ``samples`` give the chosen files).
    indices : ndarray of int
        The chosen samples.
    path : str, optional
        The ``imagefolder`` directory, or the ``imglist`` image root.
    cache : pipeline.fingerprint.HashCache, optional
    list_file : str, optional
        The ``imglist`` list file.

    Returns
    -------
    dict
        ``{"files", "bytes", "sha256"}`` of :func:`pipeline.fingerprint.digest_files`:
        paths relative to the data set's folder, contents by SHA-256 (from the
        stat-keyed cache when unchanged), so a same-size edit changes it and an
        identical copy under another root does not. Empty (no files) for ``constant``.
        An image list's file is part of it (the labels are there), with the
        chosen images, all relative to the directory holding both
        (:func:`pipeline.fingerprint.imglist_layout`).
    """
    if name == "imagefolder":
        base = os.path.join(os.fspath(root), path)
        files = [os.path.relpath(dataset.samples[i][0], base) for i in np.asarray(indices).tolist()]
    elif name == "imglist":
        layout = imglist_layout(root, path, list_file)
        base = layout.base
        files = [layout.list_file, *(os.path.relpath(os.path.abspath(dataset.samples[i][0]), base)
                                     for i in np.asarray(indices).tolist())]
    else:
        found = source_files(name, root, part, path)
        base, files = found.base, found.files
    return digest_files(base, files, cache)
