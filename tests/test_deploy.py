"""Deploying the guard from the pipeline's files: calibrate from the store, evaluate, load, predict (CLI too)."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import TINY_SPEC
from pipeline.cli import app
from pipeline.config import CalibrateConfig
from pipeline.datasets import ImageSplit
from pipeline.deploy import (build_guard, calibrate_guard, evaluate_guard, layer_scores, load_guard, load_thresholds,
                             read_inputs, save_thresholds)
from pipeline.errors import ConfigError, DataError, OutputError
from pipeline.extract import extract_to_store, resolve_plan
from pipeline.models import file_sha256, save_checkpoint
from pipeline.provenance import ProvenanceError
from pipeline.scoring import fit_detectors, load_detectors, save_detectors
from pipeline.store import StoreWriter, open_store
from pipeline.userdata import SplitDataset
from stages import calibrate as calibrate_stage

runner = CliRunner()
CFG = CalibrateConfig(detector="mahalanobis", layers=("layer2", "layer1"), target_tpr=0.8)


@pytest.fixture
def project(tiny_model, tiny_splits, tmp_path, rng):
    """The pipeline's files for the tiny model: checkpoint, store (with ID-test), fitted detectors."""
    ckpt = save_checkpoint(tiny_model, TINY_SPEC, tmp_path / "model.pt")
    extra = {"id_test": ImageSplit("id_test", rng.random((15, 1, 8, 8), dtype=np.float32),
                                   rng.integers(0, 3, 15).astype(np.int64), {"role": "id", "set": "id", "part": "test"})}
    splits = {**tiny_splits, **extra}
    plan = resolve_plan(tiny_model, ["layer1", "layer2", "fc"], (1, 8, 8), head="fc")
    with StoreWriter(tmp_path / "features.zarr", "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(tiny_model, {n: (SplitDataset(s), s.attrs) for n, s in splits.items()}, plan, writer,
                         batch_size=5)
        writer.finalize({"checkpoint_sha256": file_sha256(ckpt), "input_shape": [1, 8, 8]}, list(plan.layers))
    store = open_store(tmp_path / "features.zarr")
    fitted = fit_detectors(store, {"mahalanobis": {}})
    save_detectors(fitted, tmp_path / "detectors")
    return {"root": tmp_path, "model": ckpt, "store": store, "fitted": fitted, "splits": splits}


def test_calibration_reads_id_val_from_the_store_and_keeps_the_target(project):
    content = calibrate_guard(project["store"], project["fitted"], CFG)
    assert content["layers"] == ["layer1", "layer2"]  # network order, whatever the params' order
    assert content["val_tpr"] >= 0.8 and content["input_shape"] == [1, 8, 8]
    scores = layer_scores(project["store"], "id_val", {k: project["fitted"].detectors["mahalanobis", k]
                                                       for k in content["layers"]})
    flagged = (scores > np.array([content["thresholds"][k] for k in content["layers"]])).any(axis=1)
    assert 1 - flagged.mean() == pytest.approx(content["val_tpr"])
    path = save_thresholds(content, project["root"] / "guard.json")
    assert load_thresholds(path) == json.loads(json.dumps(content))


@pytest.mark.parametrize("cfg, message", [
    (CalibrateConfig(detector="knn"), r"'calibrate.detector' parameter of calibrate must be one of the fitted "
                                      r"detectors \['mahalanobis'\]. Got 'knn'.*Hint: add it to fit.detectors"),
    (CalibrateConfig(detector="mahalanobis", layers=("layer3",)), r"'calibrate.layers' parameter of calibrate must "
                                                                   r"be layers of the store .* Got 'layer3'"),
])
def test_calibration_names_what_fit_did_not_produce(project, cfg, message):
    with pytest.raises(ConfigError, match=message):
        calibrate_guard(project["store"], project["fitted"], cfg)


@pytest.mark.parametrize("values, message", [
    ({"target_tpr": 1.0}, r"'calibrate.target_tpr' parameter of calibrate must be a float in \(0, 1\)"),
    ({"layers": []}, r"'calibrate.layers' parameter of calibrate must be a non-empty list of distinct layers"),
    ({"layers": ["a", "a"]}, r"'calibrate.layers' parameter of calibrate must be a non-empty list of distinct"),
    ({"layers": ["a", "b"], "weights": [1.0]}, r"'calibrate.weights' parameter of calibrate must be 2 non-negative"),
])
def test_calibrate_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        CalibrateConfig(**values)


