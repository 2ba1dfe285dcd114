"""Shared fixtures: a seeded rng, Gaussian blobs with planted outliers, a tiny
model and a temporary feature-store path."""

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline import threads

# Under pytest-xdist, one thread per worker process (and per command a test starts,
# which inherits the cap): n workers x n threads on n cores is the oversubscription
# pipeline/threads.py exists to avoid. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    threads.use_threads(1)
    # xdist hands its workers the controller's COLUMNS (80 when not a terminal); rich would then fix the
    # width of the CLI's consoles at import, and a test's CliRunner(env={"COLUMNS": ...}) could not widen them
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


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
    os.environ.setdefault("LAYERSCOPE_HASH_CACHE", str(tmp_path_factory.mktemp("hashcache") / "hashes.sqlite3"))


@contextlib.contextmanager
def kept_thread_counts():
    """A command run in-process sizes this process's thread pools: as they were again on leaving."""
    saved_env = {var: os.environ.get(var) for var in threads.ENV_VARS}
    saved_state = dict(threads._STATE)
    torch = sys.modules.get("torch")
    saved_torch = torch.get_num_threads() if torch else None
    try:
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        threads._STATE.update(saved_state)
        if saved_torch is not None and sys.modules["torch"].get_num_threads() != saved_torch:
            sys.modules["torch"].set_num_threads(saved_torch)


@pytest.fixture(autouse=True)
def _keep_thread_counts():
    """The next test gets the thread pools back as they were (module-scoped fixtures use kept_thread_counts)."""
    with kept_thread_counts():
        yield


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


def write_tiny_store(path, model, splits):
    """``model``'s store of ``layer1``, ``layer2`` and ``fc`` (the head) on ``splits``: what `extract` would write."""
    from pipeline.extract import extract_to_store, resolve_plan
    from pipeline.store import StoreWriter, open_store
    from pipeline.userdata import SplitDataset

    plan = resolve_plan(model, ["layer1", "layer2", "fc"], (1, 8, 8), head="fc")
    with StoreWriter(path, "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(model, {n: (SplitDataset(s), s.attrs) for n, s in splits.items()}, plan, writer, batch_size=5)
        writer.finalize({"checkpoint_sha256": "abc"}, list(plan.layers))
    return open_store(path)


@pytest.fixture(scope="session")
def _default_tiny_store(tmp_path_factory):
    """The tiny model's store on the default tiny splits (those of a fresh ``rng``): built once per worker."""
    from pipeline.models import init_model

    model, splits = init_model(TINY_SPEC, seed=0).eval(), make_tiny_splits(np.random.default_rng(0))
    path = tmp_path_factory.mktemp("tiny_store") / "features.zarr"
    write_tiny_store(path, model, splits)
    return path, model.state_dict(), splits


@pytest.fixture
def tiny_store(tiny_model, tiny_splits, store_path, _default_tiny_store):
    """The tiny model's store of ``layer1``, ``layer2`` and ``fc`` (the head): what `extract` would write.

    Most tests get the same model and splits (seeded): they share one store, built once per worker and
    opened afresh for each (tests only read it). A test whose model or splits differ (it drew from ``rng``
    before them) gets its own, at ``store_path``.
    """
    from pipeline.store import open_store

    path, weights, splits = _default_tiny_store
    if _same_weights(tiny_model.state_dict(), weights) and _same_splits(tiny_splits, splits):
        return open_store(path)
    return write_tiny_store(store_path, tiny_model, tiny_splits)


def _same_weights(a, b):
    return a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)


def _same_splits(a, b):
    return a.keys() == b.keys() and all(a[n].attrs == b[n].attrs and np.array_equal(a[n].images, b[n].images)
                                        and np.array_equal(a[n].labels, b[n].labels) for n in a)


def make_tiny_splits(rng):
    """Three small image splits ``name -> ImageSplit`` of 1x8x8 images in [0, 1]."""
    from pipeline.datasets import ImageSplit

    def split(name, n, role, part):
        labels = rng.integers(0, 3, n) if role == "id" else np.full(n, -1)
        attrs = {"role": role, "set": "id" if role == "id" else name.rsplit("_", 1)[0], "part": part}
        return ImageSplit(name, rng.random((n, 1, 8, 8), dtype=np.float32), labels.astype(np.int64), attrs)

    return {s.name: s for s in (split("id_train", 37, "id", "train"), split("id_val", 11, "id", "val"),
                                split("noise_test", 9, "far", "test"))}


@pytest.fixture
def tiny_splits(rng):
    """Three small image splits ``name -> ImageSplit`` of 1x8x8 images in [0, 1]."""
    return make_tiny_splits(rng)


@pytest.fixture
def no_md5(monkeypatch):
    """Accept tiny CIFAR/SVHN files: torchvision checks their md5 otherwise (the one allowed patch)."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    monkeypatch.setattr("torchvision.datasets.svhn.check_integrity", lambda *a, **k: True)


# Modules that take a minute or more of a CI worker (2 cores, one worker each), roughly longest first. Under
# pytest-xdist each is one worker's job: the long ones start first, so that none starts last and holds the run up.
# test_e2e_dvc_reruns works on a copy of the project test_e2e_dvc builds: after two modules of other work, the
# build is done by the time it starts (otherwise its worker would wait for it).
LONG_MODULES = ["test_e2e_dvc.py", "test_presets.py", "test_e2e_inputs.py", "test_e2e_dvc_reruns.py", "test_battery.py",
                "test_guard.py", "test_faults.py", "test_compute.py", "test_experiments.py"]


def pytest_collection_modifyitems(config, items):
    """The long modules first, in :data:`LONG_MODULES`'s order, then the others in collection order.

    Serially this changes nothing but the order; in parallel it keeps a long
    module from starting last and holding the whole run up (``--dist loadscope``
    keeps each module, with its module-scoped project, on one worker, and
    ``--no-loadscope-reorder`` keeps this order: see the Makefile).
    """
    def rank(item):
        module = item.path.name
        return LONG_MODULES.index(module) if module in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: collection order otherwise
