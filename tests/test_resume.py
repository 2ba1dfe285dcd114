"""SIGKILL `layerscope extract` at several points, rerun it, and get the same bits.

Guards the feature-store promise: an interrupted extraction resumes from its
last complete shard and the finished arrays are bit-identical to an
uninterrupted run (issue: resumable extraction).
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
import zarr

from pipeline.datasets import ImageSplit, write_benchmark
from pipeline.models import init_model, save_checkpoint
from pipeline.store import open_store
from tests.conftest import TINY_SPEC

EXTRACT = {"layers": ["layer1", "layer2", "fc"], "batch_size": 8, "chunk_rows": 8, "shard_rows": 16,
           "device": "cpu"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    splits = [ImageSplit(name, rng.random((n, 1, 8, 8), dtype=np.float32), np.full(n, -1, np.int64),
                         {"role": "far", "set": name, "part": "test", "source": "uniform noise",
                          "n_samples": n, "image_size": 8})
              for name, n in (("id_train", 250), ("a_test", 170), ("b_test", 90))]
    write_benchmark(splits, root / "data")
    save_checkpoint(init_model(TINY_SPEC, seed=0), TINY_SPEC, root / "model.pt")
    (root / "params.yaml").write_text(yaml.safe_dump({"extract": EXTRACT, "fit": {"detectors": {"knn": {}}}}))
    return root


def extract_cmd(project, out):
    return [sys.executable, "-m", "pipeline", "extract", "--params", str(project / "params.yaml"),
            "--data", str(project / "data"), "--model", str(project / "model.pt"), "--out", str(out)]


def shards_done(progress_file):
    try:
        return sum(len(v) for v in json.loads(progress_file.read_text())["splits"].values())
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def kill_after(cmd, progress_file, n_shards, timeout=120):
    """Start ``cmd``, SIGKILL it as soon as ``n_shards`` shards are recorded."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while shards_done(progress_file) < n_shards and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def assert_same_arrays(a, b):
    assert a.splits == b.splits and a.layers == b.layers
    for split in a.splits:
        for name in [*a.layers, "energy", "logits", "pred", "label"]:
            x, y = a.to_numpy(split, name), b.to_numpy(split, name)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f"{split}/{name} differs"


def assert_recorded_shards_are_written(progress_file, reference):
    """Every shard that progress.json records is in the staged store, whole: shards are written in the
    background, and one must be recorded only once all of its arrays are (else a resume would skip it)."""
    staged = zarr.open_group(progress_file.parent / "store.zarr", mode="r")
    rows = EXTRACT["shard_rows"]
    for split, shards in json.loads(progress_file.read_text())["splits"].items():
        for index in shards:
            start, stop = index * rows, min((index + 1) * rows, staged[split]["label"].shape[0])
            for name in [*reference.layers, "energy", "logits", "pred", "label"]:
                written, expected = staged[split][name][start:stop], reference.rows(split, name, start, stop)
                assert written.tobytes() == expected.tobytes(), f"shard {index} of {split}/{name} recorded, not written"


@pytest.fixture(scope="module")
def reference(project):
    out = project / "reference.zarr"
    subprocess.run(extract_cmd(project, out), check=True, capture_output=True)
    return open_store(out)


@pytest.mark.parametrize("n_shards", [9])  # kills at every phase, many times: tests/test_faults.py
def test_sigkill_then_rerun_is_bit_identical(project, reference, n_shards):
    out = project / f"killed{n_shards}.zarr"
    progress = project / ".staging" / out.name / "progress.json"
    returncode = kill_after(extract_cmd(project, out), progress, n_shards)
    assert returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    assert not out.exists(), "an interrupted store must not look complete"
    assert shards_done(progress) >= n_shards
    assert_recorded_shards_are_written(progress, reference)
    rerun = subprocess.run(extract_cmd(project, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming staged store" in rerun.stderr
    assert_same_arrays(open_store(out), reference)
    assert not progress.parent.exists(), "the staging directory is removed once the store is published"


def test_reader_refuses_the_killed_store_with_a_resume_hint(project):
    out = project / "refused.zarr"
    kill_after(extract_cmd(project, out), project / ".staging" / out.name / "progress.json", 3)
    result = subprocess.run([sys.executable, "-m", "pipeline", "fit", "--params", str(project / "params.yaml"),
                             "--features", str(out), "--out", str(project / "det")], capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "incomplete" in errors[0] and "resume" in errors[0]
    assert "Traceback" not in result.stderr
