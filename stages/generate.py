"""Stage ``generate``: write the benchmark to ``out``.

``benchmark: digits`` writes the embedded data set's images; ``benchmark:
sources`` writes index files over the user's data under ``generate.root``
(root-relative: the root is read again from params whenever the data is opened).
"""

import logging

from pipeline.artifacts import check_output
from pipeline.config import load_section
from pipeline.datasets import KIND, make_digits_benchmark, write_benchmark

log = logging.getLogger(__name__)


def run(params, out):
    cfg = load_section("generate", params)
    check_output(out, KIND)  # before the work: never replace what layerscope did not write
    if cfg.benchmark == "sources":
        from pipeline.userdata import make_source_benchmark  # torch and torchvision: the digits never need them

        splits = make_source_benchmark(cfg)
    else:
        splits = make_digits_benchmark(
            holdout_classes=cfg.holdout_classes, image_size=cfg.image_size, val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction, n_synthetic=cfg.n_synthetic, seed=cfg.seed,
        )
    write_benchmark(splits, out)
    log.info("wrote %d %s splits to %s", len(splits), cfg.benchmark, out)
