"""Tiny data sets written in each one's real on-disk format, for offline tests.

CIFAR-10/100 as torchvision's pickled batches, SVHN as ``.mat`` files, MNIST and
FashionMNIST as idx files, image-folder sets as PNG trees, image lists as
OpenOOD v1.5 writes them (a list file naming PNGs under an image root). The real
loaders read them back; the only patch tests need is the md5 check of the
CIFAR and SVHN files (the ``no_md5`` fixture in ``conftest.py``).
"""

import pickle
import struct

import numpy as np
import scipy.io
from PIL import Image

N = 10  # images per file (per batch file for CIFAR-10)


def rgb(rng, n=N, side=32):
    """Random uint8 images of shape (n, 3, side, side)."""
    return rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8)


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root, rng, n=N):
    """``cifar-10-batches-py``: 5 train batches and a test batch of ``n`` images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, labels = rgb(rng, n), rng.integers(0, 10, n).tolist()
        _pickle(folder / name, {"data": images.reshape(n, -1), "labels": labels})
        written[name] = images, labels
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return written


def write_cifar100(root, rng, n=N):
    """``cifar-100-python``: train and test files with fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name in ("train", "test"):
        images, labels = rgb(rng, n), rng.integers(0, 100, n).tolist()
        _pickle(folder / name, {"data": images.reshape(n, -1), "fine_labels": labels,
                                "coarse_labels": [y // 5 for y in labels]})
        written[name] = images, labels
    _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                              "coarse_label_names": [f"c{i}" for i in range(20)]})
    return written


def write_svhn(root, rng, n=N):
    """``{train,test}_32x32.mat``: ``X`` is (H, W, C, n) and ``y`` (n, 1) in 1..10, 10 meaning 0."""
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for part in ("train", "test"):
        images, digits = rgb(rng, n), rng.integers(0, 10, n)
        digits[0] = 0
        y = np.where(digits == 0, 10, digits)[:, None].astype(np.uint8)
        scipy.io.savemat(root / f"{part}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": y})
        written[part] = images, digits.tolist()
    return written


def write_idx(root, folder_name, rng, n=N):
    """MNIST-style idx files under ``folder_name/raw``: magic 2051 (images), 2049 (labels)."""
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    written = {}
    for prefix, part in (("train", "train"), ("t10k", "test")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        header = struct.pack(">iiii", 2051, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())
        written[part] = images[:, None].repeat(3, axis=1), labels.tolist()
    return written


def write_imagefolder(directory, rng, classes=("a", "b"), per_class=N // 2, side=32):
    """A PNG tree ``directory/<class>/<i>.png``; returns the images (n, 3, side, side) in loader order."""
    images = rgb(rng, len(classes) * per_class, side)
    for i, image in enumerate(images):
        folder = directory / classes[i // per_class]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")
    return images


def write_imglist(root, list_file, image_root, rng, labels, side=32):
    """An OpenOOD-style image list: ``root/list_file`` naming PNGs under ``root/image_root``, one per label.

    The images go to ``<image_root>/<list file stem>/<i>.png``, so that two lists
    over one image root (OpenOOD's ``val_tin.txt`` and ``test_tin.txt``) name
    different images. Returns the images (n, 3, side, side) in list order.
    """
    from pathlib import Path

    root, stem = Path(root), Path(list_file).stem
    images = rgb(rng, len(labels), side)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        rel = f"{stem}/{i:04d}.png"
        (root / image_root / stem).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(root / image_root / rel)
        lines.append(f"{rel} {label}\n")
    (root / list_file).parent.mkdir(parents=True, exist_ok=True)
    (root / list_file).write_text("".join(lines))
    return images


WRITERS = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "svhn": write_svhn,
    "mnist": lambda root, rng, n=N: write_idx(root, "MNIST", rng, n),
    "fashionmnist": lambda root, rng, n=N: write_idx(root, "FashionMNIST", rng, n),
}


def write_sources(cfg, rng, n=N, id_classes=("c0", "c1", "c2")):
    """Write every data set (ID, OOD, aux) a ``sources`` :class:`~pipeline.config.GenerateConfig` names, under root.

    Image folders used as ID (train and test) share the class names
    ``id_classes``; other image folders get two classes. Image lists get ``n``
    images each: an ID list's labels cycle through ``len(id_classes)``
    classes, an OOD list's are ``-1``.
    """
    from pathlib import Path

    root = Path(cfg.root)
    id_specs = cfg.id_sets.values()
    id_folders = {spec.path for spec in id_specs if spec.source == "imagefolder"}
    id_lists = {spec.list for spec in id_specs if spec.source == "imglist"}
    done = set()
    for spec in cfg.specs.values():
        key = {"imagefolder": spec.path, "imglist": spec.list}.get(spec.source, spec.source)
        if key in done or spec.source == "constant":
            continue
        done.add(key)
        if spec.source == "imagefolder":
            classes = id_classes if spec.path in id_folders else ("a", "b")
            write_imagefolder(root / spec.path, rng, classes, per_class=max(2, n // len(classes)))
        elif spec.source == "imglist":
            labels = [i % len(id_classes) if spec.list in id_lists else -1 for i in range(n)]
            write_imglist(root, spec.list, spec.path or ".", rng, labels)
        else:
            WRITERS[spec.source](root, rng, n)
