"""Tests for pipeline.detectors: the fit/score contract, the maths, the errors."""

import re
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from pipeline.detectors import (
    ClassConditionalMahalanobis,
    PyODDetector,
    Standardized,
    available_detectors,
    mahalanobis_scores,
    make_detector,
)
from pipeline.errors import ConfigError, DataError

ROC_FLOOR = 0.8  # PyOD's quality floor on synthetic data
SEEDED = {"iforest": {"random_state": 0}}  # randomness only from passed seeds


def auroc(scores_id, scores_ood):
    """AUROC with OOD as the positive class."""
    y = np.r_[np.zeros(len(scores_id)), np.ones(len(scores_ood))]
    return roc_auc_score(y, np.r_[scores_id, scores_ood])


def test_registry_lists_every_required_detector():
    expected = {"iforest", "ecod", "knn", "ocsvm", "lof", "copod", "hbos", "pca", "mahalanobis",
                "laood_ocsvm", "knn_l2", "rmds", "gmm", "ssd", "mahalanobis_pp", "rmds_pp"}
    assert set(available_detectors()) == expected
    assert available_detectors() == sorted(available_detectors())


@pytest.mark.parametrize("standardize", [True, False], ids=["std", "raw"])
@pytest.mark.parametrize("name", available_detectors())
def test_detector_contract(name, standardize, blobs):
    det = make_detector(name, SEEDED.get(name), standardize=standardize)
    assert det.fit(blobs.X_train, blobs.y_train) is det
    s_id, s_ood = det.score(blobs.X_id), det.score(blobs.X_ood)
    assert s_id.shape == (len(blobs.X_id),) and s_ood.shape == (len(blobs.X_ood),)
    assert np.isfinite(s_id).all() and np.isfinite(s_ood).all()
    assert auroc(s_id, s_ood) >= ROC_FLOOR
    fresh = clone(det)
    assert fresh.get_params(deep=False).keys() == det.get_params(deep=False).keys()
    with pytest.raises(NotFittedError):
        fresh.score(blobs.X_id)


def test_mahalanobis_scores_known_answer():
    means = np.array([[0.0, 0.0], [4.0, 0.0]])
    precision = np.diag([1.0, 0.25])
    X = np.array([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0], [0.0, 0.0]])
    # (1,2): to mu0 1 + 0.25*4 = 2, to mu1 9 + 1 = 10   -> 2
    # (3,0): to mu0 9,              to mu1 1             -> 1
    # (2,4): to mu0 4 + 4 = 8,      to mu1 4 + 4 = 8     -> 8
    # (0,0): to mu0 0                                    -> 0
    np.testing.assert_allclose(mahalanobis_scores(X, means, precision), [2.0, 1.0, 8.0, 0.0], atol=1e-12)


def test_mahalanobis_scores_matches_loop_reference(rng):
    X, means = rng.normal(size=(20, 4)), rng.normal(size=(3, 4))
    A = rng.normal(size=(4, 4))
    precision = A @ A.T + np.eye(4)
    diffs = X[:, None, :] - means[None, :, :]
    expected = np.einsum("nkd,de,nke->nk", diffs, precision, diffs).min(axis=1)
    np.testing.assert_allclose(mahalanobis_scores(X, means, precision), expected, rtol=1e-10)


def test_mahalanobis_scores_rejects_inconsistent_shapes():
    with pytest.raises(DataError, match=r"got X \(2, 3\), means \(1, 2\), precision \(2, 2\)"):
        mahalanobis_scores(np.zeros((2, 3)), np.zeros((1, 2)), np.eye(2))


def test_class_conditional_mahalanobis_fitted_state(blobs):
    X, y = blobs.X_train, blobs.y_train
    det = ClassConditionalMahalanobis(reg=0.0).fit(X, y)
    np.testing.assert_array_equal(det.classes_, [0, 1, 2])
    for i, c in enumerate(det.classes_):
        np.testing.assert_allclose(det.means_[i], X[y == c].mean(axis=0))
    centred = X - det.means_[y]
    np.testing.assert_allclose(det.covariance_, np.cov(centred, rowvar=False, bias=True))
    np.testing.assert_allclose(det.precision_ @ det.covariance_, np.eye(X.shape[1]), atol=1e-8)


