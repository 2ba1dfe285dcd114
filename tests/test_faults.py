"""SIGKILL `layerscope extract` many times at random points; no reader ever accepts a partial store (issue 14).

One seeded campaign of kills on a tiny benchmark with many small shards, each
run resuming what the previous ones left: kills after a random delay, after a
random number of recorded shards, and at failpoints inside a chunk write, the
finalize, the seal and the publish (old store aside; new store in, old not yet
deleted). After every kill, the store at ``--out`` is either refused by
:func:`~pipeline.store.open_store` or complete and byte-identical to an
uninterrupted run; no ``*.partial`` file is ever published. At the end, a plain
rerun (a real ``python -m pipeline extract``) resumes, and every file of the
result is byte-identical to the uninterrupted run's.

The harness (:mod:`tests.faults`) takes the command and the artifact path;
``layerscope fit`` gets the same treatment, on the store the first campaign
left (one project, one zygote): kills after a random delay (while fitting, while
saving) and at the failpoints of the seal and of both steps of the publish.
After every kill, the detectors at ``--out`` are either refused by
:func:`~pipeline.scoring.load_detectors` or complete and byte-identical to an
uninterrupted fit (the set there before the campaign is one). ``fit`` is not
resumable (it refits), but a killed fit's build is cleared by the next one, and
the final rerun gives byte-identical detectors.
"""

import json
import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from pipeline.datasets import ImageSplit, write_benchmark
from pipeline.detectors.pyod_adapter import PYOD_MODELS
from pipeline.errors import IntegrityError, LayerscopeError, StoreError
from pipeline.models import init_model, save_checkpoint
from pipeline.scoring import load_detectors, verify_detectors
from pipeline.store import open_store, verify_store
from tests.conftest import TINY_SPEC
from tests.faults import Kill, Zygote, kill_campaign, run_once
from tests.faults import differing, tree_bytes as files

log = logging.getLogger(__name__)

