"""Tests for pipeline.metrics: known answers worked out by hand, and agreement with scikit-learn's own functions."""

import sys

import numpy as np
import pytest
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from pipeline.errors import ConfigError, DataError
from pipeline.metrics import (
    AUPR_RULES,
    accuracy,
    fpr_key,
    group_means,
    metric_names,
    ood_metrics,
)


def test_metric_names_match_keys():
    assert set(ood_metrics([0.0], [1.0])) == set(metric_names())
    assert metric_names() == ("auroc", "fpr@95", "aupr_in", "aupr_out")


@pytest.mark.parametrize(("recall", "key"), [(0.95, "fpr@95"), (0.9, "fpr@90"), (0.85, "fpr@85"), (0.995, "fpr@99.5"),
                                             (1.0, "fpr@100"), (0.8, "fpr@80")])
def test_the_fpr_key_follows_the_recall(recall, key):
    assert fpr_key(recall) == key
    assert set(ood_metrics([0.0, 1.0], [2.0], recall=recall)) == {"auroc", key, "aupr_in", "aupr_out"}


def test_values_are_python_floats():
    result = ood_metrics(np.array([0.0, 1.0], np.float32), np.array([2.0]))
    assert all(type(value) is float for value in result.values())


def test_perfectly_separated():
    result = ood_metrics([0.0, 1.0, 2.0], [3.0, 4.0])
    assert result == {"auroc": 1.0, "fpr@95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}


def test_fully_reversed_is_not_flipped():
    # Every ID sample scores above every OOD sample. The direction is fixed per
    # method, so this reports AUROC 0, not 1 - AUROC (the seed-000 slip).
    result = ood_metrics([3.0, 4.0], [0.0, 1.0, 2.0])
    assert result["auroc"] == 0.0
    # Detecting all 3 OOD needs threshold 0, which flags both ID samples.
    assert result["fpr@95"] == 1.0
    # AUPR-Out, ranking 4I 3I 2O 1O 0O: precision at each OOD = 1/3, 2/4, 3/5.
    assert result["aupr_out"] == pytest.approx((1 / 3 + 2 / 4 + 3 / 5) / 3)
    # AUPR-In, ranking by -score 0O 1O 2O 3I 4I: precision at each ID = 1/4, 2/5.
    assert result["aupr_in"] == pytest.approx((1 / 4 + 2 / 5) / 2)


def test_ties_count_half():
    # Pairs (ood, id): (1,0)=1, (1,1)=0.5 (tie), (2,0)=1, (2,1)=1 -> 3.5 / 4.
    result = ood_metrics([0.0, 1.0], [1.0, 2.0])
    assert result["auroc"] == 0.875
    # Detecting both OOD needs threshold 1, which flags the ID sample at 1 (tie): 1/2.
    assert result["fpr@95"] == 0.5


def _mid_case():
    scores_id = [0.1, 0.2, 0.3, 0.4, 0.5]
    scores_ood = [1.0 + 0.01 * i for i in range(18)] + [0.25, 0.05]
    return scores_id, scores_ood


def test_fpr95_between_zero_and_one():
    # 20 OOD: 18 score >= 1.0, then 0.25, then 0.05. 95% recall = 19 of 20 OOD,
    # so the threshold must come down to 0.25. Flagged ID (score >= 0.25):
    # 0.3, 0.4, 0.5 -> FPR@95 = 3/5 = 0.6.
    # AUROC: the 18 high OOD beat all 5 ID (90 pairs), 0.25 beats 0.1 and 0.2
    # (2 pairs), 0.05 beats none -> 92 / (20 * 5) = 0.92.
    result = ood_metrics(*_mid_case())
    assert result["fpr@95"] == pytest.approx(0.6)
    assert result["auroc"] == pytest.approx(0.92)


@pytest.mark.parametrize(
    ("recall", "expected"),
    [
        (0.9, 0.0),  # 18 of 20 OOD: threshold 1.0, no ID flagged
        (0.95, 0.6),  # see test_fpr95_between_zero_and_one
        (1.0, 1.0),  # all 20 OOD: threshold 0.05, every ID flagged
    ],
)
def test_recall_sets_the_operating_point(recall, expected):
    assert ood_metrics(*_mid_case(), recall=recall)[fpr_key(recall)] == pytest.approx(expected)


def test_aupr_in_and_out_differ_on_asymmetric_case():
    # ID = [1, 2, 4], OOD = [3, 5]. Ranking by score: 5O 4I 3O 2I 1I.
    # AUPR-Out: precision at each OOD = 1/1, 2/3 -> (1 + 2/3) / 2 = 5/6.
    # AUPR-In, ranking by -score 1I 2I 3O 4I 5O: precision at each ID
    #   = 1/1, 2/2, 3/4 -> (1 + 1 + 3/4) / 3 = 11/12.
    # AUROC: 5 beats 3 ID, 3 beats 2 ID -> 5/6. FPR@95: both OOD needs
    # threshold 3, flagging ID 4 -> 1/3.
    result = ood_metrics([1.0, 2.0, 4.0], [3.0, 5.0])
    assert result["aupr_out"] == pytest.approx(5 / 6)
    assert result["aupr_in"] == pytest.approx(11 / 12)
    assert result["auroc"] == pytest.approx(5 / 6)
    assert result["fpr@95"] == pytest.approx(1 / 3)


def test_trapezoid_aupr_integrates_the_pr_curve_as_openood_does():
    # Same case. AUPR-Out's PR points (recall, precision), threshold 5 down to 3:
    # (0, 1) (0.5, 1) (0.5, 1/2) (1, 2/3): trapezoids 0.5 * 1 + 0.5 * (1/2 + 2/3) / 2 = 19/24.
    # AUPR-In (ID positive, ranked by -score 1I 2I 3O 4I 5O): (0, 1) (1/3, 1) (2/3, 1) (2/3, 2/3) (1, 3/4):
    # 2/3 + 1/3 * (2/3 + 3/4) / 2 = 65/72. AUROC and FPR do not change.
    result = ood_metrics([1.0, 2.0, 4.0], [3.0, 5.0], aupr="trapezoid")
    assert result["aupr_out"] == pytest.approx(19 / 24)
    assert result["aupr_in"] == pytest.approx(65 / 72)
    assert result["auroc"] == pytest.approx(5 / 6) and result["fpr@95"] == pytest.approx(1 / 3)


def test_unknown_aupr_rule_is_refused():
    with pytest.raises(ConfigError, match=r"'aupr' parameter of ood_metrics must be one of .*trapezoid.*Got 'trapz'"):
        ood_metrics([0.0], [1.0], aupr="trapz")


def test_fpr95_reads_the_exact_first_point_on_diagonal_ties():
    # Regression: roc_curve's default drop_intermediate=True drops the collinear
    # points of this all-diagonal curve, which gave FPR@95 = 1.0. Twenty tied
    # (ID, OOD) pairs: the 19th-highest pair reaches recall 19/20 = 0.95 with
    # 19 of 20 ID flagged -> 0.95.
    scores = np.arange(20.0)
    result = ood_metrics(scores, scores)
    assert result["fpr@95"] == pytest.approx(0.95)
    assert result["auroc"] == pytest.approx(0.5)


@pytest.mark.parametrize("transform", [np.exp, lambda s: 3.0 * s - 7.0, np.arctan])
def test_invariant_to_strictly_increasing_transform(rng, transform):
    scores_id = rng.normal(0.0, 1.0, size=200)
    scores_ood = rng.normal(1.0, 1.0, size=150)
    base = ood_metrics(scores_id, scores_ood)
    moved = ood_metrics(transform(scores_id), transform(scores_ood))
    assert moved == pytest.approx(base)
    assert 0.0 < base["fpr@95"] < 1.0


def test_group_means_on_literal_dict():
    per_set = {
        "cifar100": {"auroc": 0.8, "fpr@95": 0.6},
        "tin": {"auroc": 0.9, "fpr@95": 0.4},
        "svhn": {"auroc": 0.7, "fpr@95": 0.5},
        "mnist": {"auroc": 1.0, "fpr@95": 0.0},
    }
    groups = {"near": ["cifar100", "tin"], "far": ["svhn", "mnist"], "none": []}
    means = group_means(per_set, groups)
    assert means == {
        "near": {"auroc": pytest.approx(0.85), "fpr@95": pytest.approx(0.5)},
        "far": {"auroc": pytest.approx(0.85), "fpr@95": pytest.approx(0.25)},
    }


def test_group_means_is_unweighted():
    # A set's size plays no role: one value per set, plain mean.
    means = group_means({"a": {"auroc": 1.0}, "b": {"auroc": 0.0}, "c": {"auroc": 0.5}},
                        {"g": ["a", "b", "c"]})
    assert means["g"]["auroc"] == pytest.approx(0.5)


def test_accuracy_known_answer():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert type(accuracy(np.array([1]), np.array([1]))) is float


@pytest.mark.parametrize(
    ("scores_id", "scores_ood", "match"),
    [
        ([[0.0, 1.0]], [1.0], r"scores_id must be 1-D .* shape \(1, 2\)"),
        ([0.0], [], r"scores_ood is empty"),
        ([], [1.0], r"scores_id is empty"),
        ([0.0], [np.nan, np.inf, -np.inf, 1.0], r"scores_ood contains 3 non-finite values \(NaN or inf\)"),
        ([np.nan, 1.0], [1.0], r"scores_id contains 1 non-finite values"),
        (["a", "b"], [1.0], r"scores_id must be an array of numbers"),
    ],
)
def test_bad_scores_raise_data_error(scores_id, scores_ood, match):
    with pytest.raises(DataError, match=match):
        ood_metrics(scores_id, scores_ood)


@pytest.mark.parametrize("recall", [0.0, -0.1, 1.5, float("nan"), True, "0.95"])
def test_bad_recall_raises_config_error(recall):
    with pytest.raises(ConfigError, match=r"The 'recall' parameter of ood_metrics must be a float in \(0, 1\]"):
        ood_metrics([0.0], [1.0], recall=recall)


def test_group_means_missing_set():
    with pytest.raises(DataError, match=r"Group 'far' names data sets \['places'\] that have no metrics"):
        group_means({"svhn": {"auroc": 0.9}}, {"far": ["svhn", "places"]})


def test_group_means_mismatched_metrics():
    with pytest.raises(DataError, match=r"Group 'near': data set 'tin' has metrics \['auroc'\]"):
        group_means({"c100": {"auroc": 0.9, "fpr@95": 0.3}, "tin": {"auroc": 0.8}}, {"near": ["c100", "tin"]})


@pytest.mark.parametrize(
    ("pred", "labels", "match"),
    [
        ([0, 1], [0, 1, 2], r"pred has 2 entries but labels has 3"),
        ([], [], r"empty"),
        ([[0, 1]], [[0, 1]], r"must be 1-D"),
    ],
)
def test_accuracy_errors(pred, labels, match):
    with pytest.raises(DataError, match=match):
        accuracy(pred, labels)


# ood_metrics computes all four metrics from one sort; scikit-learn's own functions are the reference.
RECALLS = (0.5, 0.9, 0.95, 0.995, 1.0)


def sklearn_metrics(scores_id, scores_ood, recall, aupr):
    """The four metrics by scikit-learn's public functions, as pipeline.metrics computed them before."""
    scores = np.concatenate([scores_id, scores_ood])
    is_ood = np.concatenate([np.zeros(len(scores_id), int), np.ones(len(scores_ood), int)])

    def area(y_true, y_score):
        if aupr == "average_precision":
            return average_precision_score(y_true, y_score)
        precision, recall_, _ = precision_recall_curve(y_true, y_score)
        return auc(recall_, precision)

    fpr, tpr, _ = roc_curve(is_ood, scores, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(is_ood, scores),
        fpr_key(recall): fpr[np.searchsorted(tpr, recall, side="left")],
        "aupr_in": area(1 - is_ood, -scores),
        "aupr_out": area(is_ood, scores),
    }


def _sizes(rng):
    return int(rng.integers(1, 400)), int(rng.integers(1, 400))


# Each draws (scores_id, scores_ood) from rng. Integer-valued and rounded scores
# make long runs of ties shared by both classes, where the order of a sort
# within a run and the reading of the curve at run ends matter.
SCORE_CASES = {
    "continuous": lambda rng: (rng.normal(0, 1, _sizes(rng)[0]), rng.normal(rng.uniform(-1, 2), 1, _sizes(rng)[1])),
    "integer ties": lambda rng: tuple(rng.integers(0, rng.integers(1, 8), n).astype(float) for n in _sizes(rng)),
    "rounded": lambda rng: (np.round(rng.normal(0, 1, _sizes(rng)[0]), 1), np.round(rng.normal(1, 1, _sizes(rng)[1]), 1)),
    "all equal": lambda rng: tuple(np.full(n, 0.25) for n in _sizes(rng)),
    "one id": lambda rng: (rng.normal(0, 1, 1), rng.normal(0.5, 1, _sizes(rng)[1])),
    "one ood": lambda rng: (rng.normal(0, 1, _sizes(rng)[0]), rng.normal(0.5, 1, 1)),
    "one each": lambda rng: tuple(rng.integers(0, 2, 1).astype(float) for _ in range(2)),
    "unbalanced": lambda rng: (rng.normal(0, 1, 1000), rng.integers(-2, 3, 7).astype(float)),
    "signed zeros": lambda rng: tuple(rng.choice([-0.0, 0.0, 1.0], n) for n in _sizes(rng)),
}


@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_ood_metrics_equal_sklearn(rng, case):
    for _ in range(15):
        scores_id, scores_ood = SCORE_CASES[case](rng)
        for aupr in AUPR_RULES:
            for recall in RECALLS:
                expected = sklearn_metrics(scores_id, scores_ood, recall, aupr)
                result = ood_metrics(scores_id, scores_ood, recall=recall, aupr=aupr)
                assert result.keys() == expected.keys()
                for key, value in expected.items():
                    assert abs(result[key] - value) <= 1e-12, (case, aupr, recall, key, result[key], value)


def test_ood_metrics_need_no_sklearn(monkeypatch):
    # The one-sort implementation is numpy only, so `layerscope search` and detect
    # do not import scikit-learn for their metrics.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    for aupr in AUPR_RULES:
        assert ood_metrics([1.0, 2.0, 4.0], [3.0, 5.0], aupr=aupr)["auroc"] == pytest.approx(5 / 6)
