"""The early-exit guard: a model run block by block, stopped at the first layer that flags an input."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline import guard as guard_module
from pipeline.backbones import BACKBONES, DEFAULT_LAYERS
from pipeline.cascade import exit_layers
from pipeline.deploy import guard_detectors, layer_scores
from pipeline.detectors import make_detector
from pipeline.errors import ConfigError, DataError, ModelError
from pipeline.extract import pool
from pipeline.guard import Guard
from pipeline.scoring import fit_detectors

LAYERS = ["layer1", "layer2"]


@pytest.fixture
def cached(tiny_store):
    """The tiny model's store (layer1, layer2, fc) and Mahalanobis fitted on it: what `fit` would produce."""
    fitted = fit_detectors(tiny_store, {"mahalanobis": {}})
    return tiny_store, guard_detectors(fitted, "mahalanobis", LAYERS)


def test_with_no_threshold_reached_the_guard_is_the_plain_model(tiny_model, tiny_splits, cached):
    store, detectors = cached
    guard = Guard(tiny_model, detectors, {layer: np.inf for layer in LAYERS}, (1, 8, 8))
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    result = guard(x)
    with torch.inference_mode():
        logits = tiny_model(x).numpy()
    assert not result.ood.any() and np.array_equal(result.pred, logits.argmax(axis=1))
    np.testing.assert_allclose(result.logits, logits, rtol=1e-5, atol=1e-6)
    # the live scores are the cached ones: calibration on the store holds for the deployed guard
    np.testing.assert_allclose(result.scores, layer_scores(store, "noise_test", detectors), rtol=1e-4)
    assert result.layers_computed.tolist() == [3] * len(x)


def test_live_decisions_are_the_cached_decisions_and_passed_inputs_keep_their_prediction(tiny_model, tiny_splits,
                                                                                          cached):
    store, detectors = cached
    thresholds = np.median(layer_scores(store, "noise_test", detectors), axis=0)  # about half stop somewhere
    guard = Guard(tiny_model, detectors, dict(zip(LAYERS, thresholds)), (1, 8, 8))
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    result = guard(x)
    expected = exit_layers(layer_scores(store, "noise_test", detectors), thresholds)
    assert np.array_equal(result.exit_layer, expected) and 0 < result.ood.sum() < len(x)
    with torch.inference_mode():
        full = tiny_model(x).argmax(dim=1).numpy()
    passed = ~result.ood
    assert np.array_equal(result.pred[passed], full[passed]) and (result.pred[result.ood] == -1).all()
    stopped_first = result.exit_layer == 0
    assert np.isnan(result.scores[stopped_first, 1]).all() and not np.isnan(result.scores[:, 0]).any()
    everything = Guard(tiny_model, detectors, {layer: -np.inf for layer in LAYERS}, (1, 8, 8))(x)
    assert (everything.exit_layer == 0).all() and everything.logits.shape == (len(x), 3)  # width kept when all stop
    rec = result.records()[int(np.flatnonzero(stopped_first)[0])] if stopped_first.any() else None
    if rec is not None:
        assert rec["prediction"] is None and rec["ood_at_layer"] == "layer1" and list(rec["scores"]) == ["layer1"]


def _pooled_pass(model, layers, x):
    """``(pooled, logits)``: each layer's pooled activations of ``x`` (float64 arrays) and the logits, in one pass."""
    modules = dict(model.named_modules())
    pooled = {}
    hooks = [modules[layer].register_forward_hook(lambda m, i, o, layer=layer: pooled.__setitem__(layer, pool(o)))
             for layer in layers]
    with torch.inference_mode():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    return {layer: pooled[layer].numpy().astype(np.float64) for layer in layers}, logits


def _random_detectors(model, layers, input_shape, rng, n=12):
    """KNN (L2) per layer, fitted on pooled activations of random inputs: real detectors for any backbone."""
    pooled, _ = _pooled_pass(model, layers, torch.from_numpy(rng.random((n, *input_shape), dtype=np.float32)))
    return {layer: make_detector("knn_l2", {"k": 3}).fit(pooled[layer]) for layer in layers}


@pytest.mark.parametrize("arch, size, n", [("resnet18_cifar", 16, 8), ("vgg16_bn_cifar", 32, 8),
                                           ("densenet100_cifar", 16, 8), ("wrn40_2_cifar", 16, 8),
                                           ("resnet50_imagenet", 64, 8), ("vit_b16_imagenet", 224, 4)])
