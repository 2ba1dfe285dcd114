"""The roles a split plays in a benchmark, written once (``generate`` writes them; ``detect`` and ``search`` read them).

* ``"id"``: ID data (``id_train``, ``id_val``, ``id_test``).
* ``"near"`` / ``"far"`` (:data:`GROUPS`): reported OOD sets; a group figure is
  the unweighted mean over its sets.
* ``"ood_val"`` (:data:`OOD_VAL`): an OOD set kept for selection only (OpenOOD
  v1.5's ``val_<set>`` lists, ``generate.ood_val``). It stands for both groups on
  the val part and is never reported.
* ``"aux"``: auxiliary outliers a method trains on (``generate.aux``); never reported.

A module of its own, with no imports, so that ``generate`` and ``detect`` share
the names without importing each other's dependencies.
"""

GROUPS = ("near", "far")
OOD_VAL = "ood_val"
