import numpy as np
import pytest
import zarr

from pipeline.errors import IntegrityError, OutputError, StoreError
from pipeline.store import ArraySpec, StoreWriter, WriteBehind, open_shared, open_store

SPECS = [ArraySpec("layer1", 3, "float32"), ArraySpec("energy", 2, "float32", dim="layer"),
         ArraySpec("label", None, "int64")]


def rows(start, stop):
    idx = np.arange(start, stop)
    return {"layer1": np.stack([idx, idx + 0.5, -idx], 1).astype("f4"),
            "energy": np.stack([idx, 2 * idx], 1).astype("f4"), "label": idx}


def write(path, n=10, key="k", finalize=True, stop_after=None):
    """Write a one-split store with 4-row shards; optionally stop after some shards."""
    with StoreWriter(path, key, chunk_rows=2, shard_rows=4) as writer:
        writer.create_split("id_train", n, SPECS, {"role": "id", "n_samples": n})
        for i in writer.pending_shards("id_train", n)[:stop_after]:
            writer.write_shard("id_train", i, rows(*writer.shard_range(i, n)))
        if finalize:
            writer.finalize({"checkpoint_sha256": "abc"}, ["layer1"])
        return writer


def test_round_trip_numpy_dask_and_blocks(store_path):
    write(store_path)
    store = open_store(store_path)
    assert store.splits == ["id_train"] and store.layers == ["layer1"]
    assert store.provenance == {"checkpoint_sha256": "abc"}  # no clock reading added (issue 14)
    np.testing.assert_array_equal(store.to_numpy("id_train", "layer1"), rows(0, 10)["layer1"])
    darr = store.to_dask("id_train", "layer1")
    assert darr.chunks[0] == (4, 4, 2)  # chunked by shard, not by inner chunk
    np.testing.assert_array_equal(darr.compute(), rows(0, 10)["layer1"])
    starts = [start for start, _ in store.iter_blocks("id_train", "label")]
    assert starts == [0, 4, 8]


def test_arrays_are_sharded_with_named_dimensions(store_path):
    write(store_path)
    arr = open_store(store_path).array("id_train", "layer1")
    assert arr.shards == (4, 3) and arr.chunks == (2, 3)
    assert arr.metadata.dimension_names == ("sample", "feature_layer1")
    shard_files = list((store_path / "id_train" / "layer1").rglob("c/*/*"))
    assert len(shard_files) == 3  # one file per shard, not per chunk


def test_xarray_opens_a_split_without_layerscope(store_path):
    xr = pytest.importorskip("xarray")
    write(store_path)
    ds = xr.open_zarr(store_path, group="id_train")
    assert ds["layer1"].dims == ("sample", "feature_layer1") and ds["energy"].dims == ("sample", "layer")
    np.testing.assert_array_equal(ds["label"].values, np.arange(10))
    # the manifest (layerscope.json) beside the zarr keys disturbs neither zarr nor a whole-tree open
    assert list(zarr.open_group(store_path, mode="r").group_keys()) == ["id_train"]
    tree = xr.open_datatree(store_path, engine="zarr")
    np.testing.assert_array_equal(tree["id_train"]["layer1"].values, rows(0, 10)["layer1"])


def test_missing_store_is_refused(store_path):
    with pytest.raises(StoreError, match=r"does not exist.*layerscope extract"):
        open_store(store_path)


def test_interrupted_store_is_refused_with_a_resume_hint(store_path):
    write(store_path, finalize=False, stop_after=1)
    with pytest.raises(StoreError, match=r"incomplete.*staged.*resume"):
        open_store(store_path)


