"""End to end: real `dvc repro` on a copy of the project in a temporary git repo.

Checks the promise of the design: a `detect.*` change reruns only `detect`, a
`fit.*` change reruns `fit` and `detect`, and nothing short of a data, model or
extract change reruns `extract`. The project is built once (:func:`built_project`)
for this module and ``test_e2e_dvc_reruns.py`` (queued experiments; a forced,
killed and resumed rerun), which may run at the same time on another worker.
"""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.faults import differing, tree_bytes

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pipeline", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config",
                 ".dvc/.gitignore", ".dvcignore", ".gitignore"]
FAST = {  # the default pipeline, shrunk so the test takes seconds
    "generate": {"n_synthetic": 40, "image_size": 12},
    "train": {"epochs": 2, "widths": [8, 16, 16], "blocks": [1, 1, 1]},
    # the stage outputs only (not the first blocks): every method still has each kind of layer, and the
    # maps, grad layers and guarded layers of the default; about 30 shards, so a kill lands mid-store (smaller
    # ones multiply the store's files, which every DVC command walks and each queued experiment copies)
    "extract": {"layers": ["layer1", "layer2", "layer3", "avgpool", "fc"], "chunk_rows": 16, "shard_rows": 128,
                # one ODIN pair (detect's) and three Gram powers: each still extracted, stored and scored
                "odin": {"temperatures": [1000], "noises": [0.0014]}, "gram": {"layers": ["layer2", "layer3"],
                                                                              "powers": [1, 2, 3]}},
    "search": {"n_jobs": 2, "methods": {"nac_ue": {"alpha": [0.1, 10], "O": [5, 50], "M": [50]},
                                        "knn": {"n_neighbors": [1, 5]}, "scale": {"percentile": [60, 85]}}},
    "fit": {"detectors": {"knn": {"n_neighbors": 5}, "mahalanobis": {}, "ecod": {},
                          "iforest": {"n_estimators": 5, "random_state": 0}, "ocsvm": {}},
            "heatmap": {"fw_layers": 2, "epochs": 2, "n_aux": 40, "aux_sets": ["gaussian", "uniform", "textures"],
                        "width": 8}},
}

pytestmark = pytest.mark.e2e


def env():
    """The test's own venv first on PATH, so `dvc` runs `layerscope` from it."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(cmd, cwd, stderr=True):
    """Run ``cmd``; its stdout (and stderr, unless told not to), or fail the test with both."""
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + (proc.stderr if stderr else "")


def ran_stages(output):
    """The stages `dvc repro` ran, but `inputs`: always changed, it fingerprints the external inputs every time."""
    return set(re.findall(r"Running stage '([\w-]+)'", output)) - {"inputs"}


def edit_params(repo, section, key, value):
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(repo):
    """The project's code and pipeline files (what a clone holds), copied into ``repo``."""
    for name in PROJECT_FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def make_repo(repo):
    """The project, shrunk (FAST), committed in a new git repo at ``repo``."""
    repo.mkdir(parents=True)
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in FAST.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    # dvc exp commits experiments itself: give the repo an identity of its own
    run(["git", "config", "user.name", "layerscope tests"], repo)
    run(["git", "config", "user.email", "tests@layerscope.invalid"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "project"], repo)


