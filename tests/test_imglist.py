"""Tests of OpenOOD v1.5's image lists (source ``imglist``) and of separate val sets (``generate.id_val``,
``generate.ood_val``): real list files and PNGs on disk, in OpenOOD's layout, read by the real loaders,
and one run of the pipeline through the CLI. Nothing is patched."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import GenerateConfig, SourceSpec, build_config, load_section
from pipeline.datasets import write_benchmark
from pipeline.errors import ConfigError, DataError
from pipeline.fingerprint import generate_inputs, input_key, read_imglist, source_files
from pipeline.presets import render_params
from pipeline.roles import OOD_VAL
from pipeline.sources import EXPECTED_LAYOUT, load_source, make_transform, source_classes, source_targets
from pipeline.userdata import check_sources_present, make_source_benchmark, open_benchmark
from tests import fakedata
from tests.test_presets import CONFIGS

LISTS = "benchmark_imglist/cifar10"
IMAGES = "images_classic"
# list stem -> number of images; ID lists cycle through 3 classes, OOD lists are -1 (as OpenOOD's)
SIZES = {"train_cifar10": 12, "val_cifar10": 6, "test_cifar10": 9, "test_tin": 8, "test_svhn": 6, "val_tin": 5}
runner = CliRunner()


def _list(stem, path=IMAGES):
    return {"source": "imglist", "list": f"{LISTS}/{stem}.txt", "path": path}


def _values(root, **changes):
    """A CIFAR-10 benchmark as OpenOOD v1.5 defines it, in miniature; keys set to None are dropped."""
    values = {"benchmark": "sources", "root": str(root), "image_size": 8, "val_fraction": 0.5,
              "id_train": _list("train_cifar10"), "id_val": _list("val_cifar10"), "id_test": _list("test_cifar10"),
              "near": {"tin": _list("test_tin")}, "far": {"svhn": _list("test_svhn")},
              "ood_val": {"val_tin": _list("val_tin")}}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def _cfg(root, **changes) -> GenerateConfig:
    return build_config(GenerateConfig, _values(root, **changes), "generate")


def _write_openood(root, rng, side=8):
    """OpenOOD's layout under ``root``: ``benchmark_imglist/cifar10/*.txt`` naming PNGs under ``images_classic/``."""
    images = {}
    for stem, n in SIZES.items():
        labels = [i % 3 if stem.endswith("cifar10") else -1 for i in range(n)]
        images[stem] = fakedata.write_imglist(root, f"{LISTS}/{stem}.txt", IMAGES, rng, labels, side=side)
    return images


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_HASH_CACHE", str(tmp_path_factory.mktemp("hashes") / "hashes.sqlite3"))


@pytest.fixture
def openood(tmp_path, rng):
    """A miniature OpenOOD data directory; returns (root, images per list stem)."""
    root = tmp_path / "openood"
    return root, _write_openood(root, rng)


def _by_name(splits):
    return {split.name: split for split in splits}


# ------------------------------------------------------------------ reading a list

def test_a_list_gives_its_paths_and_labels_in_file_order(tmp_path):
    (tmp_path / "l.txt").write_text("b/1.png 3\n\na/0.png -1\nc/2.png {'label': 7, 'soft': [0.5]}\r\n")
    entries = read_imglist(tmp_path / "l.txt")
    assert entries.images == ["b/1.png", "a/0.png", "c/2.png"]  # the blank line is skipped
    np.testing.assert_array_equal(entries.labels, [3, -1, 7])
    assert entries.labels.dtype == np.int64


def test_imglist_items_are_the_listed_images_through_the_common_transform(openood):
    root, images = openood
    dataset = load_source("imglist", root=root, path=IMAGES, list_file=f"{LISTS}/train_cifar10.txt", image_size=8)
    assert len(dataset) == SIZES["train_cifar10"]
    np.testing.assert_array_equal(source_targets(dataset), [i % 3 for i in range(12)])
    assert source_classes(dataset) is None
    for i in (0, 11):
        image, label = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (3, 8, 8) and label == i % 3
        torch.testing.assert_close(image, torch.from_numpy(images["train_cifar10"][i].astype(np.float32) / 255))
    # a non-square grey image goes through make_transform like every other source's
    Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10)).save(root / IMAGES / "grey.png")
    (root / "grey.txt").write_text("grey.png 0\n")
    image, _ = load_source("imglist", root=root, path=IMAGES, list_file="grey.txt", image_size=4, channels=1)[0]
    expected = make_transform(4, 1)(Image.open(root / IMAGES / "grey.png"))
    torch.testing.assert_close(image, expected)