SEED = 14
SPLITS = (("id_train", 96), ("a_test", 64), ("b_test", 40))
SHARD_ROWS = 8
N_SHARDS = sum(-(-n // SHARD_ROWS) for _, n in SPLITS)  # 25 shards, 8 arrays each
EXTRACT = {"layers": ["layer1", "layer2", "fc"], "head": "fc", "batch_size": 8, "chunk_rows": 4,
           "shard_rows": SHARD_ROWS, "device": "cpu"}
N_KILLS = 18
FAILPOINTS = ["write:after-partial@3", "write:after-partial@11", "finalize:after-attrs", "seal:before-manifest",
              "publish:after-aside", "publish:after-swap"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(SEED)
    splits = [ImageSplit(name, rng.random((n, 1, 8, 8), dtype=np.float32), np.full(n, -1, np.int64),
                         {"role": "far", "set": name, "part": "test", "source": "uniform noise",
                          "n_samples": n, "image_size": 8})
              for name, n in SPLITS]
    write_benchmark(splits, root / "data")
    save_checkpoint(init_model(TINY_SPEC, seed=0), TINY_SPEC, root / "model.pt")
    (root / "params.yaml").write_text(yaml.safe_dump({"extract": EXTRACT}))
    return root


@pytest.fixture(scope="module")
def zygote(project):
    """One zygote for both campaigns: its imports (torch, torchvision, scikit-learn) cost seconds.

    It also imports what `fit` would import in each child: the PyOD models of :data:`FIT` and skops (which
    writes the detectors), seconds of every fit run that no kill needs to land in.
    """
    lazy = [PYOD_MODELS[name][0] for name in FIT["detectors"] if name in PYOD_MODELS]
    with Zygote(project, preload=["stages.extract", "stages.fit", *lazy, "skops.io"]) as zygote:
        yield zygote


def argv(project, out):
    return ["extract", "--params", str(project / "params.yaml"), "--data", str(project / "data"),
            "--model", str(project / "model.pt"), "--out", str(out)]


def shards_done(out):
    try:
        state = json.loads((out.parent / ".staging" / out.name / "progress.json").read_text())
        return sum(len(v) for v in state["splits"].values())
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def extract_phase():
    """``phase(out)``: where a kill of `extract` landed, read from what it left on disk."""
    seen_partials, last_done, last_publish = set(), [0], [None]

    def phase(out):
        staging = out.parent / ".staging" / out.name
        staged, replaced = staging / "store.zarr", out.parent / ".staging" / f"{out.name}.replaced"
        new_partials = set(staged.rglob("*.partial")) - seen_partials if staged.is_dir() else set()
        seen_partials.update(new_partials)
        before, last_done[0] = last_done[0], shards_done(out)
        # a displaced store left by an earlier kill is not where this one landed
        publish = (replaced.exists(), out.exists()) if replaced.exists() else None
        publish_moved, last_publish[0] = publish is not None and publish != last_publish[0], publish
        if publish_moved:
            return "publish: new store in, old not deleted" if out.exists() else "publish: old store aside"
        if not (staging / "progress.json").is_file():
            return "startup (imports, model, data)"
        if new_partials:
            return "inside a chunk write (*.partial left)"
        return _after_setup(last_done[0], before, staged)

    return phase


def _after_setup(done, before, staged):
    if done < N_SHARDS:
        return "extracting shards" if done > before else "setup (model, data, staged store), no new shard"
    if staged.is_dir():
        sealed = (staged / "layerscope.json").is_file()
        return "finalize: sealed, before publish" if sealed else "finalize: before the manifest"
    return "after publish (staging cleanup)"


def checker(reference_files):
    def check(out):
        if out.exists():
            assert not list(out.rglob("*.partial")), "a *.partial file was published"
        for where in (out, out.parent / ".staging" / out.name / "store.zarr"):  # the output, and the staged build
            try:
                store = open_store(where)
            except (StoreError, IntegrityError) as exc:
                assert "\n" not in str(exc)
                continue
            assert differing(files(where), reference_files) == [], f"{where} was accepted but differs from an uninterrupted run"
            verify_store(where)
            assert store.to_numpy("id_train", "layer1").shape == (SPLITS[0][1], 4)
    return check


def plan_kills(rng, run_seconds, n=28):
    """Shuffled: each failpoint once, the rest half after a random delay, half after a random number of new shards.

    Delays are drawn up to 70% of an uninterrupted run: resumed runs are shorter, and some end first.
    More are planned than needed: the campaign stops once ``N_KILLS`` kills have landed.
    """
    n_random = n - len(FAILPOINTS)
    kills = [Kill("timer", round(float(rng.uniform(0.05, 0.7 * run_seconds)), 3)) for _ in range(n_random // 2)]
    kills += [Kill("progress", int(rng.integers(1, 8))) for _ in range(n_random - n_random // 2)]
    kills = [kills[i] for i in rng.permutation(len(kills))]
    for name in FAILPOINTS:  # among the first runs, so that each one runs before the campaign stops
        kills.insert(int(rng.integers(0, 12)), Kill("failpoint", name))
    return kills


def test_kills_anywhere_never_expose_a_partial_store_and_resume_bit_identical(project, zygote, tmp_path):
    rng = np.random.default_rng(SEED)
    reference, out = project / "reference.zarr", project / "features.zarr"
    start = time.monotonic()
    assert run_once(zygote, argv(project, reference), tmp_path / "reference.log", Kill("none")) == 0
    run_seconds = time.monotonic() - start
    reference_files = files(reference)
    shutil.copytree(reference, out)  # an earlier extraction: the publish kills have an old store to displace
    campaign = kill_campaign(argv(project, out), out, plan_kills(rng, run_seconds), zygote=zygote,
                             logs=tmp_path / "logs", progress=lambda: shards_done(out), phase=extract_phase(),
                             check=checker(reference_files), n_kills=N_KILLS)
    print(campaign.report())
    log.warning("fault injection: %s", campaign.report())
    landed = campaign.phases
    assert sum(landed.values()) >= 15, campaign.report()
    for name in FAILPOINTS:  # inside a chunk write, the finalize, the seal and both steps of the publish
        assert landed[f"failpoint {name.partition('@')[0]}"] >= 1, campaign.report()
    assert landed["extracting shards"] >= 3, campaign.report()

    # a plain rerun, as a user would type it (a real interpreter, not a fork), resumes what the kills left
    rerun = subprocess.run([sys.executable, "-m", "pipeline", *argv(project, out)], capture_output=True, text=True,
                           cwd=project, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert differing(files(out), reference_files) == [], "the resumed store differs from an uninterrupted run"
    assert not (project / ".staging" / out.name).exists() and not (project / ".staging" / "features.zarr.replaced").exists()
    verify_store(out)


# ---------------------------------------------------------------- the same on `layerscope fit`

FIT_SEED = 15
FIT = {"detectors": {"mahalanobis": {}, "knn": {"n_neighbors": 3}, "iforest": {"n_estimators": 10, "random_state": 0}},
       "standardize": True}
FIT_FAILPOINTS = ["seal:before-manifest", "publish:after-aside", "publish:after-swap"]
FIT_PHASES = ["start-up or fitting (nothing written yet)", "saving detectors"]  # before and after the build appears


def fit_argv(root, out):
    return ["fit", "--params", str(root / "fit.yaml"), "--features", str(root / "features.zarr"),
            "--model", str(root / "model.pt"), "--out", str(out)]


def fit_phase():
    """``phase(out)``: where a kill of `fit` landed, from what is new in ``.staging`` since the last run."""
    seen_builds, last_publish = set(), [None]

    def phase(out):
        staging = out.parent / ".staging"
        builds = set(staging.glob(f"{out.name}.build-*")) - seen_builds
        seen_builds.update(builds)
        replaced = staging / f"{out.name}.replaced"
        publish = (True, out.exists()) if replaced.exists() else None
        moved, last_publish[0] = publish is not None and publish != last_publish[0], publish
        if moved:  # a displaced set left by an earlier kill is not where this one landed
            return "publish: new set in, old not deleted" if out.exists() else "publish: old set aside"
        if not builds:
            return "start-up or fitting (nothing written yet)"
        (build,) = builds
        return "saving: sealed, before publish" if (build / "layerscope.json").exists() else "saving detectors"

    return phase


def builds_started(out):
    """``progress()`` for `fit`: how many build directories have appeared in ``.staging`` so far.

    A ``progress`` kill of 1 then lands as soon as the run has created its build: while it saves.
    """
    seen = set()

    def progress():
        seen.update((out.parent / ".staging").glob(f"{out.name}.build-*"))
        return len(seen)

    return progress


def plan_fit_kills(rng, run_seconds):
    """Every phase of a fit killed at least once, whatever the timings, plus three kills at random moments.

    A fit run costs seconds (the kills of extract, a fraction of one), so each phase gets the kill that
    cannot miss it: a timer at 5% of an uninterrupted run (fitting: the build does not exist yet), a kill as
    soon as the build appears (saving), and the failpoints of the seal and of both steps of the publish.
    The random timers, drawn within 90% of a run, land wherever the run happens to be.
    """
    kills = [Kill("timer", round(0.05 * run_seconds, 3)), Kill("progress", 1)]
    kills += [Kill("timer", round(float(t), 3)) for t in rng.uniform(0.05, 0.9 * run_seconds, size=3)]
    kills += [Kill("failpoint", name) for name in FIT_FAILPOINTS]
    return [kills[i] for i in rng.permutation(len(kills))]


def fit_checker(reference):
    def check(out):
        try:
            fitted = load_detectors(out)
        except LayerscopeError as exc:
            assert "\n" not in str(exc)
            return
        assert differing(files(out), reference) == [], "detectors were accepted but differ from an uninterrupted fit"
        assert set(fitted.names) == set(FIT["detectors"])
    return check


def test_kills_anywhere_never_expose_partial_detectors_and_a_rerun_is_bit_identical(project, zygote, tmp_path):
    rng = np.random.default_rng(FIT_SEED)
    (project / "fit.yaml").write_text(yaml.safe_dump({"extract": EXTRACT, "fit": FIT}))
    reference, out = project / "reference-detectors", project / "detectors"
    if not (project / "features.zarr").exists():  # the store the extract campaign resumed (run alone: made here)
        assert run_once(zygote, argv(project, project / "features.zarr"), tmp_path / "x.log", Kill("none")) == 0
    start = time.monotonic()
    assert run_once(zygote, fit_argv(project, reference), tmp_path / "reference.log", Kill("none")) == 0
    run_seconds = time.monotonic() - start
    reference_files = files(reference)
    shutil.copytree(reference, out)  # an earlier fit: the publish kills have a set to displace
    kills = plan_fit_kills(rng, run_seconds)
    campaign = kill_campaign(fit_argv(project, out), out, kills, zygote=zygote, logs=tmp_path / "logs",
                             progress=builds_started(out), phase=fit_phase(), check=fit_checker(reference_files))
    log.warning("fault injection (fit): %s", campaign.report())
    print(campaign.report())
    landed = campaign.phases
    assert sum(landed.values()) >= len(kills) - 2, campaign.report()  # a random timer may come after the run
    for phase in [*FIT_PHASES, *(f"failpoint {name}" for name in FIT_FAILPOINTS)]:
        assert landed[phase] >= 1, campaign.report()
    assert run_once(zygote, fit_argv(project, out), tmp_path / "rerun.log", Kill("none")) == 0
    assert differing(files(out), reference_files) == [], "the refit differs from an uninterrupted fit"
    assert sorted(p.name for p in (project / ".staging").glob("detectors*")) == ["detectors.lock"]
    verify_detectors(out)
