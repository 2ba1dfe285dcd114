"""Where the work runs: threads, a LocalCluster of processes, an existing scheduler.

Extraction on a 2-worker LocalCluster (processes) must give the same bits as the
single-process path, and so must a run during which one worker is killed.
"""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import yaml

from pipeline.compute import Runner, open_runner, scheduler_address
from pipeline.config import ComputeConfig, build_config
from pipeline.datasets import ImageSplit, write_benchmark
from pipeline.errors import ConfigError
from pipeline.models import init_model, save_checkpoint
from pipeline.store import open_store
from stages import detect, extract, fit, search
from tests.conftest import TINY_SPEC

EXTRACT = {"layers": ["layer1", "layer2", "fc"], "grad_layers": ["layer2"], "batch_size": 8, "chunk_rows": 8,
           "shard_rows": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("compute")
    rng = np.random.default_rng(0)
    splits = [ImageSplit(name, rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, n),
                         {"role": role, "set": name.rsplit("_", 1)[0], "part": name.rsplit("_", 1)[1],
                          "source": "uniform noise", "n_samples": n, "image_size": 8})
              for name, n, role in (("id_train", 150, "id"), ("id_val", 40, "id"), ("id_test", 70, "id"),
                                    ("noise_val", 40, "far"), ("noise_test", 90, "far"))]
    write_benchmark(splits, root / "data")
    save_checkpoint(init_model(TINY_SPEC, seed=0), TINY_SPEC, root / "model.pt")
    return root


def _params(project, name, compute):
    path = project / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"extract": EXTRACT, "compute": compute}))
    return path


def _run(project, name, compute):
    out = project / f"{name}.zarr"
    extract.run(_params(project, name, compute), project / "data", project / "model.pt", out)
    return open_store(out)


def assert_same_store(a, b):
    assert a.splits == b.splits and a.layers == b.layers
    for split in a.splits:
        for name in a.array_names(split):
            np.testing.assert_array_equal(a.to_numpy(split, name), b.to_numpy(split, name), err_msg=f"{split}/{name}")
    assert a.head()["weight"].tobytes() == b.head()["weight"].tobytes()


@pytest.fixture(scope="module")
def reference(project):
    return _run(project, "threads", {"scheduler": "threads"})


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, shared by the tests that run stages on an existing cluster.

    Each new cluster costs its workers their imports (torch, scikit-learn): seconds on a busy CI machine. What
    ``scheduler: local`` adds (the stage starts and stops its own cluster) has its own test,
    :func:`test_local_cluster_extraction_is_bit_identical_to_threads`. The worker-kill test comes last.
    """
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster


def test_local_cluster_extraction_is_bit_identical_to_threads(project, reference):
    assert_same_store(_run(project, "local", {"scheduler": "local", "n_workers": 2, "dashboard": False}), reference)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_thread_count_does_not_change_a_bit(project, reference, threads):
    """compute.threads is where, not what: it stays out of DVC's dependencies only because of this."""
    import torch

    before = torch.get_num_threads()
    try:
        assert_same_store(_run(project, f"threads{threads}", {"threads": threads}), reference)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


# ten trees, not PyOD's hundred: the same code on any scheduler, and a tenth of the detector to save and load
FIT = {"detectors": {"mahalanobis": {}, "knn": {"n_neighbors": 3}, "iforest": {"n_estimators": 10, "random_state": 0}}}
DETECT = {"methods": {"msp": {}, "ebo": {}, "react": {"percentile": 90}, "vim": {"dim": 3}}, "figures": False}


def _fit_detect(project, store_path, name, compute):
    params = project / f"{name}-fd.yaml"
    params.write_text(yaml.safe_dump({"fit": FIT, "detect": DETECT, "compute": compute}))
    out = project / name
    fit.run(params, store_path, out / "detectors")
    detect.run(params, store_path, out / "detectors", out / "metrics.json", out / "table.csv", out / "figures",
               out / "argmax.json", detail_out=out / "detail.json")
    return json.loads((out / "detail.json").read_text())


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}/").items()}
    return {prefix: tree}


@pytest.fixture(scope="module")
def threads_metrics(project, reference):
    """fit and detect on threads, from the threads store: what the cluster's and the URL store's runs must give."""
    return _fit_detect(project, reference.path, "fd-threads", {"scheduler": "threads"})


def test_fit_and_detect_give_the_same_metrics_on_threads_and_a_local_cluster(project, reference, threads_metrics,
                                                                             cluster):
    threads = _flatten(threads_metrics)
    local = _flatten(_fit_detect(project, reference.path, "fd-local", {"scheduler": cluster.scheduler_address}))
    assert threads.keys() == local.keys() and len(threads) > 50
    for key, value in threads.items():
        assert local[key] == pytest.approx(value, abs=1e-6), key


