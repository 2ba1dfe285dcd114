"""The guard's lean scoring path (issue 18): compiled detectors score as the detectors' own ``score``."""

import copy

import numpy as np
import pytest
import torch

from pipeline.detectors import Standardized, make_detector
from pipeline.errors import DataError
from pipeline.guard import Guard
from pipeline import lean
from pipeline.lean import _clear, compile_scorer
from pipeline.scoring import fit_detectors

LAYERS = ["layer1", "layer2"]
COMPILED = {"mahalanobis": {}, "mahalanobis_pp": {}, "knn_l2": {"k": 3}}
FALLBACK = {"knn": {"n_neighbors": 3}, "rmds": {}}  # PyOD's and ours without a lean form: their own score


@pytest.fixture
def fitted(tiny_store):
    """Real detectors of every kind the lean path compiles (and two it does not), fitted on the tiny store."""
    return tiny_store, fit_detectors(tiny_store, {**COMPILED, **FALLBACK})


def _rows(store, split, layer):
    return np.concatenate([block for _, block in store.iter_blocks(split, layer)]).astype(np.float64)


@pytest.mark.parametrize("name", [*COMPILED, *FALLBACK])
def test_lean_scores_equal_the_detectors_own_at_every_batch_size(fitted, name):
    store, detectors = fitted
    for layer in LAYERS:
        det = detectors.detectors[name, layer]
        scorer = compile_scorer(det)
        assert scorer.compiled == (name in COMPILED)
        X = np.concatenate([_rows(store, "id_val", layer), _rows(store, "noise_test", layer)])
        for rows in (X[:1], X[:3], X[:17], X):
            scores, above = scorer(torch.from_numpy(rows).float(), threshold=np.median(det.score(X)) * 1.001)
            np.testing.assert_allclose(scores, det.score(rows), rtol=1e-6, atol=0)
            assert np.array_equal(above, scores > np.median(det.score(X)) * 1.001)
            if scorer.compiled:  # the torch function (other devices, and the CPU for kinds without a numpy twin)
                np.testing.assert_allclose(scorer.fn(torch.from_numpy(rows)).numpy(), det.score(rows), rtol=1e-6)


def test_the_cpu_scores_a_batch_in_row_blocks_that_numpy_computes_on_one_thread(fitted, monkeypatch):
    """Every CPU batch goes to the numpy twin, whose product is cut in blocks of at most SERIAL_MACS multiply-adds
    (OpenBLAS wakes threads of its own above); the blocks give the scores of one product."""
    store, detectors = fitted
    det = detectors.detectors["mahalanobis", "layer2"]
    scorer = compile_scorer(det)
    rows = torch.from_numpy(_rows(store, "noise_test", "layer2")).float()
    whole, _ = scorer(rows)
    sizes = []

    class Numpy:  # numpy for lean, with its matmul counting the rows of each product
        def __getattr__(self, name):
            return getattr(np, name)

        def matmul(self, a, b, out):
            sizes.append(len(a))
            return np.matmul(a, b, out=out)

    monkeypatch.setattr(lean, "np", Numpy())
    monkeypatch.setattr(lean, "SERIAL_MACS", 3 * scorer._small.keywords["G"].size)  # 3 rows per product
    blocked, _ = scorer(rows)
    assert sizes == [3] * (len(rows) // 3) + ([len(rows) % 3] if len(rows) % 3 else [])
    np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=0)
    np.testing.assert_allclose(blocked, det.score(rows.numpy().astype(np.float64)), rtol=1e-6, atol=0)


def test_a_standardized_knn_is_compiled_too(fitted):
    store, _ = fitted
    X = _rows(store, "id_train", "layer2")
    det = Standardized(detector=make_detector("knn_l2", {"k": 2})).fit(X)
    scorer = compile_scorer(det)
    Y = _rows(store, "noise_test", "layer2")
    assert scorer.compiled
    np.testing.assert_allclose(scorer(torch.from_numpy(Y))[0], det.score(Y), rtol=1e-6, atol=0)