def test_evaluation_reports_metrics_tpr_exits_and_flops_saved(project):
    content = calibrate_guard(project["store"], project["fitted"], CFG)
    flops = [10.0, 60.0, 100.0]
    r = evaluate_guard(project["store"], project["fitted"], content, flops)
    assert r["target_tpr"] == 0.8 and 0.0 <= r["id_test_tpr"] <= 1.0
    noise = r["sets"]["noise"]
    assert {"auroc", "fpr@95", "flagged", "exits", "flops_saved", "role"} <= set(noise)
    exits = noise["exits"]
    assert sum(exits.values()) == pytest.approx(1.0)
    # saved = 1 - mean(spent) / full, spent = 10 at layer1, 60 at layer2, 100 through
    expected = 1 - (exits["layer1"] * 10 + exits["layer2"] * 60 + exits["none"] * 100) / 100
    assert noise["flops_saved"] == pytest.approx(expected, abs=1e-5)
    assert r["far"]["flops_saved"] == noise["flops_saved"] and r["flops_per_input"]["full"] == 100.0


def test_evaluation_refuses_thresholds_of_another_checkpoint(project):
    content = {**calibrate_guard(project["store"], project["fitted"], CFG), "checkpoint_sha256": "other"}
    sha = file_sha256(project["model"])
    with pytest.raises(ProvenanceError, match=rf"^The guard thresholds 'g.json' were calibrated for checkpoint other, "
                                              rf"but the feature store .* holds features of checkpoint {sha}. Hint: "
                                              r"rerun `layerscope calibrate`"):
        evaluate_guard(project["store"], project["fitted"], content, [1.0, 2.0, 3.0], thresholds_path="g.json")


def test_load_guard_matches_the_cached_decisions(project):
    root = project["root"]
    save_thresholds(calibrate_guard(project["store"], project["fitted"], CFG), root / "guard.json")
    guard = load_guard(project["model"], root / "detectors", root / "guard.json")
    result = guard(torch.from_numpy(project["splits"]["id_test"].images))
    content = load_thresholds(root / "guard.json")
    scores = layer_scores(project["store"], "id_test", {k: project["fitted"].detectors["mahalanobis", k]
                                                        for k in content["layers"]})
    thresholds = np.array([content["thresholds"][k] for k in content["layers"]])
    assert np.array_equal(result.ood, (scores > thresholds).any(axis=1))
    other = save_checkpoint(torch.nn.Linear(1, 1), TINY_SPEC, root / "other.pt")
    with pytest.raises(ProvenanceError, match=rf"detectors '.*detectors' were fitted on features of checkpoint "
                                              rf"{file_sha256(project['model'])}, but the model '.*other.pt' has "
                                              rf"SHA-256 {file_sha256(other)}"):
        load_guard(other, root / "detectors", root / "guard.json")
    with pytest.raises(DataError, match=r"Guard thresholds file .*missing.json' does not exist. Hint: run `layerscope "
                                        r"calibrate`"):
        load_thresholds(root / "missing.json")


def test_read_inputs_from_images_tensors_and_arrays(tmp_path, rng):
    images = rng.integers(0, 256, (3, 10, 12), dtype=np.uint8)
    (tmp_path / "imgs/sub").mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).convert("RGB").save(tmp_path / f"imgs/{'sub/' if i == 2 else ''}{i}.png")
    names, x = read_inputs(tmp_path / "imgs", (1, 8, 8))
    assert names == ["0.png", "1.png", "sub/2.png"] and x.shape == (3, 1, 8, 8) and 0 <= x.min() <= x.max() <= 1
    torch.save(torch.rand(1, 8, 8), tmp_path / "one.pt")
    assert read_inputs(tmp_path / "one.pt", (1, 8, 8))[1].shape == (1, 1, 8, 8)
    np.save(tmp_path / "two.npy", np.zeros((2, 1, 8, 8), dtype=np.float32))
    assert read_inputs(tmp_path / "two.npy", (1, 8, 8))[0] == ["0", "1"]