def test_paths_are_relative_to_the_root_unless_absolute(openood):
    root, _ = openood
    relative = load_source("imglist", root=root, path=IMAGES, list_file=f"{LISTS}/test_tin.txt", image_size=8)
    absolute = load_source("imglist", root="/nonexistent", path=str(root / IMAGES),
                           list_file=str(root / LISTS / "test_tin.txt"), image_size=8)
    assert [s[0] for s in relative.samples] == [s[0] for s in absolute.samples]
    torch.testing.assert_close(relative[3][0], absolute[3][0])


@pytest.mark.parametrize("line, expected", [
    ("a/1.png", "'<image path> <label>'"),
    ("a/1.png cat", "'<image path> <label>'"),
    ("a/1.png 1.5", "'<image path> <label>'"),
    ("a/1.png {'soft': 1}", "'<image path> <label>'"),
    ("/abs/1.png 0", "an image path relative to the set's path"),
], ids=["no-label", "word", "float", "extras-without-label", "absolute-path"])
def test_a_malformed_line_is_named_with_its_file_and_number(tmp_path, line, expected):
    (tmp_path / "l.txt").write_text(f"a/0.png 0\n{line}\n")
    got = "/abs/1.png" if line.startswith("/") else line
    with pytest.raises(DataError, match=rf"^Image list '.*l\.txt' is malformed at line 2: expected {re.escape(expected)}"
                                        rf".*, got {re.escape(repr(got))}\. Hint: fix that line"):
        read_imglist(tmp_path / "l.txt")


def test_an_empty_list_and_a_missing_list_are_data_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"Image list '.*empty\.txt' names no image: expected lines "):
        read_imglist(tmp_path / "empty.txt")
    with pytest.raises(DataError, match=r"Could not read data set 'imglist' .*No such file.*nope\.txt.*Expected LIST: "
                                        r"one '<image path> <label>' per line.*Hint: point root at the data, "
                                        r"list at the image list file"):
        load_source("imglist", root=tmp_path, list_file="nope.txt")
    with pytest.raises(ConfigError, match=r"'list_file' parameter of load_source must be an image list file"):
        load_source("imglist", root=tmp_path)


# ------------------------------------------------------------------ files, fingerprints, missing data

def test_source_files_are_the_list_and_every_image_it_names(openood):
    root, _ = openood
    found = source_files("imglist", root, path=IMAGES, list_file=f"{LISTS}/test_tin.txt")
    assert found.location == "." and found.missing == []
    assert found.files == sorted([f"{LISTS}/test_tin.txt", *(f"{IMAGES}/test_tin/{i:04d}.png" for i in range(8))])
    (root / IMAGES / "test_tin/0002.png").unlink()
    assert source_files("imglist", root, path=IMAGES, list_file=f"{LISTS}/test_tin.txt").missing == [
        f"{IMAGES}/test_tin/0002.png"]
    assert source_files("imglist", root, path=IMAGES, list_file=f"{LISTS}/nope.txt").missing == [f"{LISTS}/nope.txt"]
    assert input_key(SourceSpec(**_list("test_tin"))) == f"imglist:{LISTS}/test_tin.txt@{IMAGES}"


def test_a_missing_list_and_missing_images_are_named_by_their_parameter(openood):
    root, _ = openood
    (root / LISTS / "val_tin.txt").unlink()
    (root / IMAGES / "test_svhn/0003.png").unlink()
    layout = re.escape(EXPECTED_LAYOUT["imglist"].replace("PATH", IMAGES).replace("LIST", f"{LISTS}/test_svhn.txt"))
    with pytest.raises(DataError, match=rf"^2 of the 6 configured data sets are missing under generate.root '.*': "
                                        rf"generate.far.svhn \(imglist {LISTS}/test_svhn.txt: 1 of the 6 images it "
                                        rf"names are missing, e.g. '{IMAGES}/test_svhn/0003.png'; expected {layout}\); "
                                        rf"generate.ood_val.val_tin \(imglist {LISTS}/val_tin.txt: the list file is "
                                        rf"missing; expected {LISTS}/val_tin.txt: one .*\)\. Hint: point "
                                        r"generate.root at the data, put the missing sets there, remove the sets "
                                        r"you do not use\.$"):
        check_sources_present(_cfg(root))


def test_a_malformed_list_is_named_by_its_parameter_before_anything_is_read(openood):
    root, _ = openood
    with open(root / LISTS / "test_tin.txt", "a") as fh:
        fh.write("tin/extra.png\n")
    with pytest.raises(DataError, match=r"^generate.near.tin: Image list '.*test_tin\.txt' is malformed at line 9: "):
        make_source_benchmark(_cfg(root))


