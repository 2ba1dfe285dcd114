"""Tests for the post-hoc scorers over cached logits / penultimate features:
MSP, MaxLogit, Energy, SCALE, ASH-P/B/S, ReAct and ViM."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from pipeline.errors import ConfigError, DataError
from pipeline.scorers.ash import AshScorer, ash_b, ash_p, ash_s
from pipeline.scorers.base import Features
from pipeline.scorers.energy import EnergyScorer, energy_scores
from pipeline.scorers.maxlogit import MaxLogitScorer, maxlogit_scores
from pipeline.scorers.msp import MSPScorer, msp_scores
from pipeline.scorers.react import ReActScorer, react_features, react_threshold
from pipeline.scorers.scale import ScaleScorer, scale_features, top_k_count
from pipeline.scorers.vim import ViMScorer, vim_null_space, vim_scores

ROC_FLOOR = 0.8  # PyOD's quality floor on synthetic data

SCORERS = {
    "msp": MSPScorer(),
    "maxlogit": MaxLogitScorer(),
    "energy": EnergyScorer(),
    "energy_t2": EnergyScorer(temperature=2.0),
    "scale": ScaleScorer(),
    "ash_p": AshScorer(variant="p"),
    "ash_b": AshScorer(variant="b"),
    "ash_s": AshScorer(variant="s"),
    "react": ReActScorer(),
    "vim": ViMScorer(),
}


def features(a, weight, bias):
    """A consistent, read-only Features bundle: logits = a @ W.T + b (like the store's views)."""
    arrays = [np.array(x, dtype=np.float64) for x in (a, weight, bias)]
    arrays.append(arrays[0] @ arrays[1].T + arrays[2])
    for x in arrays:
        x.setflags(write=False)
    a, weight, bias, logits = arrays
    return Features(logits=logits, penultimate=a, head_weight=weight, head_bias=bias)


def make_penultimate(rng, n_classes=4, block=12, n_spare=16, n_train=300, n_test=150, n_ood=150):
    """Synthetic penultimate layer of a ReLU classifier: (train, id_test, ood) Features.

    - ``D = n_classes * block + n_spare`` non-negative units. Class ``c`` owns a
      block of ``block`` units; the ``n_spare`` units stay near 0 on ID data.
    - ID: the own block is strongly active (U(1, 3)), the other class units
      weakly (U(0, 0.3)), the spare units barely (U(0, 0.02)).
    - OOD: diffuse low activation U(0, 0.15) over *all* units (spare ones
      included) plus 2 spurious spikes U(2, 4) at random units -- the
      abnormally large activations ReAct's paper reports for OOD inputs.
    - Head: W[c] = 1 on c's block, -0.05 on other class units, N(0, 0.1) on
      the spare units; b ~ N(0, 0.1).

    Pure diffuse OOD (no spikes) is not enough for every method: SCALE/ASH-S
    multiply by exp(s1 / s2), which is largest for flat vectors, and ViM needs
    OOD residuals off the ID principal subspace larger than ID's own.
    """
    n_cls = n_classes * block
    D = n_cls + n_spare
    weight = np.zeros((n_classes, D))
    weight[:, :n_cls] = -0.05
    for c in range(n_classes):
        weight[c, c * block:(c + 1) * block] = 1.0
    weight[:, n_cls:] = rng.normal(scale=0.1, size=(n_classes, n_spare))
    bias = rng.normal(scale=0.1, size=n_classes)

    def id_features(n):
        y = rng.integers(0, n_classes, n)
        a = np.c_[rng.uniform(0, 0.3, (n, n_cls)), rng.uniform(0, 0.02, (n, n_spare))]
        np.put_along_axis(a, y[:, None] * block + np.arange(block), rng.uniform(1.0, 3.0, (n, block)), axis=1)
        return a

    ood = rng.uniform(0, 0.15, (n_ood, D))
    spikes = np.argsort(rng.random((n_ood, D)), axis=1)[:, :2]
    np.put_along_axis(ood, spikes, rng.uniform(2.0, 4.0, (n_ood, 2)), axis=1)
    return tuple(features(a, weight, bias) for a in (id_features(n_train), id_features(n_test), ood))


def auroc(scores_id, scores_ood):
    """AUROC with OOD as the positive class."""
    y = np.r_[np.zeros(len(scores_id)), np.ones(len(scores_ood))]
    return roc_auc_score(y, np.r_[scores_id, scores_ood])


# ---------------------------------------------------------------- contract and direction

@pytest.mark.parametrize("name", SCORERS)
def test_scorer_contract_and_auroc_floor(name, rng):
    train, id_test, ood = make_penultimate(rng)
    scorer = clone(SCORERS[name])
    assert scorer.fit(train) is scorer
    s_id, s_ood = scorer.score(id_test), scorer.score(ood)
    assert s_id.shape == (150,) and s_ood.shape == (150,)
    assert s_id.dtype == np.float64 and np.isfinite(s_id).all() and np.isfinite(s_ood).all()
    assert auroc(s_id, s_ood) >= ROC_FLOOR


@pytest.mark.parametrize("name", SCORERS)
def test_clone_keeps_params_and_drops_state(name, rng):
    scorer = SCORERS[name]
    fresh = clone(scorer.fit(make_penultimate(rng)[0]))
    assert fresh.get_params() == scorer.get_params()
    assert not [k for k in vars(fresh) if k.endswith("_")]


@pytest.mark.parametrize("cls", [ReActScorer, ViMScorer])
def test_not_fitted_raises(cls, rng):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        cls().score(make_penultimate(rng)[1])


# ---------------------------------------------------------------- logit-only scorers

LOGITS = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])