def test_every_backbone_splits_and_agrees_with_the_full_network(arch, size, n, rng):
    torch.manual_seed(0)
    model = BACKBONES[arch](10).eval()
    layers = DEFAULT_LAYERS[arch]
    # one pass of the full network (ViT-B/16 at 224 px is most of this test's time): 6 random inputs to fit each
    # layer's detector, then x, for its scores (their medians: mixed exits) and the full network's predictions
    x = torch.from_numpy(rng.random((6 + n, 3, size, size), dtype=np.float32))
    pooled, logits = _pooled_pass(model, layers, x)
    detectors = {layer: make_detector("knn_l2", {"k": 3}).fit(pooled[layer][:6]) for layer in layers}
    scores = np.column_stack([detectors[layer].score(pooled[layer][6:]) for layer in layers])
    result = Guard(model, detectors, dict(zip(layers, np.median(scores, axis=0))), (3, size, size))(x[6:])
    full = logits[6:].argmax(dim=1).numpy()
    assert result.ood.any() and np.array_equal(result.pred[~result.ood], full[~result.ood])
    assert result.layers == layers  # network order
    assert np.allclose(result.scores[:, 0], scores[:, 0])  # every input is scored at the first guarded layer


def test_flops_are_counted_at_first_need_not_when_a_guard_is_built(tiny_model, tiny_splits, cached):
    """The FLOP counter imports torch._dynamo (1-2 s): building a guard and serving one input never pay it."""
    store, detectors = cached
    thresholds = np.median(layer_scores(store, "noise_test", detectors), axis=0)  # about half stop somewhere
    guard = Guard(tiny_model, detectors, dict(zip(LAYERS, thresholds)), (1, 8, 8))
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    for one in x:
        guard(one[None])
    assert "_flops" not in vars(guard)
    guard(x)  # some rows stop, others go on: whether to drop or carry them needs the network's FLOPs
    assert "_flops" in vars(guard) and guard.block_flops()[-1] > 0


def test_block_flops_accumulate_to_the_whole_network(tiny_model, cached):
    _, detectors = cached
    flops = Guard(tiny_model, detectors, {layer: 0.0 for layer in LAYERS}, (1, 8, 8)).block_flops()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        tiny_model(torch.zeros(1, 1, 8, 8))
    assert flops.shape == (3,) and flops[-1] == counter.get_total_flops()
    assert 0 < flops[0] < flops[1] <= flops[2]


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.block1, self.block2, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, 3)

    def forward(self, x):
        h = self.block1(x)
        if h.sum() > 0:
            h = -h
        return self.fc(self.block2(h).mean(dim=(2, 3)))


class _StaleBatch(_Branchy):
    """Reads the batch size before block1 and uses it after: dropping rows would break it."""

    def forward(self, x):
        n = x.shape[0]
        h = self.block2(self.block1(x))
        return self.fc(h.reshape(n, 2, -1).mean(dim=2))


class _Twice(_Branchy):
    def forward(self, x):
        return self.fc(self.block2(self.block2(self.block1(x))).mean(dim=(2, 3)))


def _guard(model, layers, rng):
    detectors = _random_detectors(model, layers, (1, 8, 8), rng)
    return Guard(model, detectors, {layer: np.inf for layer in layers}, (1, 8, 8))


def test_a_model_fx_cannot_trace_is_refused(rng):
    with pytest.raises(ModelError, match=r"Guard cannot trace _Branchy with torch.fx .* Hint: guard top-level"):
        _guard(_Branchy().eval(), ["block1"], rng)


class _StaleAfterBlock1(_Branchy):
    """Reads the batch size between block1 and block2 and uses it after block2: only a drop at block2 breaks it."""

    def forward(self, x):
        h = self.block1(x)
        n = h.shape[0]
        h = self.block2(h)
        return self.fc(h.reshape(n, 2, -1).mean(dim=2))


def test_a_model_whose_split_changes_its_output_is_refused(rng):
    with pytest.raises(ModelError, match=r"Guard cannot (run this model split at|split this model at) 'block1'"
                                         r".*Hint: guard other layers"):
        _guard(_StaleBatch().eval(), ["block1"], rng)


