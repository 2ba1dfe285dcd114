import numpy as np

from pipeline.report import evaluate, table_rows, with_aggregations


def test_evaluate_known_answer_with_groups():
    id_scores = {"m": {"l1": np.array([0.0, 1.0, 2.0, 3.0])}}
    ood = {"near1": {"m": {"l1": np.array([4.0, 5.0])}},        # perfectly separated: AUROC 1
           "far1": {"m": {"l1": np.array([-1.0, -2.0])}},       # below every ID score: AUROC 0
           "far2": {"m": {"l1": np.array([1.5, 10.0])}}}        # 1.5 beats 2 of 4 ID, 10 beats all: (2+4)/8
    results = evaluate(id_scores, ood, {"near": ["near1"], "far": ["far1", "far2"]})
    per = results["m"]["l1"]
    assert per["near1"]["auroc"] == 1.0 and per["far1"]["auroc"] == 0.0
    assert per["far2"]["auroc"] == 0.75
    assert per["far"]["auroc"] == 0.375 and per["near"]["auroc"] == 1.0


def test_aggregations_are_added_and_rows_keep_network_order():
    scores = {"m": np.array([[1.0, 2.0], [3.0, 4.0]])}
    reference = {"m": np.array([[0.0, 0.0], [2.0, 4.0]])}  # means (1, 2), stds (1, 2)
    cols = with_aggregations(scores, reference, ["a", "b"], ["max_z", "mean_z"])["m"]
    assert list(cols) == ["a", "b", "max_z", "mean_z"]
    np.testing.assert_allclose(cols["max_z"], [0.0, 2.0])
    np.testing.assert_allclose(cols["mean_z"], [0.0, 1.5])  # z = [[0, 0], [2, 1]]
    results = evaluate({"m": cols}, {"x": {"m": {c: v + 5 for c, v in cols.items()}}}, {"near": [], "far": ["x"]})
    rows = table_rows(results, ["a", "b"])
    assert [r["layer"] for r in rows] == ["a", "b", "max_z", "mean_z"]
    assert [r["kind"] for r in rows] == ["layer", "layer", "aggregation", "aggregation"]
    assert rows[0]["auroc_far"] == 1.0 and "auroc_near" not in rows[0]


def _results():
    per = {"near": {"auroc": 0.9, "fpr@90": 0.3, "aupr_in": 0.8, "aupr_out": 0.7},
           "far": {"auroc": 0.95, "fpr@90": 0.2, "aupr_in": 0.9, "aupr_out": 0.8}}
    other = {g: {**v, "auroc": 0.5} for g, v in per.items()}
    return {"knn": {"layer1": other, "avgpool": per, "fc": other, "max_z": other},
            "msp": {"score": {**per, "svhn": per["far"]}}}


def test_headline_metrics_are_compact_and_use_the_penultimate_layer():
    from pipeline.report import headline_metrics

    out = headline_metrics(_results(), id_accuracy=0.97123456789, recall=0.9, head="fc")
    assert out == {"id_accuracy": 0.971235, "recall": 0.9, "layer": "avgpool",
                   **{m: {"auroc_near": 0.9, "auroc_far": 0.95, "fpr@90_near": 0.3, "fpr@90_far": 0.2}
                      for m in ("knn", "msp")}}


def test_detail_file_is_read_back_and_the_compact_file_is_refused(tmp_path):
    import json

    import pytest

    from pipeline.errors import DataError
    from pipeline.report import detail_metrics, headline_metrics, read_detail, write_json

    kwargs = {"id_accuracy": 0.9, "recall": 0.9, "head": "fc"}
    detail = write_json(detail_metrics(_results(), **kwargs, aupr="trapezoid"), tmp_path / "detail.json")
    assert read_detail(detail)["methods"] == json.loads(json.dumps(_results()))
    assert read_detail(detail)["aupr"] == "trapezoid"
    compact = write_json(headline_metrics(_results(), **kwargs), tmp_path / "metrics.json")
    with pytest.raises(DataError, match=r"'.*metrics.json' holds only the headline numbers .*Hint: pass the detail "
                                        r"file .*paths.detail"):
        read_detail(compact)


def test_separate_ood_val_sets_stand_for_both_groups():
    from pipeline.report import group_sets

    sets = {"tin": {"split": "tin_val", "role": "ood_val"}}
    assert group_sets(sets) == {"near": ["tin"], "far": ["tin"]}
