"""layerscope: out-of-distribution detection from a classifier's intermediate layers.

Score convention, written once for the whole project: every scorer and detector
returns scores where **higher means more out-of-distribution**. OOD is the
positive class in every metric (see :mod:`pipeline.metrics`).
"""

__version__ = "0.1.0"
