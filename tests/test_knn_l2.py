"""Tests for pipeline.detectors.knn_l2: kNN distance on L2-normalised features."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.detectors import KNNL2, SELF_NORMALISING, l2_normalise, make_detector
from pipeline.detectors.knn_l2 import kth_neighbour_distance
from pipeline.errors import ConfigError

ROC_FLOOR = 0.8
# normalised: (1, 0), (0, 1), (-1, 0), (0, -1)
TRAIN = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, -0.5]])


def test_known_answer_on_2d_points():
    # (2, 2) -> z = (1, 1) / sqrt(2); ||z - t||^2 = 2 - 2 cos(z, t):
    # to (1, 0) and (0, 1): 2 - sqrt(2); to (-1, 0) and (0, -1): 2 + sqrt(2)
    # (0, 0) stays 0 -> distance 1 to every unit vector
    X = np.array([[2.0, 2.0], [0.0, 0.0], [5.0, 0.0]])
    near, far = np.sqrt(2 - np.sqrt(2)), np.sqrt(2 + np.sqrt(2))
    np.testing.assert_allclose(KNNL2(k=1).fit(TRAIN).score(X), [near, 1.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(KNNL2(k=3).fit(TRAIN).score(X), [far, 1.0, np.sqrt(2)], atol=1e-9)
    np.testing.assert_allclose(kth_neighbour_distance(l2_normalise(X), l2_normalise(TRAIN), 3),
                               [far, 1.0, np.sqrt(2)], atol=1e-9)


def test_l2_normalise_guards_zero_rows():
    Z = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(Z, [[0.6, 0.8], [0.0, 0.0]], atol=1e-10)


def test_scores_ignore_the_scale_of_each_row(blobs):
    det = KNNL2(k=5).fit(blobs.X_train)
    np.testing.assert_allclose(det.score(blobs.X_id * 7.0), det.score(blobs.X_id))


def test_registry_does_not_standardise_knn_l2(blobs):
    assert "knn_l2" in SELF_NORMALISING
    det = make_detector("knn_l2", {"k": 5}, standardize=True)
    assert isinstance(det, KNNL2) and det.k == 5


def test_auroc_floor_on_blobs(blobs):
    det = make_detector("knn_l2").fit(blobs.X_train)
    s_id, s_ood = det.score(blobs.X_id), det.score(blobs.X_ood)
    y = np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))]
    assert roc_auc_score(y, np.r_[s_id, s_ood]) >= ROC_FLOOR


@pytest.mark.parametrize("k", [0, 5, 2.5, True])
def test_k_must_be_in_1_to_n_train(k):
    with pytest.raises(ConfigError, match=r"'k' parameter of KNNL2 must be an integer in \[1, n_train\] "
                                          rf"with n_train=4. Got {k!r}"):
        KNNL2(k=k).fit(TRAIN)