def test_non_finite_activations_raise_the_detectors_one_line_error(fitted):
    store, detectors = fitted
    det = detectors.detectors["mahalanobis", "layer1"]
    rows = torch.from_numpy(_rows(store, "id_val", "layer1")[:2].copy())
    rows[1, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        compile_scorer(det)(rows)


def test_a_score_at_the_threshold_is_decided_by_the_detectors_own_score(fitted):
    """Round-off between numpy and torch must not flip a decision: a tie goes to ``score``."""
    store, detectors = fitted
    det = detectors.detectors["mahalanobis", "layer2"]
    rows = _rows(store, "noise_test", "layer2")
    own = det.score(rows)
    scores, above = compile_scorer(det)(torch.from_numpy(rows), threshold=float(own[0]))
    assert np.array_equal(scores, own) and not above[0]


@pytest.mark.parametrize("name", [*COMPILED, "knn"])
def test_the_guard_decides_as_with_the_detectors_own_score(tiny_model, tiny_splits, fitted, name):
    store, detectors = fitted
    chosen = {layer: detectors.detectors[name, layer] for layer in LAYERS}
    thresholds = {layer: float(np.median(det.score(_rows(store, "noise_test", layer)))) for layer, det in
                  chosen.items()}
    guard = Guard(tiny_model, chosen, thresholds, (1, 8, 8))
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    lean = guard(x)
    exact = _validated(guard, x)
    assert [s.compiled for s in guard.scorers] == [name in COMPILED] * 2
    assert np.array_equal(lean.exit_layer, exact.exit_layer) and np.array_equal(lean.pred, exact.pred)
    np.testing.assert_allclose(lean.scores, exact.scores, rtol=1e-6, atol=0)  # NaN where both stopped
    for batch in (x[:1], x[1:2]):  # batch 1: the numpy twin
        assert np.array_equal(guard(batch).exit_layer, _validated(guard, batch).exit_layer)


def test_the_guard_self_check_replaces_a_compiled_scorer_that_disagrees_with_score(tiny_model, fitted, caplog):
    """The self-check compares each compiled scorer with the detector's own ``score`` on its probe rows."""
    store, detectors = fitted
    chosen = {layer: detectors.detectors["mahalanobis", layer] for layer in LAYERS}
    guard = Guard(tiny_model, chosen, {layer: np.inf for layer in LAYERS}, (1, 8, 8))
    assert all(s.compiled for s in guard.scorers)  # agreeing scorers are kept
    broken = guard.scorers[1]
    broken.fn = broken._small = lambda x: np.zeros(len(x)) if isinstance(x, np.ndarray) else torch.zeros(len(x))
    with caplog.at_level("WARNING", logger="pipeline.guard"):
        guard._self_check()
    assert [s.compiled for s in guard.scorers] == [True, False]
    assert f"compiled scorer of Standardized at '{LAYERS[1]}' differs from its score()" in caplog.text


@torch.inference_mode()
def _validated(guard, x):
    """The guard with every layer scored by its detector's own ``score`` (the path before the lean one)."""
    return guard._run(x, guard.thresholds, validated=True)


@pytest.mark.parametrize("name", [*COMPILED, "knn"])
def test_one_row_scores_as_the_batch_path(fitted, name):
    store, detectors = fitted
    det = detectors.detectors[name, "layer2"]
    scorer = compile_scorer(det)
    rows = _rows(store, "noise_test", "layer2")
    threshold = float(np.median(det.score(rows)))
    for row in rows[:5]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):  # bfloat16: no numpy twin, the torch path
            value, above = scorer.one(torch.from_numpy(row[None]).to(dtype), threshold)
            scores, aboves = scorer(torch.from_numpy(row[None]).to(dtype), threshold)
            assert isinstance(value, float) and isinstance(above, bool)
            np.testing.assert_allclose(value, scores[0], rtol=1e-12)
            assert above == aboves[0]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, before the error
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_one_non_finite_row_raises_the_detectors_one_line_error(fitted, bad):
    """The scalar twin's minimum is Python's, which skips NaN: the square norm must carry it to the check."""
    store, detectors = fitted
    det = detectors.detectors["mahalanobis", "layer2"]
    row = torch.from_numpy(_rows(store, "noise_test", "layer2")[:1].copy())
    row[0, 1] = bad
    with pytest.raises(DataError, match="NaN|inf"):
        compile_scorer(det).one(row, threshold=1.0)


def test_a_mahalanobis_with_non_finite_constants_is_not_compiled(fitted):
    _, detectors = fitted
    det = copy.deepcopy(detectors.detectors["mahalanobis", "layer2"])
    det.detector_.means_ = det.detector_.means_.copy()
    det.detector_.means_[0, 0] = np.inf
    assert not compile_scorer(det).compiled


def test_an_infinite_threshold_has_no_tie_band():
    """Regression (issue 18): ``inf - inf`` made every single score a tie, so with thresholds at +inf (the
    benchmark's no-exit guard, the self-check) each batch-1 call went to the detector's validated ``score``."""
    assert _clear(np.array([3.0]), np.inf) and _clear(np.array([3.0, 4.0]), np.inf)
    assert _clear(np.array([3.0]), -np.inf)
    assert not _clear(np.array([np.nan]), np.inf) and not _clear(np.array([3.0]), 3.0 * (1 + 1e-7))
