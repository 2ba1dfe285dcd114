"""pipeline.experiments and `layerscope summary --exps`: experiments compared over seeds."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import DataError
from pipeline.experiments import flatten, group_runs, mean_std, parse_runs, summarise, varying_params

METRICS = "reports/metrics.json"


def _metrics(auroc_near, fpr="fpr@95"):
    return {"id_accuracy": 0.9, "recall": 0.95,
            "msp": {"auroc_near": auroc_near, "auroc_far": 0.99, f"{fpr}_near": 0.5, f"{fpr}_far": 0.1}}


def _record(name, seed, auroc_near, recall=0.95, metrics=None):
    params = {"train": {"seed": seed, "epochs": 2}, "detect": {"recall": recall, "layers": ["a", "b"]}}
    return {"rev": f"{seed:040d}", "name": name,
            "data": {"params": {"params.yaml": {"data": params}},
                     "metrics": {METRICS: {"data": metrics or _metrics(auroc_near)}}}}


def _shown():
    """`dvc exp show --json`'s layout: the workspace, then the baseline with its experiments' revisions."""
    baseline = {**_record("main", 0, 0.80), "experiments": [
        {"revs": [_record("exp-a", 1, 0.82)]}, {"revs": [_record("exp-b", 2, 0.84)]},
        {"revs": [_record("exp-c", 0, 0.70, recall=0.9)]},
        {"revs": [{"rev": "f" * 40, "name": "exp-failed", "data": {"params": {}, "metrics": {}}}]}]}
    return [{**_record(None, 0, 0.80), "rev": "workspace"}, baseline]


def test_mean_and_sample_std_by_hand():
    # 0.80, 0.82, 0.84: mean 0.82; squared deviations 0.0004 + 0 + 0.0004 over n - 1 = 2 -> std 0.02
    mean, std = mean_std([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82) and std == pytest.approx(0.02)
    assert mean_std([0.5]) == (0.5, 0.0)


def test_flatten_keeps_lists_comparable():
    assert flatten({"a": {"b": 1, "c": [1, 2]}}) == {"a.b": 1, "a.c": "[1, 2]"}


def test_runs_that_differ_only_by_seed_form_one_group():
    runs = parse_runs(_shown(), METRICS)
    # the workspace equals the baseline commit: counted once; the failed experiment has no metrics
    assert [r.name for r in runs] == ["main", "exp-a", "exp-b", "exp-c"]
    groups = group_runs(runs)
    assert [[r.name for r in g.runs] for g in groups] == [["main", "exp-a", "exp-b"], ["exp-c"]]
    assert groups[0].seeds == [(0,), (1,), (2,)]
    assert varying_params(groups) == ["detect.recall"]
    rows = {row["method"]: row for row in summarise(groups[0])}
    mean, std, n = rows["msp"]["auroc_near"]
    assert (mean, n) == (pytest.approx(0.82), 3) and std == pytest.approx(0.02)
    assert rows["id_accuracy"]["id_accuracy"] == (pytest.approx(0.9), 0.0, 3)


def test_a_rerun_of_the_baseline_seed_counts_once():
    shown = _shown()
    shown[1]["experiments"].append({"revs": [_record("exp-seed0", 0, 0.80)]})  # -S train.seed=0 over a seed-0 baseline
    runs = parse_runs(shown, METRICS)
    assert [r.name for r in runs] == ["main", "exp-a", "exp-b", "exp-c"]


def test_a_changed_workspace_is_a_run_of_its_own():
    shown = _shown()
    shown[0]["data"]["metrics"][METRICS]["data"] = _metrics(0.9)
    assert "workspace" in [r.name for r in parse_runs(shown, METRICS)]


def test_detail_metrics_from_an_older_layerscope_are_refused():
    old = {"id_accuracy": 0.9, "methods": {"msp": {"score": {"near": {"auroc": 0.8}}}}}
    shown = [{**_record("main", 0, 0.8, metrics=old), "experiments": []}]
    with pytest.raises(DataError, match=r"'reports/metrics.json' of run 'main' holds per-layer detail.*Hint: rerun"):
        parse_runs(shown, METRICS)


# -------------------------------------------------------------------- through DVC, as a user runs it

STAGE = """import json, yaml
s = yaml.safe_load(open("params.yaml"))["train"]["seed"]
methods = {"msp": {"auroc_near": 0.8 + 0.02 * s, "auroc_far": 0.99, "fpr@95_near": 0.5, "fpr@95_far": 0.1}}
json.dump({"id_accuracy": 0.9, "recall": 0.95, **methods}, open("reports/metrics.json", "w"))
"""


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def _dvc(repo, *args):
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def dvc_project(tmp_path, monkeypatch):
    """A real git + DVC project whose one stage writes a compact metrics.json from train.seed."""
    repo = tmp_path / "proj"
    (repo / "reports").mkdir(parents=True)
    (repo / "params.yaml").write_text("train:\n  seed: 0\n  epochs: 2\n")
    (repo / "score.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(
        "vars:\n  - paths:\n      metrics: reports/metrics.json\n"
        f"stages:\n  score:\n    cmd: {sys.executable} score.py\n    deps: [score.py]\n    params: [train]\n"
        "    metrics:\n      - ${paths.metrics}:\n          cache: false\n")
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    _dvc(repo, "repro")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "baseline")
    monkeypatch.chdir(repo)
    return repo


def test_summary_exps_gives_mean_and_std_over_seeds(dvc_project):
    for seed in (1, 2):
        _dvc(dvc_project, "exp", "run", "-S", f"train.seed={seed}")
    result = CliRunner().invoke(app, ["summary", "--exps"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # seeds 0, 1, 2: 0.80, 0.82, 0.84 -> 82.00±2.00 (sample std, in %)
    assert "3 runs in 1 groups" in result.output and "82.00±2.00" in result.output, result.output
    assert "99.00±0.00" in result.output and "master (0)" in result.output


def test_summary_exps_groups_over_another_param(dvc_project):
    # OpenOOD's three checkpoints: runs differ by train.checkpoint; grouping over train.seed keeps them apart
    for seed in (1, 2):
        _dvc(dvc_project, "exp", "run", "-S", f"train.seed={seed}", "-S", f"train.epochs={seed + 2}")
    apart = CliRunner().invoke(app, ["summary", "--exps"], terminal_width=200, env={"COLUMNS": "200"})
    assert "3 runs in 3 groups" in apart.output, apart.output
    together = CliRunner().invoke(app, ["summary", "--exps", "--over", "train.seed", "--over", "train.epochs"],
                                  terminal_width=200, env={"COLUMNS": "200"})
    assert "3 runs in 1 groups" in together.output and "82.00±2.00" in together.output, together.output
    assert "master (0, 2)" in together.output
    line = CliRunner().invoke(app, ["summary", "--exps", "--over", "train.sed"], terminal_width=400).output
    assert line.strip().splitlines()[-1] == ("error: --over 'train.sed' is not a param of any run. Hint: pass a "
                                             "dotted params.yaml key, e.g. --over train.seed or --over "
                                             "train.checkpoint.")


def test_summary_exps_names_an_unknown_method(dvc_project):
    result = CliRunner().invoke(app, ["summary", "--exps", "--method", "knn"], terminal_width=400)
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == (
        "error: Method 'knn' is not in the experiments' metrics. They have ['msp']. Hint: pass one of them to "
        "--method.")


def test_summary_exps_outside_a_dvc_project_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("vars:\n  - paths:\n      metrics: reports/metrics.json\n")
    result = CliRunner().invoke(app, ["summary", "--exps"], terminal_width=400)
    line = result.output.strip().splitlines()[-1]
    assert result.exit_code != 0 and line.startswith("error: `dvc exp show --json` failed in '.'"), result.output
    assert "Hint: run `layerscope summary --exps` in a DVC project" in line
    assert len([x for x in result.output.splitlines() if x.startswith("error:")]) == 1
