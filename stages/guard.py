"""Stage ``guard``: evaluate the calibrated early-exit guard on the cached test splits.

Decisions come from the store's features; the model is loaded only to count
each block's FLOPs (one probe input), never to run the data. Before that, the
four inputs must belong together: the detectors were fitted on this store and
on this model's features, the thresholds calibrated with these detectors for
this model (:mod:`pipeline.provenance`).
"""

import logging

from pipeline.artifacts import check_file_output
from pipeline.deploy import build_guard, evaluate_guard, load_thresholds
from pipeline.report import write_json
from pipeline.scoring import load_detectors
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(features, detectors, thresholds, model, out, recall=0.95):
    check_file_output(out, "guard report")  # before the work
    store = open_store(features)
    content = load_thresholds(thresholds)
    fitted = load_detectors(detectors, only=[content["detector"]])  # the guard's own: not every kind's imports
    fitted.check_compatible(store)  # before the model is loaded
    guard = build_guard(model, fitted, content, device="cpu", thresholds_path=thresholds)  # FLOPs: any device
    result = evaluate_guard(store, fitted, content, guard.block_flops(), recall=recall, thresholds_path=thresholds)
    write_json(result, out)
    log.info("guard: ID-test TPR %.4f (target %.2f)", result["id_test_tpr"], result["target_tpr"])
    return result
