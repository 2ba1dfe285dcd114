"""Tests for pipeline.scorers.nac: NAC-UE's bins, histograms, coverage and scorer."""

import numpy as np
import pytest
from scipy.special import logit
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from pipeline.errors import ConfigError, DataError
from pipeline.scorers.base import Features
from pipeline.scorers.nac import (
    NACScorer,
    coverage,
    coverage_scores,
    histogram_counts,
    nac_thresholds,
    neuron_states,
)

ROC_FLOOR = 0.8

# 4 intervals [0, .25) [.25, .5) [.5, .75) [.75, 1); 5 training samples x 3 neurons
EDGES = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
TRAIN_STATES = np.array([
    [0.1, 0.55, 0.0],
    [0.2, 0.6, 0.25],
    [0.3, 0.7, 0.5],
    [0.6, 0.74, 0.75],
    [0.9, 1.0, 0.99],   # 1.0 is not below the last edge: outside every interval
])


def make_features(states, labels=None, spatial=4, alpha=1.0, layer="l"):
    """Features whose states at ``alpha`` are ``states``: o * g = logit(s) / alpha, o = 1."""
    o = np.ones_like(states)
    return Features(layers={layer: o / spatial}, grads={layer: logit(states) / alpha},
                    spatial_size={layer: spatial}, labels=labels)


def test_thresholds_match_the_reference_logspace():
    np.testing.assert_allclose(nac_thresholds(4), [0.0, 0.5, 1.01, 1.2])
    # h = 3: x = linspace(1, sqrt(1000), 3) = [1, (1 + sqrt(1000)) / 2, sqrt(1000)]
    # left = log_1000(x) = [0, a, 0.5], a = log10((1 + sqrt(1000)) / 2) / 3 = 0.404164
    # edges = [0, a] + [0.5, 1 - a, 1 + 0.01] + [1.2]
    a = np.log10((1 + np.sqrt(1000)) / 2) / 3
    np.testing.assert_allclose(nac_thresholds(6), [0.0, a, 0.5, 1 - a, 1.01, 1.2])
    assert abs(a - 0.404164) < 1e-6
    edges = nac_thresholds(50)
    assert edges.shape == (50,) and np.all(np.diff(edges) > 0)


def test_histogram_coverage_and_scores_known_answer():
    counts = histogram_counts(TRAIN_STATES, EDGES)
    # neuron 0: .1 .2 -> bin 0, .3 -> 1, .6 -> 2, .9 -> 3        -> [2, 1, 1, 1]
    # neuron 1: .55 .6 .7 .74 -> bin 2, 1.0 outside                -> [0, 0, 4, 0]
    # neuron 2: 0 -> 0, .25 -> 1, .5 -> 2, .75 .99 -> 3           -> [1, 1, 1, 2]
    np.testing.assert_array_equal(counts, [[2, 0, 1], [1, 0, 1], [1, 4, 1], [1, 0, 2]])
    cov = coverage(counts, O=2)  # min(count / 2, 1)
    np.testing.assert_allclose(cov, [[1, 0, .5], [.5, 0, .5], [.5, 1, .5], [.5, 0, 1]])
    test = np.array([[0.05, 0.6, 0.8],    # bins 0, 2, 3 -> coverage 1, 1, 1   -> mean 1
                     [0.4, 0.1, 1.5]])    # bins 1, 0, -  -> coverage .5, 0, 0 -> mean 1/6
    np.testing.assert_allclose(coverage_scores(test, EDGES, cov), [1.0, 1 / 6])