def test_the_refusal_names_the_layer_whose_split_breaks_the_model(rng):
    """The self-check drops rows at every guarded layer in one pass; a failure is traced to its layer."""
    _guard(_StaleAfterBlock1().eval(), ["block1"], rng)  # a drop at block1 leaves it intact
    with pytest.raises(ModelError, match=r"Guard cannot (run this model split at|split this model at) 'block2'"
                                         r".*Hint: guard other layers"):
        _guard(_StaleAfterBlock1().eval(), ["block1", "block2"], rng)


def test_a_module_run_twice_is_refused(rng):
    model = _Twice().eval()
    with pytest.raises(ModelError, match=r"cannot split the model at 'block2': module 'block2' is called 2 times"):
        Guard(model, {"block2": make_detector("knn_l2", {"k": 1}).fit(np.ones((3, 2)))}, {"block2": 0.0},
              (1, 8, 8))


def test_unknown_layers_and_missing_thresholds_are_named(tiny_model, cached):
    _, detectors = cached
    with pytest.raises(ConfigError, match=r"'layers' parameter of Guard must be modules of the model .* Got 'layer9'"):
        Guard(tiny_model, {"layer9": detectors["layer1"]}, {"layer9": 0.0}, (1, 8, 8))
    with pytest.raises(ConfigError, match=r"'thresholds' parameter of Guard must be one threshold per guarded layer"):
        Guard(tiny_model, detectors, {"layer1": 0.0}, (1, 8, 8))


def test_the_guard_puts_the_model_in_eval_mode(tiny_model, cached):
    _, detectors = cached
    guard = Guard(tiny_model.train(), detectors, {layer: np.inf for layer in LAYERS}, (1, 8, 8))
    assert not guard.model.training


def test_one_input_at_a_time_decides_and_predicts_as_the_batch(tiny_model, tiny_splits, cached):
    """The batch-1 path (Python scalars, no index arrays) against the batched one, on mixed exits."""
    store, detectors = cached
    guard = Guard(tiny_model, detectors, dict(zip(LAYERS, _midway(store, detectors))), (1, 8, 8))
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    batch = guard(x)
    ones = [guard(x[i:i + 1]) for i in range(len(x))]
    assert 0 < batch.ood.sum() < len(x)
    for field in ("exit_layer", "pred"):
        assert np.array_equal(np.concatenate([getattr(r, field) for r in ones]), getattr(batch, field))
    np.testing.assert_allclose(np.concatenate([r.scores for r in ones]), batch.scores, rtol=1e-4)  # NaN alike
    np.testing.assert_allclose(np.concatenate([r.logits for r in ones]), batch.logits, rtol=1e-5, atol=1e-6)
    assert all(r.logits.shape == (1, 3) and r.logits.dtype == np.float32 for r in ones)


def test_a_non_finite_input_alone_raises_the_detectors_one_line_error(tiny_model, tiny_splits, cached):
    _, detectors = cached
    guard = Guard(tiny_model, detectors, {layer: np.inf for layer in LAYERS}, (1, 8, 8))
    x = torch.from_numpy(tiny_splits["noise_test"].images[:1].copy())
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        guard(x)


