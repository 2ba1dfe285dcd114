import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.extract import (LayerRecorder, Plan, energy, extract_to_store, hookable_layers, layer_shapes, pool,
                              resolve_layers)
from pipeline.store import StoreWriter, open_store
from pipeline.userdata import SplitDataset


def test_pool_means_over_space_and_tokens_and_keeps_vectors():
    x = torch.arange(16, dtype=torch.float32).view(1, 2, 2, 4)
    assert pool(x).tolist() == [[3.5, 11.5]]
    tokens = x[0]  # read as (n=2, T=2, D=4): mean over the two tokens
    assert pool(tokens).tolist() == [[2.0, 3.0, 4.0, 5.0], [10.0, 11.0, 12.0, 13.0]]
    v = torch.tensor([[1.0, 2.0]])
    assert pool(v) is v


def test_energy_is_negative_logsumexp_of_the_full_map():
    x = torch.zeros(2, 3, 2, 2)  # 12 zeros per sample: logsumexp = log(12)
    np.testing.assert_allclose(energy(x).numpy(), [-np.log(12)] * 2, rtol=1e-6)


def test_layer_shapes_follow_execution_order(tiny_model):
    shapes = layer_shapes(tiny_model, (1, 8, 8))
    names = list(shapes)
    assert names.index("layer1") < names.index("layer2") < names.index("avgpool") < names.index("fc")
    assert shapes["layer1"] == (4, 8, 8) and shapes["layer2"] == (8, 4, 4) and shapes["fc"] == (3,)
    assert set(hookable_layers(tiny_model)) == set(shapes)


def test_resolve_layers_sorts_into_network_order(tiny_model):
    assert resolve_layers(tiny_model, ["fc", "layer1", "layer2.0.conv1"], (1, 8, 8)) == ["layer1", "layer2.0.conv1", "fc"]


def test_unknown_layer_lists_the_valid_ones(tiny_model):
    with pytest.raises(ConfigError, match=r"extract.layers.*Got 'layer9'.*valid names are \[.*'layer1'.*layerscope layers"):
        resolve_layers(tiny_model, ["layer9"], (1, 8, 8))


def test_recorder_removes_its_hooks(tiny_model):
    with LayerRecorder(tiny_model, Plan(("layer1", "fc"), head="fc")) as rec:
        tiny_model(torch.zeros(2, 1, 8, 8))
        assert rec.pooled["layer1"].shape == (2, 4)
    assert not tiny_model.layer1._forward_hooks and not tiny_model.fc._forward_hooks
    assert not tiny_model.fc._forward_pre_hooks


