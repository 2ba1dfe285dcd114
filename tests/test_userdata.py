"""Tests of pipeline.userdata: sources benchmarks are index files over tiny data
sets written in their real on-disk formats (tests/fakedata.py), read back by the
real torchvision loaders. The only patch is the md5 check of CIFAR and SVHN
files (``no_md5``), which tiny files cannot pass."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import GenerateConfig, build_config
from pipeline.datasets import ImageSplit, make_digits_benchmark, write_benchmark
from pipeline.errors import ConfigError, DataError
from pipeline.sources import EXPECTED_LAYOUT, load_source, source_targets
from pipeline.userdata import (
    INDEX_SUFFIX,
    BenchmarkSplit,
    IndexedDataset,
    IndexSplit,
    SplitDataset,
    channel_stats,
    make_source_benchmark,
    open_benchmark,
)
from tests import fakedata

N = 10  # images per fake file: cifar10 train has 5 * N, every test part N
BASE = """
benchmark: sources
image_size: 16
val_fraction: 0.25
max_ood: 6
id_train: {source: cifar10, part: train}
id_test: {source: cifar10}
near: {cifar100: {source: cifar100}}
far: {svhn: {source: svhn}, texture: {source: imagefolder, path: texture}, colours: {source: constant, n: 8}}
"""
OOD_SETS = ("cifar100", "svhn", "texture", "colours")
CIFAR10_CLASSES = [f"c{i}" for i in range(10)]  # fakedata's batches.meta


def _values(root, **changes):
    """The BASE generate params under ``root``, with top-level keys replaced (None drops a key)."""
    values = {**yaml.safe_load(BASE), "root": str(root)}
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    return values


def _cfg(root, **changes) -> GenerateConfig:
    return build_config(GenerateConfig, _values(root, **changes), "generate")


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_HASH_CACHE", str(tmp_path_factory.mktemp("hashes") / "hashes.sqlite3"))


@pytest.fixture
def data_root(tmp_path, rng, no_md5):
    """Every data set BASE names, written under tmp_path/data."""
    root = tmp_path / "data"
    fakedata.write_sources(_cfg(root), rng, n=N)
    return root


def _by_name(splits):
    return {split.name: split for split in splits}


def _union(splits, set_name):
    return np.concatenate([splits[f"{set_name}_val"].indices, splits[f"{set_name}_test"].indices])


def _same_samples(a, b):
    """The splits both dicts have choose the same samples with the same labels."""
    for name in set(a) & set(b):
        np.testing.assert_array_equal(a[name].indices, b[name].indices, err_msg=name)
        np.testing.assert_array_equal(a[name].labels, b[name].labels, err_msg=name)


# ------------------------------------------------------------------ make_source_benchmark

def test_splits_are_named_and_described_like_the_digits_benchmark(data_root):
    splits = make_source_benchmark(_cfg(data_root))
    assert all(isinstance(split, IndexSplit) for split in splits)
    assert [s.name for s in splits] == ["id_train", "id_val", "id_test", "cifar100_val", "cifar100_test",
                                        "svhn_val", "svhn_test", "texture_val", "texture_test",
                                        "colours_val", "colours_test"]
    roles = {s.name: (s.attrs["role"], s.attrs["set"], s.attrs["part"]) for s in splits}
    assert roles["id_train"] == ("id", "id", "train")
    assert roles["id_val"] == ("id", "id", "val") and roles["id_test"] == ("id", "id", "test")
    assert roles["cifar100_val"] == ("near", "cifar100", "val")
    assert roles["svhn_test"] == ("far", "svhn", "test") and roles["colours_val"] == ("far", "colours", "val")
    for split in splits:
        assert split.attrs["benchmark"] == "sources" and split.attrs["image_size"] == 16
        assert split.attrs["n_samples"] == len(split.indices) == len(split.labels) > 0
        assert split.indices.dtype == np.int64 and split.labels.dtype == np.int64
        if split.attrs["role"] == "id":
            assert split.attrs["classes"] == CIFAR10_CLASSES
        else:
            assert "classes" not in split.attrs


def test_id_labels_are_the_source_targets_and_ood_labels_are_minus_one(data_root):
    splits = _by_name(make_source_benchmark(_cfg(data_root)))
    train_y = source_targets(load_source("cifar10", root=data_root, part="train"))
    test_y = source_targets(load_source("cifar10", root=data_root, part="test"))
    assert len(splits["id_train"].indices) == 5 * N  # no max_train: the whole train part
    np.testing.assert_array_equal(splits["id_train"].labels, train_y[splits["id_train"].indices])
    for name in ("id_val", "id_test"):
        np.testing.assert_array_equal(splits[name].labels, test_y[splits[name].indices])
    assert len(set(train_y.tolist())) > 2  # a test that could tell the labels apart
    for set_name in OOD_SETS:
        for part in ("val", "test"):
            assert (splits[f"{set_name}_{part}"].labels == -1).all()


def test_val_and_test_parts_are_disjoint_ascending_and_cut_by_val_fraction(data_root):
    splits = _by_name(make_source_benchmark(_cfg(data_root)))
    for set_name in ("id", *OOD_SETS):
        val, test = splits[f"{set_name}_val"].indices, splits[f"{set_name}_test"].indices
        assert not set(val.tolist()) & set(test.tolist())
        assert (np.diff(val) > 0).all() and (np.diff(test) > 0).all()
        assert len(val) == round(0.25 * (len(val) + len(test)))
    assert len(_union(splits, "id")) == N  # no max_test: the whole test part
    # max_ood = 6 caps each 10-image set (constant: n = 8 sizes it, max_ood still caps it)
    assert all(len(_union(splits, s)) == 6 for s in OOD_SETS)


def test_the_cut_does_not_change_which_samples_are_chosen(data_root):
    quarter = _by_name(make_source_benchmark(_cfg(data_root)))
    half = _by_name(make_source_benchmark(_cfg(data_root, val_fraction=0.5)))
    for set_name in ("id", *OOD_SETS):
        a, b = np.sort(_union(quarter, set_name)), np.sort(_union(half, set_name))
        np.testing.assert_array_equal(a, b)
        assert len(half[f"{set_name}_val"].indices) == len(a) // 2


def _capped(root, seed):
    far = {"svhn": {"source": "svhn", "n": 4}, "texture": {"source": "imagefolder", "path": "texture"},
           "colours": {"source": "constant", "n": 8}}
    return _by_name(make_source_benchmark(_cfg(root, seed=seed, max_train=20, max_test=7, far=far)))


def test_caps_are_honoured_seeded_and_not_the_first_samples(data_root):
    splits, again, other = _capped(data_root, 0), _capped(data_root, 0), _capped(data_root, 1)
    sizes = {"id": 7, "cifar100": 6, "svhn": 4, "texture": 6, "colours": 6}
    totals = {"id": N, "cifar100": N, "svhn": N, "texture": N, "colours": 8}
    train = splits["id_train"].indices
    assert len(train) == 20 and (np.diff(train) > 0).all() and train.max() < 5 * N
    assert not np.array_equal(train, np.arange(20))
    assert not np.array_equal(train, other["id_train"].indices)
    for set_name, size in sizes.items():
        chosen = np.sort(_union(splits, set_name))
        assert len(chosen) == size and len(np.unique(chosen)) == size and chosen.max() < totals[set_name]
        assert not np.array_equal(chosen, np.arange(size)), set_name
        assert not np.array_equal(chosen, np.sort(_union(other, set_name))), set_name
    _same_samples(splits, again)
    assert set(splits) == set(again)
    train_y = source_targets(load_source("cifar10", root=data_root, part="train"))
    test_y = source_targets(load_source("cifar10", root=data_root, part="test"))
    np.testing.assert_array_equal(splits["id_train"].labels, train_y[train])
    for name in ("id_val", "id_test"):
        np.testing.assert_array_equal(splits[name].labels, test_y[splits[name].indices])


def test_a_set_n_overrides_the_id_caps(data_root):
    id_train = {"source": "cifar10", "part": "train", "n": 12}
    id_test = {"source": "cifar10", "n": 4}
    splits = _by_name(make_source_benchmark(_cfg(data_root, max_train=20, max_test=8, id_train=id_train,
                                                 id_test=id_test)))
    assert len(splits["id_train"].indices) == 12
    assert len(_union(splits, "id")) == 4


def test_adding_a_set_leaves_the_others_samples_alone(data_root):
    before = _by_name(make_source_benchmark(_cfg(data_root)))
    near = {"extra": {"source": "constant", "n": 9}, "cifar100": {"source": "cifar100"}}  # a new first set
    after = _by_name(make_source_benchmark(_cfg(data_root, near=near)))
    assert set(after) == set(before) | {"extra_val", "extra_test"}
    _same_samples(before, after)
    # the new set has its own stream: it does not copy the (same-sized) colours set's choice
    assert not np.array_equal(_union(after, "extra"), _union(before, "colours"))


def test_removing_a_set_leaves_the_others_samples_alone(data_root):
    before = _by_name(make_source_benchmark(_cfg(data_root)))
    far = {"colours": {"source": "constant", "n": 8}, "texture": {"source": "imagefolder", "path": "texture"}}
    after = _by_name(make_source_benchmark(_cfg(data_root, far=far)))  # svhn gone, the rest reordered
    assert set(after) == set(before) - {"svhn_val", "svhn_test"}
    _same_samples(before, after)


# ------------------------------------------------------------------ auxiliary outliers (generate.aux)

AUX = {"tinyimages": {"source": "imagefolder", "path": "tinyimages300k"}}
N_AUX = 16  # images in the fake tinyimages300k folder: more than BASE's max_ood = 6


@pytest.fixture
def aux_root(data_root, rng):
    """data_root plus a TinyImages-like folder of N_AUX PNGs in two class folders."""
    fakedata.write_imagefolder(data_root / "tinyimages300k", rng, per_class=N_AUX // 2)
    return data_root


def test_an_aux_set_is_one_uncut_split_after_the_ood_sets(aux_root):
    splits = make_source_benchmark(_cfg(aux_root, aux=AUX))
    assert [s.name for s in splits][-3:] == ["colours_val", "colours_test", "tinyimages_aux"]
    aux = splits[-1]
    assert (aux.attrs["role"], aux.attrs["set"], aux.attrs["part"]) == ("aux", "tinyimages", "aux")
    assert aux.attrs["n_samples"] == len(aux.indices) == len(aux.labels) == 6  # max_ood caps it, uncut
    assert (aux.labels == -1).all() and aux.labels.dtype == np.int64 and "classes" not in aux.attrs
    assert (np.diff(aux.indices) > 0).all() and aux.indices.max() < N_AUX
    assert aux.attrs["loader"]["path"] == "tinyimages300k" and aux.attrs["source"].startswith("imagefolder")
    assert not {"tinyimages_val", "tinyimages_test"} & {s.name for s in splits}


def _aux_indices(root, seed=0, **spec):
    aux = {"tinyimages": {**AUX["tinyimages"], **spec}}
    return _by_name(make_source_benchmark(_cfg(root, seed=seed, aux=aux)))["tinyimages_aux"].indices


def test_aux_caps_are_its_own_n_or_max_ood_seeded_and_not_the_first_samples(aux_root):
    capped = _aux_indices(aux_root, n=9)
    assert len(capped) == 9 and len(np.unique(capped)) == 9  # its own n overrides max_ood
    assert len(_aux_indices(aux_root, n=100)) == N_AUX  # a cap above the set's size takes it whole
    np.testing.assert_array_equal(capped, _aux_indices(aux_root, n=9))
    assert not np.array_equal(capped, _aux_indices(aux_root, seed=1, n=9))
    assert not np.array_equal(capped, np.arange(9))


def test_an_aux_set_has_its_own_stream_and_leaves_the_other_splits_alone(aux_root, rng):
    before = _by_name(make_source_benchmark(_cfg(aux_root)))
    after = _by_name(make_source_benchmark(_cfg(aux_root, aux=AUX)))
    assert set(after) == set(before) | {"tinyimages_aux"}
    _same_samples(before, after)
    assert [after[n].fingerprint() for n in before] == [before[n].fingerprint() for n in before]
    # a second aux set of the same size: its own stream (not a copy of the first's choice), and the first is unchanged
    fakedata.write_imagefolder(aux_root / "more", rng, per_class=N_AUX // 2)
    both = _by_name(make_source_benchmark(_cfg(aux_root, aux={"more": {"source": "imagefolder", "path": "more"},
                                                              **AUX})))
    _same_samples(after, both)
    assert len(both["more_aux"].indices) == 6
    assert not np.array_equal(both["more_aux"].indices, both["tinyimages_aux"].indices)


def test_constant_colours_serve_as_aux_when_no_test_set_uses_them(aux_root):
    far = {"svhn": {"source": "svhn"}, "texture": {"source": "imagefolder", "path": "texture"}}
    splits = _by_name(make_source_benchmark(_cfg(aux_root, far=far, aux={"colours": {"source": "constant",
                                                                                          "n": 8}})))
    assert len(splits["colours_aux"].indices) == 6 and splits["colours_aux"].attrs["role"] == "aux"


def test_aux_split_is_extracted_like_every_split_but_never_reported(aux_root, tmp_path, monkeypatch):
    from pipeline.models import init_model, load_checkpoint, save_checkpoint
    from pipeline.report import ood_sets
    from pipeline.store import open_store
    from stages import extract

    directory = write_benchmark(make_source_benchmark(_cfg(aux_root, aux=AUX)), tmp_path / "bench")
    spec = {"arch": "cifar_resnet", "num_classes": 10, "in_channels": 3, "widths": [4, 8], "blocks": [1, 1]}
    save_checkpoint(init_model(spec, seed=0).eval(), spec, tmp_path / "m.pt")
    # extract opens the data under generate.root of the params in the working directory
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"extract": {"layers": ["layer1", "fc"], "device": "cpu"},
                                                          "generate": _values(aux_root, aux=AUX)}))
    extract.run(tmp_path / "params.yaml", directory, tmp_path / "m.pt", tmp_path / "s.zarr")

    store = open_store(tmp_path / "s.zarr")
    aux = open_benchmark(directory, ["tinyimages_aux"])["tinyimages_aux"]
    assert "tinyimages_aux" in store.splits
    assert {k: store.split_attrs("tinyimages_aux")[k] for k in ("role", "set", "part", "n_samples")} == {
        "role": "aux", "set": "tinyimages", "part": "aux", "n_samples": 6}
    assert store.split_attrs("tinyimages_aux")["fingerprint"] == aux.fingerprint
    model, _ = load_checkpoint(tmp_path / "m.pt")
    with torch.inference_mode():
        logits = model(torch.stack([aux.dataset[i][0] for i in range(len(aux.dataset))]))
    np.testing.assert_allclose(store.to_numpy("tinyimages_aux", "logits"), logits.numpy(), rtol=1e-5, atol=1e-5)
    assert (store.to_numpy("tinyimages_aux", "label") == -1).all()
    for part in ("val", "test"):
        sets = ood_sets(store, part)
        assert set(sets) == set(OOD_SETS) and "tinyimages" not in sets
        assert all(s["split"] == f"{name}_{part}" for name, s in sets.items())


# ------------------------------------------------------------------ write and open back

@pytest.fixture
def bench(data_root, tmp_path):
    """A sources benchmark over data_root, written to tmp_path/bench; returns (directory, splits)."""
    splits = make_source_benchmark(_cfg(data_root))
    return write_benchmark(splits, tmp_path / "bench"), _by_name(splits)


def test_open_benchmark_serves_the_recorded_samples(bench, data_root):
    directory, splits = bench
    opened = open_benchmark(directory, root=data_root)
    assert sorted(opened) == sorted(splits)  # the manifest keeps its splits sorted by name
    for name, split in opened.items():
        assert isinstance(split, BenchmarkSplit) and isinstance(split.dataset, IndexedDataset)
        np.testing.assert_array_equal(split.labels, splits[name].labels)
        assert split.attrs == splits[name].attrs
        base = load_source(**split.attrs["loader"], root=data_root)
        assert len(split.dataset) == len(splits[name].indices)
        for i, index in enumerate(splits[name].indices.tolist()):
            image, label = split.dataset[i]
            assert torch.equal(image, base[index][0]), (name, index)
            assert image.shape == (3, 16, 16) and label == splits[name].labels[i] and isinstance(label, int)


def test_manifest_entries_are_index_files_with_their_fingerprints(bench, data_root):
    directory, splits = bench
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["benchmark"] == "sources"
    opened = open_benchmark(directory, root=data_root)
    for name, entry in manifest["splits"].items():
        assert entry["kind"] == "index" and entry["file"] == f"{name}{INDEX_SUFFIX}"
        assert (directory / entry["file"]).is_file()
        assert entry["fingerprint"] == splits[name].fingerprint() == opened[name].fingerprint
        assert entry["role"] == splits[name].attrs["role"] and entry["loader"] == splits[name].attrs["loader"]
    files = sorted(p.name for p in directory.iterdir())  # index files only: no image arrays
    assert files == sorted([f"{name}{INDEX_SUFFIX}" for name in splits] + ["layerscope.json", "manifest.json"])


# Regression (issue 14): the absolute root was written into the manifest and every index file, so pointing
# generate.root at an identical copy elsewhere reran generate, train and extract.
def test_an_identical_copy_under_another_root_is_the_same_benchmark_byte_for_byte(bench, data_root, tmp_path):
    directory, splits = bench
    copy = tmp_path / "elsewhere" / "mount"
    shutil.copytree(data_root, copy)
    again = write_benchmark(make_source_benchmark(_cfg(copy)), tmp_path / "again")
    for name in [*(f"{n}{INDEX_SUFFIX}" for n in splits), "manifest.json", "layerscope.json"]:
        assert (again / name).read_bytes() == (directory / name).read_bytes(), name
    assert str(data_root) not in (directory / "manifest.json").read_text()
    opened = open_benchmark(directory, root=copy)  # read from the copy: the content matches
    assert torch.equal(opened["texture_test"].dataset[0][0], open_benchmark(directory, root=data_root)[
        "texture_test"].dataset[0][0])


def test_open_benchmark_takes_the_root_from_params(bench, data_root, tmp_path):
    directory, splits = bench
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"generate": _values(data_root)}))
    assert set(open_benchmark(directory, params=params)) == set(splits)
    params.write_text(yaml.safe_dump({"generate": _values(tmp_path / "nowhere")}))
    with pytest.raises(DataError, match=r"Could not read data set 'cifar10'"):
        open_benchmark(directory, ["id_train"], params=params)


def test_fingerprints_are_deterministic_and_follow_the_indices(data_root):
    first = make_source_benchmark(_cfg(data_root))
    second = make_source_benchmark(_cfg(data_root))
    assert [s.fingerprint() for s in first] == [s.fingerprint() for s in second]
    assert len({s.fingerprint() for s in first}) == len(first)
    reseeded = _by_name(make_source_benchmark(_cfg(data_root, seed=1)))
    assert _by_name(first)["cifar100_test"].fingerprint() != reseeded["cifar100_test"].fingerprint()
    split = _by_name(first)["svhn_test"]
    moved = IndexSplit(split.name, split.indices + 1, split.labels, split.attrs)
    relabelled = IndexSplit(split.name, split.indices, split.labels + 1, split.attrs)
    assert len({split.fingerprint(), moved.fingerprint(), relabelled.fingerprint()}) == 3


def test_open_benchmark_reads_the_digits_benchmark(tmp_path):
    splits = make_digits_benchmark(n_synthetic=20)
    directory = write_benchmark(splits, tmp_path / "digits")
    opened = open_benchmark(directory)
    assert sorted(opened) == sorted(s.name for s in splits)
    for split in splits:
        got = opened[split.name]
        assert isinstance(got.dataset, SplitDataset) and got.fingerprint == split.fingerprint()
        np.testing.assert_array_equal(got.labels, split.labels)
        image, label = got.dataset[len(split.labels) - 1]
        np.testing.assert_array_equal(image.numpy(), split.images[-1])
        assert label == split.labels[-1]


def test_open_benchmark_selects_names_in_the_given_order(bench, data_root):
    directory, _ = bench
    assert list(open_benchmark(directory, ["svhn_test", "id_val"], root=data_root)) == ["svhn_test", "id_val"]


def test_open_benchmark_rejects_an_unknown_split(bench):
    directory, _ = bench
    with pytest.raises(DataError, match=r"has no split 'nope'; it has \[.*'id_train'.*\]. Hint: run `layerscope"):
        open_benchmark(directory, ["id_train", "nope"])


def _texture_file(root, splits, index):
    """The texture file behind sample ``index``, and the texture split that holds it."""
    files = load_source("imagefolder", root=root, path="texture").samples
    holder = next(name for name in ("texture_val", "texture_test") if index in splits[name].indices)
    return files[index][0], holder


def _rewrite_smaller(root, splits):
    """Rewrite the last chosen texture image as a smaller PNG: only the split holding it changes."""
    path, holder = _texture_file(root, splits, int(_union(splits, "texture").max()))
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path, format="PNG")
    return [holder]


def _same_size_edit(root, splits):
    """Change the bytes of the first chosen texture image, keeping its size (issue 14: nothing noticed)."""
    path, holder = _texture_file(root, splits, int(_union(splits, "texture").min()))
    data = bytearray(open(path, "rb").read())
    data[-20] ^= 0xFF  # refused before any image is decoded, so any byte will do
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.write(data)
    assert os.path.getsize(path) == size
    return [holder]


def _delete_first(root, splits):
    """Delete the first chosen texture image: every later sample moves up one place."""
    path, _ = _texture_file(root, splits, int(_union(splits, "texture").min()))
    os.remove(path)
    return ["texture_val", "texture_test"]


def _append(path):
    with open(path, "ab") as fh:
        fh.write(b"\0" * 16)


def _append_cifar10(root, splits):
    _append(root / "cifar-10-batches-py" / "data_batch_3")  # pickle ignores trailing bytes: it still loads
    return ["id_train"]  # the test part reads test_batch (and batches.meta) only


def _append_cifar100(root, splits):
    _append(root / "cifar-100-python" / "test")
    return ["cifar100_val", "cifar100_test"]


@pytest.mark.parametrize("change", [_rewrite_smaller, _same_size_edit, _delete_first, _append_cifar10,
                                    _append_cifar100],
                         ids=["imagefolder-resized", "imagefolder-same-size", "imagefolder-deleted", "cifar10-appended",
                              "cifar100-appended"])
def test_changed_data_is_refused(bench, data_root, change):
    directory, splits = bench
    assert len(open_benchmark(directory, root=data_root)) == len(splits)
    changed = change(data_root, splits)
    for name in changed:
        # the hint is a command that reruns generate: `dvc repro generate` runs the inputs stage first, which
        # sees the change (tests/test_e2e_inputs.py runs it)
        with pytest.raises(DataError, match=rf"(?i)split '{name}'.*changed since generate.*Hint: rerun generate "
                                            r"with `dvc repro generate` \(its inputs stage sees the changed files\)"):
            open_benchmark(directory, [name], root=data_root)
    with pytest.raises(DataError, match="changed since generate"):
        open_benchmark(directory, root=data_root)
    assert set(open_benchmark(directory, [n for n in splits if n not in changed], root=data_root)) == (
        set(splits) - set(changed))


def test_missing_data_root_names_the_expected_layout(bench, data_root, tmp_path):
    directory, _ = bench
    shutil.rmtree(data_root)
    with pytest.raises(DataError, match="Could not read data set 'cifar10'") as info:
        open_benchmark(directory, ["id_train"], root=data_root)
    assert EXPECTED_LAYOUT["cifar10"] in str(info.value) and "pass download: true" in str(info.value)
    with pytest.raises(DataError, match=re.escape(EXPECTED_LAYOUT["imagefolder"])):
        open_benchmark(directory, ["texture_val"], root=data_root)
    with pytest.raises(DataError, match=r"5 of the 6 configured data sets are missing under generate.root '.*empty', "
                                        r"which does not exist: generate.id_train \(cifar10 \(train part\): expected "
                                        + re.escape(EXPECTED_LAYOUT["cifar10"])) as info:
        make_source_benchmark(_cfg(tmp_path / "empty"))
    for param in ("generate.id_test", "generate.near.cifar100", "generate.far.svhn", "generate.far.texture"):
        assert param in str(info.value)


def test_every_missing_set_is_named_by_its_parameter_in_one_error(data_root):
    """The user learns every missing set at once, not one per run."""
    shutil.rmtree(data_root / "texture")
    (data_root / "test_32x32.mat").unlink()
    with pytest.raises(DataError, match=r"^2 of the 6 configured data sets are missing under generate.root '.*': "
                                        r"generate.far.svhn \(svhn \(test part\): expected ROOT/\{train_32x32.mat, "
                                        r"test_32x32.mat\}\); generate.far.texture \(imagefolder texture: expected "
                                        r"texture/<class>/"):
        make_source_benchmark(_cfg(data_root))


# ------------------------------------------------------------------ generate errors

@pytest.mark.parametrize("id_test, classes", [
    ({"source": "cifar100"}, None),
    ({"source": "imagefolder", "path": "other"}, ("x0", "x1", "x2")),
], ids=["cifar100", "imagefolder"])
def test_id_test_with_other_classes_is_refused(data_root, rng, id_test, classes):
    if classes:
        fakedata.write_imagefolder(data_root / "other", rng, classes, per_class=2)
    with pytest.raises(DataError, match=r"ID test set .* does not have the classes of the ID train set "
                                        r".*\(10 classes\)\. Hint: point generate.id_test"):
        make_source_benchmark(_cfg(data_root, id_test=id_test))


def test_id_imagefolders_with_the_same_classes_are_accepted(tmp_path, rng):
    cfg = _cfg(tmp_path, id_train={"source": "imagefolder", "path": "train"},
               id_test={"source": "imagefolder", "path": "test"}, near={},
               far={"colours": {"source": "constant", "n": 8}})
    fakedata.write_sources(cfg, rng, n=6)
    splits = _by_name(make_source_benchmark(cfg))
    assert splits["id_train"].attrs["classes"] == ["c0", "c1", "c2"]
    np.testing.assert_array_equal(splits["id_train"].labels, [0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("changes, what", [
    ({"far": {"svhn": {"source": "svhn", "n": 1}}}, "'svhn'"),
    ({"far": {"colours": {"source": "constant", "n": 1}}}, "'colours'"),
    ({"id_test": {"source": "cifar10", "n": 1}}, "cifar10 \\(test part\\)"),
], ids=["svhn-n1", "constant-n1", "id-test-n1"])
def test_a_set_needs_at_least_two_samples(data_root, changes, what):
    with pytest.raises(DataError, match=rf"Data set {what}.* has 1 sample\(s\); at least 2 are needed"):
        make_source_benchmark(_cfg(data_root, **changes))


def test_download_true_with_the_files_present_stays_offline(tmp_path, rng, no_md5):
    # No SVHN here: its download() checks the md5 through torchvision.datasets.utils,
    # which no_md5 does not patch, so tiny SVHN files would be fetched again.
    far = {"texture": {"source": "imagefolder", "path": "texture"}}
    cfg = _cfg(tmp_path, far=far)
    fakedata.write_sources(cfg, rng, n=N)
    listing = sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*"))
    online = make_source_benchmark(_cfg(tmp_path, far=far, download=True))
    offline = make_source_benchmark(cfg)
    assert [s.fingerprint() for s in online] == [s.fingerprint() for s in offline]
    assert sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*")) == listing


# ------------------------------------------------------------------ channel_stats

def _numpy_stats(images):
    images = np.asarray(images, dtype=np.float64)
    return images.mean(axis=(0, 2, 3)), images.std(axis=(0, 2, 3))


def test_channel_stats_of_a_split_dataset(tiny_splits):
    split = tiny_splits["id_train"]
    mean, std = channel_stats(SplitDataset(split))
    expected_mean, expected_std = _numpy_stats(split.images)
    np.testing.assert_allclose(mean, expected_mean, atol=1e-6)
    np.testing.assert_allclose(std, expected_std, atol=1e-6)
    assert len(mean) == 1 and 0.2 < std[0] < 0.4  # uniform [0, 1]: std ~0.29


def test_channel_stats_do_not_depend_on_torch_threads(rng):
    # they become the model's normalisation (train): a thread-dependent last bit changed model.pt on a busy machine
    # 4000 grey 16x16 images: a size at which torch's float64 sum differed between 1 and 2 threads
    split = ImageSplit("id_train", rng.random((4000, 1, 16, 16)).astype("f4"), np.zeros(4000, dtype=np.int64), {})
    stats = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        stats.append(channel_stats(SplitDataset(split)))
    assert stats[0] == stats[1]


def test_channel_stats_of_an_indexed_dataset_do_not_depend_on_batching(bench, data_root):
    directory, _ = bench
    dataset = open_benchmark(directory, ["id_train"], root=data_root)["id_train"].dataset
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()
    expected_mean, expected_std = _numpy_stats(images)
    results = [channel_stats(dataset, batch_size=b) for b in (1, 7, 256)]
    for mean, std in results:
        assert len(mean) == 3
        np.testing.assert_allclose(mean, expected_mean, atol=1e-6)
        np.testing.assert_allclose(std, expected_std, atol=1e-6)
        np.testing.assert_allclose(mean, results[0][0], atol=1e-12)
        np.testing.assert_allclose(std, results[0][1], atol=1e-12)
    assert not np.allclose(expected_mean, expected_mean[0])  # channels differ: per-channel order matters


# ------------------------------------------------------------------ GenerateConfig

@pytest.mark.parametrize("changes, message", [
    ({"id_train": None}, r"'generate.id_train' parameter of generate must be a data set"),
    ({"id_test": None}, r"'generate.id_test' parameter of generate must be a data set"),
    ({"near": {}, "far": {}}, r"'generate.far' parameter of generate must be at least one OOD set"),
    ({"far": {"texture": {"source": "imagefolder"}}},
     r"'generate.far.texture.path' parameter of generate must be a directory .* Hint: e.g. path: texture"),
    ({"far": {"cifar100": {"source": "cifar100"}}},
     r"'generate.far.cifar100' parameter of generate must be a name not also used in generate.near"),
    ({"far": {"svhn": {"source": "svhn2"}}},
     r"'generate.far.svhn.source' parameter of generate must be one of \{.*'svhn'.*\}. Got 'svhn2'"),
    ({"id_train": {"source": "cifar10", "part": "val"}}, r"'generate.id_train.part' parameter .* Got 'val'"),
    ({"far": {"svhn": {"source": "svhn", "size": 5}}},
     (r"Unknown parameter 'generate.far.svhn.size'. Valid parameters of 'generate.far.svhn' are "
      r"\['list', 'n', 'part', 'path', 'source'\]")),
    ({"near": {"cifar100": {"source": "cifar100", "n": 0}}}, r"'generate.near.cifar100.n' parameter .* positive"),
    ({"far": {"id_like": {"source": "svhn"}}}, r"'generate.far' parameter .* not starting with 'id'"),
    ({"near": ["cifar100"]}, r"'generate.near' parameter of params.yaml must be a mapping"),
    ({"id_test": {"source": "constant"}},
     r"'generate.id_test.source' parameter of generate must be a data set with classes. .* put them under far"),
])
def test_generate_config_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **changes)


def test_digits_benchmark_needs_no_sources():
    cfg = build_config(GenerateConfig, {"benchmark": "digits"}, "generate")
    assert cfg.id_train is None and cfg.ood_sets == {}


def test_ood_sets_lists_near_first(tmp_path):
    cfg = _cfg(tmp_path)
    assert list(cfg.ood_sets) == list(OOD_SETS)
    assert cfg.ood_sets["cifar100"][0] == "near" and cfg.ood_sets["texture"] == ("far", cfg.far["texture"])


def test_mnist_as_grey_id_data(tmp_path, rng):
    """MNIST and FashionMNIST serve as ID too; channels: 1 keeps them grey."""
    cfg = build_config(GenerateConfig, {
        "benchmark": "sources", "root": str(tmp_path), "image_size": 28, "channels": 1, "val_fraction": 0.5,
        "id_train": {"source": "mnist", "part": "train"}, "id_test": {"source": "mnist"},
        "far": {"fashion": {"source": "fashionmnist"}},
    }, "generate")
    fakedata.write_sources(cfg, rng, n=10)
    write_benchmark(make_source_benchmark(cfg), tmp_path / "bench")
    splits = open_benchmark(tmp_path / "bench", root=tmp_path)
    image, label = splits["id_train"].dataset[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
    assert splits["id_train"].attrs["classes"][0].startswith("0")  # torchvision's MNIST class names
    assert (splits["fashion_test"].labels == -1).all()
