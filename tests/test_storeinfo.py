import json
import re

import dask
import numpy as np
import pytest
import zarr
from rich.console import Console

from pipeline.errors import StoreError
from pipeline.storeinfo import human_bytes, layer_stats, stats_tables, summarize_store, summary_tables
from pipeline.store import ArraySpec, FeatureStore, StoreWriter, open_store

SHARD_ROWS = 4
SPECS = [ArraySpec("layer1", 4, "float32"), ArraySpec("fc", 2, "float32"),
         ArraySpec("energy", 2, "float32", dim="layer"), ArraySpec("label", None, "int64")]
SPLITS = {"id_train": 10, "noise_test": 6}


def layer1(n):
    """Known columns: 0..n-1, all zeros (a dead unit), ones with a NaN at row 3, -(i+1) with inf at row 5."""
    idx = np.arange(n, dtype="f4")
    x = np.stack([idx, np.zeros(n), np.ones(n), -(idx + 1)], 1).astype("f4")
    x[3, 2], x[5, 3] = np.nan, np.inf
    return x


def rows(n, start, stop):
    idx = np.arange(start, stop)
    return {"layer1": layer1(n)[start:stop], "fc": np.stack([idx, -idx], 1).astype("f4"),
            "energy": np.stack([idx, 2 * idx], 1).astype("f4"), "label": idx}


def write(path, splits=SPLITS):
    with StoreWriter(path, "k", chunk_rows=2, shard_rows=SHARD_ROWS) as writer:
        for split, n in splits.items():
            writer.create_split(split, n, SPECS, {"role": "id", "n_samples": n})
            for i in writer.pending_shards(split, n):
                writer.write_shard(split, i, rows(n, *writer.shard_range(i, n)))
        writer.finalize({"checkpoint_sha256": "abc", "versions": {"zarr": zarr.__version__}}, ["layer1", "fc"])
    return open_store(path)


@pytest.fixture
def store(store_path):
    return write(store_path)


@pytest.fixture
def no_data_reads(monkeypatch):
    """Fail any read of array data through zarr or the store."""

    def refuse(*args, **kwargs):
        raise AssertionError("array data was read")

    monkeypatch.setattr(zarr.Array, "__getitem__", refuse)
    monkeypatch.setattr(FeatureStore, "to_numpy", refuse)


