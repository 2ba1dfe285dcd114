"""Do two artifacts belong together? One place for every such check, with one message.

The pipeline hands on four artifacts, each recording where it came from:

* the **model** (``cache/model.pt``): its own SHA-256;
* the **feature store**: its ``key`` (everything that determined its content)
  and ``provenance["checkpoint_sha256"]``, the model it was extracted with;
* the **detectors**: the store's key and checkpoint they were fitted on, and
  their own identity, the ``digest`` of their seal (:mod:`pipeline.artifacts`);
* the **guard thresholds**: the detectors' digest and the checkpoint they were
  calibrated for.

A stage that reads two of them calls one function here before any work. A
mismatch raises :class:`ProvenanceError` in one line that names both
artifacts and both hashes, so the user sees which of the two is stale::

    error: The detectors 'cache/detectors' were fitted on features of checkpoint
    <sha256 A>, but the feature store 'cache/features.zarr' holds features of
    checkpoint <sha256 B>. Hint: ...

Nothing here imports torch: a model is identified by the SHA-256 of its file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import file_sha256
from pipeline.errors import DataError, ProvenanceError  # noqa: F401  (raised here, imported from here too)

REFIT = "rerun `layerscope fit` on this store (or `dvc repro`)."
RECALIBRATE = "rerun `layerscope calibrate` with these detectors (or `dvc repro`)."


@dataclass(frozen=True)
class Claim:
    """What one artifact says about one identity.

    Attributes
    ----------
    who : str
        The artifact, e.g. ``"the feature store 'cache/features.zarr'"``.
    says : str
        The relation, e.g. ``"holds features of checkpoint"``.
    value : str or None
        The hash; None when the artifact did not record it.
    """

    who: str
    says: str
    value: str | None

    def __str__(self):
        return f"{self.who} {self.says} {self.value if self.value is not None else '(not recorded)'}"


def require_same(first: Claim, second: Claim, hint: str):
    """Raise :class:`ProvenanceError` naming both claims unless their values are equal."""
    if first.value != second.value:
        text = f"{first}, but {second}. Hint: {hint}"
        raise ProvenanceError(text[0].upper() + text[1:])


# ------------------------------------------------------------------ who is who


def store_name(store) -> str:
    return f"the feature store '{store.path}'"


def detectors_name(fitted) -> str:
    return f"the detectors '{fitted.source}'" if fitted.source else "the detectors (not saved)"


def thresholds_name(path) -> str:
    return f"the guard thresholds '{path}'" if path else "the guard thresholds"


def model_sha256(model_path) -> str:
    """SHA-256 of a checkpoint file; one-line error if it does not exist."""
    path = Path(model_path)
    if not path.is_file():
        raise DataError(f"Model checkpoint '{path}' does not exist. Hint: run `layerscope train` (or `dvc repro "
                        "train`), or pass --model with the checkpoint the store was extracted with.")
    return file_sha256(path)


# ------------------------------------------------------------------ the checks


def store_checkpoint(store) -> Claim:
    return Claim(store_name(store), "holds features of checkpoint", store.provenance.get("checkpoint_sha256"))


def model_checkpoint(model_path, model_sha: str) -> Claim:
    return Claim(f"the model '{model_path}'", "has SHA-256", model_sha)


def fitted_checkpoint(fitted) -> Claim:
    return Claim(detectors_name(fitted), "were fitted on features of checkpoint", fitted.checkpoint_sha256)


def check_store_model(store, model_path):
    """The store must have been extracted with the checkpoint at ``model_path``; no check if it is None."""
    if model_path is None:
        return
    require_same(store_checkpoint(store), model_checkpoint(model_path, model_sha256(model_path)),
                 hint="rerun `dvc repro` (it re-extracts the store with this model), or pass the --model the store "
                      "was extracted with.")


def check_detectors_store(fitted, store):
    """The detectors must have been fitted on ``store``: same checkpoint, then same store key."""
    require_same(fitted_checkpoint(fitted), store_checkpoint(store), hint=REFIT)
    require_same(Claim(detectors_name(fitted), "were fitted on the feature store with key", fitted.store_key),
                 Claim(store_name(store), "has key", store.key), hint=REFIT)


def check_detectors_model(fitted, model_path, model_sha: str):
    """The detectors must have been fitted on features of the checkpoint at ``model_path``."""
    require_same(fitted_checkpoint(fitted), model_checkpoint(model_path, model_sha),
                 hint="rerun `dvc repro` (extract, fit and calibrate with this model), or pass the --model and "
                      "--detectors that belong together.")


def check_thresholds_detectors(content: dict, fitted, thresholds_path=None):
    """The thresholds must have been calibrated with exactly these detectors (their seal digest)."""
    require_same(Claim(thresholds_name(thresholds_path), "were calibrated with the detectors of digest",
                       content.get("detectors_digest")),
                 Claim(detectors_name(fitted), "have digest", fitted.digest), hint=RECALIBRATE)


def check_thresholds_checkpoint(content: dict, other: Claim, thresholds_path=None):
    """The thresholds must have been calibrated for the checkpoint ``other`` names (a model's or a store's)."""
    require_same(Claim(thresholds_name(thresholds_path), "were calibrated for checkpoint",
                       content.get("checkpoint_sha256")), other, hint=RECALIBRATE)
