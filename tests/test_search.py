import json

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.search import Config, expand_grid, expand_values, leaderboard, plan_tasks, run_search, select_winners
from pipeline.store import ArraySpec, StoreWriter, open_store
from tests.conftest import make_blobs

SETS_VAL = {"far": {"split": "far_val", "role": "far"}, "near": {"split": "near_val", "role": "near"}}
SETS_TEST = {"far": {"split": "far_test", "role": "far"}, "near": {"split": "near_test", "role": "near"}}


@pytest.fixture
def store(tmp_path, rng):
    """Two layers of blob features, logits, for ID train/val/test and near/far OOD val/test."""
    return write_search_store(tmp_path / "s.zarr", rng)


def write_search_store(path, rng, stretch=1.6):
    """The ``store`` fixture's store at ``path``; near OOD is ID stretched by ``stretch``."""
    b = make_blobs(rng, n_per_class=80, n_ood=40)
    near = b.X_id[:40] * stretch  # stretched ID: harder than the far outliers
    data = {"id_train": (b.X_train, b.y_train), "id_val": (b.X_id[:60], b.y_id[:60]),
            "id_test": (b.X_id[60:], b.y_id[60:]), "far_val": (b.X_ood[:20], None), "far_test": (b.X_ood[20:], None),
            "near_val": (near[:20], None), "near_test": (near[20:], None)}
    specs = [ArraySpec("l1", 8, "float32"), ArraySpec("l2", 8, "float32"), ArraySpec("logits", 3, "float32"),
             ArraySpec("label", None, "int64")]
    with StoreWriter(path, "k", chunk_rows=16, shard_rows=64) as writer:
        for split, (X, y) in data.items():
            y = np.full(len(X), -1) if y is None else y
            role, _, part = split.partition("_")
            attrs = {"n_samples": len(X)} if role == "id" else {"n_samples": len(X), "role": role, "set": role,
                                                                "part": part}
            writer.create_split(split, len(X), specs, attrs)
            for i in writer.pending_shards(split, len(X)):
                a, z = writer.shard_range(i, len(X))
                writer.write_shard(split, i, {"l1": X[a:z], "l2": X[a:z] ** 2, "logits": X[a:z, :3] * 3,
                                              "label": y[a:z]})
        writer.finalize({"checkpoint_sha256": "x"}, ["l1", "l2"])
    return open_store(path)


def test_values_from_lists_ranges_and_logspaces():
    assert expand_values("p", [1, 2]) == [1, 2]
    assert expand_values("p", {"range": [50, 95, 5]}) == list(range(50, 96, 5))
    assert expand_values("p", {"logspace": [0.001, 1000, 7]}) == [0.001, 0.01, 0.1, 1, 10, 100, 1000]
    assert expand_values("p", 3) == [3]


@pytest.mark.parametrize("spec, match", [
    ([], r"'p' parameter of search must be a non-empty list"),
    ({"range": [5, 1, 1]}, r"step > 0 and stop >= start"),
    ({"logspace": [0, 1, 3]}, r"lo > 0"),
    ({"steps": [1, 2]}, r"a list, \{range"),
])
def test_bad_values(spec, match):
    with pytest.raises(ConfigError, match=match):
        expand_values("p", spec)


def test_grid_is_the_cartesian_product_and_names_are_checked():
    configs = expand_grid({"nac_ue": {"alpha": [1, 10], "O": [5, 20, 50]}, "knn": {"n_neighbors": [1, 5]}})
    assert len(configs) == 8 and Config("nac_ue", {"O": 5, "alpha": 1}) in configs
    with pytest.raises(ConfigError, match=r"'search.methods' parameter of search must be one of .*Got 'nacue'"):
        expand_grid({"nacue": {}})
    with pytest.raises(ConfigError, match=r"Unknown parameter 'beta' for method 'nac_ue'"):
        expand_grid({"nac_ue": {"beta": [1]}})


def test_nac_configs_that_differ_only_in_O_share_one_fit():
    configs = expand_grid({"nac_ue": {"alpha": [1, 10], "O": [5, 20, 50]}})
    tasks = plan_tasks(configs, ["l1"], (), {"nac_ue": {}})
    assert len(tasks) == 2 and all(len(task[3]) == 3 for task in tasks)


def test_winners_are_chosen_on_val_only():
    def row(method, val, test):
        return {"method": method, "params": {"v": val}, "column": "score",
                "val": {"mean": {"auroc": val, "fpr@95": 1 - val}}, "test": {"mean": {"auroc": test}}}
    rows = [row("a", 0.9, 0.5), row("a", 0.8, 0.99), row("b", 0.7, 0.1)]
    winners = select_winners(rows, "auroc")
    assert winners["a"]["params"] == {"v": 0.9} and winners["b"]["params"] == {"v": 0.7}
    assert select_winners(rows, "fpr@95")["a"]["params"] == {"v": 0.9}  # lowest FPR


