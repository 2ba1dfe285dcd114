"""A small built project for the bad-input battery: every artifact a command reads, made by the real stages.

The project is a copy of the repository's pipeline files with a shrunken
``params.yaml``; :func:`build_project` runs each stage through the CLI, as a
user would, so every artifact on disk (benchmark, checkpoint, store, detectors,
thresholds, metrics, leaderboard) is the real thing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pipeline", "stages", "configs", "dvc.yaml", "params.yaml"]

TINY = {
    "generate": {"benchmark": "digits", "seed": 0, "image_size": 12, "holdout_classes": [8, 9],
                 "val_fraction": 0.2, "test_fraction": 0.2, "n_synthetic": 40},
    "train": {"arch": "cifar_resnet", "widths": [4, 8, 8], "blocks": [1, 1, 1], "epochs": 1, "batch_size": 64,
              "seed": 0, "device": "cpu"},
    "extract": {"layers": ["layer1", "layer2", "layer3", "avgpool", "fc"], "head": "fc", "batch_size": 128,
                "device": "cpu", "chunk_rows": 64, "shard_rows": 128},
    "fit": {"detectors": {"knn": {"n_neighbors": 5}, "mahalanobis": {}}, "standardize": True, "seed": 0},
    "detect": {"methods": {"msp": {}, "ebo": {"temperature": 1.0}, "vim": {}}, "aggregations": ["max_z", "mean_z"],
               "recall": 0.95, "figures": False},
    "search": {"metric": "auroc", "n_jobs": 1, "top": 5,
               "methods": {"knn": {"n_neighbors": [1, 5]}, "ebo": {"temperature": [1.0, 2.0]}}},
    "calibrate": {"detector": "mahalanobis", "layers": ["layer1", "layer2", "layer3"], "target_tpr": 0.95},
    "compute": {"scheduler": "threads", "dashboard": False},
}

# the stages in pipeline order, as `dvc repro` would run them (paths from dvc.yaml's vars)
STAGES = [["generate"], ["train"], ["extract"], ["fit"], ["detect"], ["calibrate"], ["search"]]


@contextlib.contextmanager
def chdir(path):
    """Run a block inside ``path`` (the CLI's default paths are relative to the project root)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield Path(path)
    finally:
        os.chdir(before)


def build_project(directory: Path, invoke) -> Path:
    """Copy the pipeline files into ``directory``, shrink params.yaml, and run every stage with ``invoke``.

    ``invoke(argv)`` runs one CLI command and returns its click result.
    """
    for name in PROJECT_FILES:
        src, dst = ROOT / name, directory / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (directory / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    with chdir(directory):
        for argv in STAGES:
            result = invoke(argv)
            assert result.exit_code == 0, f"{argv}: {result.output}"
    return directory


def tree_digest(directory: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``directory`` (the project's state, for 'unchanged')."""
    digests = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digests[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests
