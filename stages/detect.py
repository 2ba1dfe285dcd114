"""Stage ``detect``: score ID-test and every OOD test set; write metrics, table, figures.

Two metrics files: ``metrics`` is the compact headline DVC shows (near/far AUROC
and FPR per method, tens of numbers, so that ``dvc exp show`` fits a screen);
``detail`` holds every method, layer, aggregation and OOD set, and is a plain
output (``layerscope summary`` reads it).

Per-layer detectors come fitted from ``fit``; the network-level methods of
``detect.methods`` are fitted here on cached ID-train features, except the
heatmap decoder, which ``fit`` trained. Nothing here loads the model (or
imports torch): given ``model``, its file's SHA-256 must be the store's checkpoint.
"""

import logging

from pipeline.artifacts import check_dir_output, check_file_output
from pipeline.compute import open_runner
from pipeline.config import load_section
from pipeline.metrics import accuracy
from pipeline.provenance import check_store_model
from pipeline.report import (
    argmax_counts,
    detail_metrics,
    evaluate,
    group_sets,
    headline_metrics,
    ood_sets,
    table_rows,
    with_aggregations,
    write_csv,
    write_figures,
    write_json,
)
from pipeline.scoring import fit_scorers, load_detectors, score_splits
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run(params, features, detectors, metrics_out, table_out, figures_out, argmax_out, model=None, detail_out=None):
    """Score and report; ``detail_out`` None writes no detail file (the CLI always passes one)."""
    outputs = ((metrics_out, "metrics", "--metrics"), (detail_out, "metrics detail", "--detail"),
               (table_out, "per-layer table", "--table"), (argmax_out, "argmax counts", "--argmax"))
    for path, what, option in outputs:
        if path is not None:
            check_file_output(path, what, option)  # before the work
    check_dir_output(figures_out, "figures", "--figures")
    cfg = load_section("detect", params)
    compute = load_section("compute", params)  # where, not what: not a DVC dependency
    store = open_store(features)
    check_store_model(store, model)
    fitted = load_detectors(detectors, scorers=list(cfg.methods))
    fitted.check_compatible(store)
    scorers = fit_scorers(store, cfg.methods, trained=fitted.scorers)
    sets = ood_sets(store, "test")
    splits = ["id_val", "id_test", *(s["split"] for s in sets.values())]
    with open_runner(compute) as runner:
        scored = score_splits(store, detectors, scorers, splits, runner=runner, digest=fitted.digest)
    raw = {split: per_layer for split, (per_layer, _) in scored.items()}
    reference = raw.pop("id_val")

    def columns(split):
        cols = with_aggregations(raw[split], reference, fitted.layers, cfg.aggregations)
        return {**cols, **scored[split][1]}

    results = evaluate(columns("id_test"), {name: columns(s["split"]) for name, s in sets.items()},
                       group_sets(sets), recall=cfg.recall, aupr=cfg.aupr)
    id_acc = accuracy(store.to_numpy("id_test", "pred"), store.to_numpy("id_test", "label"))
    # recall: the OOD recall every FPR is read at; head: the logits layer (headlines use the one before it)
    head = store.provenance.get("head")
    write_json(headline_metrics(results, id_accuracy=id_acc, recall=cfg.recall, head=head), metrics_out)
    if detail_out is not None:
        write_json(detail_metrics(results, id_accuracy=id_acc, recall=cfg.recall, head=head, aupr=cfg.aupr),
                   detail_out)
    write_csv(table_rows(results, fitted.layers), table_out)
    write_json(argmax_counts(raw, fitted.layers), argmax_out)
    if cfg.figures:
        write_figures(results, fitted.layers, sets, figures_out)
    log.info("scored %d methods on %d OOD test sets", len(results), len(sets))
