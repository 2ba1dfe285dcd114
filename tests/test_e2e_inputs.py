"""End to end (issue 14, "inputs DVC cannot see"): real `dvc status` / `dvc repro` in temporary git repos.

Each case was reproduced on the old main, where it went unnoticed or reran too much:

* ``train.checkpoint`` overwritten in place: `dvc status` said up to date, `dvc repro` skipped everything.
* a file under ``generate.root`` changed, same size: nothing noticed; the hint of the size check did nothing.
* ``generate.root`` pointed at an identical copy: generate, train and extract reran.
* ``id_test.npz`` overwritten with ``id_val.npz``: extracted as if nothing happened.

Now the always-changed ``inputs`` stage fingerprints them by content and
``generate``/``train`` depend on its output, and readers check the benchmark's
seal. The pipeline stops after ``extract`` (``dvc repro extract``) to stay fast.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.models import init_model
from tests.test_e2e_dvc import copy_project

EXTRACT = {"layers": ["layer1", "fc"], "grad_layers": [], "maps": [], "images": False, "batch_size": 16,
           "chunk_rows": 16, "shard_rows": 32, "device": "cpu", "gram": None, "odin": None, "rankfeat": None}
SPEC = {"arch": "cifar_resnet", "widths": [4, 8], "blocks": [1, 1]}

pytestmark = pytest.mark.e2e


def _env(cache):
    """The test's venv first on PATH (dvc runs its `layerscope`), and a private hash cache."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "LAYERSCOPE_HASH_CACHE": str(cache)}


class Repo:
    """A copy of the project in a temporary git repo, and how to run commands in it."""

    def __init__(self, path, cache):
        self.path, self.env = path, _env(cache)

    def run(self, *cmd, check=True):
        proc = subprocess.run(cmd, cwd=self.path, env=self.env, capture_output=True, text=True)
        if check and proc.returncode:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc if not check else proc.stdout + proc.stderr

    def repro(self, *targets):
        """The stages `dvc repro` ran."""
        return set(re.findall(r"Running stage '([\w-]+)'", self.run("dvc", "repro", *targets)))

    def status(self):
        """`dvc status --with-deps extract` (the stages up to extract) as ``{stage: text of its entry}``."""
        out = self.run("dvc", "status", "--with-deps", "extract")
        return {m.group(1): m.group(2) for m in re.finditer(r"^([\w-]+):\n((?:\t.*\n?)*)", out, flags=re.M)}

    def commit(self, message):
        self.run("git", "add", "-A")
        self.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)

    def set_params(self, section, **values):
        path = self.path / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params[section].update(values)
        path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(path, cache, **sections):
    copy_project(path)
    repo = Repo(path, cache)
    for section, values in sections.items():
        repo.set_params(section, **values)
    repo.run("git", "init", "-q")
    repo.commit("project")
    return repo