def built_project(tmp_path_factory):
    """``(directory, output)``: the project after its first `dvc repro`, built once per test session.

    CI keeps one real `dvc repro` path, shared by two modules: this one and
    ``test_e2e_dvc_reruns.py`` (queued experiments, a forced, killed and resumed
    rerun), which pytest-xdist may run on two workers at once. The first to ask
    builds it, holding a file lock, in the session's temporary directory (the
    other waits for it); each module then works on a copy of its own.
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's, above each worker's own
    built, output = shared / "e2e-built-project", shared / "e2e-first-run.txt"
    with open(shared / "e2e-built-project.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not output.is_file():
            shutil.rmtree(built, ignore_errors=True)
            make_repo(built)
            output.write_text(first_repro(built))
    return built, output.read_text()


def first_repro(repo):
    """`dvc repro`'s output, with every stage's process listing the modules it imports (Python's import-time
    profile, on its stderr) right after DVC's "Running stage" line: one stream, in order."""
    proc = subprocess.run(["dvc", "repro"], cwd=repo, env={**env(), "PYTHONPROFILEIMPORTTIME": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        pytest.fail(f"dvc repro failed ({proc.returncode}):\n{proc.stdout[-20000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The built project, copied: this module's own (its tests change it). DVC's tmp/ (locks, state) is not."""
    built, _ = built_project(tmp_path_factory)
    repo = tmp_path_factory.mktemp("project")
    shutil.copytree(built, repo, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda where, names: ["tmp"] if Path(where) == built / ".dvc" else [])
    return repo


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """What the first `dvc repro` printed (it ran in the built project this module's repo is a copy of)."""
    return built_project(tmp_path_factory)[1]


def test_repro_runs_every_stage_and_reports_every_metric(repo, first_run):
    assert ran_stages(first_run) == {"generate", "train", "extract", "fit", "detect", "search", "calibrate", "guard"}
    metrics = json.loads((repo / "reports/detail.json").read_text())
    sets = {"digits89", "textures", "photos", "faces", "gaussian", "uniform", "constant"}
    for method in ("knn", "mahalanobis", "ecod", "iforest", "ocsvm", "energy"):
        for column in ("layer1", "fc", "max_z", "mean_z"):
            per = metrics["methods"][method][column]
            assert sets | {"near", "far"} <= set(per)
            assert set(per["textures"]) == {"auroc", "fpr@95", "aupr_in", "aupr_out"}
    for method in ("msp", "maxlogit", "ebo", "scale", "ash_p", "ash_b", "ash_s", "react", "vim", "nac_ue", "heatmap"):
        assert sets | {"near", "far"} <= set(metrics["methods"][method]["score"])
    # what DVC shows: the headline numbers, per method on the penultimate layer (avgpool; fc is the head)
    headline = json.loads((repo / "reports/metrics.json").read_text())
    assert headline["layer"] == "avgpool" and headline["recall"] == 0.95
    assert headline["mahalanobis"]["auroc_far"] == round(metrics["methods"]["mahalanobis"]["avgpool"]["far"]["auroc"], 6)
    assert set(headline) == {"id_accuracy", "recall", "layer", *metrics["methods"]}
    assert all(set(headline[m]) == {"auroc_near", "auroc_far", "fpr@95_near", "fpr@95_far"} for m in metrics["methods"])
    decoder = json.loads((repo / "cache/detectors/methods/heatmap/heatmap.json").read_text())
    assert len(decoder["history"]) == 2 and decoder["n_outliers"] == 40 and decoder["skip_layers"] == ["layer3", "layer2"]
    assert "heatmap/score" in (repo / "reports/per_layer.csv").read_text()
    assert {"layer1", "avgpool", "score"} <= set(metrics["methods"]["nac_ue"])
    assert 0.0 <= metrics["id_accuracy"] <= 1.0
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, stderr=False))
    flat = _flatten(next(iter(shown.values()))["data"]["reports/metrics.json"]["data"])
    methods = {key.split(".")[0] for key in flat} - {"id_accuracy", "recall", "layer"}
    assert "msp.fpr@95_far" in flat and len(flat) == 3 + 4 * len(methods), sorted(flat)  # 4 per method, not per set
    assert (repo / "reports/figures/knn/textures.png").stat().st_size > 1000
    assert (repo / "cache/features.zarr/zarr.json").is_file()


#: Modules no stage lists among its deps, as dvc.yaml's comment says: package docstrings, error messages.
NOT_DEPS = {"pipeline/__init__.py", "stages/__init__.py", "pipeline/errors.py"}


def test_every_module_a_stage_loads_is_one_of_its_deps(first_run):
    """DVC reruns a stage for a code change only if that code is a dep: every module each stage's process
    imported in the first `dvc repro` (lazy imports included) must be one of the stage's deps in dvc.yaml."""
    loaded = stage_imports(first_run)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(loaded) == set(stages) and all(f"stages.{name}" in loaded[name] for name in stages), loaded
    missing = {}
    for name, modules in loaded.items():
        deps = [d.rstrip("/") for d in stages[name]["deps"]]
        files = {module_file(module) for module in modules} - NOT_DEPS
        gap = sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in deps))
        if gap:
            missing[name] = gap
    assert missing == {}, f"loaded, but not among the stage's deps in dvc.yaml (add them): {missing}"