def _midway(store, detectors):
    """Per layer, midway between the two middle cached ``noise_test`` scores: mixed exits, and no score near a
    threshold (there, a decision would hang on the last bits of the convolutions, which differ between batch sizes,
    in the plain model too)."""
    ordered = np.sort(layer_scores(store, "noise_test", detectors), axis=0)
    return (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2


def _spy_drops(guard, monkeypatch):
    """Record every drop-or-carry decision of ``guard``: ``(layer index, dropped)``."""
    made, decide = [], guard._drop_pays
    monkeypatch.setattr(guard, "_drop_pays", lambda k, *args: made.append((k, decide(k, *args))) or made[-1][1])
    return made


@pytest.mark.parametrize("copy_flops, drop_flops, expected", [
    (0.0, 0.0, [(0, True), (1, True)]),  # every stopped row dropped
    (1e30, 0.0, [(0, False), (1, False)]),  # carried to the output: the copies cost too much
    (0.0, 1e30, [(0, False), (1, False)]),  # or the drop itself
    (guard_module.COPY_FLOPS, 1e4, [(0, True), (1, False)])])  # a drop's fixed cost scaled to the tiny model
def test_stopped_rows_dropped_or_carried_give_the_same_result(tiny_model, tiny_splits, cached, monkeypatch,
                                                              copy_flops, drop_flops, expected):
    """Carried rows are neither scored nor decided again, and the rows that go on keep their values."""
    store, detectors = cached
    thresholds = _midway(store, detectors)
    guard = Guard(tiny_model, detectors, dict(zip(LAYERS, thresholds)), (1, 8, 8))
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    with torch.inference_mode():
        dropped = guard._run(x, guard.thresholds, carry=False)  # the drop at every layer, as before carrying
        plain = tiny_model(x).numpy()
    monkeypatch.setattr(guard_module, "COPY_FLOPS", copy_flops)
    monkeypatch.setattr(guard_module, "DROP_FLOPS", drop_flops)
    made = _spy_drops(guard, monkeypatch)
    got = guard(x)
    assert made == expected  # the last: a drop after layer1 (layer2 left to pay), a carry after layer2
    assert np.array_equal(got.exit_layer, exit_layers(layer_scores(store, "noise_test", detectors), thresholds))
    assert np.array_equal(got.exit_layer, dropped.exit_layer) and np.array_equal(got.pred, dropped.pred)
    np.testing.assert_allclose(got.scores, dropped.scores, rtol=1e-6, atol=0)  # NaN alike: no carried row scored
    passed = ~got.ood
    assert 0 < passed.sum() and (got.exit_layer == 0).any() and (got.exit_layer == 1).any()
    np.testing.assert_allclose(got.logits[passed], plain[passed], rtol=1e-5, atol=1e-6)
    assert np.isnan(got.logits[~passed]).all() and (got.pred[~passed] == -1).all()


def test_a_batch_where_every_row_stops_some_carried(tiny_model, tiny_splits, cached, monkeypatch):
    store, detectors = cached
    thresholds = {"layer1": _midway(store, detectors)[0], "layer2": -np.inf}
    guard = Guard(tiny_model, detectors, thresholds, (1, 8, 8))
    monkeypatch.setattr(guard_module, "COPY_FLOPS", 1e30)  # carry the rows that stop at layer1
    made = _spy_drops(guard, monkeypatch)
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    got = guard(x)
    assert made == [(0, False)]  # layer2 stops the rest: nothing left to drop or carry
    assert got.ood.all() and 0 < (got.exit_layer == 0).sum() < len(x) and (got.pred == -1).all()
    assert got.logits.shape == (len(x), 3) and np.isnan(got.logits).all()
    stopped_first = got.exit_layer == 0
    assert np.isnan(got.scores[stopped_first, 1]).all() and not np.isnan(got.scores[~stopped_first]).any()


class _NormDetector:
    """The L2 norm of a row, refusing non-finite rows as the fitted detectors do."""

    n_features_in_ = 2

    def score(self, X):
        if not np.isfinite(X).all():
            raise DataError("X contains NaN or inf")
        return np.linalg.norm(X, axis=1)


class _Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class _Overflow(nn.Module):
    """block2 is ``exp`` of block1: an input far out of range is finite at block1 and inf at block2."""

    def __init__(self):
        super().__init__()
        self.block1, self.block2, self.fc = nn.Conv2d(1, 2, 3, padding=1), _Exp(), nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.block2(self.block1(x)).mean(dim=(2, 3)))


def test_a_carried_row_is_not_scored_where_it_would_not_be_finite(rng, monkeypatch):
    """A row carried past its exit is never shown to a later detector, which might refuse it (here: inf)."""
    torch.manual_seed(0)
    model = _Overflow().eval()
    x = torch.from_numpy(rng.random((4, 1, 8, 8), dtype=np.float32))
    x[3] = 1e4
    with torch.inference_mode():
        assert torch.isinf(model.block2(model.block1(x[3:]))).any()  # block2's detector would refuse it
        norm = np.linalg.norm(pool(model.block1(x[:3])).numpy(), axis=1).max()
    guard = Guard(model, {"block1": _NormDetector(), "block2": _NormDetector()},
                  {"block1": 2 * norm, "block2": np.inf}, (1, 8, 8))
    made = _spy_drops(guard, monkeypatch)
    assert guard(x).exit_layer.tolist() == [-1, -1, -1, 0]
    assert made == [(0, False)]  # only the fc is left after block1: carried
    assert guard(x[3:]).exit_layer.tolist() == [0]


