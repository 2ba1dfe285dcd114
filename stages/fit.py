"""Stage ``fit``: fit every configured detector on every layer's ID-train features.

With ``fit.heatmap``, it also trains seed 002's heatmap decoder from the store
(features, maps and images of ID-train and the auxiliary outliers).
"""

import logging

from pipeline.artifacts import check_output
from pipeline.compute import open_runner
from pipeline.config import load_section
from pipeline.provenance import check_store_model
from pipeline.scorers import make_scorer
from pipeline.scoring import DETECTORS, fit_detectors, fit_on_train, save_detectors
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(params, features, out, model=None):
    """``model``: the checkpoint the store must have been extracted with (None: not checked)."""
    out = check_output(out, DETECTORS)  # first: never destroy a user's folder, never after minutes of fitting
    cfg = load_section("fit", params)
    compute = load_section("compute", params)  # where, not what: not a DVC dependency
    store = open_store(features)
    check_store_model(store, model)
    with open_runner(compute) as runner:
        fitted = fit_detectors(store, cfg.detectors, standardize=cfg.standardize,
                               max_samples=cfg.max_train_samples, seed=cfg.seed, runner=runner)
    if cfg.heatmap is not None:
        fitted.scorers["heatmap"] = fit_on_train(store, make_scorer("heatmap", cfg.heatmap, where="fit.heatmap"))
    save_detectors(fitted, out)
    log.info("fitted %d detectors x %d layers%s into %s", len(fitted.names), len(fitted.layers),
             " and the heatmap decoder" if fitted.scorers else "", out)