def test_msp_maxlogit_energy_known_answer():
    # [0, 0]:     softmax (1/2, 1/2); max logit 0;     lse = ln 2
    # [ln 3, 0]:  softmax (3/4, 1/4); max logit ln 3;  lse = ln(3 + 1) = ln 4
    np.testing.assert_allclose(msp_scores(LOGITS), [-0.5, -0.75], rtol=1e-12)
    np.testing.assert_allclose(maxlogit_scores(LOGITS), [0.0, -1.0986122886681098], rtol=1e-12)
    np.testing.assert_allclose(energy_scores(LOGITS), [-0.6931471805599453, -1.3862943611198906], rtol=1e-12)
    # T = 2: -2 * ln(e^0 + e^0) = -2 ln 2;  -2 * ln(sqrt(3) + 1) = -2.0101050774847...
    np.testing.assert_allclose(energy_scores(LOGITS, 2.0), [-1.3862943611198906, -2.010105077484762],
                               rtol=1e-12)


def test_logit_scorers_read_logits_field():
    f = Features(logits=LOGITS)
    np.testing.assert_allclose(MSPScorer().fit(f).score(f), [-0.5, -0.75])
    np.testing.assert_allclose(MaxLogitScorer().score(f), [0.0, -np.log(3.0)])
    np.testing.assert_allclose(EnergyScorer(temperature=2.0).score(f), energy_scores(LOGITS, 2.0))


def test_logit_scores_are_stable_for_huge_logits():
    big = np.array([[1000.0, 0.0], [-1000.0, -1000.0]])
    np.testing.assert_allclose(msp_scores(big), [-1.0, -0.5])
    np.testing.assert_allclose(energy_scores(big), [-1000.0, 1000.0 - np.log(2.0)])


# ---------------------------------------------------------------- SCALE and ASH

A = np.array([[1.0, 2.0, 3.0, 4.0]])
E = 4.172733883598096  # exp(10 / 7)
W_14 = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # logits = (a_0, a_3)


