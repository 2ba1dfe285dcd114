"""Tests for the scorers over penultimate features and the head (issue 17, second part):
DICE, GradNorm, Residual, fDBD, NNGuide, Relation, SHE and OpenMax."""

import dataclasses

import numpy as np
import pytest
from scipy.stats import weibull_min
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from pipeline.errors import ConfigError, DataError
from pipeline.scorers import SCORERS, make_scorer
from pipeline.scorers.base import Features
from pipeline.scorers.dice import DICEScorer
from pipeline.scorers.fdbd import FDBDScorer, boundary_denominators
from pipeline.scorers.gradnorm import GradNormScorer, gradnorm_scores
from pipeline.scorers.nnguide import NNGuideScorer, bank_rows, top_k_mean_similarity
from pipeline.scorers.openmax import OpenMaxScorer, openmax_unknown, weibull_fit_high
from pipeline.scorers.relation import RelationScorer
from pipeline.scorers.residual import ResidualScorer
from pipeline.scorers.she import SHEScorer
from tests.test_scorers_posthoc import auroc, features, make_penultimate

ROC_FLOOR = 0.8  # PyOD's quality floor on synthetic data

SCORER_CASES = {
    # p = 90 keeps 10% of the 4 x 64 weights (26), fewer than the 48 class-block weights: the class with the
    # weakest mean activation keeps none and its ID samples lose their logit (AUROC ~0.8, seeds 0-3). At p = 70
    # every class keeps its block.
    "dice": DICEScorer(percentile=70),
    "gradnorm": GradNormScorer(),
    "gradnorm_t2": GradNormScorer(temperature=2.0),
    "residual": ResidualScorer(),
    "fdbd": FDBDScorer(),
    "fdbd_norm": FDBDScorer(distance_as_normalizer=False),
    "nnguide": NNGuideScorer(),  # bank_size 500 > 300 rows: the whole of ID-train, k = 100
    "relation": RelationScorer(),
    "she": SHEScorer(),
    "she_cosine": SHEScorer(metric="cosine"),
    "openmax": OpenMaxScorer(),
    "openmax_eucos": OpenMaxScorer(distance="eucos"),
}
NAMES = ["dice", "gradnorm", "residual", "fdbd", "nnguide", "relation", "she", "openmax"]
LEARNING = [DICEScorer, ResidualScorer, FDBDScorer, NNGuideScorer, RelationScorer, SHEScorer, OpenMaxScorer]


def with_labels(f, labels=None):
    """``f`` with class labels (the synthetic blocks: the argmax of the logits, when not given)."""
    return dataclasses.replace(f, labels=f.logits.argmax(axis=1) if labels is None else np.asarray(labels))


@pytest.fixture
def synthetic(rng):
    train, id_test, ood = make_penultimate(rng)
    return with_labels(train), id_test, ood


# ---------------------------------------------------------------- contract and direction

@pytest.mark.parametrize("name", SCORER_CASES)
def test_scorer_contract_and_auroc_floor(name, synthetic):
    train, id_test, ood = synthetic
    scorer = clone(SCORER_CASES[name])
    assert scorer.fit(train) is scorer
    s_id, s_ood = scorer.score(id_test), scorer.score(ood)
    assert s_id.shape == (150,) and s_ood.shape == (150,)
    assert s_id.dtype == np.float64 and np.isfinite(s_id).all() and np.isfinite(s_ood).all()
    assert auroc(s_id, s_ood) >= ROC_FLOOR


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_defaults_that_pass_their_constraints(name):
    scorer = make_scorer(name)
    assert scorer.check_params(prefix=f"detect.methods.{name}.") is scorer
    assert set(scorer.refit_free_params) <= set(scorer.get_params())
    assert scorer.learns == (SCORERS[name][0] in LEARNING)


@pytest.mark.parametrize("name", SCORER_CASES)
def test_clone_keeps_params_and_drops_state(name, synthetic):
    scorer = SCORER_CASES[name]
    fresh = clone(clone(scorer).fit(synthetic[0]))
    assert fresh.get_params() == scorer.get_params()
    assert not [k for k in vars(fresh) if k.endswith("_")]


@pytest.mark.parametrize("cls", LEARNING)
def test_not_fitted_raises(cls, synthetic):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        cls().score(synthetic[1])


