"""``python -m pipeline`` is the ``layerscope`` command."""

from pipeline.cli import app

app(prog_name="layerscope")