def test_the_global_pooling_after_a_guarded_layer_takes_the_guards_pooled_rows(tiny_model, tiny_splits, cached):
    """layer2 -> avgpool -> fc: the avgpool is the guard's pooling, reshaped; logits bitwise the plain model's."""
    _, detectors = cached
    guard = Guard(tiny_model, detectors, {layer: np.inf for layer in LAYERS}, (1, 8, 8))
    assert [(s.takes_pooled, s.feeds_pooled) for s in guard._segments] == [(False, False), (False, True),
                                                                           (True, False)]
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    with torch.inference_mode():
        plain, plain_one = tiny_model(x).numpy(), tiny_model(x[:1]).numpy()
    np.testing.assert_array_equal(guard(x).logits, plain)
    np.testing.assert_array_equal(guard(x[:1]).logits, plain_one)


def test_a_hook_on_the_global_pooling_still_runs(tiny_model, tiny_splits, cached):
    _, detectors = cached
    guard = Guard(tiny_model, detectors, {layer: np.inf for layer in LAYERS}, (1, 8, 8))
    seen = []
    handle = tiny_model.avgpool.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    try:
        guard(torch.from_numpy(tiny_splits["noise_test"].images[:2]))
    finally:
        handle.remove()
    assert seen == [(2, 8, 1, 1)]


@pytest.mark.parametrize("row, expected", [([0.5, 2.0, 2.0, -1.0], 1), ([np.nan, -1.0, -2.0, -3.0], 0),
                                           ([1.0, np.inf, np.inf, 0.0], 1), ([-np.inf, -5.0, np.nan, -5.0], 2),
                                           ([-0.0, 0.0, -1.0], 0), ([-1.0, 0.0, -0.0], 1), ([3.0, 1.0, 3.0], 0)])
def test_one_rows_prediction_is_the_batch_argmax(row, expected):
    """The batch-1 path's argmax in Python floats: the first maximum, NaN read as 0, as numpy's on the batch."""
    logits = np.array([row], dtype=np.float32)
    assert guard_module._argmax_one(logits).tolist() == guard_module._argmax(logits).tolist() == [expected]


def _dropping(guard, monkeypatch):
    """``guard`` with every drop made (no fixed or per-element cost): the rows that stop leave the batch."""
    monkeypatch.setattr(guard_module, "COPY_FLOPS", 0.0)
    monkeypatch.setattr(guard_module, "DROP_FLOPS", 0.0)
    return guard


def _spy_inputs(segment, monkeypatch):
    """The first value each call of ``segment`` receives."""
    seen, forward = [], segment.module.forward
    monkeypatch.setattr(segment.module, "forward", lambda *values: seen.append(values[0]) or forward(*values))
    return seen


def test_a_drop_moves_rows_in_place_and_gives_the_copys_result(tiny_model, tiny_splits, cached, monkeypatch):
    """Regression (issue 18): a drop copied every live row (``index_select``), and the fresh tensor made the
    allocator page in several MB per batch (1944 page faults per drop at batch 256 on the digits ResNet), more
    than the rows saved. The next segment now runs on the front rows of the same memory, with the same result."""
    store, detectors = cached
    guard = _dropping(Guard(tiny_model, detectors, dict(zip(LAYERS, _midway(store, detectors))), (1, 8, 8)),
                      monkeypatch)
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    guard.block_flops()  # counted on a probe input, through the segments: before the spies
    made, outputs = _spy_drops(guard, monkeypatch), []
    forward = guard._segments[0].module.forward
    monkeypatch.setattr(guard._segments[0].module, "forward", lambda *v: outputs.append(forward(*v)) or outputs[-1])
    seen = _spy_inputs(guard._segments[1], monkeypatch)
    got = guard(x)
    assert made[0] == (0, True) and 0 < len(seen[0]) < len(x)
    assert seen[0].untyped_storage().data_ptr() == outputs[0][0].untyped_storage().data_ptr()  # no copy
    monkeypatch.setattr(guard, "_owned", lambda *args: set())  # every value copied, as before
    copied = guard(x)
    assert seen[1].untyped_storage().data_ptr() != outputs[1][0].untyped_storage().data_ptr()
    for field in ("exit_layer", "pred", "scores", "logits"):
        np.testing.assert_array_equal(getattr(got, field), getattr(copied, field))


