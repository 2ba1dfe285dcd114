"""Inputs DVC cannot see (issue 14): real `dvc status` and `dvc commit` on a copy of the project in a temporary git repo.

Each case was reproduced on the old main, where it went unnoticed or reran too much:

* ``train.checkpoint`` overwritten in place: `dvc status` said up to date, `dvc repro` skipped everything.
* a file under ``generate.root`` changed, same size: nothing noticed; the hint of the size check did nothing.
* ``generate.root`` pointed at an identical copy: generate, train and extract reran.
* ``id_test.npz`` overwritten with ``id_val.npz``: extracted as if nothing happened.

Now the always-changed ``inputs`` stage fingerprints them by content and
``generate``/``train`` depend on its output, and readers check the benchmark's
seal. CI keeps one real `dvc repro` path, ``tests/test_e2e_dvc.py`` (where the
last case runs, on its digits project: its fix is `dvc repro generate` and the
run cache). Here no `dvc repro` runs: :meth:`Repo.catch_up` does what it would,
one decision at a time and each DVC's own. It asks `dvc status` (DVC's Python
API, the code behind the command) which stages are stale, runs the first one's
own command from ``dvc.yaml`` in this process (its `layerscope` command line),
records it with `dvc commit`, and asks again, until only ``inputs`` (always
changed) is left. The stages it ran are what `dvc repro` would have run. The
pipeline stops after ``extract`` to stay fast.
"""

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models import init_model
from tests.conftest import kept_thread_counts
from tests.test_e2e_dvc import copy_project

EXTRACT = {"layers": ["layer1", "fc"], "grad_layers": [], "maps": [], "images": False, "batch_size": 16,
           "chunk_rows": 16, "shard_rows": 32, "device": "cpu", "gram": None, "odin": None, "rankfeat": None}
SPEC = {"arch": "cifar_resnet", "widths": [4, 8], "blocks": [1, 1]}
STAGES = ["inputs", "generate", "train", "extract"]  # dvc.yaml's order, up to extract

pytestmark = [pytest.mark.e2e,  # DVC's own, from its Python API: nothing this project can act on
              pytest.mark.filterwarnings("ignore:_NoneStep.value will soon raise:DeprecationWarning")]
runner = CliRunner()