@pytest.mark.parametrize("scorer, variant", [
    (DICEScorer(percentile=90), {"percentile": 50}),
    (FDBDScorer(), {"distance_as_normalizer": False}),
    (NNGuideScorer(k=100), {"k": 7}),
    (RelationScorer(), {"power": 4, "threshold": 0.1}),
    (SHEScorer(), {"metric": "euclidean"}),
    (OpenMaxScorer(alpha=3), {"alpha": 1}),
])
def test_set_refit_free_equals_a_refit(scorer, variant, synthetic):
    train, id_test, ood = synthetic
    shared = clone(scorer).fit(train).set_refit_free(**variant)
    refit = clone(scorer).set_params(**variant).fit(train)
    for f in (id_test, ood):
        np.testing.assert_allclose(shared.score(f), refit.score(f), rtol=1e-12)
    assert set(variant) <= set(scorer.refit_free_params)


# ---------------------------------------------------------------- DICE

DICE_W = np.array([[1.0, 2.0], [3.0, -1.0]])


def test_dice_known_answer():
    # train mean (2, 1); contributions mean * W = [[2, 2], [6, -1]]
    # p = 50: percentile of (-1, 2, 2, 6) = 2; kept: > 2, only W[1, 0] = 3
    # test (1, 1): logits (0, 3) -> -ln(1 + e^3)
    train = features([[1.0, 0.0], [3.0, 2.0]], DICE_W, [0.0, 0.0])
    test = features([[1.0, 1.0]], DICE_W, [0.0, 0.0])
    scorer = DICEScorer(percentile=50).fit(train)
    np.testing.assert_allclose(scorer.contributions_, [[2.0, 2.0], [6.0, -1.0]])
    np.testing.assert_array_equal(scorer.mask_, [[False, False], [True, False]])
    np.testing.assert_allclose(scorer.score(test), [-3.048587351573742], rtol=1e-12)
    # p = 0: threshold = min = -1, so only W[1, 1] goes; logits (3, 3) -> -(3 + ln 2)
    np.testing.assert_allclose(DICEScorer(percentile=0).fit(train).score(test), [-3.6931471805599454], rtol=1e-12)


# ---------------------------------------------------------------- GradNorm

