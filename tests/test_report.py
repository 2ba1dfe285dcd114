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
