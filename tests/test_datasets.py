"""Tests for the embedded digits benchmark and its files (pipeline.datasets)."""

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from pipeline import datasets
from pipeline.datasets import (
    ImageSplit,
    check_benchmark,
    load_split,
    make_digits_benchmark,
    read_manifest,
    save_split,
    split_fingerprint,
    write_benchmark,
)
from pipeline.errors import ConfigError, DataError, IntegrityError, OutputError
from pipeline.userdata import SplitDataset

OOD_SETS = ["digits89", "textures", "photos", "faces", "gaussian", "uniform", "constant"]
FAR_SETS = OOD_SETS[1:]


@pytest.fixture(scope="module")
def splits():
    """The default benchmark, built once for the module (about half a second)."""
    return make_digits_benchmark()


@pytest.fixture(scope="module")
def by_name(splits):
    return {split.name: split for split in splits}


@pytest.fixture(scope="module")
def digit_labels():
    return load_digits().target


def _rows(images):
    """Each image as bytes, so that images can be put in sets."""
    return {image.tobytes() for image in images}


# ---------------------------------------------------------------- defaults


def test_split_names_in_order(splits):
    expected = ["id_train", "id_val", "id_test"]
    expected += [f"{s}_{part}" for s in OOD_SETS for part in ("val", "test")]
    assert [split.name for split in splits] == expected


def test_id_classes_exclude_holdout(by_name):
    for part in ("train", "val", "test"):
        split = by_name[f"id_{part}"]
        assert split.attrs["classes"] == [0, 1, 2, 3, 4, 5, 6, 7]
        assert split.attrs["holdout_classes"] == [8, 9]
        assert set(np.unique(split.labels)) == set(range(8))


def test_id_sizes_sum_to_id_digits(by_name, digit_labels):
    n_id = int(np.isin(digit_labels, range(8)).sum())
    sizes = [len(by_name[f"id_{part}"].labels) for part in ("train", "val", "test")]
    assert sum(sizes) == n_id
    # val and test are each ~20 %: ceil(0.2 * 1443) = 289.
    assert sizes == [n_id - 2 * 289, 289, 289]


def test_id_splits_are_stratified(by_name):
    train = np.bincount(by_name["id_train"].labels, minlength=8) / len(by_name["id_train"].labels)
    for part in ("val", "test"):
        labels = by_name[f"id_{part}"].labels
        proportions = np.bincount(labels, minlength=8) / len(labels)
        np.testing.assert_allclose(proportions, train, atol=0.01)


def test_no_image_in_two_id_splits(by_name):
    rows = [_rows(by_name[f"id_{part}"].images) for part in ("train", "val", "test")]
    # The digits hold no duplicate images, so sizes must survive deduplication.
    n_images = sum(len(by_name[f"id_{part}"].images) for part in ("train", "val", "test"))
    assert sum(len(r) for r in rows) == n_images
    assert not rows[0] & rows[1] and not rows[0] & rows[2] and not rows[1] & rows[2]


def test_near_set_is_the_holdout_digits(by_name, digit_labels):
    val, test = by_name["digits89_val"], by_name["digits89_test"]
    assert len(val.labels) + len(test.labels) == int(np.isin(digit_labels, [8, 9]).sum())
    assert val.attrs["digits"] == [8, 9]
    id_rows = set().union(*(_rows(by_name[f"id_{p}"].images) for p in ("train", "val", "test")))
    assert not (_rows(val.images) | _rows(test.images)) & id_rows


@pytest.mark.parametrize("set_name", OOD_SETS)
def test_ood_set_has_val_and_test_halves(by_name, set_name):
    val, test = by_name[f"{set_name}_val"], by_name[f"{set_name}_test"]
    assert abs(len(val.labels) - len(test.labels)) <= 1
    assert (val.attrs["part"], test.attrs["part"]) == ("val", "test")
    assert val.attrs["set"] == test.attrs["set"] == set_name
    assert not _rows(val.images) & _rows(test.images)
    assert np.all(val.labels == -1) and np.all(test.labels == -1)


def test_ood_set_sizes(by_name):
    for set_name in ["textures", "photos", "gaussian", "uniform", "constant"]:
        n = len(by_name[f"{set_name}_val"].labels) + len(by_name[f"{set_name}_test"].labels)
        assert n == 400, set_name
    assert len(by_name["faces_val"].labels) + len(by_name["faces_test"].labels) == 200


