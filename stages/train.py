"""Stage ``train``: train the backbone on ID-train (or import pretrained weights); report ID accuracy."""

import logging
import time

import numpy as np

from pipeline.backbones import OWN_NORMALISATION
from pipeline.artifacts import check_file_output
from pipeline.config import load_section
from pipeline.metrics import accuracy
from pipeline.models import import_model, init_model, model_spec, predict, resolve_device, save_checkpoint, train_model
from pipeline.report import write_json
from pipeline.threads import use_threads
from pipeline.userdata import channel_stats, open_benchmark

log = logging.getLogger(__name__)

ID_SPLITS = ("id_train", "id_val", "id_test")


def run(params, data, model_out, metrics_out):
    check_file_output(model_out, "checkpoint", "--model")  # before the work, not after the training
    check_file_output(metrics_out, "training metrics", "--metrics")
    cfg = load_section("train", params)
    use_threads(load_section("compute", params).threads)  # where, not what: not a DVC dependency
    splits = open_benchmark(data, ID_SPLITS, params=params)
    train = splits["id_train"]
    device = resolve_device(cfg.device)
    spec = _spec(cfg, train)
    start = time.perf_counter()
    if cfg.pretrained:
        model, spec = import_model(spec, checkpoint=cfg.checkpoint, openood_keys=cfg.openood_keys,
                                   weights=cfg.weights)
        report = {"epochs_trained": 0}
        log.info("imported %s (no training)", spec["origin"])
    else:
        model = init_model(spec, cfg.seed)
        history = train_model(model, train.dataset, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed, device=device,
                              augment=cfg.augment, num_workers=cfg.workers, threads=cfg.threads)
        report = {"epochs_trained": cfg.epochs, "final_loss": round(history[-1], 6)}
        log.info("trained in %.1f s on %s", time.perf_counter() - start, device)
    save_checkpoint(model, spec, model_out)
    if cfg.evaluate:
        report.update({f"{name.removeprefix('id_')}_accuracy": _accuracy(model, s, cfg, device)
                       for name, s in splits.items()})
    write_json(report, metrics_out)
    log.info("train report: %s", report)


def _spec(cfg, train):
    """Architecture spec: classes and channels from the ID data; normalisation from params or ID-train."""
    in_channels = int(train.dataset[0][0].shape[0])
    mean = std = None
    if cfg.mean is None and cfg.arch not in OWN_NORMALISATION:
        mean, std = channel_stats(train.dataset, batch_size=cfg.batch_size, num_workers=cfg.workers)
    return model_spec(cfg, num_classes=len(train.attrs["classes"]), in_channels=in_channels, mean=mean, std=std)


def _accuracy(model, split, cfg, device):
    pred = predict(model, split.dataset, device=device, num_workers=cfg.workers)
    return round(accuracy(pred, np.asarray(split.labels)), 6)