def test_resume_writes_only_missing_shards_and_matches_an_uninterrupted_run(tmp_path):
    write(tmp_path / "a.zarr", finalize=False, stop_after=2)
    with StoreWriter(tmp_path / "a.zarr", "k", chunk_rows=2, shard_rows=4) as writer:
        assert writer.pending_shards("id_train", 10) == [2]
    write(tmp_path / "a.zarr")
    write(tmp_path / "b.zarr")
    a, b = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    for name in ("layer1", "energy", "label"):
        np.testing.assert_array_equal(a.to_numpy("id_train", name), b.to_numpy("id_train", name))
    assert not (tmp_path / ".staging" / "a.zarr").exists()


def test_staged_store_from_other_inputs_is_discarded(store_path):
    write(store_path, finalize=False, stop_after=2, key="old")
    with StoreWriter(store_path, "new", chunk_rows=2, shard_rows=4) as writer:
        assert writer.pending_shards("id_train", 10) == [0, 1, 2]



def _files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_splits_created_in_one_batch_are_the_files_zarr_creates_them_with(tmp_path):
    coords = {"layer": np.array(["layer1", "layer2"])}
    sizes = {"id_train": 10, "id_test": 3, "far_test": 0}
    with StoreWriter(tmp_path / "a.zarr", "k", chunk_rows=2, shard_rows=4) as writer:
        writer.create_splits({name: (n, {"n_samples": n}) for name, n in sizes.items()}, SPECS, coords=coords)
        assert writer.progress == {name: set() for name in sizes}
        reference = zarr.open_group(tmp_path / "b.zarr", mode="w", zarr_format=3)  # zarr's own, node by node
        for name, n in sizes.items():
            group = reference.create_group(name, attributes={"n_samples": n})
            for spec in SPECS:
                group.create_array(**writer._array_kwargs(spec, n))
            group.create_array("layer", data=coords["layer"], compressors=writer.compressor, dimension_names=("layer",))
        assert _files(writer.staged_store) == _files(tmp_path / "b.zarr")


def test_a_split_an_interrupted_run_left_half_created_is_created_afresh(store_path):
    with StoreWriter(store_path, "k", chunk_rows=2, shard_rows=4) as writer:
        stray = writer.staged_store / "id_train" / "layer1" / "c" / "9" / "0"
        stray.parent.mkdir(parents=True)  # files of a creation stopped before it was recorded
        stray.write_bytes(b"left over")
        writer.create_splits({"id_train": (10, {"n_samples": 10})}, SPECS)
        assert not stray.exists() and writer.pending_shards("id_train", 10) == [0, 1, 2]
        writer.create_splits({"id_train": (10, {"n_samples": 99})}, SPECS)  # recorded: a resumed run keeps it
        assert zarr.open_group(writer.staged_store, mode="r")["id_train"].attrs["n_samples"] == 10

def test_a_second_writer_is_refused(store_path):
    with StoreWriter(store_path, "k"):
        with pytest.raises(OutputError, match=r"feature store '.*features.zarr' is being written by another process"):
            StoreWriter(store_path, "k").__enter__()


def test_a_truncated_shard_is_refused_at_open_and_named(store_path):
    write(store_path)
    shard = next((store_path / "id_train" / "layer1").rglob("c/1/0"))
    shard.write_bytes(shard.read_bytes()[:7])
    with pytest.raises(IntegrityError, match=r"is damaged: file 'id_train/layer1/c/1/0' has 7 bytes.*re-extract"):
        open_store(store_path)


def test_tasks_share_one_open_store_until_it_is_republished_and_still_see_damage(store_path):
    write(store_path)
    first = open_shared(store_path)
    assert open_shared(store_path) is first  # the metadata is parsed once per process
    write(store_path, n=6)  # republished: another manifest, another store
    second = open_shared(store_path)
    assert second is not first and len(second.to_numpy("id_train", "label")) == 6
    shard = next((store_path / "id_train" / "layer1").rglob("c/1/0"))
    shard.write_bytes(shard.read_bytes()[:7])  # same manifest, a damaged file: every call checks the sizes
    with pytest.raises(IntegrityError, match=r"is damaged: file 'id_train/layer1/c/1/0' has 7 bytes"):
        open_shared(store_path)


