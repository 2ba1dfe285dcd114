"""Out-of-core paths give what the in-memory ones give: blockwise fits, blockwise scoring, the search."""

import dataclasses

import dask.array as da
import numpy as np
import pytest

from pipeline.detectors import make_detector
from pipeline.detectors.mahalanobis import ClassConditionalMahalanobis, blockwise_sum
from pipeline.errors import DataError
from pipeline.scorers import make_scorer
from pipeline.scoring import fit_detectors, fit_scorers, load_features, score_methods
from pipeline.search import run_search
from pipeline.store import ArraySpec, StoreWriter, open_store


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_mahalanobis_fit_dask_equals_fit(blobs, standardize, chunk):
    X = blobs.X_train * np.linspace(0.5, 4, blobs.X_train.shape[1]) + 2.0  # unequal scales, non-zero mean
    eager = make_detector("mahalanobis", {}, standardize=standardize).fit(X, blobs.y_train)
    lazy = make_detector("mahalanobis", {}, standardize=standardize).fit_dask(
        da.from_array(X, chunks=(chunk, X.shape[1])), blobs.y_train)
    np.testing.assert_allclose(lazy.score(blobs.X_ood), eager.score(blobs.X_ood), rtol=1e-9)
    inner = lazy.detector_ if standardize else lazy
    reference = eager.detector_ if standardize else eager
    np.testing.assert_allclose(inner.covariance_, reference.covariance_, atol=1e-10)
    np.testing.assert_allclose(inner.means_, reference.means_, atol=1e-12)


def test_blockwise_sum_adds_the_blocks(rng):
    X = rng.normal(size=(50, 3))
    labels = rng.integers(0, 2, 50)
    (total,) = blockwise_sum(lambda block, y: (block[y == 1].sum(axis=0),), da.from_array(X, chunks=(8, 3)), labels)
    np.testing.assert_allclose(total, X[labels == 1].sum(axis=0))


def test_blockwise_sum_refuses_feature_chunks(rng):
    with pytest.raises(DataError, match="chunked along samples only"):
        blockwise_sum(lambda b, y: (b.sum(),), da.from_array(rng.normal(size=(10, 4)), chunks=(5, 2)), np.zeros(10))


def test_mahalanobis_fit_dask_needs_labels(blobs):
    with pytest.raises(Exception, match="'y' parameter of ClassConditionalMahalanobis.fit"):
        ClassConditionalMahalanobis().fit_dask(da.from_array(blobs.X_train, chunks=(16, 8)))


def _store(path, blobs, shard_rows):
    """id_train / id_val / id_test / far_val / far_test with one layer, logits, penultimate and a head."""
    rng = np.random.default_rng(1)
    W, b = rng.normal(size=(3, 8)), rng.normal(size=3)
    parts = {"id_train": (blobs.X_train, blobs.y_train, "id", "train"),
             "id_val": (blobs.X_id[:20], blobs.y_id[:20], "id", "val"),
             "id_test": (blobs.X_id[20:], blobs.y_id[20:], "id", "test"),
             "far_val": (blobs.X_ood[:30], -np.ones(30, int), "far", "val"),
             "far_test": (blobs.X_ood[30:], -np.ones(len(blobs.X_ood) - 30, int), "far", "test")}
    specs = [ArraySpec("l1", 8, "float32"), ArraySpec("grad.l1", 8, "float32"), ArraySpec("penultimate", 8, "float32"),
             ArraySpec("energy", 1, "float32", dim="layer"), ArraySpec("logits", 3, "float32", dim="class"),
             ArraySpec("label", None, "int64")]
    with StoreWriter(path, "k", chunk_rows=8, shard_rows=shard_rows) as writer:
        writer.write_constants("head", {"weight": W, "bias": b})
        for split, (X, y, role, part) in parts.items():
            writer.create_split(split, len(X), specs, {"n_samples": len(X), "role": role, "set": "far" if role == "far"
                                                       else "id", "part": part})
            for i in writer.pending_shards(split, len(X)):
                lo, hi = writer.shard_range(i, len(X))
                x = np.maximum(X[lo:hi], 0)
                writer.write_shard(split, i, {"l1": X[lo:hi], "grad.l1": np.sin(X[lo:hi]), "penultimate": x,
                                              "logits": x @ W.T + b,
                                              "energy": -np.linalg.norm(X[lo:hi], axis=1, keepdims=True),
                                              "label": y[lo:hi]})
        writer.finalize({"checkpoint_sha256": "x", "grad_layers": ["l1"]}, ["l1"])
    return open_store(path)