def test_scorer_known_answer_is_the_negated_coverage():
    # M = 4: intervals [0, .5) [.5, 1.01) [1.01, 1.2); O = 2
    # train states per neuron: n0 [.1 .2 .3 .6 .9] -> counts [3, 2, 0] -> coverage [1, 1, 0]
    #                          n1 [.55 .6 .7 .74 .999] -> [0, 5, 0] -> [0, 1, 0]
    #                          n2 [.01 .25 .5 .75 .99] -> [2, 3, 0] -> [1, 1, 0]
    train = TRAIN_STATES.copy()
    train[4, 1], train[0, 2] = 0.999, 0.01
    labels = np.zeros(5, dtype=int)
    scorer = NACScorer(M=4, O=2, alpha=2.0, n_train=5).fit(make_features(train, labels, alpha=2.0))
    np.testing.assert_array_equal(scorer.counts_["l"], [[3, 0, 2], [2, 5, 3], [0, 0, 0]])
    test = np.array([[0.05, 0.6, 0.8],   # coverage 1, 1, 1 -> ID-ness 1
                     [0.4, 0.1, 0.3]])   # coverage 1, 0, 1 -> ID-ness 2/3
    layers = scorer.score_layers(make_features(test, alpha=2.0))
    np.testing.assert_allclose(layers["l"], [-1.0, -2 / 3])
    np.testing.assert_allclose(scorer.score(make_features(test, alpha=2.0)), [-1.0, -2 / 3])


def test_neuron_states_are_the_sigmoid_of_alpha_o_g():
    o, g = np.array([[1.0, -2.0]]), np.array([[0.5, 0.25]])
    np.testing.assert_allclose(neuron_states(o, g, 2.0), 1 / (1 + np.exp(-np.array([[1.0, -1.0]]))))
    with pytest.raises(DataError, match=r"got \(1, 2\) and \(2,\)"):
        neuron_states(o, np.zeros(2), 1.0)


def test_fit_subset_is_class_balanced(rng):
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    features = make_features(rng.uniform(0.01, 0.99, size=(100, 4)), labels)
    chosen = NACScorer(n_train=30, seed=3).fit(features).train_indices_
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [10, 10, 10])
    capped = NACScorer(n_train=90).fit(features).train_indices_  # 30 per class asked, 20 in the smallest
    np.testing.assert_array_equal(np.bincount(labels[capped]), [20, 20, 20])
    again = NACScorer(n_train=30, seed=3).fit(features).train_indices_
    np.testing.assert_array_equal(chosen, again)
    assert not np.array_equal(chosen, NACScorer(n_train=30, seed=4).fit(features).train_indices_)


def synthetic_states(rng, n, shift=0.0, n_neurons=16):
    """ID states: o * g near a per-neuron centre in [-1, 1]; OOD shifted by ``shift``."""
    centres = np.linspace(-1.0, 1.0, n_neurons)
    return 1 / (1 + np.exp(-(centres + shift + rng.normal(scale=0.1, size=(n, n_neurons)))))


def test_auroc_floor_on_synthetic_states(rng):
    labels = np.repeat(np.arange(3), 200)
    train = make_features(synthetic_states(rng, 600), labels)
    scorer = NACScorer(alpha=1.0, M=50, O=5, n_train=300).fit(train)
    s_id = scorer.score(make_features(synthetic_states(rng, 100)))
    s_ood = scorer.score(make_features(synthetic_states(rng, 100, shift=3.0)))
    y = np.r_[np.zeros(100), np.ones(100)]
    assert roc_auc_score(y, np.r_[s_id, s_ood]) >= ROC_FLOOR


def test_changing_O_via_coverage_equals_refitting(rng):
    labels = np.repeat(np.arange(2), 100)
    train, test = make_features(synthetic_states(rng, 200), labels), make_features(synthetic_states(rng, 30, 0.5))
    fitted = NACScorer(alpha=1.0, M=20, O=50, n_train=200).fit(train)
    states = neuron_states(test.layers["l"] * 4, test.grads["l"], 1.0)
    fast = -coverage_scores(states, fitted.thresholds_["l"], coverage(fitted.counts_["l"], 3))
    refit = NACScorer(alpha=1.0, M=20, O=3, n_train=200).fit(train).score_layers(test)["l"]
    np.testing.assert_allclose(fast, refit)


