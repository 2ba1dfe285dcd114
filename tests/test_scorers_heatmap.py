"""The heatmap decoder as a scorer: trained from a real feature store, saved, loaded, searched."""

import numpy as np
import pytest

from pipeline.config import FitConfig
from pipeline.datasets import ImageSplit
from pipeline.errors import ConfigError, DataError
from pipeline.extract import extract_to_store, resolve_plan
from pipeline.report import ood_sets
from pipeline.scorers import Features, make_scorer
from pipeline.scorers.heatmap import HeatmapScorer
from pipeline.scoring import (FittedDetectors, fit_on_train, fit_scorers, load_detectors, load_features,
                              outlier_splits, save_detectors, score_methods)
from pipeline.search import SearchResult, run_search
from pipeline.store import StoreWriter, open_store
from pipeline.userdata import SplitDataset

FAST = {"epochs": 2, "batch_size": 16, "width": 4, "aux_sets": ["noise"], "device": "cpu"}


@pytest.fixture
def heatmap_store(tiny_model, tiny_splits, store_path, rng):
    """A real store of the tiny model with maps of layer1 (8x8) and layer2 (4x4), images, and a noise val half."""
    noise_val = ImageSplit("noise_val", rng.random((13, 1, 8, 8), dtype=np.float32), np.full(13, -1),
                           {"role": "far", "set": "noise", "part": "val"})
    id_test = ImageSplit("id_test", rng.random((10, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 10),
                         {"role": "id", "set": "id", "part": "test"})
    splits = {**tiny_splits, "noise_val": noise_val, "id_test": id_test}
    plan = resolve_plan(tiny_model, ["layer1", "layer2", "fc"], (1, 8, 8), head="fc", maps=["layer1", "layer2"],
                        images=True)
    with StoreWriter(store_path, "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(tiny_model, {n: (SplitDataset(s), s.attrs) for n, s in splits.items()}, plan, writer,
                         batch_size=5)
        writer.finalize({"checkpoint_sha256": "abc", "maps": list(plan.maps)}, list(plan.layers))
    return open_store(store_path)


def fitted(store, **params):
    return fit_on_train(store, make_scorer("heatmap", {**FAST, **params}))


def test_fit_reads_id_train_and_the_val_half_of_the_aux_set(heatmap_store):
    scorer = fitted(heatmap_store, n_aux=None)
    assert (scorer.n_train_, scorer.n_outliers_) == (37, 13)  # noise_val only: its test half is never read
    assert scorer.skip_layers_ == ["layer2", "layer1"]  # deepest first
    assert len(scorer.history_) == 2 and scorer.fit_seconds_ > 0
    scores = scorer.score(load_features(heatmap_store, "noise_test", maps=True))
    assert scores.shape == (9,) and np.all(scores >= 0)


def test_n_aux_draws_that_many_outliers(heatmap_store):
    assert fitted(heatmap_store, n_aux=5, fw_layers=0).n_outliers_ == 5


def test_training_is_seeded(heatmap_store):
    features = load_features(heatmap_store, "id_val", maps=True)
    a, b = fitted(heatmap_store, fw_layers=1), fitted(heatmap_store, fw_layers=1)
    np.testing.assert_array_equal(a.score(features), b.score(features))
    assert a.history_ == b.history_
    assert not np.array_equal(a.score(features), fitted(heatmap_store, fw_layers=1, seed=1).score(features))


def test_outlier_rows_are_a_seeded_capped_draw_over_all_sets():
    scorer = HeatmapScorer(n_aux=6, aux_sets=["a", "b"], seed=0)
    rows = scorer.outlier_rows({"a": 10, "b": 5})
    assert sum(len(r) for r in rows.values()) == 6
    assert rows["a"].max(initial=0) < 10 and rows["b"].max(initial=0) < 5
    assert all(np.array_equal(rows[k], v) for k, v in scorer.outlier_rows({"a": 10, "b": 5}).items())
    other = HeatmapScorer(n_aux=6, aux_sets=["a", "b"], seed=1).outlier_rows({"a": 10, "b": 5})
    assert any(not np.array_equal(rows[k], other[k]) for k in rows)
    everything = HeatmapScorer(n_aux=None).outlier_rows({"a": 3, "b": 2})
    assert everything["a"].tolist() == [0, 1, 2] and everything["b"].tolist() == [0, 1]


def test_outlier_splits_use_val_halves_and_name_the_missing_set(heatmap_store):
    assert outlier_splits(heatmap_store, ["noise"]) == {"noise": "noise_val"}
    with pytest.raises(DataError, match=r"Auxiliary-outlier set 'faces' has no aux or val split .* sets that have "
                                        r"one: \['noise'\]. Hint: .*generate.aux"):
        outlier_splits(heatmap_store, ["faces"])


def test_fw_layers_beyond_the_stored_maps_is_refused(heatmap_store):
    with pytest.raises(DataError, match=r"fw_layers=3 needs 3 stored maps; the store holds 2 .*extract.maps"):
        fitted(heatmap_store, fw_layers=3)


def test_fit_needs_outliers_and_images(heatmap_store):
    ident = load_features(heatmap_store, "id_train", maps=True)
    with pytest.raises(DataError, match=r"needs ID-train rows and auxiliary-outlier rows; got 37 ID and 0 outlier"):
        make_scorer("heatmap", FAST).fit(ident)
    with pytest.raises(DataError, match=r"heatmap needs \['images'\] from the feature store.*extract.images"):
        make_scorer("heatmap", FAST).fit(load_features(heatmap_store, "id_train"))


@pytest.mark.parametrize("params, message", [
    ({"epochs": 0}, r"'epochs' parameter of heatmap must be an int >= 1. Got 0"),
    ({"fw_layers": -1}, r"'fw_layers' parameter of heatmap must be an int >= 0. Got -1"),
    ({"n_aux": 0}, r"'n_aux' parameter of heatmap must be an int >= 1"),
    ({"aux_sets": "noise"}, r"'aux_sets' parameter of heatmap must be a non-empty list .* Hint: e.g. aux_sets"),
    ({"aux_sets": []}, r"'aux_sets' parameter of heatmap must be a non-empty list"),
    ({"lr": 0}, r"'lr' parameter of heatmap must be a positive float"),
    ({"threads": 0}, r"'threads' parameter of heatmap must be an int >= 1"),
    ({"betas": [0.5]}, r"'betas' parameter of heatmap must be two floats in \[0, 1\)"),
    ({"device": 0}, r"'device' parameter of heatmap must be 'auto'"),
])
def test_param_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        make_scorer("heatmap", {**FAST, **params}).check_params()


def test_fit_config_checks_the_heatmap_section():
    assert FitConfig(heatmap=FAST).heatmap == FAST
    with pytest.raises(ConfigError, match=r"'fit.heatmap.epochs' parameter of heatmap must be an int >= 1"):
        FitConfig(heatmap={**FAST, "epochs": 0})
    with pytest.raises(ConfigError, match=r"Unknown parameter 'depth' for method 'heatmap' in fit.heatmap"):
        FitConfig(heatmap={"depth": 3})
    with pytest.raises(ConfigError, match=r"'fit.heatmap' parameter of fit must be a mapping"):
        FitConfig(heatmap=[1])


def test_save_and_load_give_the_same_scores(heatmap_store, tmp_path):
    scorer = fitted(heatmap_store)
    loaded = HeatmapScorer.load(scorer.save(tmp_path / "hm"))
    features = load_features(heatmap_store, "noise_test", maps=True)
    np.testing.assert_array_equal(loaded.score(features), scorer.score(features))
    assert loaded.get_params() == {**scorer.get_params(), "betas": [0.5, 0.999]}
    assert (tmp_path / "hm/decoder.pt").is_file()
    with pytest.raises(DataError, match=r"No trained heatmap decoder in .* Hint: add fit.heatmap"):
        HeatmapScorer.load(tmp_path / "nothing")


def test_saving_twice_gives_the_same_bytes_and_no_clock_reading(heatmap_store, tmp_path):
    # issue 14: heatmap.json held fit_seconds, so identical runs differed
    scorer = fitted(heatmap_store)
    a, b = scorer.save(tmp_path / "a"), scorer.save(tmp_path / "b")
    for name in ("decoder.pt", "heatmap.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert "seconds" not in (a / "heatmap.json").read_text()


def test_detect_scores_with_the_decoder_fit_saved(heatmap_store, tmp_path):
    scorer = fitted(heatmap_store)
    saved = save_detectors(FittedDetectors(provenance={"checkpoint_sha256": "abc"}, scorers={"heatmap": scorer}),
                           tmp_path / "det")
    assert load_detectors(saved).scorers == {}  # loaded only when asked for (it needs torch)
    trained = load_detectors(saved, scorers=["heatmap", "msp"]).scorers
    scorers = fit_scorers(heatmap_store, {"heatmap": {}, "msp": {}}, trained=trained)
    columns = score_methods(heatmap_store, "noise_test", scorers)  # block by block, maps read only for it
    np.testing.assert_allclose(columns["heatmap"]["score"],
                               scorer.score(load_features(heatmap_store, "noise_test", maps=True)), rtol=1e-6)
    assert columns["msp"]["score"].shape == (9,)


def test_detect_refuses_heatmap_params_and_a_missing_decoder(heatmap_store):
    with pytest.raises(ConfigError, match=r"'detect.methods.heatmap' parameter of detect must be \{\} \(it is trained "
                                          r"by the fit stage\).* Hint: set its parameters under fit.heatmap"):
        fit_scorers(heatmap_store, {"heatmap": {"epochs": 3}}, trained={})
    with pytest.raises(DataError, match=r"lists 'heatmap', but the fit stage trained no heatmap model. Hint: add a "
                                        r"fit.heatmap section"):
        fit_scorers(heatmap_store, {"heatmap": {}}, trained={})


def test_search_trains_one_decoder_per_config_and_pastes_back_into_fit(heatmap_store):
    grid = {"heatmap": {"fw_layers": [0, 2], **{k: [v] for k, v in FAST.items()}}}
    grid["heatmap"]["aux_sets"] = [["noise"]]
    result = run_search(heatmap_store, grid, ood_val=ood_sets(heatmap_store, "val"),
                        ood_test=ood_sets(heatmap_store, "test"), n_jobs=1)
    assert [r["params"]["fw_layers"] for r in result.rows] == [0, 2]
    winner = result.winners["heatmap"]
    assert 0.0 <= winner["test"]["far"]["auroc"] <= 1.0
    best = result.best_params()
    assert best["fit"]["heatmap"] == winner["params"] and best["detect"]["methods"] == {"heatmap": {}}


def test_best_params_split_detectors_trained_methods_and_post_hoc_methods():
    winners = {"knn": {"params": {"n_neighbors": 5}}, "heatmap": {"params": {"fw_layers": 1}},
               "scale": {"params": {"percentile": 65}}}
    assert SearchResult([], winners, "auroc").best_params() == {
        "fit": {"detectors": {"knn": {"n_neighbors": 5}}, "heatmap": {"fw_layers": 1}},
        "detect": {"methods": {"heatmap": {}, "scale": {"percentile": 65}}},
    }


def test_features_concat_keeps_what_both_hold():
    a = Features(penultimate=np.zeros((2, 3)), labels=np.array([0, 1]), maps={"m": np.zeros((2, 1, 2, 2)),
                                                                              "only_a": np.zeros((2, 1))})
    b = Features(penultimate=np.ones((1, 3)), labels=np.array([-1]), maps={"m": np.ones((1, 1, 2, 2))})
    both = a.concat(b)
    assert both.penultimate.shape == (3, 3) and both.labels.tolist() == [0, 1, -1]
    assert set(both.maps) == {"m"} and both.logits is None