class Repo:
    """A copy of the project in a temporary git repo, its own hash cache, and DVC's view of it."""

    def __init__(self, path, cache):
        self.path, self.cache = path, cache

    @contextlib.contextmanager
    def inside(self):
        """The repo as the working directory, and its private hash cache (what `dvc repro` would give a stage)."""
        before = os.environ.get("LAYERSCOPE_HASH_CACHE")
        os.environ["LAYERSCOPE_HASH_CACHE"] = str(self.cache)
        try:
            with contextlib.chdir(self.path):
                yield
        finally:
            if before is None:
                os.environ.pop("LAYERSCOPE_HASH_CACHE")
            else:
                os.environ["LAYERSCOPE_HASH_CACHE"] = before

    def git(self, *args):
        proc = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=self.path,
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.fail(f"git {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def commit(self, message):
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def status(self, target="extract"):
        """`dvc status --with-deps <target>`: ``{stage: its entries}`` (e.g. ``['always changed']``)."""
        from dvc.repo import Repo as Dvc

        with self.inside(), Dvc(".") as dvc:
            return dvc.status(targets=[target], with_deps=True)

    def layerscope(self, *argv):
        """``layerscope <argv>`` in this process, in the repo; the click result. The process's thread pools are
        as they were after (a stage sizes them; module-scoped setup is outside the per-test fixture that resets)."""
        with self.inside(), kept_thread_counts():
            return runner.invoke(app, list(argv))

    def stage(self, name):
        """Run stage ``name``'s own command (from dvc.yaml), then record it in dvc.lock as `dvc repro` does."""
        from dvc.repo import Repo as Dvc

        if not hasattr(self, "commands"):  # dvc.yaml's commands, its vars resolved: the tests never edit it
            with self.inside(), Dvc(".") as dvc:
                self.commands = {stage.name: stage.cmd for stage in dvc.index.stages}
        program, *argv = shlex.split(self.commands[name])
        assert program == "layerscope", self.commands[name]
        result = self.layerscope(*argv)
        assert result.exit_code == 0, f"{self.commands[name]}:\n{result.output}"
        with self.inside(), Dvc(".") as dvc:
            dvc.commit(name, force=True)

    def catch_up(self, target="extract"):
        """What `dvc repro <target>` runs: ``inputs`` (always), then each stage DVC finds stale, in pipeline order."""
        self.stage("inputs")
        ran = {"inputs"}
        while stale := [name for name in STAGES[1:] if name in (status := self.status(target))]:
            assert stale[0] not in ran, f"{stale[0]} is still stale after it ran: {status}"
            self.stage(stale[0])
            ran.add(stale[0])
        return ran

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
    repo.git("init", "-q")
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


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A `sources` benchmark over PNG folders outside the repo, a user checkpoint, the pipeline run up to extract."""
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
    assert repo.catch_up() == {"inputs", "generate", "train", "extract"}
    repo.commit("the pipeline up to extract")
    repo.tmp = tmp
    return repo


def test_an_unchanged_pipeline_reruns_only_the_fingerprint(sources):
    status = sources.status()
    assert set(status) == {"inputs"} and "always changed" in status["inputs"]
    assert sources.catch_up() == {"inputs"}
    manifest = (sources.path / "data/benchmark/manifest.json").read_text()
    assert str(sources.tmp) not in manifest and "root" not in json.loads(manifest)["splits"]["ood_test"]["loader"]


def test_an_identical_copy_under_another_root_reruns_nothing(sources):
    moved = sources.tmp / "elsewhere" / "mount"
    # the old root is gone: the stages rerun by the next tests read the data from the new one (params)
    shutil.move(sources.tmp / "raw", moved)
    sources.set_params("generate", root=str(moved))
    assert set(sources.status()) == {"inputs"}
    assert sources.catch_up() == {"inputs"}
    sources.commit("moved root")


def test_checkpoint_overwritten_in_place_reruns_train_and_extract(sources):
    from pipeline.store import open_store

    user = sources.tmp / "user.pt"
    size = user.stat().st_size
    save_checkpoint(user, 1, 3, 3)  # other weights, same file, same size
    assert user.stat().st_size == size
    assert set(sources.status()) == {"inputs"}  # was "Data and pipelines are up to date."
    sources.stage("inputs")  # `dvc repro inputs`
    status = sources.status()  # once the fingerprint is refreshed, status names the stage the input feeds
    assert status == {"inputs": ["always changed"],
                      "train": [{"changed deps": {"data/inputs/train.json": "modified"}}]}, status
    assert sources.catch_up() == {"inputs", "train", "extract"}
    assert open_store(sources.path / "cache/features.zarr").provenance["model_origin"]["sha256"] == sha256(user)
    sources.commit("new checkpoint")


def test_a_same_size_edit_under_the_root_reruns_generate_and_what_follows(sources):
    png = sources.tmp / "elsewhere/mount/ood/a/0.png"
    size = png.stat().st_size
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(png, compress_level=0)
    assert png.stat().st_size == size
    # extract run by hand notices it too, in one line whose hint reruns generate
    result = sources.layerscope("extract", "--out", "elsewhere.zarr")
    error = result.stderr.strip()
    assert result.exit_code == 2 and len(error.splitlines()) == 1, error
    assert "split 'ood_" in error and "changed since generate" in error and "`dvc repro generate`" in error, error
    assert sources.catch_up("generate") == {"inputs", "generate"}  # the hint's command
    status = sources.status()
    assert set(status) == {"inputs", "train", "extract"} and "data/benchmark" in str(status["extract"]), status
    assert sources.catch_up() == {"inputs", "train", "extract"}  # train too: its dep data/benchmark changed
    sources.commit("edited ood image")
