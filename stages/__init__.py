"""Thin DVC stages: read their params section, call the library, write outputs.

Output paths are given by ``dvc.yaml`` (its ``vars``), which the CLI passes in;
no stage keeps a second copy of a path.
"""
