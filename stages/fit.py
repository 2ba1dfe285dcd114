"""Stage ``fit``: fit every configured detector on every layer's ID-train features."""

import logging

from pipeline.config import load_section
from pipeline.scoring import fit_detectors, save_detectors
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(params, features, out):
    cfg = load_section("fit", params)
    store = open_store(features)
    fitted = fit_detectors(store, cfg.detectors, standardize=cfg.standardize,
                           max_samples=cfg.max_train_samples, seed=cfg.seed)
    save_detectors(fitted, out)
    log.info("fitted %d detectors x %d layers into %s", len(fitted.names), len(fitted.layers), out)
