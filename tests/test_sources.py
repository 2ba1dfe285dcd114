"""Tests of pipeline.sources: each data set is written in its own on-disk format
(tiny) and read back by the real torchvision loader. The only patch is the md5
check of CIFAR and SVHN files, which tiny files cannot pass."""

import os
import re
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.errors import ConfigError, DataError
from pipeline.fingerprint import IMG_EXTENSIONS
from pipeline.sources import EXPECTED_LAYOUT, SOURCES, capped_subset, data_signature, load_source, source_files
from tests import fakedata


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_HASH_CACHE", str(tmp_path / "hashes.sqlite3"))


def _check_items(dataset, images, labels, image_size=32):
    """Every item has the expected shape, range, pixels (at full size) and label."""
    assert len(dataset) == len(labels)
    for i in (0, len(labels) - 1):
        image, label = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (3, image_size, image_size)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert isinstance(label, int) and label == labels[i]
        expected = torch.from_numpy(images[i].astype(np.float32) / 255)
        if image_size == images.shape[-1]:
            torch.testing.assert_close(image, expected)
        else:
            assert abs(image.mean().item() - expected.mean().item()) < 0.03


@pytest.mark.parametrize("part", ["train", "test"])
def test_cifar10_reads_pickled_batches(tmp_path, rng, no_md5, part):
    written = fakedata.write_cifar10(tmp_path, rng)
    names = [f"data_batch_{i}" for i in range(1, 6)] if part == "train" else ["test_batch"]
    images = np.concatenate([written[name][0] for name in names])
    labels = sum((written[name][1] for name in names), [])
    _check_items(load_source("cifar10", root=tmp_path, part=part), images, labels)


def test_cifar100_reads_fine_labels(tmp_path, rng, no_md5):
    images, labels = fakedata.write_cifar100(tmp_path, rng)["test"]
    _check_items(load_source("cifar100", root=tmp_path), images, labels)


@pytest.mark.parametrize("part", ["train", "test"])
def test_svhn_reads_mat_files_and_maps_10_to_0(tmp_path, rng, no_md5, part):
    images, labels = fakedata.write_svhn(tmp_path, rng)[part]
    dataset = load_source("svhn", root=tmp_path, part=part)
    _check_items(dataset, images, labels)
    assert dataset[0][1] == 0


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_idx_sources_repeat_grey_to_rgb(tmp_path, rng, name, folder):
    images, labels = fakedata.write_idx(tmp_path, folder, rng)["test"]
    _check_items(load_source(name, root=tmp_path, image_size=28), images, labels, image_size=28)
    resized = load_source(name, root=tmp_path)
    _check_items(resized, images, labels, image_size=32)
    image = resized[0][0]
    torch.testing.assert_close(image[0], image[2])


def test_imagefolder_reads_class_folders(tmp_path, rng):
    images = fakedata.rgb(rng, n=4)
    for i, cls in enumerate(["classA", "classA", "classB", "classB"]):
        (tmp_path / "lsun" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].transpose(1, 2, 0)).save(tmp_path / "lsun" / cls / f"x{i}.png")
    _check_items(load_source("imagefolder", root=tmp_path, path="lsun"), images, [0, 0, 1, 1])
    _check_items(load_source("imagefolder", root=tmp_path, path=tmp_path / "lsun", image_size=16),
                 images, [0, 0, 1, 1], image_size=16)


def test_imagefolder_centre_crops_non_square_images(tmp_path):
    (tmp_path / "a").mkdir()
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255  # the centre third is white, the sides black
    Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
    image, _ = load_source("imagefolder", root=tmp_path, path=".", image_size=16)[0]
    assert image.shape == (3, 16, 16)
    assert image[:, :, 4:12].min() > 0.9


@pytest.mark.parametrize("channels", [1, 3])
def test_constant_is_one_seeded_colour_per_image(channels):
    dataset = load_source("constant", root="unused", n=7, seed=3, channels=channels, image_size=16)
    again = load_source("constant", root="unused", n=7, seed=3, channels=channels, image_size=16)
    other = load_source("constant", root="unused", n=7, seed=4, channels=channels, image_size=16)
    assert len(dataset) == 7
    image, label = dataset[2]
    assert image.shape == (channels, 16, 16) and image.dtype == torch.float32 and label == -1
    assert torch.equal(image, image[:, :1, :1].expand_as(image))
    assert torch.equal(image, again[2][0]) and not torch.equal(image, other[2][0])


