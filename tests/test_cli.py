"""The CLI as a user runs it: help, layers, and one-line errors without tracebacks."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_help_lists_every_stage_and_tool():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "train", "extract", "fit", "detect", "layers"):
        assert command in result.output


def test_layers_prints_names_types_and_shapes():
    result = runner.invoke(app, ["layers"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "layer1.0.conv1" in result.output and "Conv2d" in result.output
    assert "16 x 16 x 16" in result.output  # layer1 on 16 px digits: C x H x W
    assert "fc" in result.output


@pytest.fixture
def bad_params(tmp_path):
    def write(section, values):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({section: values}))
        return str(path)
    return write


def one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output
    return lines[0]


def test_unknown_layer_is_one_line_listing_valid_names(tmp_path, bad_params, tiny_model, tiny_splits):
    from pipeline.datasets import ImageSplit, write_benchmark
    from pipeline.models import save_checkpoint
    from tests.conftest import TINY_SPEC

    full = {"source": "noise", "n_samples": 0, "image_size": 8}
    write_benchmark([ImageSplit(s.name, s.images, s.labels, {**full, **s.attrs, "n_samples": len(s.labels)})
                     for s in tiny_splits.values()], tmp_path / "data")
    save_checkpoint(tiny_model, TINY_SPEC, tmp_path / "m.pt")
    result = runner.invoke(app, ["extract", "--params", bad_params("extract", {"layers": ["layer9"], "device": "cpu"}),
                                 "--data", str(tmp_path / "data"), "--model", str(tmp_path / "m.pt"),
                                 "--out", str(tmp_path / "s.zarr")], terminal_width=2000)
    line = one_line_error(result)
    assert "Got 'layer9'" in line and "'layer1.0.conv1'" in line and "layerscope layers" in line


def test_unknown_detector_is_one_line_listing_available_ones(tmp_path, bad_params, blobs, monkeypatch):
    from tests.test_scoring import write_store

    monkeypatch.chdir(tmp_path)  # no project here: fit does not compare the store with a cache/model.pt
    write_store(tmp_path / "s.zarr", blobs)
    params = bad_params("fit", {"detectors": {"knm": {}}})
    result = runner.invoke(app, ["fit", "--params", params, "--features", str(tmp_path / "s.zarr"),
                                 "--out", str(tmp_path / "det")], terminal_width=400)
    line = one_line_error(result)
    assert "'fit.detectors'" in line and "Got 'knm'" in line and "'knn'" in line and "'mahalanobis'" in line


def test_bad_param_type_is_one_line(bad_params):
    result = runner.invoke(app, ["train", "--params", bad_params("train", {"epochs": "many"})], terminal_width=400)
    assert "'train.epochs'" in one_line_error(result)


def test_missing_store_is_one_line(tmp_path):
    result = runner.invoke(app, ["detect", "--params", "params.yaml", "--features", str(tmp_path / "none.zarr"),
                                 "--detectors", str(tmp_path / "d")], terminal_width=400)
    assert "does not exist" in one_line_error(result)


def test_inspect_table_json_and_stats(tmp_path, blobs):
    import json

    from tests.test_scoring import write_store

    write_store(tmp_path / "s.zarr", blobs, checkpoint="feedbeef")
    table = runner.invoke(app, ["inspect", str(tmp_path / "s.zarr")], terminal_width=250)
    assert table.exit_code == 0 and "id_train" in table.output and "feedbeef" in table.output
    summary = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "s.zarr"), "--json"]).output)
    assert summary["splits"]["far_test"]["arrays"]["l1"]["shape"] == list(blobs.X_ood.shape)
    stats = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "s.zarr"), "--layer", "l1", "--stats",
                                           "--json"]).output)
    assert stats["splits"]["id_test"]["summary"]["n_samples"] == len(blobs.X_id)
    assert "--stats needs --layer" in one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "s.zarr"),
                                                                         "--stats"], terminal_width=400))


def test_inspect_honours_split_and_reads_stats_of_any_array(tmp_path, blobs):
    import json

    from tests.test_scoring import write_store

    store = str(write_store(tmp_path / "s.zarr", blobs).path)
    summary = json.loads(runner.invoke(app, ["inspect", store, "--split", "id_test", "--json"]).output)
    assert list(summary["splits"]) == ["id_test"]
    energy = json.loads(runner.invoke(app, ["inspect", store, "--stats", "--layer", "energy", "--split", "id_test",
                                            "--json"]).output)
    assert energy["splits"]["id_test"]["summary"]["n_features"] == 2  # energy: one column per layer
    label = json.loads(runner.invoke(app, ["inspect", store, "--stats", "--layer", "label", "--json"]).output)
    assert label["splits"]["far_test"]["summary"]["min"] == -1  # a 1-D array: one value per sample
    line = one_line_error(runner.invoke(app, ["inspect", store, "--stats", "--layer", "map.l1"], terminal_width=400))
    assert "Array 'map.l1' is not in split" in line and "extract.maps / extract.images" in line
    line = one_line_error(runner.invoke(app, ["inspect", store, "--split", "train9"], terminal_width=400))
    assert "has no split 'train9'" in line


def test_inspect_is_readable_at_80_columns(tmp_path, blobs):
    from tests.test_scoring import write_store

    store = str(write_store(tmp_path / "s.zarr", blobs).path)
    result = runner.invoke(app, ["inspect", store], terminal_width=80)
    assert result.exit_code == 0 and "…" not in result.output.split("provenance")[0], result.output
    for row in ("id_train/l1", "far_test/energy", "id_test/label"):
        assert row in result.output


def test_inspect_refuses_an_incomplete_store(tmp_path):
    from pipeline.store import StoreWriter

    with StoreWriter(tmp_path / "s.zarr", "k"):
        pass
    result = runner.invoke(app, ["inspect", str(tmp_path / "s.zarr")], terminal_width=400)
    assert "incomplete" in one_line_error(result)


def test_summary_shows_headline_columns(tmp_path):
    import json

    per = {"near": {"auroc": 0.91, "fpr@95": 0.2}, "far": {"auroc": 0.99, "fpr@95": 0.01}}
    metrics = {"id_accuracy": 0.97, "methods": {"knn": {"layer1": per, "fc": per, "max_z": per},
                                                 "msp": {"score": {**per, "near": {"auroc": 0.75, "fpr@95": 0.5}}}}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    out = runner.invoke(app, ["summary", "--metrics", str(path)], terminal_width=200).output
    assert "0.9700" in out and "0.7500" in out and "max_z" in out and "fc" in out and "layer1" not in out
    assert "layer1" in runner.invoke(app, ["summary", "--metrics", str(path), "--all"], terminal_width=200).output
    # with the head recorded, per-layer detectors are shown on the penultimate layer (OpenOOD's choice)
    per90 = {g: {"auroc": v["auroc"], "fpr@90": v["fpr@95"]} for g, v in per.items()}
    metrics90 = {"id_accuracy": 0.97, "methods": {"knn": {"layer1": per90, "fc": per90, "max_z": per90},
                                                   "msp": {"score": per90}}}
    path.write_text(json.dumps({**metrics90, "head": "fc", "recall": 0.9}))
    out = runner.invoke(app, ["summary", "--metrics", str(path)], terminal_width=200).output
    assert "layer1" in out and " fc " not in out and "FPR@90 near" in out and "90% OOD recall" in out
    assert " fc " in runner.invoke(app, ["summary", "--metrics", str(path), "--layer", "fc"], terminal_width=200).output


def test_summary_per_set(tmp_path):
    import json

    per = {"near": {"auroc": 0.91, "fpr@95": 0.2}, "far": {"auroc": 0.99, "fpr@95": 0.01},
           "svhn": {"auroc": 0.8125, "fpr@95": 0.3}, "mnist": {"auroc": 0.99, "fpr@95": 0.02}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"id_accuracy": 0.97, "methods": {"msp": {"score": per}}}))
    out = runner.invoke(app, ["summary", "--metrics", str(path), "--set", "svhn"], terminal_width=200).output
    assert "AUROC svhn" in out and "0.8125" in out and "near" not in out.split("\n", 2)[-1]
    line = one_line_error(runner.invoke(app, ["summary", "--metrics", str(path), "--set", "cifar"], terminal_width=400))
    assert "OOD set 'cifar' is not in" in line and "['mnist', 'svhn']" in line
    assert "does not exist" in one_line_error(runner.invoke(app, ["summary", "--metrics", str(tmp_path / "x.json")],
                                                            terminal_width=400))


def test_search_grid_file_errors_are_one_line(tmp_path, blobs):
    from tests.test_scoring import write_store

    write_store(tmp_path / "s.zarr", blobs)
    grid = tmp_path / "grid.yaml"
    grid.write_text("search:\n  methods: {knn: {n_neighbours: [1, 5]}}\n")
    args = ["search", "--features", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "out"), "--grid", str(grid)]
    line = one_line_error(runner.invoke(app, args, terminal_width=400))
    assert "n_neighbours" in line and "n_neighbors" in line
    grid.write_text("metric: auc\nmethods: {knn: {}}\n")
    assert "'search.metric'" in one_line_error(runner.invoke(app, args, terminal_width=400))


@pytest.mark.parametrize("preset, expected", [
    ("cifar10-vgg16.yaml", ["features.40", "Conv2d", "classifier.6", "512 x 2 x 2"]),
    ("cifar10-wrn40-2.yaml", ["block3.layer.5.conv2", "128 x 8 x 8"]),
    ("imagenet-vit-b16.yaml", ["net.encoder.layers.encoder_layer_11", "197 x 768", "net.heads.head"]),
])
def test_layers_lists_a_preset_backbone(preset, expected):
    configs = Path(__file__).resolve().parent.parent / "configs"
    result = runner.invoke(app, ["layers", "--params", str(configs / preset)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output


# ---------------------------------------------------------------- the error boundary

def _boundary_app(exc_factory):
    """A one-command app behind the same boundary as every layerscope command."""
    import typer

    from pipeline.cli import user_errors

    probe = typer.Typer()

    @probe.command()
    @user_errors
    def go():
        exc_factory()

    @probe.command()
    def other():  # a second command keeps typer from folding `go` into the app itself
        pass

    return probe


def test_an_unexpected_exception_is_reported_as_a_bug_with_its_traceback_saved(monkeypatch):
    monkeypatch.delenv("LAYERSCOPE_DEBUG", raising=False)
    result = runner.invoke(_boundary_app(lambda: {}["missing"]), ["go"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: This is a bug in layerscope, please report it: KeyError: 'missing'.")
    saved = Path(line.split("saved in ")[1].split(" (or rerun")[0])
    assert "Traceback" in saved.read_text() and "KeyError: 'missing'" in saved.read_text()
    saved.unlink()


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_DEBUG", "1")
    result = runner.invoke(_boundary_app(lambda: {}["missing"]), ["go"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_a_full_disk_is_one_line(monkeypatch):
    monkeypatch.delenv("LAYERSCOPE_DEBUG", raising=False)

    def write_to_full_disk():
        with open("/dev/full", "w") as fh:  # the kernel's always-full device: a real ENOSPC
            fh.write("x" * 10)
            fh.flush()

    result = runner.invoke(_boundary_app(write_to_full_disk), ["go"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == ("error: Cannot write: No space left on device. Hint: free some space, "
                                     "or fix the permissions, or choose another output path.")


@pytest.mark.parametrize("argv, match", [
    (["train", "--data", "nowhere", "--model", "{dir}", "--metrics", "m.json"],
     "--model '.*' is a directory; expected a file path for the checkpoint"),
    (["detect", "--features", "nowhere", "--detectors", "nowhere", "--metrics", "{dir}", "--detail", "d.json",
      "--table", "t.csv", "--figures", "figs", "--argmax", "a.json"],
     "--metrics '.*' is a directory; expected a file path for the metrics"),
    (["detect", "--features", "nowhere", "--detectors", "nowhere", "--metrics", "m.json", "--detail", "{dir}",
      "--table", "t.csv", "--figures", "figs", "--argmax", "a.json"],
     "--detail '.*' is a directory; expected a file path for the metrics detail"),
    (["detect", "--features", "nowhere", "--detectors", "nowhere", "--metrics", "m.json", "--detail", "d.json",
      "--table", "t.csv", "--figures", "{file}", "--argmax", "a.json"],
     "--figures '.*' is an existing file; expected a directory"),
    (["search", "--features", "nowhere", "--out", "{file}"], "--out '.*' is an existing file; expected a directory"),
    (["guard", "evaluate", "--features", "nowhere", "--detectors", "nowhere", "--thresholds", "nowhere",
      "--model", "nowhere", "--out", "{dir}"], "--out '.*' is a directory; expected a file path for the guard report"),
    (["calibrate", "--features", "nowhere", "--detectors", "nowhere", "--out", "{dir}"],
     "--out '.*' is a directory; expected a file path for the guard thresholds"),
])
def test_outputs_are_checked_before_any_work(tmp_path, monkeypatch, argv, match):
    """Every input here is missing: the output error comes first, so no work would have been done."""
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("precious")
    argv = [a.format(dir="a_dir", file="a_file") for a in argv]
    line = one_line_error(runner.invoke(app, argv))
    assert re.search(match, line), line
    assert (tmp_path / "a_file").read_text() == "precious" and not any((tmp_path / "a_dir").iterdir())
