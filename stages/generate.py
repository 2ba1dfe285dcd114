"""Stage ``generate``: write the embedded digits benchmark to ``out``."""

import logging

from pipeline.config import load_section
from pipeline.datasets import make_digits_benchmark, write_benchmark

log = logging.getLogger(__name__)


def run(params, out):
    cfg = load_section("generate", params)
    splits = make_digits_benchmark(
        holdout_classes=cfg.holdout_classes, image_size=cfg.image_size, val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction, n_synthetic=cfg.n_synthetic, seed=cfg.seed,
    )
    write_benchmark(splits, out)
    log.info("wrote %d splits to %s", len(splits), out)
