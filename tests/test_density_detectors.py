"""Density and distance detectors per layer (issue 17, third part): RMDS, GMM, SSD, Mahalanobis++ and rMaha++.

Each is checked on a hand-computed case, against a transcription of its
reference code, on the contract (AUROC floor on planted outliers, clone, not
fitted, feature count), on its parameter errors and through an on-disk round trip.
"""

import dask.array as da
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.cluster import KMeans
from sklearn.covariance import EmpiricalCovariance
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture

from pipeline import persist
from pipeline.detectors import (
    SSD,
    ClassConditionalMahalanobis,
    RelativeMahalanobis,
    Standardized,
    TiedGMM,
    available_detectors,
    cluster_mahalanobis_scores,
    gmm_scores,
    l2_normalise,
    make_detector,
    relative_mahalanobis_scores,
)
from pipeline.detectors.gmm import principal_axes
from pipeline.errors import ConfigError, DataError
from pipeline.scoring import trusted_types

ROC_FLOOR = 0.8  # PyOD's quality floor on synthetic data
NEW = ["rmds", "gmm", "ssd", "mahalanobis_pp", "rmds_pp"]
FAST = {"gmm": {"n_components": 5}}  # the default 50 components work too (tests/test_detectors.py), more slowly
CLASSES = {"rmds": RelativeMahalanobis, "gmm": TiedGMM, "ssd": SSD, "mahalanobis_pp": ClassConditionalMahalanobis,
           "rmds_pp": RelativeMahalanobis}


def auroc(scores_id, scores_ood):
    """AUROC with OOD as the positive class."""
    return roc_auc_score(np.r_[np.zeros(len(scores_id)), np.ones(len(scores_ood))], np.r_[scores_id, scores_ood])


def fit(name, blobs, params=None, standardize=True):
    det = make_detector(name, {**FAST.get(name, {}), **(params or {})}, standardize=standardize)
    return det.fit(blobs.X_train, blobs.y_train if det.requires_labels else None)


# ----------------------------------------------------------------------------- (a) known answers


def test_rmds_known_answer_in_1d():
    # class 0: {-3, -1}, mean -2; class 1: {1, 3}, mean 2; class-centred values -1, 1, -1, 1: shared variance 1.
    # background: mean 0, variance (9 + 1 + 1 + 9) / 4 = 5.
    # x = 0:  min(4, 4) / 1 - 0 / 5   = 4
    # x = 2:  min(16, 0) / 1 - 4 / 5  = -0.8
    # x = 10: min(144, 64) / 1 - 100 / 5 = 44
    X, y = np.array([[-3.0], [-1.0], [1.0], [3.0]]), np.array([0, 0, 1, 1])
    det = RelativeMahalanobis(reg=0.0).fit(X, y)
    np.testing.assert_allclose(det.means_, [[-2.0], [2.0]])
    np.testing.assert_allclose(det.precision_, [[1.0]])
    np.testing.assert_allclose(det.background_precision_, [[0.2]])
    np.testing.assert_allclose(det.score([[0.0], [2.0], [10.0]]), [4.0, -0.8, 44.0], atol=1e-12)
    np.testing.assert_allclose(relative_mahalanobis_scores([[0.0], [2.0], [10.0]], [[-2.0], [2.0]], [[1.0]], [0.0],
                                                           [[0.2]]), [4.0, -0.8, 44.0], atol=1e-12)


def test_gmm_scores_known_answer():
    # means 0 and 4, precision 1, weights 1/2 each:
    # x = 2: both MD = 4 -> -log(1/2 e^-2 + 1/2 e^-2) = 2
    # x = 0: MD 0 and 16 -> -log(1/2 + 1/2 e^-8) = log 2 - log(1 + e^-8)
    # x = 1000: MD ~ 1e6, far past where exp underflows -> still finite: (996^2) / 2 - log(1/2 + ...) ~ 496008 + log 2
    means, precision, weights = np.array([[0.0], [4.0]]), np.array([[1.0]]), np.array([0.5, 0.5])
    scores = gmm_scores(np.array([[2.0], [0.0], [1000.0]]), means, precision, weights)
    np.testing.assert_allclose(scores[:2], [2.0, np.log(2) - np.log1p(np.exp(-8))], rtol=1e-12)
    np.testing.assert_allclose(scores[2], 996.0**2 / 2 + np.log(2), rtol=1e-12)


