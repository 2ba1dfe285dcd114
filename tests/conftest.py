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
