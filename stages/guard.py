"""Stage ``guard``: evaluate the calibrated early-exit guard on the cached test splits.

Decisions come from the store's features; the model is loaded only to count
each block's FLOPs (one probe input), never to run the data.
"""

import logging

from pipeline.deploy import evaluate_guard, load_guard, load_thresholds
from pipeline.report import write_json
from pipeline.scoring import load_detectors
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(features, detectors, thresholds, model, out, recall=0.95):
    guard = load_guard(model, detectors, thresholds, device="cpu")  # FLOPs do not depend on the device
    result = evaluate_guard(open_store(features), load_detectors(detectors), load_thresholds(thresholds),
                            guard.block_flops(), recall=recall)
    write_json(result, out)
    log.info("guard: ID-test TPR %.4f (target %.2f)", result["id_test_tpr"], result["target_tpr"])
    return result