def test_score_methods_block_by_block_equals_the_whole_split(tmp_path, blobs):
    store = _store(tmp_path / "s.zarr", blobs, shard_rows=8)
    scorers = {name: make_scorer(name, params).fit(load_features(store, "id_train"))
               for name, params in {"msp": {}, "ebo": {}, "react": {"percentile": 80}, "vim": {"dim": 3},
                                    "scale": {"percentile": 70}, "ash_s": {"percentile": 70}}.items()}
    assert len(store.block_ranges("far_test")) > 2
    blockwise = score_methods(store, "far_test", scorers)
    whole = load_features(store, "far_test")
    for name, scorer in scorers.items():
        np.testing.assert_allclose(blockwise[name]["score"], scorer.score(whole), rtol=1e-12, err_msg=name)


def test_fit_detectors_out_of_core_matches_in_memory(tmp_path, blobs):
    store = _store(tmp_path / "s.zarr", blobs, shard_rows=16)
    lazy = fit_detectors(store, {"mahalanobis": {}})  # supports_dask: shard by shard
    eager = fit_detectors(store, {"mahalanobis": {}}, max_samples=10_000)  # max_samples: the in-memory path
    X = blobs.X_ood.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(lazy.detectors["mahalanobis", "l1"].score(X),
                               eager.detectors["mahalanobis", "l1"].score(X), rtol=1e-8)


def test_the_stores_shards_fit_exactly_as_its_dask_array(tmp_path, blobs):
    store = _store(tmp_path / "s.zarr", blobs, shard_rows=16)
    sharded, lazy = store.sharded("id_train", "l1"), store.to_dask("id_train", "l1")
    for attribute in ("shape", "ndim", "dtype", "chunks"):
        assert getattr(sharded, attribute) == getattr(lazy, attribute), attribute
    assert len(sharded.chunks[0]) > 2
    for (start, block), expected in zip(sharded.iter_blocks(), lazy.to_delayed().ravel(), strict=True):
        np.testing.assert_array_equal(block, expected.compute())
    no_train = dataclasses.replace(blobs, X_train=blobs.X_train[:0], y_train=blobs.y_train[:0])
    empty = _store(tmp_path / "e.zarr", no_train, shard_rows=16)
    assert [(start, len(block)) for start, block in empty.sharded("id_train", "l1").iter_blocks()] == [(0, 0)]
    labels = store.to_numpy("id_train", "label")
    for standardize in (False, True):
        a = make_detector("rmds", {}, standardize=standardize).fit_dask(sharded, labels)
        b = make_detector("rmds", {}, standardize=standardize).fit_dask(lazy, labels)
        np.testing.assert_array_equal(a.score(blobs.X_ood), b.score(blobs.X_ood))  # the same sums, bit for bit


def test_search_rows_keep_grid_order_whatever_the_completion_order(tmp_path, blobs):
    store = _store(tmp_path / "s.zarr", blobs, shard_rows=16)
    grid = {"react": {"percentile": [70, 80, 90]}, "ebo": {"temperature": [0.5, 1.0, 2.0]}, "mahalanobis": {}}
    sets = {"val": {"far": {"split": "far_val", "role": "far"}}, "test": {"far": {"split": "far_test", "role": "far"}}}
    one = run_search(store, grid, n_jobs=1, ood_val=sets["val"], ood_test=sets["test"])
    many = run_search(store, grid, n_jobs=4, ood_val=sets["val"], ood_test=sets["test"])
    key = [(r["method"], str(r["params"]), r["column"]) for r in one.rows]
    assert key == [(r["method"], str(r["params"]), r["column"]) for r in many.rows]
    assert [r["val"] for r in one.rows] == [r["val"] for r in many.rows]
    assert one.best_params() == many.best_params()


def test_nac_reads_only_its_balanced_subset_and_fits_the_same(tmp_path, blobs):
    store = _store(tmp_path / "s.zarr", blobs, shard_rows=16)
    params = {"n_train": 30, "alpha": 10.0, "M": 10, "O": 3}
    whole = make_scorer("nac_ue", params).fit(load_features(store, "id_train"))
    subset = fit_scorers(store, {"nac_ue": params})["nac_ue"]
    assert len(subset.train_indices_) == 30 < len(blobs.X_train)
    np.testing.assert_array_equal(subset.train_indices_, whole.train_indices_)
    np.testing.assert_array_equal(subset.counts_["l1"], whole.counts_["l1"])
    test = load_features(store, "far_test")
    np.testing.assert_allclose(subset.score(test), whole.score(test))


def test_take_reads_the_given_rows(tmp_path, blobs):
    store = _store(tmp_path / "s.zarr", blobs, shard_rows=16)
    index = np.array([0, 5, 17, 40])
    np.testing.assert_array_equal(store.take("id_train", "l1", index), store.to_numpy("id_train", "l1")[index])
    np.testing.assert_array_equal(store.take("id_train", "label", index), blobs.y_train[index])
