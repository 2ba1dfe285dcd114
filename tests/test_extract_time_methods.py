"""Extraction-time methods (issue 17): Gram matrices, ODIN and RankFeat.

Each is computed in :mod:`pipeline.extract` (the one place with passes through
the network) when its option is set, stored per split, and read back by its
scorer. The references are direct implementations of the published formulas
(the Gram authors' notebook, OpenOOD v1.5's ODIN and RankFeat postprocessors)
on the tiny test model.
"""

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.config import ExtractConfig, build_config
from pipeline.datasets import ImageSplit
from pipeline.errors import ConfigError, DataError
from pipeline.extract import extract_to_store, gram_rowsums, resolve_plan
from pipeline.models import init_model
from pipeline.scorers import make_scorer
from pipeline.scorers.base import Features, LazyArrays
from pipeline.scorers.gram import GramScorer, class_bounds, gram_deviations, holdout_split, max_softmax
from pipeline.scoring import fit_on_train, load_features
from pipeline.store import StoreWriter, open_store
from pipeline.userdata import SplitDataset
from tests.conftest import TINY_SPEC

ROC_FLOOR = 0.8
POWERS = (1, 2, 3)
TEMPERATURES, NOISES = (1.0, 1000.0), (0.0014, 0.0028)


def tiny_normalised_model():
    """The tiny model with a non-trivial input normalisation (ODIN's perturbation must see through it)."""
    model = init_model(TINY_SPEC, seed=0).eval()
    model.normalize.mean.fill_(0.3)
    model.normalize.std.fill_(0.25)
    return model


def image_splits(rng):
    def split(name, n, role, part):
        labels = rng.integers(0, 3, n) if role == "id" else np.full(n, -1)
        attrs = {"role": role, "set": "id" if role == "id" else "noise", "part": part}
        return ImageSplit(name, rng.random((n, 1, 8, 8), dtype=np.float32), labels.astype(np.int64), attrs)

    return {s.name: s for s in (split("id_train", 60, "id", "train"), split("id_val", 12, "id", "val"),
                                split("id_test", 12, "id", "test"), split("noise_val", 10, "far", "val"),
                                split("noise_test", 10, "far", "test"))}


@pytest.fixture(scope="module")
def method_store(tmp_path_factory):
    """A real store of the tiny model with Gram (layer1, layer2; powers 1-3), ODIN (2 x 2 grid) and RankFeat."""
    model, splits = tiny_normalised_model(), image_splits(np.random.default_rng(0))
    plan = resolve_plan(model, ["layer1", "fc"], (1, 8, 8), head="fc", gram=["layer2", "layer1"], gram_powers=POWERS,
                        odin_temperatures=TEMPERATURES, odin_noises=NOISES, rankfeat=["layer2", "layer1"])
    path = tmp_path_factory.mktemp("methods") / "features.zarr"
    with StoreWriter(path, "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(model, {n: (SplitDataset(s), s.attrs) for n, s in splits.items()}, plan, writer, batch_size=5)
        writer.finalize({"checkpoint_sha256": "abc"}, list(plan.layers))
    return open_store(path), model, splits


def hooked_maps(model, x, names):
    """Each named module's output for inputs ``x``, from one plain forward pass."""
    kept, modules = {}, dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: kept.__setitem__(n, o.detach())) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return kept


# ---------------------------------------------------------------- (a) Gram statistics at extraction


def test_gram_rowsum_known_answer_on_a_hand_made_2x2_map():
    # F = [[1, 2], [3, -1]] (C = 2 channels, HW = 2)
    # p = 1: F F^T = [[5, 1], [1, 10]]          -> row sums [6, 11]
    # p = 2: F^2 = [[1, 4], [9, 1]], G = [[17, 13], [13, 82]] -> [30, 95] -> sqrt
    # p = 3: F^3 = [[1, 8], [27, -1]], G = [[65, 19], [19, 730]] -> [84, 749] -> cube root
    f = torch.tensor([[1.0, 2.0], [3.0, -1.0]]).view(1, 2, 1, 2)
    np.testing.assert_allclose(gram_rowsums(f, (1, 2, 3))[0].numpy(),
                               [[6, 11], [np.sqrt(30), np.sqrt(95)], [84 ** (1 / 3), 749 ** (1 / 3)]], rtol=1e-12)
    # a negative row sum keeps its sign: F = [[-2, 1], [1, 0]], p = 1: G = [[5, -2], [-2, 1]] -> [3, -1];
    # p = 3: F^3 = [[-8, 1], [1, 0]], G = [[65, -8], [-8, 1]] -> [57, -7] -> [57^(1/3), -(7^(1/3))]
    g = torch.tensor([[-2.0, 1.0], [1.0, 0.0]]).view(1, 2, 2, 1)
    np.testing.assert_allclose(gram_rowsums(g, (1, 3))[0].numpy(), [[3, -1], [57 ** (1 / 3), -(7 ** (1 / 3))]],
                               rtol=1e-12)