def test_uint8_inputs_are_scaled_like_image_folders(tmp_path, rng):
    pixels = rng.integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", pixels)
    torch.save(torch.from_numpy(pixels), tmp_path / "u8.pt")
    for name in ("u8.npy", "u8.pt"):
        _, x = read_inputs(tmp_path / name, (1, 8, 8))
        assert x.dtype == torch.float32 and torch.allclose(x, torch.from_numpy(pixels / 255.0).float())


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "empty").mkdir() or p / "empty", r"Folder '.*empty' holds no images .* Hint: pass a folder of images"),
    (lambda p: np.save(p / "bad.npy", np.zeros((2, 3, 8, 8))) or p / "bad.npy",
     r"Inputs file '.*bad.npy' has shape \(2, 3, 8, 8\); the model expects \(n, 1, 8, 8\) or \(1, 8, 8\). Hint: resize"),
    (lambda p: np.save(p / "wide.npy", np.full((2, 1, 8, 8), 255.0)) or p / "wide.npy",
     r"Inputs file '.*wide.npy' holds floats in \[255, 255\]; expected pixels in \[0, 1\].*divide 0..255 values by 255"),
    (lambda p: np.save(p / "nan.npy", np.full((1, 8, 8), np.nan)) or p / "nan.npy",
     r"Inputs file '.*nan.npy' holds 64 NaN or infinite values"),
    (lambda p: np.save(p / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True) or p / "obj.npy",
     r"Inputs file '.*obj.npy' cannot be read: it holds Python objects \(dtype=object\)"),
    (lambda p: (p / "x.csv").write_text("1") and p / "x.csv", r"Cannot read inputs from .*x.csv.*expected a folder"),
])
def test_read_inputs_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        read_inputs(make(tmp_path), (1, 8, 8))