def test_gradnorm_known_answer():
    # W = I, b = 0, a = (ln 3, 0): p = (3/4, 1/4); sum |2 p - 1| = 1/2 + 1/2 = 1; ||a||_1 = ln 3
    a = np.array([[np.log(3.0), 0.0]])
    np.testing.assert_allclose(gradnorm_scores(a, np.eye(2), np.zeros(2)), [-np.log(3.0)], rtol=1e-12)
    # T = 2: p = softmax(ln 3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1); |2 p_c - 1| = 2 - sqrt3 each
    # -> -(1 / 2) * 2 (2 - sqrt3) * ln 3 = -(2 - sqrt3) ln 3
    f = features(a, np.eye(2), [0.0, 0.0])
    np.testing.assert_allclose(GradNormScorer(temperature=2.0).fit(f).score(f), [-0.2943722755435276], rtol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_equals_torch_autograd_per_sample(temperature):
    """The cached-quantity form equals the reference's per-sample backward pass (authors' / OpenOOD's loop)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    n_classes, n_features = 5, 7
    weight, bias = rng.normal(size=(n_classes, n_features)), rng.normal(size=n_classes)
    a = np.abs(rng.normal(scale=2.0, size=(6, n_features)))  # post-ReLU features
    fc = torch.nn.Linear(n_features, n_classes).double()
    fc.weight.data[...] = torch.from_numpy(weight)
    fc.bias.data[...] = torch.from_numpy(bias)
    logsoftmax = torch.nn.LogSoftmax(dim=-1)
    expected = []
    for x in torch.from_numpy(a):
        fc.zero_grad()
        targets = torch.ones((1, n_classes), dtype=torch.float64)
        loss = torch.mean(torch.sum(-targets * logsoftmax(fc(x[None]) / temperature), dim=-1))
        loss.backward()
        expected.append(torch.sum(torch.abs(fc.weight.grad.data)).item())  # the weight's gradient only
    got = -GradNormScorer(temperature=temperature).score(features(a, weight, bias))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- Residual

def test_residual_known_answer():
    # W = I, b = (-1, 0): origin u = (1, 0); train - u = (+-2, +-1): covariance diag(4, 1); dim = 1 keeps x
    # (1, 3) - u = (0, 3): residual 3;  (5, 0) - u = (4, 0): residual 0
    weight, bias = np.eye(2), [-1.0, 0.0]
    train = features([[3.0, 1.0], [3.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], weight, bias)
    scorer = ResidualScorer(dim=1).fit(train)
    np.testing.assert_allclose(scorer.origin_, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(scorer.score(features([[1.0, 3.0], [5.0, 0.0]], weight, bias)), [3.0, 0.0],
                               atol=1e-12)


def test_residual_default_dim_is_half(synthetic):
    scorer = ResidualScorer().fit(synthetic[0])
    assert scorer.dim_ == 32 and scorer.null_space_.shape == (64, 32)


# ---------------------------------------------------------------- fDBD

FDBD_W = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])


def test_fdbd_known_answer():
    # ||w0 - w1|| = sqrt2, ||w0 - w2|| = ||w1 - w2|| = 1; train mean (1, 1)
    # z = (3, 1): logits (3, 1, 0), pred 0; distances 2 / sqrt2 = sqrt2 and 3 / 1 = 3; mean (sqrt2 + 3) / 2
    # / ||z - mean|| = ||(2, 0)|| = 2  -> -(sqrt2 + 3) / 4;  / ||z|| = sqrt10 -> -(sqrt2 + 3) / (2 sqrt10)
    train = features([[2.0, 0.0], [0.0, 2.0]], FDBD_W, np.zeros(3))
    test = features([[3.0, 1.0]], FDBD_W, np.zeros(3))
    np.testing.assert_allclose(boundary_denominators(FDBD_W), [[1, np.sqrt(2), 1], [np.sqrt(2), 1, 1], [1, 1, 1]])
    np.testing.assert_allclose(FDBDScorer().fit(train).score(test), [-1.1035533905932737], rtol=1e-12)
    np.testing.assert_allclose(FDBDScorer(distance_as_normalizer=False).fit(train).score(test),
                               [-0.6979484467752358], rtol=1e-12)


def test_fdbd_feature_at_the_mean_scores_finitely():
    train = features([[2.0, 0.0], [0.0, 2.0]], FDBD_W, np.zeros(3))
    assert np.isfinite(FDBDScorer().fit(train).score(features([[1.0, 1.0]], FDBD_W, np.zeros(3)))).all()


def test_fdbd_identical_weight_rows_raise():
    weight = np.array([[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(DataError, match="classes 0 and 1 have the same weight"):
        FDBDScorer().fit(features([[1.0, 2.0]], weight, [0.0, 1.0]))


# ---------------------------------------------------------------- NNGuide

def test_nnguide_known_answer():
    # W = I, b = 0. Bank: normalised (1,0), (0,1), (1,0) scaled by logsumexp of (1,0), (0,2), (3,0):
    # ln(1 + e) = 1.31326, ln(1 + e^2) = 2.12693, ln(1 + e^3) = 3.04859
    # z = (2, 0): sims 1.31326, 0, 3.04859; k = 2 -> mean 2.18092; times logsumexp(2, 0) = 2.12693 -> 4.63867
    train = features([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], np.eye(2), [0.0, 0.0])
    scorer = NNGuideScorer(k=2, bank_size=None).fit(train)
    np.testing.assert_allclose(scorer.bank_, [[1.3132616875182228, 0], [0, 2.1269280110429727],
                                              [3.048587351573742, 0]], rtol=1e-12)
    test = features([[2.0, 0.0]], np.eye(2), [0.0, 0.0])
    np.testing.assert_allclose(scorer.score(test), [-4.638669450592787], rtol=1e-12)


def test_nnguide_bank_is_a_seeded_sample_that_fit_rows_reads(synthetic):
    train = synthetic[0]
    scorer = NNGuideScorer(k=5, bank_size=40, seed=3)
    rows = scorer.fit_rows(train.labels)
    np.testing.assert_array_equal(rows, bank_rows(300, 40, 3))
    assert len(rows) == 40 and (np.diff(rows) > 0).all()
    whole = clone(scorer).fit(train)
    np.testing.assert_array_equal(whole.train_indices_, rows)
    subset = Features(penultimate=train.penultimate[rows], head_weight=train.head_weight, head_bias=train.head_bias)
    np.testing.assert_array_equal(clone(scorer).fit(subset).bank_, whole.bank_)  # as the pipeline fits it
    assert len(bank_rows(300, 40, 4)) == 40 and not np.array_equal(bank_rows(300, 40, 4), rows)


def test_top_k_mean_is_exact_across_blocks(monkeypatch):
    from pipeline.scorers import nnguide

    rng = np.random.default_rng(2)
    queries, bank = rng.normal(size=(9, 3)), rng.normal(size=(5, 3))
    expected = np.sort(queries @ bank.T, axis=1)[:, -3:].mean(axis=1)
    monkeypatch.setattr(nnguide, "BLOCK_ENTRIES", 10)  # 2 query rows per block
    np.testing.assert_allclose(top_k_mean_similarity(queries, bank, 3), expected, rtol=1e-12)


def test_nnguide_k_above_the_bank_raises(synthetic):
    with pytest.raises(ConfigError, match=r"The 'k' parameter of NNGuide must be an int in \[1, 20\] \(at most the "
                                          r"bank's 20 rows\)\. Got 100 instead\. Hint: lower k or raise bank_size"):
        NNGuideScorer(bank_size=20).fit(synthetic[0])


# ---------------------------------------------------------------- Relation

def test_relation_known_answer():
    # W = I, b = 0; train (1, 0), (0, 1): probabilities (s1, s-1) and (s-1, s1), s = sigmoid
    # z = (2, 0): f = (1, 0), p = (s2, s-2); kernel to train 0 = 1 * (s2 s1 + s-2 s-1) = (e^3 + 1) / ((e^2 + 1)(e + 1))
    #   = 0.67597; to train 1 = max(0, 0) * ... = 0
    # z = (1, 1): f = (1, 1) / sqrt2, p = (1/2, 1/2); each kernel = (1 / sqrt2) * 1/2 = 0.35355; sum 1 / sqrt2
    train = features([[1.0, 0.0], [0.0, 1.0]], np.eye(2), [0.0, 0.0])
    test = features([[2.0, 0.0], [1.0, 1.0]], np.eye(2), [0.0, 0.0])
    kernel = (np.e ** 3 + 1) / ((np.e ** 2 + 1) * (np.e + 1))
    np.testing.assert_allclose(RelationScorer().fit(train).score(test), [-kernel, -np.sqrt(0.5)], rtol=1e-9)
    np.testing.assert_allclose(RelationScorer(power=2).fit(train).score(test), [-kernel ** 2, -0.25], rtol=1e-9)
    # threshold 0.5 cuts the two 0.354 edges of (1, 1), keeps the 0.676 one
    np.testing.assert_allclose(RelationScorer(threshold=0.5).fit(train).score(test), [-kernel, 0.0], rtol=1e-9)


def test_relation_is_exact_across_blocks(monkeypatch, synthetic):
    from pipeline.scorers import nnguide

    train, id_test, _ = synthetic
    scorer = RelationScorer(power=2).fit(train)
    whole = scorer.score(id_test)
    monkeypatch.setattr(nnguide, "BLOCK_ENTRIES", 1000)  # 3 test rows per block against 300 bank rows
    np.testing.assert_allclose(scorer.score(id_test), whole, rtol=1e-12)
    assert scorer.fit_rows(train.labels) is None  # all of ID-train, as the reference


# ---------------------------------------------------------------- SHE

def test_she_known_answer():
    # W = I, b = 0. Train (3,1) label 0, (1,0) label 0, (0,2) label 1, (2,1) label 1 but predicted 0 (left out)
    # patterns: class 0 = mean((3,1), (1,0)) = (2, 0.5); class 1 = (0, 2)
    # (1, 2): pred 1, (1,2).(0,2) = 4;  (4, 1): pred 0, (4,1).(2,0.5) = 8.5
    train = with_labels(features([[3.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 1.0]], np.eye(2), [0.0, 0.0]),
                        [0, 0, 1, 1])
    test = features([[1.0, 2.0], [4.0, 1.0]], np.eye(2), [0.0, 0.0])
    scorer = SHEScorer().fit(train)
    np.testing.assert_allclose(scorer.patterns_, [[2.0, 0.5], [0.0, 2.0]])
    np.testing.assert_allclose(scorer.score(test), [-4.0, -8.5], rtol=1e-12)
    # euclidean: ||(1,0)|| = 1, ||(2,0.5)|| = sqrt(4.25);  cosine of (1,2), (0,2): 4 / (sqrt5 * 2)
    np.testing.assert_allclose(SHEScorer(metric="euclidean").fit(train).score(test), [1.0, np.sqrt(4.25)])
    np.testing.assert_allclose(SHEScorer(metric="cosine").fit(train).score(test)[0], -2 / np.sqrt(5.0))


def test_she_class_without_correct_sample_raises():
    train = with_labels(features([[3.0, 1.0], [2.0, 1.0]], np.eye(2), [0.0, 0.0]), [0, 1])
    with pytest.raises(DataError, match=r"classes \[1\] have none"):
        SHEScorer().fit(train)


def test_she_needs_labels_to_fit():
    with pytest.raises(DataError, match=r"SHE needs \['labels'\]"):
        SHEScorer().fit(features([[1.0, 0.0]], np.eye(2), [0.0, 0.0]))


# ---------------------------------------------------------------- OpenMax

def openmax_train():
    """Logits of class 0 at (10 +- d, 0) and class 1 at (0, 10 +- d), d = 2, 3, 4: MAVs (10, 0), (0, 10)."""
    d = np.array([2.0, -2.0, 3.0, -3.0, 4.0, -4.0])
    logits = np.r_[np.c_[10 + d, 0 * d], np.c_[0 * d, 10 + d]]
    return Features(logits=logits, labels=np.repeat([0, 1], 6))


def test_weibull_fit_high_is_the_libmr_mle():
    tail = np.array([3.0, 3.5, 4.0, 4.2, 5.0, 6.5])
    shape, scale, small = weibull_fit_high(tail)
    x = tail - small + 1.0  # libmr FitHigh: translate_amount 1, the smallest tail value moved to 1
    log_x = np.log(x)
    assert small == 3.0
    # the 2-parameter Weibull MLE equations
    assert abs((x ** shape * log_x).sum() / (x ** shape).sum() - 1 / shape - log_x.mean()) < 1e-12
    assert scale == pytest.approx(np.mean(x ** shape) ** (1 / shape), rel=1e-12)
    c, loc, s = weibull_min.fit(x, floc=0)  # scipy's optimiser finds the same MLE, to its tolerance
    assert loc == 0 and c == pytest.approx(shape, rel=1e-3) and s == pytest.approx(scale, rel=1e-3)


def test_openmax_known_answer():
    # distances to the own MAV: 2, 2, 3, 3, 4, 4; tailsize 4 -> tail (3, 3, 4, 4), small = 3, fit on (1, 1, 2, 2)
    scorer = OpenMaxScorer(tailsize=4, alpha=1).fit(openmax_train())
    np.testing.assert_allclose(scorer.means_, [[10.0, 0.0], [0.0, 10.0]])
    np.testing.assert_array_equal(scorer.small_, [3.0, 3.0])
    # alpha = 1: only the top class is revised (omega = 1).
    # (10, 0): distance 0 to MAV 0 -> 0 - 3 + 1 < 0 -> w = 0: nothing moves, unknown logit 0 -> 1 / (e^10 + e^0 + e^0)
    # (30, 0): distance 20 -> w = CDF(18) = 1: revised (0, 0), unknown logit 30 -> e^30 / (e^30 + 2)
    test = Features(logits=np.array([[10.0, 0.0], [0.0, 10.0], [30.0, 0.0]]))
    np.testing.assert_allclose(scorer.score(test), [1 / (np.exp(10) + 2), 1 / (np.exp(10) + 2),
                                                    1 / (1 + 2 * np.exp(-30))], rtol=1e-12)


def test_openmax_unknown_weights_the_top_alpha_classes():
    # logits (3, 2, 1), every w = 1/2, alpha = 2: omega (1, 1/2, 0) -> revised (1.5, 1.5, 1), unknown 1.5 + 0.5 = 2
    got = openmax_unknown(np.array([[3.0, 2.0, 1.0]]), np.full((1, 3), 0.5), 2)
    np.testing.assert_allclose(got, [np.exp(2) / (2 * np.exp(1.5) + np.exp(1) + np.exp(2))], rtol=1e-12)


def test_openmax_class_with_one_correct_sample_raises():
    f = Features(logits=np.array([[5.0, 0.0], [6.0, 0.0], [8.0, 0.0], [0.0, 5.0]]), labels=np.array([0, 0, 0, 1]))
    with pytest.raises(DataError, match="at least 2 correctly classified ID-train samples of each class; class 1 has 1"):
        OpenMaxScorer(alpha=1).fit(f)


def test_openmax_tail_of_equal_distances_raises():
    f = Features(logits=np.array([[5.0, 0.0], [6.0, 0.0], [0.0, 5.0], [0.0, 7.0]]), labels=np.array([0, 0, 1, 1]))
    with pytest.raises(DataError, match="cannot fit a Weibull to class 0's tail: its 2 largest distances"):
        OpenMaxScorer(alpha=1).fit(f)


# ---------------------------------------------------------------- errors

SMALL = features([[1.0, 2.0, 3.0, 4.0]], [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], [0.0, 0.0])


@pytest.mark.parametrize("scorer, match", [
    (DICEScorer(percentile=100), r"The 'percentile' parameter of DICE must be a float in the range \[0\.0, 100\.0\)\. "
                                 r"Got 100 instead\."),
    (DICEScorer(percentile="90"), r"The 'percentile' parameter of DICE must be .* Got '90' instead\."),
    (GradNormScorer(temperature=0), r"The 'temperature' parameter of GradNorm must be a positive finite float\. Got 0"),
    (ResidualScorer(dim=4), r"The 'dim' parameter of Residual must be None or an int in \[1, 3\] .* Got 4 instead"),
    (ResidualScorer(dim=0), r"The 'dim' parameter of Residual .* Got 0 instead"),
    (FDBDScorer(distance_as_normalizer="yes"), r"The 'distance_as_normalizer' parameter of fDBD must be an instance "
                                               r"of 'bool'"),
    (NNGuideScorer(k=0), r"The 'k' parameter of NNGuide must be an int in the range \[1, inf\)\. Got 0 instead\."),
    (NNGuideScorer(k=2, bank_size=0), r"The 'bank_size' parameter of NNGuide must be .* Got 0 instead\."),
    (NNGuideScorer(k=2), r"The 'k' parameter of NNGuide must be an int in \[1, 1\]"),
    (RelationScorer(power=0), r"The 'power' parameter of Relation must be a float in the range \(0\.0, inf\)\. Got 0"),
    (RelationScorer(threshold=-0.1), r"The 'threshold' parameter of Relation .* Got -0\.1 instead\."),
    (SHEScorer(metric="l1"), r"The 'metric' parameter of SHE must be a str among .*'inner_product'.* Got 'l1' instead"),
    (OpenMaxScorer(tailsize=1), r"The 'tailsize' parameter of OpenMax must be an int in the range \[2, inf\)\. Got 1"),
    (OpenMaxScorer(alpha=3), r"The 'alpha' parameter of OpenMax must be an int in \[1, 2\] \(at most the number of "
                             r"classes\)\. Got 3 instead\."),
    (OpenMaxScorer(distance="manhattan"), r"The 'distance' parameter of OpenMax must be a str among .* Got 'manh"),
])
def test_bad_hyperparameters_raise_config_error_in_fit(scorer, match):
    f = with_labels(SMALL) if isinstance(scorer, OpenMaxScorer) else SMALL
    with pytest.raises(ConfigError, match=match):
        scorer.fit(f)


@pytest.mark.parametrize("cls, owner", [(DICEScorer, "DICE"), (GradNormScorer, "GradNorm"),
                                        (ResidualScorer, "Residual"), (FDBDScorer, "fDBD"),
                                        (NNGuideScorer, "NNGuide"), (RelationScorer, "Relation"), (SHEScorer, "SHE")])
def test_missing_head_raises_data_error(cls, owner):
    no_head = Features(logits=SMALL.logits, penultimate=SMALL.penultimate, labels=np.array([0]))
    with pytest.raises(DataError, match=rf"{owner} needs \['head_weight', 'head_bias'\] from the feature store"):
        cls().fit(no_head).score(no_head)


def test_openmax_without_labels_raises_data_error():
    with pytest.raises(DataError, match=r"OpenMax needs \['labels'\] from the feature store"):
        OpenMaxScorer().fit(Features(logits=SMALL.logits))


@pytest.mark.parametrize("cls, owner", [(DICEScorer, "DICE"), (ResidualScorer, "Residual"), (FDBDScorer, "fDBD"),
                                        (NNGuideScorer, "NNGuide"), (RelationScorer, "Relation"), (SHEScorer, "SHE")])
def test_feature_count_mismatch_after_fit_raises(cls, owner, synthetic):
    scorer = cls().fit(synthetic[0])  # D = 64
    with pytest.raises(DataError, match=rf"{owner} was fitted on 64 penultimate features; got 4"):
        scorer.score(SMALL)