def test_extract_to_store_matches_a_direct_forward_pass(tiny_model, tiny_splits, store_path):
    layers = ["layer1", "layer2", "fc"]
    splits = {name: (SplitDataset(s), s.attrs) for name, s in tiny_splits.items()}
    with StoreWriter(store_path, "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(tiny_model, splits, Plan(tuple(layers)), writer, batch_size=3)
        writer.finalize({"checkpoint_sha256": "abc"}, layers)
    store = open_store(store_path)
    x = torch.from_numpy(tiny_splits["id_train"].images)
    with torch.inference_mode():
        logits = tiny_model(x)
        act1 = tiny_model.layer1(torch.relu(tiny_model.bn1(tiny_model.conv1(tiny_model.normalize(x)))))
    np.testing.assert_allclose(store.to_numpy("id_train", "logits"), logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.to_numpy("id_train", "layer1"), act1.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.to_numpy("id_train", "energy")[:, 0], energy(act1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(store.to_numpy("id_train", "fc"), logits.numpy(), rtol=1e-5, atol=1e-6)
    assert (store.to_numpy("id_train", "pred") == logits.argmax(1).numpy()).all()
    assert (store.to_numpy("id_train", "label") == tiny_splits["id_train"].labels).all()
    assert store.array("id_train", "layer2").attrs["pooling"] == "mean_hw"


def test_float16_store_halves_feature_bytes(tiny_model, tiny_splits, tmp_path):
    layers = ["layer1", "fc"]
    splits = {name: (SplitDataset(s), s.attrs) for name, s in tiny_splits.items()}
    stores = {}
    for dtype in ("float32", "float16"):
        with StoreWriter(tmp_path / f"{dtype}.zarr", dtype) as writer:
            extract_to_store(tiny_model, splits, Plan(tuple(layers)), writer, dtype=dtype)
            writer.finalize({}, layers)
        stores[dtype] = open_store(tmp_path / f"{dtype}.zarr")
    half, full = stores["float16"].to_numpy("id_train", "layer1"), stores["float32"].to_numpy("id_train", "layer1")
    assert half.dtype == np.float16 and full.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=1e-3, atol=1e-3)
    assert stores["float16"].to_numpy("id_train", "logits").dtype == np.float32  # logits stay exact


def test_extract_stage_records_provenance(tiny_model, tiny_splits, tmp_path):
    import yaml

    import pipeline
    from pipeline.datasets import ImageSplit, read_manifest, write_benchmark
    from pipeline.models import file_sha256, save_checkpoint
    from stages import extract as stage
    from tests.conftest import TINY_SPEC

    extra = {"source": "noise", "image_size": 8}
    write_benchmark([ImageSplit(s.name, s.images, s.labels, {**extra, **s.attrs, "n_samples": len(s.labels)})
                     for s in tiny_splits.values()], tmp_path / "data")
    save_checkpoint(tiny_model, TINY_SPEC, tmp_path / "m.pt")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"extract": {"layers": ["fc", "layer1"], "device": "cpu"}}))
    stage.run(tmp_path / "p.yaml", tmp_path / "data", tmp_path / "m.pt", tmp_path / "s.zarr")
    prov = open_store(tmp_path / "s.zarr").provenance
    assert prov["checkpoint_sha256"] == file_sha256(tmp_path / "m.pt")
    manifest = read_manifest(tmp_path / "data")
    assert prov["data"] == {name: entry["fingerprint"] for name, entry in manifest["splits"].items()}
    assert prov["layers"] == ["layer1", "fc"] and "mean over H,W" in prov["pooling"]
    assert prov["versions"]["layerscope"] == pipeline.__version__ and {"torch", "zarr"} <= set(prov["versions"])
    assert "created" not in prov  # no clock in the store: same inputs, same bytes (issue 14)
    assert open_store(tmp_path / "s.zarr").split_attrs("id_val")["fingerprint"] == manifest["splits"]["id_val"]["fingerprint"]