def test_images_are_float32_in_unit_range(splits):
    for split in splits:
        assert split.images.dtype == np.float32, split.name
        assert split.images.shape == (len(split.labels), 1, 16, 16), split.name
        assert split.images.min() >= 0.0 and split.images.max() <= 1.0, split.name
        assert split.labels.dtype == np.int64, split.name
        assert split.attrs["n_samples"] == len(split.labels)
        assert split.attrs["image_size"] == 16


def test_roles(splits):
    roles = {split.name: split.attrs["role"] for split in splits}
    for name, role in roles.items():
        if name.startswith("id_"):
            assert role == "id"
        elif name.startswith("digits89_"):
            assert role == "near"
        else:
            assert role == "far", name


def test_attrs_are_json_serialisable_with_required_keys(splits):
    for split in splits:
        assert json.loads(json.dumps(split.attrs)) == split.attrs
        for key in ("role", "set", "part", "source", "n_samples", "image_size"):
            assert key in split.attrs, (split.name, key)


def test_constant_images_are_constant(by_name):
    images = by_name["constant_test"].images
    assert np.all(images == images[:, :, :1, :1])
    assert np.unique(images[:, 0, 0, 0]).size == len(images)


def test_far_sets_differ_from_id(by_name):
    # A crude sanity floor: each far set's mean image is far from the ID mean image.
    id_mean = by_name["id_train"].images.mean(axis=0)
    for set_name in FAR_SETS:
        mean = by_name[f"{set_name}_test"].images.mean(axis=0)
        assert np.abs(mean - id_mean).mean() > 0.1, set_name


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_splits(splits):
    again = make_digits_benchmark()
    for a, b in zip(splits, again, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert split_fingerprint(a) == split_fingerprint(b)


def test_different_seed_gives_different_splits(splits):
    other = make_digits_benchmark(seed=1)
    for a, b in zip(splits, other, strict=True):
        assert a.name == b.name
        assert not np.array_equal(a.images, b.images), a.name
        assert split_fingerprint(a) != split_fingerprint(b)


def test_fingerprint_sees_one_pixel_and_attrs(by_name):
    split = by_name["faces_val"]
    images = split.images.copy()
    images[0, 0, 0, 0] = np.nextafter(images[0, 0, 0, 0], np.float32(1))
    changed = ImageSplit(split.name, images, split.labels, split.attrs)
    assert split_fingerprint(changed) != split_fingerprint(split)
    relabelled = ImageSplit(split.name, split.images, split.labels, {**split.attrs, "part": "x"})
    assert split_fingerprint(relabelled) != split_fingerprint(split)
    reshaped = ImageSplit(split.name, split.images.reshape(-1, 1, 8, 32), split.labels, split.attrs)
    assert split_fingerprint(reshaped) != split_fingerprint(split)


# ---------------------------------------------------------------- configuration


def test_holdout_zero_gives_near_set_digits0():
    splits = {s.name: s for s in make_digits_benchmark(holdout_classes=(0,), n_synthetic=10)}
    assert "digits0_val" in splits and "digits0_test" in splits
    assert splits["digits0_val"].attrs["role"] == "near"
    assert splits["id_train"].attrs["classes"] == list(range(1, 10))
    assert set(np.unique(splits["id_train"].labels)) == set(range(9))


def test_holdout_order_does_not_matter():
    names = [s.name for s in make_digits_benchmark(holdout_classes=[9, 3], n_synthetic=4)]
    assert "digits39_val" in names


@pytest.mark.parametrize("size", [8, 32])
def test_image_size(size):
    for split in make_digits_benchmark(image_size=size, n_synthetic=6):
        assert split.images.shape[1:] == (1, size, size), split.name
        assert split.attrs["image_size"] == size


def test_odd_n_synthetic_halves_differ_by_one():
    splits = {s.name: s for s in make_digits_benchmark(n_synthetic=7)}
    assert (len(splits["uniform_val"].labels), len(splits["uniform_test"].labels)) == (3, 4)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"holdout_classes": (10,)}, r"'generate\.holdout_classes'.*Got \(10,\)"),
        ({"holdout_classes": (-1,)}, r"'generate\.holdout_classes'"),
        ({"holdout_classes": ()}, r"'generate\.holdout_classes'.*non-empty"),
        ({"holdout_classes": (8, 8)}, r"'generate\.holdout_classes'.*distinct"),
        ({"holdout_classes": tuple(range(9))}, r"'generate\.holdout_classes'.*at least 2 ID"),
        ({"holdout_classes": 8}, r"'generate\.holdout_classes'.*Got 8 instead"),
        ({"holdout_classes": (8.0,)}, r"'generate\.holdout_classes'"),
        ({"holdout_classes": (True,)}, r"'generate\.holdout_classes'"),
        ({"val_fraction": 0}, r"'generate\.val_fraction'.*\(0, 1\)"),
        ({"val_fraction": 1.0}, r"'generate\.val_fraction'.*\(0, 1\)"),
        ({"val_fraction": "0.2"}, r"'generate\.val_fraction'"),
        ({"test_fraction": -0.1}, r"'generate\.test_fraction'.*\(0, 1\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"'generate\.val_fraction'.*1 - test"),
        ({"val_fraction": 0.001}, r"'generate\.val_fraction'.*at least 8"),
        ({"image_size": 7}, r"'generate\.image_size'.*int >= 8.*Got 7"),
        ({"image_size": 16.0}, r"'generate\.image_size'.*Got 16\.0"),
        ({"n_synthetic": 1}, r"'generate\.n_synthetic'.*int >= 2.*Got 1"),
        ({"seed": -1}, r"'generate\.seed'.*int >= 0"),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_digits_benchmark(**kwargs)


def test_parameter_error_names_the_owner():
    with pytest.raises(ConfigError, match=r"parameter of make_digits_benchmark must be"):
        make_digits_benchmark(image_size=4)


# ---------------------------------------------------------------- files


def test_save_load_round_trip_is_bit_identical(splits, tmp_path):
    for split in splits:
        path = save_split(split, tmp_path)
        assert path == tmp_path / f"{split.name}.npz"
        loaded = load_split(path)
        assert loaded.name == split.name
        assert loaded.images.dtype == np.float32 and loaded.labels.dtype == np.int64
        assert loaded.images.tobytes() == split.images.tobytes()
        assert loaded.images.shape == split.images.shape
        np.testing.assert_array_equal(loaded.labels, split.labels)
        assert loaded.attrs == split.attrs
        assert split_fingerprint(loaded) == split_fingerprint(split)


def test_split_file_needs_no_pickle(by_name, tmp_path):
    path = save_split(by_name["id_val"], tmp_path)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["attrs", "images", "labels", "name"]
        assert json.loads(str(npz["attrs"]))["role"] == "id"


def test_write_benchmark_and_manifest(splits, tmp_path):
    directory = write_benchmark(splits, tmp_path / "digits")
    manifest = read_manifest(directory)
    assert manifest["benchmark"] == "digits"
    assert list(manifest["splits"]) == sorted(s.name for s in splits)
    for split in splits:
        entry = manifest["splits"][split.name]
        assert entry["file"] == f"{split.name}.npz"
        assert entry["fingerprint"] == split_fingerprint(split)
        assert entry["role"] == split.attrs["role"]
        loaded = load_split(directory / entry["file"])
        assert split_fingerprint(loaded) == entry["fingerprint"]
    # Nothing but the finished directory is left next to it (and the empty staging area with the lock).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "digits"]
    assert [p.name for p in (tmp_path / ".staging").iterdir()] == ["digits.lock"]
    sealed = json.loads((directory / "layerscope.json").read_text())
    assert sealed["kind"] == "benchmark" and set(sealed["files"]) == {"manifest.json", *entries_files(manifest)}


def test_write_benchmark_replaces_an_earlier_benchmark(by_name, tmp_path):
    directory = tmp_path / "bench"
    write_benchmark([by_name["id_val"], by_name["faces_val"]], directory)
    write_benchmark([by_name["id_test"]], directory)
    assert sorted(p.name for p in directory.iterdir()) == ["id_test.npz", "layerscope.json", "manifest.json"]
    assert list(read_manifest(directory)["splits"]) == ["id_test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "bench"]


def test_write_benchmark_refuses_a_foreign_directory(by_name, tmp_path):
    directory = tmp_path / "precious"
    directory.mkdir()
    (directory / "thesis.tex").write_text("do not delete")
    with pytest.raises(OutputError, match=r"Refusing to replace .*precious.*not a benchmark written by layerscope"):
        write_benchmark([by_name["id_val"]], directory)
    assert (directory / "thesis.tex").read_text() == "do not delete"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


def test_interrupted_write_leaves_nothing_that_looks_complete(by_name, tmp_path, monkeypatch):
    calls = []

    def failing_save(split, directory):
        calls.append(split.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(split, directory)

    real_save = datasets.save_split
    monkeypatch.setattr(datasets, "save_split", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_benchmark([by_name["id_val"], by_name["id_test"]], tmp_path / "bench")
    assert [p.name for p in tmp_path.iterdir()] == [".staging"]
    assert [p.name for p in (tmp_path / ".staging").iterdir()] == ["bench.lock"]
    with pytest.raises(DataError, match=r"Benchmark directory '.*bench' does not exist"):
        read_manifest(tmp_path / "bench")


def entries_files(manifest):
    return {entry["file"] for entry in manifest["splits"].values()}


def test_an_old_unsealed_benchmark_is_replaced_but_refused_on_read(by_name, tmp_path):
    directory = tmp_path / "bench"
    directory.mkdir()
    (directory / "manifest.json").write_text('{"benchmark": "digits", "splits": {}}')  # before seals existed
    with pytest.raises(IntegrityError, match=r"benchmark '.*bench' has no layerscope\.json.*"
                                             r"Hint: run `dvc repro generate`"):
        check_benchmark(directory)
    write_benchmark([by_name["id_val"]], directory)
    assert list(check_benchmark(directory)["splits"]) == ["id_val"]


def _swap_in_val(directory, name):
    (directory / f"{name}.npz").write_bytes((directory / "id_val.npz").read_bytes())


def _flip_a_byte(directory, name):
    """The same size, other content: only the SHA-256 tells."""
    data = bytearray((directory / f"{name}.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / f"{name}.npz").write_bytes(bytes(data))


# Regression (issue 14): `id_test.npz` overwritten with `id_val.npz` was extracted as if nothing happened.
@pytest.mark.parametrize("change, problem", [
    (_swap_in_val, r"file 'id_test\.npz' has \d+ bytes, expected \d+"),
    (_flip_a_byte, r"file 'id_test\.npz' has been altered since generate wrote it"),
], ids=["id_val-copied-over-id_test", "one-byte-flipped"])
def test_a_split_file_changed_by_hand_is_refused(by_name, tmp_path, change, problem):
    directory = write_benchmark([by_name[n] for n in ("id_val", "id_test", "faces_test")], tmp_path / "bench")
    original = (directory / "id_test.npz").read_bytes()
    change(directory, "id_test")
    with pytest.raises(IntegrityError, match=rf"benchmark '.*bench' is damaged: {problem}.*Hint: run "
                                             r"`dvc repro generate` \(it restores the benchmark from the DVC cache"):
        check_benchmark(directory, ["id_test"])
    with pytest.raises(IntegrityError, match=problem):
        check_benchmark(directory)
    (directory / "id_test.npz").write_bytes(original)  # what `dvc checkout` (run by `dvc repro`) does
    assert set(check_benchmark(directory)["splits"]) == {"id_val", "id_test", "faces_test"}


def test_an_edited_manifest_is_refused(by_name, tmp_path):
    directory = write_benchmark([by_name["id_val"]], tmp_path / "bench")
    text = (directory / "manifest.json").read_text()
    (directory / "manifest.json").write_text(text.replace('"role": "id"', '"role": "ID"'))
    with pytest.raises(IntegrityError, match=r"file 'manifest\.json' has been altered"):
        check_benchmark(directory)
    (directory / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"Benchmark directory '.*' has no manifest.json.*Hint: run `layerscope "
                                        r"generate`"):
        check_benchmark(directory)


@pytest.mark.parametrize(
    "names, match",
    [([], "at least one split"), (["id_val", "id_val"], r"unique.*'id_val'")],
)
def test_write_benchmark_rejects_bad_split_lists(by_name, tmp_path, names, match):
    with pytest.raises(DataError, match=match):
        write_benchmark([by_name[n] for n in names], tmp_path / "bench")


def test_write_benchmark_rejects_mixed_benchmarks(by_name, tmp_path):
    split = by_name["id_val"]
    other = ImageSplit("other", split.images, split.labels, {**split.attrs, "benchmark": "cifar"})
    with pytest.raises(DataError, match="different benchmarks"):
        write_benchmark([split, other], tmp_path / "bench")


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_save_split_rejects_unsafe_names(by_name, tmp_path, name):
    split = by_name["id_val"]
    with pytest.raises(DataError, match="cannot be used as a file name"):
        save_split(ImageSplit(name, split.images, split.labels, split.attrs), tmp_path)


def test_load_split_missing_file(tmp_path):
    path = tmp_path / "id_train.npz"
    with pytest.raises(DataError, match=r"id_train\.npz' does not exist.*layerscope generate"):
        load_split(path)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _valid_arrays(split):
    return {
        "name": np.array(split.name),
        "images": split.images,
        "labels": split.labels,
        "attrs": np.array(json.dumps(split.attrs)),
    }


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda a: a.pop("labels"), r"missing arrays \['labels'\]"),
        (lambda a: a.update(images=a["images"].astype(np.float64)), "images must be float32"),
        (
            lambda a: a.update(images=a["images"][:, 0]),
            r"images must be float32 of shape \(n, C, S, S\), got float32 \(100, 16, 16\)",
        ),
        (lambda a: a.update(labels=a["labels"].astype(np.int32)), "labels must be int64"),
        (lambda a: a.update(labels=a["labels"][:-1]), "labels must be int64 of shape"),
        (lambda a: a.update(attrs=np.array("{not json")), "attrs are not valid JSON"),
        (lambda a: a.update(attrs=np.array("[1, 2]")), "attrs must be a JSON object"),
        (lambda a: a.update(attrs=np.array('{"role": "id"}')), "attrs must be a JSON object"),
    ],
)
def test_load_split_malformed_arrays(by_name, tmp_path, corrupt, match):
    arrays = _valid_arrays(by_name["faces_val"])
    corrupt(arrays)
    path = _write_npz(tmp_path / "faces_val.npz", **arrays)
    with pytest.raises(DataError, match=r"faces_val\.npz' is malformed: " + match):
        load_split(path)


def test_load_split_not_an_archive(tmp_path):
    path = tmp_path / "id_val.npz"
    path.write_text("hello, I am not a zip file")
    with pytest.raises(DataError, match=r"id_val\.npz' is malformed: not a readable .npz.*Hint"):
        load_split(path)


def test_load_split_truncated_archive(by_name, tmp_path):
    path = save_split(by_name["id_val"], tmp_path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=r"id_val\.npz' is malformed"):
        load_split(path)


def test_load_split_plain_npy(tmp_path):
    path = tmp_path / "id_val.npz"
    with path.open("wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match="single .npy array"):
        load_split(path)


def test_load_split_refuses_pickled_objects(by_name, tmp_path):
    arrays = _valid_arrays(by_name["faces_val"])
    arrays["attrs"] = np.array([{"role": "id"}], dtype=object)
    path = _write_npz(tmp_path / "faces_val.npz", **arrays)
    with pytest.raises(DataError, match=r"is malformed: an array cannot be read"):
        load_split(path)


def test_read_manifest_says_what_is_there_instead(tmp_path):
    with pytest.raises(DataError, match=r"Benchmark directory '.*nowhere' does not exist.*dvc repro generate"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"'.*empty' is an empty directory: it is not a complete benchmark"):
        read_manifest(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"'.*file' is a file, not a directory"):
        read_manifest(tmp_path / "file")


@pytest.mark.parametrize(
    "text, match", [("{oops", "not valid JSON"), ('{"benchmark": "digits"}', "expected keys")]
)
def test_read_manifest_malformed(tmp_path, text, match):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=match):
        read_manifest(tmp_path)


# ---------------------------------------------------------------- torch


def test_split_dataset_items(by_name):
    split = by_name["id_test"]
    dataset = SplitDataset(split)
    assert len(dataset) == len(split.labels)
    image, label = dataset[5]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert image.shape == (1, 16, 16)
    assert isinstance(label, int) and label == int(split.labels[5])
    np.testing.assert_array_equal(image.numpy(), split.images[5])


def test_split_dataset_with_dataloader(by_name):
    split = by_name["uniform_val"]
    loader = torch.utils.data.DataLoader(SplitDataset(split), batch_size=64)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (len(split.labels), 1, 16, 16)
    assert labels.dtype == torch.int64 and bool((labels == -1).all())


def test_split_dataset_accepts_read_only_arrays(by_name):
    split = by_name["faces_val"]
    images = split.images.copy()
    images.setflags(write=False)
    image, _ = SplitDataset(ImageSplit(split.name, images, split.labels, split.attrs))[0]
    assert torch.equal(image, torch.from_numpy(split.images[0].copy()))