def test_gmm_fit_known_answer_in_1d():
    # two pairs {-6, -4} and {4, 6}, 2 tied components, no PCA, reg_covar 0: EM settles at means -5 and 5,
    # weights 1/2, tied variance ((1 + 1) + (1 + 1)) / 4 = 1 (responsibilities 1 - O(e^-40)).
    # x = 0: MD 25 to both -> -log(e^-12.5) = 12.5; x = 5: MD 0 and 100 -> -log(1/2 + 1/2 e^-50) = log 2
    X = np.array([[-6.0], [-4.0], [4.0], [6.0]])
    det = TiedGMM(n_components=2, pca_dim=None, reg_covar=0.0).fit(X)
    assert det.transform_ is None and det.converged_
    np.testing.assert_allclose(np.sort(det.means_[:, 0]), [-5.0, 5.0], atol=1e-9)
    np.testing.assert_allclose(det.weights_, [0.5, 0.5], atol=1e-9)
    np.testing.assert_allclose(det.precision_, [[1.0]], atol=1e-9)
    np.testing.assert_allclose(det.score([[0.0], [5.0]]), [12.5, np.log(2)], atol=1e-8)


def test_gmm_principal_axes_known_answer():
    # points +-3 e1, +-2 e2, +-0.1 e3: mean 0, covariance diag(18, 8, 0.02) / 6 -> leading axes e1, e2
    X = np.array([[3, 0, 0], [-3, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 0.1], [0, 0, -0.1]], dtype=float)
    np.testing.assert_allclose(principal_axes(X, 2), [[1, 0], [0, 1], [0, 0]], atol=1e-12)
    det = TiedGMM(n_components=1, pca_dim=2).fit(X)
    np.testing.assert_allclose(det.transform_, [[1, 0], [0, 1], [0, 0]], atol=1e-12)
    # projected on (e1, e2): the e3 coordinate is ignored
    np.testing.assert_allclose(det.score([[1.0, 1.0, 5.0]]), det.score([[1.0, 1.0, -5.0]]))


def test_ssd_known_answer_in_1d():
    # train {2, 3, -1, 5} -> L2-normalised u = {1, 1, -1, 1}: mean 0.5, std sqrt(3/4) = sqrt(3)/2
    # z = (u - 0.5) / (sqrt(3)/2): 1/sqrt(3) for u = 1, -sqrt(3) for u = -1; one cluster: mean 0, variance
    # (3 * 1/3 + 3) / 4 = 1, so score = z^2:
    # x = 7 (u = 1): 1/3;  x = -2 (u = -1): 3;  x = 0 (u = 0, the zero row stays 0): z = -1/sqrt(3) -> 1/3
    det = SSD(n_clusters=1, reg=0.0).fit(np.array([[2.0], [3.0], [-1.0], [5.0]]))
    np.testing.assert_allclose(det.mean_, [0.5], atol=1e-9)
    np.testing.assert_allclose(det.score([[7.0], [-2.0], [0.0]]), [1 / 3, 3.0, 1 / 3], atol=1e-8)


def test_cluster_mahalanobis_scores_known_answer():
    # cluster A: mean (0, 0), precision diag(1, 1); cluster B: mean (10, 0), precision diag(0.25, 4)
    # (2, 1):  A 4 + 1 = 5,   B 0.25 * 64 + 4 = 20 -> 5
    # (8, 0):  A 64,          B 0.25 * 4 = 1      -> 1
    # (10, 1): A 100 + 1,     B 0 + 4 = 4         -> 4
    means = np.array([[0.0, 0.0], [10.0, 0.0]])
    precisions = np.stack([np.eye(2), np.diag([0.25, 4.0])])
    X = np.array([[2.0, 1.0], [8.0, 0.0], [10.0, 1.0]])
    np.testing.assert_allclose(cluster_mahalanobis_scores(X, means, precisions), [5.0, 1.0, 4.0], atol=1e-12)