def test_search_gives_the_same_leaderboard_on_threads_and_a_local_cluster(project, reference, cluster):
    grid = {"react": {"percentile": [80, 90]}, "mahalanobis": {}, "knn": {"n_neighbors": [1, 3]}}
    boards = {}
    for tag, compute in {"threads": {"scheduler": "threads"}, "local": {"scheduler": cluster.scheduler_address}}.items():
        params = project / f"search-{tag}.yaml"
        params.write_text(yaml.safe_dump({"search": {"methods": grid, "n_jobs": 2}, "compute": compute}))
        boards[tag], _ = search.run(params, reference.path, project / f"search-{tag}")
    assert len(boards["threads"]) > 5
    for a, b in zip(boards["threads"], boards["local"], strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key != "seconds":  # timing, not a result
                assert b[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key


def test_killing_a_worker_mid_extraction_then_resuming_gives_the_same_store(project, reference, cluster):
    """Last of the tests on the shared cluster: its nanny restarts the killed worker, for the resumed run."""
    from distributed import Client

    out = project / "killed.zarr"
    progress = project / ".staging" / "killed.zarr" / "progress.json"
    with Client(cluster) as client:
        params = _params(project, "killed", {"scheduler": cluster.scheduler_address})
        pids = client.run(os.getpid)
        failure = []

        def run():
            try:
                extract.run(params, project / "data", project / "model.pt", out)
            except Exception as exc:  # a killed worker may fail the run: resuming is what is tested
                failure.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        while _shards_done(progress) < 3 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert thread.is_alive(), "extraction finished before a worker could be killed"
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        thread.join(180)
        if failure or not out.exists():
            extract.run(params, project / "data", project / "model.pt", out)  # resume
    assert_same_store(open_store(out), reference)


def test_a_store_at_an_fsspec_url_is_written_in_place_and_reads_the_same(project, reference, threads_metrics,
                                                                          monkeypatch):
    monkeypatch.chdir(project)  # a URL store keeps its lock and progress under ./.staging
    url = f"file://{project / 'url-store.zarr'}"
    extract.run(_params(project, "url", {"scheduler": "threads"}), project / "data", project / "model.pt", url)
    store = open_store(url)
    assert isinstance(store.path, str) and store.path == url
    assert_same_store(store, reference)
    assert _fit_detect(project, url, "fd-url", {"scheduler": "threads"}) == threads_metrics


def test_an_unfinished_url_store_is_refused(project, tmp_path, monkeypatch):
    from pipeline.errors import StoreError
    from pipeline.store import ArraySpec, StoreWriter

    monkeypatch.chdir(tmp_path)
    url = f"file://{tmp_path / 'half.zarr'}"
    with StoreWriter(url, "k", chunk_rows=4, shard_rows=8) as writer:
        writer.create_split("id_train", 8, [ArraySpec("label", None, "int64")], {"n_samples": 8})
    with pytest.raises(StoreError, match=r"'file://.*half.zarr' is incomplete .* Hint: rerun `layerscope extract`"):
        open_store(url)
    with pytest.raises(StoreError, match=r"'file://.*nowhere.zarr' does not exist"):
        open_store(f"file://{tmp_path / 'nowhere.zarr'}")


def _shards_done(progress_file):
    try:
        return sum(len(v) for v in json.loads(progress_file.read_text())["splits"].values())
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def test_runner_yields_every_result_on_threads():
    results = dict(Runner(threads=2).map_unordered(lambda x: x * x, range(10), desc="square"))
    assert results == {x: x * x for x in range(10)}


def test_runner_raises_the_first_failure():
    def fail_on_three(x):
        if x == 3:
            raise RuntimeError("boom at 3")
        return x

    with pytest.raises(RuntimeError, match="boom at 3"):
        list(Runner(threads=1).map_unordered(fail_on_three, range(6), desc="fail"))


def test_scheduler_address_from_params_or_environment(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert scheduler_address(ComputeConfig()) is None
    assert scheduler_address(ComputeConfig(scheduler="tcp://10.0.0.1:8786")) == "tcp://10.0.0.1:8786"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.2:8786")
    assert scheduler_address(ComputeConfig()) == "tcp://10.0.0.2:8786"
    assert scheduler_address(ComputeConfig(scheduler="local")) is None


def test_unreachable_scheduler_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr("pipeline.compute.CONNECT_TIMEOUT", "1s")  # fail fast: nothing listens on port 1
    with pytest.raises(ConfigError, match=r"Could not connect to the Dask scheduler at 'tcp://127.0.0.1:1'.*"
                                          r"Hint: start one with `dask scheduler`"):
        with open_runner(ComputeConfig(scheduler="tcp://127.0.0.1:1")):
            pass


@pytest.mark.parametrize("values, message", [
    ({"scheduler": "cluster"}, r"'compute.scheduler' parameter of compute must be one of .* or a scheduler address"),
    ({"n_workers": 0}, r"'compute.n_workers' parameter .* positive"),
])
def test_compute_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(ComputeConfig, values, "compute")