def test_the_fingerprint_follows_the_images_and_the_list_not_the_root(openood, tmp_path):
    root, _ = openood
    key = input_key(SourceSpec(**_list("test_tin")))
    before = generate_inputs(_cfg(root))["data"]
    shutil.copytree(root, tmp_path / "elsewhere")
    assert generate_inputs(_cfg(tmp_path / "elsewhere"))["data"] == before
    png = root / IMAGES / "test_tin/0005.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    edited = generate_inputs(_cfg(root))["data"]
    assert [k for k in before if before[k] != edited[k]] == [key]
    listed = root / LISTS / "test_svhn.txt"
    listed.write_text(listed.read_text().replace(" -1\n", " -2\n", 1))  # a label: the list is part of the content
    relabelled = generate_inputs(_cfg(root))["data"]
    assert [k for k in edited if edited[k] != relabelled[k]] == [input_key(SourceSpec(**_list("test_svhn")))]


def test_generate_refuses_a_split_whose_image_changed(openood, tmp_path):
    root, _ = openood
    directory = write_benchmark(make_source_benchmark(_cfg(root)), tmp_path / "bench")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / IMAGES / "test_tin/0000.png")
    assert set(open_benchmark(directory, ["svhn_test", "val_tin_val"], root=root)) == {"svhn_test", "val_tin_val"}
    with pytest.raises(DataError, match=r"The files behind split 'tin_test' \(imglist .*test_tin\.txt under .*\) "
                                        r"changed since generate"):
        open_benchmark(directory, ["tin_test"], root=root)


# ------------------------------------------------------------------ separate val sets

def test_separate_val_sets_leave_every_test_list_whole(openood):
    root, _ = openood
    splits = _by_name(make_source_benchmark(_cfg(root)))
    assert list(splits) == ["id_train", "id_val", "id_test", "tin_test", "svhn_test", "val_tin_val"]
    attrs = {name: (s.attrs["role"], s.attrs["set"], s.attrs["part"]) for name, s in splits.items()}
    assert attrs == {"id_train": ("id", "id", "train"), "id_val": ("id", "id", "val"), "id_test": ("id", "id", "test"),
                     "tin_test": ("near", "tin", "test"), "svhn_test": ("far", "svhn", "test"),
                     "val_tin_val": (OOD_VAL, "val_tin", "val")}
    for name, stem in (("id_train", "train_cifar10"), ("id_val", "val_cifar10"), ("id_test", "test_cifar10"),
                       ("tin_test", "test_tin"), ("svhn_test", "test_svhn"), ("val_tin_val", "val_tin")):
        np.testing.assert_array_equal(splits[name].indices, np.arange(SIZES[stem]), err_msg=name)
        assert splits[name].attrs["loader"]["list_file"] == f"{LISTS}/{stem}.txt"
    for name in ("id_train", "id_val", "id_test"):
        np.testing.assert_array_equal(splits[name].labels, np.arange(len(splits[name].labels)) % 3)
        assert splits[name].attrs["classes"] == ["0", "1", "2"]
    assert all((splits[name].labels == -1).all() for name in ("tin_test", "svhn_test", "val_tin_val"))


def test_without_separate_val_sets_lists_are_cut_as_before(openood):
    root, _ = openood
    cut = _by_name(make_source_benchmark(_cfg(root, id_val=None, ood_val=None)))
    assert list(cut) == ["id_train", "id_val", "id_test", "tin_val", "tin_test", "svhn_val", "svhn_test"]
    whole = _by_name(make_source_benchmark(_cfg(root)))
    for name in ("tin", "svhn"):  # the cut splits the samples the whole test split holds
        assert sorted([*cut[f"{name}_val"].indices, *cut[f"{name}_test"].indices]) == list(whole[f"{name}_test"].indices)
    assert len(cut["id_val"].indices) + len(cut["id_test"].indices) == SIZES["test_cifar10"]
    assert cut["id_val"].attrs["loader"]["list_file"] == f"{LISTS}/test_cifar10.txt"


def test_caps_apply_to_separate_val_sets(openood):
    root, _ = openood
    splits = _by_name(make_source_benchmark(_cfg(root, max_test=4, max_ood=3)))
    assert {name: len(s.indices) for name, s in splits.items()} == {
        "id_train": 12, "id_val": 4, "id_test": 4, "tin_test": 3, "svhn_test": 3, "val_tin_val": 3}


