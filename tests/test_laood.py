"""Tests for pipeline.detectors.laood: self-adaptive shifting and LA-OOD's OCSVM."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.detectors import LAOODOCSVM, Standardized, make_detector, self_adaptive_shifting
from pipeline.detectors import laood
from pipeline.errors import ConfigError, DataError

ROC_FLOOR = 0.8


def auroc(scores_id, scores_ood):
    """AUROC with OOD as the positive class."""
    return roc_auc_score(np.r_[np.zeros(len(scores_id)), np.ones(len(scores_ood))], np.r_[scores_id, scores_ood])


def test_shifting_known_answer_on_a_line():
    X = np.c_[np.arange(5.0), np.zeros(5)]
    # k = 2. Ends: x0's neighbours x1, x2 -> n = (-1,0) + (-1,0), all on the inner side -> edge;
    # x4 likewise with n = (2, 0). x1, x2, x3 have a neighbour on each side: n = 0, no edge.
    # Mean kNN distance: x0 (1 + 2), x1..x3 (1 + 1) each, x4 (1 + 2) -> 12 / 10 = 1.2.
    np.testing.assert_allclose(self_adaptive_shifting(X, k=2), [[-1.2, 0.0], [5.2, 0.0]], atol=1e-7)


def test_shifting_puts_pseudo_outliers_outside_a_disc(rng):
    radius, angle = np.sqrt(rng.uniform(size=300)), rng.uniform(0, 2 * np.pi, size=300)
    disc = np.c_[radius * np.cos(angle), radius * np.sin(angle)]
    pseudo = self_adaptive_shifting(disc)  # k = ceil(5 * log10(300)) = 13
    assert len(pseudo) > 0
    assert np.all(np.linalg.norm(pseudo, axis=1) > np.percentile(np.linalg.norm(disc, axis=1), 90))


def test_shifting_needs_more_samples_than_neighbours():
    with pytest.raises(DataError, match="k=3 with n_samples=3"):
        self_adaptive_shifting(np.eye(3), k=3)


def test_gamma_selection(blobs):
    det = make_detector("laood_ocsvm").fit(blobs.X_train).detector_
    errors = det.selection_errors_
    assert list(errors) == list(LAOODOCSVM().gammas)
    assert all(0.0 <= e <= 1.0 for e in errors.values())
    assert errors[det.gamma_] == min(errors.values())
    # better than a constant answer (error 0.5), and neither end of the grid on these blobs
    assert errors[det.gamma_] < 0.5 and min(errors) < det.gamma_ < max(errors)
    assert det.model_.gamma == det.gamma_ and det.model_.nu == 0.001
    assert det.model_.fit_status_ == 0 and det.model_.n_features_in_ == blobs.X_train.shape[1]


def test_ties_go_to_the_smaller_gamma(blobs, monkeypatch):
    monkeypatch.setattr(laood, "selection_error", lambda model, pseudo, held: 0.25)
    det = LAOODOCSVM(gammas=(0.1, 0.01, 0.05)).fit(blobs.X_train)
    assert det.gamma_ == 0.01


@pytest.mark.parametrize("pseudo_from", ["train", "holdout"])
def test_auroc_floor_on_blobs(blobs, pseudo_from):
    det = make_detector("laood_ocsvm", {"pseudo_from": pseudo_from})
    assert isinstance(det, Standardized)  # standardised first, as the registry does
    det.fit(blobs.X_train)
    assert auroc(det.score(blobs.X_id), det.score(blobs.X_ood)) >= ROC_FLOOR


def test_score_is_the_negated_decision_function(blobs):
    det = LAOODOCSVM().fit(blobs.X_train)
    np.testing.assert_allclose(det.score(blobs.X_ood), -det.model_.decision_function(blobs.X_ood))


def test_split_sizes_and_pseudo_outlier_source(blobs):
    n = len(blobs.X_train)  # 300: hold-out ceil(0.3 * 300) = 90, train 210
    train, held = LAOODOCSVM()._split(blobs.X_train)
    assert (len(train), len(held)) == (210, 90)
    np.testing.assert_allclose(LAOODOCSVM().fit(blobs.X_train).pseudo_outliers_, self_adaptive_shifting(train))
    np.testing.assert_allclose(LAOODOCSVM(pseudo_from="holdout").fit(blobs.X_train).pseudo_outliers_,
                               self_adaptive_shifting(held))
    assert n == len(train) + len(held)


def test_deterministic_with_a_seed(blobs):
    a, b = LAOODOCSVM(seed=7).fit(blobs.X_train), LAOODOCSVM(seed=7).fit(blobs.X_train)
    assert a.gamma_ == b.gamma_ and a.selection_errors_ == b.selection_errors_
    np.testing.assert_array_equal(a.pseudo_outliers_, b.pseudo_outliers_)
    np.testing.assert_array_equal(a.score(blobs.X_ood), b.score(blobs.X_ood))
    c = LAOODOCSVM(seed=8).fit(blobs.X_train)
    assert not np.array_equal(a.pseudo_outliers_, c.pseudo_outliers_)


@pytest.mark.parametrize("params, match", [
    ({"nu": 0.0}, r"'nu' parameter of LAOODOCSVM must be a float in \(0, 1\]. Got 0.0"),
    ({"nu": 1.5}, r"'nu' parameter of LAOODOCSVM must be a float in \(0, 1\]"),
    ({"holdout": 1.0}, r"'holdout' parameter of LAOODOCSVM must be a float in \(0, 1\). Got 1.0"),
    ({"gammas": ()}, r"'gammas' parameter of LAOODOCSVM must be a non-empty sequence of positive floats"),
    ({"gammas": (0.1, -1)}, r"'gammas' parameter .*Got \(0.1, -1\)"),
    ({"gammas": "scale"}, r"'gammas' parameter"),
    ({"pseudo_from": "val"}, r"'pseudo_from' parameter of LAOODOCSVM must be one of \['holdout', 'train'\]"),
])
def test_param_errors(params, match, blobs):
    with pytest.raises(ConfigError, match=match):
        LAOODOCSVM(**params).fit(blobs.X_train)


def test_unknown_registry_param_is_rejected():
    with pytest.raises(ConfigError, match=r"Unknown parameter 'fit.detectors.laood_ocsvm.gamma'. Valid parameters "
                                          r"of 'fit.detectors.laood_ocsvm' are \['gammas', 'holdout'"):
        make_detector("laood_ocsvm", {"gamma": 0.1})


def test_degenerate_features_raise_data_error():
    with pytest.raises(DataError, match="no edge point"):
        LAOODOCSVM().fit(np.ones((50, 3)))
