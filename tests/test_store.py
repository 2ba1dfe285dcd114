import numpy as np
import pytest
import zarr

from pipeline.errors import IntegrityError, OutputError, StoreError
from pipeline.store import ArraySpec, StoreWriter, WriteBehind, open_store

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


def test_unknown_split_and_array_are_named(store_path):
    write(store_path)
    store = open_store(store_path)
    with pytest.raises(StoreError, match=r"no split 'id_test'. It has \['id_train'\]"):
        store.to_numpy("id_test", "layer1")
    with pytest.raises(StoreError, match=r"no array 'layer9'"):
        store.to_numpy("id_train", "layer9")


def _write_behind(path, n=10, broken=None, caller_error=None, depth=1):
    """Write a one-split store through :class:`WriteBehind`; ``broken``: a shard given one row too few."""
    with StoreWriter(path, "k", chunk_rows=2, shard_rows=4) as writer:
        writer.create_split("id_train", n, SPECS, {"role": "id", "n_samples": n})
        with WriteBehind(writer, depth=depth) as behind:
            for i in writer.pending_shards("id_train", n):
                data = rows(*writer.shard_range(i, n))
                if i == broken:
                    data = {k: v[:-1] for k, v in data.items()}
                behind.submit("id_train", i, data)
                assert len(behind._pending) <= 1  # bounded: the one being written, at most
            if caller_error is not None:
                raise caller_error
        writer.finalize({"checkpoint_sha256": "abc"}, ["layer1"])


@pytest.mark.parametrize("depth", [0, 1])
def test_background_writes_give_the_same_bytes_as_blocking_ones(tmp_path, depth):
    """depth 1: a writer thread; depth 0 (no core to spare): WriteBehind writes in the caller's thread."""
    from tests.faults import tree_bytes

    write(tmp_path / "blocking.zarr")
    _write_behind(tmp_path / "behind.zarr", depth=depth)
    assert tree_bytes(tmp_path / "behind.zarr") == tree_bytes(tmp_path / "blocking.zarr")


@pytest.mark.parametrize("depth", [0, 1])
def test_a_failed_background_write_is_raised_and_the_shard_stays_pending(store_path, depth):
    with pytest.raises(ValueError, match=r"shard 1 of id_train/layer1 needs 4 rows, got 3"):
        _write_behind(store_path, broken=1, depth=depth)
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
