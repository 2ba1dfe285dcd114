"""Tests for the logits-only post-hoc scorers of issue 17: TempScale, Entropy, GEN and KL matching."""

import dataclasses
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from scipy.stats import entropy as scipy_entropy
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from pipeline.errors import ConfigError, DataError
from pipeline.scorers import SCORERS as REGISTRY
from pipeline.scorers import make_scorer
from pipeline.scorers.base import Features
from pipeline.scorers.entropy import EntropyScorer, entropy_scores
from pipeline.scorers.gen import GENScorer, gen_scores
from pipeline.scorers.klm import KLMatchingScorer, klm_scores, klm_templates
from pipeline.scorers.msp import MSPScorer
from pipeline.scorers.tempscale import TempScaleScorer, fit_temperature, temperature_nll
from tests.test_scorers_posthoc import ROC_FLOOR, auroc, make_penultimate

SCORERS = {
    "tempscale": TempScaleScorer(),
    "entropy": EntropyScorer(),
    "gen": GENScorer(),
    "gen_g1_m2": GENScorer(gamma=1.0, M=2),
    "klm": KLMatchingScorer(),
}

LOGITS = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])  # softmax (1/2, 1/2) and (3/4, 1/4)


def labelled(f, rng, noise=0.1):
    """``f`` with labels: the predicted class, a ``noise`` fraction redrawn at random (so that T has a minimum)."""
    labels = f.logits.argmax(axis=1)
    flip = rng.random(len(labels)) < noise
    labels[flip] = rng.integers(0, f.logits.shape[1], flip.sum())
    return dataclasses.replace(f, labels=labels)


def strict(fn, *args):
    """``fn(*args)`` with overflow, division by zero and invalid values (and every warning) errors; underflow is fine."""
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        return fn(*args)


# ---------------------------------------------------------------- contract and direction

@pytest.mark.parametrize("name", SCORERS)
def test_scorer_contract_and_auroc_floor(name, rng):
    train, id_test, ood = make_penultimate(rng)
    scorer = clone(SCORERS[name])
    assert scorer.fit(labelled(train, rng)) is scorer
    s_id, s_ood = scorer.score(id_test), scorer.score(ood)
    assert s_id.shape == (150,) and s_ood.shape == (150,)
    assert s_id.dtype == np.float64 and np.isfinite(s_id).all() and np.isfinite(s_ood).all()
    assert auroc(s_id, s_ood) >= ROC_FLOOR


@pytest.mark.parametrize("name", SCORERS)
def test_clone_keeps_params_and_drops_state(name, rng):
    scorer = SCORERS[name]
    fresh = clone(clone(scorer).fit(labelled(make_penultimate(rng)[0], rng)))
    assert fresh.get_params() == scorer.get_params()
    assert not [k for k in vars(fresh) if k.endswith("_")]


@pytest.mark.parametrize("cls", [TempScaleScorer, KLMatchingScorer])
def test_not_fitted_raises(cls):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        cls().score(Features(logits=LOGITS))


@pytest.mark.parametrize("cls", [EntropyScorer, GENScorer])
def test_stateless_scorers_score_without_fit_and_fit_on_nothing(cls):
    # the pipeline fits a scorer that learns nothing on an empty bundle (fit_on_train reads no data for it)
    f = Features(logits=LOGITS)
    np.testing.assert_array_equal(cls().fit(Features()).score(f), cls().score(f))


def test_registry_names_and_what_fit_reads():
    assert {n: REGISTRY[n][0] for n in ("tempscale", "entropy", "gen", "klm")} == {
        "tempscale": TempScaleScorer, "entropy": EntropyScorer, "gen": GENScorer, "klm": KLMatchingScorer}
    assert TempScaleScorer.learns and KLMatchingScorer.learns
    assert not EntropyScorer.learns and not GENScorer.learns
    assert GENScorer.refit_free_params == ("gamma", "M")
    assert make_scorer("gen", {"gamma": 0.5, "M": 5}).get_params() == {"gamma": 0.5, "M": 5}


# ---------------------------------------------------------------- TempScale

