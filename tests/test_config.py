import pytest

from pipeline.config import (DetectConfig, GenerateConfig, TrainConfig, load_section,
                             project_paths, read_params)
from pipeline.errors import ConfigError


def test_repo_params_load_into_every_section():
    params = read_params("params.yaml")
    assert isinstance(load_section("generate", params), GenerateConfig)
    assert isinstance(load_section("train", params), TrainConfig)
    assert load_section("extract", params).layers[-1] == "fc"
    assert "mahalanobis" in load_section("fit", params).detectors
    assert isinstance(load_section("detect", params), DetectConfig)


def test_lists_become_tuples_and_floats_are_coerced():
    cfg = load_section("train", {"train": {"widths": [8, 16], "blocks": [1, 1], "lr": 1, "weight_decay": "5e-4"}})
    assert cfg.widths == (8, 16) and cfg.lr == 1.0 and cfg.weight_decay == 5e-4
    assert load_section("extract", {"extract": {"layers": "fc"}}).layers == ("fc",)


def test_missing_section_takes_defaults():
    assert load_section("detect", {}) == DetectConfig()


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"Unknown parameter 'fit.detector'. Valid parameters of 'fit' are \["):
        load_section("fit", {"fit": {"detector": {}}})


@pytest.mark.parametrize("section, values, match", [
    ("train", {"epochs": "ten"}, r"'train.epochs' parameter of params.yaml must be of type int. Got 'ten'"),
    ("train", {"epochs": 0}, r"'train.epochs' .* must be a positive number. Got 0"),
    ("train", {"device": "gpu"}, r"'train.device' .* torch device. Got 'gpu'.*Hint: use 'auto'"),
    ("extract", {"dtype": "float64"}, r"'extract.dtype' .* one of .*Got 'float64'"),
    ("extract", {"layers": []}, r"'extract.layers' .* non-empty list"),
    ("extract", {"shard_rows": 1000}, r"'extract.shard_rows' .* multiple of extract.chunk_rows=512"),
    ("extract", {"batch_size": True}, r"'extract.batch_size' .* of type int. Got True"),
    ("detect", {"recall": 1.5}, r"'detect.recall' .* in \(0, 1\]. Got 1.5"),
    ("detect", {"aggregations": ["median"]}, r"'detect.aggregations' .* Got 'median'"),
    ("fit", {"detectors": {}}, r"'fit.detectors' .* non-empty mapping"),
    ("fit", {"detectors": {"knn": 3}}, r"'fit.detectors.knn' .* mapping of parameters. Got 3"),
    ("generate", {"benchmark": "cifar10"}, r"'generate.benchmark' .* Got 'cifar10'"),
])
def test_bad_values_are_named(section, values, match):
    with pytest.raises(ConfigError, match=match):
        load_section(section, {section: values})


def test_unreadable_params_file(tmp_path):
    with pytest.raises(ConfigError, match=r"Params file .* does not exist"):
        read_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line"):
        read_params(bad)


def test_paths_come_from_dvc_yaml():
    paths = project_paths("dvc.yaml")
    assert paths["features"] == "cache/features.zarr" and paths["metrics"] == "reports/metrics.json"


def test_missing_dvc_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"dvc.yaml' does not exist"):
        project_paths(tmp_path / "dvc.yaml")