def test_mahalanobis_pp_known_answer_in_2d():
    # class 0: (2, 0), (0, 2) -> (1, 0), (0, 1), mean (0.5, 0.5); class 1: (-3, 0), (0, -3) -> mean (-0.5, -0.5).
    # Centred rows are +-(0.5, -0.5): covariance 0.5 v v' with v = (1, -1)/sqrt(2), pinv = 2 v v' = [[1, -1], [-1, 1]],
    # so MD(d) = (d1 - d2)^2.
    # (0, 7) -> (0, 1): to mean 0 (-0.5, 0.5) -> 1; to mean 1 (0.5, 1.5) -> 1; score 1
    # (5, 5) -> (1, 1)/sqrt(2): to mean 0 d1 = d2 -> 0 (the pseudo-inverse ignores what the classes do not span)
    X, y = np.array([[2.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, -3.0]]), np.array([0, 0, 1, 1])
    det = ClassConditionalMahalanobis(reg=0.0, normalize="l2").fit(X, y)
    np.testing.assert_allclose(det.precision_, [[1.0, -1.0], [-1.0, 1.0]], atol=1e-9)
    np.testing.assert_allclose(det.score([[0.0, 7.0], [5.0, 5.0], [0.0, 0.7]]), [1.0, 0.0, 1.0], atol=1e-9)


# ----------------------------------------------------------------------------- the reference codes, transcribed


def test_rmds_equals_openood_rmds_postprocessor(blobs):
    # openood/postprocessors/rmds_postprocessor.py, in float64: EmpiricalCovariance of the class-centred and of the
    # mean-centred features; conf = max_c (-MD_c + MD_0); our score is -conf (reg=0: the same pseudo-inverse)
    X, y, T = blobs.X_train, blobs.y_train, np.r_[blobs.X_id, blobs.X_ood]
    means = np.stack([X[y == c].mean(0) for c in range(3)])
    prec = EmpiricalCovariance(assume_centered=False).fit(np.concatenate([X[y == c] - means[c] for c in range(3)]))
    whole = EmpiricalCovariance(assume_centered=False).fit(X - X.mean(0))
    background = -np.einsum("ij,jk,ik->i", T - X.mean(0), whole.precision_, T - X.mean(0))
    classes = np.stack([-np.einsum("ij,jk,ik->i", T - m, prec.precision_, T - m) - background for m in means], 1)
    np.testing.assert_allclose(RelativeMahalanobis(reg=0.0).fit(X, y).score(T), -classes.max(1), rtol=1e-8)


def test_ssd_equals_the_authors_eval_ssd(blobs):
    # inspire-group/SSD eval_ssd.py: get_eval_results (L2, then z-score with s + 1e-10), then
    # get_scores_multi_cluster with the k-means labels: min over clusters of (x - m_k)' pinv(cov_k, biased) (x - m_k)
    X, T = blobs.X_train, np.r_[blobs.X_id, blobs.X_ood]
    u = X / (np.linalg.norm(X, axis=-1, keepdims=True) + 1e-10)
    m, s = u.mean(0, keepdims=True), u.std(0, keepdims=True)
    ftrain = (u - m) / (s + 1e-10)
    ftest = (T / (np.linalg.norm(T, axis=-1, keepdims=True) + 1e-10) - m) / (s + 1e-10)
    det = SSD(n_clusters=3, reg=0.0, random_state=0).fit(X)
    ypred = KMeans(n_clusters=3, n_init=1, max_iter=100, random_state=0).fit(ftrain).labels_
    din = [np.sum((ftest - x.mean(0, keepdims=True))
                  * np.linalg.pinv(np.cov(x.T, bias=True)).dot((ftest - x.mean(0, keepdims=True)).T).T, axis=-1)
           for x in (ftrain[ypred == i] for i in np.unique(ypred))]
    np.testing.assert_allclose(det.score(T), np.min(din, axis=0), rtol=1e-7)
    np.testing.assert_array_equal(np.sort(det.cluster_sizes_), np.sort(np.bincount(ypred)))


