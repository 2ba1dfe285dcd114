"""Two artifacts a stage reads must belong together; a mismatch names both artifacts and both hashes.

Regression tests for issue 14 ("Provenance checked in some places only": fit,
detect and calibrate never compared the store's checkpoint with the model).
The guard's checks (thresholds vs detectors vs model) are in ``test_deploy.py``.
"""

import hashlib

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.artifacts import file_sha256
from pipeline.cli import app
from pipeline.errors import DataError
from pipeline.provenance import Claim, ProvenanceError, check_store_model, require_same
from pipeline.scoring import fit_detectors, save_detectors
from tests.test_scoring import write_store

runner = CliRunner()


@pytest.fixture
def model_and_store(tmp_path, blobs):
    """A checkpoint file and a store extracted "with it" (its SHA-256 recorded), plus another checkpoint."""
    model, other = tmp_path / "model.pt", tmp_path / "other.pt"
    model.write_bytes(b"the weights")
    other.write_bytes(b"other weights")
    store = write_store(tmp_path / "s.zarr", blobs, checkpoint=hashlib.sha256(b"the weights").hexdigest())
    return model, other, store


def test_one_message_format_naming_both_values():
    with pytest.raises(ProvenanceError, match=r"^The thing 'a' says x, but the other 'b' says \(not recorded\). "
                                              r"Hint: fix it.$"):
        require_same(Claim("the thing 'a'", "says", "x"), Claim("the other 'b'", "says", None), hint="fix it.")
    require_same(Claim("a", "says", "x"), Claim("b", "says", "x"), hint="unused")


def test_store_against_model(model_and_store):
    model, other, store = model_and_store
    check_store_model(store, model)  # the checkpoint it was extracted with
    check_store_model(store, None)  # no model to check against: nothing to do
    with pytest.raises(ProvenanceError, match=rf"^The feature store '.*s.zarr' holds features of checkpoint "
                                              rf"{file_sha256(model)}, but the model '.*other.pt' has SHA-256 "
                                              rf"{file_sha256(other)}. Hint: rerun `dvc repro`"):
        check_store_model(store, other)
    with pytest.raises(DataError, match=r"Model checkpoint '.*gone.pt' does not exist. Hint: run `layerscope train`"):
        check_store_model(store, model.parent / "gone.pt")


def one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output
    return lines[0]


def test_fit_and_detect_refuse_a_store_of_another_model_before_any_work(model_and_store, tmp_path):
    model, other, store = model_and_store
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"fit": {"detectors": {"knn": {}}}, "detect": {"methods": {"msp": {}}}}))
    common = ["--params", str(params), "--features", str(store.path), "--model", str(other)]
    line = one_line_error(runner.invoke(app, ["fit", *common, "--out", str(tmp_path / "det")], terminal_width=500))
    assert file_sha256(model) in line and file_sha256(other) in line and not (tmp_path / "det").exists()
    save_detectors(fit_detectors(store, {"knn": {}}), tmp_path / "det")
    line = one_line_error(runner.invoke(app, ["detect", *common, "--detectors", str(tmp_path / "det"), "--metrics",
                                              str(tmp_path / "m.json")], terminal_width=500))
    assert file_sha256(model) in line and file_sha256(other) in line and not (tmp_path / "m.json").exists()


def test_without_a_project_or_a_model_option_nothing_is_checked(model_and_store, tmp_path, monkeypatch):
    # every path given as an option outside a project (no dvc.yaml): no default checkpoint to compare with
    _, _, store = model_and_store
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"fit": {"detectors": {"mahalanobis": {}}}}))
    result = runner.invoke(app, ["fit", "--params", str(params), "--features", str(store.path), "--out",
                                 str(tmp_path / "det")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "det/layerscope.json").is_file()
