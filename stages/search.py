"""Stage ``search``: a hyperparameter grid over the cached store, never the network.

Writes the leaderboard (CSV and JSON) and the winners' params in a form that
pastes back into ``params.yaml``. Seconds per configuration are a measurement,
not a result: they go to an untracked log (``paths.logs``), so the leaderboard
DVC tracks is the same bytes on every run of the same inputs.
"""

import logging
from pathlib import Path

import yaml

from pipeline.artifacts import atomic_write, check_dir_output
from pipeline.compute import open_runner
from pipeline.config import SearchConfig, build_config, load_section, read_params
from pipeline.report import ood_sets, write_csv, write_json
from pipeline.search import leaderboard, run_search
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(params, features, out, grid=None, logs=None):
    check_dir_output(out, "search leaderboard")  # before the work
    cfg = load_section("search", params) if grid is None else _grid_config(grid)
    compute = load_section("compute", params)  # where, not what: not a DVC dependency
    store = open_store(features)
    with open_runner(compute) as runner:
        result = run_search(store, cfg.methods, metric=cfg.metric, aggregations=cfg.aggregations, recall=cfg.recall,
                            n_jobs=cfg.n_jobs, ood_val=ood_sets(store, "val"), ood_test=ood_sets(store, "test"),
                            runner=runner if runner.distributed else None)
    rows = leaderboard(result)
    out = Path(out)
    tracked = [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    write_csv(tracked, out / "leaderboard.csv")
    write_json({"metric": result.metric, "rows": tracked}, out / "leaderboard.json")
    atomic_write(out / "best_params.yaml", yaml.safe_dump(result.best_params(), sort_keys=False))
    if logs is not None:
        write_csv([{k: row[k] for k in ("method", "column", "params", "seconds")} for row in rows],
                  Path(logs) / "search_seconds.csv")
    # a row per configuration and column (a per-layer detector has one per layer and aggregation):
    # more rows than the configurations run_search counted
    log.info("search: %d leaderboard rows (configurations x columns); winners in %s", len(rows),
             out / "best_params.yaml")
    return rows, cfg


def _grid_config(path):
    """A grid file holds the keys of the search section, or a whole ``search:`` section."""
    values = read_params(path, what="Grid file", option="--grid")
    return build_config(SearchConfig, values.get("search", values) if set(values) == {"search"} else values, "search")