def test_gram_features_at_extraction_equal_numpy_on_the_hooked_maps(method_store):
    store, model, splits = method_store
    maps = hooked_maps(model, torch.from_numpy(splits["noise_test"].images), ["layer1", "layer2"])
    for layer, act in maps.items():
        f = act.numpy().astype(np.float64).reshape(len(act), act.shape[1], -1)  # (n, C, HW)
        expected = []
        for p in POWERS:  # the authors' G_p: the whole Gram matrix, its row sums, then the signed p-th root
            s = np.einsum("nck,ndk->ncd", f ** p, f ** p).sum(axis=2)
            expected.append(np.sign(s) * np.abs(s) ** (1 / p))
        stored = store.to_numpy("noise_test", f"gram.{layer}")
        np.testing.assert_allclose(stored, np.stack(expected, axis=1), rtol=1e-5, atol=1e-6)
    arr = store.array("noise_test", "gram.layer2")
    assert arr.shape == (10, 3, 8) and arr.metadata.dimension_names == ("sample", "gram_power", "feature_layer2")
    assert store.to_numpy("noise_test", "gram_power").tolist() == list(POWERS) and arr.attrs["powers"] == [1, 2, 3]


def test_the_store_opens_as_an_xarray_datatree_with_the_method_coordinates(method_store):
    import warnings

    import xarray as xr

    store = method_store[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: consolidated metadata is not in the v3 spec
        ds = xr.open_datatree(store.path, engine="zarr")["id_val"].ds
    np.testing.assert_array_equal(ds["odin"].sel(odin_temperature=1000.0, odin_noise=0.0028).values,
                                  store.to_numpy("id_val", "odin")[:, 1, 1])
    np.testing.assert_array_equal(ds["gram.layer1"].sel(gram_power=2).values,
                                  store.to_numpy("id_val", "gram.layer1")[:, 1])
    assert ds["rankfeat.layer1"].dims == ("sample", "class") == ds["logits"].dims


# ---------------------------------------------------------------- (b) the gram scorer


def hand_features(g, logits):
    return Features(gram={"l": np.asarray(g, dtype=np.float64)}, gram_powers=(1, 2),
                    logits=np.asarray(logits, dtype=np.float64))


# 8 ID-train rows, each extreme twice: holding one row out leaves every class's bounds as they are
# class 0, power 1: [1, 10] and [3, 20] -> min [1, 10], max [3, 20]; power 2: [2, 2], [4, 4]
# class 1, power 1: [5, 5] and [7, 6]   -> min [5, 5],  max [7, 6];  power 2: [1, 1], [3, 3]
HAND_TRAIN = hand_features(
    [[[1, 10], [2, 2]], [[1, 10], [2, 2]], [[3, 20], [4, 4]], [[3, 20], [4, 4]],
     [[5, 5], [1, 1]], [[5, 5], [1, 1]], [[7, 6], [3, 3]], [[7, 6], [3, 3]]],
    [[5, 0]] * 4 + [[0, 5]] * 4)
HAND_TEST = hand_features(
    [[[0.5, 25], [4, 8]],   # class 0: p1 (1 - .5)/1 + (25 - 20)/20 = .75; p2 (8 - 4)/4 = 1
     [[6, 5.5], [2, 2]],    # class 1: inside every bound -> 0
     [[8, 4], [3, 3]]],     # class 1: p1 (8 - 7)/7 + (5 - 4)/5 = 12/35; p2 inside
    [[np.log(3), 0], [0, 1], [0, 2]])  # softmax max 3/4 for the first row


def test_gram_scorer_known_answer_on_a_hand_computed_case():
    scorer = GramScorer(normalize=False, confidence=False, holdout=0.125).fit(HAND_TRAIN)
    np.testing.assert_allclose(scorer.mins_["l"][0], [[1, 10], [2, 2]])
    np.testing.assert_allclose(scorer.maxs_["l"][1], [[7, 6], [3, 3]])
    expected = np.array([0.75 + 1.0, 0.0, 12 / 35])
    np.testing.assert_allclose(scorer.score(HAND_TEST), expected, rtol=1e-5)  # the 1e-6 in |bound + 1e-6|
    np.testing.assert_allclose(scorer.set_refit_free(powers=[1]).score(HAND_TEST), [0.75, 0, 12 / 35], rtol=1e-5)
    np.testing.assert_allclose(scorer.set_refit_free(powers=[2]).score(HAND_TEST), [1, 0, 0], rtol=1e-5)
    # the authors' code divides each deviation by the max softmax probability: 3/4 for the first row
    with_conf = GramScorer(normalize=False, confidence=True, holdout=0.125).fit(HAND_TRAIN).score(HAND_TEST)
    np.testing.assert_allclose(with_conf[0], 1.75 / 0.75, rtol=1e-5)
    np.testing.assert_allclose(gram_deviations(np.array([[[0.5, 25]]]), np.array([[[1.0, 10]]]),
                                               np.array([[[3.0, 20]]])), [[0.5 / (1 + 1e-6) + 5 / (20 + 1e-6)]])


def test_class_bounds_fall_back_to_all_rows_for_a_class_never_predicted():
    g = np.array([[[1.0]], [[3.0]], [[2.0]], [[100.0]]], dtype=np.float32)
    mins, maxs, empty = class_bounds(g, np.array([0, 0, 2, -1]), 3)  # class -1: a held-out row, no bound
    assert mins[:, 0, 0].tolist() == [1, 1, 2] and maxs[:, 0, 0].tolist() == [3, 3, 2] and empty == [1]
    assert mins.dtype == np.float64


def gram_blobs(rng, n, spread=0.1, n_classes=3, n_powers=2, n_channels=6):
    """Gram-like features around a per-class centre, and logits predicting that class."""
    classes = rng.integers(0, n_classes, n)
    centres = np.random.default_rng(1).uniform(1.0, 5.0, size=(n_classes, n_powers, n_channels))  # ID's and OOD's
    g = centres[classes] * (1 + rng.normal(scale=spread, size=(n, n_powers, n_channels)))
    logits = 4.0 * np.eye(n_classes)[classes] + rng.normal(scale=0.5, size=(n, n_classes))
    return Features(gram={"l": g}, gram_powers=(1, 2), logits=logits)


def test_gram_auroc_floor_on_planted_outliers(rng):
    scorer = GramScorer().fit(gram_blobs(rng, 600))
    s_id, s_ood = scorer.score(gram_blobs(rng, 150)), scorer.score(gram_blobs(rng, 150, spread=0.6))
    assert s_id.shape == (150,) and np.isfinite(s_id).all()
    assert roc_auc_score(np.r_[np.zeros(150), np.ones(150)], np.r_[s_id, s_ood]) >= ROC_FLOOR


def test_normalised_score_is_the_reference_formula_with_a_held_out_expectation(rng):
    train, test = gram_blobs(rng, 200), gram_blobs(rng, 40, spread=0.3)
    scorer = GramScorer(holdout=0.2, seed=3).fit(train)
    held, rows = holdout_split(200, 0.2, 3)
    g, cls, conf = train.gram["l"], train.logits.argmax(1), max_softmax(train.logits)
    mins, maxs, _ = class_bounds(g[rows], cls[rows], 3)
    expected = (gram_deviations(g[held], mins[cls[held]], maxs[cls[held]]).sum(1) / conf[held]).mean() + 1e-7
    c = test.logits.argmax(1)
    delta = gram_deviations(test.gram["l"], mins[c], maxs[c]).sum(1) / max_softmax(test.logits)
    np.testing.assert_allclose(scorer.score(test), delta / expected, rtol=1e-12)
    assert len(held) == 40 and not set(held) & set(rows)


def test_refit_free_params_equal_a_refit(method_store):
    store = method_store[0]
    shared = fit_on_train(store, GramScorer()).set_refit_free(powers=[2, 3], layers=["layer2"], confidence=False)
    fresh = fit_on_train(store, GramScorer(powers=[2, 3], layers=["layer2"], confidence=False))
    test = load_features(store, "noise_test")
    np.testing.assert_array_equal(shared.score(test), fresh.score(test))
    assert set(GramScorer.refit_free_params) == {"layers", "powers", "normalize", "confidence"}


# ---------------------------------------------------------------- (c) ODIN, (d) RankFeat


def openood_odin(model, x, temperature, noise):
    """OpenOOD v1.5's ODINPostprocessor on normalised inputs (its data loader normalises; our model holds it)."""
    rest = copy.deepcopy(model)
    rest.normalize = torch.nn.Identity()
    std = model.normalize.std
    data = model.normalize(x).detach().requires_grad_(True)
    output = rest(data)
    labels = output.detach().argmax(axis=1)
    torch.nn.CrossEntropyLoss()(output / temperature, labels).backward()
    gradient = (torch.ge(data.grad.detach(), 0).float() - 0.5) * 2
    gradient = gradient / std  # OpenOOD: gradient[:, c] / input_std[c]
    with torch.no_grad():
        out = rest(torch.add(data.detach(), gradient, alpha=-noise)) / temperature
        out = out - out.max(dim=1, keepdims=True).values
        return (out.exp() / out.exp().sum(dim=1, keepdims=True)).max(dim=1).values.numpy()


def test_odin_stored_confidence_equals_openood_formula(method_store):
    store, model, splits = method_store
    x = torch.from_numpy(splits["id_val"].images)
    stored = store.to_numpy("id_val", "odin")
    assert stored.shape == (12, 2, 2) and stored.dtype == np.float64
    for i, t in enumerate(TEMPERATURES):
        for j, eps in enumerate(NOISES):
            np.testing.assert_allclose(stored[:, i, j], openood_odin(model, x, t, eps), rtol=2e-6)
    features = load_features(store, "id_val")
    scores = make_scorer("odin", {"temperature": 1000, "noise": 0.0028}).fit(Features()).score(features)
    np.testing.assert_array_equal(scores, -stored[:, 1, 1])
    assert not np.allclose(stored[:, 0, 0], stored[:, 0, 1])  # the noise changes the input


def openood_rank1_removed(feat):
    """OpenOOD v1.5's RankFeat removal (``accelerate: False``)."""
    b, c, h, w = feat.size()
    feat = feat.view(b, c, h * w)
    u, s, v = torch.linalg.svd(feat, full_matrices=False)
    feat = feat - s[:, 0:1].unsqueeze(2) * u[:, :, 0:1].bmm(v[:, 0:1, :])
    return feat.view(b, c, h, w)


def direct_rankfeat(model, x, layer):
    """The tiny model's pass with ``layer``'s output replaced by its rank-1 removal."""
    with torch.no_grad():
        h = model.layer1(torch.relu(model.bn1(model.conv1(model.normalize(x)))))
        h = openood_rank1_removed(h) if layer == "layer1" else h
        h = model.layer2(h)
        h = openood_rank1_removed(h) if layer == "layer2" else h
        return model.fc(torch.flatten(model.avgpool(h), 1)).numpy()


def test_rankfeat_equals_a_direct_svd_removal_then_the_rest_of_the_network(method_store):
    store, model, splits = method_store
    x = torch.from_numpy(splits["noise_test"].images)
    direct = {layer: direct_rankfeat(model, x, layer) for layer in ("layer1", "layer2")}
    for layer, logits in direct.items():
        np.testing.assert_allclose(store.to_numpy("noise_test", f"rankfeat.{layer}"), logits, rtol=1e-4, atol=1e-5)
    assert not np.allclose(direct["layer2"], store.to_numpy("noise_test", "logits"), atol=1e-3)
    # OpenOOD fuses at the logit space, then conf = T logsumexp(logits / T); the score is its negation
    features = load_features(store, "noise_test")
    fused = (direct["layer1"] + direct["layer2"]) / 2
    expected = -2.0 * np.log(np.exp(fused / 2.0).sum(axis=1))
    np.testing.assert_allclose(make_scorer("rankfeat", {"temperature": 2.0}).score(features), expected, rtol=1e-4)
    only = make_scorer("rankfeat", {"layers": ["layer2"]}).score(features)
    np.testing.assert_allclose(only, -np.log(np.exp(direct["layer2"]).sum(axis=1)), rtol=1e-4)


# ---------------------------------------------------------------- (e) a setting that was not extracted


@pytest.mark.parametrize("method, params, match", [
    ("odin", {"temperature": 10}, r"^ODIN's setting temperature=10, noise=0.0014 was not extracted: the store holds "
                                  r"temperatures \[1.0, 1000.0\] and noises \[0.0014, 0.0028\]. Hint: each new setting "
                                  r"costs a pass through the network: add it to extract.odin.temperatures and rerun "
                                  r"extract.$"),
    ("odin", {"temperature": 1, "noise": 0.005}, r"add it to extract.odin.noises and rerun extract.$"),
    ("rankfeat", {"layers": ["layer3"]}, r"^RankFeat's layer 'layer3' was not extracted: .* Hint: each new layer costs "
                                         r"a pass through the network: add it to extract.rankfeat.layers"),
    ("gram", {"powers": [4]}, r"^Gram features of power 4 were not extracted: the store holds powers \[1, 2, 3\]. "
                              r"Hint: add it to extract.gram.powers and rerun extract"),
])
def test_a_setting_not_extracted_is_refused_in_one_line(method_store, method, params, match):
    store = method_store[0]
    with pytest.raises(DataError, match=match) as info:
        scorer = make_scorer(method, params)
        fit_on_train(store, scorer).score(load_features(store, "id_val"))
    assert "\n" not in str(info.value)


def test_a_store_without_the_options_is_refused_naming_the_option(tiny_model, tiny_splits, store_path):
    plan = resolve_plan(tiny_model, ["layer1", "fc"], (1, 8, 8), head="fc")
    with StoreWriter(store_path, "k") as writer:
        extract_to_store(tiny_model, {n: (SplitDataset(s), s.attrs) for n, s in tiny_splits.items()}, plan, writer)
        writer.finalize({}, list(plan.layers))
    features = load_features(open_store(store_path), "id_val")
    assert features.odin is None and not features.gram and not features.rankfeat
    with pytest.raises(DataError, match=r"^ODIN needs confidences computed at extraction \(extract.odin\)"):
        make_scorer("odin").score(features)
    with pytest.raises(DataError, match=r"^RankFeat needs logits computed at extraction \(extract.rankfeat\)"):
        make_scorer("rankfeat").score(features)
    with pytest.raises(DataError, match=r"GramScorer needs \['gram'\] .* extract.gram"):
        GramScorer().fit(features)


# ---------------------------------------------------------------- (f) validation


@pytest.mark.parametrize("values, match", [
    ({"gram": {}}, r"'extract.gram.layers' parameter of extract must be a non-empty list of layers"),
    ({"gram": {"layers": ["layer1"], "powers": [0, 1]}}, r"'extract.gram.powers' .* distinct ints >= 1. Got \[0, 1\]"),
    ({"gram": {"layers": ["layer1"], "powers": [2, 2]}}, r"'extract.gram.powers' .* Got \[2, 2\] instead. Hint: the "
                                                         r"paper uses 1 to 10."),
    ({"gram": {"layers": ["layer1"], "power": [1]}}, r"Unknown parameter 'extract.gram.power'"),
    ({"odin": {"temperatures": [0]}}, r"'extract.odin.temperatures' .* distinct positive floats. Got \[0.0\]"),
    ({"odin": {"noises": [-0.1]}}, r"'extract.odin.noises' .* floats >= 0. Got \[-0.1\] instead. Hint: OpenOOD v1.5 "
                                   r"sweeps \[0.0014, 0.0028\]"),
    ({"odin": {"noises": []}}, r"'extract.odin.noises' parameter of extract must be a non-empty list"),
    ({"rankfeat": {}}, r"'extract.rankfeat.layers' parameter of extract must be a non-empty list"),
    ({"rankfeat": ["layer3"]}, r"'extract.rankfeat' parameter of params.yaml must be a mapping"),
])
def test_extract_config_validation(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(ExtractConfig, values, prefix="extract")


def test_extract_config_defaults_and_plain_mappings():
    cfg = ExtractConfig(gram={"layers": ["layer1"]}, odin={}, rankfeat={"layers": ["layer2"]})
    assert cfg.gram.powers == tuple(range(1, 11)) and cfg.odin.temperatures == (1000.0,)
    assert cfg.odin.noises == (0.0014,) and cfg.rankfeat.layers == ("layer2",)
    assert ExtractConfig().gram is None and ExtractConfig().odin is None and ExtractConfig().rankfeat is None


@pytest.mark.parametrize("kwargs, match", [
    ({"gram": ["fc"]}, r"'extract.gram.layers' parameter of extract must name layers with \(C, H, W\) outputs. Got "
                       r"'fc', of output shape \(3,\)"),
    ({"rankfeat": ["layer9"]}, r"'extract.rankfeat.layers' .* Got 'layer9', not a module of the model"),
    ({"odin_temperatures": [1.0]}, r"ODIN's grid needs both extract.odin.temperatures and extract.odin.noises"),
])
def test_plan_checks_the_layers_against_the_model(tiny_model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_plan(tiny_model, ["fc"], (1, 8, 8), **kwargs)


# ---------------------------------------------------------------- (g) the default extraction is unchanged


def test_default_extraction_is_unchanged_and_options_change_the_key(tiny_model, tiny_splits, tmp_path):
    import yaml

    from pipeline.datasets import write_benchmark
    from pipeline.extract import store_key
    from pipeline.models import save_checkpoint
    from pipeline.store import STORE_FORMAT
    from stages import extract as stage

    extra = {"source": "noise", "image_size": 8}
    write_benchmark([ImageSplit(s.name, s.images, s.labels, {**extra, **s.attrs, "n_samples": len(s.labels)})
                     for s in tiny_splits.values()], tmp_path / "data")
    save_checkpoint(tiny_model, TINY_SPEC, tmp_path / "m.pt")
    base = {"layers": ["layer1", "fc"], "device": "cpu"}
    options = {"gram": {"layers": ["layer2"], "powers": [1, 2]}, "odin": {"temperatures": [1000], "noises": [0.0014]},
               "rankfeat": {"layers": ["layer2"]}}
    stores = {}
    for name, section in (("default", base), ("options", {**base, **options})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"extract": section}))
        stage.run(tmp_path / f"{name}.yaml", tmp_path / "data", tmp_path / "m.pt", tmp_path / f"{name}.zarr")
        stores[name] = open_store(tmp_path / f"{name}.zarr")
    default = stores["default"]
    # exactly the arrays, coordinates and provenance a store had before these options existed
    assert default.array_names("id_train") == ["layer1", "fc", "energy", "label", "layer", "logits", "penultimate",
                                               "pred", "sample"]
    assert set(default.provenance) == {"checkpoint", "checkpoint_sha256", "model_origin", "data", "layers",
                                       "grad_layers", "head", "maps", "images", "input_shape", "pooling", "energy",
                                       "dtype", "versions"}
    assert default.key == store_key(provenance=default.provenance, batch_size=128, chunk_rows=512, shard_rows=4096,
                                    level=3, format=STORE_FORMAT)
    withopts = stores["options"]
    assert withopts.provenance["gram"]["powers"] == [1, 2] and withopts.provenance["odin"]["temperatures"] == [1000.0]
    assert withopts.provenance["rankfeat"]["layers"] == ["layer2"] and withopts.key != default.key
    assert {"gram.layer2", "odin", "rankfeat.layer2", "gram_power", "odin_noise"} <= set(
        withopts.array_names("id_train"))
    for name in ("layer1", "fc", "energy", "logits", "penultimate", "pred"):  # the options leave the rest alone
        np.testing.assert_array_equal(withopts.to_numpy("id_train", name), default.to_numpy("id_train", name))


# ---------------------------------------------------------------- reading only what is asked for; search


def test_lazy_arrays_read_on_first_access_only():
    calls = []
    lazy = LazyArrays(["a", "b"], lambda name: calls.append(name) or np.arange(3))
    assert list(lazy) == ["a", "b"] and len(lazy) == 2 and calls == []
    assert lazy["a"].tolist() == [0, 1, 2] and lazy["a"] is lazy["a"] and calls == ["a"]
    joined = Features(gram=lazy, gram_powers=(1,)).concat(Features(gram=lazy, gram_powers=(1,)))
    assert calls == ["a"] and joined.gram["b"].shape == (6,) and calls == ["a", "b"]


def test_search_reads_the_stored_grids(method_store):
    from pipeline.metrics import ood_metrics
    from pipeline.report import ood_sets
    from pipeline.search import run_search

    store = method_store[0]
    grid = {"odin": {"temperature": list(TEMPERATURES), "noise": list(NOISES)},
            "rankfeat": {"layers": [["layer2"], ["layer1", "layer2"]]}, "gram": {"powers": [[1], [1, 2, 3]]}}
    result = run_search(store, grid, ood_val=ood_sets(store, "val"), ood_test=ood_sets(store, "test"), n_jobs=1)
    assert [r["method"] for r in result.rows].count("odin") == 4 and len(result.rows) == 8
    row = next(r for r in result.rows if r["params"] == {"temperature": 1000.0, "noise": 0.0028})
    odin_id, odin_ood = store.to_numpy("id_val", "odin"), store.to_numpy("noise_val", "odin")
    assert row["val"]["mean"]["auroc"] == pytest.approx(ood_metrics(-odin_id[:, 1, 1], -odin_ood[:, 1, 1])["auroc"])
    assert set(result.winners) == {"odin", "rankfeat", "gram"} and "test" in result.winners["gram"]