def test_per_layer_dicts_and_layer_selection(rng):
    states = synthetic_states(rng, 40, n_neurons=3)
    a, b = make_features(states, np.zeros(40, int)), make_features(states, np.zeros(40, int), layer="m")
    both = Features(layers={**a.layers, **b.layers}, grads={**a.grads, **b.grads},
                    spatial_size={**a.spatial_size, **b.spatial_size}, labels=a.labels)
    scorer = NACScorer(M={"l": 4, "m": 6, "unused": 8}, alpha={"l": 1.0, "m": 2.0}).fit(both)
    assert scorer.layers_ == ["l", "m"] and scorer.M_ == {"l": 4, "m": 6}
    assert scorer.counts_["l"].shape == (3, 3) and scorer.counts_["m"].shape == (5, 3)
    assert set(scorer.score_layers(both)) == {"l", "m"}
    assert NACScorer(layers=["m"], M={"m": 4}).fit(both).layers_ == ["m"]


@pytest.mark.parametrize("params, match", [
    ({"M": 5}, r"'M' parameter of NACScorer must be an even integer >= 4.*Got 5"),
    ({"M": 2}, r"'M' parameter of NACScorer must be an even integer >= 4"),
    ({"O": 0}, r"'O' parameter of NACScorer must be a positive float.*Got 0"),
    ({"alpha": {"other": 1.0}}, r"'alpha' parameter .*layer 'l' is missing or invalid"),
    ({"alpha": -1.0}, r"'alpha' parameter of NACScorer must be a positive float"),
    ({"n_train": 0}, r"'n_train' parameter of NACScorer must be a positive integer. Got 0"),
    ({"n_train": 2}, r"'n_train' parameter of NACScorer must be at least the number of classes \(3\)"),
    ({"layers": ["fc"]}, r"'layers' parameter of NACScorer must be None or a non-empty list of names among \['l'\]"),
])
def test_param_errors(params, match, rng):
    features = make_features(rng.uniform(0.1, 0.9, size=(30, 2)), np.repeat([0, 1, 2], 10))
    with pytest.raises(ConfigError, match=match):
        NACScorer(**params).fit(features)


def test_features_without_grads_raise_data_error(rng):
    features = Features(layers={"l": rng.normal(size=(10, 2))}, spatial_size={"l": 1}, labels=np.zeros(10, int))
    with pytest.raises(DataError, match=r"NACScorer needs \['grads'\]"):
        NACScorer().fit(features)


def test_score_checks_fit_and_neuron_count(rng):
    features = make_features(rng.uniform(0.1, 0.9, size=(20, 3)), np.zeros(20, int))
    with pytest.raises(NotFittedError):
        NACScorer().score(features)
    scorer = NACScorer(n_train=20).fit(features)
    with pytest.raises(DataError, match="Layer 'l' has 2 neurons, but NACScorer was fitted with 3"):
        scorer.score(make_features(rng.uniform(0.1, 0.9, size=(5, 2))))


def test_set_refit_free_equals_a_refit_with_that_O():
    """The search shares one fit across O values (issue: search over cached neuron states)."""
    from pipeline.scorers.nac import NACScorer
    from pipeline.scorers.base import Features

    rng = np.random.default_rng(3)
    feats = Features(layers={"l": rng.random((60, 5))}, grads={"l": rng.normal(size=(60, 5))},
                     spatial_size={"l": 4}, labels=rng.integers(0, 3, 60))
    shared = NACScorer(alpha=2.0, M=8, O=1, n_train=30).fit(feats).set_refit_free(O=3)
    fresh = NACScorer(alpha=2.0, M=8, O=3, n_train=30).fit(feats)
    np.testing.assert_array_equal(shared.score(feats), fresh.score(feats))
    assert shared.O == 3 and NACScorer.refit_free_params == ("O",)
