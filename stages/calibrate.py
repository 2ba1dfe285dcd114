"""Stage ``calibrate``: thresholds of the early-exit guard, from ID-val scores in the store (no re-inference)."""

import logging

from pipeline.config import load_section
from pipeline.deploy import calibrate_guard, save_thresholds
from pipeline.scoring import load_detectors
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(params, features, detectors, out):
    cfg = load_section("calibrate", params)
    content = calibrate_guard(open_store(features), load_detectors(detectors), cfg)
    save_thresholds(content, out)
    log.info("guard thresholds for %s written to %s", content["layers"], out)
    return content
