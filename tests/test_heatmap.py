"""Heatmap-based OOD detection: known answers for the maths, decoder shapes, training and an AUROC floor."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.errors import ConfigError, DataError
from pipeline.heatmap import (
    HeatmapDecoder,
    decoder_inputs,
    heatmap_loss,
    heatmap_scores,
    init_decoder,
    minmax_normalise,
    nearest_prototypes,
    score_heatmaps,
    train_decoder,
)

S = 8  # image size of the synthetic problem
N_CLASSES = 2
CENTRES = np.array([[2.0, 2.0], [5.0, 5.0]])  # blob centre per class (row, col)


def blob_images(rng, labels):
    """Smooth Gaussian blobs, one per image, centred near its class's centre; shape (n, 1, S, S) in [0, 1]."""
    centres = CENTRES[labels] + rng.uniform(-0.7, 0.7, size=(len(labels), 2))
    grid = np.arange(S, dtype=np.float64)
    rows = np.exp(-((grid[None, :] - centres[:, :1]) ** 2) / 3.0)
    cols = np.exp(-((grid[None, :] - centres[:, 1:]) ** 2) / 3.0)
    return (rows[:, None, :, None] * cols[:, None, None, :]).astype(np.float32)


def fake_classifier(images, projection):
    """A frozen stand-in: features ``relu(x W)``, prediction = the brighter half (top-left vs bottom-right)."""
    flat = images.reshape(len(images), -1)
    features = np.maximum(flat @ projection, 0.0)
    top_left = images[:, 0, : S // 2, : S // 2].sum(axis=(1, 2))
    bottom_right = images[:, 0, S // 2:, S // 2:].sum(axis=(1, 2))
    return features.astype(np.float32), (bottom_right > top_left).astype(np.int64)


def synthetic_split(rng, projection, n_id, n_out):
    """``n_id`` blob images then ``n_out`` uniform-noise outliers, with features and predictions."""
    images = np.concatenate([blob_images(rng, rng.integers(0, N_CLASSES, n_id)),
                             rng.random((n_out, 1, S, S), dtype=np.float32)])
    features, pred = fake_classifier(images, projection)
    return features, pred, images, np.arange(n_id + n_out) >= n_id


@pytest.fixture
def problem(rng):
    """Training data (64 ID blobs + 32 noise outliers, prototypes from the ID rows) and a held-out split."""
    projection = rng.normal(scale=0.5, size=(S * S, 16))
    features, pred, images, is_out = synthetic_split(rng, projection, 64, 32)
    data = decoder_inputs(features, pred, N_CLASSES, [], images, is_out, train_features=features[~is_out],
                          train_pred=pred[~is_out], train_images=images[~is_out])
    return data, synthetic_split(rng, projection, 64, 32)


# -- minmax_normalise ------------------------------------------------------------------------------------------

def test_minmax_known_answer_numpy_and_torch():
    z = np.array([[1.0, 3.0, 2.0], [-2.0, 0.0, 2.0], [4.0, 4.0, 4.0]])
    expected = np.array([[0.0, 1.0, 0.5], [0.0, 0.5, 1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(minmax_normalise(z), expected)
    out = minmax_normalise(torch.tensor(z, dtype=torch.float32))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), expected)


def test_minmax_rejects_1d():
    with pytest.raises(DataError, match=r"minmax_normalise expects a 2-D array \(n, D\); got shape \(3,\)"):
        minmax_normalise(np.zeros(3))


# -- nearest_prototypes ----------------------------------------------------------------------------------------

def test_nearest_prototypes_known_answer():
    train = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    train_pred = np.array([0, 1, 1, 0])
    query = np.array([[0.9, 0.0],    # class 0: nearest overall is row 1 (class 1), so row 0
                      [0.1, 0.0],    # class 1: row 0 is nearer but class 0, so row 1
                      [9.0, 0.0],    # class 1: row 2
                      [0.0, 4.0],    # class 7 absent from train: nearest overall, row 3
                      [0.4, 0.1]])   # class 0: row 0
    query_pred = np.array([0, 1, 1, 7, 0])
    expected = np.array([0, 1, 2, 3, 0])
    for block_size in (1, 2, 1024):  # blocks must not change the answer
        got = nearest_prototypes(train, train_pred, query, query_pred, block_size=block_size)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)


def test_nearest_prototypes_shape_errors():
    train, pred = np.zeros((4, 2)), np.zeros(4, dtype=int)
    with pytest.raises(DataError, match=r"nearest_prototypes expects .* got \(4, 2\), \(4,\), \(3, 5\), \(3,\)"):
        nearest_prototypes(train, pred, np.zeros((3, 5)), np.zeros(3, dtype=int))
    with pytest.raises(DataError, match=r"train_pred \(N,\).* got \(4, 2\), \(3,\)"):
        nearest_prototypes(train, pred[:3], np.zeros((3, 2)), np.zeros(3, dtype=int))
    with pytest.raises(ConfigError, match="The 'block_size' parameter of nearest_prototypes must be a positive int"):
        nearest_prototypes(train, pred, np.zeros((3, 2)), np.zeros(3, dtype=int), block_size=0)


# -- HeatmapDecoder --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("n_skips", [0, 1, 2])
def test_decoder_output_shape(size, n_skips):
    skip_shapes = [(16, size // 4, size // 4), (8, size // 2, size // 2)][:n_skips]
    decoder = init_decoder(10, 3, (3, size, size), skip_shapes, width=8)
    skips = [torch.randn(5, *s) for s in skip_shapes]
    out = decoder(torch.randn(5, 10), torch.eye(3)[[0, 1, 2, 0, 1]], skips)
    assert out.shape == (5, 3, size, size)


def test_decoder_cifar_resnet_skips():
    """ResNet-18 on CIFAR: layer4 (512, 4, 4), layer3 (256, 8, 8), layer2 (128, 16, 16), deepest first."""
    shapes = [(512, 4, 4), (256, 8, 8), (128, 16, 16)]
    decoder = init_decoder(512, 10, (3, 32, 32), shapes, width=8)
    out = decoder(torch.randn(2, 512), torch.eye(10)[:2], [torch.randn(2, *s) for s in shapes])
    assert out.shape == (2, 3, 32, 32)


def test_decoder_input_shape_errors():
    decoder = init_decoder(10, 3, (1, 8, 8), [(4, 2, 2)], width=8)
    z, onehot, skip = torch.randn(5, 10), torch.eye(3)[[0, 1, 2, 0, 1]], torch.randn(5, 4, 2, 2)
    with pytest.raises(DataError, match=r"expects z \(n, 10\) and onehot \(n, 3\); got \(5, 9\) and \(5, 3\)"):
        decoder(z[:, :9], onehot, [skip])
    with pytest.raises(DataError, match=r"got \(5, 10\) and \(4, 3\)"):
        decoder(z, onehot[:4], [skip])
    with pytest.raises(DataError, match=r"expects 1 skip map\(s\) .* \[\(5, 4, 2, 2\)\]; got \[\]"):
        decoder(z, onehot)
    with pytest.raises(DataError, match=r"got \[\(5, 4, 4, 4\)\]"):
        decoder(z, onehot, [torch.randn(5, 4, 4, 4)])


def test_decoder_config_errors():
    with pytest.raises(ConfigError, match="The 'image_shape' parameter of HeatmapDecoder must be a square"):
        HeatmapDecoder(10, 3, (3, 8, 16))
    with pytest.raises(ConfigError, match="The 'skip_shapes' parameter of HeatmapDecoder must be deepest first"):
        HeatmapDecoder(10, 3, (3, 32, 32), [(8, 8, 8), (8, 4, 4)])
    with pytest.raises(ConfigError, match="The 'skip_shapes' parameter .* must be deepest first"):
        HeatmapDecoder(10, 3, (3, 32, 32), [(8, 4, 4), (8, 12, 12)])
    with pytest.raises(ConfigError, match="The 'skip_shapes' parameter .* must be a list of square"):
        HeatmapDecoder(10, 3, (3, 32, 32), [(8, 4, 8)])
    with pytest.raises(ConfigError, match="The 'width' parameter of HeatmapDecoder must be a positive int"):
        HeatmapDecoder(10, 3, (3, 32, 32), width=0)


def test_init_decoder_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    init_decoder(10, 3, (1, 8, 8), width=8, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())


# -- loss and scores -------------------------------------------------------------------------------------------

def test_heatmap_loss_known_answer():
    h = torch.tensor([1.0, -1.0, 0.5, 0.0]).view(1, 1, 2, 2)
    x = torch.tensor([0.0, 1.0, 0.5, 2.0]).view(1, 1, 2, 2)
    t = torch.tensor([0.0, -1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    # h + x - t = [1, 1, 0, 2]; weights 1 + 5|t| = [1, 6, 6, 1]; (1 + 6 + 0 + 4) / 4
    assert heatmap_loss(h, x, t).item() == pytest.approx(11 / 4)
    assert heatmap_loss(t - x, x, t).item() == 0.0


def test_heatmap_loss_shape_error():
    with pytest.raises(DataError, match=r"heatmap_loss expects .* got \(1, 1, 2, 2\), \(1, 1, 2, 2\) and \(1, 2, 2\)"):
        heatmap_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2))


def test_heatmap_scores_known_answer():
    h = np.zeros((2, 2, 2, 2))
    h[0, 0] = [[1.0, -3.0], [0.0, 0.0]]
    h[0, 1] = [[-2.0, 1.0], [0.0, 4.0]]  # channel-max |h|: [[2, 3], [0, 4]] -> 9 / 4
    np.testing.assert_allclose(heatmap_scores(h), [9 / 4, 0.0])
    np.testing.assert_allclose(heatmap_scores(torch.tensor(h)), [9 / 4, 0.0])
    with pytest.raises(DataError, match=r"heatmap_scores expects heatmaps of shape \(n, C, H, W\); got \(2, 2\)"):
        heatmap_scores(np.zeros((2, 2)))


# -- decoder_inputs, training and scoring ----------------------------------------------------------------------

def test_decoder_inputs_targets(rng):
    images = rng.random((4, 1, 2, 2), dtype=np.float32)
    train_images = rng.random((2, 1, 2, 2), dtype=np.float32)
    features = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0], [0.2, 0.0]])
    data = decoder_inputs(features, np.array([0, 1, 1, 1]), 2, [], images, np.array([False, False, True, True]),
                          train_features=np.array([[0.0, 0.0], [4.0, 4.0]]), train_pred=np.array([0, 1]),
                          train_images=train_images)
    np.testing.assert_array_equal(data.targets[:2].numpy(), images[:2])  # ID: the image itself
    np.testing.assert_array_equal(data.targets[2:].numpy(), train_images[[1, 1]])  # outliers: class 1's prototype
    np.testing.assert_array_equal(data.onehot.numpy(), np.eye(2)[[0, 1, 1, 1]])
    with pytest.raises(DataError, match=r"decoder_inputs expects 4 rows .* pred \(3,\)"):
        decoder_inputs(features, np.array([0, 1, 1]), 2, [], images, np.zeros(4, dtype=bool),
                       train_features=features, train_pred=np.zeros(4, dtype=int), train_images=images)
    with pytest.raises(DataError, match=r"pred must be 1-D integer classes in \[0, 2\)"):
        decoder_inputs(features, np.array([0, 1, 2, 1]), 2, [], images, np.zeros(4, dtype=bool),
                       train_features=features, train_pred=np.zeros(4, dtype=int), train_images=images)


def test_training_decreases_loss_and_is_deterministic(problem):
    data, _ = problem
    runs = []
    for _ in range(2):
        decoder = init_decoder(16, N_CLASSES, (1, S, S), width=8, seed=3)
        history = train_decoder(decoder, data, epochs=5, batch_size=16, lr=1e-3, seed=7)
        runs.append((history, decoder.state_dict()))
    history, state = runs[0]
    assert history[-1] < history[0]
    assert not decoder.training
    assert runs[1][0] == history
    assert all(torch.equal(state[k], runs[1][1][k]) for k in state)


def test_training_pins_its_thread_count(problem):
    """The decoder's weights depend on ``threads`` only, not on the pool the stage was given."""
    data, _ = problem
    states = []
    for outer, pinned in ((1, 1), (2, 1), (2, 2)):
        torch.set_num_threads(outer)
        decoder = init_decoder(16, N_CLASSES, (1, S, S), width=8, seed=3)
        train_decoder(decoder, data, epochs=2, batch_size=64, lr=1e-3, seed=7, threads=pinned)
        assert torch.get_num_threads() == outer
        states.append(decoder.state_dict())
    same = [all(torch.equal(states[0][k], other[k]) for k in states[0]) for other in states[1:]]
    assert same == [True, False]


def test_train_decoder_param_errors(problem):
    data, _ = problem
    decoder = init_decoder(16, N_CLASSES, (1, S, S), width=8)
    with pytest.raises(ConfigError, match="The 'epochs' parameter of train_decoder must be a positive int"):
        train_decoder(decoder, data, epochs=0, batch_size=8)
    with pytest.raises(ConfigError, match="The 'lr' parameter of train_decoder must be a positive float"):
        train_decoder(decoder, data, epochs=1, batch_size=8, lr=-1.0)
    with pytest.raises(ConfigError, match="The 'threads' parameter of train_decoder must be a positive int"):
        train_decoder(decoder, data, epochs=1, batch_size=8, threads=0)


def test_auroc_floor(problem):
    """ID blobs score low (h ~ 0), noise outliers high (h ~ prototype - image): AUROC >= 0.9 on held-out data."""
    data, (features, pred, _, is_out) = problem
    decoder = init_decoder(16, N_CLASSES, (1, S, S), width=8, seed=0)
    train_decoder(decoder, data, epochs=30, batch_size=16, lr=1e-3, seed=0)
    scores = score_heatmaps(decoder, features, pred, N_CLASSES, [], batch_size=20)
    assert scores.shape == (len(features),)
    assert roc_auc_score(is_out, scores) >= 0.9


def test_skip_maps_flow_through_training_and_scoring(rng):
    """A (1, 4, 4) skip (the 2x2-pooled image) reaches the decoder in training and in scoring."""
    projection = rng.normal(scale=0.5, size=(S * S, 16))
    features, pred, images, is_out = synthetic_split(rng, projection, 16, 8)
    pooled = images.reshape(len(images), 1, S // 2, 2, S // 2, 2).mean(axis=(3, 5))
    data = decoder_inputs(features, pred, N_CLASSES, [pooled], images, is_out, train_features=features[~is_out],
                          train_pred=pred[~is_out], train_images=images[~is_out])
    decoder = init_decoder(16, N_CLASSES, (1, S, S), [(1, S // 2, S // 2)], width=8)
    assert len(train_decoder(decoder, data, epochs=2, batch_size=8)) == 2
    assert score_heatmaps(decoder, features, pred, N_CLASSES, [pooled]).shape == (len(images),)
    with pytest.raises(DataError, match=r"expects 1 skip map\(s\)"):
        score_heatmaps(decoder, features, pred, N_CLASSES, [])