def test_an_ood_list_as_id_data_is_refused(openood):
    root, _ = openood
    with pytest.raises(DataError, match=r"The ID val set imglist .*val_tin\.txt .* has label -1 at sample 0: expected "
                                        r"class indices 0\.\.2 .*Hint: point generate.id_val at an ID data set"):
        make_source_benchmark(_cfg(root, id_val=_list("val_tin")))
    listed = root / LISTS / "val_cifar10.txt"
    listed.write_text(listed.read_text() + "test_cifar10/0000.png 3\n")
    with pytest.raises(DataError, match=r"The ID val set imglist .*val_cifar10\.txt .* does not have the classes of "
                                        r"the ID train set .*\(3 classes\)\. Hint: point generate.id_val"):
        make_source_benchmark(_cfg(root))


# ------------------------------------------------------------------ GenerateConfig

@pytest.mark.parametrize("changes, message", [
    ({"ood_val": {"tin": _list("val_tin")}},
     r"'generate.ood_val.tin' parameter of generate must be a name not also used in generate.near, generate.far or "
     r"generate.aux. Got 'tin' instead. Hint: rename it \(e.g. val_tin\): 'tin' is already a set in generate.near"),
    ({"aux": {"val_tin": {"source": "imagefolder", "path": "tiny"}}},
     r"'generate.ood_val.val_tin' parameter .* Hint: .* already a set in generate.aux"),
    ({"ood_val": {"id_tin": _list("val_tin")}}, r"'generate.ood_val' parameter of generate must be OOD val set names "
                                                r"that are identifiers not starting with 'id'. Got 'id_tin'"),
    ({"near": {"tin": {"source": "imglist", "path": IMAGES}}},
     r"'generate.near.tin.list' parameter of generate must be an image list file \(relative to generate.root\) for "
     r"source 'imglist'. Got None instead. Hint: e.g. list: benchmark_imglist/"),
    ({"far": {"svhn": {"source": "svhn", "list": f"{LISTS}/test_svhn.txt"}}},
     r"'generate.far.svhn.list' parameter of generate must be null for source 'svhn' \(only source 'imglist' reads "
     r"a list file\)"),
    ({"ood_val": {"val_tin": _list("test_tin")}},
     r"'generate.ood_val.val_tin' parameter of generate must be data other than test OOD set 'tin' "
     r"\(generate.near.tin: imglist .*test_tin.txt\); a val set never overlaps a test set. Got 'imglist "),
    ({"id_val": {**_list("test_cifar10"), "list": f"./{LISTS}/../cifar10/test_cifar10.txt"}},
     r"'generate.id_val' parameter of generate must be data other than generate.id_test \(imglist .*\); a val set "
     r"never overlaps ID-train or a test set.* Hint: point it at held-out data"),
    ({"ood_val": {"val_train": _list("train_cifar10")}},
     r"'generate.ood_val.val_train' parameter .* data other than generate.id_train"),
    ({"id_val": {"source": "constant"}}, r"'generate.id_val.source' parameter of generate must be a data set with "
                                         r"classes"),
], ids=["ood-val-near-name", "ood-val-aux-name", "ood-val-id-name", "missing-list", "list-without-imglist",
        "ood-val-is-a-test-list", "id-val-is-id-test", "ood-val-is-id-train", "constant-id-val"])
def test_generate_config_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **changes)


def test_image_lists_overlap_when_they_are_the_same_file():
    tin, val = SourceSpec(**_list("test_tin")), SourceSpec(**_list("val_tin"))
    assert tin.overlaps(SourceSpec("imglist", path="elsewhere", list=f"./{LISTS}/test_tin.txt"))
    assert not tin.overlaps(val) and not tin.overlaps(SourceSpec("imagefolder", path=IMAGES))
    assert tin.describe() == f"imglist {LISTS}/test_tin.txt"


# ------------------------------------------------------------------ the presets

OPENOOD = {  # OpenOOD v1.5's evaluation_api/datasets.py: list stems per role, and the image root of each
    "openood-cifar10": ("cifar10", {"near": ["cifar100", "tin"], "far": ["mnist", "svhn", "texture", "places365"]},
                        "val_tin"),
    "openood-cifar100": ("cifar100", {"near": ["cifar10", "tin"], "far": ["mnist", "svhn", "texture", "places365"]},
                         "val_tin"),
    "openood-imagenet": ("imagenet", {"near": ["ssb_hard", "ninco"], "far": ["inaturalist", "textures", "openimage_o"]},
                         "val_openimage_o"),
}


