"""What each command's start imports (issue 18): contracts on ``sys.modules``, not timings.

The imports run in a fresh interpreter, lightest first, and after each step the
test lists which of that step's forbidden packages are in ``sys.modules`` (so a
step also answers for the steps before it: the checks are cumulative). The
stages that read the feature store (``detect``, ``fit``, ``search``,
``calibrate``) never need torch; the entry point needs typer and rich only;
reading a digits benchmark's ``.npz`` splits needs neither torchvision nor
scikit-learn. ``benchmarks/bench_startup.py`` measures the times.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

PROBE = """
import importlib, json, sys
found = {{}}
for modules, code, forbidden in {steps!r}:
    for name in modules:
        importlib.import_module(name)
    exec(code)
    found[" + ".join(modules) + code] = sorted(m for m in forbidden if m in sys.modules)
print(json.dumps(found))
"""

NETWORK = ("torch", "torchvision")
# torch: the heatmap decoder imports it when it is used; matplotlib: figures, when drawn; pyod: a pyod
# detector, when built; dask: when the work fans out (or inspect --stats); skops: when detectors are saved or loaded
STORE_ONLY = (*NETWORK, "matplotlib", "pyod", "skimage", "dask", "distributed", "xarray", "skops")


def forbidden_imports(steps):
    """``{step: forbidden packages found imported}`` of ``steps``, ``(modules, code, forbidden)``, run in order."""
    code = PROBE.format(steps=[(list(modules), then, list(forbidden)) for modules, then, forbidden in steps])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_store_commands_import_no_network():
    found = forbidden_imports([
        # the entry point: typer and rich only
        (["pipeline.cli"], "", (*STORE_ONLY, "numpy", "sklearn", "scipy", "zarr", "yaml", "pandas")),
        # layerscope summary: scikit-learn only computes metrics
        (["pipeline.metrics", "pipeline.report"], "", (*STORE_ONLY, "sklearn", "scipy")),
        # layerscope inspect (without --stats)
        (["pipeline.store", "pipeline.storeinfo"], "", (*STORE_ONLY, "sklearn")),
        (["pipeline.scorers", "pipeline.scorers.heatmap"], "", STORE_ONLY),
        # pandas: scikit-learn imports it at start-up for nothing (pipeline/_sklearn.py)
        (["stages.detect", "stages.fit", "stages.search", "stages.calibrate"], "", (*STORE_ONLY, "pandas")),
        # loading or saving a detector imports skops, which walks scikit-learn's packages: not into its
        # array-API shims for torch and dask (they would import their libraries)
        (["pipeline.persist"], "sys.modules['pipeline.persist']._skops_io()",
         (*NETWORK, "dask.array", *(f"sklearn.externals.array_api_compat.{lib}" for lib in ("torch", "dask", "cupy")))),
    ])
    assert found == {step: [] for step in found}


def test_a_blockwise_fit_on_threads_imports_no_distributed():
    """Out-of-core fits compute each block with dask's synchronous scheduler; named "sync", dask would first import
    distributed to look for a client (a third of a second in every fit that never uses a cluster)."""
    found = forbidden_imports([(["dask.array", "pipeline.detectors"], (
        "import numpy as np; X = np.random.default_rng(0).normal(size=(40, 3)); "
        "sys.modules['pipeline.detectors'].make_detector('mahalanobis', {}, standardize=True)"
        ".fit_dask(sys.modules['dask.array'].from_array(X, chunks=(16, 3)), np.arange(40) % 2)"),
        ("distributed",))])
    assert found == {step: [] for step in found}


def test_fitting_and_searching_from_a_store_import_no_dask(tiny_store):
    """Out-of-core fits read the store's shards one by one (``FeatureStore.sharded``): no task graph, so
    neither ``fit`` nor ``search`` pays the 0.3-0.4 s of importing dask.array, and a fan-out on threads
    imports nothing of dask."""
    fit = ("from pipeline.store import open_store; from pipeline.scoring import fit_detectors; "
           f"fit_detectors(open_store({str(tiny_store.path)!r}), {{'mahalanobis': {{}}, 'rmds': {{}}}}, "
           "standardize=True)")
    found = forbidden_imports([
        (["pipeline.compute"], "list(sys.modules['pipeline.compute'].Runner().map_unordered(abs, [-1, 2], desc='t'))",
         ("dask", "distributed")),
        (["pipeline.scoring"], fit, ("dask", "distributed")),
    ])
    assert found == {step: [] for step in found}


def test_after_scikit_learn_came_without_pandas_pandas_imports_for_real_and_scikit_learn_takes_dataframes():
    code = ("import stages.detect, sys; assert 'pandas' not in sys.modules; "
            "import pandas, numpy as np; from sklearn.preprocessing import OneHotEncoder, StandardScaler; "
            "frame = pandas.DataFrame({'a': [1.0, 2.0, np.nan], 'b': ['x', 'y', 'x']}); "
            "assert StandardScaler().fit(frame[['a']]).feature_names_in_.tolist() == ['a']; "
            "assert OneHotEncoder().fit_transform(frame[['b']]).shape == (3, 2); "
            "import sklearn.utils.fixes as fixes; assert fixes.pd_fillna(pandas, frame)['a'].isna().sum() == 1; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_after_skops_the_array_api_shims_import_for_real():
    """The stand-ins that stop skops' walk are gone once it has imported: a later import of a shim is the real one."""
    code = ("from pipeline import persist; persist._skops_io(); "
            "import sklearn.externals.array_api_compat.dask.array as shim, dask.array; "
            "assert shim.asarray is not None and shim.__file__.endswith('__init__.py'), shim; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_network_stages_and_npz_splits_import_no_torchvision(tmp_path):
    from pipeline.datasets import ImageSplit, write_benchmark

    images = np.random.default_rng(0).random((6, 1, 4, 4), dtype=np.float32)
    attrs = {"role": "id", "set": "id", "part": "test", "source": "test", "n_samples": 6, "image_size": 4}
    directory = write_benchmark([ImageSplit("id_test", images, np.arange(6) % 2, attrs)], tmp_path / "data")
    read = (f"splits = sys.modules['pipeline.userdata'].open_benchmark({str(directory)!r}); "
            "assert splits['id_test'].dataset[5][0].shape == (1, 4, 4)")
    # torchvision: where a torchvision backbone or data set is built; scikit-learn and scikit-image: where
    # the digits benchmark is generated
    forbidden = ("torchvision", "sklearn", "skimage", "matplotlib")
    found = forbidden_imports([
        (["pipeline.userdata"], read, forbidden),  # reading .npz splits
        (["stages.extract", "stages.train"], "", forbidden),
    ])
    assert found == {step: [] for step in found}


def test_inputs_and_the_digits_generate_import_no_torch(tmp_path):
    """`inputs` runs in every `dvc repro` (always changed): it fingerprints files, and needs neither the network's
    packages nor the store's; generating the digits benchmark needs scikit-learn and scikit-image, not torch."""
    params = str(Path(__file__).resolve().parents[1] / "params.yaml")
    inputs = f"sys.modules['stages.inputs'].run({params!r}, {str(tmp_path / 'g.json')!r}, {str(tmp_path / 't.json')!r})"
    generate = f"sys.modules['stages.generate'].run({params!r}, {str(tmp_path / 'data')!r})"
    found = forbidden_imports([
        (["stages.inputs"], inputs, (*NETWORK, "zarr", "sklearn", "scipy", "skimage", "pandas")),
        (["stages.generate"], generate, (*NETWORK, "zarr")),
    ])
    assert found == {step: [] for step in found}
    assert (tmp_path / "g.json").is_file() and (tmp_path / "data" / "manifest.json").is_file()


def _command(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_the_quick_exit_flushes_everything_and_keeps_the_exit_code(tmp_path):
    """The command leaves without the interpreter's teardown, but never without its output or its code."""
    from pipeline.catalogue import METHODS

    listed = _command("methods")
    assert listed.returncode == 0, listed.stderr
    assert all(name in listed.stdout for name in METHODS)  # the whole table, through a pipe
    missing = _command("inspect", str(tmp_path / "nope.zarr"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "nope.zarr" in missing.stderr
    usage = _command("fit", "--bogus")
    assert usage.returncode == 2 and "No such option: --bogus" in usage.stderr


def test_the_quick_exit_waits_for_what_needs_the_normal_one():
    """A non-daemon thread, an exit finalizer or loky's process pool keep the interpreter's own shutdown."""
    code = """
import threading, sys
from pipeline import cli
assert not cli._needs_clean_exit()
t = threading.Thread(target=lambda: None); t.start(); t.join()
from joblib.externals.loky import get_reusable_executor
get_reusable_executor(max_workers=1).submit(int, 1).result()
assert cli._needs_clean_exit()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr
