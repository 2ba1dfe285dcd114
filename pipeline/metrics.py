"""OOD metrics, with the project's conventions written once.

Conventions (normative for every number layerscope reports):

- **OOD is the positive class.** ID samples are the negatives.
- **Scores are "higher = more OOD".** A score's direction is fixed per method,
  before any evaluation, and is never flipped by looking at the labels (a
  detector worse than chance reports an AUROC below 0.5, not ``1 - AUROC``).
- **AUROC**: the probability that a random OOD sample scores above a random
  ID sample, ties counting half.
- **FPR@95** (key ``fpr@95``; ``fpr@90`` at recall 0.9, see :func:`fpr_key`):
  the fraction of ID samples flagged as OOD at the threshold that detects 95%
  of the OOD samples, i.e. at the first operating point of the ROC curve whose
  OOD recall (TPR) is at least 0.95. This is the definition of OpenOOD v1.5 and
  pytorch-ood (``fpr_at_tpr``). It is **not** the older ODIN mirror definition
  (fraction of OOD accepted at 95% ID recall).
- **AUPR-In**: ID is the positive class, ranked by the negated score.
  **AUPR-Out**: OOD is the positive class, ranked by the score.
  By default both are average precision (scikit-learn's step-wise sum,
  ``aupr="average_precision"``). ``aupr="trapezoid"`` integrates the PR curve by
  the trapezoid rule, as OpenOOD and pytorch-ood do (``auc(recall, precision)``);
  the two differ slightly on small sets, and trapezoid is optimistic where the
  curve jumps (Davis & Goadrich 2006).
- Each OOD set is scored against the full ID test set; a group figure (near,
  far) is the unweighted mean over its data sets.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np

from pipeline.errors import DataError, invalid_param

log = logging.getLogger(__name__)

AUPR_RULES = ("average_precision", "trapezoid")


def fpr_key(recall: float = 0.95) -> str:
    """The FPR metric's key at OOD recall ``recall``: ``"fpr@95"`` for 0.95, ``"fpr@99.5"`` for 0.995."""
    return f"fpr@{round(float(recall) * 100, 6):g}"


def metric_names(recall: float = 0.95) -> tuple[str, ...]:
    """The keys of :func:`ood_metrics` at ``recall``: ``("auroc", "fpr@95", "aupr_in", "aupr_out")``."""
    return ("auroc", fpr_key(recall), "aupr_in", "aupr_out")


def _aupr(y_true, scores, rule):
    """Area under the precision-recall curve of positives ``y_true == 1`` ranked by ``scores``."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve

    if rule == "average_precision":
        return float(average_precision_score(y_true, scores))
    precision, recall, _ = precision_recall_curve(y_true, scores)
    return float(auc(recall, precision))


def _as_scores(values, name):
    """Check that ``values`` is a non-empty, finite 1-D array of numbers.

    Parameters
    ----------
    values : array-like of shape (n_samples,)
        The scores to check.
    name : str
        The argument's name, used in error messages.

    Returns
    -------
    scores : ndarray of shape (n_samples,), dtype float64
    """
    try:
        scores = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be an array of numbers: {exc}") from exc
    if scores.ndim != 1:
        raise DataError(f"{name} must be 1-D (one score per sample). Got shape {scores.shape}.")
    if scores.size == 0:
        raise DataError(f"{name} is empty: at least one score is needed.")
    n_bad = int(np.count_nonzero(~np.isfinite(scores)))
    if n_bad:
        raise DataError(
            f"{name} contains {n_bad} non-finite values (NaN or inf) out of {scores.size}. "
            "Hint: check the scorer's output for overflow or empty features."
        )
    return scores


def _fpr_at_recall(y_true, scores, recall=0.95):
    """FPR at the first ROC operating point whose TPR reaches ``recall``.

    Parameters
    ----------
    y_true : ndarray of shape (n_samples,)
        1 for OOD (positive), 0 for ID.
    scores : ndarray of shape (n_samples,)
        Higher = more OOD.
    recall : float, default=0.95
        The OOD recall (TPR) to reach, in (0, 1].

    Returns
    -------
    float
        Fraction of ID samples scored at or above that threshold.
    """
    from sklearn.metrics import roc_curve

    # drop_intermediate=False: sklearn otherwise drops collinear points, and on
    # a diagonal run of ties it would skip the exact first point with TPR >= recall.
    fpr, tpr, _ = roc_curve(y_true, scores, drop_intermediate=False)
    # tpr is non-decreasing and ends at 1, so the index always exists for recall <= 1.
    return float(fpr[np.searchsorted(tpr, recall, side="left")])


def ood_metrics(scores_id, scores_ood, *, recall=0.95, aupr="average_precision"):
    """AUROC, FPR at ``recall``, AUPR-In and AUPR-Out of one ID set against one OOD set.

    Parameters
    ----------
    scores_id : array-like of shape (n_id,)
        Scores of the ID test samples (higher = more OOD).
    scores_ood : array-like of shape (n_ood,)
        Scores of the OOD samples (higher = more OOD).
    recall : float, default=0.95
        OOD recall (TPR) at which the FPR is read, in (0, 1]. It names the
        key: ``fpr@95`` at 0.95, ``fpr@90`` at 0.9 (:func:`fpr_key`).
    aupr : {"average_precision", "trapezoid"}, default="average_precision"
        How the PR curves are integrated (see the module docstring).

    Returns
    -------
    dict of str to float
        Keys :func:`metric_names` ``(recall)``: ``auroc``, ``fpr@95``,
        ``aupr_in``, ``aupr_out`` (see the module docstring for their exact definitions).

    Raises
    ------
    DataError
        If either input is not 1-D, is empty or has NaN/inf values.
    ConfigError
        If ``recall`` is not in (0, 1].
    """
    from sklearn.metrics import roc_auc_score  # scikit-learn: only where metrics are computed (not in summary)

    if isinstance(recall, bool) or not (isinstance(recall, numbers.Real) and 0 < recall <= 1):
        raise invalid_param("recall", "ood_metrics", "a float in (0, 1]", recall)
    if aupr not in AUPR_RULES:
        raise invalid_param("aupr", "ood_metrics", f"one of {list(AUPR_RULES)}", aupr)
    scores_id = _as_scores(scores_id, "scores_id")
    scores_ood = _as_scores(scores_ood, "scores_ood")
    scores = np.concatenate([scores_id, scores_ood])
    is_ood = np.concatenate([np.zeros(scores_id.size, int), np.ones(scores_ood.size, int)])
    return {
        "auroc": float(roc_auc_score(is_ood, scores)),
        fpr_key(recall): _fpr_at_recall(is_ood, scores, recall),
        "aupr_in": _aupr(1 - is_ood, -scores, aupr),
        "aupr_out": _aupr(is_ood, scores, aupr),
    }


def _group_mean(per_set, group, sets):
    """Unweighted mean of each metric over ``sets`` (all must share the same metrics)."""
    missing = [name for name in sets if name not in per_set]
    if missing:
        raise DataError(
            f"Group '{group}' names data sets {missing} that have no metrics. "
            f"Available: {sorted(per_set)}."
        )
    keys = list(per_set[sets[0]])
    for name in sets[1:]:
        if set(per_set[name]) != set(keys):
            raise DataError(
                f"Group '{group}': data set '{name}' has metrics {sorted(per_set[name])}, "
                f"but '{sets[0]}' has {sorted(keys)}; they cannot be averaged."
            )
    return {key: float(np.mean([per_set[name][key] for name in sets])) for key in keys}


def group_means(per_set, groups):
    """Unweighted mean of each metric over the data sets of each group.

    Parameters
    ----------
    per_set : dict of str to dict of str to float
        Metrics per OOD data set, e.g. ``{"svhn": {"auroc": 0.9, ...}, ...}``.
    groups : dict of str to list of str
        Data set names per group, e.g. ``{"near": ["cifar100", "tin"], "far": [...]}``.

    Returns
    -------
    dict of str to dict of str to float
        Mean metrics per group. Each data set weighs the same whatever its size
        (the OpenOOD v1.5 convention). A group with no data sets is omitted.

    Raises
    ------
    DataError
        If a group names a data set missing from ``per_set``, or if the data
        sets of a group do not share the same metric names.
    """
    means = {}
    for group, sets in groups.items():
        if not sets:
            log.debug("Group %r has no data sets; omitted.", group)
            continue
        means[group] = _group_mean(per_set, group, list(sets))
    return means


def accuracy(pred, labels):
    """Fraction of predictions equal to their labels.

    Parameters
    ----------
    pred : array-like of shape (n_samples,)
        Predicted class indices.
    labels : array-like of shape (n_samples,)
        True class indices.

    Returns
    -------
    float
        In [0, 1].

    Raises
    ------
    DataError
        If the inputs are empty, not 1-D, or of different lengths.
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.ndim != 1 or labels.ndim != 1:
        raise DataError(f"pred and labels must be 1-D. Got shapes {pred.shape} and {labels.shape}.")
    if pred.size != labels.size:
        raise DataError(f"pred has {pred.size} entries but labels has {labels.size}; they must match.")
    if pred.size == 0:
        raise DataError("pred and labels are empty: accuracy needs at least one sample.")
    return float(np.mean(pred == labels))