def test_gmm_equals_openood_gmm_postprocessor(blobs):
    # openood/postprocessors/gmm_postprocessor.py with gmm.yml's scored layer (pca_<m>, tied GaussianMixture,
    # random_state 0): transform = PCA.components_.T, no centring; prob = sum_k w_k exp(-MD_k / 2); conf = log(prob)
    X, T = blobs.X_train, np.r_[blobs.X_id, blobs.X_ood[:10]]
    W = PCA(n_components=5, svd_solver="full").fit(X).components_.T
    gm = GaussianMixture(n_components=4, random_state=0, covariance_type="tied").fit(X @ W)
    md = np.stack([np.einsum("ij,jk,ik->i", T @ W - mu, gm.precisions_, T @ W - mu) for mu in gm.means_], 1)
    conf = np.log(np.exp(-0.5 * md) @ gm.weights_)
    assert np.isfinite(conf).all()  # these rows are near enough for exp not to underflow
    det = TiedGMM(n_components=4, pca_dim=5).fit(X)
    np.testing.assert_allclose(np.abs(det.transform_), np.abs(W), atol=1e-8)
    np.testing.assert_allclose(det.score(T), -conf, rtol=1e-6)


# ----------------------------------------------------------------------------- (b) contract and quality floor


@pytest.mark.parametrize("standardize", [True, False], ids=["std", "raw"])
@pytest.mark.parametrize("name", NEW)
def test_contract_and_auroc_floor(name, standardize, blobs):
    det = make_detector(name, FAST.get(name), standardize=standardize)
    assert det.requires_labels == (name in ("rmds", "rmds_pp", "mahalanobis_pp"))
    assert det.fit(blobs.X_train, blobs.y_train) is det
    s_id, s_ood = det.score(blobs.X_id), det.score(blobs.X_ood)
    assert s_id.shape == (len(blobs.X_id),) and s_ood.shape == (len(blobs.X_ood),)
    assert np.isfinite(s_id).all() and np.isfinite(s_ood).all()
    assert auroc(s_id, s_ood) >= ROC_FLOOR
    before = persist.dumps(det)
    det.score(blobs.X_ood)
    assert persist.dumps(det) == before  # score changes no fitted state


@pytest.mark.parametrize("n_clusters", [2, 3, 6])
def test_ssd_clusters_are_seeded_and_keep_the_floor(n_clusters, blobs):
    one, two = (SSD(n_clusters=n_clusters, random_state=7).fit(blobs.X_train) for _ in range(2))
    np.testing.assert_array_equal(one.score(blobs.X_ood), two.score(blobs.X_ood))
    assert one.precisions_.shape == (n_clusters, 8, 8) and one.cluster_sizes_.sum() == len(blobs.X_train)
    assert auroc(one.score(blobs.X_id), one.score(blobs.X_ood)) >= ROC_FLOOR


def test_gmm_is_seeded(blobs):
    one, two = (TiedGMM(n_components=5, pca_dim=4, random_state=3).fit(blobs.X_train) for _ in range(2))
    np.testing.assert_array_equal(one.score(blobs.X_ood), two.score(blobs.X_ood))


def test_registry_wrapping():
    # plain RMDS is standardised like Mahalanobis; what must read the stored features is not
    assert isinstance(make_detector("rmds"), Standardized)
    for name, params in [("gmm", {}), ("ssd", {}), ("mahalanobis_pp", {}), ("rmds_pp", {}),
                         ("mahalanobis", {"normalize": "l2"}), ("rmds", {"normalize": "l2"})]:
        det = make_detector(name, params, standardize=True)
        assert isinstance(det, CLASSES.get(name, type(det))) and not isinstance(det, Standardized), name
    assert make_detector("mahalanobis_pp").normalize == "l2" and make_detector("rmds_pp").normalize == "l2"
    assert isinstance(make_detector("mahalanobis_pp", {"normalize": "none"}), Standardized)


# ----------------------------------------------------------------------------- (c) clone, not fitted, feature count


@pytest.mark.parametrize("name", NEW)
def test_clone_not_fitted_and_feature_count(name, blobs):
    det = fit(name, blobs)
    fresh = clone(det)
    assert repr(fresh) == repr(make_detector(name, FAST.get(name))) and fresh is not det
    with pytest.raises(NotFittedError, match=rf"This {type(fresh).__name__} instance is not fitted yet. Call 'fit'"):
        fresh.score(blobs.X_id)
    with pytest.raises(DataError, match=rf"X has 3 features, but {type(det).__name__} was fitted with 8 features"):
        det.score(blobs.X_id[:, :3])
    with pytest.raises(DataError, match="Input X contains NaN"):
        det.score(np.where(blobs.X_id == blobs.X_id[0, 0], np.nan, blobs.X_id))