# Three rows with logits (1, 0), labels (0, 0, 1). With b = 1/T the NLL is
# -(2 log s(b) + log(1 - s(b))) / 3, s the sigmoid; its derivative is
# (-2 (1 - s) + s) / 3 = 0 at s(b) = 2/3, so b = ln 2 and T = 1 / ln 2.
TS_TRAIN = Features(logits=np.array([[1.0, 0.0]] * 3), labels=np.array([0, 0, 1]))


def test_tempscale_known_answer():
    scorer = TempScaleScorer().fit(TS_TRAIN)
    assert scorer.temperature_ == pytest.approx(1 / np.log(2.0), rel=1e-8)
    # (1, 0) / T = (ln 2, 0): softmax (2/3, 1/3);  (2, 0) / T = (ln 4, 0): softmax (4/5, 1/5)
    np.testing.assert_allclose(scorer.score(Features(logits=np.array([[1.0, 0.0], [2.0, 0.0]]))),
                               [-2 / 3, -4 / 5], rtol=1e-8)
    # NLL at that T: -(2 ln 2/3 + ln 1/3) / 3 = ln 3 - (2/3) ln 2
    assert temperature_nll(TS_TRAIN.logits, TS_TRAIN.labels, 1 / np.log(2.0)) == pytest.approx(
        np.log(3.0) - 2 / 3 * np.log(2.0), rel=1e-12)


@pytest.mark.parametrize("t0", [0.5, 2.5])
def test_tempscale_recovers_a_known_temperature(t0):
    # labels drawn from softmax(z / t0): the NLL's minimiser is a consistent estimate of t0
    rng = np.random.default_rng(1)
    z = rng.normal(scale=4.0, size=(20000, 10))
    labels = (softmax(z / t0, axis=1).cumsum(axis=1) > rng.random((len(z), 1))).argmax(axis=1)
    assert fit_temperature(z, labels) == pytest.approx(t0, rel=0.03)


def test_fit_temperature_without_a_minimum_returns_the_nearer_bound():
    # all right: the slope E_p[z] - z_y < 0 for every T, the NLL falls as T -> 0
    assert fit_temperature(np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) == 1e-4
    # all wrong: the slope > 0, the NLL falls as T -> inf (towards the uniform softmax)
    assert fit_temperature(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 0])) == 1e4


def test_tempscale_ignores_unlabelled_rows():
    # rows labelled -1 (OOD, outliers) take no part: the fit is TS_TRAIN's
    f = Features(logits=np.r_[TS_TRAIN.logits, [[0.0, 9.0]]], labels=np.r_[TS_TRAIN.labels, -1])
    assert TempScaleScorer().fit(f).temperature_ == pytest.approx(1 / np.log(2.0), rel=1e-8)


def test_tempscale_keeps_t_1_when_rows_are_all_classified_right(caplog):
    # every label is the arg max: the NLL falls as T -> 0 and has no minimum, so no T is identifiable
    f = Features(logits=np.array([[2.0, 0.0], [0.0, 1.0]]), labels=np.array([0, 1]))
    scorer = TempScaleScorer().fit(f)
    assert scorer.temperature_ == 1.0 and scorer.identifiable_ is False
    assert "all 2 labelled ID rows are classified correctly" in caplog.text and "T = 1" in caplog.text
    np.testing.assert_allclose(scorer.score(f), MSPScorer().fit(f).score(f))


@pytest.mark.parametrize("labels, match", [
    ([-1, -1, -1], r"TempScale needs ID rows with class labels \(>= 0\) to fit its temperature; got none\."),
    ([0, 0, 2], r"TempScale got label 2 for logits with 2 classes\."),
])
def test_tempscale_bad_labels_raise_data_error(labels, match):
    with pytest.raises(DataError, match=match):
        TempScaleScorer().fit(dataclasses.replace(TS_TRAIN, labels=np.array(labels)))


def test_tempscale_without_labels_raises_data_error():
    with pytest.raises(DataError, match=r"TempScale needs \['labels'\] from the feature store"):
        TempScaleScorer().fit(Features(logits=LOGITS))


# ---------------------------------------------------------------- Entropy

def test_entropy_known_answer():
    # (1/2, 1/2): ln 2.  (3/4, 1/4): -(3/4 ln 3/4 + 1/4 ln 1/4) = ln 4 - (3/4) ln 3 = 0.5623351446188083
    np.testing.assert_allclose(entropy_scores(LOGITS), [np.log(2.0), 0.5623351446188083], rtol=1e-12)
    np.testing.assert_allclose(EntropyScorer().score(Features(logits=LOGITS)), entropy_scores(LOGITS))


