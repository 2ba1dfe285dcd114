import dataclasses
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline import persist
from pipeline.artifacts import seal
from pipeline.config import read_params
from pipeline.errors import ConfigError, DataError, IntegrityError, OutputError
from pipeline.provenance import ProvenanceError
from pipeline.detectors import make_detector
from pipeline.scoring import (DETECTORS, _load_one, fit_detectors, load_detectors, save_detectors, score_split,
                              trusted_types, verify_detectors)
from pipeline.store import ArraySpec, StoreWriter, open_store
from stages import fit as fit_stage
from tests.faults import differing, tree_bytes as files_of
from tests.test_persist import PLAIN, Touch

ROOT = Path(__file__).resolve().parents[1]


def write_store(path, blobs, checkpoint="aaa", shard_rows=32, key="k"):
    """A two-layer store from Gaussian blobs: id_train, id_test and an OOD split."""
    data = {"id_train": (blobs.X_train, blobs.y_train), "id_test": (blobs.X_id, blobs.y_id),
            "far_test": (blobs.X_ood, np.full(len(blobs.X_ood), -1))}
    d = blobs.X_train.shape[1]
    specs = [ArraySpec("l1", d, "float32"), ArraySpec("l2", d, "float32"),
             ArraySpec("energy", 2, "float32", dim="layer"), ArraySpec("label", None, "int64")]
    with StoreWriter(path, key, chunk_rows=16, shard_rows=shard_rows) as writer:
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
    assert loaded.store_key == "k" and loaded.digest == fitted.digest and loaded.source == str(tmp_path / "det")
    assert not (tmp_path / "det.tmp").exists()
    assert [p.name for p in (tmp_path / ".staging").glob("det*")] == ["det.lock"]  # nothing staged is left behind


def test_only_the_named_detectors_are_loaded_but_every_file_is_checked(tmp_path, blobs):
    """The guard loads its one detector: a statefile one needs no skops import, even beside PyOD's."""
    store = write_store(tmp_path / "s.zarr", blobs)
    det = save_detectors(fit_detectors(store, {"mahalanobis": {}, "ecod": {}}), tmp_path / "det")
    code = ("import sys; from pipeline.scoring import load_detectors; "
            f"f = load_detectors({str(det)!r}, only=['mahalanobis']); "
            "assert 'skops.io' not in sys.modules, 'skops imported'; "
            "assert sorted(f.detectors) == [('mahalanobis', 'l1'), ('mahalanobis', 'l2')], f.detectors; "
            "assert f.names == ['mahalanobis', 'ecod'], f.names")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    ecod = det / "ecod" / "l1.skops"
    ecod.write_bytes(ecod.read_bytes() + b"tampered")
    with pytest.raises(IntegrityError, match=r"is damaged: file 'ecod/l1.skops'"):
        load_detectors(det, only=["mahalanobis"])


def test_a_detector_saved_before_it_gained_a_parameter_is_refused(tmp_path, blobs):
    store = write_store(tmp_path / "s.zarr", blobs)
    fitted = fit_detectors(store, {"mahalanobis": {}})
    for detector in fitted.detectors.values():
        del detector.detector_.normalize  # as saved before Mahalanobis++'s `normalize` existed
    save_detectors(fitted, tmp_path / "det")
    with pytest.raises(IntegrityError, match=r"^Detector file '.*det/.*' was written by an older layerscope "
                                             r"\('ClassConditionalMahalanobis' object has no attribute 'normalize'\)\. "
                                             r"Hint: .*fit"):
        load_detectors(tmp_path / "det")


def test_a_plain_archive_written_before_a_parameter_existed_is_refused(tmp_path, blobs):
    path = persist.dump(make_detector("mahalanobis").fit(blobs.X_train, blobs.y_train), tmp_path / "m",
                        trusted_types())
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    state = json.loads(members["state.json"])
    # as written before Mahalanobis++'s `normalize` existed (make_detector wraps it: fit.standardize)
    del state["root"]["attrs"]["dict"]["detector_"]["params"]["dict"]["normalize"]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in {**members, "state.json": json.dumps(state).encode()}.items():
            archive.writestr(name, data)
    with pytest.raises(IntegrityError, match=r"^Detector file '.*m.zip' was written by an older layerscope "
                                             r"\('ClassConditionalMahalanobis' object has no attribute 'normalize'\)\. "
                                             r"Hint: .*fit"):
        _load_one(path)


