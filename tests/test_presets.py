"""Every preset in configs/ runs generate -> train (importing a checkpoint) -> extract offline.

The data sets are written in their real on-disk formats (tests/fakedata.py) and
read by the same torchvision loaders a user runs; each preset's own backbone is
built (random weights, saved as a "user checkpoint") so that its layer names,
head and selectors are checked against the real architecture.
"""

import contextlib
import functools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_section
from pipeline.errors import ConfigError, DataError
from pipeline.models import file_sha256, init_model, model_spec
from pipeline.presets import list_presets, parse_override, render_params
from pipeline.store import open_store
from stages import calibrate, detect, extract, fit, generate, guard, train
from tests import fakedata

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(list_presets(CONFIGS))
SOURCE_PRESETS = [name for name in PRESETS if name != "digits"]
# A few images per split: several shards each (extract.shard_rows=4 below), and each a handful of passes through
# the network (ODIN, RankFeat, gradients), which is most of this test's time. Fewer still for the ImageNet
# backbones: ViT-B/16 runs at 224 px (ResNet-50 at 64, see _params).
SMALL = {"max_train": 6, "max_test": 4, "max_ood": 2}
IMAGENET_SMALL = {"max_train": 2, "max_test": 2, "max_ood": 2}
runner = CliRunner()


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_HASH_CACHE", str(tmp_path_factory.mktemp("hashes") / "hashes.sqlite3"))


def _preset(name):
    """``configs/NAME.yaml`` as ``layerscope init`` renders it (validated), as a fresh dict."""
    return yaml.safe_load(_rendered(name))


@functools.cache
def _rendered(name):
    """Validating builds the preset's architecture and runs it once (seconds for ViT-B/16): once per preset and
    worker, shared by the tests that read the preset unchanged."""
    return render_params(name, (), CONFIGS)


def _params(tmp_path, name, extra=(), checkpoint=None, file="params.yaml"):
    """The preset shrunk for a test, with data under ``tmp_path/raw``; ``checkpoint`` imports a user's weights.

    The checkpoint file need not exist yet (it is made after generate has counted the classes): validation
    reads its path only, so one render (one build of the architecture) serves generate, train and extract.
    """
    if checkpoint is not None:
        extra = [f"train.checkpoint={checkpoint}", "train.weights=null", *extra]
    caps = IMAGENET_SMALL if "imagenet" in name else SMALL
    preset = (CONFIGS / f"{name}.yaml").read_text()
    # one ODIN setting (the one detect scores) exercises the same code as OpenOOD's eight: a pass through the
    # network each, which on the ImageNet backbones is most of this test's time
    odin = ["extract.odin={temperatures: [1000], noises: [0.0014]}"] if "odin:" in preset else []
    # ResNet-50 has the same layers, head and shapes but the spatial ones at 64 px (as in test_guard): 12x fewer
    # FLOPs per pass (ViT-B/16's position embeddings fix its 224 px); test_preset_is_valid_params checks 224
    small = ["generate.image_size=64", "generate.resize=73"] if "arch: resnet50_imagenet" in preset else []
    overrides = [f"generate.root={tmp_path / 'raw'}", "generate.val_fraction=0.5", *odin, *small,
                 *(f"generate.{key}={value}" for key, value in caps.items()),
                 "extract.batch_size=4", "extract.chunk_rows=2", "extract.shard_rows=4",
                 "extract.num_workers=0", "train.num_workers=0", "train.device=cpu", "extract.device=cpu", *extra]
    path = tmp_path / file
    path.write_text(render_params(name, overrides, CONFIGS))
    return path


def _user_checkpoint(tmp_path, params, n_classes):
    """A state_dict of the preset's backbone, as a user would bring it (random weights here)."""
    spec = model_spec(load_section("train", params), num_classes=n_classes, in_channels=3)
    path = tmp_path / "user.pt"
    torch.save(init_model(spec, seed=1).state_dict(), path)
    return path


def test_seed_002_presets_name_tinyimages_as_auxiliary_outliers():
    gen = load_section("generate", _preset("cifar10-wrn40-2"))
    assert gen.aux["tinyimages"].source == "imagefolder" and gen.aux["tinyimages"].path == "tinyimages300k"
    assert not any(gen.aux["tinyimages"].overlaps(spec, gen.root) for _, spec in gen.ood_sets.values())


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_requires_only_the_aux_sets_its_heatmap_decoder_trains_on(name):
    """A preset whose fit trains no decoder asks for no auxiliary outliers (no TinyImages to download for nothing)."""
    params = _preset(name)
    gen, fit = load_section("generate", params), load_section("fit", params)
    assert set(gen.aux) == set((fit.heatmap or {}).get("aux_sets", ())) & set(gen.aux)
    assert fit.heatmap is not None or not gen.aux


