"""The seeds' backbones: layouts (names, shapes, parameter counts) and weight loading.

No test downloads anything: torchvision backbones are built with weights=None.
"""

import pytest
import torch
from torch import nn

from pipeline.backbones import (BACKBONES, DEFAULT_LAYERS, HEADS, conv_layers, load_state, load_weights,
                                map_openood_keys, resnet18_cifar, resnet50_imagenet, vit_b16_imagenet)
from pipeline.errors import ConfigError, DataError
from pipeline.extract import layer_shapes

# name: (expected module names, first conv, last conv, parameters with 10 classes in literature)
CIFAR = {
    "resnet18_cifar": ({"conv1", "bn1", "layer1", "layer4", "layer4.1.conv2", "avgpool", "fc"},
                       "conv1", "layer4.1.conv2", 11.17e6),
    "resnet34_cifar": ({"conv1", "layer4", "layer3.5.conv2", "avgpool", "fc"}, "conv1", "layer4.2.conv2", 21.28e6),
    # LA-OOD's VGG-16: 14.7M in `features` plus a 512-512-512-10 MLP
    "vgg16_bn_cifar": ({"features", "features.0", "features.43", "avgpool", "classifier", "classifier.6"},
                       "features.0", "features.40", 15.25e6),
    "densenet100_cifar": ({"conv1", "block1", "trans1", "block2", "trans2", "block3", "bn1", "avgpool", "fc"},
                          "conv1", "block3.layer.15.conv2", 0.77e6),
    "wrn40_2_cifar": ({"conv1", "block1", "block2", "block3", "block3.layer.5", "bn1", "avgpool", "fc"},
                      "conv1", "block3.layer.5.conv2", 2.24e6),
}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def cifar_models():
    torch.manual_seed(0)
    return {name: BACKBONES[name](10).eval() for name in CIFAR}


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_backbone_layout(cifar_models, name):
    model = cifar_models[name]
    names, first_conv, last_conv, literature = CIFAR[name]
    assert next(iter(model.named_children()))[0] == "normalize"
    assert names <= {n for n, _ in model.named_modules()}
    with torch.inference_mode():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    shapes = layer_shapes(model, (3, 32, 32))
    assert set(DEFAULT_LAYERS[name]) <= set(shapes)
    assert shapes[HEADS[name]] == (10,) and isinstance(model.get_submodule(HEADS[name]), nn.Linear)
    assert n_params(model) == pytest.approx(literature, rel=0.02)


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_conv_layers_are_every_conv_in_execution_order(cifar_models, name):
    model = cifar_models[name]
    convs = conv_layers(model)
    executed = [n for n in layer_shapes(model, (3, 32, 32)) if isinstance(model.get_submodule(n), nn.Conv2d)]
    assert convs == executed
    assert (convs[0], convs[-1]) == CIFAR[name][1:3]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_vgg_features_match_the_literature_count(cifar_models):
    assert n_params(cifar_models["vgg16_bn_cifar"].features) == pytest.approx(14.7e6, rel=0.01)


def test_normalize_is_applied_first():
    torch.manual_seed(0)
    plain = resnet18_cifar(4).eval()
    shifted = resnet18_cifar(4, mean=[0.5] * 3, std=[2.0] * 3).eval()
    shifted.load_state_dict({**plain.state_dict(), "normalize.mean": shifted.normalize.mean,
                             "normalize.std": shifted.normalize.std})
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(shifted(x), plain((x - 0.5) / 2.0), atol=1e-5)


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return resnet50_imagenet(num_classes=5).eval()


def test_resnet50_names_and_forward(resnet50):
    names = {n for n, _ in resnet50.named_modules()}
    assert set(DEFAULT_LAYERS["resnet50_imagenet"]) | {"normalize", "net.fc", "net.layer4.2.conv3"} <= names
    assert torch.allclose(resnet50.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    with torch.inference_mode():
        assert resnet50(torch.rand(1, 3, 224, 224)).shape == (1, 5)
    assert conv_layers(resnet50)[0] == "net.conv1" and conv_layers(resnet50)[-1] == "net.layer4.2.conv3"


def test_vit_names_and_head():
    vit = vit_b16_imagenet(num_classes=7)
    names = {n for n, _ in vit.named_modules()}
    assert set(DEFAULT_LAYERS["vit_b16_imagenet"]) | {"net.conv_proj", HEADS["vit_b16_imagenet"]} <= names
    assert vit.net.heads.head.out_features == 7
    assert conv_layers(vit) == ["net.conv_proj"]


def test_local_state_dict_round_trip(tmp_path, resnet50):
    # torchvision's own names (no "net." prefix), as a pre-downloaded file would have them
    torch.save(resnet50.net.state_dict(), tmp_path / "r50.pth")
    loaded = resnet50_imagenet(num_classes=5, weights_path=tmp_path / "r50.pth").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), resnet50(x))


def test_unknown_weights_name_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"'weights' parameter of resnet50_imagenet .*IMAGENET1K_V2.* "
                                          r"Got 'IMAGENET9K' instead") as info:
        resnet50_imagenet(weights="IMAGENET9K")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not both"):
        resnet50_imagenet(weights="IMAGENET1K_V2", weights_path="x.pth")


def test_missing_weights_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_weights(resnet18_cifar(10), tmp_path / "none.pth")


def test_map_openood_keys_loads_strict(tmp_path):
    torch.manual_seed(0)
    source = resnet18_cifar(10).eval()
    # OpenOOD ResNet18_32x32 under DataParallel: module. prefix, shortcut names, no normalize buffers
    openood = {"module." + k.replace(".downsample.", ".shortcut."): v
               for k, v in source.state_dict().items() if not k.startswith("normalize.")}
    mapped = map_openood_keys(openood)
    assert "layer2.0.downsample.0.weight" in mapped and not any(k.startswith("module.") for k in mapped)
    assert map_openood_keys({"backbone.linear.weight": 1}) == {"fc.weight": 1}

    torch.save(openood, tmp_path / "openood.ckpt")
    target = load_weights(resnet18_cifar(10), tmp_path / "openood.ckpt", openood=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(target(x), source(x))
    prefixed = {"module." + k: v for k, v in source.state_dict().items()}
    load_state(resnet18_cifar(10), map_openood_keys(prefixed))


def test_wrong_key_is_a_data_error_naming_it():
    state = resnet18_cifar(10).state_dict()
    state["layer9.weight"] = state.pop("fc.weight")
    with pytest.raises(DataError, match=r"missing keys \['fc.weight'\], unexpected keys \['layer9.weight'\]"):
        load_state(resnet18_cifar(10), state)