def test_n_caps_a_file_source(tmp_path, rng, no_md5):
    fakedata.write_cifar10(tmp_path, rng)
    dataset = load_source("cifar10", root=tmp_path, part="train", n=8, seed=1)
    assert isinstance(dataset, torch.utils.data.Subset) and len(dataset) == 8


class _Sorted(torch.utils.data.Dataset):
    """100 items sorted by class: ten of class 0, then ten of class 1, ..."""

    def __len__(self):
        return 100

    def __getitem__(self, index):
        return torch.zeros(1), index // 10


def test_capped_subset_is_seeded_random_and_ascending():
    dataset = _Sorted()
    subset = capped_subset(dataset, 20, seed=0)
    assert subset.indices == capped_subset(dataset, 20, seed=0).indices
    assert subset.indices != capped_subset(dataset, 20, seed=1).indices
    assert subset.indices == sorted(subset.indices) and len(set(subset.indices)) == 20
    assert subset.indices != list(range(20))
    assert len({dataset[i][1] for i in subset.indices}) > 2  # not the first classes only
    assert capped_subset(dataset, 500, seed=0).indices == list(range(100))


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_capped_subset_rejects_bad_n(n):
    with pytest.raises(ConfigError, match="'n' parameter of capped_subset"):
        capped_subset(_Sorted(), n, seed=0)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "fashionmnist"])
def test_missing_files_raise_one_line_data_error(tmp_path, name):
    with pytest.raises(DataError, match=re.escape(f"'{name}'")) as info:
        load_source(name, root=tmp_path)
    message = str(info.value)
    assert EXPECTED_LAYOUT[name] in message and "pass download: true" in message
    assert "\n" not in message


def test_missing_cifar_batch_is_a_data_error_even_without_md5(tmp_path, rng, no_md5):
    fakedata.write_cifar10(tmp_path, rng)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match=re.escape("cifar-10-batches-py/{data_batch_1..5")):
        load_source("cifar10", root=tmp_path)


# ------------------------------------------------------------ checksums: the policy, on real md5 mismatches
# (no patching here: tiny files written in each format never have the official md5)

@pytest.mark.parametrize("name, write, official", [
    ("cifar10", fakedata.write_cifar10, "test_batch"),
    ("cifar100", fakedata.write_cifar100, "test"),
    ("svhn", fakedata.write_svhn, "test_32x32.mat"),
])
def test_a_copy_that_is_not_the_official_archive_is_refused_naming_file_md5s_and_switch(tmp_path, rng, name, write,
                                                                                        official):
    from pipeline.sources import ChecksumError

    write(tmp_path, rng)
    with pytest.raises(ChecksumError, match=rf"file '.*{re.escape(official)}' has md5 [0-9a-f]{{32}}, not the official "
                                            rf"archive's [0-9a-f]{{32}}.*Hint: set generate.verify_checksums: false"):
        load_source(name, root=tmp_path)


@pytest.mark.parametrize("name, write, part", [("cifar10", fakedata.write_cifar10, "test_batch"),
                                               ("cifar100", fakedata.write_cifar100, "test"),
                                               ("svhn", fakedata.write_svhn, "test")])
def test_verify_checksums_false_uses_the_copy_and_names_each_file_in_a_warning(tmp_path, rng, name, write, part,
                                                                               caplog):
    images, labels = write(tmp_path, rng)[part]
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        dataset = load_source(name, root=tmp_path, verify_checksums=False)
    _check_items(dataset, images, labels)
    assert "not the official" in caplog.text and "verify_checksums: false" in caplog.text


def test_a_cifar_copy_with_only_the_part_it_reads_is_enough(tmp_path, rng):
    """torchvision wants both parts' files; an OOD set read from the test part needs only the test batch."""
    images, labels = fakedata.write_cifar10(tmp_path, rng)["test_batch"]
    for i in range(1, 6):
        (tmp_path / "cifar-10-batches-py" / f"data_batch_{i}").unlink()
    _check_items(load_source("cifar10", root=tmp_path, part="test", verify_checksums=False), images, labels)