def test_presets_exist_for_every_seed_setup():
    assert {"digits", "cifar10-resnet18", "cifar100-resnet18", "cifar10-vgg16", "cifar10-resnet34",
            "cifar10-densenet100", "cifar10-wrn40-2", "cifar10-resnet18-energy", "imagenet-resnet50",
            "imagenet-vit-b16", "imagenet-resnet50-mos"} <= set(PRESETS)
    assert all(list_presets(CONFIGS).values()), "every preset starts with a one-line description"


def test_default_params_are_the_digits_preset():
    assert (CONFIGS / "digits.yaml").read_text() == (CONFIGS.parent / "params.yaml").read_text()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_valid_params(name):
    params = _preset(name)  # render_params raises on any invalid value
    assert set(params) == {"generate", "train", "extract", "fit", "detect", "search", "calibrate", "compute"}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """``extracted(name)``: the preset's project after generate -> train (importing a user checkpoint) -> extract.

    Built once per preset, in its own directory, by the first test that asks: the offline extract test, which
    the seed 002 test then takes past extract (it used to repeat the same generate, train and extract).
    """
    built = {}

    def build(name):
        if name not in built:
            built[name] = _generate_import_extract(tmp_path_factory.mktemp(name), name)
        return built[name]

    return build


def _generate_import_extract(root, name):
    with contextlib.chdir(root):  # extract opens the data under generate.root of ./params.yaml
        user = root / "user.pt"
        params = _params(root, name, checkpoint=user)
        gen = load_section("generate", params)
        fakedata.write_sources(gen, np.random.default_rng(0), n=10)
        data = root / "data"
        generate.run(params, data)
        manifest = yaml.safe_load((data / "manifest.json").read_text())
        _user_checkpoint(root, params, len(manifest["splits"]["id_train"]["classes"]))
        train.run(params, data, root / "model.pt", root / "train.json")
        extract.run(params, data, root / "model.pt", root / "features.zarr")
    return SimpleNamespace(root=root, params=params, gen=gen, data=data, manifest=manifest, user=user,
                           model=root / "model.pt", store=root / "features.zarr")


@pytest.mark.parametrize("name", SOURCE_PRESETS)
def test_preset_generates_imports_and_extracts_offline(extracted, no_md5, name):
    project = extracted(name)
    gen, manifest, params = project.gen, project.manifest, project.params
    assert yaml.safe_load((project.root / "train.json").read_text())["epochs_trained"] == 0

    store = open_store(project.store)
    ood_parts = ("test",) if gen.ood_val else ("val", "test")  # separate OOD val sets leave the test sets whole
    expected = {"id_train", "id_val", "id_test", *(f"{s}_{p}" for s in gen.ood_sets for p in ood_parts),
                *(f"{s}_val" for s in gen.ood_val), *(f"{s}_aux" for s in gen.aux)}
    assert set(store.splits) == expected
    for aux_set in gen.aux:  # auxiliary outliers are extracted like every split
        split = f"{aux_set}_aux"
        assert store.split_attrs(split)["role"] == "aux"
        assert store.to_numpy(split, store.layers[-1]).shape[0] == manifest["splits"][split]["n_samples"] > 0
    assert store.provenance["model_origin"]["sha256"] == file_sha256(project.user)
    cfg = load_section("extract", params)
    if not any(layer.startswith("type:") for layer in cfg.layers):
        assert list(store.layers) == list(cfg.layers)
    assert store.to_numpy("id_test", store.layers[-1]).shape[0] == manifest["splits"]["id_test"]["n_samples"]
    for split in store.splits:
        assert np.isfinite(store.to_numpy(split, store.layers[0])).all()


