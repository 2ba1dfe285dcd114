"""Thresholds of the early-exit cascade: per-layer budgets that keep the *union* at the target ID TPR."""

import numpy as np
import pytest

from pipeline.cascade import calibrate, cascade_score, exit_layers, false_alarm_rate, thresholds_at
from pipeline.errors import ConfigError, DataError


def test_one_layer_known_answer():
    scores = np.arange(20, dtype=float)[:, None]  # 0..19
    cal = calibrate(scores, target_tpr=0.9)
    # 2 of 20 may be flagged: the threshold sits at 17, so 18 and 19 are above it
    assert cal.thresholds.tolist() == [17.0] and cal.val_tpr == 0.9
    assert false_alarm_rate(scores, cal.thresholds) == pytest.approx(0.1)


def test_identical_layers_share_their_false_alarms(rng):
    """Perfectly correlated layers flag the same samples: each keeps the whole budget (no Bonferroni halving)."""
    col = rng.normal(size=1000)
    cal = calibrate(np.column_stack([col, col]), target_tpr=0.95)
    assert cal.val_tpr >= 0.95 and cal.val_tpr == pytest.approx(0.95, abs=1e-3)
    assert cal.budgets == pytest.approx([0.05, 0.05], abs=1e-3)


def test_independent_layers_split_the_budget(rng):
    scores = rng.normal(size=(4000, 2))
    cal = calibrate(scores, target_tpr=0.95)
    # two independent layers: 1 - (1 - a)^2 = 0.05 gives a = 0.0253 each
    assert cal.budgets == pytest.approx([0.0253, 0.0253], abs=2e-3)
    assert 0.95 <= cal.val_tpr <= 0.95 + 1 / 4000 + 1e-12


def test_weights_set_relative_budgets_and_zero_never_stops(rng):
    scores = rng.normal(size=(2000, 3))
    cal = calibrate(scores, target_tpr=0.9, weights=[2, 1, 0])
    assert cal.budgets[0] == pytest.approx(2 * cal.budgets[1], rel=0.02) and cal.budgets[2] == 0
    assert np.isinf(cal.thresholds[2]) and cal.val_tpr >= 0.9


def test_exit_layers_and_cascade_score_agree_with_the_thresholds():
    scores = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    thresholds = np.array([1.0, 1.0])
    assert exit_layers(scores, thresholds).tolist() == [-1, 0, 1, 0]  # the first layer that flags
    cal = calibrate(np.array([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]), target_tpr=0.6)
    s = cascade_score(scores, cal)
    assert np.array_equal(s > 0, exit_layers(scores, cal.thresholds) >= 0)


def test_thresholds_at_zero_budget_is_infinite():
    scores = np.arange(10.0)[:, None].repeat(2, axis=1)
    assert thresholds_at(scores, [0.0, 0.2]).tolist() == [np.inf, 8.0]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"target_tpr": 1.0}, ConfigError, r"'target_tpr' parameter of calibrate must be a float in \(0, 1\). Got 1.0"),
    ({"target_tpr": True}, ConfigError, r"'target_tpr' parameter of calibrate must be a float in \(0, 1\)"),
    ({"weights": [1.0]}, ConfigError, r"'weights' parameter of calibrate must be 2 non-negative numbers"),
    ({"weights": [0, 0]}, ConfigError, r"'weights' parameter of calibrate must be 2 non-negative numbers, not all"),
    ({"weights": [-1, 2]}, ConfigError, r"'weights' parameter of calibrate must be 2 non-negative numbers"),
])
def test_param_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        calibrate(np.zeros((5, 2)), **kwargs)


@pytest.mark.parametrize("scores, message", [
    (np.zeros(5), r"shape \(n_samples >= 2, n_layers >= 1\); got shape \(5,\)"),
    (np.zeros((1, 2)), r"got shape \(1, 2\)"),
    (np.array([[0.0], [np.nan]]), r"got shape \(2, 1\) with NaN or inf"),
])
def test_score_errors(scores, message):
    with pytest.raises(DataError, match=message):
        calibrate(scores)