def test_class_conditional_mahalanobis_requires_labels(blobs):
    assert ClassConditionalMahalanobis.requires_labels
    with pytest.raises(ConfigError, match=r"'y' parameter of ClassConditionalMahalanobis.fit.*Got None"):
        ClassConditionalMahalanobis().fit(blobs.X_train)
    with pytest.raises(DataError, match="X has 300 samples but y has 299 labels"):
        ClassConditionalMahalanobis().fit(blobs.X_train, blobs.y_train[:-1])


def test_class_conditional_mahalanobis_rejects_negative_reg(blobs):
    with pytest.raises(ConfigError, match=r"'reg' parameter .* non-negative float. Got -1.0"):
        ClassConditionalMahalanobis(reg=-1.0).fit(blobs.X_train, blobs.y_train)


def test_standardized_mirrors_requires_labels_and_passes_labels(blobs):
    std = make_detector("mahalanobis")
    assert std.requires_labels and not make_detector("knn").requires_labels
    with pytest.raises(ConfigError, match="'y' parameter"):
        std.fit(blobs.X_train)
    std.fit(blobs.X_train, blobs.y_train)
    np.testing.assert_allclose(std.scaler_.mean_, blobs.X_train.mean(axis=0))
    scaled = (blobs.X_id - blobs.X_train.mean(axis=0)) / blobs.X_train.std(axis=0)
    np.testing.assert_allclose(std.score(blobs.X_id), std.detector_.score(scaled))


def test_standardized_does_not_hand_labels_to_pyod(blobs):
    # PyOD warns "y should not be presented in unsupervised learning" if given y.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make_detector("knn").fit(blobs.X_train, blobs.y_train)


def test_standardized_leaves_wrapped_detector_unfitted(blobs):
    inner = ClassConditionalMahalanobis()
    Standardized(detector=inner).fit(blobs.X_train, blobs.y_train)
    assert not hasattr(inner, "means_")


def test_pyod_params_reach_the_model(blobs):
    det = PyODDetector(method="knn", params={"n_neighbors": 7}).fit(blobs.X_train)
    assert det.model_.n_neighbors == 7
    assert type(det.model_).__name__ == "KNN"


@pytest.mark.parametrize("method", ["ecod", "copod", "knn"])
def test_pyod_score_does_not_mutate_fitted_model(method, blobs):
    # PyOD's ECOD/COPOD store U_l, U_r, O on self inside decision_function.
    det = PyODDetector(method=method).fit(blobs.X_train)
    before = dict(vars(det.model_))
    det.score(blobs.X_ood)
    after = vars(det.model_)
    assert after.keys() == before.keys()
    assert all(after[k] is v for k, v in before.items())


@pytest.mark.parametrize("method", ["ecod", "copod"])
def test_ecdf_scores_do_not_depend_on_batch(method, blobs):
    # PyOD 3.6.7's ECOD/COPOD decision_function re-fits the ECDFs on
    # X_train + the scored batch: the same OOD rows scored alone vs. with
    # ID rows differed by ~20%. pipeline.scoring scores in blocks, so
    # PyODDetector scores each row as if scored on its own.
    det = PyODDetector(method=method).fit(blobs.X_train)
    both = det.score(np.r_[blobs.X_ood, blobs.X_id])
    np.testing.assert_allclose(det.score(blobs.X_ood), both[: len(blobs.X_ood)], rtol=1e-12)


