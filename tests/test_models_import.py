"""Tests of pipeline.models' augmentation, model specs and weight import: the
augmentation is checked against brute force, an OpenOOD-style checkpoint is
written with torch.save and imported back, and the spec records its origin."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.backbones import resnet18_cifar
from pipeline.config import TrainConfig, build_config
from pipeline.errors import ConfigError, DataError
from pipeline.models import (augment_batch, file_sha256, import_model, init_model, load_checkpoint, model_spec,
                             save_checkpoint, train_model)
from pipeline.userdata import SplitDataset
from tests.conftest import TINY_SPEC

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


# ------------------------------------------------------------------ augment_batch

def _images(n=16, c=3, side=8, seed=0):
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed))


def _crops(x, pad):
    """Every (row, col, flipped) crop of the zero-padded ``x`` (C, S, S)."""
    padded = F.pad(x, (pad, pad, pad, pad))
    side = x.shape[-1]
    for row in range(2 * pad + 1):
        for col in range(2 * pad + 1):
            crop = padded[:, row:row + side, col:col + side]
            yield (row, col, False), crop
            yield (row, col, True), crop.flip(-1)


def _which_crop(out, x, pad):
    """The (row, col, flipped) crops that ``out`` equals exactly."""
    return [key for key, crop in _crops(x, pad) if torch.equal(out, crop)]


def test_augment_keeps_the_shape_and_is_seeded():
    x = _images()
    out = augment_batch(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(4)))
    assert not torch.equal(out, x)


def test_every_augmented_image_is_a_crop_of_the_padded_input():
    x = _images(n=24)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    found = []
    for i in range(8):
        matches = _which_crop(out[i], x[i], pad=4)
        assert len(matches) == 1, (i, matches)  # random pixels: one crop only can match
        found.append(matches[0])
    assert len({key[:2] for key in found}) > 1  # offsets vary between images
    assert {key[2] for key in found} == {False, True}  # some flipped, some not
    assert any(key[:2] != (4, 4) for key in found)  # not only the centred crop


def test_a_crop_off_the_centre_brings_in_zero_padding():
    x = _images(n=32) + 0.5  # no zero pixel in the input: zeros come from the padding only
    out = augment_batch(x, torch.Generator().manual_seed(1))
    centred = [torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1)) for i in range(32)]
    assert not all(centred)
    for i in range(32):
        (row, col, _), = _which_crop(out[i], x[i], pad=4)
        assert ((out[i] == 0).any().item()) == ((row, col) != (4, 4))


def test_without_padding_the_only_change_is_a_flip():
    x = _images(n=32)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=0)
    flipped = []
    for i in range(32):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
        flipped.append(torch.equal(out[i], x[i].flip(-1)))
    assert 0 < sum(flipped) < 32


# ------------------------------------------------------------------ train_model(augment=True)

def _train(dataset, augment, seed=0):
    model = init_model(TINY_SPEC, seed=0)
    history = train_model(model, dataset, epochs=2, batch_size=16, lr=0.05, seed=seed, augment=augment)
    return model.state_dict(), history


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_with_augmentation_is_deterministic(tiny_splits):
    dataset = SplitDataset(tiny_splits["id_train"])
    state, history = _train(dataset, augment=True)
    again, history_again = _train(dataset, augment=True)
    assert len(history) == 2 and all(np.isfinite(history))
    assert history == history_again and _equal_states(state, again)
    plain, _ = _train(dataset, augment=False)
    assert not _equal_states(state, plain)  # augmentation did change what the model saw
    reseeded, _ = _train(dataset, augment=True, seed=1)
    assert not _equal_states(state, reseeded)


# ------------------------------------------------------------------ model_spec

def _train_cfg(**values):
    return build_config(TrainConfig, values, "train")


def test_model_spec_sizes_only_the_cifar_resnet():
    spec = model_spec(_train_cfg(widths=[8, 16], blocks=[2, 1]), num_classes=4, in_channels=1,
                      mean=[0.3], std=[0.2])
    assert spec == {"arch": "cifar_resnet", "num_classes": 4, "in_channels": 1, "mean": [0.3], "std": [0.2],
                    "widths": [8, 16], "blocks": [2, 1]}
    init_model(spec, seed=0)  # buildable as it is
    spec = model_spec(_train_cfg(arch="resnet18_cifar", widths=[8, 16], blocks=[2, 1]), num_classes=10,
                      in_channels=3, mean=MEAN, std=STD)
    assert spec == {"arch": "resnet18_cifar", "num_classes": 10, "in_channels": 3, "mean": MEAN, "std": STD}


def test_model_spec_params_override_the_data_statistics():
    cfg = _train_cfg(mean=[0.5, 0.5, 0.5], std=[0.1, 0.2, 0.3])
    spec = model_spec(cfg, num_classes=10, in_channels=3, mean=MEAN, std=STD)
    assert spec["mean"] == [0.5, 0.5, 0.5] and spec["std"] == [0.1, 0.2, 0.3]
    assert isinstance(spec["mean"], list)  # JSON- and weights_only-friendly, not a tuple
    unset = model_spec(_train_cfg(arch="resnet50_imagenet"), num_classes=1000, in_channels=3)
    assert unset["mean"] is None and unset["std"] is None


# ------------------------------------------------------------------ import_model

RESNET18_SPEC = {"arch": "resnet18_cifar", "num_classes": 10, "in_channels": 3, "mean": MEAN, "std": STD}


@pytest.fixture(scope="module")
def openood_checkpoint(tmp_path_factory):
    """A ResNet-18 saved the way OpenOOD v1.5 saves it; returns (path, our state_dict)."""
    torch.manual_seed(0)
    source = resnet18_cifar(num_classes=10)
    with torch.no_grad():  # non-default BN statistics, so that the buffers are checked too
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    openood = {}
    for key, value in state.items():
        if key.startswith("normalize."):
            continue  # OpenOOD normalises in its data pipeline
        if key.startswith("fc."):
            key = "linear." + key[len("fc."):]
        openood["module." + key.replace(".downsample.", ".shortcut.")] = value
    assert any(".shortcut." in k for k in openood) and "module.linear.weight" in openood
    path = tmp_path_factory.mktemp("openood") / "resnet18_cifar10.ckpt"
    torch.save(openood, path)
    return path, state


def test_import_an_openood_checkpoint(openood_checkpoint):
    path, state = openood_checkpoint
    model, spec = import_model(dict(RESNET18_SPEC), checkpoint=path, openood_keys=True)
    assert not model.training
    imported = model.state_dict()
    for key, value in state.items():
        if not key.startswith("normalize."):
            assert torch.equal(imported[key], value), key
    # the checkpoint has no normalisation: the model keeps the spec's
    assert torch.equal(imported["normalize.mean"].flatten(), torch.tensor(MEAN))
    assert torch.equal(imported["normalize.std"].flatten(), torch.tensor(STD))
    assert spec == {**RESNET18_SPEC, "origin": {"checkpoint": str(path), "sha256": file_sha256(path),
                                                "openood_keys": True}}
    assert len(spec["origin"]["sha256"]) == 64


def test_an_imported_model_round_trips_through_a_checkpoint(openood_checkpoint, tmp_path):
    path, _ = openood_checkpoint
    model, spec = import_model(dict(RESNET18_SPEC), checkpoint=path, openood_keys=True)
    saved = save_checkpoint(model, spec, tmp_path / "model.pt")
    loaded, loaded_spec = load_checkpoint(saved)
    assert loaded_spec == spec and loaded_spec["origin"]["sha256"] == file_sha256(path)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_an_openood_checkpoint_needs_openood_keys(openood_checkpoint):
    path, _ = openood_checkpoint
    with pytest.raises(DataError, match=r"does not fit CifarResNet: missing keys \[.*'conv1.weight'.*\], unexpected "
                                        r"keys \[.*'module.conv1.weight'.*openood"):
        import_model(dict(RESNET18_SPEC), checkpoint=path)


def test_a_missing_checkpoint_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"Weights file .*none.pt' does not exist"):
        import_model(dict(RESNET18_SPEC), checkpoint=tmp_path / "none.pt", openood_keys=True)


def test_torchvision_weights_are_refused_for_cifar_backbones():
    spec = model_spec(_train_cfg(), num_classes=3, in_channels=1)
    with pytest.raises(ConfigError, match=r"'train.weights' parameter of train must be null for this architecture.*"
                                          r"Got 'IMAGENET1K_V1'.*train.checkpoint"):
        import_model(spec, weights="IMAGENET1K_V1")


# ------------------------------------------------------------------ TrainConfig

def test_train_config_pretrained():
    assert not _train_cfg().pretrained
    assert _train_cfg(checkpoint="x.ckpt").pretrained and _train_cfg(weights="IMAGENET1K_V2").pretrained
    assert _train_cfg(checkpoint="x.ckpt", openood_keys=True).openood_keys


@pytest.mark.parametrize("values, message", [
    ({"checkpoint": "x.ckpt", "weights": "IMAGENET1K_V1"},
     r"'train.weights' parameter of train must be null when train.checkpoint is set\. Got 'IMAGENET1K_V1'"),
    ({"mean": [0.5, 0.5, 0.5]}, r"'train.std' parameter of train must be set together with train.mean"),
    ({"std": [0.2]}, r"'train.mean' parameter of train must be set together"),
    ({"openood_keys": "yes"}, r"'train.openood_keys' parameter of params.yaml must be of type bool"),
    ({"augment": 1}, r"'train.augment' parameter of params.yaml must be of type bool"),
])
def test_train_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        _train_cfg(**values)