def test_entropy_matches_scipy(rng):
    z = rng.normal(scale=3.0, size=(20, 7))
    np.testing.assert_allclose(entropy_scores(z), scipy_entropy(softmax(z, axis=1), axis=1), rtol=1e-12)


# ---------------------------------------------------------------- GEN

def test_gen_known_answer():
    # gamma = 1/2, M = 2: sum_j sqrt(p_j (1 - p_j)).  (1/2, 1/2): 1/2 + 1/2 = 1.
    # (3/4, 1/4): 2 sqrt(3/16) = sqrt(3) / 2
    np.testing.assert_allclose(gen_scores(LOGITS, 0.5, 2), [1.0, np.sqrt(3.0) / 2], rtol=1e-12)
    # (ln 2, 0, 0): p = (1/2, 1/4, 1/4); gamma = 1: terms p (1 - p) = 4/16, 3/16, 3/16
    # top-1: 4/16; top-2: 7/16; top-3 = every class: 10/16; M = 100 > 3 classes: every class
    three = [[np.log(2.0), 0.0, 0.0]]
    for m, expected in [(1, 4 / 16), (2, 7 / 16), (3, 10 / 16), (100, 10 / 16)]:
        np.testing.assert_allclose(gen_scores(three, 1.0, m), [expected], rtol=1e-12)
    np.testing.assert_allclose(GENScorer(gamma=1.0, M=2).score(Features(logits=np.array(three))), [7 / 16])


def test_gen_matches_openood_formula(rng):
    # OpenOOD's generalized_entropy: sort ascending, keep the last M, sum p^g (1 - p)^g; it returns -G
    z = rng.normal(scale=3.0, size=(30, 12))
    for gamma, m in [(0.1, 100), (0.1, 5), (2.0, 1), (10.0, 12)]:
        p = np.sort(softmax(z, axis=1), axis=1)[:, -m:]
        np.testing.assert_allclose(gen_scores(z, gamma, m), (p ** gamma * (1 - p) ** gamma).sum(axis=1), rtol=1e-10)


def test_gen_set_refit_free_equals_a_fresh_scorer(rng):
    """A search shares one fit across gamma and M (refit_free_params)."""
    f = make_penultimate(rng)[1]
    shared = GENScorer().fit(Features()).set_refit_free(gamma=2.0, M=3)
    np.testing.assert_array_equal(shared.score(f), GENScorer(gamma=2.0, M=3).score(f))
    assert shared.get_params() == {"gamma": 2.0, "M": 3}
    with pytest.raises(ConfigError, match=r"GEN can change only \['gamma', 'M'\] without refitting; got 'T'\."):
        shared.set_refit_free(T=1.0)
    with pytest.raises(ConfigError, match=r"The 'M' parameter of GEN must be an int >= 1\. Got 0 instead\."):
        shared.set_refit_free(M=0)


# ---------------------------------------------------------------- KL matching

# Fit rows: (ln 3, 0) -> p (3/4, 1/4), predicted 0;  (0, 0) -> (1/2, 1/2), predicted 0 (ties: first);
# (0, ln 3) -> (1/4, 3/4), predicted 1.  Templates: d_0 = (5/8, 3/8), d_1 = (1/4, 3/4).
KLM_TRAIN = Features(logits=np.array([[np.log(3.0), 0.0], [0.0, 0.0], [0.0, np.log(3.0)]]))


def test_klm_known_answer():
    scorer = KLMatchingScorer().fit(KLM_TRAIN)
    np.testing.assert_array_equal(scorer.classes_, [0, 1])
    np.testing.assert_allclose(np.exp(scorer.log_templates_), [[5 / 8, 3 / 8], [1 / 4, 3 / 4]], rtol=1e-12)
    # (1/2, 1/2):  KL to d_0 = 1/2 ln(4/5) + 1/2 ln(4/3) = 1/2 ln(16/15);  to d_1 = 1/2 ln(4/3): min 1/2 ln(16/15)
    # (3/4, 1/4):  KL to d_0 = 3/4 ln(6/5) + 1/4 ln(2/3) = 0.0353752...;   to d_1 = 1/2 ln 3: min to d_0
    # (1/4, 3/4):  equal to d_1: 0
    test = Features(logits=np.array([[0.0, 0.0], [np.log(3.0), 0.0], [0.0, np.log(3.0)]]))
    expected = [0.5 * np.log(16 / 15), 0.75 * np.log(6 / 5) + 0.25 * np.log(2 / 3), 0.0]
    np.testing.assert_allclose(scorer.score(test), expected, rtol=1e-12, atol=1e-15)