@pytest.mark.parametrize("name", sorted(OPENOOD))
def test_openood_presets_read_openoods_own_lists_whole(name):
    id_name, groups, val = OPENOOD[name]
    gen = load_section("generate", yaml.safe_load(render_params(name, (), CONFIGS)))
    images = "images_largescale" if id_name == "imagenet" else "images_classic"
    for part in ("train", "val", "test"):
        assert getattr(gen, f"id_{part}") == SourceSpec(
            "imglist", path=images, list=f"benchmark_imglist/{id_name}/{part}_{id_name}.txt")
    for role, sets in groups.items():
        assert list(getattr(gen, role)) == sets
        for set_name, spec in getattr(gen, role).items():
            assert spec.list == f"benchmark_imglist/{id_name}/test_{set_name}.txt"
            assert spec.path == ("images_classic" if set_name == "textures" else images)  # OpenOOD's Textures
    assert {k: v.list for k, v in gen.ood_val.items()} == {val: f"benchmark_imglist/{id_name}/{val}.txt"}
    assert (gen.max_train, gen.max_test, gen.max_ood) == (None, None, None)


# ------------------------------------------------------------------ the pipeline through the CLI

@pytest.fixture
def fresh_search_pool():
    """search runs its tasks in loky's reusable process pool, whose workers keep the working directory they were
    started in, and the CLI's default store path is relative: start and leave the pool with no project's directory."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)
    yield
    get_reusable_executor().shutdown(wait=True)


def _run(*args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"layerscope {' '.join(args)}: {result.output}"
    return result


def test_the_pipeline_selects_on_the_ood_val_list_and_reports_the_test_lists(tmp_path, rng, monkeypatch,
                                                                             fresh_search_pool):
    """generate -> train -> extract -> fit (with the heatmap decoder on the OOD val set) -> search -> detect."""
    root = tmp_path / "openood"
    _write_openood(root, rng, side=16)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(CONFIGS.parent / "dvc.yaml", project)  # the CLI's default paths, as in the project
    params = {
        "generate": _values(root, image_size=16),
        "train": {"arch": "cifar_resnet", "widths": [4, 8], "blocks": [1, 1], "epochs": 1, "batch_size": 8,
                  "device": "cpu"},
        "extract": {"layers": ["layer1", "layer2", "avgpool", "fc"], "grad_layers": [], "head": "fc",
                    "maps": ["layer2"], "images": True, "batch_size": 16, "chunk_rows": 8, "shard_rows": 16,
                    "device": "cpu"},
        "fit": {"detectors": {"mahalanobis": {}},
                "heatmap": {"fw_layers": 1, "epochs": 1, "n_aux": 4, "aux_sets": ["val_tin"], "batch_size": 4,
                            "width": 4, "device": "cpu"}},
        "detect": {"methods": {"msp": {}, "ebo": {"temperature": 1.0}, "heatmap": {}}, "aggregations": ["max_z"]},
        "search": {"methods": {"ebo": {"temperature": [1.0, 2.0]}, "mahalanobis": {}}, "aggregations": ["max_z"],
                   "n_jobs": 1},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(project)
    for command in ("generate", "train", "extract", "fit", "search", "detect"):
        _run(command)

    from pipeline.report import ood_sets
    from pipeline.store import open_store

    store = open_store("cache/features.zarr")
    assert store.split_attrs("val_tin_val")["role"] == OOD_VAL
    assert ood_sets(store, "val") == {"val_tin": {"split": "val_tin_val", "role": OOD_VAL}}
    # search selected on ID-val against the OOD val list: its val AUROC is EBO's on exactly those two splits
    rows = json.loads((project / "reports/search/leaderboard.json").read_text())["rows"]
    row = next(r for r in rows if r["method"] == "ebo" and json.loads(r["params"]) == {"temperature": 1.0})
    energy = {split: -torch.logsumexp(torch.from_numpy(store.to_numpy(split, "logits")), dim=1).numpy()
              for split in ("id_val", "val_tin_val")}
    n_id, n_ood = len(energy["id_val"]), len(energy["val_tin_val"])
    expected = roc_auc_score(np.r_[np.zeros(n_id), np.ones(n_ood)], np.r_[energy["id_val"], energy["val_tin_val"]])
    assert row["val_auroc_mean"] == pytest.approx(expected, abs=1e-6)
    assert row["val_auroc_near"] == row["val_auroc_far"] == row["val_auroc_mean"]  # the val set stands for both
    # detect reported the test lists only: a figure per test set, and the val list nowhere
    assert sorted(p.stem for p in (project / "reports/figures/mahalanobis").glob("*.png")) == ["svhn", "tin"]
    for path in (project / "reports").glob("*.json"):
        assert "val_tin" not in path.read_text(), path
