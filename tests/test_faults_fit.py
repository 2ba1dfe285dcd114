"""SIGKILL `layerscope fit` many times at random points; no reader ever accepts partial detectors (issue 14).

The same harness as ``tests/test_faults.py`` (:mod:`tests.faults`), on the
detectors directory: kills after a random delay (while fitting, while saving)
and at the failpoints of the seal and of both steps of the publish. After
every kill, the detectors at ``--out`` are either refused by
:func:`~pipeline.scoring.load_detectors` or complete and byte-identical to an
uninterrupted fit (the set there before the campaign is one). ``fit`` is not
resumable (it refits), but a killed fit's build is cleared by the next one,
and the final rerun gives byte-identical detectors.
"""

import logging
import shutil
import time

import numpy as np
import yaml

from pipeline.errors import LayerscopeError
from pipeline.scoring import load_detectors, verify_detectors
from tests.faults import Kill, Zygote, kill_campaign, run_once, tree_bytes
from tests.test_faults import EXTRACT, argv as extract_argv, project  # noqa: F401  (the module fixture)

log = logging.getLogger(__name__)

SEED = 15
FIT = {"detectors": {"mahalanobis": {}, "knn": {"n_neighbors": 3}, "iforest": {"n_estimators": 10, "random_state": 0}},
       "standardize": True}
FAILPOINTS = ["seal:before-manifest", "publish:after-aside", "publish:after-swap"]
N_KILLS = 10


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


def checker(reference):
    def check(out):
        try:
            fitted = load_detectors(out)
        except LayerscopeError as exc:
            assert "\n" not in str(exc)
            return
        assert tree_bytes(out) == reference, "detectors were accepted but differ from an uninterrupted fit"
        assert set(fitted.names) == set(FIT["detectors"])
    return check


def test_kills_anywhere_never_expose_partial_detectors_and_a_rerun_is_bit_identical(project, tmp_path):  # noqa: F811
    rng = np.random.default_rng(SEED)
    (project / "fit.yaml").write_text(yaml.safe_dump({"extract": EXTRACT, "fit": FIT}))
    reference, out = project / "reference-detectors", project / "detectors"
    with Zygote(project) as zygote:
        if not (project / "features.zarr").exists():
            assert run_once(zygote, extract_argv(project, project / "features.zarr"), tmp_path / "x.log",
                            Kill("none")) == 0
        start = time.monotonic()
        assert run_once(zygote, fit_argv(project, reference), tmp_path / "reference.log", Kill("none")) == 0
        run_seconds = time.monotonic() - start
        reference_files = tree_bytes(reference)
        shutil.copytree(reference, out)  # an earlier fit: the publish kills have a set to displace
        kills = [Kill("timer", round(float(t), 3)) for t in rng.uniform(0.05, run_seconds, size=N_KILLS)]
        for name in FAILPOINTS:
            kills.insert(int(rng.integers(0, 6)), Kill("failpoint", name))
        campaign = kill_campaign(fit_argv(project, out), out, kills, zygote=zygote, logs=tmp_path / "logs",
                                 progress=lambda: 0, phase=fit_phase(), check=checker(reference_files),
                                 n_kills=N_KILLS)
        log.warning("fault injection (fit): %s", campaign.report())
        print(campaign.report())
        landed = campaign.phases
        assert sum(landed.values()) >= 8, campaign.report()
        for name in FAILPOINTS:
            assert landed[f"failpoint {name}"] >= 1, campaign.report()
        assert run_once(zygote, fit_argv(project, out), tmp_path / "rerun.log", Kill("none")) == 0
    assert tree_bytes(out) == reference_files, "the refit differs from an uninterrupted fit"
    assert sorted(p.name for p in (project / ".staging").glob("detectors*")) == ["detectors.lock"]
    verify_detectors(out)
