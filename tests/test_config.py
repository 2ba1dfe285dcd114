import pytest

from pipeline.config import (DetectConfig, GenerateConfig, SourceSpec, TrainConfig, load_section,
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


def test_a_missing_section_is_an_error_naming_the_file_and_the_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"Params file '.*params.yaml' has no 'detect' section.*it has \['train'\]"):
        load_section("detect", path)


def test_an_empty_section_or_a_missing_optional_one_takes_the_defaults():
    from pipeline.config import ComputeConfig

    assert load_section("detect", {"detect": None}) == DetectConfig()
    assert load_section("compute", {}) == ComputeConfig()


def test_an_empty_params_file_is_an_error(tmp_path):
    (tmp_path / "params.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"Params file '.*params.yaml' is empty.*layerscope init --preset digits"):
        load_section("train", tmp_path / "params.yaml")


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"Unknown parameter 'fit.detector'. Valid parameters of 'fit' are \["):
        load_section("fit", {"fit": {"detector": {}}})


@pytest.mark.parametrize("section, values, match", [
    ("train", {"epochs": "ten"}, r"'train.epochs' parameter of params.yaml must be of type int. Got 'ten'"),
    ("train", {"epochs": 0}, r"'train.epochs' .* must be a positive number. Got 0"),
    ("train", {"device": "gpu"}, r"'train.device' .* torch device. Got 'gpu'.*Hint: use 'auto'"),
    ("train", {"threads": 0}, r"'train.threads' .* a positive int. Got 0.*Hint: training's thread count"),
    ("train", {"threads": "auto"}, r"'train.threads' .* of type int. Got 'auto'"),
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


# ---------------------------------------------------------------- generate.aux (auxiliary outliers)

SOURCES = {
    "benchmark": "sources", "root": "data/raw",
    "id_train": {"source": "cifar10", "part": "train"}, "id_test": {"source": "cifar10"},
    "near": {"cifar100": {"source": "cifar100"}},
    "far": {"svhn": {"source": "svhn"}, "places365": {"source": "imagefolder", "path": "places365"},
            "colours": {"source": "constant", "n": 8}},
}
OVERLAP = r"auxiliary outliers never overlap a test OOD set\. Got {got} instead\. Hint: point it at a separate folder"
IS_ID = r"auxiliary outliers are never ID samples\. Got {got} instead\. Hint: point it at a separate folder"


def _generate(aux, **changes):
    return load_section("generate", {"generate": {**SOURCES, **changes, "aux": aux}})


def test_aux_sets_are_parsed_like_near_and_far():
    cfg = _generate({"tinyimages": {"source": "imagefolder", "path": "tinyimages300k", "n": 50000},
                     "c100train": {"source": "cifar100", "part": "train"}})  # near is CIFAR-100's *test* part
    assert cfg.aux["tinyimages"] == SourceSpec("imagefolder", "test", "tinyimages300k", 50000)
    assert cfg.aux["c100train"] == SourceSpec("cifar100", "train")
    assert "tinyimages" not in cfg.ood_sets and load_section("generate", {"generate": {}}).aux == {}


@pytest.mark.parametrize("aux, match", [
    ({"places": {"source": "imagefolder", "path": "./places365/"}},
     r"'generate.aux.places' parameter of generate must be data other than test OOD set 'places365' "
     r"\(generate.far.places365: imagefolder places365\); " + OVERLAP.format(got="'imagefolder ./places365/'")),
    ({"abbey": {"source": "imagefolder", "path": "places365/abbey"}},  # ImageFolder walks class folders recursively
     r"'generate.aux.abbey' .* test OOD set 'places365' .*" + OVERLAP.format(got="'imagefolder places365/abbey'")),
    ({"parent": {"source": "imagefolder", "path": "."}},
     r"'generate.aux.parent' .* test OOD set 'places365' .*" + OVERLAP.format(got="'imagefolder .'")),
    ({"house": {"source": "svhn", "part": "test"}},
     r"'generate.aux.house' .* test OOD set 'svhn' \(generate.far.svhn: svhn \(test part\)\); "
     + OVERLAP.format(got=r"'svhn \(test part\)'")),
    ({"c100": {"source": "cifar100"}},
     r"'generate.aux.c100' .* test OOD set 'cifar100' \(generate.near.cifar100: " + r"cifar100 \(test part\)\)"),
    ({"flat": {"source": "constant", "n": 50}},  # same seed: the first 8 colours are the far set's
     r"'generate.aux.flat' .* test OOD set 'colours' .*" + OVERLAP.format(got="'constant colours'")),
], ids=["imagefolder-same-path", "imagefolder-inside", "imagefolder-around", "svhn", "near-cifar100", "constant"])
def test_aux_set_reading_a_test_ood_set_is_refused(aux, match):
    with pytest.raises(ConfigError, match=match):
        _generate(aux)


@pytest.mark.parametrize("aux, changes, match", [
    ({"cifar": {"source": "cifar10", "part": "train"}}, {},
     r"'generate.aux.cifar' parameter of generate must be data other than the ID data \(generate.id_train: "
     r"cifar10 \(train part\)\); " + IS_ID.format(got=r"'cifar10 \(train part\)'")),
    ({"cifar": {"source": "cifar10"}}, {},
     r"'generate.aux.cifar' .* ID data \(generate.id_test: cifar10 \(test part\)\); "
     + IS_ID.format(got=r"'cifar10 \(test part\)'")),
    ({"imgs": {"source": "imagefolder", "path": "imagenet/train/"}},
     {"id_train": {"source": "imagefolder", "path": "imagenet/train"},
      "id_test": {"source": "imagefolder", "path": "imagenet/val"}},
     r"'generate.aux.imgs' .* ID data \(generate.id_train: imagefolder imagenet/train\); "
     + IS_ID.format(got="'imagefolder imagenet/train/'")),
], ids=["id-train", "id-test", "id-imagefolder"])
def test_aux_set_reading_the_id_data_is_refused(aux, changes, match):
    with pytest.raises(ConfigError, match=match):
        _generate(aux, **changes)


@pytest.mark.parametrize("aux, match", [
    ({"svhn": {"source": "imagefolder", "path": "tinyimages300k"}},
     (r"'generate.aux.svhn' parameter of generate must be a name not also used in generate.near or generate.far\. "
      r"Got 'svhn' instead\. Hint: rename it: 'svhn' is already a test OOD set in generate.far\.")),
    ({"cifar100": {"source": "imagefolder", "path": "tinyimages300k"}},
     r"'generate.aux.cifar100' .* not also used in generate.near or generate.far\. .* in generate.near\."),
    ({"id_outliers": {"source": "imagefolder", "path": "tinyimages300k"}},
     (r"'generate.aux' parameter of generate must be auxiliary-outlier set names that are identifiers not starting "
      r"with 'id'\. Got 'id_outliers' instead\. Hint: e.g. aux: \{tinyimages: ")),
    ({"tiny-images": {"source": "imagefolder", "path": "tinyimages300k"}},
     r"'generate.aux' parameter .* identifiers not starting with 'id'\. Got 'tiny-images' instead"),
    ({"tinyimages": {"source": "imagefolder"}},
     r"'generate.aux.tinyimages.path' parameter of generate must be a directory .* Hint: e.g. path: texture"),
    ({"tinyimages": {"source": "tinyimages"}}, r"'generate.aux.tinyimages.source' parameter .* Got 'tinyimages'"),
    ({"tinyimages": {"source": "imagefolder", "path": "tinyimages300k", "n": 0}},
     r"'generate.aux.tinyimages.n' parameter .* positive number\. Got 0"),
    ({"tinyimages": ["imagefolder"]}, r"'generate.aux.tinyimages' parameter of params.yaml must be a mapping"),
], ids=["clash-far", "clash-near", "starts-with-id", "not-identifier", "no-path", "bad-source", "n-zero",
        "not-a-mapping"])
def test_bad_aux_sets_are_named(aux, match):
    with pytest.raises(ConfigError, match=match):
        _generate(aux)


def test_source_spec_overlaps():
    places = SourceSpec("imagefolder", path="places365")
    assert places.overlaps(SourceSpec("imagefolder", "train", "places365/../places365"), "root")  # part is ignored
    assert not places.overlaps(SourceSpec("imagefolder", path="places365_extra"), "root")  # a prefix, not a parent
    assert not places.overlaps(SourceSpec("imagefolder", path="tinyimages300k"), "root")
    assert not SourceSpec("cifar100", "train").overlaps(SourceSpec("cifar100", "test"))
    assert SourceSpec("constant", "train", n=3).overlaps(SourceSpec("constant", n=9))
    assert not SourceSpec("svhn").overlaps(SourceSpec("mnist"))


def test_num_workers_auto_is_derived_from_the_machine(monkeypatch):
    import os

    from pipeline.config import data_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert load_section("extract", {"extract": {"num_workers": "auto"}}).workers == 1  # never DataLoader's warning
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert load_section("train", {"train": {"num_workers": "auto"}}).workers == 4
    assert data_workers(3) == 3
    with pytest.raises(ConfigError, match=r"'train.num_workers' parameter of train must be a non-negative int or "
                                          r"'auto'. Got 'many' instead"):
        load_section("train", {"train": {"num_workers": "many"}})
    with pytest.raises(ConfigError, match=r"'extract.num_workers' parameter of params.yaml must be of type int or "
                                          r"str. Got 1.5 instead"):
        load_section("extract", {"extract": {"num_workers": 1.5}})