def test_seed_002_preset_trains_the_heatmap_decoder_and_calibrates_the_guard(extracted, no_md5, monkeypatch):
    """cifar10-wrn40-2 past extract: the decoder on block3/block2 maps with TinyImages outliers, then the guard.

    It goes on from the offline extract test's project of the same preset (generate, import, extract).
    """
    name = "cifar10-wrn40-2"
    project = extracted(name)
    tmp_path = project.root
    monkeypatch.chdir(tmp_path)
    params = _params(tmp_path, name, ["fit.detectors={mahalanobis: {}}", "fit.heatmap.epochs=1", "fit.heatmap.n_aux=8",
                                      "detect.methods={msp: {}, heatmap: {}}"], checkpoint=project.user,
                     file="seed002.yaml")
    store, det = project.store, tmp_path / "detectors"
    fit.run(params, store, det)
    decoder = yaml.safe_load((det / "methods/heatmap/heatmap.json").read_text())
    assert decoder["skip_layers"] == ["block3", "block2"] and decoder["n_outliers"] == 8
    detect.run(params, store, det, tmp_path / "m.json", tmp_path / "t.csv", tmp_path / "figs", tmp_path / "a.json")
    assert "auroc_far" in yaml.safe_load((tmp_path / "m.json").read_text())["heatmap"]
    calibrate.run(params, store, det, tmp_path / "guard.json")
    report = guard.run(store, det, tmp_path / "guard.json", project.model, tmp_path / "guard_report.json")
    assert report["layers"] == ["block1", "block2", "block3"] and 0 < report["flops_per_input"]["block1"]


def test_preset_trains_from_scratch_with_augmentation(tmp_path, rng, no_md5):
    params = _params(tmp_path, "cifar10-resnet18", ["train.epochs=1", "train.batch_size=8", "train.evaluate=false"])
    fakedata.write_sources(load_section("generate", params), rng, n=10)
    generate.run(params, tmp_path / "data")
    train.run(params, tmp_path / "data", tmp_path / "model.pt", tmp_path / "train.json")
    report = yaml.safe_load((tmp_path / "train.json").read_text())
    assert report["epochs_trained"] == 1 and np.isfinite(report["final_loss"])
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["spec"]["arch"] == "resnet18_cifar" and "origin" not in ckpt["spec"]
    assert ckpt["spec"]["mean"] == [0.4914, 0.4822, 0.4465]  # the preset's (OpenOOD's) normalisation


def test_generate_reports_a_missing_data_root_with_its_layout(tmp_path):
    params = _params(tmp_path, "cifar10-resnet18")
    with pytest.raises(DataError, match=r"8 of the 8 configured data sets are missing under generate.root '.*raw', "
                                        r"which does not exist: generate.id_train \(cifar10 \(train part\): expected "
                                        r"ROOT/cifar-10-batches-py/.*generate.far.places365.*Hint: point generate.root"):
        generate.run(params, tmp_path / "data")
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- layerscope init

