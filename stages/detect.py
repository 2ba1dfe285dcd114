"""Stage ``detect``: score ID-test and every OOD test set; write metrics, table, figures."""

import logging

from pipeline.config import load_section
from pipeline.metrics import accuracy
from pipeline.report import evaluate, group_sets, ood_sets, table_rows, with_aggregations, write_csv, write_figures, write_json
from pipeline.scoring import load_detectors, score_split
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(params, features, detectors, metrics_out, table_out, figures_out):
    cfg = load_section("detect", params)
    store = open_store(features)
    fitted = load_detectors(detectors)
    fitted.check_compatible(store)
    sets = ood_sets(store, "test")
    layers = fitted.layers
    reference = score_split(store, "id_val", fitted)

    def columns(split):
        return with_aggregations(score_split(store, split, fitted), reference, layers, cfg.aggregations)

    results = evaluate(columns("id_test"), {name: columns(s["split"]) for name, s in sets.items()},
                       group_sets(sets), recall=cfg.recall)
    id_acc = accuracy(store.to_numpy("id_test", "pred"), store.to_numpy("id_test", "label"))
    write_json({"id_accuracy": round(id_acc, 6), "methods": results}, metrics_out)
    write_csv(table_rows(results, layers), table_out)
    if cfg.figures:
        write_figures(results, layers, sets, figures_out)
    log.info("scored %d methods on %d OOD test sets", len(results), len(sets))