def stage_imports(output) -> dict:
    """``stage -> {module}``: the ``pipeline``/``stages`` modules each stage of :func:`first_repro` imported."""
    loaded, stage = {}, None
    for line in output.splitlines():
        if started := re.search(r"Running stage '([\w-]+)'", line):
            stage = started.group(1)
            loaded.setdefault(stage, set())
        elif stage and (module := re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*((?:pipeline|stages)(?:\.\w+)*)\s*$",
                                           line)):
            loaded[stage].add(module.group(1))
    return loaded


def module_file(module) -> str:
    """The repo-relative file of a ``pipeline``/``stages`` module: ``pkg/mod.py`` or ``pkg/sub/__init__.py``."""
    path = module.replace(".", "/")
    return f"{path}.py" if (ROOT / f"{path}.py").is_file() else f"{path}/__init__.py"


def without_checkpoint(repo, code, torch=False):
    """Run Python ``code`` in the repo with the checkpoint moved away; unless ``torch``, it must not import torch."""
    moved = repo / "model.pt.away"
    (repo / "cache/model.pt").rename(moved)
    check = "" if torch else "; assert 'torch' not in sys.modules, 'torch imported'"
    try:
        run([sys.executable, "-c", f"import sys; {code}{check}"], repo)
    finally:
        moved.rename(repo / "cache/model.pt")


DETECT = ("from stages import detect; detect.run('{params}', 'cache/features.zarr', 'cache/detectors', 'm.json', "
          "'t.csv', 'figs', 'a.json')")


def test_detect_never_loads_the_network(repo, first_run):
    # every post-hoc method scores from the store: without the checkpoint, and without even importing torch
    params = yaml.safe_load((repo / "params.yaml").read_text())
    del params["detect"]["methods"]["heatmap"]
    params["detect"]["figures"] = False  # figures have their own tests: this one is about what detect loads
    (repo / "posthoc.yaml").write_text(yaml.safe_dump(params))
    without_checkpoint(repo, DETECT.format(params="posthoc.yaml"))
    assert json.loads((repo / "m.json").read_text())["scale"]["auroc_far"] > 0.5
    # the heatmap decoder is a torch module, but not the classifier: it too scores without the checkpoint
    params["detect"]["methods"] = {"heatmap": {}}
    (repo / "posthoc.yaml").write_text(yaml.safe_dump(params))
    without_checkpoint(repo, DETECT.format(params="posthoc.yaml"), torch=True)
    assert json.loads((repo / "m.json").read_text())["heatmap"]["auroc_far"] > 0.5
    for name in ("m.json", "t.csv", "a.json", "posthoc.yaml"):
        (repo / name).unlink()
    shutil.rmtree(repo / "figs", ignore_errors=True)


def test_search_never_runs_the_network(repo, first_run):
    """Zero re-inference, proven: a full search over several methods with no checkpoint and no torch."""
    without_checkpoint(repo, "from stages import search; search.run('params.yaml', 'cache/features.zarr', 'srch')")
    board = json.loads((repo / "srch/leaderboard.json").read_text())["rows"]
    assert {r["method"] for r in board} == {"nac_ue", "knn", "scale"} and len(board) == 4 + 2 * 8 + 2
    assert sum(r["selected"] for r in board) == 3
    best = yaml.safe_load((repo / "srch/best_params.yaml").read_text())
    assert set(best["detect"]["methods"]) == {"nac_ue", "scale"} and set(best["fit"]["detectors"]) == {"knn"}
    # and byte-reproducible: the same files as the stage's run (the forced rerun below leaves search to this check)
    assert differing(tree_bytes(repo / "srch"), tree_bytes(repo / "reports/search")) == []
    shutil.rmtree(repo / "srch")