def test_cli_calibrate_evaluate_and_predict(project, tmp_path):
    root = project["root"]
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"calibrate": {"detector": "mahalanobis", "layers": ["layer1", "layer2"],
                                                    "target_tpr": 0.8}}))
    common = ["--features", str(root / "features.zarr"), "--detectors", str(root / "detectors")]
    result = runner.invoke(app, ["calibrate", "--params", str(params), *common, "--model", str(project["model"]),
                                 "--out", str(root / "guard.json")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert not list(root.glob("*.tmp")) and not list(root.glob(".*.tmp"))
    assert "ID-val TPR" in result.output and "layer2" in result.output
    result = runner.invoke(app, ["guard", "evaluate", *common, "--thresholds", str(root / "guard.json"), "--model",
                                 str(project["model"]), "--out", str(root / "guard_report.json")], terminal_width=250)
    assert result.exit_code == 0, result.output
    report = json.loads((root / "guard_report.json").read_text())
    assert report["flops_per_input"]["layer1"] < report["flops_per_input"]["full"] and "noise" in result.output
    torch.save(torch.from_numpy(project["splits"]["noise_test"].images), root / "inputs.pt")
    args = ["guard", "predict", str(root / "inputs.pt"), "--model", str(project["model"]), "--detectors",
            str(root / "detectors"), "--thresholds", str(root / "guard.json"), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out", str(root / "pred.json")])
    assert result.exit_code == 0, result.output
    records = json.loads((root / "pred.json").read_text())
    assert len(records) == 9 and {"input", "prediction", "ood_at_layer", "scores", "layers_computed"} <= set(records[0])
    shown = runner.invoke(app, args, terminal_width=250)
    assert shown.exit_code == 0 and ("OOD at layer" in shown.output or "class" in shown.output)


def test_cli_guard_errors_are_one_line(project):
    result = runner.invoke(app, ["guard", "predict", str(project["root"]), "--thresholds",
                                 str(project["root"] / "nope.json"), "--model", str(project["model"])])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Guard thresholds" in result.output and "Hint: run `layerscope calibrate`" in result.output


# ------------------------------------------------------------------ provenance: thresholds vs detectors vs model


@pytest.fixture
def other_checkpoint(project):
    """The same architecture with other weights: its checkpoint, its store and detectors fitted on that store."""
    from pipeline.models import init_model

    root, model = project["root"] / "other", init_model(TINY_SPEC, seed=1).eval()
    ckpt = save_checkpoint(model, TINY_SPEC, root / "model.pt")
    plan = resolve_plan(model, ["layer1", "layer2", "fc"], (1, 8, 8), head="fc")
    with StoreWriter(root / "features.zarr", "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(model, {n: (SplitDataset(s), s.attrs) for n, s in project["splits"].items()}, plan, writer,
                         batch_size=5)
        writer.finalize({"checkpoint_sha256": file_sha256(ckpt), "input_shape": [1, 8, 8]}, list(plan.layers))
    store = open_store(root / "features.zarr")
    save_detectors(fit_detectors(store, {"mahalanobis": {}}), root / "detectors")
    return {"model": ckpt, "store": store, "detectors": root / "detectors"}


def test_guard_refuses_detectors_fitted_on_another_checkpoints_features(project, other_checkpoint):
    # issue 14: `guard predict` built this guard and flagged 200/200 ID images as OOD, exit 0
    root = project["root"]
    save_thresholds(calibrate_guard(project["store"], project["fitted"], CFG), root / "guard.json")
    torch.save(torch.from_numpy(project["splits"]["id_test"].images), root / "inputs.pt")
    result = runner.invoke(app, ["guard", "predict", str(root / "inputs.pt"), "--model", str(project["model"]),
                                 "--detectors", str(other_checkpoint["detectors"]), "--thresholds",
                                 str(root / "guard.json"), "--device", "cpu"], terminal_width=600)
    assert result.exit_code == 2 and "Traceback" not in result.output and len(result.output.splitlines()) == 1
    ours, theirs = file_sha256(project["model"]), file_sha256(other_checkpoint["model"])
    assert (f"were fitted on features of checkpoint {theirs}, but the model '{project['model']}' has SHA-256 {ours}"
            in result.output)
    # guard evaluate: the same detectors against our store
    result = runner.invoke(app, ["guard", "evaluate", "--features", str(root / "features.zarr"), "--detectors",
                                 str(other_checkpoint["detectors"]), "--thresholds", str(root / "guard.json"),
                                 "--model", str(project["model"]), "--out", str(root / "r.json")], terminal_width=600)
    assert result.exit_code == 2 and f"checkpoint {theirs}, but the feature store" in result.output
    assert ours in result.output and not (root / "r.json").exists()


def test_thresholds_of_other_detectors_are_refused_naming_both_digests(project):
    root = project["root"]
    content = calibrate_guard(project["store"], project["fitted"], CFG)
    save_thresholds(content, root / "guard.json")
    refit = fit_detectors(project["store"], {"mahalanobis": {}}, standardize=False)  # same store, other detectors
    save_detectors(refit, root / "detectors")
    message = (rf"^The guard thresholds '.*guard.json' were calibrated with the detectors of digest "
               rf"{content['detectors_digest']}, but the detectors '.*detectors' have digest {refit.digest}. "
               r"Hint: rerun `layerscope calibrate`")
    with pytest.raises(ProvenanceError, match=message):
        load_guard(project["model"], root / "detectors", root / "guard.json")
    with pytest.raises(ProvenanceError, match=message):
        evaluate_guard(project["store"], refit, content, [1.0, 2.0, 3.0], thresholds_path=root / "guard.json")


def test_thresholds_for_another_model_are_refused_naming_both_hashes(project, other_checkpoint):
    content = calibrate_guard(project["store"], project["fitted"], CFG)
    theirs, ours = file_sha256(other_checkpoint["model"]), file_sha256(project["model"])
    with pytest.raises(ProvenanceError, match=rf"thresholds were calibrated for checkpoint {ours}, but the model "
                                              rf"'.*other/model.pt' has SHA-256 {theirs}"):
        # the detectors belong to the model; the thresholds do not
        build_guard(other_checkpoint["model"], load_detectors(other_checkpoint["detectors"]), content)


def test_calibrate_records_what_it_was_calibrated_with_and_refuses_another_model(project, other_checkpoint):
    root = project["root"]
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"calibrate": {"detector": "mahalanobis", "layers": ["layer1"]}}))
    common = ["calibrate", "--params", str(params), "--features", str(root / "features.zarr"), "--detectors",
              str(root / "detectors"), "--out", str(root / "guard.json")]
    result = runner.invoke(app, [*common, "--model", str(other_checkpoint["model"])], terminal_width=600)
    assert result.exit_code == 2 and file_sha256(other_checkpoint["model"]) in result.output
    assert file_sha256(project["model"]) in result.output and not (root / "guard.json").exists()
    assert runner.invoke(app, [*common, "--model", str(project["model"])]).exit_code == 0
    content = load_thresholds(root / "guard.json")
    assert content["detectors_digest"] == project["fitted"].digest and content["store_key"] == "k"
    assert content["checkpoint_sha256"] == file_sha256(project["model"])


def test_calibrate_refuses_a_directory_as_out_before_any_work(project, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match=r"--out '.*taken' is a directory; expected a file path for the guard "
                                          r"thresholds"):
        calibrate_stage.run({}, tmp_path / "missing.zarr", tmp_path / "missing", tmp_path / "taken")


def test_old_thresholds_are_refused_with_a_hint(project):
    path = project["root"] / "old.json"
    path.write_text(json.dumps({"format": 1, "thresholds": {}}))
    with pytest.raises(DataError, match=r"written by an older layerscope \(format 1: without the digest of the "
                                        r"detectors .*Hint: rerun `layerscope calibrate`"):
        load_thresholds(path)