def test_klm_matches_openood_formula(rng):
    # OpenOOD: templates = mean softmax per predicted class (one-hot for a class never predicted),
    # score = -min_k scipy.stats.entropy(p, d_k). Class 2 is never predicted on these fit rows.
    fit = rng.normal(size=(40, 3)) - [0.0, 0.0, 20.0]
    test = rng.normal(scale=2.0, size=(25, 3))
    p_fit, pred = softmax(fit, axis=1), fit.argmax(axis=1)
    templates = [p_fit[pred == k].mean(axis=0) if (pred == k).any() else np.eye(3)[k] for k in range(3)]
    with np.errstate(divide="ignore"):
        openood = -np.min([[scipy_entropy(p, d) for d in templates] for p in softmax(test, axis=1)], axis=1)
    scorer = KLMatchingScorer().fit(Features(logits=fit))
    np.testing.assert_array_equal(scorer.classes_, [0, 1])
    np.testing.assert_allclose(scorer.score(Features(logits=test)), -openood, rtol=1e-10)


def test_klm_width_mismatch_after_fit_raises():
    with pytest.raises(DataError, match="KLMatching was fitted on 2 logit columns; got 3"):
        KLMatchingScorer().fit(KLM_TRAIN).score(Features(logits=np.zeros((1, 3))))


# ---------------------------------------------------------------- stability on huge logits

BIG = np.array([[1000.0, 0.0], [-1000.0, -1000.0]])


def test_entropy_and_gen_are_stable_for_huge_logits():
    # (1, e^-1000): entropy 1000 e^-1000 -> 0;  (1/2, 1/2): ln 2
    np.testing.assert_allclose(strict(entropy_scores, BIG), [0.0, np.log(2.0)], atol=1e-300)
    # gamma = 0.1: each term of (1, e^-1000) is (e^-1000)^0.1 = e^-100 (not 0: the tail still counts);
    # (1/2, 1/2): 2 (1/4)^0.1
    np.testing.assert_allclose(strict(gen_scores, BIG, 0.1, 100), [2 * np.exp(-100.0), 2 * 0.25 ** 0.1], rtol=1e-9)


def test_tempscale_is_stable_for_huge_logits():
    # TS_TRAIN times 1000: T scales with the logits, to 1000 / ln 2; scores as in the known answer
    big = dataclasses.replace(TS_TRAIN, logits=TS_TRAIN.logits * 1000.0)
    scorer = strict(TempScaleScorer().fit, big)
    assert scorer.temperature_ == pytest.approx(1000 / np.log(2.0), rel=1e-8)
    scores = strict(scorer.score, Features(logits=np.array([[1000.0, 0.0], [2000.0, 0.0], [1e6, 0.0]])))
    np.testing.assert_allclose(scores, [-2 / 3, -4 / 5, -1.0], rtol=1e-8)


def test_klm_is_stable_for_huge_logits():
    # templates (1, e^-1000) and (e^-1000, 1), kept as logs (0, -1000) and (-1000, 0)
    scorer = strict(KLMatchingScorer().fit, Features(logits=np.array([[1000.0, 0.0], [0.0, 1000.0]])))
    np.testing.assert_allclose(scorer.log_templates_, [[0.0, -1000.0], [-1000.0, 0.0]])
    # (1000, 0) is its template: 0.  (0, 0): 1/2 (ln 1/2 - 0) + 1/2 (ln 1/2 + 1000) = 500 - ln 2
    scores = strict(scorer.score, Features(logits=np.array([[1000.0, 0.0], [0.0, 0.0]])))
    np.testing.assert_allclose(scores, [0.0, 500.0 - np.log(2.0)], atol=1e-9)
    # both BIG rows are predicted 0 ((-1000, -1000) ties): one template, mean of (1, 0) and (1/2, 1/2) = (3/4, 1/4);
    # KL((1, 0) || d) = ln(4/3);  KL((1/2, 1/2) || d) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    classes, log_templates = klm_templates(BIG)
    assert classes.tolist() == [0]
    np.testing.assert_allclose(strict(klm_scores, BIG, log_templates), [np.log(4 / 3), 0.5 * np.log(4 / 3)],
                               rtol=1e-12)


