"""Stage ``fit``: fit every configured detector on every layer's ID-train features."""

import logging

from pipeline.compute import open_runner
from pipeline.config import load_section
from pipeline.scoring import fit_detectors, save_detectors
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(params, features, out):
    cfg = load_section("fit", params)
    compute = load_section("compute", params)  # where, not what: not a DVC dependency
    store = open_store(features)
    with open_runner(compute) as runner:
        fitted = fit_detectors(store, cfg.detectors, standardize=cfg.standardize,
                               max_samples=cfg.max_train_samples, seed=cfg.seed, runner=runner)
    save_detectors(fitted, out)
    log.info("fitted %d detectors x %d layers into %s", len(fitted.names), len(fitted.layers), out)
