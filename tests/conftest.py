"""Shared fixtures: a seeded rng, Gaussian blobs with planted outliers, a tiny
model and a temporary feature-store path."""

from dataclasses import dataclass

import numpy as np
import pytest


@dataclass(frozen=True)
class Blobs:
    """ID Gaussian blobs with labels, plus planted outliers.

    ``X_train``/``y_train`` : (n_train, n_features) ID training data, class labels.
    ``X_id`` : (n_test, n_features) held-out ID samples.
    ``X_ood`` : (n_ood, n_features) planted outliers, far from every blob.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_id: np.ndarray
    y_id: np.ndarray
    X_ood: np.ndarray


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory):
    """Content hashes of data files are cached outside the repo; tests keep theirs out of the user's cache."""
    import os

    os.environ.setdefault("LAYERSCOPE_HASH_CACHE", str(tmp_path_factory.mktemp("hashcache") / "hashes.sqlite3"))


@pytest.fixture
def rng():
    """A seeded generator: every test's randomness comes from here."""
    return np.random.default_rng(0)


def make_blobs(rng, n_classes=3, n_features=8, n_per_class=100, n_ood=60):
    """Tight class blobs on a sphere of radius 6, outliers scattered at radius ~12-18."""
    centers = rng.normal(size=(n_classes, n_features))
    centers *= 6.0 / np.linalg.norm(centers, axis=1, keepdims=True)

    def draw(n):
        y = np.repeat(np.arange(n_classes), n)
        return centers[y] + rng.normal(scale=1.0, size=(len(y), n_features)), y

    X_train, y_train = draw(n_per_class)
    X_id, y_id = draw(n_per_class // 2)
    direction = rng.normal(size=(n_ood, n_features))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    X_ood = direction * rng.uniform(12.0, 18.0, size=(n_ood, 1))
    return Blobs(X_train, y_train, X_id, y_id, X_ood)


@pytest.fixture
def blobs(rng):
    """Gaussian blobs (3 classes, 8 features) with planted outliers."""
    return make_blobs(rng)


@pytest.fixture
def store_path(tmp_path):
    """Where a test's feature store goes (not created)."""
    return tmp_path / "features.zarr"


TINY_SPEC = {"arch": "cifar_resnet", "num_classes": 3, "in_channels": 1, "widths": [4, 8], "blocks": [1, 1]}


@pytest.fixture
def tiny_model():
    """A seeded two-stage CIFAR ResNet on 1x8x8 inputs with 3 classes, in eval mode."""
    from pipeline.models import init_model

    return init_model(TINY_SPEC, seed=0).eval()


@pytest.fixture
def tiny_splits(rng):
    """Three small image splits ``name -> ImageSplit`` of 1x8x8 images in [0, 1]."""
    from pipeline.datasets import ImageSplit

    def split(name, n, role, part):
        labels = rng.integers(0, 3, n) if role == "id" else np.full(n, -1)
        attrs = {"role": role, "set": "id" if role == "id" else name.rsplit("_", 1)[0], "part": part}
        return ImageSplit(name, rng.random((n, 1, 8, 8), dtype=np.float32), labels.astype(np.int64), attrs)

    return {s.name: s for s in (split("id_train", 37, "id", "train"), split("id_val", 11, "id", "val"),
                                split("noise_test", 9, "far", "test"))}


@pytest.fixture
def no_md5(monkeypatch):
    """Accept tiny CIFAR/SVHN files: torchvision checks their md5 otherwise (the one allowed patch)."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    monkeypatch.setattr("torchvision.datasets.svhn.check_integrity", lambda *a, **k: True)
