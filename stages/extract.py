"""Stage ``extract``: run every split through the model once, into the feature store.

Resumable: an interrupted run leaves a staged store (see :mod:`pipeline.store`),
which the next run continues from its last complete shard.
"""

import logging
from pathlib import Path

import torch
import zarr

import pipeline
from pipeline.config import load_section
from pipeline.datasets import SplitDataset, load_split, read_manifest
from pipeline.extract import extract_to_store, resolve_plan, store_key
from pipeline.models import file_sha256, load_checkpoint, resolve_device
from pipeline.store import STORE_FORMAT, StoreWriter

log = logging.getLogger(__name__)


def run(params, data, checkpoint, out):
    cfg = load_section("extract", params)
    device = resolve_device(cfg.device)
    model, _spec = load_checkpoint(checkpoint, device)
    manifest = read_manifest(data)
    splits = {name: load_split(Path(data) / entry["file"]) for name, entry in manifest["splits"].items()}
    input_shape = splits["id_train"].images.shape[1:]
    plan = resolve_plan(model, cfg.layers, input_shape, grad_layers=cfg.grad_layers, head=cfg.head, device=device)
    provenance = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
        "data": {name: entry["fingerprint"] for name, entry in manifest["splits"].items()},
        "layers": list(plan.layers), "grad_layers": list(plan.grad_layers), "head": plan.head,
        "pooling": "mean over H,W (C,H,W maps); identity for vectors",
        "energy": "-logsumexp over the full activation, T=1", "dtype": cfg.dtype,
        "versions": _versions(),
    }
    key = store_key(provenance=provenance, batch_size=cfg.batch_size, chunk_rows=cfg.chunk_rows,
                    shard_rows=cfg.shard_rows, level=cfg.compression_level, format=STORE_FORMAT)
    with StoreWriter(out, key, chunk_rows=cfg.chunk_rows, shard_rows=cfg.shard_rows,
                     compression_level=cfg.compression_level) as writer:
        datasets = {name: (SplitDataset(s), {**s.attrs, "fingerprint": manifest["splits"][name]["fingerprint"]})
                    for name, s in splits.items()}
        extract_to_store(model, datasets, plan, writer, batch_size=cfg.batch_size, device=device, dtype=cfg.dtype)
        writer.finalize(provenance, plan.layers)


def _versions():
    return {"layerscope": pipeline.__version__, "torch": torch.__version__, "zarr": zarr.__version__}