def test_top_k_count_rounds_half_to_even_like_openood():
    assert top_k_count(4, 50) == 2   # 4 - round(2.0)
    assert top_k_count(10, 85) == 2  # 10 - round(8.5) = 10 - 8 (np.round: half to even)
    assert top_k_count(10, 75) == 2  # 10 - round(7.5) = 10 - 8
    assert top_k_count(512, 90) == 51


def test_scale_features_known_answer():
    # p = 50, D = 4: k = 2; s1 = 1+2+3+4 = 10; s2 = 3+4 = 7; scaled = a * exp(10/7), nothing pruned
    np.testing.assert_allclose(scale_features(A, 50), [[E, 2 * E, 3 * E, 4 * E]], rtol=1e-12)
    # p = 0: k = D, s2 = s1, scaled = a * e
    np.testing.assert_allclose(scale_features(A, 0), A * np.e, rtol=1e-12)


def test_scale_scorer_known_answer():
    # logits = (1 * E, 4 * E) = (4.1727, 16.6909); -lse = -16.6909 - ln(1 + e^-12.518)
    f = features(A, W_14, [0.0, 0.0])
    np.testing.assert_allclose(ScaleScorer(percentile=50).score(f), [-16.69093919382121], rtol=1e-12)


def test_ash_twins_known_answer():
    # p = 50: k = 2, the top-2 are 3 and 4 (s1 = 10, s2 = 7 after pruning)
    np.testing.assert_allclose(ash_p(A, 50), [[0.0, 0.0, 3.0, 4.0]])
    np.testing.assert_allclose(ash_b(A, 50), [[0.0, 0.0, 5.0, 5.0]])  # s1 / k = 10 / 2
    np.testing.assert_allclose(ash_s(A, 50), [[0.0, 0.0, 3 * E, 4 * E]], rtol=1e-12)


@pytest.mark.parametrize("variant, expected", [
    ("p", -4.0181499279178094),   # logits (0, 4):   -ln(1 + e^4)
    ("b", -5.006715348489118),    # logits (0, 5):   -ln(1 + e^5)
    ("s", -16.69093559078455),    # logits (0, 4E):  -ln(1 + e^16.6909)
])
def test_ash_scorer_known_answer(variant, expected):
    f = features(A, W_14, [0.0, 0.0])
    np.testing.assert_allclose(AshScorer(variant=variant, percentile=50).score(f), [expected], rtol=1e-12)