def test_detectors_from_another_checkpoint_are_refused(tmp_path, blobs):
    fitted = fit_detectors(write_store(tmp_path / "a.zarr", blobs, checkpoint="aaa111"), {"knn": {}})
    other = write_store(tmp_path / "b.zarr", blobs, checkpoint="bbb222")
    with pytest.raises(ProvenanceError, match=r"^The detectors \(not saved\) were fitted on features of checkpoint "
                                              r"aaa111, but the feature store .*b.zarr' holds features of checkpoint "
                                              r"bbb222. Hint: rerun `layerscope fit`"):
        fitted.check_compatible(other)


def test_detectors_of_another_store_of_the_same_checkpoint_are_refused(tmp_path, blobs):
    # e.g. extracted with other layers or dtype: same model, another store key
    store = write_store(tmp_path / "a.zarr", blobs, key="key-a")
    save_detectors(fit_detectors(store, {"mahalanobis": {}}), tmp_path / "det")
    other = write_store(tmp_path / "b.zarr", blobs, key="key-b")
    with pytest.raises(ProvenanceError, match=r"detectors '.*det' were fitted on the feature store with key key-a, "
                                              r"but the feature store '.*b.zarr' has key key-b"):
        load_detectors(tmp_path / "det").check_compatible(other)


def test_bad_detector_fails_before_any_fitting(tmp_path, blobs):
    store = write_store(tmp_path / "s.zarr", blobs)
    with pytest.raises(ConfigError, match=r"'fit.detectors' parameter of fit must be one of .*Got 'knm'"):
        fit_detectors(store, {"knn": {}, "knm": {}})


def test_nan_features_are_named_by_layer_split_and_store(tmp_path, blobs):
    """scikit-learn says "Input X contains NaN."; the loop that read the features says where they came from."""
    X = blobs.X_train.copy()
    X[3, 2] = np.nan
    store = write_store(tmp_path / "s.zarr", dataclasses.replace(blobs, X_train=X))
    with pytest.raises(DataError, match=r"Fitting fit.detectors.knn on layer 'l1' of split 'id_train' \(store "
                                        r"'.*s.zarr'\): Input X contains NaN.*Hint: the model produced NaN"):
        fit_detectors(store, {"knn": {}})


def test_a_param_the_data_cannot_take_is_a_config_error_naming_it(tmp_path, blobs):
    store = write_store(tmp_path / "s.zarr", blobs)
    with pytest.raises(ConfigError, match=r"fit.detectors.knn on layer 'l1'.*PyOD model 'knn' with params "
                                          r"\{'n_neighbors': 5000\} cannot be fitted on 300 samples"):
        fit_detectors(store, {"knn": {"n_neighbors": 5000}})


def test_missing_detectors(tmp_path):
    with pytest.raises(DataError, match=r"No fitted detectors in .*layerscope fit"):
        load_detectors(tmp_path / "nothing")


# ------------------------------------------------------------------ on disk: sealed, atomic, no pickles, no clock

DEFAULT_DETECTORS = read_params(Path(__file__).parents[1] / "params.yaml")["fit"]["detectors"]


def test_the_default_set_fitted_twice_saves_to_identical_bytes(tmp_path, blobs):
    store = write_store(tmp_path / "s.zarr", blobs)
    a = save_detectors(fit_detectors(store, DEFAULT_DETECTORS), tmp_path / "a")
    b = save_detectors(fit_detectors(store, DEFAULT_DETECTORS), tmp_path / "b")
    assert differing(files_of(a), files_of(b)) == []
    # no pickles: our plain-data detectors as arrays archives, the PyOD ones as skops files
    assert {rel.rsplit(".", 1)[-1] for rel in files_of(a)} == {"skops", "zip", "json"}
    assert {rel.split("/")[0] for rel in files_of(a) if rel.endswith(".zip")} == PLAIN & set(DEFAULT_DETECTORS)
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["store_key"] == "k" and manifest["provenance"]["checkpoint_sha256"] == "aaa"
    summary = verify_detectors(a)
    assert summary["detectors"] == list(DEFAULT_DETECTORS) and summary["files"] == len(DEFAULT_DETECTORS) * 2 + 1


