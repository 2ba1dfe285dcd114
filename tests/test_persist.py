"""Fitted detectors on disk: skops files with canonical bytes, loaded from an allowlist, never a pickle.

Regression tests for issue 14 ("Pickles": a crafted ``.joblib`` in a detectors
directory ran code on ``layerscope detect``; skops output held clock readings
and ``id()``s, so identical fits gave different bytes).
"""

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io

from pipeline import persist
from pipeline.detectors import available_detectors, make_detector
from pipeline.detectors.standardized import Standardized
from pipeline.errors import IntegrityError
from pipeline.scoring import trusted_types

# the default set of params.yaml, scaled down, and every other registered detector with its defaults
PARAMS = {"iforest": {"n_estimators": 20, "random_state": 0}, "knn": {"n_neighbors": 10},
          "ocsvm": {"nu": 0.1, "gamma": "scale"}, "knn_l2": {"k": 20}, "laood_ocsvm": {"nu": 0.01}}

FIT_AND_HASH = """
import hashlib, json, sys
import numpy as np
from pipeline import persist
from tests.conftest import make_blobs
from tests.test_persist import fit, SET
b = make_blobs(np.random.default_rng(0))
out = {name: hashlib.sha256(persist.dumps(fit(name, b))).hexdigest() for name in sys.argv[1:]}
out["set"] = hashlib.sha256(persist.dumps(SET)).hexdigest()
print(json.dumps(out))
"""
SET = {"names": set("abcdefghij"), "n": 3}


def fit(name, blobs):
    det = make_detector(name, PARAMS.get(name, {}))
    return det.fit(blobs.X_train, blobs.y_train if det.requires_labels else None)


def test_every_detector_round_trips_with_equal_scores_and_canonical_bytes(blobs):
    for name in available_detectors():
        det = fit(name, blobs)
        data = persist.dumps(det)
        assert data == persist.dumps(det), name  # one process, two dumps: same bytes
        loaded = skops.io.loads(data, trusted=sorted(trusted_types()))
        # before scoring: a KD-tree counts its queries in its state
        assert persist.dumps(loaded) == data, name  # the canonical form survives a round trip
        np.testing.assert_array_equal(loaded.score(blobs.X_ood), det.score(blobs.X_ood), err_msg=name)


def test_bytes_do_not_depend_on_the_process(blobs):
    # another process has other id()s, another clock and another hash seed (set order)
    names = ["iforest", "knn", "mahalanobis", "laood_ocsvm"]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", FIT_AND_HASH, *names], env=env, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    there = json.loads(out.strip().splitlines()[-1])
    here = {name: hashlib.sha256(persist.dumps(fit(name, blobs))).hexdigest() for name in names}
    here["set"] = hashlib.sha256(persist.dumps(SET)).hexdigest()
    assert here == there


def test_canonical_archive_has_no_clock_and_no_ids(blobs):
    with zipfile.ZipFile(io.BytesIO(persist.dumps(fit("knn", blobs)))) as archive:
        infos = archive.infolist()
        schema = json.loads(archive.read("schema.json"))
    assert {info.date_time for info in infos} == {persist.ZIP_EPOCH}
    assert [info.filename for info in infos[:3]] == ["schema.json", "0.npy", "1.npy"]
    ids = [int(m) for m in re.findall(r'"__id__": (\d+)', json.dumps(schema))]
    assert min(ids) == 1 and max(ids) < 1000  # renumbered, not memory addresses


def crafted_skops(module, name, argument) -> bytes:
    """A skops file whose loading calls ``module.name(argument)`` (what a trusting loader would run)."""
    schema = {"__class__": name, "__module__": module, "__loader__": "ConstructorFromReduceNode", "__id__": 1,
              "content": {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode", "__id__": 2,
                          "content": [{"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
                                       "content": json.dumps(argument), "is_json": True, "__id__": 3}]},
              "protocol": skops.io._protocol.PROTOCOL, "_skops_version": skops.__version__}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("schema.json", json.dumps(schema))
    return buffer.getvalue()


class Touch:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("module, name, code", [
    ("os", "system", "touch {marker}"),
    ("builtins", "exec", "open({marker!r}, 'w').close()"),
])
def test_a_crafted_skops_file_is_refused_and_runs_nothing(tmp_path, module, name, code):
    marker = tmp_path / "ran"
    data = crafted_skops(module, name, code.format(marker=str(marker)))
    skops.io.loads(data, trusted=[f"{module}.{name}"])  # the file is live: a loader that trusts it runs it
    assert marker.exists()
    marker.unlink()
    (tmp_path / "det.skops").write_bytes(data)
    with pytest.raises(IntegrityError, match=rf"^Refusing to load '.*det.skops': it declares type '{module}.{name}', "
                                             r"which is not a type layerscope trusts there. Hint: "):
        persist.load(tmp_path / "det.skops", trusted_types())
    assert not marker.exists()


def test_a_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "det.skops").write_bytes(pickle.dumps(Touch(marker)))
    with pytest.raises(IntegrityError, match=r"^Refusing to load '.*det.skops': it is not a skops file \(pickles and "
                                             r"joblib files are never loaded: they can run code\). Hint: "):
        persist.load(tmp_path / "det.skops", trusted_types())
    assert not marker.exists()


def test_a_malformed_skops_file_is_one_line(tmp_path, blobs):
    data = persist.dumps(fit("mahalanobis", blobs))
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buffer, "w") as dst:
        dst.writestr("schema.json", src.read("schema.json"))  # the arrays it names are gone
    (tmp_path / "det.skops").write_bytes(buffer.getvalue())
    with pytest.raises(IntegrityError, match=r"^Refusing to load '.*det.skops': not a valid skops file \(KeyError: "):
        persist.load(tmp_path / "det.skops", trusted_types())