def write_pngs(directory, classes, per_class, seed):
    """Uncompressed PNGs (compress_level=0): any edit of the pixels keeps the file size."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (directory / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(directory / c / f"{i}.png",
                                                                                   compress_level=0)


def save_checkpoint(path, seed, in_channels, num_classes):
    """A user's state_dict for cifar_resnet (what train.checkpoint names); its size depends on the shapes only."""
    torch.save(init_model({**SPEC, "in_channels": in_channels, "num_classes": num_classes}, seed).state_dict(), path)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------ a sources benchmark (image folders)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A `sources` benchmark over PNG folders outside the repo, a user checkpoint, `dvc repro extract` done."""
    tmp = tmp_path_factory.mktemp("inputs")
    raw = tmp / "raw"
    write_pngs(raw / "train", ["c0", "c1", "c2"], 4, seed=0)
    write_pngs(raw / "test", ["c0", "c1", "c2"], 4, seed=1)
    write_pngs(raw / "ood", ["a", "b"], 4, seed=2)
    save_checkpoint(tmp / "user.pt", 0, 3, 3)
    generate = {"benchmark": "sources", "root": str(raw), "image_size": 8, "channels": 3, "val_fraction": 0.5,
                "id_train": {"source": "imagefolder", "path": "train"},
                "id_test": {"source": "imagefolder", "path": "test"},
                "far": {"ood": {"source": "imagefolder", "path": "ood"}}}
    train = {**SPEC, "checkpoint": str(tmp / "user.pt"), "device": "cpu"}
    repo = make_repo(tmp / "project", tmp / "hashes.sqlite3", generate=generate, train=train, extract=EXTRACT)
    assert repo.repro("extract") == {"inputs", "generate", "train", "extract"}
    repo.commit("dvc repro extract")
    repo.tmp = tmp
    return repo


def test_an_unchanged_pipeline_reruns_only_the_fingerprint(sources):
    status = sources.status()
    assert set(status) == {"inputs"} and "always changed" in status["inputs"]
    assert sources.repro("extract") == {"inputs"}
    manifest = (sources.path / "data/benchmark/manifest.json").read_text()
    assert str(sources.tmp) not in manifest and "root" not in json.loads(manifest)["splits"]["ood_test"]["loader"]


def test_an_identical_copy_under_another_root_reruns_nothing(sources):
    moved = sources.tmp / "elsewhere" / "mount"
    # the old root is gone: the stages rerun by the next tests read the data from the new one (params)
    shutil.move(sources.tmp / "raw", moved)
    sources.set_params("generate", root=str(moved))
    assert set(sources.status()) == {"inputs"}
    assert sources.repro("extract") == {"inputs"}
    sources.commit("moved root")


def test_checkpoint_overwritten_in_place_reruns_train_and_extract(sources):
    from pipeline.store import open_store

    user = sources.tmp / "user.pt"
    size = user.stat().st_size
    save_checkpoint(user, 1, 3, 3)  # other weights, same file, same size
    assert user.stat().st_size == size
    assert set(sources.status()) == {"inputs"}  # was "Data and pipelines are up to date."
    assert sources.repro("inputs") == {"inputs"}
    status = sources.status()  # once the fingerprint is refreshed, status names the stage the input feeds
    assert set(status) == {"inputs", "train"} and "modified:" in status["train"] and "train.json" in status["train"]
    assert sources.repro("extract") == {"inputs", "train", "extract"}
    assert open_store(sources.path / "cache/features.zarr").provenance["model_origin"]["sha256"] == sha256(user)
    sources.commit("new checkpoint")


def test_a_same_size_edit_under_the_root_reruns_generate_and_what_follows(sources):
    png = sources.tmp / "elsewhere/mount/ood/a/0.png"
    size = png.stat().st_size
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(png, compress_level=0)
    assert png.stat().st_size == size
    # extract run by hand notices it too, in one line whose hint reruns generate
    proc = sources.run("layerscope", "extract", "--out", "elsewhere.zarr", check=False)
    error = proc.stderr.strip()
    assert proc.returncode == 2 and len(error.splitlines()) == 1, error
    assert "split 'ood_" in error and "changed since generate" in error and "`dvc repro generate`" in error, error
    assert sources.repro("generate") == {"inputs", "generate"}  # the hint's command
    status = sources.status()
    assert set(status) == {"inputs", "train", "extract"} and "data/benchmark" in status["extract"], status
    assert sources.repro("extract") == {"inputs", "train", "extract"}  # train too: its dep data/benchmark changed
    sources.commit("edited ood image")


# ------------------------------------------------------------------ the digits benchmark


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The default digits benchmark, `dvc repro generate` done (no model needed for this case)."""
    tmp = tmp_path_factory.mktemp("digits")
    repo = make_repo(tmp / "project", tmp / "hashes.sqlite3", generate={"n_synthetic": 20, "image_size": 8})
    assert repo.repro("generate") == {"inputs", "generate"}
    repo.commit("dvc repro generate")
    return repo


def test_a_split_file_swapped_by_hand_is_refused_and_dvc_repro_generate_restores_it(digits):
    data = digits.path / "data/benchmark"
    original = (data / "id_test.npz").read_bytes()
    shutil.copyfile(data / "id_val.npz", data / "id_test.npz")
    # train (like extract) opens the benchmark first: refused in one line, before any work
    proc = digits.run("layerscope", "train", "--model", "m.pt", "--metrics", "t.json", check=False)
    error = proc.stderr.strip()
    assert proc.returncode == 2 and "file 'id_test.npz' has" in error and "Hint: run `dvc repro generate`" in error
    assert len(error.splitlines()) == 1 and not (digits.path / "m.pt").exists(), error
    status = digits.run("dvc", "status", "--with-deps", "generate")
    assert "generate:" in status and "changed outs" in status and "modified:" in status, status
    out = digits.run("dvc", "repro", "generate")  # the hint's command: the run cache restores the benchmark
    assert "Stage 'generate' is cached - skipping run, checking out outputs" in out, out
    assert (data / "id_test.npz").read_bytes() == original
    assert digits.repro("generate") == {"inputs"}
