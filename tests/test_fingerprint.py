"""Tests of pipeline.fingerprint: content digests, the stat-keyed hash cache, and the `inputs` stage.

Issue 14: an in-place overwrite of an input (same size or not) must change the
fingerprint, an identical copy under another root must not, and a large root
must not be read again when nothing changed.
"""

import json
import os
import shutil
import sqlite3

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import GenerateConfig, TrainConfig, build_config
from pipeline.errors import DataError
from pipeline.fingerprint import (CACHE_ENV, HashCache, default_cache_path, digest_files, generate_inputs,
                                  train_inputs, weights_file)
from tests import fakedata

runner = CliRunner()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every default HashCache of these tests lives in tmp_path."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache" / "hashes.sqlite3"))


def _tree(base, files):
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return sorted(files)


def _age(path, seconds=60):
    """Set mtime in the past (ctime stays now: a cache with racy_seconds=0 is needed to store it)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


FILES = {"a/1.png": b"one", "a/2.png": b"two", "b/3.png": b"three"}


def test_digest_is_the_content_and_the_relative_names_not_the_location(tmp_path):
    names = _tree(tmp_path / "here", FILES)
    _tree(tmp_path / "there/deeper", FILES)
    here = digest_files(tmp_path / "here", names)
    assert here == digest_files(tmp_path / "there/deeper", names) == digest_files(tmp_path / "here", names[::-1])
    assert here["files"] == 3 and here["bytes"] == 11
    os.symlink(tmp_path / "here", tmp_path / "link")
    assert digest_files(tmp_path / "link", names) == here
    (tmp_path / "here/a/2.png").rename(tmp_path / "here/a/4.png")
    assert digest_files(tmp_path / "here", ["a/1.png", "a/4.png", "b/3.png"])["sha256"] != here["sha256"]


def test_the_cache_serves_unchanged_files_and_rereads_touched_ones(tmp_path):
    names = _tree(tmp_path / "d", FILES)
    with HashCache(tmp_path / "h.db", racy_seconds=0) as cache:
        first = digest_files(tmp_path / "d", names, cache)
        assert (cache.hits, cache.misses) == (0, 3)
        assert digest_files(tmp_path / "d", names, cache) == first
        assert (cache.hits, cache.misses) == (3, 3)
        _age(tmp_path / "d/a/1.png")  # a touch: same bytes, new stat
        assert digest_files(tmp_path / "d", names, cache) == first
        assert (cache.hits, cache.misses) == (5, 4)
    with HashCache(tmp_path / "h.db", racy_seconds=0) as reopened:  # persisted
        assert digest_files(tmp_path / "d", names, reopened) == first and reopened.misses == 0


# Regression (issue 14): changing the bytes of a file under generate.root (same size) went unnoticed.
def test_a_same_size_rewrite_misses_the_cache_even_with_its_old_mtime_restored(tmp_path):
    names = _tree(tmp_path / "d", FILES)
    path = tmp_path / "d/b/3.png"
    with HashCache(tmp_path / "h.db", racy_seconds=0) as cache:
        before = digest_files(tmp_path / "d", names, cache)
        st = os.stat(path)
        path.write_bytes(b"THREE")  # same size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or a coarse clock would leave it
        after = digest_files(tmp_path / "d", names, cache)
    assert after["sha256"] != before["sha256"] and after["bytes"] == before["bytes"] and cache.misses == 4


def test_files_written_just_now_are_hashed_but_not_remembered(tmp_path):
    """A write in the same timestamp tick as the hash would keep the stat: such entries are never stored."""
    names = _tree(tmp_path / "d", FILES)
    with HashCache(tmp_path / "h.db") as cache:  # default racy window
        first = digest_files(tmp_path / "d", names, cache)
        path = tmp_path / "d/a/1.png"
        path.write_bytes(b"ONE")  # immediately, same size
        assert digest_files(tmp_path / "d", names, cache)["sha256"] != first["sha256"]
        assert cache.hits == 0 and cache.misses == 6
    rows = sqlite3.connect(tmp_path / "h.db").execute("SELECT count(*) FROM sha256").fetchone()
    assert rows == (0,)


@pytest.mark.parametrize("spoil", ["directory", "garbage"])
def test_an_unusable_cache_only_costs_time(tmp_path, spoil, caplog):
    names = _tree(tmp_path / "d", FILES)
    expected = digest_files(tmp_path / "d", names, HashCache(tmp_path / "fine.db"))
    bad = tmp_path / "bad.db"
    if spoil == "directory":
        bad.mkdir()
    else:
        bad.write_bytes(b"not a database" * 100)
    with HashCache(bad) as cache:
        assert digest_files(tmp_path / "d", names, cache) == expected
    assert "hash cache" in caplog.text and "hashing" in caplog.text


def test_a_vanished_file_is_a_one_line_error(tmp_path):
    _tree(tmp_path / "d", FILES)
    with pytest.raises(DataError, match=r"Cannot read '.*gone\.png' to fingerprint it \(No such file"):
        digest_files(tmp_path / "d", ["a/1.png", "gone.png"])


def test_the_cache_lives_outside_the_repository_unless_told(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg/layerscope/hashes.sqlite3"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine.db"))
    assert default_cache_path() == tmp_path / "mine.db"


# ------------------------------------------------------------------ what the inputs stage writes

SOURCES = {
    "benchmark": "sources", "image_size": 8, "val_fraction": 0.5,
    "id_train": {"source": "cifar10", "part": "train"}, "id_test": {"source": "cifar10"},
    "near": {"mnist": {"source": "mnist"}},
    "far": {"texture": {"source": "imagefolder", "path": "texture"}, "colours": {"source": "constant", "n": 4}},
}


def _gen(root, **changes):
    return build_config(GenerateConfig, {**SOURCES, "root": str(root), **changes}, "generate")


def test_generate_inputs_hold_the_content_of_what_each_source_reads(tmp_path, rng):
    fakedata.write_sources(_gen(tmp_path / "raw"), rng, n=4)
    found = generate_inputs(_gen(tmp_path / "raw"))
    assert "root" not in found["params"] and found["params"]["far"]["texture"]["path"] == "texture"
    data = found["data"]
    assert list(data) == ["cifar10:test", "cifar10:train", "imagefolder:texture", "mnist:test"]  # no constant
    assert {k: (v["location"], v["files"], v["missing"]) for k, v in data.items()} == {
        "cifar10:test": ("cifar-10-batches-py", 2, []),  # test_batch + batches.meta
        "cifar10:train": ("cifar-10-batches-py", 6, []),
        "imagefolder:texture": ("texture", 4, []),
        "mnist:test": ("MNIST/raw", 2, []),
    }
    assert str(tmp_path) not in json.dumps(found)


def test_an_identical_copy_elsewhere_gives_identical_inputs_and_an_edit_does_not(tmp_path, rng):
    fakedata.write_sources(_gen(tmp_path / "raw"), rng, n=4)
    shutil.copytree(tmp_path / "raw", tmp_path / "mnt/copy")
    before = generate_inputs(_gen(tmp_path / "raw"))
    assert generate_inputs(_gen(tmp_path / "mnt/copy")) == before
    batch = tmp_path / "raw/cifar-10-batches-py/test_batch"
    data = bytearray(batch.read_bytes())
    data[-1] ^= 1  # same size
    batch.write_bytes(bytes(data))
    after = generate_inputs(_gen(tmp_path / "raw"))
    assert [k for k in before["data"] if before["data"][k] != after["data"][k]] == ["cifar10:test"]
    assert after["params"] == before["params"]
    assert generate_inputs(_gen(tmp_path / "raw", seed=1))["params"]["seed"] == 1


def test_absent_data_is_recorded_as_absent(tmp_path, rng):
    (tmp_path / "raw/cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "raw/cifar-10-batches-py/batches.meta").write_bytes(b"meta")
    data = generate_inputs(_gen(tmp_path / "raw", download=True))["data"]
    assert data["cifar10:test"]["missing"] == ["test_batch"] and data["cifar10:test"]["files"] == 1
    assert data["cifar10:train"]["missing"] == [f"data_batch_{i}" for i in range(1, 6)]
    assert data["imagefolder:texture"]["missing"] == ["."] and data["imagefolder:texture"]["files"] == 0
    assert data["mnist:test"]["missing"] == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def test_digits_reads_no_external_file():
    found = generate_inputs(build_config(GenerateConfig, {"root": "/nowhere"}, "generate"))
    assert found["data"] == {} and found["params"]["benchmark"] == "digits"
    assert found == generate_inputs(build_config(GenerateConfig, {"root": "/elsewhere"}, "generate"))


# Regression (issue 14): overwriting train.checkpoint in place went unnoticed by `dvc status`.
def test_train_inputs_follow_the_checkpoint_content_not_its_path(tmp_path):
    cfg = build_config(TrainConfig, {"checkpoint": str(tmp_path / "user.pt")}, "train")
    assert train_inputs(cfg) == {"checkpoint": {"missing": True}, "weights": None}
    torch.save({"w": torch.zeros(3)}, tmp_path / "user.pt")
    first = train_inputs(cfg)
    torch.save({"w": torch.ones(3)}, tmp_path / "user.pt")  # in place, same size
    second = train_inputs(cfg)
    assert first["checkpoint"]["bytes"] == second["checkpoint"]["bytes"]
    assert first["checkpoint"]["sha256"] != second["checkpoint"]["sha256"]
    assert str(tmp_path) not in json.dumps(second)
    assert train_inputs(build_config(TrainConfig, {}, "train")) == {"checkpoint": None, "weights": None}


def test_train_inputs_hash_the_file_torchvision_caches_for_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = build_config(TrainConfig, {"arch": "resnet50_imagenet", "weights": "IMAGENET1K_V1"}, "train")
    path = weights_file("resnet50_imagenet", "IMAGENET1K_V1")
    assert path.parent == tmp_path / "torch/hub/checkpoints" and path.name.startswith("resnet50-")
    assert train_inputs(cfg)["weights"] == {"name": "IMAGENET1K_V1", "file": path.name, "missing": True}
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    assert train_inputs(cfg)["weights"]["bytes"] == 7
    assert weights_file("resnet50_imagenet", "NOPE") is None and weights_file("cifar_resnet", "DEFAULT") is None


def test_the_inputs_command_writes_both_files_deterministically(tmp_path, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fakedata.write_sources(_gen(tmp_path / "raw"), rng, n=4)
    torch.save({"w": torch.zeros(3)}, tmp_path / "user.pt")
    params = {"generate": {**SOURCES, "root": str(tmp_path / "raw")}, "train": {"checkpoint": "user.pt"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["inputs", "--generate", "in/generate.json", "--train", "in/train.json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    first = {name: (tmp_path / "in" / name).read_bytes() for name in ("generate.json", "train.json")}
    assert json.loads(first["train.json"])["checkpoint"]["bytes"] > 0
    shutil.move(tmp_path / "raw", tmp_path / "moved")
    params["generate"]["root"] = str(tmp_path / "moved")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert runner.invoke(app, args).exit_code == 0
    assert {name: (tmp_path / "in" / name).read_bytes() for name in first} == first
    result = runner.invoke(app, ["inputs", "--generate", "in", "--train", "in/train.json"])
    assert result.exit_code == 2 and "--generate 'in' is a directory" in result.output