def test_search_end_to_end_on_a_store(store):
    methods = {"knn": {"n_neighbors": [1, 5]}, "ebo": {"temperature": [1.0, 2.0]}}
    result = run_search(store, methods, aggregations=("max_z",), n_jobs=1, ood_val=SETS_VAL, ood_test=SETS_TEST)
    rows = leaderboard(result)
    assert len(rows) == 2 * 3 + 2  # knn: 2 params x (2 layers + max_z); ebo: 2 temperatures
    assert [r["val_auroc_mean"] for r in rows] == sorted((r["val_auroc_mean"] for r in rows), reverse=True)
    selected = [r for r in rows if r["selected"]]
    assert {r["method"] for r in selected} == {"knn", "ebo"}
    assert all(r["test_auroc_far"] is not None for r in selected)
    assert all(r["test_auroc_far"] is None for r in rows if not r["selected"])
    assert result.winners["knn"]["val"]["far"]["auroc"] > 0.9
    best = result.best_params()
    assert set(best["fit"]["detectors"]) == {"knn"} and set(best["detect"]["methods"]) == {"ebo"}


def test_parallel_search_equals_serial(store):
    methods = {"knn": {"n_neighbors": [1, 3]}, "ebo": {"temperature": [1.0, 3.0]}}
    kwargs = {"aggregations": ("mean_z",), "ood_val": SETS_VAL, "ood_test": SETS_TEST}
    serial = [{k: v for k, v in r.items() if k != "seconds"} for r in leaderboard(run_search(store, methods, n_jobs=1, **kwargs))]
    parallel = [{k: v for k, v in r.items() if k != "seconds"} for r in leaderboard(run_search(store, methods, n_jobs=2, **kwargs))]
    assert serial == parallel


def test_bad_metric(store):
    with pytest.raises(ConfigError, match=r"'search.metric' .* Got 'auc'"):
        run_search(store, {"ebo": {}}, metric="auc", ood_val=SETS_VAL, ood_test=SETS_TEST)


@pytest.mark.parametrize(("metric", "recall", "key"), [("auroc", 0.95, "auroc"), ("fpr", 0.95, "fpr@95"),
                                                      ("fpr", 0.9, "fpr@90"), ("fpr@90", 0.9, "fpr@90")])
def test_selection_metric_names_the_key_at_the_recall(metric, recall, key):
    from pipeline.search import selection_key

    assert selection_key(metric, recall) == key


def test_the_old_fpr95_metric_name_gets_a_hint():
    from pipeline.config import SearchConfig
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'search.metric' parameter of search must be one of .*Got 'fpr95'.*"
                                          r"Hint: 'fpr' selects on the FPR at search.recall \(0.95\), key 'fpr@95'"):
        SearchConfig(metric="fpr95")
    with pytest.raises(ConfigError, match=r"'search.recall' parameter of search must be a float in \(0, 1\]"):
        SearchConfig(recall=95)


def test_search_cli_selects_on_the_fpr_at_its_recall(store, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    grid = tmp_path / "grid.yaml"
    grid.write_text("metric: fpr\nrecall: 0.9\nn_jobs: 1\nmethods: {knn: {n_neighbors: [1, 5]}}\n")
    args = ["search", "--features", str(store.path), "--out", str(tmp_path / "out"), "--grid", str(grid)]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "fpr@90" in result.output  # the selection column, titled after the recall
    board = json.loads((tmp_path / "out/leaderboard.json").read_text())
    assert board["metric"] == "fpr@90" and "val_fpr@90_mean" in board["rows"][0]
    winner = [r for r in board["rows"] if r["selected"]][0]
    assert winner["val_fpr@90_mean"] == min(r["val_fpr@90_mean"] for r in board["rows"])  # lowest FPR wins


def test_a_relative_store_path_is_read_from_where_the_search_runs(store, tmp_path, monkeypatch):
    # loky's workers are reused across searches and keep the directory they started in: a relative path
    # must not send a later search, run from elsewhere, to another store that happens to share the name
    from pipeline.store import open_store

    methods, kwargs = {"knn": {"n_neighbors": [1, 3]}}, {"ood_val": SETS_VAL, "ood_test": SETS_TEST}
    elsewhere = tmp_path / "elsewhere"
    write_search_store(elsewhere / "s.zarr", np.random.default_rng(7), stretch=1.2)
    monkeypatch.chdir(tmp_path)
    here = leaderboard(run_search(open_store("s.zarr"), methods, n_jobs=2, **kwargs))  # starts the workers here
    monkeypatch.chdir(elsewhere)
    relative = leaderboard(run_search(open_store("s.zarr"), methods, n_jobs=2, **kwargs))
    absolute = leaderboard(run_search(open_store(elsewhere / "s.zarr"), methods, n_jobs=2, **kwargs))
    assert [r["val_auroc_mean"] for r in relative] == [r["val_auroc_mean"] for r in absolute]
    assert [r["val_auroc_mean"] for r in relative] != [r["val_auroc_mean"] for r in here]