def test_missing_imagefolder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="'imagefolder'.*PATH/<class>/<image>.*point root \\(and path\\)"):
        load_source("imagefolder", root=tmp_path, path="isun")


def test_unknown_source_lists_available_names():
    with pytest.raises(ConfigError, match=re.escape(str(sorted(SOURCES)))):
        load_source("cifar11", root=".")


@pytest.mark.parametrize("kwargs, param", [
    ({"part": "val"}, "part"), ({"image_size": 0}, "image_size"), ({"channels": 2}, "channels"),
    ({"n": 0}, "n"), ({"name": "imagefolder"}, "path"),
])
def test_bad_arguments_raise_config_error(tmp_path, kwargs, param):
    kwargs = {"name": "mnist", **kwargs}
    with pytest.raises(ConfigError, match=f"'{param}' parameter of load_source"):
        load_source(kwargs.pop("name"), root=tmp_path, **kwargs)


# ------------------------------------------------------------------ source_files: what the inputs stage hashes

@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "fashionmnist"])
@pytest.mark.parametrize("part", ["train", "test"])
def test_source_files_are_all_a_loader_reads(tmp_path, rng, no_md5, name, part):
    """Emptying every file source_files does not list leaves the loader reading the same images.

    (Emptied, not deleted: torchvision's MNIST checks that the other part's files exist.)"""
    fakedata.WRITERS[name](tmp_path, rng, 4)
    before = load_source(name, root=tmp_path, part=part)
    found = source_files(name, tmp_path, part)
    assert found.missing == [] and found.files and not os.path.isabs(found.location)
    listed = {os.path.normpath(os.path.join(found.base, f)) for f in found.files}
    for path in tmp_path.rglob("*"):
        if path.is_file() and str(path) not in listed:
            path.write_bytes(b"")
    after = load_source(name, root=tmp_path, part=part)
    assert len(after) == len(before) == 4 * (5 if name == "cifar10" and part == "train" else 1)
    assert all(torch.equal(after[i][0], before[i][0]) for i in range(len(after)))


def test_source_files_of_an_imagefolder_are_its_samples(tmp_path, rng):
    fakedata.write_imagefolder(tmp_path / "tex", rng, per_class=2)
    (tmp_path / "tex/a/README.txt").write_text("not an image")
    found = source_files("imagefolder", tmp_path, path="tex")
    samples = load_source("imagefolder", root=tmp_path, path="tex").samples
    assert found.files == [os.path.relpath(p, tmp_path / "tex") for p, _ in samples] == [
        "a/0000.png", "a/0001.png", "b/0002.png", "b/0003.png"]
    assert (found.location, found.missing) == ("tex", [])
    assert source_files("imagefolder", tmp_path, path="nope").missing == ["."]
    assert source_files("cifar10", tmp_path, "test").missing == ["batches.meta", "test_batch"]
    assert source_files("constant", tmp_path).files == []
    assert IMG_EXTENSIONS == torchvision.datasets.folder.IMG_EXTENSIONS


def test_data_signature_is_content_based_and_root_free(tmp_path, rng):
    fakedata.write_imagefolder(tmp_path / "r1/tex", rng, per_class=2)
    shutil.copytree(tmp_path / "r1", tmp_path / "r2")
    sigs = [data_signature("imagefolder", tmp_path / r, "test", load_source("imagefolder", root=tmp_path / r,
                                                                             path="tex"), [0, 3], path="tex")
            for r in ("r1", "r2")]
    assert sigs[0] == sigs[1] and sigs[0]["files"] == 2
    path = tmp_path / "r2/tex/b/0003.png"
    data = bytearray(path.read_bytes())
    data[40] ^= 1
    path.write_bytes(bytes(data))
    changed = data_signature("imagefolder", tmp_path / "r2", "test",
                             load_source("imagefolder", root=tmp_path / "r2", path="tex"), [0, 3], path="tex")
    assert changed["bytes"] == sigs[0]["bytes"] and changed["sha256"] != sigs[0]["sha256"]
