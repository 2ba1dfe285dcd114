"""Stage ``calibrate``: thresholds of the early-exit guard, from ID-val scores in the store (no re-inference)."""

import logging

from pipeline.artifacts import check_file_output
from pipeline.config import load_section
from pipeline.deploy import calibrate_guard, save_thresholds
from pipeline.provenance import check_store_model
from pipeline.scoring import load_detectors
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(params, features, detectors, out, model=None):
    """``model``: the checkpoint the store must have been extracted with (None: not checked)."""
    out = check_file_output(out, "guard thresholds")  # before any work
    cfg = load_section("calibrate", params)
    store = open_store(features)
    check_store_model(store, model)
    content = calibrate_guard(store, load_detectors(detectors, only=[cfg.detector]), cfg)
    save_thresholds(content, out)
    log.info("guard thresholds for %s written to %s", content["layers"], out)
    return content
