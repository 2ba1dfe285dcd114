"""``python -m pipeline`` is the ``layerscope`` command."""

from pipeline.cli import run

run()
