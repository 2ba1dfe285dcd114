"""Stage ``inputs``: fingerprint, by content, what DVC cannot see (always run; cheap when nothing changed).

Writes ``generate.json`` (the generate params but ``root``, and the content of
every file the configured data sets read under ``generate.root``) and
``train.json`` (the content of ``train.checkpoint`` or of torchvision's file for
``train.weights``). ``generate`` and ``train`` depend on them, so DVC reruns
exactly what an edited input feeds, and nothing when only the root moves.
"""

import json
import logging

from pipeline.artifacts import atomic_write, check_file_output
from pipeline.config import load_section
from pipeline.fingerprint import HashCache, generate_inputs, train_inputs

log = logging.getLogger(__name__)


def run(params, generate_out, train_out):
    gen, train = load_section("generate", params), load_section("train", params)
    check_file_output(generate_out, "generate inputs fingerprint", "--generate")
    check_file_output(train_out, "train inputs fingerprint", "--train")
    with HashCache() as cache:
        for content, out in ((generate_inputs(gen, cache), generate_out), (train_inputs(train, cache), train_out)):
            atomic_write(out, json.dumps(content, indent=2, sort_keys=True) + "\n")
        log.info("fingerprinted the inputs: %d files from the hash cache, %d read (cache %s)", cache.hits,
                 cache.misses, cache.path)