# ----------------------------------------------------------------------------- (d) bad hyperparameters

BAD = [
    ("rmds", {"reg": -1}, r"'fit.detectors.rmds.reg' parameter of fit must be a float in the range \[0.0, inf\)"),
    ("rmds", {"normalize": "l1"}, r"'fit.detectors.rmds.normalize' parameter of fit must be a str among "
                                  r"\{'(none', 'l2|l2', 'none)'\} or None. Got 'l1'"),
    ("rmds_pp", {"reg": "big"}, r"'fit.detectors.rmds_pp.reg' parameter of fit must be a float"),
    ("mahalanobis", {"normalize": "L2"}, r"'fit.detectors.mahalanobis.normalize' parameter of fit .* Got 'L2'"),
    ("mahalanobis_pp", {"reg": -1.0}, r"'fit.detectors.mahalanobis_pp.reg' parameter of fit .* Got -1.0"),
    ("gmm", {"n_components": 0}, r"'fit.detectors.gmm.n_components' parameter of fit must be an int in the range "
                                 r"\[1, inf\). Got 0"),
    ("gmm", {"pca_dim": 2.5}, r"'fit.detectors.gmm.pca_dim' parameter of fit must be an int in the range \[1, inf\) "
                              r"or None. Got 2.5"),
    ("gmm", {"reg_covar": -0.1}, r"'fit.detectors.gmm.reg_covar' parameter of fit .* Got -0.1"),
    ("gmm", {"random_state": "seed"}, r"'fit.detectors.gmm.random_state' parameter of fit .* Got 'seed'"),
    ("ssd", {"n_clusters": 0}, r"'fit.detectors.ssd.n_clusters' parameter of fit must be an int in the range "
                               r"\[1, inf\). Got 0"),
    ("ssd", {"reg": -1e-3}, r"'fit.detectors.ssd.reg' parameter of fit .* Got -0.001"),
    ("ssd", {"random_state": 1.5}, r"'fit.detectors.ssd.random_state' parameter of fit .* Got 1.5"),
    ("ssd", {"k": 3}, r"Unknown parameter 'fit.detectors.ssd.k'. Valid parameters of 'fit.detectors.ssd' are "
                      r"\['n_clusters', 'random_state', 'reg'\]"),
    ("gmm", {"covariance_type": "full"}, r"Unknown parameter 'fit.detectors.gmm.covariance_type'. Valid parameters "
                                         r"of 'fit.detectors.gmm' are \['n_components', 'pca_dim', 'random_state', "
                                         r"'reg_covar'\]"),
]


@pytest.mark.parametrize("name, params, message", BAD, ids=[f"{n}-{next(iter(p))}" for n, p, _ in BAD])
def test_bad_hyperparameters_are_config_errors(name, params, message):
    with pytest.raises(ConfigError, match=message):
        make_detector(name, params, where="fit.detectors")


@pytest.mark.parametrize("det, message", [
    (SSD(n_clusters=301), r"'n_clusters' parameter of SSD must be an integer in \[1, n_train\] with n_train=300. "
                          r"Got 301"),
    (TiedGMM(n_components=400), r"'n_components' parameter of TiedGMM must be an integer in \[1, n_train\] with "
                                r"n_train=300. Got 400"),
    (RelativeMahalanobis(reg=-2), r"'reg' parameter of RelativeMahalanobis must be a float .* Got -2"),
    (ClassConditionalMahalanobis(normalize="max"), r"'normalize' parameter of ClassConditionalMahalanobis must be one "
                                                   r"of \['l2', 'none'\] or None. Got 'max'"),
], ids=["ssd-n_clusters", "gmm-n_components", "rmds-reg", "mahalanobis-normalize"])
def test_bad_values_found_at_fit(det, message, blobs):
    with pytest.raises(ConfigError, match=message):
        det.fit(blobs.X_train, blobs.y_train)


