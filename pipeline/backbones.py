"""The seeds' backbones, with the module names their papers and checkpoints use.

Every constructor takes ``num_classes``, ``in_channels=3``, ``mean=None`` and
``std=None``; the first module is always ``normalize`` (a
:class:`pipeline.models.Normalize`), so a checkpoint carries its preprocessing.

CIFAR backbones (32x32 inputs), names as in OpenOOD v1.5 / LA-OOD:

- ``resnet18_cifar``, ``resnet34_cifar``: OpenOOD's ``ResNet18_32x32`` layout
  (``conv1``, ``bn1``, ``layer1``..``layer4``, ``avgpool``, ``fc``), built on
  :class:`pipeline.models.CifarResNet`. One difference in names: the projection
  shortcut is ``layerN.0.downsample`` (torchvision's name), where OpenOOD says
  ``layerN.0.shortcut``; :func:`map_openood_keys` renames it.
- ``vgg16_bn_cifar``: LA-OOD's ``VGG('VGG16')``: ``features`` (conv-bn-relu and
  max pools, indices as in LA-OOD, ending with its 1x1 ``AvgPool2d`` at
  ``features.44``), ``avgpool``, ``classifier`` (Linear 512-512-512-classes,
  with dropout) — about 15.2M parameters, of which 14.7M are in ``features``.
- ``densenet100_cifar``: DenseNet-BC-100, k=12, OpenOOD's ``DenseNet3``:
  ``conv1``, ``block1``, ``trans1``, ``block2``, ``trans2``, ``block3``,
  ``bn1`` (the final BN; OpenOOD's name), ``relu``, ``avgpool``, ``fc``.
- ``wrn40_2_cifar``: WRN-40-2, OpenOOD's ``WideResNet``: ``conv1``,
  ``block1``..``block3`` (each ``blockN.layer.i``), ``bn1``, ``relu``,
  ``avgpool``, ``fc``.

ImageNet backbones wrap torchvision: the model is a :class:`TorchvisionBackbone`
with ``normalize`` then ``net``, so torchvision's names carry the prefix
``net.``: ``net.layer4``, ``net.fc`` (ResNet-50), ``net.encoder.layers.encoder_layer_11``,
``net.heads.head`` (ViT-B/16).

The CIFAR backbones' ReLUs are never in-place, so a hooked output is not
overwritten later in the pass.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import ConfigError, DataError, invalid_param
from pipeline.models import CifarResNet, Normalize

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalize(in_channels, mean, std):
    mean = [0.0] * in_channels if mean is None else mean
    std = [1.0] * in_channels if std is None else std
    return Normalize(mean, std)


# ---------------------------------------------------------------- CIFAR ResNets

def resnet18_cifar(num_classes, in_channels=3, mean=None, std=None):
    """ResNet-18 for 32x32 inputs (OpenOOD ``ResNet18_32x32``), ~11.2M parameters."""
    return CifarResNet(num_classes, in_channels, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), mean=mean, std=std)


def resnet34_cifar(num_classes, in_channels=3, mean=None, std=None):
    """ResNet-34 for 32x32 inputs (same layout, blocks 3-4-6-3), ~21.3M parameters."""
    return CifarResNet(num_classes, in_channels, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), mean=mean, std=std)


# ---------------------------------------------------------------- VGG-16-BN

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """VGG-16 with BN for 32x32 inputs, LA-OOD's layout (see the module docstring)."""

    def __init__(self, num_classes, in_channels=3, mean=None, std=None):
        super().__init__()
        self.normalize = _normalize(in_channels, mean, std)
        layers, channels = [], in_channels
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        layers.append(nn.AvgPool2d(1, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(), nn.Dropout(),
            nn.Linear(512, 512), nn.ReLU(), nn.Dropout(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(self.normalize(x)))
        return self.classifier(torch.flatten(x, 1))


def vgg16_bn_cifar(num_classes, in_channels=3, mean=None, std=None):
    """VGG-16-BN for 32x32 inputs (LA-OOD ``cifar10-vgg16``)."""
    return VGG16BN(num_classes, in_channels, mean, std)


# ---------------------------------------------------------------- DenseNet-BC

class _DenseBottleneck(nn.Module):
    """BN-ReLU-conv1x1 (4k) then BN-ReLU-conv3x3 (k), concatenated to the input."""

    def __init__(self, in_planes, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class _Transition(nn.Module):
    """BN-ReLU-conv1x1 then 2x2 average pooling."""

    def __init__(self, in_planes, out_planes):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)


class _DenseBlock(nn.Module):
    def __init__(self, n_layers, in_planes, growth):
        super().__init__()
        self.layer = nn.Sequential(*[_DenseBottleneck(in_planes + i * growth, growth) for i in range(n_layers)])

    def forward(self, x):
        return self.layer(x)


class DenseNet3(nn.Module):
    """DenseNet-BC (Huang et al. 2017) for 32x32 inputs, OpenOOD's ``DenseNet3`` names.

    Parameters
    ----------
    num_classes, in_channels : int
    mean, std : sequence of float, optional
    depth : int
        100 for DenseNet-BC-100: (depth - 4) / 6 bottleneck layers per block.
    growth_rate : int
    reduction : float
        Channel compression of the transitions.
    """

    def __init__(self, num_classes, in_channels=3, mean=None, std=None, depth=100, growth_rate=12, reduction=0.5):
        super().__init__()
        n = (depth - 4) // 6
        planes = 2 * growth_rate
        self.normalize = _normalize(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        for i in (1, 2, 3):
            self.add_module(f"block{i}", _DenseBlock(n, planes, growth_rate))
            planes += n * growth_rate
            if i < 3:
                self.add_module(f"trans{i}", _Transition(planes, int(math.floor(planes * reduction))))
                planes = int(math.floor(planes * reduction))
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.conv1(self.normalize(x))
        x = self.trans2(self.block2(self.trans1(self.block1(x))))
        x = self.relu(self.bn1(self.block3(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def densenet100_cifar(num_classes, in_channels=3, mean=None, std=None):
    """DenseNet-BC-100, growth 12, ~0.77M parameters."""
    return DenseNet3(num_classes, in_channels, mean, std, depth=100, growth_rate=12)


# ---------------------------------------------------------------- WideResNet

class _WideBlock(nn.Module):
    """Pre-activation basic block of a WideResNet (OpenOOD names: ``convShortcut``)."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class _NetworkBlock(nn.Module):
    def __init__(self, n_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[
            _WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n_layers)
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016), OpenOOD's ``WideResNet`` names.

    Parameters
    ----------
    num_classes, in_channels : int
    mean, std : sequence of float, optional
    depth : int
        6n + 4; n blocks per stage.
    widen_factor : int
    """

    def __init__(self, num_classes, in_channels=3, mean=None, std=None, depth=40, widen_factor=2):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = _normalize(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn40_2_cifar(num_classes, in_channels=3, mean=None, std=None):
    """WRN-40-2, ~2.2M parameters."""
    return WideResNet(num_classes, in_channels, mean, std, depth=40, widen_factor=2)


# ---------------------------------------------------------------- torchvision

class TorchvisionBackbone(nn.Module):
    """``normalize`` then a torchvision classifier kept whole as ``net``.

    Layer names carry the prefix ``net.`` (``net.layer4``, ``net.fc``).
    """

    def __init__(self, net, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x):
        return self.net(self.normalize(x))


def _torchvision_backbone(name, builder, weights_enum, head_path, *, num_classes, in_channels, mean, std,
                          weights, weights_path):
    if in_channels != 3:
        raise invalid_param("in_channels", name, "3 (an RGB ImageNet backbone)", in_channels)
    if weights is not None and weights_path is not None:
        raise ConfigError(f"{name} takes either 'weights' (a torchvision weights name) or 'weights_path' "
                          f"(a local state_dict), not both. Got {weights!r} and {weights_path!r}.")
    enum_weights = _weights_by_name(name, weights_enum, weights) if weights is not None else None
    net = builder(weights=enum_weights)
    if num_classes != _head(net, head_path).out_features:
        log.info("%s: replacing the %d-way head by a fresh %d-way one", name, _head(net, head_path).out_features,
                 num_classes)
        _set_head(net, head_path, nn.Linear(_head(net, head_path).in_features, num_classes))
    model = TorchvisionBackbone(net, IMAGENET_MEAN if mean is None else mean, IMAGENET_STD if std is None else std)
    if weights_path is not None:
        load_weights(model, weights_path)
    return model


def _weights_by_name(name, weights_enum, weights):
    valid = [w.name for w in weights_enum] + ["DEFAULT"]
    if weights not in valid:
        raise invalid_param("weights", name, f"one of {valid} or None", weights,
                            hint="give a local state_dict file as 'weights_path' instead to stay offline.")
    return weights_enum[weights] if weights != "DEFAULT" else weights_enum.DEFAULT


def _head(net, path):
    return net.get_submodule(path)


def _set_head(net, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def resnet50_imagenet(num_classes=1000, in_channels=3, mean=None, std=None, weights=None, weights_path=None):
    """torchvision ResNet-50 behind ImageNet normalisation; names ``net.layer1``..``net.fc``.

    Parameters
    ----------
    num_classes : int
        Not 1000: the pretrained ``fc`` is replaced by a fresh one.
    in_channels : int
        Must be 3.
    mean, std : sequence of float, optional
        ImageNet statistics if omitted.
    weights : str, optional
        A ``ResNet50_Weights`` name (``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``,
        ``"DEFAULT"``); torchvision downloads it on first use. None = random init.
    weights_path : str or Path, optional
        A local state_dict (torchvision's names, or ours with ``net.``), see
        :func:`load_weights`.
    """
    import torchvision  # seconds (torch._dynamo, via torchvision.ops): only where a torchvision model is built

    return _torchvision_backbone("resnet50_imagenet", torchvision.models.resnet50,
                                 torchvision.models.ResNet50_Weights, "fc", num_classes=num_classes,
                                 in_channels=in_channels, mean=mean, std=std, weights=weights,
                                 weights_path=weights_path)


def vit_b16_imagenet(num_classes=1000, in_channels=3, mean=None, std=None, weights=None, weights_path=None):
    """torchvision ViT-B/16 (224x224) behind ImageNet normalisation; names ``net.encoder...``, ``net.heads.head``.

    Same parameters as :func:`resnet50_imagenet`, with ``ViT_B_16_Weights`` names.
    """
    import torchvision

    return _torchvision_backbone("vit_b16_imagenet", torchvision.models.vit_b_16,
                                 torchvision.models.ViT_B_16_Weights, "heads.head", num_classes=num_classes,
                                 in_channels=in_channels, mean=mean, std=std, weights=weights,
                                 weights_path=weights_path)


# ---------------------------------------------------------------- weights

def map_openood_keys(state_dict: dict) -> dict:
    """Rename the keys of an OpenOOD v1.5 ``ResNet18_32x32`` state_dict to ours.

    Done, in this order, on every key:

    1. strip leading ``module.`` (DataParallel), repeatedly;
    2. strip a leading ``backbone.``;
    3. a leading ``linear.`` becomes ``fc.``;
    4. ``.shortcut.`` becomes ``.downsample.`` (OpenOOD's BasicBlock name).

    Nothing else: OpenOOD normalises in its data pipeline, so its checkpoints
    have no ``normalize.*`` buffers; :func:`load_weights` keeps the model's own.
    """
    mapped = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        key = key.removeprefix("backbone.")
        if key.startswith("linear."):
            key = "fc." + key[len("linear."):]
        mapped[key.replace(".shortcut.", ".downsample.")] = value
    return mapped


def load_state(model, state_dict: dict, source="the state_dict"):
    """``model.load_state_dict(state_dict, strict=True)``, failing with a :class:`DataError`.

    The message lists the missing and the unexpected keys (first 10 of each).
    """
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        expected = set(model.state_dict())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if not missing and not unexpected:
            raise DataError(f"{source} does not fit {type(model).__name__}: {str(err).splitlines()[-1].strip()}") from err
        raise DataError(f"{source} does not fit {type(model).__name__}: missing keys {missing[:10]}, unexpected "
                        f"keys {unexpected[:10]}. Hint: an OpenOOD checkpoint needs train.openood_keys: true (openood=True).") from err
    return model


def load_weights(model, path, *, openood=False):
    """Load a local state_dict file into ``model`` (``torch.load(weights_only=True)``).

    Parameters
    ----------
    model : nn.Module
        A backbone of this module (or any module).
    path : str or Path
        A state_dict, or a dict holding one under ``"state_dict"`` (a layerscope
        checkpoint). For a :class:`TorchvisionBackbone`, keys without the
        ``net.`` prefix (torchvision's own state_dicts) go into ``model.net``.
    openood : bool
        Rename the keys with :func:`map_openood_keys` first.

    Missing ``normalize.mean``/``normalize.std`` keep the model's own values.
    """
    from pipeline.files import load_torch

    path = Path(path)
    state = load_torch(path, "Weights file", "point train.checkpoint at a state_dict saved with "
                       "torch.save(model.state_dict(), path).")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"Weights file '{path}' does not hold a state_dict (got {type(state).__name__}).")
    state = map_openood_keys(state) if openood else dict(state)
    if isinstance(model, TorchvisionBackbone) and not any(k.startswith("net.") for k in state):
        load_state(model.net, state, source=f"Weights file '{path}'")
        return model
    for key, value in model.state_dict().items():
        if key.startswith("normalize."):
            state.setdefault(key, value)
    return load_state(model, state, source=f"Weights file '{path}'")


# ---------------------------------------------------------------- registries

BACKBONES = {
    "resnet18_cifar": resnet18_cifar,
    "resnet34_cifar": resnet34_cifar,
    "vgg16_bn_cifar": vgg16_bn_cifar,
    "densenet100_cifar": densenet100_cifar,
    "wrn40_2_cifar": wrn40_2_cifar,
    "resnet50_imagenet": resnet50_imagenet,
    "vit_b16_imagenet": vit_b16_imagenet,
}

# Backbones that bring their own input normalisation (ImageNet's) when train.mean is unset.
OWN_NORMALISATION = frozenset({"resnet50_imagenet", "vit_b16_imagenet"})

_VIT_BLOCKS = [f"net.encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)]

#: Block-level layer sets, NAC style (stage outputs, then the pooled feature).
#: LA-OOD's "every conv" set is :func:`conv_layers` of the built model.
DEFAULT_LAYERS = {
    "resnet18_cifar": ["layer1", "layer2", "layer3", "layer4", "avgpool"],
    "resnet34_cifar": ["layer1", "layer2", "layer3", "layer4", "avgpool"],
    "vgg16_bn_cifar": ["features.6", "features.13", "features.23", "features.33", "features.43", "avgpool"],
    "densenet100_cifar": ["trans1", "trans2", "block3", "avgpool"],
    "wrn40_2_cifar": ["block1", "block2", "block3", "avgpool"],
    "resnet50_imagenet": ["net.layer1", "net.layer2", "net.layer3", "net.layer4", "net.avgpool"],
    "vit_b16_imagenet": [*_VIT_BLOCKS, "net.encoder.ln"],
}

#: The final Linear of each backbone (the ``head`` of extraction, e.g. for NAC-UE gradients).
HEADS = {
    "resnet18_cifar": "fc", "resnet34_cifar": "fc", "vgg16_bn_cifar": "classifier.6",
    "densenet100_cifar": "fc", "wrn40_2_cifar": "fc", "resnet50_imagenet": "net.fc",
    "vit_b16_imagenet": "net.heads.head",
}


def conv_layers(model) -> list[str]:
    """Dotted names of every ``Conv2d`` of ``model``, in network order (LA-OOD's layer set).

    This is registration order, which for every backbone here is also the
    order in which the convolutions run (the tests check it).
    """
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