def test_gradients_penultimate_and_head_are_stored(tiny_model, tiny_splits, store_path):
    from pipeline.extract import kl_uniform_loss

    plan = Plan(("layer1", "layer2", "fc"), grad_layers=("layer1", "fc"), head="fc")
    splits = {name: (SplitDataset(s), s.attrs) for name, s in tiny_splits.items()}
    with StoreWriter(store_path, "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(tiny_model, splits, plan, writer, batch_size=5)
        writer.finalize({"grad_layers": ["layer1", "fc"]}, plan.layers)
    store = open_store(store_path)
    # reference: the same gradient by hand, one sample at a time (it must not depend on the batch)
    x = torch.from_numpy(tiny_splits["id_val"].images[:3])
    kept = {}
    handle = tiny_model.layer1.register_forward_hook(lambda m, i, o: kept.__setitem__("a", o))
    try:
        for i in range(3):
            logits = tiny_model(x[i:i + 1])
            (g,) = torch.autograd.grad(kl_uniform_loss(logits), [kept["a"]])
            np.testing.assert_allclose(store.to_numpy("id_val", "grad.layer1")[i], g.sum((2, 3))[0].numpy(),
                                       rtol=1e-4, atol=1e-7)
    finally:
        handle.remove()
    head = store.head()
    assert head["weight"].shape == (3, 8) and head["bias"].shape == (3,)
    pen, logits = store.to_numpy("id_val", "penultimate"), store.to_numpy("id_val", "logits")
    np.testing.assert_allclose(pen @ head["weight"].T + head["bias"], logits, rtol=1e-4, atol=1e-5)
    assert store.grad_layers == ["layer1", "fc"]
    assert store.array("id_val", "layer1").attrs["spatial_size"] == 64  # 8 x 8 map
    assert store.array("id_val", "fc").attrs["spatial_size"] == 1


def test_plan_errors(tiny_model):
    from pipeline.extract import resolve_plan

    with pytest.raises(ConfigError, match=r"'extract.grad_layers' .* subset of extract.layers .*Got 'layer2'"):
        resolve_plan(tiny_model, ["layer1"], (1, 8, 8), grad_layers=["layer2"])
    with pytest.raises(ConfigError, match=r"'extract.head' .* torch.nn.Linear module. Got 'layer1', a Sequential"):
        resolve_plan(tiny_model, ["layer1"], (1, 8, 8), head="layer1")
    with pytest.raises(ConfigError, match=r"'extract.head' .* Got 'fc9'"):
        resolve_plan(tiny_model, ["layer1"], (1, 8, 8), head="fc9")


class ItemOnly(torch.utils.data.Dataset):
    """A dataset read item by item (as torchvision's are), without ``rows``."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        return self.inner[index]


def test_item_by_item_datasets_give_the_same_store_as_sliced_ones(tiny_model, tiny_splits, tmp_path):
    plan = Plan(("layer1", "fc"), head="fc")
    stores = {}
    for kind, wrap in (("sliced", SplitDataset), ("items", lambda s: ItemOnly(SplitDataset(s)))):
        splits = {name: (wrap(s), s.attrs) for name, s in tiny_splits.items()}
        with StoreWriter(tmp_path / f"{kind}.zarr", kind, chunk_rows=4, shard_rows=8) as writer:
            extract_to_store(tiny_model, splits, plan, writer, batch_size=3)
            writer.finalize({}, plan.layers)
        stores[kind] = open_store(tmp_path / f"{kind}.zarr")
    for name in ("layer1", "fc", "penultimate", "energy", "label"):
        np.testing.assert_array_equal(stores["sliced"].to_numpy("id_train", name), stores["items"].to_numpy("id_train", name))


class ShortRows(ItemOnly):
    """An in-memory dataset whose ``rows`` gives one row too few: a broken ``rows``, as a user's might be."""

    def rows(self, start, stop):
        x, y = self.inner.rows(start, stop)
        return x[:-1], y[:-1]


def test_a_dataset_giving_too_few_rows_is_refused_not_padded(tiny_model, tiny_splits, store_path):
    """Shard arrays are allocated whole, then filled: a short batch must not leave rows of np.empty in them."""
    split = tiny_splits["id_train"]
    with StoreWriter(store_path, "k", chunk_rows=4, shard_rows=8) as writer:
        with pytest.raises(RuntimeError, match=r"gave \d+ rows for rows \[0, 8\), expected 8"):
            extract_to_store(tiny_model, {"id_train": (ShortRows(SplitDataset(split)), split.attrs)},
                             Plan(("layer1",)), writer, batch_size=3)
        assert writer.pending_shards("id_train", len(split.labels))[0] == 0


def test_unpooled_maps_and_images_are_stored_for_the_heatmap_decoder(tiny_model, tiny_splits, store_path):
    """Seed 002's decoder reads the later blocks' (C, H, W) maps and the input images from the store."""
    from pipeline.extract import resolve_plan

    plan = resolve_plan(tiny_model, ["layer1", "fc"], (1, 8, 8), head="fc", maps=["layer2", "layer1"], images=True)
    assert plan.maps == ("layer1", "layer2") and plan.images  # network order
    splits = {name: (SplitDataset(s), s.attrs) for name, s in tiny_splits.items()}
    with StoreWriter(store_path, "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(tiny_model, splits, plan, writer, batch_size=3)
        writer.finalize({"checkpoint_sha256": "abc"}, list(plan.layers))
    store = open_store(store_path)
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    with torch.inference_mode():
        act1 = tiny_model.layer1(torch.relu(tiny_model.bn1(tiny_model.conv1(tiny_model.normalize(x)))))
        act2 = tiny_model.layer2(act1)
    np.testing.assert_allclose(store.to_numpy("noise_test", "map.layer1"), act1.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.to_numpy("noise_test", "map.layer2"), act2.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(store.to_numpy("noise_test", "image"), tiny_splits["noise_test"].images)
    arr = store.array("noise_test", "map.layer2")
    assert arr.shape == (9, 8, 4, 4) and arr.shards[1:] == (8, 4, 4)
    assert arr.metadata.dimension_names == ("sample", "channel_layer2", "height_layer2", "width_layer2")


@pytest.mark.parametrize("maps, message", [
    (["layer9"], r"'extract.maps' parameter .* Got 'layer9', not a module of the model"),
    (["fc"], r"'extract.maps' parameter .* Got 'fc', of output shape \(3,\). Hint: `layerscope layers`"),
])
def test_maps_must_be_spatial_layers(tiny_model, maps, message):
    from pipeline.extract import resolve_plan

    with pytest.raises(ConfigError, match=message):
        resolve_plan(tiny_model, ["fc"], (1, 8, 8), maps=maps)


def test_the_whole_store_opens_as_an_xarray_datatree(tiny_model, tiny_splits, store_path):
    """Every array has dimension names, and each split has ``layer`` and ``sample`` coordinates."""
    import warnings

    import xarray as xr

    from pipeline.userdata import IndexedDataset

    plan = Plan(("layer1", "layer2", "fc"), grad_layers=("layer2",), head="fc", maps=("layer2",), images=True)
    splits = {name: (SplitDataset(s), s.attrs) for name, s in tiny_splits.items()}
    chosen = [5, 2, 30, 7, 11, 0, 19, 3, 8]  # a sources split reads chosen samples of its data set
    base = SplitDataset(tiny_splits["id_train"])
    splits["noise_test"] = (IndexedDataset(base, chosen, [-1] * len(chosen)), tiny_splits["noise_test"].attrs)
    with StoreWriter(store_path, "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(tiny_model, splits, plan, writer, batch_size=5)
        writer.finalize({}, plan.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: consolidated metadata is not in the v3 spec
        tree = xr.open_datatree(store_path, engine="zarr")
        head = xr.open_zarr(store_path, group="head")
    train = tree["id_train"].ds
    assert list(train["layer"].values) == ["layer1", "layer2", "fc"]
    np.testing.assert_array_equal(train["energy"].sel(layer="layer2").values,
                                  open_store(store_path).to_numpy("id_train", "energy")[:, 1])
    np.testing.assert_array_equal(train["sample"].values, np.arange(len(tiny_splits["id_train"].labels)))
    np.testing.assert_array_equal(tree["noise_test"].ds["sample"].values, chosen)  # rows -> source images
    assert head["weight"].dims == ("class", "head_input") and head["bias"].dims == ("class",)
    assert train["map.layer2"].dims[0] == "sample" and "image" in train


def test_shards_are_written_in_the_background_only_when_a_core_is_free(tiny_model):
    """A writer thread beside torch's pool on every core would make the passes' threads wait for each other."""
    from dataclasses import replace

    from pipeline.extract import InMemory, ShardJob, _write_behind_depth
    from pipeline.threads import usable_cores

    job = ShardJob(InMemory(tiny_model), None, None, "unused", 4, 4, 0)
    torch.set_num_threads(usable_cores())  # the conftest fixture puts the count back afterwards
    assert _write_behind_depth(job) == 0
    assert _write_behind_depth(replace(job, lanes=2)) == 1  # one torch thread per lane: a writer only shares a core
    if usable_cores() > 1:
        torch.set_num_threads(usable_cores() - 1)
        assert _write_behind_depth(job) == 1


def _full_plan_store(path, model, splits, lanes, batch_size=3):
    """A store with every kind of array (gradients, maps, images, Gram, ODIN, RankFeat), computed in ``lanes``."""
    from pipeline.extract import resolve_plan

    plan = resolve_plan(model, ["layer1", "layer2", "fc"], (1, 8, 8), grad_layers=["layer2"], head="fc",
                        maps=["layer2"], images=True, gram=["layer1"], gram_powers=(1, 2),
                        odin_temperatures=(1.0, 1000.0), odin_noises=(0.0, 0.0014), rankfeat=["layer2", "layer1"])
    with StoreWriter(path, "k", chunk_rows=4, shard_rows=8) as writer:
        extract_to_store(model, {name: (SplitDataset(s), s.attrs) for name, s in splits.items()}, plan, writer,
                         batch_size=batch_size, lanes=lanes)
        writer.finalize({}, list(plan.layers))
    return path


@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_give_the_bytes_of_one_lane(tiny_model, tiny_splits, tmp_path, lanes):
    """Batches computed side by side, each on one torch thread, must store what one thread stores, byte for byte."""
    from tests.faults import differing, tree_bytes

    threads_before = torch.get_num_threads()
    one = _full_plan_store(tmp_path / "one.zarr", tiny_model, tiny_splits, lanes=1)
    many = _full_plan_store(tmp_path / "many.zarr", tiny_model, tiny_splits, lanes=lanes)
    assert differing(tree_bytes(many), tree_bytes(one)) == []
    assert torch.get_num_threads() == threads_before  # the lanes' count of 1 is put back
    assert not tiny_model.layer1._forward_hooks and not tiny_model.layer2._forward_hooks  # RankFeat's too


def test_a_recorder_keeps_each_threads_own_pass(tiny_model):
    """Two threads passing other inputs through one model and recorder each read back their own values."""
    import threading

    inputs = [torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    seen, barrier = {}, threading.Barrier(2)
    with LayerRecorder(tiny_model, Plan(("layer1",))) as rec:
        def run(i):
            with torch.inference_mode():
                tiny_model(inputs[i])
                barrier.wait()  # both passes done before either reads
                seen[i] = rec.pooled["layer1"].clone()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with torch.inference_mode():
            expected = [pool(tiny_model.layer1(torch.relu(tiny_model.bn1(tiny_model.conv1(tiny_model.normalize(x))))))
                        for x in inputs]
    for i in range(2):
        torch.testing.assert_close(seen[i], expected[i], rtol=0, atol=0)


class _Failing(torch.utils.data.Dataset):
    """Images of 1x8x8; item ``bad`` raises (a corrupt file, say)."""

    def __init__(self, n, bad):
        self.n, self.bad, self.served = n, bad, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError(f"cannot decode item {i}")
        self.served.append(i)
        return torch.zeros(1, 8, 8), 0


def test_a_lanes_error_is_raised_and_stops_the_other_lanes(tiny_model, tmp_path):
    from pipeline.extract import ShardJob, InMemory

    data = _Failing(64, bad=5)
    job = ShardJob(InMemory(tiny_model), InMemory({"s": data}), Plan(("layer1",)), "unused", 64, 4, 0, lanes=2)
    with pytest.raises(OSError, match="cannot decode item 5"):
        job.compute(("s", 0, 0, 64))
    assert len(data.served) < 40  # the other lane stopped at its next batch, not at the shard's end


def test_lanes_keep_their_threads_on_one_torch_thread_each_and_put_the_count_back():
    """A lane's threads live for the whole block (new ones per shard warmed up again: 1.15x, not 1.4x)."""
    import threading

    from pipeline.extract import Lanes

    before = torch.get_num_threads()
    seen = []
    # both lanes must be running at once: a pool that handed the second lane to the first's thread would time out
    together = threading.Barrier(2, timeout=30)

    def work():
        seen.append((threading.get_ident(), torch.get_num_threads()))
        if threading.get_ident() != caller:
            together.wait()

    caller = threading.get_ident()
    with Lanes(2) as lanes:
        lanes.run(work, stop=lambda: None)
        lanes.run(work, stop=lambda: None)
        assert torch.get_num_threads() == before  # the caller's own count is left alone
    assert {count for _, count in seen} == {1} and len(seen) == 4
    assert len({ident for ident, _ in seen}) == 2 and threading.get_ident() not in {i for i, _ in seen}
    assert torch.get_num_threads() == before
    with Lanes(1) as lanes:  # one lane: the caller's thread, as it is
        lanes.run(work, stop=lambda: None)
    assert seen[-1] == (threading.get_ident(), before)


def test_default_lanes_fit_their_activations_in_the_lane_memory(tiny_model, monkeypatch):
    """Each lane holds a batch's maps: a network with big maps runs in fewer lanes (one: torch's threads as before)."""
    from pipeline import extract

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    small = {"layer1": (4, 8, 8), "fc": (3,)}
    assert extract.default_lanes(tiny_model) == 4 and extract.default_lanes(tiny_model, small, 128) == 4
    per_lane = 128 * 256 * 56 * 56 * 4 * extract.LIVE_MAPS  # an ImageNet ResNet-50's layer1 at batch 128
    monkeypatch.setattr(extract, "LANE_MEMORY", per_lane)
    assert extract.default_lanes(tiny_model, {"layer1": (256, 56, 56)}, 128) == 2
    monkeypatch.setattr(extract, "LANE_MEMORY", per_lane - 1)
    assert extract.default_lanes(tiny_model, {"layer1": (256, 56, 56)}, 128) == 1