def file_sizes(directory):
    files = [p for p in directory.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def test_summary_describes_every_array_without_reading_data(store, store_path, no_data_reads):
    summary = summarize_store(store)
    assert summary["layers"] == ["layer1", "fc"] and summary["complete"] is True
    assert list(summary["splits"]) == ["id_train", "noise_test"]
    assert list(summary["splits"]["id_train"]["arrays"]) == ["layer1", "fc", "energy", "label"]
    assert summary["splits"]["noise_test"]["attrs"] == {"role": "id", "n_samples": 6}
    info = summary["splits"]["id_train"]["arrays"]["layer1"]
    assert info["shape"] == [10, 4] and info["dtype"] == "float32"
    assert info["chunks"] == [2, 4] and info["shards"] == [4, 4]
    assert info["dimension_names"] == ["sample", "feature_layer1"]
    assert info["compressors"] == ["zstd(level=3, checksum=True)"]
    assert info["raw_bytes"] == 10 * 4 * 4
    assert summary["splits"]["id_train"]["arrays"]["label"]["shards"] == [4]
    json.dumps(summary, allow_nan=False)  # plain JSON types only


def test_stored_bytes_are_the_files_on_disk(store, store_path):
    summary = summarize_store(store_path)  # a path is opened too
    arrays = [(split, name, info) for split, s in summary["splits"].items() for name, info in s["arrays"].items()]
    for split, name, info in arrays:
        stored, n_files = file_sizes(store_path / split / name)
        assert info["stored_bytes"] == stored > 0 and info["n_files"] == n_files
        assert info["ratio"] == pytest.approx(info["raw_bytes"] / stored)
    # 3 shards of id_train + 2 of noise_test, plus one zarr.json each
    assert summary["splits"]["id_train"]["arrays"]["layer1"]["n_files"] == 3 + 1
    totals = summary["totals"]
    assert totals["raw_bytes"] == sum(info["raw_bytes"] for *_, info in arrays)
    assert (totals["stored_bytes"], totals["n_files"]) == file_sizes(store_path)
    assert totals["stored_bytes"] > sum(info["stored_bytes"] for *_, info in arrays)  # plus group metadata


def test_layer_stats_known_answers(store):
    stats = layer_stats(store, "layer1", split="id_train")
    assert list(stats["splits"]) == ["id_train"] and stats["layer"] == "layer1"
    features, summary = stats["splits"]["id_train"]["features"], stats["splits"]["id_train"]["summary"]
    np.testing.assert_allclose(features["mean"], [4.5, 0.0, 1.0, -49 / 9])
    np.testing.assert_allclose(features["std"], [np.std(np.arange(10)), 0.0, 0.0,
                                                 np.std([1, 2, 3, 4, 5, 7, 8, 9, 10])])
    assert features["min"] == [0.0, 0.0, 1.0, -10.0] and features["max"] == [9.0, 0.0, 1.0, -1.0]
    assert features["nan"] == [0, 0, 1, 0] and features["inf"] == [0, 0, 0, 1]
    assert features["zero_fraction"] == [0.1, 1.0, 0.0, 0.0]
    x = layer1(10).astype("f8")
    finite = np.where(np.isfinite(x), x, np.nan)
    assert summary == pytest.approx({
        "n_samples": 10, "n_features": 4, "mean": 5 / 38, "std": np.nanstd(finite), "min": -10.0, "max": 9.0,
        "nan": 1, "inf": 1, "dead_units": 1, "dead_fraction": 0.25})


def test_layer_stats_defaults_to_every_split(store):
    stats = layer_stats(store, "fc")
    assert list(stats["splits"]) == ["id_train", "noise_test"]
    assert stats["splits"]["noise_test"]["features"]["mean"] == [2.5, -2.5]
    assert stats["splits"]["noise_test"]["summary"]["dead_units"] == 0
    json.dumps(stats, allow_nan=False)


def test_layer_stats_reads_one_shard_per_task_in_one_compute_per_split(store, monkeypatch):
    reads, computes = [], []
    getitem, compute = zarr.Array.__getitem__, dask.compute

    def recording_getitem(self, selection):
        out = getitem(self, selection)
        if out.size:  # dask reads an empty slice to learn the dtype
            reads.append(out.shape[0])
        return out

    def counting_compute(*args, **kwargs):
        computes.append(1)
        return compute(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the whole array was loaded")

    monkeypatch.setattr(zarr.Array, "__getitem__", recording_getitem)
    monkeypatch.setattr(dask, "compute", counting_compute)
    monkeypatch.setattr(FeatureStore, "to_numpy", refuse)
    layer_stats(store, "layer1")
    assert len(computes) == len(SPLITS)
    assert sorted(reads) == sorted([4, 4, 2] + [4, 2])  # each shard read once, never more than a shard


def test_unknown_layer_names_the_valid_ones(store):
    with pytest.raises(StoreError, match=r"Array 'layer9' is not in split 'id_train' of store .*\['layer1', 'fc', 'energy', 'label'\].*Hint"):
        layer_stats(store, "layer9")
    with pytest.raises(StoreError, match=r"no split 'id_test'"):
        layer_stats(store, "layer1", split="id_test")


def test_an_empty_split_has_undefined_statistics(store_path):
    store = write(store_path, {"empty_test": 0})
    summary = layer_stats(store, "layer1")["splits"]["empty_test"]
    assert summary["summary"]["n_samples"] == 0 and summary["summary"]["mean"] is None
    assert summary["features"]["nan"] == [0] * 4 and summary["features"]["mean"] == [None] * 4


def render(tables):
    console = Console(record=True, width=200)
    for table in tables:
        console.print(table)
    return console.export_text()


def test_summary_tables_render_arrays_and_flattened_provenance(store):
    text = render(summary_tables(summarize_store(store)))
    for word in ("id_train", "noise_test", "layer1", "energy", "label", "10x4", "2x4", "4x4", "160 B"):
        assert word in text
    assert "checkpoint_sha256" in text
    assert re.search(rf"versions\.zarr +│ {re.escape(zarr.__version__)}", text)  # nested dicts get dotted keys


def test_stats_tables_truncate_features_with_a_caption(store):
    tables = stats_tables(layer_stats(store, "layer1"), max_features=2)
    assert len(tables) == 1 + len(SPLITS)
    text = render(tables)
    assert "id_train" in text and "noise_test" in text and "1 (25.0%)" in text
    assert text.count("2 of 4 features not shown") == 2
    assert "4.5" in text and "-49" not in text  # feature 3 (mean -5.444) is cut off
    assert "features not shown" not in render(stats_tables(layer_stats(store, "layer1"), max_features=4))


@pytest.mark.parametrize("n, expected", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                         (1024 ** 2, "1.0 MiB"), (5 * 1024 ** 4, "5.0 TiB"), (None, "-")])
def test_human_bytes(n, expected):
    assert human_bytes(n) == expected