def test_temperature_nll_is_stable_for_huge_logits():
    # logsumexp(1e6, 0) - 0 = 1e6 (label 1);  label 0: log(1 + e^-1e6) = 0
    assert strict(temperature_nll, np.array([[1e6, 0.0]] * 2), np.array([1, 0]), 1.0) == pytest.approx(5e5)
    assert logsumexp([1e6, 0.0]) == 1e6


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("scorer, match", [
    (GENScorer(gamma=0), r"The 'gamma' parameter of GEN must be a positive finite float\. Got 0 instead\."),
    (GENScorer(gamma=-1.0), r"The 'gamma' parameter of GEN must be a positive finite float\. Got -1\.0 instead"),
    (GENScorer(gamma=np.inf), r"The 'gamma' parameter of GEN must be a positive finite float\. Got inf instead"),
    (GENScorer(gamma=True), r"The 'gamma' parameter of GEN must be a positive finite float\. Got True instead"),
    (GENScorer(gamma="0.1"), r"The 'gamma' parameter of GEN .* Got '0\.1' instead"),
    (GENScorer(M=0), r"The 'M' parameter of GEN must be an int >= 1\. Got 0 instead\."),
    (GENScorer(M=1.5), r"The 'M' parameter of GEN must be an int >= 1\. Got 1\.5 instead\."),
    (GENScorer(M=True), r"The 'M' parameter of GEN must be an int >= 1\. Got True instead\."),
])
def test_bad_hyperparameters_raise_config_error_in_fit_and_score(scorer, match):
    with pytest.raises(ConfigError, match=match):
        scorer.fit(Features(logits=LOGITS))
    with pytest.raises(ConfigError, match=match):
        scorer.score(Features(logits=LOGITS))


@pytest.mark.parametrize("params, match", [
    ({"gamma": 0}, r"The 'detect\.methods\.gen\.gamma' parameter of detect must be a float in the range "
                   r"\(0\.0, inf\)\. Got 0 instead\."),
    ({"M": 0}, r"The 'detect\.methods\.gen\.M' parameter of detect must be an int in the range \[1, inf\)\. "
               r"Got 0 instead\."),
])
def test_bad_hyperparameters_are_caught_before_any_data(params, match):
    with pytest.raises(ConfigError, match=match):
        make_scorer("gen", params).check_params(prefix="detect.methods.gen.")


@pytest.mark.parametrize("name, params", [("tempscale", {"temperature": 2.0}), ("klm", {"templates_from": "id_val"}),
                                          ("entropy", {"M": 5})])
def test_parameterless_scorers_refuse_parameters(name, params):
    key = next(iter(params))
    with pytest.raises(ConfigError, match=rf"Unknown parameter '{key}' for method '{name}' in detect\.methods\. "
                                          r"Accepted parameters are \[\]\."):
        make_scorer(name, params)


@pytest.mark.parametrize("scorer, owner", [(TempScaleScorer(), "TempScale"), (EntropyScorer(), "Entropy"),
                                           (GENScorer(), "GEN"), (KLMatchingScorer(), "KLMatching")])
def test_missing_logits_raises_data_error(scorer, owner):
    with pytest.raises(DataError, match=rf"^{owner} needs \['logits'"):
        scorer.fit(Features()).score(Features())


@pytest.mark.parametrize("scorer, owner", [(EntropyScorer(), "Entropy"), (GENScorer(), "GEN"),
                                           (KLMatchingScorer(), "KLMatching")])
def test_non_finite_logits_raise_data_error(scorer, owner):
    with pytest.raises(DataError, match=f"{owner} got non-finite values"):
        scorer.fit(Features(logits=LOGITS)).score(Features(logits=np.array([[np.nan, 0.0]])))
