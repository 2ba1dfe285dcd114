import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.errors import ConfigError, DataError, StoreError
from pipeline.scoring import fit_detectors, load_detectors, save_detectors, score_split
from pipeline.store import ArraySpec, StoreWriter, open_store


def write_store(path, blobs, checkpoint="aaa", shard_rows=32):
    """A two-layer store from Gaussian blobs: id_train, id_test and an OOD split."""
    data = {"id_train": (blobs.X_train, blobs.y_train), "id_test": (blobs.X_id, blobs.y_id),
            "far_test": (blobs.X_ood, np.full(len(blobs.X_ood), -1))}
    d = blobs.X_train.shape[1]
    specs = [ArraySpec("l1", d, "float32"), ArraySpec("l2", d, "float32"),
             ArraySpec("energy", 2, "float32", dim="layer"), ArraySpec("label", None, "int64")]
    with StoreWriter(path, "k", chunk_rows=16, shard_rows=shard_rows) as writer:
        for split, (X, y) in data.items():
            writer.create_split(split, len(X), specs, {"n_samples": len(X)})
            for i in writer.pending_shards(split, len(X)):
                a, b = writer.shard_range(i, len(X))
                norm = np.linalg.norm(X[a:b], axis=1)
                writer.write_shard(split, i, {"l1": X[a:b], "l2": -X[a:b], "energy": np.stack([norm, -norm], 1),
                                              "label": y[a:b]})
        writer.finalize({"checkpoint_sha256": checkpoint}, ["l1", "l2"])
    return open_store(path)


def test_fit_and_score_every_layer_from_the_store(tmp_path, blobs):
    store = write_store(tmp_path / "s.zarr", blobs)
    fitted = fit_detectors(store, {"knn": {"n_neighbors": 5}, "mahalanobis": {}})
    assert set(fitted.detectors) == {(d, l) for d in ("knn", "mahalanobis") for l in ("l1", "l2")}
    id_scores, ood_scores = score_split(store, "id_test", fitted), score_split(store, "far_test", fitted)
    for method in ("knn", "mahalanobis"):
        assert id_scores[method].shape == (len(blobs.X_id), 2)
        y = np.r_[np.zeros(len(blobs.X_id)), np.ones(len(blobs.X_ood))]
        assert roc_auc_score(y, np.r_[id_scores[method][:, 0], ood_scores[method][:, 0]]) > 0.95
    np.testing.assert_allclose(id_scores["energy"][:, 0], np.linalg.norm(blobs.X_id, axis=1), rtol=1e-5)


def test_block_scoring_equals_whole_array_scoring(tmp_path, blobs):
    # the store is read shard by shard; small shards must not change any score
    small = write_store(tmp_path / "small.zarr", blobs, shard_rows=16)
    whole = write_store(tmp_path / "whole.zarr", blobs, shard_rows=512)
    params = {"knn": {}, "ecod": {}, "mahalanobis": {}}
    a = score_split(small, "far_test", fit_detectors(small, params))
    b = score_split(whole, "far_test", fit_detectors(whole, params))
    for method in params:
        np.testing.assert_allclose(a[method], b[method], rtol=1e-10)


def test_save_and_load_round_trip(tmp_path, blobs):
    store = write_store(tmp_path / "s.zarr", blobs)
    fitted = fit_detectors(store, {"knn": {}})
    loaded = load_detectors(save_detectors(fitted, tmp_path / "det"))
    assert loaded.layers == ["l1", "l2"] and loaded.names == ["knn"]
    np.testing.assert_array_equal(score_split(store, "id_test", loaded)["knn"], score_split(store, "id_test", fitted)["knn"])
    assert not (tmp_path / "det.tmp").exists()


def test_detectors_from_another_checkpoint_are_refused(tmp_path, blobs):
    fitted = fit_detectors(write_store(tmp_path / "a.zarr", blobs, checkpoint="aaa111"), {"knn": {}})
    other = write_store(tmp_path / "b.zarr", blobs, checkpoint="bbb222")
    with pytest.raises(StoreError, match=r"fitted on features from checkpoint aaa111.*from checkpoint bbb222"):
        fitted.check_compatible(other)


def test_bad_detector_fails_before_any_fitting(tmp_path, blobs):
    store = write_store(tmp_path / "s.zarr", blobs)
    with pytest.raises(ConfigError, match=r"'fit.detectors' parameter of fit must be one of .*Got 'knm'"):
        fit_detectors(store, {"knn": {}, "knm": {}})


def test_missing_detectors(tmp_path):
    with pytest.raises(DataError, match=r"No fitted detectors in .*layerscope fit"):
        load_detectors(tmp_path / "nothing")
