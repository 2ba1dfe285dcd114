import numpy as np
import pytest
import torch

from pipeline.datasets import ImageSplit
from pipeline.errors import ConfigError, DataError
from pipeline.models import (build_model, file_sha256, init_model, load_checkpoint, predict, resolve_device,
                             save_checkpoint, train_model)
from pipeline.userdata import SplitDataset
from tests.conftest import TINY_SPEC


def test_named_blocks_match_a_resnet(tiny_model):
    names = {name for name, _ in tiny_model.named_modules()}
    assert {"layer1", "layer2", "layer1.0.conv2", "avgpool", "fc"} <= names
    assert tiny_model(torch.zeros(5, 1, 8, 8)).shape == (5, 3)


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = init_model(TINY_SPEC, seed=1), init_model(TINY_SPEC, seed=1)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, init_model(TINY_SPEC, seed=2).conv1.weight)
    assert torch.equal(state, torch.random.get_rng_state())


def test_unknown_arch_and_mismatched_blocks():
    with pytest.raises(ConfigError, match=r"'train.arch' .* one of \[.*'cifar_resnet'.*'wrn40_2_cifar'\]. Got 'vgg99'"):
        build_model({**TINY_SPEC, "arch": "vgg99"})
    with pytest.raises(ConfigError, match=r"'train.blocks' .* as long as train.widths"):
        build_model({**TINY_SPEC, "blocks": [1]})


def test_training_learns_a_separable_task(rng):
    # class = which half of the image is bright: a tiny net must learn it
    y = rng.integers(0, 2, 64)
    x = rng.random((64, 1, 8, 8)).astype("f4") * 0.2
    x[y == 0, :, :4] += 0.8
    x[y == 1, :, 4:] += 0.8
    split = ImageSplit("id_train", x, y.astype(np.int64), {})
    model = init_model({**TINY_SPEC, "num_classes": 2}, seed=0)
    history = train_model(model, SplitDataset(split), epochs=8, batch_size=16, lr=0.05, seed=0)
    assert history[-1] < history[0]
    assert (predict(model, SplitDataset(split)) == y).mean() > 0.9
    assert not model.training


def _trained_under(outer_threads, rng_seed=0, **kwargs):
    """A tiny model trained one epoch while this process's torch pool has ``outer_threads`` threads."""
    rng = np.random.default_rng(rng_seed)
    split = ImageSplit("id_train", rng.random((256, 1, 16, 16)).astype("f4"), rng.integers(0, 2, 256), {})
    torch.set_num_threads(outer_threads)
    model = init_model({**TINY_SPEC, "num_classes": 2}, seed=0)
    train_model(model, SplitDataset(split), epochs=1, batch_size=128, lr=0.05, seed=0, **kwargs)
    return model.state_dict(), torch.get_num_threads()


def test_training_gives_the_same_weights_whatever_threads_the_machine_has_free():
    # compute.threads sizes the pool from the free cores; training pins its own count (train.threads)
    one, pool_after_one = _trained_under(1)
    two, pool_after_two = _trained_under(2)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert (pool_after_one, pool_after_two) == (1, 2)  # the stage's pool is given back
    # the pin is what makes them equal: a backward pass sums per thread, so the count is part of the result
    on_two, _ = _trained_under(2, threads=2)
    assert not all(torch.equal(one[k], on_two[k]) for k in one)


def test_checkpoint_round_trip(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model, TINY_SPEC, tmp_path / "m.pt")
    loaded, spec = load_checkpoint(path)
    assert spec == TINY_SPEC
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded(x), tiny_model(x))
    assert file_sha256(path) == file_sha256(path) and len(file_sha256(path)) == 64


def test_bad_checkpoints(tmp_path):
    with pytest.raises(DataError, match=r"Checkpoint .* does not exist.*layerscope train"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"not a layerscope checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_device_auto_and_unavailable_cuda():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"CUDA is not available"):
            resolve_device("cuda")


def test_seed_backbones_build_and_round_trip_through_a_checkpoint(tmp_path):
    spec = {"arch": "wrn40_2_cifar", "num_classes": 10}
    model = init_model(spec, seed=0).eval()
    path = save_checkpoint(model, spec, tmp_path / "wrn.pt")
    loaded, _ = load_checkpoint(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x)) and model(x).shape == (2, 10)