def test_ash_ties_keep_lower_index():
    # p = 75, D = 4: k = 1; the two 2s tie and the first one is kept
    np.testing.assert_array_equal(ash_p([[2.0, 2.0, 1.0, 0.0]], 75), [[2.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(ash_b([[2.0, 2.0, 1.0, 0.0]], 75), [[5.0, 0.0, 0.0, 0.0]])


def test_all_zero_row_is_left_unscaled():
    # s2 == 0 would give 0/0: the row stays zero, so its logits are the bias
    zero = np.zeros((1, 4))
    for shaped in (scale_features(zero, 50), ash_s(zero, 50), ash_b(zero, 50)):
        np.testing.assert_array_equal(shaped, zero)
    f = features(zero, W_14, [1.0, 0.0])
    expected = energy_scores([[1.0, 0.0]])
    np.testing.assert_allclose(ScaleScorer(percentile=50).score(f), expected)
    np.testing.assert_allclose(AshScorer(variant="s", percentile=50).score(f), expected)


# ---------------------------------------------------------------- ReAct

def test_react_known_answer():
    # train values 0..9 flattened; 90th percentile (linear) = 0.9 * 9 = 8.1
    train = features(np.arange(10.0).reshape(5, 2), np.eye(2), [0.0, 0.0])
    scorer = ReActScorer(percentile=90).fit(train)
    assert scorer.threshold_ == pytest.approx(8.1)
    # (1, 20) -> (1, 8.1); (9, 3) -> (8.1, 3); W = I, b = 0, so logits = clipped features
    test = features([[1.0, 20.0], [9.0, 3.0]], np.eye(2), [0.0, 0.0])
    np.testing.assert_allclose(scorer.score(test), [-8.100824764711327, -8.106078236601778], rtol=1e-12)


def test_react_twins():
    assert react_threshold([[0.0, 1.0], [2.0, 3.0]], 50) == pytest.approx(1.5)
    np.testing.assert_array_equal(react_features([[1.0, 5.0]], 2.0), [[1.0, 2.0]])


# ---------------------------------------------------------------- ViM

def test_vim_known_answer():
    # W = I, b = (-1, 0): origin u = -pinv(I) @ b = (1, 0)
    # train - u = (+-2, +-1): covariance (about 0) diag(4, 1); dim = 1 keeps x, NS = +-e_y
    # residuals |y| = 1; logits = f + b = (2,1), (2,-1), (-2,1), (-2,-1) -> max 2, 2, 1, -1 -> mean 1
    # alpha = 1 / 1 = 1
    weight, bias = np.eye(2), [-1.0, 0.0]
    train = features([[3.0, 1.0], [3.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], weight, bias)
    scorer = ViMScorer(dim=1).fit(train)
    np.testing.assert_allclose(scorer.origin_, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(scorer.null_space_), [[0.0], [1.0]], atol=1e-12)
    assert scorer.alpha_ == pytest.approx(1.0)
    # (1, 3): residual 3, logits (0, 3):  3 - ln(1 + e^3) = -ln(1 + e^-3)
    # (5, 0): residual 0, logits (4, 0):  0 - ln(e^4 + 1)
    test = features([[1.0, 3.0], [5.0, 0.0]], weight, bias)
    np.testing.assert_allclose(scorer.score(test), [-0.04858735157374206, -4.0181499279178094], rtol=1e-12)


def test_vim_twins():
    ns = vim_null_space(np.diag([4.0, 1.0, 9.0]), 1)  # drops the largest (9, on z)
    np.testing.assert_allclose(np.abs(ns), [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], atol=1e-12)
    # residual of (a - origin) = (0, 3, 0) on NS is 3; logits (0, 0) -> lse ln 2
    s = vim_scores(np.array([[1.0, 3.0, 0.0]]), np.zeros((2, 3)), np.zeros(2), np.array([1.0, 0.0, 0.0]),
                   ns, 2.0)
    np.testing.assert_allclose(s, [2.0 * 3.0 - np.log(2.0)], rtol=1e-12)


def test_vim_default_dim_is_half(rng):
    scorer = ViMScorer().fit(make_penultimate(rng)[0])
    assert scorer.dim_ == 32 and scorer.null_space_.shape == (64, 32)


def test_vim_without_residual_raises():
    # every train feature lies on the x axis: nothing off a 1-D principal subspace
    train = features([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], np.eye(2), [0.0, 0.0])
    with pytest.raises(DataError, match="no residual off their 1-dimensional principal subspace"):
        ViMScorer(dim=1).fit(train)


# ---------------------------------------------------------------- errors

SMALL = features(A, W_14, [0.0, 0.0])  # D = 4


@pytest.mark.parametrize("scorer, match", [
    (ScaleScorer(percentile=120),
     r"The 'percentile' parameter of SCALE must be a float in \[0, 100\)\. Got 120 instead\."),
    (ScaleScorer(percentile=True), r"The 'percentile' parameter of SCALE must be a float in \[0, 100\)\. Got True"),
    (ScaleScorer(percentile="85"), r"The 'percentile' parameter of SCALE .* Got '85' instead"),
    (AshScorer(variant="q"), r"The 'variant' parameter of ASH must be one of \{'p', 'b', 's'\}\. Got 'q' instead\."),
    (AshScorer(percentile=-1), r"The 'percentile' parameter of ASH must be a float in \[0, 100\)\. Got -1 instead"),
    (EnergyScorer(temperature=0), r"The 'temperature' parameter of Energy must be a positive finite float\. Got 0"),
    (ReActScorer(percentile=0), r"The 'percentile' parameter of ReAct must be a float in \(0, 100\]\. Got 0 inst"),
    (ReActScorer(percentile=101), r"The 'percentile' parameter of ReAct .* Got 101 instead"),
    (ViMScorer(dim=4), r"The 'dim' parameter of ViM must be None or an int in \[1, 3\] .* Got 4 instead"),
    (ViMScorer(dim=0), r"The 'dim' parameter of ViM .* Got 0 instead"),
    (ViMScorer(dim=1.5), r"The 'dim' parameter of ViM .* Got 1.5 instead"),
])
def test_bad_hyperparameters_raise_config_error_in_fit(scorer, match):
    with pytest.raises(ConfigError, match=match):
        scorer.fit(SMALL)


def test_bad_hyperparameters_raise_in_score_without_fit():
    with pytest.raises(ConfigError, match="'percentile' parameter of SCALE"):
        ScaleScorer(percentile=100).score(SMALL)
    with pytest.raises(ConfigError, match="'temperature' parameter of Energy"):
        EnergyScorer(temperature=-1.0).score(SMALL)


@pytest.mark.parametrize("scorer, owner", [(ScaleScorer(percentile=95), "SCALE"), (AshScorer(percentile=90), "ASH")])
def test_percentile_that_keeps_no_unit_raises(scorer, owner):
    # D = 4: k = 4 - round(3.8) = 0 at p = 95, 4 - round(3.6) = 0 at p = 90
    with pytest.raises(ConfigError, match=rf"'percentile' parameter of {owner} must be a float that keeps at "
                                          r"least one of the 4 features"):
        scorer.fit(SMALL).score(SMALL)


@pytest.mark.parametrize("scorer, owner", [
    (ScaleScorer(), "SCALE"), (AshScorer(), "ASH"), (ReActScorer(percentile=50), "ReAct"), (ViMScorer(), "ViM"),
])
def test_missing_head_raises_data_error(scorer, owner):
    no_head = Features(logits=SMALL.logits, penultimate=SMALL.penultimate)
    with pytest.raises(DataError, match=rf"{owner} needs \['head_weight', 'head_bias'\] from the feature store"):
        scorer.fit(no_head).score(no_head)


@pytest.mark.parametrize("scorer, owner", [(MSPScorer(), "MSP"), (MaxLogitScorer(), "MaxLogit"),
                                           (EnergyScorer(), "Energy")])
def test_missing_logits_raises_data_error(scorer, owner):
    with pytest.raises(DataError, match=rf"{owner} needs \['logits'\]"):
        scorer.fit(Features()).score(Features())


def test_react_without_penultimate_raises_in_fit():
    with pytest.raises(DataError, match=r"ReAct needs \['penultimate'\]"):
        ReActScorer().fit(Features(logits=LOGITS))


def test_inconsistent_head_shape_raises_data_error():
    bad = Features(penultimate=A, head_weight=np.ones((2, 3)), head_bias=np.zeros(2))
    with pytest.raises(DataError, match=r"got penultimate \(1, 4\), head_weight \(2, 3\), head_bias \(2,\)"):
        ScaleScorer(percentile=50).score(bad)


@pytest.mark.parametrize("cls, owner", [(ReActScorer, "ReAct"), (ViMScorer, "ViM")])
def test_feature_count_mismatch_after_fit_raises(cls, owner, rng):
    scorer = cls().fit(make_penultimate(rng)[0])  # D = 64
    with pytest.raises(DataError, match=rf"{owner} was fitted on 64 penultimate features; got 4"):
        scorer.score(SMALL)


def test_non_finite_input_raises_data_error():
    with pytest.raises(DataError, match="MSP got non-finite values"):
        MSPScorer().score(Features(logits=np.array([[np.nan, 0.0]])))
