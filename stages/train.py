"""Stage ``train``: train the backbone on ID-train; report ID accuracy."""

import logging
import time
from pathlib import Path

import numpy as np

from pipeline.config import load_section
from pipeline.datasets import SplitDataset, load_split, read_manifest
from pipeline.metrics import accuracy
from pipeline.models import init_model, predict, resolve_device, save_checkpoint, train_model
from pipeline.report import write_json

log = logging.getLogger(__name__)


def run(params, data, model_out, metrics_out):
    cfg = load_section("train", params)
    manifest = read_manifest(data)
    splits = {name: load_split(Path(data) / manifest["splits"][name]["file"]) for name in ("id_train", "id_val", "id_test")}
    train = splits["id_train"]
    spec = {
        "arch": cfg.arch, "num_classes": len(train.attrs["classes"]), "in_channels": train.images.shape[1],
        "widths": list(cfg.widths), "blocks": list(cfg.blocks),
        # normalisation statistics from ID-train only, stored inside the model
        "mean": train.images.mean(axis=(0, 2, 3)).tolist(), "std": train.images.std(axis=(0, 2, 3)).tolist(),
    }
    device = resolve_device(cfg.device)
    model = init_model(spec, cfg.seed)
    start = time.perf_counter()
    history = _train(model, train, cfg, device)
    log.info("trained in %.1f s on %s", time.perf_counter() - start, device)
    save_checkpoint(model, spec, model_out)
    metrics = {f"{name.removeprefix('id_')}_accuracy": _accuracy(model, s, device)
               for name, s in splits.items()}
    write_json({**metrics, "final_loss": round(history[-1], 6)}, metrics_out)
    log.info("ID accuracy: %s", metrics)


def _train(model, split, cfg, device):
    return train_model(model, SplitDataset(split), epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed, device=device)


def _accuracy(model, split, device):
    pred = predict(model, SplitDataset(split), device=device)
    return round(accuracy(pred, np.asarray(split.labels)), 6)