def test_unknown_split_and_array_are_named(store_path):
    write(store_path)
    store = open_store(store_path)
    with pytest.raises(StoreError, match=r"no split 'id_test'. It has \['id_train'\]"):
        store.to_numpy("id_test", "layer1")
    with pytest.raises(StoreError, match=r"no array 'layer9'"):
        store.to_numpy("id_train", "layer9")


def _write_behind(path, n=10, broken=None, caller_error=None, depth=1, encoders=1):
    """Write a one-split store through :class:`WriteBehind`; ``broken``: a shard given one row too few."""
    with StoreWriter(path, "k", chunk_rows=2, shard_rows=4) as writer:
        writer.create_split("id_train", n, SPECS, {"role": "id", "n_samples": n})
        with WriteBehind(writer, depth=depth, encoders=encoders) as behind:
            for i in writer.pending_shards("id_train", n):
                data = rows(*writer.shard_range(i, n))
                if i == broken:
                    data = {k: v[:-1] for k, v in data.items()}
                behind.submit("id_train", i, data)
                assert len(behind._pending) <= 1  # bounded: the one being written, at most
            if caller_error is not None:
                raise caller_error
        writer.finalize({"checkpoint_sha256": "abc"}, ["layer1"])


@pytest.mark.parametrize("depth, encoders", [(0, 1), (0, 3), (1, 1), (1, 2)])
def test_background_writes_give_the_same_bytes_as_blocking_ones(tmp_path, depth, encoders):
    """depth 1: a writer thread; depth 0 (no core to spare): WriteBehind writes in the caller's thread,
    its files encoded by ``encoders`` threads meanwhile."""
    from tests.faults import differing, tree_bytes

    write(tmp_path / "blocking.zarr")
    _write_behind(tmp_path / "behind.zarr", depth=depth, encoders=encoders)
    assert differing(tree_bytes(tmp_path / "behind.zarr"), tree_bytes(tmp_path / "blocking.zarr")) == []


def test_a_blocking_write_encodes_its_files_on_the_encoder_threads(tmp_path, monkeypatch):
    """With depth 0 the caller waits for the write: its cores encode the shard's arrays in parallel."""
    import threading

    from pipeline import store

    threads, original = set(), store.encode_shard

    def spy(*args):
        threads.add(threading.current_thread().name.rsplit("_", 1)[0])
        return original(*args)

    monkeypatch.setattr(store, "encode_shard", spy)
    _write_behind(tmp_path / "s.zarr", depth=0, encoders=2)
    assert threads == {"layerscope-encoder"}


@pytest.mark.parametrize("depth, encoders", [(0, 1), (0, 2), (1, 1)])
def test_a_failed_background_write_is_raised_and_the_shard_stays_pending(store_path, depth, encoders):
    with pytest.raises(ValueError, match=r"shard 1 of id_train/layer1 needs 4 rows, got 3"):
        _write_behind(store_path, broken=1, depth=depth, encoders=encoders)
    with StoreWriter(store_path, "k", chunk_rows=2, shard_rows=4) as writer:
        assert 1 in writer.pending_shards("id_train", 10)  # never recorded: a rerun writes it again
    with pytest.raises(StoreError, match="incomplete"):
        open_store(store_path)


def test_the_callers_error_wins_and_the_shards_written_meanwhile_are_kept(store_path):
    with pytest.raises(KeyboardInterrupt):
        _write_behind(store_path, caller_error=KeyboardInterrupt())
    with StoreWriter(store_path, "k", chunk_rows=2, shard_rows=4) as writer:
        assert writer.pending_shards("id_train", 10) == []  # every submitted shard was written, then recorded
    write(store_path)  # resumes: nothing left to compute, then finalize
    np.testing.assert_array_equal(open_store(store_path).to_numpy("id_train", "label"), np.arange(10))