class _InputSkip(_Branchy):
    """The input is used after block1 too: a value live across the cut that is the caller's own tensor."""

    def forward(self, x):
        return self.fc(self.block2(self.block1(x)).mean(dim=(2, 3)) + x.mean(dim=(2, 3)))


def test_a_drop_never_changes_the_callers_input(rng, monkeypatch):
    torch.manual_seed(0)
    model = _InputSkip().eval()
    x = torch.from_numpy(rng.random((6, 1, 8, 8), dtype=np.float32))
    before = x.clone()
    detectors = _random_detectors(model, ["block1"], (1, 8, 8), rng)
    scores = Guard(model, detectors, {"block1": np.inf}, (1, 8, 8))(x).scores[:, 0]
    guard = _dropping(Guard(model, detectors, {"block1": float(np.sort(scores)[2])}, (1, 8, 8)), monkeypatch)
    made = _spy_drops(guard, monkeypatch)
    got = guard(x)
    with torch.inference_mode():
        plain = model(x).numpy()
    assert made == [(0, True), (0, True)] and torch.equal(x, before)  # asked again with the input's copy priced
    np.testing.assert_allclose(got.logits[~got.ood], plain[~got.ood], rtol=1e-5, atol=1e-6)


def test_a_hook_keeps_the_activation_it_was_given(tiny_model, tiny_splits, cached, monkeypatch):
    """A forward hook may hold on to a module's output: while the model has one, a drop copies rows."""
    store, detectors = cached
    guard = _dropping(Guard(tiny_model, detectors, dict(zip(LAYERS, _midway(store, detectors))), (1, 8, 8)),
                      monkeypatch)
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    kept = []
    handle = tiny_model.layer1.register_forward_hook(lambda module, args, out: kept.append(out))
    try:
        made = _spy_drops(guard, monkeypatch)
        guard(x)
    finally:
        handle.remove()
    with torch.inference_mode():
        expected = tiny_model.layer1(torch.relu(tiny_model.bn1(tiny_model.conv1(tiny_model.normalize(x)))))
    assert made[0] == (0, True)
    torch.testing.assert_close(kept[0], expected, rtol=0, atol=0)


def test_compact_keeps_the_live_rows_front_first():
    dead = np.array([False, True, False, True, False, False, True])  # 4 live: rows 1 and 3 refilled from 4 and 5
    with torch.inference_mode():
        owned, other = torch.arange(7.0)[:, None].repeat(1, 2), torch.arange(7.0) * 10
        values, order = guard_module._compact((owned, other, "not batched"), (True, True, False), dead,
                                              {id(owned)}, torch.device("cpu"))
    assert order.tolist() == [0, 4, 2, 5]
    assert values[0][:, 0].tolist() == [0, 4, 2, 5] and values[0].data_ptr() == owned.data_ptr()  # in place
    assert values[1].tolist() == [0, 40, 20, 50] and other.tolist() == [0, 10, 20, 30, 40, 50, 60]  # a copy
    assert values[2] == "not batched"


def test_only_tensors_alone_in_their_memory_are_changed_in_place():
    with torch.inference_mode():
        x, alone, base = torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 6)
        left, right, wide = base[:, :3], base[:, 3:], torch.zeros(4, 1).expand(4, 3)
        owned = guard_module._exclusive([alone, alone, left, right, wide, x, x[:2]], x)
    assert owned == {id(alone)}  # views of one tensor, broadcast rows and the input are not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy's rows on the CPU; index_copy_ without
def test_rows_are_moved_in_place_whatever_the_dtype(dtype):
    moves = guard_module._Moves(np.array([1, 3]), np.array([4, 5]), np.array([0, 4, 2, 5]), torch.device("cpu"))
    with torch.inference_mode():
        value = torch.arange(6, dtype=dtype)[:, None].repeat(1, 3)
        pointer = value.data_ptr()
        guard_module._move_rows(value, moves)
    assert value[:, 0].tolist() == [0, 4, 2, 5, 4, 5] and value.data_ptr() == pointer
    assert (guard_module._numpy_view(value) is None) == (dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logits_reach_the_host_as_float32_and_a_cpu_float32_output_is_not_copied(dtype):
    output = torch.tensor([[1.5, -2.0]], dtype=dtype)
    logits = guard_module._host_float(output)
    assert logits.dtype == np.float32 and logits.tolist() == [[1.5, -2.0]]
    assert (logits.ctypes.data == output.data_ptr()) == (dtype == torch.float32)
