import numpy as np
import pytest

from pipeline.aggregate import aggregate, argmax_layer_counts, fit_standardizer
from pipeline.errors import ConfigError, DataError

REF = np.array([[0.0, 10.0], [2.0, 30.0]])  # layer means (1, 20), stds (1, 10)


def test_standardizer_known_answer():
    mean, std = fit_standardizer(REF)
    np.testing.assert_allclose(mean, [1, 20])
    np.testing.assert_allclose(std, [1, 10])


def test_max_and_mean_of_z_scores():
    scores = np.array([[3.0, 20.0], [1.0, 50.0]])  # z = [[2, 0], [0, 3]]
    np.testing.assert_allclose(aggregate(scores, REF, "max_z"), [2, 3])
    np.testing.assert_allclose(aggregate(scores, REF, "mean_z"), [1, 1.5])
    np.testing.assert_array_equal(argmax_layer_counts(scores), [0, 2])
    np.testing.assert_allclose(aggregate(scores, REF, "max"), [20, 50])


def test_constant_layer_contributes_zero_not_nan():
    ref = np.array([[1.0, 0.0], [1.0, 2.0]])
    out = aggregate(np.array([[1.0, 1.0]]), ref, "mean_z")
    assert np.isfinite(out).all()


def test_errors():
    with pytest.raises(ConfigError, match=r"'detect.aggregations' .* Got 'median'"):
        aggregate(REF, REF, "median")
    with pytest.raises(DataError, match=r"Reference scores must have shape"):
        fit_standardizer(np.zeros(3))