def _planted(n, dtype, shape, seed):
    """``(n, *shape)`` values of ``dtype`` with the cases a shard file must get right, at 4-row chunks.

    Rows 4-7 are zero (a chunk left out of its shard), rows 8-11 are -0.0 for
    floats (not the fill value's bytes: kept), row 12 holds a NaN.
    """
    rng = np.random.default_rng(seed)
    kind = np.dtype(dtype).kind
    values = (rng.normal(size=(n, *shape)) * 100 if kind == "f" else rng.integers(-9, 9, size=(n, *shape)))
    values = values.astype(dtype)
    values[4:8] = 0
    if kind == "f":
        values[8:12] = -0.0
        values.reshape(n, -1)[12:13, 0] = np.nan
    return values


ENCODED = [ArraySpec("vec", 3, "float32"), ArraySpec("half", 5, "float16"), ArraySpec("double", 2, "float64"),
           ArraySpec("label", None, "int64"), ArraySpec("scalar", None, "float32"),
           ArraySpec("map", None, "float32", sample_shape=(2, 3, 3), dims=("c", "h", "w"))]


@pytest.mark.parametrize("n", [21, 16, 3])  # a partial last shard and chunk; whole shards; one chunk, padded
def test_shard_files_are_the_bytes_zarr_writes(tmp_path, n):
    """The shard files :func:`encode_shard` writes must be zarr's own, byte for byte (stores stay byte-identical)."""
    from tests.faults import differing, tree_bytes

    data = {spec.name: _planted(n, spec.dtype, spec.sample_shape or ((spec.width,) if spec.width else ()), i)
            for i, spec in enumerate(ENCODED)}
    data["label"][16:] = 0  # a whole shard of the fill value: zarr writes no file for it
    paths = {}
    for how in ("encoded", "zarr"):
        with StoreWriter(tmp_path / f"{how}.zarr", "k", chunk_rows=4, shard_rows=8) as writer:
            writer.create_split("s", n, ENCODED, {"n_samples": n})
            for i in writer.pending_shards("s", n):
                start, stop = writer.shard_range(i, n)
                if how == "encoded":
                    writer.write_shard("s", i, {k: v[start:stop] for k, v in data.items()})
                    continue
                for name, values in data.items():
                    zarr.open_array(writer.staged_store / "s" / name, mode="r+")[start:stop] = values[start:stop]
            paths[how] = writer.staged_store / "s"
        assert not list(paths[how].rglob("*.partial"))
    assert differing(tree_bytes(paths["encoded"]), tree_bytes(paths["zarr"])) == []
    assert n <= 16 or not (paths["encoded"] / "label" / "c" / "2").exists()


def test_arrays_of_another_layout_are_written_by_zarr(tmp_path):
    """encode_shard knows one layout; any other array (here: a fill value of 1, no sharding) is left to zarr."""
    from pipeline.store import encode_shard, write_shard_data

    with StoreWriter(tmp_path / "s.zarr", "k", chunk_rows=2, shard_rows=4) as writer:
        writer.create_split("id_train", 10, SPECS, {"n_samples": 10})
        group = zarr.open_group(writer.staged_store / "id_train", mode="r+")
        group.create_array("ones", shape=(10,), chunks=(2,), dtype="int64", fill_value=1)
        arrays = write_shard_data(writer.staged_store, "id_train", 1, 4, {"ones": np.arange(4, 8), **rows(4, 8)})
        assert encode_shard(arrays.arrays["ones"], 4, np.arange(4, 8)) is None
        assert encode_shard(arrays.arrays["label"], 4, np.arange(4, 6)) is None  # not a whole shard
        assert encode_shard(arrays.arrays["label"], 4, np.arange(4, 8))[0] == "c/1"
        np.testing.assert_array_equal(group["ones"][:], [1, 1, 1, 1, 4, 5, 6, 7, 1, 1])
        np.testing.assert_array_equal(group["layer1"][4:8], rows(4, 8)["layer1"])
