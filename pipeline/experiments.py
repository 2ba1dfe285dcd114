"""Compare DVC experiments from their headline metrics, with mean ± std over seeds.

OpenOOD v1.5 reports every number as mean ± std over three training seeds. In a
layerscope project those are DVC experiments that differ only by ``train.seed``
(``dvc exp run -S train.seed=0,1,2 --queue``, then ``dvc queue start``). This
module reads ``dvc exp show --json`` (the workspace, the baseline commit and
every experiment), groups the runs whose params are equal once the seed params
are set aside, and summarises each group's compact ``metrics.json``
(:func:`pipeline.report.headline_metrics`): per method, the mean and the sample
standard deviation (``ddof=1``; 0 for a single run) of near/far AUROC and FPR.

Nothing here runs the pipeline: it only reads what DVC recorded.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from dataclasses import dataclass, field

from pipeline.errors import DataError
from pipeline.report import headline_methods

log = logging.getLogger(__name__)

SEED_PARAMS = ("train.seed",)
PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Run:
    """One row of ``dvc exp show``: an experiment, the baseline commit or the workspace.

    Attributes
    ----------
    name : str
        The experiment's name, the baseline's branch or short rev, or ``"workspace"``.
    params : dict
        ``params.yaml`` flattened to ``"section.key" -> value`` (lists as JSON).
    metrics : dict
        The compact ``metrics.json``: ``id_accuracy``, ``recall``, and a mapping per method.
    """

    name: str
    params: dict
    metrics: dict


@dataclass
class Group:
    """Runs with equal params once the seed params are set aside."""

    params: dict                      # the shared params (seed params left out)
    seed_params: tuple = SEED_PARAMS
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list:
        """Per run, the values of the seed params (what varies inside the group)."""
        return [tuple(run.params.get(p) for p in self.seed_params) for run in self.runs]


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON text so that they compare and print."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def _name(record: dict) -> str:
    """An experiment's or branch's name, ``"workspace"``, or else the short commit."""
    rev = str(record.get("rev", ""))
    return record.get("name") or (rev if rev == "workspace" else rev[:7])


def _records(shown: list):
    """``(name, data)`` for the workspace, each baseline and each experiment of ``dvc exp show --json``."""
    for baseline in shown:
        yield _name(baseline), baseline.get("data") or {}
        for exp in baseline.get("experiments") or []:
            for revision in exp.get("revs") or []:
                yield _name(revision), revision.get("data") or {}


def parse_runs(shown: list, metrics_path: str) -> list[Run]:
    """The runs of ``dvc exp show --json`` output that have headline metrics.

    A run equal to an earlier one in params and metrics is left out (the
    workspace is checked last): it is the same run again, and would count twice
    in a seed group.

    Parameters
    ----------
    shown : list
        Parsed ``dvc exp show --json``.
    metrics_path : str
        The compact metrics file, relative to the repository (``paths.metrics``).
    """
    runs = []
    for name, data in _records(shown):
        metrics = ((data.get("metrics") or {}).get(metrics_path) or {}).get("data")
        params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data")
        if not isinstance(metrics, dict) or "id_accuracy" not in metrics or params is None:
            continue  # a failed or queued experiment, or a commit before the pipeline ran
        if isinstance(metrics.get("methods"), dict):  # an older layerscope's metrics.json: every layer and set
            raise DataError(f"'{metrics_path}' of run '{name}' holds per-layer detail, not the headline numbers "
                            "this layerscope writes. Hint: rerun detect there (`dvc exp run`), or compare runs "
                            "made with one layerscope version.")
        runs.append(Run(name, flatten(params), metrics))
    # A run equal to an earlier one in params and metrics is the same run (outputs are byte-reproducible):
    # the workspace after `dvc exp run`, or `-S train.seed=0` queued over a seed-0 baseline. Count it once.
    unique = []
    for run in sorted(runs, key=lambda r: r.name == "workspace"):
        if not any(run.params == kept.params and run.metrics == kept.metrics for kept in unique):
            unique.append(run)
    runs = unique
    return runs


def group_runs(runs: list[Run], seed_params=SEED_PARAMS) -> list[Group]:
    """Group ``runs`` by their params without ``seed_params``, in first-seen order.

    ``seed_params`` are dotted params (``train.seed``); with OpenOOD's three
    checkpoints per benchmark, the runs differ by ``train.checkpoint`` instead.
    """
    seed_params = tuple(seed_params)
    groups: dict[str, Group] = {}
    for run in runs:
        shared = {k: v for k, v in run.params.items() if k not in seed_params}
        key = json.dumps(shared, sort_keys=True, default=str)
        groups.setdefault(key, Group(shared, seed_params)).runs.append(run)
    return list(groups.values())


def varying_params(groups: list[Group]) -> list[str]:
    """The params whose value differs between groups (what tells the groups apart), sorted."""
    keys = sorted({k for g in groups for k in g.params})
    return [k for k in keys if len({json.dumps(g.params.get(k), default=str) for g in groups}) > 1]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0.0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(group: Group, methods=None) -> list[dict]:
    """Per method: ``(mean, std, n)`` of every headline number over the group's runs.

    Returns
    -------
    list of dict
        ``{"method": str, "<metric>": (mean, std, n), ...}``, plus one
        ``{"method": "id_accuracy", "id_accuracy": (mean, std, n)}`` row first.
        A metric missing from some runs (another recall) is summarised over the runs that have it.
    """
    rows = [{"method": "id_accuracy",
             "id_accuracy": _stat([r.metrics.get("id_accuracy") for r in group.runs])}]
    names = list(dict.fromkeys(m for r in group.runs for m in headline_methods(r.metrics)))
    for method in names:
        if methods and method not in methods:
            continue
        per_run = [r.metrics.get(method, {}) for r in group.runs]
        keys = list(dict.fromkeys(k for per in per_run for k in per))
        rows.append({"method": method, **{k: _stat([per.get(k) for per in per_run]) for k in keys}})
    return rows


def _stat(values):
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return (*mean_std(values), len(values)) if values else None


def dvc_exp_show(cwd=".") -> list:
    """``dvc exp show --json`` in ``cwd``, parsed; a one-line DataError when DVC cannot show experiments."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("ERROR: ")
        raise DataError(f"`dvc exp show --json` failed in '{cwd}': {reason}. Hint: run `layerscope summary --exps` "
                        "in a DVC project (a git repository with dvc.yaml) after `dvc exp run`.")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise DataError(f"`dvc exp show --json` printed something that is not JSON ({exc}). Hint: check "
                        "`dvc exp show` by hand; DVC may be too old (layerscope needs DVC 3).") from None
