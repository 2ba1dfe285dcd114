"""Heatmap-based OOD detection (Hornauer, Yuan & Belagiannis, WACV 2023).

"Heatmap-based Out-of-Distribution Detection": a decoder, trained on top of a
frozen classifier, turns the classifier's penultimate feature ``z`` (min-max
normalised per sample), the one-hot predicted class and optional
low-resolution feature maps of the later blocks into a heatmap ``h`` with the
image's shape. It learns ``h + x = t``: for an ID image ``t = x`` (so ``h = 0``);
for an auxiliary outlier ``t`` is the ID-train image of the same predicted
class that is nearest in penultimate-feature space (so ``h`` is large). The loss
is ``mean((1 + 5 |t|) * (h + x - t)^2)`` and the score is
``mean_pixels max_channels |h|``: higher = more OOD.

The maths lives in small functions (:func:`minmax_normalise`,
:func:`nearest_prototypes`, :func:`heatmap_loss`, :func:`heatmap_scores`);
:func:`decoder_inputs`, :func:`train_decoder` and :func:`score_heatmaps` wire
them to a :class:`HeatmapDecoder`. Everything takes arrays (features, skip
maps, images), never the classifier.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import DataError, invalid_param
from pipeline.threads import torch_threads

log = logging.getLogger(__name__)

#: Weight of ``|t|`` in the loss's per-pixel weight ``1 + TARGET_WEIGHT * |t|`` (the paper's 5).
TARGET_WEIGHT = 5.0


def minmax_normalise(z):
    """Per-sample min-max scaling to [0, 1].

    ``z'_i = (z_i - min_j z_j) / (max_j z_j - min_j z_j)``; a constant row
    becomes zeros (there is no range to scale by).

    Parameters
    ----------
    z : ndarray or Tensor of shape (n_samples, n_features)

    Returns
    -------
    z_scaled : ndarray or Tensor of shape (n_samples, n_features)
        Same type as ``z`` (floating point), values in [0, 1].
    """
    if z.ndim != 2:
        raise DataError(f"minmax_normalise expects a 2-D array (n, D); got shape {tuple(z.shape)}.")
    if isinstance(z, torch.Tensor):
        z = z if z.is_floating_point() else z.float()
        low, high = z.amin(dim=1, keepdim=True), z.amax(dim=1, keepdim=True)
        span = high - low
        return torch.where(span > 0, (z - low) / torch.where(span > 0, span, 1), torch.zeros_like(z))
    z = np.asarray(z)
    z = z if np.issubdtype(z.dtype, np.floating) else z.astype(np.float64)
    low, high = z.min(axis=1, keepdims=True), z.max(axis=1, keepdims=True)
    span = high - low
    return np.where(span > 0, (z - low) / np.where(span > 0, span, 1), 0).astype(z.dtype)


def nearest_prototypes(train_features, train_pred, query_features, query_pred, *, block_size=1024):
    """Index of the nearest train row of the same predicted class, for every query row.

    Distances are Euclidean, from ``|q|^2 - 2 q.t + |t|^2`` in float64, one block
    of ``block_size`` queries at a time, so memory is O(block_size * n_train).
    A query whose class no train row has falls back to the nearest train row
    overall. Ties go to the lowest index.

    Parameters
    ----------
    train_features : ndarray of shape (n_train, n_features)
    train_pred : ndarray of shape (n_train,)
        Predicted class of each train row.
    query_features : ndarray of shape (n_queries, n_features)
    query_pred : ndarray of shape (n_queries,)
    block_size : int, default=1024
        Queries per block.

    Returns
    -------
    indices : ndarray of shape (n_queries,), int64
        Rows of ``train_features``.
    """
    train, train_pred, query, query_pred = _check_prototype_inputs(train_features, train_pred, query_features,
                                                                   query_pred)
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise invalid_param("block_size", "nearest_prototypes", "a positive int", block_size)
    train_sq = np.einsum("ij,ij->i", train, train)
    has_class = np.isin(query_pred, train_pred)
    out = np.empty(len(query), dtype=np.int64)
    for start in range(0, len(query), block_size):
        rows = slice(start, start + block_size)
        q = query[rows]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] - 2 * q @ train.T + train_sq[None, :]
        allowed = (train_pred[None, :] == query_pred[rows, None]) | ~has_class[rows, None]
        out[rows] = np.where(allowed, d2, np.inf).argmin(axis=1)
    return out


def _check_prototype_inputs(train, train_pred, query, query_pred):
    """Return float64 features and 1-D predictions, or raise ``DataError`` on inconsistent shapes."""
    train, query = np.asarray(train, dtype=np.float64), np.asarray(query, dtype=np.float64)
    train_pred, query_pred = np.asarray(train_pred), np.asarray(query_pred)
    ok = (train.ndim == 2 and query.ndim == 2 and train.shape[1] == query.shape[1] and len(train) > 0
          and train_pred.shape == (len(train),) and query_pred.shape == (len(query),))
    if not ok:
        raise DataError(
            f"nearest_prototypes expects train_features (N, D) with N >= 1, train_pred (N,), query_features "
            f"(M, D) and query_pred (M,); got {train.shape}, {train_pred.shape}, {query.shape}, {query_pred.shape}."
        )
    return train, train_pred, query, query_pred


class HeatmapDecoder(nn.Module):
    """Decoder from ``[minmax(z), onehot]`` (+ skip maps) to a heatmap of the image's shape.

    A linear layer maps ``[minmax(z), onehot]`` to ``4 * width`` maps of size
    ``s0 x s0`` (``s0`` = the first skip's size, else ``max(1, S // 8)``). Each
    stage then doubles the size (nearest upsampling, conv 3x3, batch norm,
    ReLU) and halves the channels (not below ``max(1, width // 4)``); a skip map
    is concatenated when the current size equals its size, skips in order. A
    final conv 3x3 gives ``C`` channels, resized to ``S`` if the doubling
    overshoots. No output activation: ``h`` takes either sign.

    Build it with :func:`init_decoder` for seeded weights.

    Parameters
    ----------
    feature_dim : int
        ``D``, size of the penultimate feature.
    n_classes : int
        ``K``, size of the one-hot.
    image_shape : tuple of int
        ``(C, S, S)``.
    skip_shapes : sequence of tuple of int, default=()
        ``(C_i, H_i, H_i)`` per skip map, deepest (smallest) first; each size
        must be ``s0 * 2**k``, strictly increasing, and at most ``S``.
    width : int, default=64
        Channel scale; the first maps have ``4 * width`` channels.
    """

    def __init__(self, feature_dim, n_classes, image_shape, skip_shapes=(), width=64):
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("n_classes", n_classes), ("width", width)):
            _check_positive_int(name, value)
        self.feature_dim, self.n_classes, self.width = feature_dim, n_classes, width
        self.image_shape = _check_image_shape(image_shape)
        self.skip_shapes = [tuple(s) for s in skip_shapes]
        sizes = _resolution_schedule(self.image_shape[1], self.skip_shapes)
        self.start_size = sizes[0]
        self.fc = nn.Linear(feature_dim + n_classes, 4 * width * sizes[0] ** 2)
        self._skip_at = {s[1]: i for i, s in enumerate(self.skip_shapes)}  # size -> index of the skip entering there
        main = 4 * width  # channels of the decoder's own path; skips add to a stage's input only
        channels = main + self._skip_channels(sizes[0])
        self.stages = nn.ModuleList()
        for size in sizes[1:]:
            main = max(main // 2, max(1, width // 4))
            self.stages.append(_up_stage(channels, main))
            channels = main + self._skip_channels(size)
        self.head = nn.Conv2d(channels, self.image_shape[0], kernel_size=3, padding=1)

    def _skip_channels(self, size):
        """Channels of the skip entering at ``size``, 0 if none does."""
        return self.skip_shapes[self._skip_at[size]][0] if size in self._skip_at else 0

    def forward(self, z, onehot, skips=()):
        """Heatmap from raw penultimate features, one-hot predictions and skip maps.

        Parameters
        ----------
        z : Tensor of shape (n, feature_dim)
            Raw penultimate features; min-max normalised here, so training and
            scoring cannot disagree on it.
        onehot : Tensor of shape (n, n_classes)
        skips : sequence of Tensor, default=()
            One per ``skip_shapes`` entry, of shape ``(n, C_i, H_i, H_i)``.

        Returns
        -------
        heatmap : Tensor of shape (n, C, S, S)
        """
        self._check_inputs(z, onehot, skips)
        x = torch.cat([minmax_normalise(z), onehot.to(z.dtype)], dim=1)
        x = F.relu(self.fc(x)).view(len(z), 4 * self.width, self.start_size, self.start_size)
        x = self._with_skip(x, skips)
        for stage in self.stages:
            x = self._with_skip(stage(x), skips)
        x = self.head(x)
        size = self.image_shape[1]
        return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    def _with_skip(self, x, skips):
        """Concatenate the skip map whose size is ``x``'s, if any."""
        i = self._skip_at.get(x.shape[-1])
        return x if i is None else torch.cat([x, skips[i].to(x.dtype)], dim=1)

    def _check_inputs(self, z, onehot, skips):
        """Raise ``DataError`` unless the inputs match the decoder's shapes."""
        n = z.shape[0] if z.ndim == 2 else -1
        if z.ndim != 2 or z.shape[1] != self.feature_dim or tuple(onehot.shape) != (n, self.n_classes):
            raise DataError(f"HeatmapDecoder expects z (n, {self.feature_dim}) and onehot (n, {self.n_classes}); "
                            f"got {tuple(z.shape)} and {tuple(onehot.shape)}.")
        got = [tuple(s.shape) for s in skips]
        if got != [(n, *s) for s in self.skip_shapes]:
            raise DataError(f"HeatmapDecoder expects {len(self.skip_shapes)} skip map(s) of shapes (n, C, H, W) = "
                            f"{[(n, *s) for s in self.skip_shapes]}; got {got}.")


def _up_stage(in_channels, out_channels):
    """Double the size, then conv 3x3 + batch norm + ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise invalid_param(name, "HeatmapDecoder", "a positive int", value)


def _check_image_shape(image_shape):
    """Return ``(C, S, S)`` as a tuple of ints, or raise ``ConfigError``."""
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
    if (shape is None or len(shape) != 3 or not all(isinstance(v, numbers.Integral) and v >= 1 for v in shape)
            or shape[1] != shape[2]):
        raise invalid_param("image_shape", "HeatmapDecoder", "a square (C, S, S) of positive ints", image_shape)
    return tuple(int(v) for v in shape)


def _resolution_schedule(size, skip_shapes):
    """Sizes the decoder passes through: ``s0, 2 s0, ...`` up to the first >= ``size``.

    Raise ``ConfigError`` if a skip's size is not on that ladder, in order.
    """
    for s in skip_shapes:
        if len(s) != 3 or s[1] != s[2] or not all(isinstance(v, numbers.Integral) and v >= 1 for v in s):
            raise invalid_param("skip_shapes", "HeatmapDecoder", "a list of square (C, H, H) shapes", skip_shapes)
    sizes = [skip_shapes[0][1] if skip_shapes else max(1, size // 8)]
    while sizes[-1] < size:
        sizes.append(2 * sizes[-1])
    skip_sizes = [s[1] for s in skip_shapes]
    positions = [sizes.index(s) if s in sizes and s <= size else -1 for s in skip_sizes]
    if -1 in positions or positions != sorted(set(positions)):
        raise invalid_param("skip_shapes", "HeatmapDecoder", f"deepest first, with sizes doubling up to at most "
                            f"the image size {size} (e.g. 4, 8, 16 for 32)", skip_shapes)
    return sizes


def init_decoder(feature_dim, n_classes, image_shape, skip_shapes=(), width=64, *, seed=0):
    """A :class:`HeatmapDecoder` with seeded weights, leaving torch's global RNG untouched.

    Parameters are :class:`HeatmapDecoder`'s, plus ``seed : int``.

    Returns
    -------
    decoder : HeatmapDecoder
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HeatmapDecoder(feature_dim, n_classes, image_shape, skip_shapes, width)


def heatmap_loss(heatmap, images, targets):
    """Target-weighted squared error of ``h + x`` against ``t``.

    ``loss = mean((1 + 5 |t|) * (h + x - t)^2)``, the mean over every sample,
    channel and pixel: bright target pixels weigh more.

    Parameters
    ----------
    heatmap, images, targets : Tensor of shape (n, C, S, S)

    Returns
    -------
    loss : Tensor of shape ()
    """
    if not heatmap.shape == images.shape == targets.shape:
        raise DataError(f"heatmap_loss expects heatmap, images and targets of one shape; got "
                        f"{tuple(heatmap.shape)}, {tuple(images.shape)} and {tuple(targets.shape)}.")
    weight = 1 + TARGET_WEIGHT * targets.abs()
    return (weight * (heatmap + images - targets) ** 2).mean()


def heatmap_scores(heatmap):
    """OOD score of each heatmap: ``mean_pixels max_channels |h|``.

    Parameters
    ----------
    heatmap : ndarray or Tensor of shape (n, C, H, W)

    Returns
    -------
    scores : ndarray of shape (n,)
        Higher means more out-of-distribution.
    """
    if heatmap.ndim != 4:
        raise DataError(f"heatmap_scores expects heatmaps of shape (n, C, H, W); got {tuple(heatmap.shape)}.")
    h = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    return np.abs(h).max(axis=1).mean(axis=(1, 2))


@dataclass
class DecoderData:
    """What the decoder trains on, as tensors; build it with :func:`decoder_inputs`.

    Attributes
    ----------
    features : Tensor of shape (n, D)
        Raw penultimate features (the decoder normalises them).
    onehot : Tensor of shape (n, K)
        One-hot predicted class.
    images : Tensor of shape (n, C, S, S)
    targets : Tensor of shape (n, C, S, S)
        The image itself for ID rows, the class prototype for outlier rows.
    skips : list of Tensor of shape (n, C_i, H_i, H_i), default=[]
        Deepest first.
    """

    features: torch.Tensor
    onehot: torch.Tensor
    images: torch.Tensor
    targets: torch.Tensor
    skips: list = field(default_factory=list)

    def __len__(self):
        return len(self.features)

    def batch(self, idx, device):
        """Rows ``idx`` of every tensor, on ``device``: ``(z, onehot, skips, images, targets)``."""
        return (self.features[idx].to(device), self.onehot[idx].to(device), [s[idx].to(device) for s in self.skips],
                self.images[idx].to(device), self.targets[idx].to(device))


def one_hot(pred, n_classes):
    """One-hot float32 tensor of shape (n, n_classes) from predicted classes of shape (n,)."""
    pred = np.asarray(pred)
    if pred.ndim != 1 or not np.issubdtype(pred.dtype, np.integer) or (len(pred) and not
                                                                       0 <= pred.min() <= pred.max() < n_classes):
        raise DataError(f"pred must be 1-D integer classes in [0, {n_classes}); got shape {pred.shape}, dtype "
                        f"{pred.dtype}.")
    return F.one_hot(torch.as_tensor(pred, dtype=torch.int64), n_classes).float()


def decoder_inputs(features, pred, n_classes, skips, images, is_outlier, *, train_features, train_pred,
                   train_images):
    """Build the decoder's training data, with prototype targets for the outliers.

    Targets are the images themselves for ID rows; for outlier rows, the
    ID-train image of the same predicted class nearest in (raw) penultimate
    space, from :func:`nearest_prototypes`.

    Parameters
    ----------
    features : ndarray of shape (n, D)
        Raw penultimate features of the training rows (ID and outliers).
    pred : ndarray of shape (n,)
        Classifier's predicted class.
    n_classes : int
    skips : sequence of ndarray of shape (n, C_i, H_i, H_i)
        Skip maps, deepest first (may be empty).
    images : ndarray of shape (n, C, S, S)
        Images as the classifier saw them.
    is_outlier : ndarray of shape (n,), bool
        True for auxiliary outliers.
    train_features : ndarray of shape (N, D)
        ID-train penultimate features the prototypes are picked from.
    train_pred : ndarray of shape (N,)
    train_images : ndarray of shape (N, C, S, S)

    Returns
    -------
    data : DecoderData
    """
    images, train_images = np.asarray(images, dtype=np.float32), np.asarray(train_images, dtype=np.float32)
    is_outlier = np.asarray(is_outlier, dtype=bool)
    pred = np.asarray(pred)
    n = len(images)
    if (len(features) != n or len(pred) != n or is_outlier.shape != (n,) or any(len(s) != n for s in skips)
            or train_images.shape[1:] != images.shape[1:] or len(train_images) != len(train_features)):
        raise DataError(f"decoder_inputs expects {n} rows in features, pred, is_outlier and every skip map, and "
                        f"train_images (N, {', '.join(map(str, images.shape[1:]))}) matching train_features; got "
                        f"features {np.shape(features)}, pred {pred.shape}, is_outlier {is_outlier.shape}, skips "
                        f"{[np.shape(s) for s in skips]}, train_images {train_images.shape}.")
    targets = images.copy()
    idx = nearest_prototypes(train_features, train_pred, np.asarray(features)[is_outlier], pred[is_outlier])
    targets[is_outlier] = train_images[idx]
    log.debug("decoder_inputs: %d ID rows, %d outliers", n - is_outlier.sum(), is_outlier.sum())
    return DecoderData(torch.as_tensor(np.asarray(features, dtype=np.float32)), one_hot(pred, n_classes),
                       torch.from_numpy(images), torch.from_numpy(targets),
                       [torch.as_tensor(np.asarray(s, dtype=np.float32)) for s in skips])


def train_decoder(decoder, data, *, epochs, batch_size, lr=2e-4, betas=(0.5, 0.999), seed=0, device="cpu",
                  threads=1):
    """Fit the decoder with Adam on :func:`heatmap_loss` (the classifier stays frozen: only arrays come in).

    Parameters
    ----------
    decoder : HeatmapDecoder
    data : DecoderData
    epochs, batch_size : int
    lr : float, default=2e-4
    betas : tuple of float, default=(0.5, 0.999)
        Adam's, as the paper's.
    seed : int, default=0
        Seeds the shuffling (a dedicated ``torch.Generator``).
    device : torch.device or str, default="cpu"
    threads : int, default=1
        torch's CPU threads while training: the learned weights depend on
        the count (:func:`pipeline.threads.torch_threads`).

    Returns
    -------
    history : list of float
        Mean training loss per epoch. The decoder is left in eval mode.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise invalid_param(name, "train_decoder", "a positive int", value)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise invalid_param("lr", "train_decoder", "a positive float", lr)
    if len(data) == 0:
        raise DataError("train_decoder got no training rows.")
    with torch_threads(threads):
        return _train_decoder(decoder, data, epochs, batch_size, lr, betas, seed, device)


def _train_decoder(decoder, data, epochs, batch_size, lr, betas, seed, device):
    decoder.to(device).train()
    opt = torch.optim.Adam(decoder.parameters(), lr=lr, betas=tuple(betas))
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(epochs), desc="decoder", unit="epoch", disable=None)
    for _ in bar:
        order = torch.randperm(len(data), generator=gen)
        losses = [_train_step(decoder, opt, data.batch(idx, device)) * len(idx) for idx in order.split(batch_size)]
        history.append(sum(losses) / len(data))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    decoder.eval()
    return history


def _train_step(decoder, opt, batch):
    z, onehot, skips, images, targets = batch
    opt.zero_grad(set_to_none=True)
    loss = heatmap_loss(decoder(z, onehot, skips), images, targets)
    loss.backward()
    opt.step()
    return loss.item()


@torch.inference_mode()
def score_heatmaps(decoder, features, pred, n_classes, skips=(), batch_size=256, device="cpu"):
    """Heatmap OOD scores, ``mean_pixels max_channels |h|``, batch by batch.

    Parameters
    ----------
    decoder : HeatmapDecoder
    features : ndarray of shape (n, D)
        Raw penultimate features.
    pred : ndarray of shape (n,)
        Predicted classes.
    n_classes : int
    skips : sequence of ndarray of shape (n, C_i, H_i, H_i), default=()
    batch_size : int, default=256
    device : torch.device or str, default="cpu"

    Returns
    -------
    scores : ndarray of shape (n,)
        Higher means more out-of-distribution. The decoder's train/eval mode is restored.
    """
    z = torch.as_tensor(np.asarray(features, dtype=np.float32))
    onehot = one_hot(pred, n_classes)
    skips = [torch.as_tensor(np.asarray(s, dtype=np.float32)) for s in skips]
    was_training = decoder.training
    decoder.to(device).eval()
    try:
        parts = [heatmap_scores(decoder(z[i:i + batch_size].to(device), onehot[i:i + batch_size].to(device),
                                        [s[i:i + batch_size].to(device) for s in skips]))
                 for i in range(0, len(z), batch_size)]
    finally:
        decoder.train(was_training)
    return np.concatenate(parts) if parts else np.empty(0)