@pytest.fixture
def saved(tmp_path, blobs):
    store = write_store(tmp_path / "s.zarr", blobs)
    return save_detectors(fit_detectors(store, {"knn": {}, "mahalanobis": {}}), tmp_path / "det")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "knn/l1.skops").unlink(), r"file 'knn/l1.skops' is missing"),
    (lambda d: (d / "knn/l2.skops").write_bytes((d / "knn/l2.skops").read_bytes()[:-10]),
     r"file 'knn/l2.skops' has \d+ bytes, expected \d+"),
    (lambda d: (d / "mahalanobis/l1.zip").write_bytes(flip((d / "mahalanobis/l1.zip").read_bytes())),
     r"file 'mahalanobis/l1.zip' has been altered"),
    (lambda d: (d / "manifest.json").write_bytes(flip((d / "manifest.json").read_bytes())),
     r"file 'manifest.json' has been altered"),
    (lambda d: (d / "knn/evil.joblib").write_bytes(b"x"), r"holds 1 file\(s\) it was not published with, e.g. "
                                                           r"'knn/evil.joblib'"),
    (lambda d: (d / "layerscope.json").unlink(), r"has no layerscope.json"),
])
def test_damaged_detectors_are_refused_naming_the_file(saved, damage, message):
    damage(saved)
    with pytest.raises(IntegrityError, match=rf"^The detectors directory '.*det' .*{message}.* Hint: rerun "
                                             r"`layerscope fit`"):
        load_detectors(saved)
    with pytest.raises(IntegrityError, match=message):
        verify_detectors(saved)


def flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def test_a_pickle_in_a_resealed_directory_is_refused_and_runs_nothing(saved, tmp_path):
    # the seal is no signature (anyone can rewrite it): what is loaded must be safe anyway
    marker = tmp_path / "ran"
    (saved / "knn/l1.skops").write_bytes(pickle.dumps(Touch(marker)))
    seal(saved, DETECTORS)
    with pytest.raises(IntegrityError, match=r"^Refusing to load '.*knn/l1.skops': it is not a skops file .*Hint: this "
                                             r"is not a detector `layerscope fit` wrote; rerun `layerscope fit`"):
        load_detectors(saved)
    assert not marker.exists()


def test_old_joblib_detectors_are_refused_with_a_hint_and_replaced_by_fit(tmp_path, blobs):
    marker, old = tmp_path / "ran", tmp_path / "det"
    (old / "knn").mkdir(parents=True)
    (old / "knn/l1.joblib").write_bytes(pickle.dumps(Touch(marker)))
    (old / "manifest.json").write_text(json.dumps({"layers": ["l1"], "detectors": ["knn"], "provenance": {},
                                                   "files": {"knn": {"l1": "knn/l1.joblib"}}}))
    with pytest.raises(IntegrityError, match=r"^The detectors '.*det' were written by an older layerscope, as joblib "
                                             r"pickles \(which can run code when loaded\): not loaded. Hint: rerun "
                                             r"`layerscope fit`"):
        load_detectors(old)
    assert not marker.exists()
    save_detectors(fit_detectors(write_store(tmp_path / "s.zarr", blobs), {"knn": {}}), old)  # recognised: replaced
    assert load_detectors(old).names == ["knn"] and not (old / "knn/l1.joblib").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "mine").mkdir() or (p / "mine/thesis.tex").write_text("x") and p / "mine",
     r"Refusing to replace '.*mine' \(--out\): it is a non-empty directory that is not a detectors directory "
     r"written by"),
    (lambda p: (p / "cache").mkdir() or (p / "cache/model.pt").write_text("x") and p / "cache",
     r"Refusing to replace '.*cache' \(--out\)"),
    (lambda p: (p / "file").write_text("x") and p / "file", r"--out '.*file' is an existing file"),
    (lambda p: (p / "f").write_text("x") and p / "f/det", r"--out '.*f/det' cannot be created: '.*f' is a file"),
])
def test_fit_refuses_an_out_it_would_destroy_before_any_work(tmp_path, make, message):
    out = make(tmp_path)
    before = files_of(tmp_path)
    # the store does not even exist: the output is checked first
    with pytest.raises(OutputError, match=message):
        fit_stage.run({"fit": {"detectors": {"knn": {}}}}, tmp_path / "missing.zarr", out)
    assert differing(files_of(tmp_path), before) == []
