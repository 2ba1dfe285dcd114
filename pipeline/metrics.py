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


def _clf_curve(scores, n_id):
    """Counts of ID and OOD samples scored at or above each distinct score, highest first.

    The binary classification curve of scikit-learn (``_binary_clf_curve``, now
    ``confusion_matrix_at_thresholds``) with OOD as the positive class, from one sort.

    Parameters
    ----------
    scores : ndarray of shape (n_id + n_ood,)
        The ID scores followed by the OOD scores.
    n_id : int
        How many of ``scores`` come first and are ID.

    Returns
    -------
    fps : ndarray of shape (n_thresholds,), dtype int64
        ID samples (false positives) scored at or above each distinct score.
    tps : ndarray of shape (n_thresholds,), dtype int64
        OOD samples (true positives) scored at or above each distinct score.
    """
    # The order inside a run of tied scores does not change the counts at its
    # end, so an ascending stable sort read backwards serves as sklearn's
    # descending one.
    order = np.argsort(scores, kind="stable")[::-1]
    ranked = scores[order]
    # != rather than sklearn's nonzero diff: the same for finite scores, without the subtraction.
    ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), scores.size - 1)
    tps = np.cumsum(order >= n_id)[ends]
    return ends + 1 - tps, tps


def _trapezoid(y, x):
    """``np.trapezoid(y, x)``, spelled out: the same operations in the same order, hence the same rounding."""
    return (np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum()


def _roc_auc(fps, tps):
    """AUROC from the curve of :func:`_clf_curve`, computed as ``roc_auc_score`` does.

    Parameters
    ----------
    fps, tps : ndarray of shape (n_thresholds,)
        Negatives and positives scored at or above each distinct score, highest first.

    Returns
    -------
    float
        The trapezoid area under the ROC curve, ties counting half.
    """
    if fps.size > 2:
        # roc_curve's drop_intermediate=True. Dropping collinear points leaves the
        # area unchanged but not its rounding, and the reports should not move.
        corner = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        keep = np.concatenate([[True], corner, [True]])
        fps, tps = fps[keep], tps[keep]
    fpr = np.concatenate([[0], fps]) / fps[-1]
    tpr = np.concatenate([[0], tps]) / tps[-1]
    return float(_trapezoid(tpr, fpr))


def _fpr_at_recall(fps, tps, recall=0.95):
    """FPR at the first ROC operating point whose TPR reaches ``recall``.

    Parameters
    ----------
    fps : ndarray of shape (n_thresholds,)
        ID samples (negatives) scored at or above each distinct score, highest first.
    tps : ndarray of shape (n_thresholds,)
        OOD samples (positives) scored at or above each distinct score.
    recall : float, default=0.95
        The OOD recall (TPR) to reach, in (0, 1].

    Returns
    -------
    float
        Fraction of ID samples scored at or above that threshold.
    """
    # Every distinct score is a point (roc_curve's drop_intermediate=False): dropping
    # collinear points would skip the exact first point with TPR >= recall on a
    # diagonal run of ties. The (0, 0) point comes first, as in roc_curve.
    tpr = np.concatenate([[0], tps]) / tps[-1]
    # tpr is non-decreasing and ends at 1, so the index exists for recall <= 1; and
    # at >= 1, as tpr[0] = 0 < recall, so the point is fps[at - 1] without the (0, 0).
    at = np.searchsorted(tpr, recall, side="left")
    return float(fps[at - 1] / fps[-1])


def _aupr(fps, tps, rule):
    """Area under the precision-recall curve, computed as scikit-learn does.

    Parameters
    ----------
    fps, tps : ndarray of shape (n_thresholds,)
        Negatives and positives ranked at or above each distinct threshold,
        from the highest threshold down (``tps[-1]`` is the number of positives).
    rule : {"average_precision", "trapezoid"}
        ``average_precision_score``'s step-wise sum, or ``auc(recall, precision)``
        on ``precision_recall_curve``.

    Returns
    -------
    float
    """
    # precision_recall_curve's output: recall decreasing, ending at the point
    # (recall 0, precision 1). Summing in its order keeps its rounding.
    precision = np.append((tps / (tps + fps))[::-1], 1.0)
    recall = np.append((tps / tps[-1])[::-1], 0.0)
    if rule == "average_precision":
        # sklearn clips the -0.0 that rounding can give.
        return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))
    # auc() integrates a decreasing x with the sign flipped.
    return float(-_trapezoid(precision, recall))


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

    Notes
    -----
    All four come from one sort of the pooled scores, in numpy alone. They equal
    scikit-learn's ``roc_auc_score``, ``roc_curve(drop_intermediate=False)``,
    ``average_precision_score`` and ``auc(*precision_recall_curve(...)[1::-1])``
    (the tests hold them to 1e-12; as the same operations run in the same order,
    they normally agree to the last bit), about 40 times faster: scikit-learn
    validates its inputs at every call, and sorts once per metric.
    """
    if isinstance(recall, bool) or not (isinstance(recall, numbers.Real) and 0 < recall <= 1):
        raise invalid_param("recall", "ood_metrics", "a float in (0, 1]", recall)
    if aupr not in AUPR_RULES:
        raise invalid_param("aupr", "ood_metrics", f"one of {list(AUPR_RULES)}", aupr)
    scores_id = _as_scores(scores_id, "scores_id")
    scores_ood = _as_scores(scores_ood, "scores_ood")
    fps, tps = _clf_curve(np.concatenate([scores_id, scores_ood]), scores_id.size)
    # AUPR-In ranks by -score: the same runs of ties in reverse order. At the run
    # of score v, the ID (positives) with score <= v are those not above v,
    # i.e. not counted at the previous (higher) run of the OOD-positive curve.
    ids_in = scores_id.size - np.concatenate([[0], fps[:-1]])[::-1]
    oods_in = scores_ood.size - np.concatenate([[0], tps[:-1]])[::-1]
    return {
        "auroc": _roc_auc(fps, tps),
        fpr_key(recall): _fpr_at_recall(fps, tps, recall),
        "aupr_in": _aupr(oods_in, ids_in, aupr),
        "aupr_out": _aupr(fps, tps, aupr),
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
