"""Stage ``extract``: run every split through the model once, into the feature store.

Resumable: an interrupted run leaves a staged store (see :mod:`pipeline.store`),
which the next run continues from its last complete shard. The output path is
checked first, before the model or the data is loaded: a path that is not a
feature store (a user's folder, ``cache/`` itself, a file) is refused, and
nothing is deleted.
"""

import logging
from pathlib import Path

import torch
import zarr

import pipeline
from pipeline import artifacts
from pipeline.compute import open_runner
from pipeline.config import load_section
from pipeline.extract import (
    BenchmarkData,
    CheckpointModel,
    extract_to_store,
    method_provenance,
    resolve_plan,
    store_key,
)
from pipeline.models import file_sha256, load_checkpoint, resolve_device
from pipeline.store import FEATURE_STORE, STORE_FORMAT, StoreWriter, is_url
from pipeline.userdata import open_benchmark

log = logging.getLogger(__name__)


def run(params, data, checkpoint, out):
    if not is_url(out):
        artifacts.check_output(out, FEATURE_STORE)
    cfg = load_section("extract", params)
    compute = load_section("compute", params)  # where, not what: not a DVC dependency
    device = resolve_device(cfg.device)
    model, spec = load_checkpoint(checkpoint, device)
    splits = open_benchmark(data, params=params)
    input_shape = tuple(splits["id_train"].dataset[0][0].shape)
    plan = resolve_plan(model, cfg.layers, input_shape, grad_layers=cfg.grad_layers, head=cfg.head, device=device,
                        maps=cfg.maps, images=cfg.images, **_methods(cfg))
    provenance = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
        # imported weights: the user's file and its sha256 (or the torchvision weights name)
        "model_origin": spec.get("origin", "trained by `layerscope train`"),
        "data": {name: s.fingerprint for name, s in splits.items()},
        "layers": list(plan.layers), "grad_layers": list(plan.grad_layers), "head": plan.head,
        "maps": list(plan.maps), "images": plan.images, "input_shape": list(input_shape),
        "pooling": "mean over H,W (C,H,W maps); identity for vectors",
        "energy": "-logsumexp over the full activation, T=1", "dtype": cfg.dtype,
        "versions": _versions(),
        **method_provenance(plan),  # gram, odin, rankfeat: only those set (none: the key is what it always was)
    }
    key = store_key(provenance=provenance, batch_size=cfg.batch_size, chunk_rows=cfg.chunk_rows,
                    shard_rows=cfg.shard_rows, level=cfg.compression_level, format=STORE_FORMAT)
    with StoreWriter(out, key, chunk_rows=cfg.chunk_rows, shard_rows=cfg.shard_rows,
                     compression_level=cfg.compression_level) as writer, open_runner(compute) as runner:
        datasets = {name: (s.dataset, {**s.attrs, "fingerprint": s.fingerprint}) for name, s in splits.items()}
        # cluster workers load the checkpoint and the data themselves, once each; this
        # process's thread uses what is already loaded here
        sources = None
        if runner.distributed:
            sources = (CheckpointModel(str(checkpoint), cfg.device), BenchmarkData(str(data), str(Path(params).resolve())))
        extract_to_store(model, datasets, plan, writer, batch_size=cfg.batch_size, device=device, dtype=cfg.dtype,
                         num_workers=cfg.workers, runner=runner, sources=sources)
        writer.finalize(provenance, plan.layers)


def _methods(cfg):
    """resolve_plan's arguments for the opt-in extraction-time methods that are set."""
    out = {}
    if cfg.gram is not None:
        out.update(gram=cfg.gram.layers, gram_powers=cfg.gram.powers)
    if cfg.odin is not None:
        out.update(odin_temperatures=cfg.odin.temperatures, odin_noises=cfg.odin.noises)
    if cfg.rankfeat is not None:
        out.update(rankfeat=cfg.rankfeat.layers)
    return out


def _versions():
    return {"layerscope": pipeline.__version__, "torch": torch.__version__, "zarr": zarr.__version__}