def test_trusted_types_come_from_the_registry():
    trusted = trusted_types()
    assert {"pipeline.detectors.standardized.Standardized", "pyod.models.iforest.IForest", "pyod.models.lof.LOF",
            "sklearn.tree._tree.Tree", "sklearn.neighbors._kd_tree.KDTree"} <= trusted
    assert not {t for t in trusted if t.startswith(("os.", "builtins.", "subprocess."))}


# ------------------------------------------------------------------ plain-data archives (pipeline.statefile)

#: our detectors whose fitted state is only arrays, numbers and strings (a neighbours index: its rows)
PLAIN = {"gmm", "knn_l2", "mahalanobis", "mahalanobis_pp", "rmds", "rmds_pp", "ssd"}


def test_each_detector_is_written_in_the_lighter_form_it_fits_and_loads_back(tmp_path, blobs):
    written = {}
    for name in available_detectors():
        for wrapped in (False, True):  # fit.standardize wraps it in Standardized (a scaler + the detector)
            det = fit(name, blobs)
            det = Standardized(detector=det).fit(blobs.X_train, blobs.y_train) if wrapped else det
            path = persist.dump(det, tmp_path / f"{name}-{wrapped}", trusted_types())
            written[name, wrapped] = path.suffix
            loaded = persist.load(path, trusted_types())
            assert type(loaded) is type(det), name
            # before scoring: a KD-tree counts its queries in its state
            assert persist.encode(loaded, trusted_types())[1] == path.read_bytes(), name  # same bytes again
            np.testing.assert_array_equal(loaded.score(blobs.X_ood), det.score(blobs.X_ood), err_msg=name)
    assert {name for (name, _), suffix in written.items() if suffix == ".zip"} == PLAIN
    assert all(written[name, False] == written[name, True] for name in available_detectors())


def test_plain_archives_have_no_clock_and_do_not_depend_on_the_process(blobs):
    names = sorted(PLAIN)
    script = ("import hashlib, json, sys\nimport numpy as np\nfrom pipeline import persist\n"
              "from pipeline.scoring import trusted_types\nfrom tests.conftest import make_blobs\n"
              "from tests.test_persist import fit\nb = make_blobs(np.random.default_rng(0))\n"
              "print(json.dumps({n: hashlib.sha256(persist.encode(fit(n, b), trusted_types())[1]).hexdigest() "
              "for n in sys.argv[1:]}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script, *names], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    here = {n: hashlib.sha256(persist.encode(fit(n, blobs), trusted_types())[1]).hexdigest() for n in names}
    assert json.loads(out.strip().splitlines()[-1]) == here
    with zipfile.ZipFile(io.BytesIO(persist.encode(fit("mahalanobis", blobs), trusted_types())[1])) as archive:
        infos = archive.infolist()
    assert {info.date_time for info in infos} == {persist.ZIP_EPOCH}
    assert [info.filename for info in infos[:2]] == ["state.json", "0.npy"]


def test_loading_a_plain_archive_does_not_import_skops(tmp_path, blobs):
    path = persist.dump(fit("mahalanobis", blobs), tmp_path / "det", trusted_types())
    script = ("import sys\nfrom pipeline import persist\nfrom pipeline.scoring import trusted_types\n"
              f"persist.load({str(path)!r}, trusted_types())\nprint('skops' in ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    assert out.strip() == "False"


def plain_archive(root, arrays=()) -> bytes:
    """A plain-data archive holding ``root`` (a state node) and ``arrays`` (name, bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("state.json", json.dumps({"format": "layerscope-estimator/1", "root": root}))
        for name, data in arrays:
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("cls", ["os.system", "subprocess.Popen", "sklearn.svm._classes.OneClassSVM"])
def test_a_plain_archive_naming_another_class_is_refused_before_it_is_imported(tmp_path, cls):
    marker = tmp_path / "ran"
    root = {"estimator": cls, "params": {"dict": {}}, "attrs": {"dict": {}}}
    if cls == "os.system":  # what a builder that trusted the name would run
        root["params"] = {"dict": {"command": f"touch {marker}"}}
    (tmp_path / "det.zip").write_bytes(plain_archive(root))
    with pytest.raises(IntegrityError, match=rf"^Refusing to load '.*det.zip': it declares type '{re.escape(cls)}', "
                                             r"which is not a type layerscope trusts there. Hint: "):
        persist.load(tmp_path / "det.zip", trusted_types())
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(pickle.dumps(Touch(p.parent / "ran"))), r"it is not a zip archive of arrays \(pickles "),
    (lambda p: p.write_bytes(plain_archive({"array": "0.npy"})), r"not a valid estimator archive \(KeyError: "),
    (lambda p: p.write_bytes(plain_archive({"array": "0.npy"}, [("0.npy", _npy(np.array([{}], dtype=object)))])),
     r"not a valid estimator archive \(ValueError: Object arrays cannot be loaded"),
    (lambda p: p.write_bytes(plain_archive([1, 2])), r"not a valid estimator archive \(ValueError: a malformed node"),
    (lambda p: p.write_bytes(plain_archive({"estimator": "pipeline.detectors.mahalanobis.ClassConditionalMahalanobis",
                                            "params": {"dict": {"normalize": "none", "reg": 1e-6, "no_such": 1}},
                                            "attrs": {"dict": {}}})),
     r"not a valid estimator archive \(TypeError: .*'no_such'"),
])
def test_a_damaged_plain_archive_is_one_line_and_runs_nothing(tmp_path, damage, message):
    path = tmp_path / "det.zip"
    damage(path)
    with pytest.raises(IntegrityError, match=rf"^Refusing to load '.*det.zip': {message}.*Hint: "):
        persist.load(path, trusted_types())
    assert not (tmp_path / "ran").exists()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()