def test_degenerate_features_give_one_line_data_errors():
    with pytest.raises(DataError, match=r"^TiedGMM could not fit its mixture on 5 samples: Fitting the mixture model "
                                        r"failed .* increase reg_covar"):
        TiedGMM(n_components=1, reg_covar=0.0).fit(np.ones((5, 3)))
    with pytest.raises(DataError, match="Input X contains infinity"):
        SSD().fit(np.full((5, 3), np.inf))


def test_rmds_needs_labels(blobs):
    with pytest.raises(ConfigError, match=r"'y' parameter of RelativeMahalanobis.fit .* Got None"):
        RelativeMahalanobis().fit(blobs.X_train)
    with pytest.raises(DataError, match="X has 300 samples but y has 299 labels"):
        make_detector("rmds_pp").fit(blobs.X_train, blobs.y_train[:-1])


# ----------------------------------------------------------------------------- (e) on-disk round trip


@pytest.mark.parametrize("name", NEW + ["mahalanobis"])
def test_saved_detector_loads_back_and_scores_identically(name, blobs, tmp_path):
    det = fit(name, blobs, {"n_clusters": 3} if name == "ssd" else None)
    path = persist.dump(det, tmp_path / name, trusted_types())
    assert path.name == f"{name}.zip"  # plain data: written without skops
    loaded = persist.load(path, trusted_types())
    assert type(loaded) is type(det) and loaded.get_params(deep=False).keys() == det.get_params(deep=False).keys()
    assert persist.encode(loaded, trusted_types()) == (".zip", path.read_bytes())  # the bytes survive the trip
    np.testing.assert_array_equal(loaded.score(blobs.X_ood), det.score(blobs.X_ood))


# ----------------------------------------------------------------------------- (f) Mahalanobis++ = Mahalanobis on L2


@pytest.mark.parametrize("name, params", [("mahalanobis_pp", {}), ("mahalanobis", {"normalize": "l2"}),
                                          ("rmds_pp", {}), ("rmds", {"normalize": "l2"})])
def test_plus_plus_is_the_plain_detector_on_l2_normalised_stored_features(name, params, blobs):
    # fit.standardize: true must not z-score before the normalisation: the norm is the stored features' own
    X = blobs.X_train * np.linspace(0.2, 5, 8) + 1.5  # unequal channel scales, non-zero mean: z-scoring would show
    T = np.r_[blobs.X_id, blobs.X_ood] * np.linspace(0.2, 5, 8) + 1.5
    plus = make_detector(name, params, standardize=True).fit(X, blobs.y_train)
    plain = type(plus)(reg=plus.reg).fit(l2_normalise(X), blobs.y_train)
    assert plain.normalize == "none"
    np.testing.assert_allclose(plus.score(T), plain.score(l2_normalise(T)), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(plus.score(T * 3.0), plus.score(T), rtol=1e-9, atol=1e-9)  # blind to row scale
    assert not np.allclose(make_detector(name.split("_")[0]).fit(X, blobs.y_train).score(T), plus.score(T))


@pytest.mark.parametrize("cls", [ClassConditionalMahalanobis, RelativeMahalanobis])
@pytest.mark.parametrize("normalize", ["none", "l2"])
def test_fit_dask_equals_fit(cls, normalize, blobs):
    X = blobs.X_train * np.linspace(0.5, 4, 8) + 2.0
    eager = cls(normalize=normalize).fit(X, blobs.y_train)
    lazy = cls(normalize=normalize).fit_dask(da.from_array(X, chunks=(37, 8)), blobs.y_train)
    np.testing.assert_allclose(lazy.score(blobs.X_ood), eager.score(blobs.X_ood), rtol=1e-7)
    np.testing.assert_allclose(lazy.means_, eager.means_, atol=1e-12)


def test_standardized_rmds_fits_out_of_core(blobs):
    eager = make_detector("rmds").fit(blobs.X_train, blobs.y_train)
    lazy = make_detector("rmds").fit_dask(da.from_array(blobs.X_train, chunks=(64, 8)), blobs.y_train)
    assert lazy.supports_dask and not hasattr(SSD(), "fit_dask") and not hasattr(TiedGMM(), "fit_dask")
    np.testing.assert_allclose(lazy.score(blobs.X_ood), eager.score(blobs.X_ood), rtol=1e-7)


def test_every_new_name_is_registered():
    assert set(NEW) <= set(available_detectors())