def test_init_writes_the_preset_with_overrides_and_keeps_comments(tmp_path):
    out = tmp_path / "params.yaml"
    result = runner.invoke(app, ["init", "--preset", "cifar10-vgg16", "-S", "generate.root=/data/ood",
                                 "-S", "train.epochs=5", "--params", str(out), "--configs", str(CONFIGS)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "# LA-OOD: every conv output" in text
    params = yaml.safe_load(text)
    assert params["generate"]["root"] == "/data/ood" and params["train"]["epochs"] == 5
    assert params["train"]["arch"] == "vgg16_bn_cifar"


def test_init_overrides_the_current_params_without_a_preset(tmp_path):
    out = tmp_path / "params.yaml"
    out.write_text((CONFIGS / "digits.yaml").read_text())
    result = runner.invoke(app, ["init", "-S", "fit.detectors={knn: {n_neighbors: 3}, mahalanobis: {}}",
                                 "--params", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text())["fit"]["detectors"] == {"knn": {"n_neighbors": 3}, "mahalanobis": {}}


def test_init_drops_the_comment_of_a_value_it_changes_and_keeps_the_others(tmp_path):
    out = tmp_path / "params.yaml"
    out.write_text((CONFIGS / "cifar10-resnet18.yaml").read_text())
    result = runner.invoke(app, ["init", "-S", "generate.max_train=200", "--params", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert "  max_train: 200" in lines  # not "# all 50,000 training images" any more
    assert any(line.startswith("  max_ood: null") and "# OpenOOD evaluates whole sets" in line for line in lines)


def test_init_lists_the_presets():
    result = runner.invoke(app, ["init", "--list", "--configs", str(CONFIGS)], terminal_width=200)
    assert result.exit_code == 0 and "cifar10-resnet18" in result.output and "OpenOOD v1.5" in result.output


@pytest.mark.parametrize("args, message", [
    (["--preset", "cifar11"], "Unknown preset 'cifar11'. Valid presets are"),
    (["--preset", "digits", "-S", "train.epochs"], "must look like 'section.key=value'"),
    (["--preset", "digits", "-S", "train.epochs=-1"], "'train.epochs' parameter of train must be a positive"),
    (["--preset", "digits", "-S", "trian.epochs=1"], "Unknown params section 'trian'"),
    (["--preset", "digits", "-S", "train.epochs.x=1"], "'train.epochs' is 15, not a mapping"),
    ([], "Nothing to do: pass --preset NAME"),
])
def test_init_errors_are_one_line_and_leave_params_alone(tmp_path, args, message):
    out = tmp_path / "params.yaml"
    out.write_text("train: {epochs: 2}\n")
    result = runner.invoke(app, ["init", *args, "--params", str(out), "--configs", str(CONFIGS)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in " ".join(result.output.split()), result.output
    assert out.read_text() == "train: {epochs: 2}\n"


@pytest.mark.parametrize("override, message", [
    ("detect.methods.odin2={}", r"'detect.methods' parameter of detect must be one of \[.*Got 'odin2'"),
    ("fit.detectors.magic={}", r"'fit.detectors' parameter of fit must be one of \[.*Got 'magic'"),
    ("fit.detectors.knn={n_neighbors: 0}", r"'fit.detectors.knn.n_neighbors' parameter of fit must be an int in the "
                                           r"range \[1, inf\)"),
    ("extract.layers=[layer1, layer7]", r"'extract.layers' parameter of extract must name modules of the model. "
                                        r"Got 'layer7'"),
    ("fit.heatmap.aux_sets=[tinyimages]", r"'fit.heatmap.aux_sets' parameter of fit must be sets the benchmark has, "
                                          r"among \['digits89', 'textures'.*Got 'tinyimages'"),
    ("train.arch=resnet9000", r"'train.arch' parameter of train must be one of"),
    ("generate.holdout_classes=[8, 12]", r"'generate.holdout_classes' parameter of .* Got \(8, 12\)"),
    ("detect.methods.scale={percentile: 150}", r"'detect.methods.scale.percentile' parameter of detect must be a "
                                               r"float in the range \[0.0, 100.0\). Got 150"),
    ("calibrate.detector=lof", r"'calibrate.detector' parameter of calibrate must be one of fit.detectors \["),
    ("calibrate.layers=[layer1, head]", r"'calibrate.layers' parameter of calibrate must be layers among "
                                        r"extract.layers"),
    ("search.methods.knn={n_neighbors: [5, -3]}", r"'search.methods.knn.n_neighbors' parameter of search must be "
                                                  r"an int in the range \[1, inf\).*Got -3"),
    ("extract.grad_layers=[layer5]", r"'extract.grad_layers' parameter of extract must be a subset"),
    ("detect.methods.nac_ue.M={layer9: 5}", r"'detect.methods.nac_ue.M' parameter of detect must be one value per "
                                            r"layer of extract.grad_layers"),
    ("extract.odin=null", r"'extract.odin' parameter of extract must be a grid: detect.methods.odin reads what "
                          r"extraction stores for it.*Hint: set extract.odin"),
    ("detect.methods.odin={temperature: 5}", r"'detect.methods.odin' parameter of detect must be a setting "
                                             r"extract.odin stores \(temperatures \[1.0, 10.0, 100.0, 1000.0\].*"
                                             r"Hint: add it to extract.odin"),
])
def test_init_runs_the_checks_the_stages_run(tmp_path, override, message):
    """Everything a stage would reject that needs neither the data nor trained weights, init rejects first."""
    import re

    out = tmp_path / "params.yaml"
    original = (CONFIGS / "digits.yaml").read_text()
    out.write_text(original)
    result = runner.invoke(app, ["init", "-S", override, "--params", str(out)], terminal_width=4000)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert out.read_text() == original


def test_parse_override_reads_yaml_values():
    assert parse_override("extract.layers=[fc, avgpool]") == (["extract", "layers"], ["fc", "avgpool"])
    assert parse_override("train.checkpoint=null") == (["train", "checkpoint"], None)
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("train.mean=[1, 2")