@pytest.mark.parametrize("method", ["ecod", "copod"])
@pytest.mark.parametrize("integer_data", [False, True], ids=["float", "ties"])
def test_ecdf_scores_equal_pyod_row_by_row(method, integer_data, blobs, rng):
    X_train, X = blobs.X_train, np.r_[blobs.X_id[:20], blobs.X_ood[:20]]
    if integer_data:  # many ties, values outside the training range
        X_train, X = rng.integers(0, 5, size=(200, 6)) * 1.0, rng.integers(-1, 7, size=(40, 6)) * 1.0
    det = PyODDetector(method=method).fit(X_train)
    pyod_alone = [det.model_.decision_function(row[None, :])[0] for row in X]
    np.testing.assert_allclose(det.score(X), pyod_alone, rtol=1e-10)


def test_unknown_detector_name_lists_available():
    listed = re.escape(str(available_detectors()))
    with pytest.raises(ConfigError, match=rf"'fit.detectors' parameter of fit must be one of {listed}. Got 'KNN'"):
        make_detector("KNN")


def test_unknown_pyod_param_is_rejected(blobs):
    with pytest.raises(ConfigError, match=r"Unknown parameter 'fit.detectors.knn.n_neighbours'. Valid parameters "
                                          r"of 'fit.detectors.knn' are \[.*'n_neighbors'"):
        make_detector("knn", {"n_neighbours": 3})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bogus'\]"):
        PyODDetector(method="iforest", params={"bogus": 1}).fit(blobs.X_train)


def test_unknown_pyod_method_is_rejected(blobs):
    with pytest.raises(ConfigError, match=r"'method' parameter of PyODDetector must be one of \['copod'.*Got 'gmm'"):
        PyODDetector(method="gmm").fit(blobs.X_train)


def test_unknown_mahalanobis_param_is_rejected():
    with pytest.raises(ConfigError, match=r"Unknown parameter 'fit.detectors.mahalanobis.shrinkage'. Valid "
                                          r"parameters of 'fit.detectors.mahalanobis' are \['normalize', 'reg'\]"):
        make_detector("mahalanobis", {"shrinkage": 0.1})


@pytest.mark.parametrize("name", ["knn", "mahalanobis"])
def test_wrong_feature_count_at_score(name, blobs):
    det = make_detector(name).fit(blobs.X_train, blobs.y_train)
    with pytest.raises(DataError, match="X has 3 features, but Standardized was fitted with 8 features"):
        det.score(blobs.X_id[:, :3])
    raw = make_detector(name, standardize=False).fit(blobs.X_train, blobs.y_train)
    with pytest.raises(DataError, match="X has 3 features, but .* was fitted with 8 features"):
        raw.score(blobs.X_id[:, :3])


@pytest.mark.parametrize(
    "det", [make_detector("ecod"), PyODDetector(), ClassConditionalMahalanobis()],
    ids=["Standardized", "PyODDetector", "ClassConditionalMahalanobis"],
)
def test_not_fitted(det, blobs):
    name = type(det).__name__
    msg = rf"This {name} instance is not fitted yet. Call 'fit' with appropriate arguments"
    with pytest.raises(NotFittedError, match=msg):
        det.score(blobs.X_id)


@pytest.mark.parametrize("name", ["knn", "mahalanobis"])
def test_nan_input_is_rejected(name, blobs):
    X = blobs.X_train.copy()
    X[3, 2] = np.nan
    with pytest.raises(DataError, match="Input X contains NaN"):
        make_detector(name).fit(X, blobs.y_train)
    det = make_detector(name).fit(blobs.X_train, blobs.y_train)
    with pytest.raises(DataError, match="Input X contains NaN"):
        det.score(X)


def test_one_dimensional_input_is_rejected(blobs):
    with pytest.raises(DataError, match="Expected 2D array, got 1D array"):
        make_detector("knn").fit(blobs.X_train[:, 0])


def test_pyod_constructor_value_error_becomes_config_error(blobs):
    # PyOD's HBOS validates alpha in __init__ and raises a bare ValueError.
    with pytest.raises(ConfigError, match=r"Invalid params for PyOD model 'hbos': alpha is set to 2"):
        make_detector("hbos", {"alpha": 2}).fit(blobs.X_train)