def test_a_split_file_swapped_by_hand_is_refused_and_dvc_repro_generate_restores_it(repo, first_run):
    """Issue 14: ``id_test.npz`` overwritten with ``id_val.npz`` was extracted as if nothing happened."""
    data = repo / "data/benchmark"
    original = (data / "id_test.npz").read_bytes()
    shutil.copyfile(data / "id_val.npz", data / "id_test.npz")
    # train (like extract) opens the benchmark first: refused in one line, before any work
    proc = subprocess.run(["layerscope", "train", "--model", "m.pt", "--metrics", "t.json"], cwd=repo, env=env(),
                          capture_output=True, text=True)
    error = proc.stderr.strip()
    assert proc.returncode == 2 and "file 'id_test.npz' has" in error and "Hint: run `dvc repro generate`" in error
    assert len(error.splitlines()) == 1 and not (repo / "m.pt").exists(), error
    status = run(["dvc", "status", "--with-deps", "generate"], repo)
    assert "generate:" in status and "changed outs" in status and "modified:" in status, status
    out = run(["dvc", "repro", "generate"], repo)  # the hint's command: the run cache restores the benchmark
    assert "Stage 'generate' is cached - skipping run, checking out outputs" in out, out
    assert (data / "id_test.npz").read_bytes() == original


def test_unchanged_pipeline_reruns_nothing(repo, first_run):
    """After the first run, and after the benchmark restored above: `dvc repro` reruns nothing but `inputs`."""
    assert ran_stages(run(["dvc", "repro"], repo)) == set()


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def test_guard_is_calibrated_from_the_store_and_reports_its_achieved_tpr(repo, first_run):
    report = json.loads((repo / "reports/guard.json").read_text())
    assert report["target_tpr"] == 0.95 and report["val_tpr"] >= 0.95 and 0 < report["id_test_tpr"] <= 1
    assert 0 < report["far"]["flops_saved"] < 1 and set(report["sets"]) >= {"digits89", "textures"}


def changed_stages(status):
    """The stages `dvc status` lists as changed themselves (their own deps or params), but `inputs`: the stages a
    `dvc repro` starts from. Those after them rerun when their outputs change."""
    return set(re.findall(r"^([\w-]+):$", status, flags=re.M)) - {"inputs"}


def test_calibrate_and_fit_params_rerun_what_follows_them_never_extract(repo, first_run):
    """New thresholds need no refit and no re-inference; a detector's param and the heatmap decoder's (both in fit)
    are retrained from the store, never re-extracted.

    `dvc status` shows where each change enters the pipeline; one `dvc repro` of both shows what follows.
    """
    edit_params(repo, "calibrate", "target_tpr", 0.9)
    assert changed_stages(run(["dvc", "status"], repo)) == {"calibrate"}
    edit_params(repo, "fit", "detectors", {**FAST["fit"]["detectors"], "knn": {"n_neighbors": 3}})
    edit_params(repo, "fit", "heatmap", {**FAST["fit"]["heatmap"], "fw_layers": 1})
    assert changed_stages(run(["dvc", "status"], repo)) == {"fit", "calibrate"}
    assert ran_stages(run(["dvc", "repro"], repo)) == {"fit", "detect", "calibrate", "guard"}
    assert json.loads((repo / "reports/guard.json").read_text())["target_tpr"] == 0.9
    decoder = json.loads((repo / "cache/detectors/methods/heatmap/heatmap.json").read_text())
    assert decoder["skip_layers"] == ["layer3"] and decoder["params"]["fw_layers"] == 1


def test_plots_render(repo, first_run):
    out = run(["dvc", "plots", "show", "-o", "plots_html"], repo)
    assert (repo / "plots_html/index.html").is_file(), out
