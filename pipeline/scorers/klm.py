"""KL matching: the KL divergence from a sample's softmax to the nearest class template.

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song (2022),
"Scaling Out-of-Distribution Detection for Real-World Settings", ICML.
Reference code: OpenOOD v1.5's ``openood/postprocessors/kl_matching_postprocessor.py``
(``KLMatchingPostprocessor``, ``configs/postprocessors/klm.yml``: no arguments).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, logsumexp

from pipeline.errors import DataError
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import check_matrix


def klm_templates(logits):
    """Class templates: the mean softmax of the samples predicted as each class, as logs.

    ``log d_k = logsumexp_{i: argmax z_i = k} log_softmax(z_i) - log n_k``,
    the log of ``d_k = mean_{i: argmax z_i = k} softmax(z_i)`` computed in log
    space (finite for any finite logits, where ``softmax`` could underflow to 0).

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)

    Returns
    -------
    classes : ndarray of shape (n_templates,)
        The predicted classes (the others have no template).
    log_templates : ndarray of shape (n_templates, n_classes)
    """
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    pred = log_p.argmax(axis=1)
    classes = np.unique(pred)
    log_templates = np.stack([logsumexp(log_p[pred == k], axis=0) - np.log(np.sum(pred == k)) for k in classes])
    return classes, log_templates


def klm_scores(logits, log_templates):
    """``min_k KL(softmax(logits) || d_k)``; higher = more OOD.

    ``KL(p || d_k) = sum_c p_c (log p_c - log d_kc)``, for all templates at
    once as ``sum_c p_c log p_c - p @ log_templates.T``. Values a rounding
    error below 0 are set to 0.

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)
    log_templates : ndarray of shape (n_templates, n_classes)
        From :func:`klm_templates`.

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        float64, >= 0.
    """
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    p = np.exp(log_p)
    kl = (p * log_p).sum(axis=1)[:, None] - p @ log_templates.T
    return np.maximum(kl.min(axis=1), 0.0)


class KLMatchingScorer(BaseScorer):
    """KL matching (Hendrycks et al., ICML 2022).

    ``fit``: for every class ``k`` predicted on the ID rows ``fit`` gets, the
    template ``d_k = mean_{i: argmax z_i = k} softmax(z_i)`` (no labels: the
    predicted class). Then

    ``score(x) = min_k KL(softmax(logits(x)) || d_k)``

    This is OpenOOD v1.5's ``KLMatchingPostprocessor``
    (``openood/postprocessors/kl_matching_postprocessor.py``): the same
    templates, ``scipy.stats.entropy(p, d_k)`` minimised over ``k`` by
    ``pairwise_distances_argmin_min``; OpenOOD returns ``-min KL`` (higher =
    more ID), negated here so that higher = more OOD. Where they differ:

    - OpenOOD builds the templates from ID-*val* (the paper, from validation
      data); here they come from what ``fit`` gets, which the pipeline makes
      ID-train (ID-val is kept for standardisation and selection, and is the
      ID side of a search: templates from it would score their own rows). On a
      network that fits its training set closely, ID-train templates are
      peakier than held-out ones.
    - A class no ID row is predicted as gets OpenOOD's one-hot template, whose
      KL from any softmax with full support is ``+inf``: it can never be the
      minimum, so here such classes simply have no template (``classes_``).
    - The KL is computed from ``log_softmax`` and log templates, finite for
      huge logits (where OpenOOD's float32 softmax underflows to 0 and its KL
      becomes ``inf``).

    pytorch-ood's ``KLMatching`` (``src/pytorch_ood/detector/klmatching.py``)
    uses the template of the predicted class only, not the minimum over
    classes that the paper and OpenOOD use; that variant is not followed.
    Reads ``Features.logits`` only.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
    Settings", ICML 2022.

    Attributes
    ----------
    classes_ : ndarray of shape (n_templates,)
        Classes with a template (predicted at least once in ``fit``).
    log_templates_ : ndarray of shape (n_templates, n_classes)
        ``log d_k``.
    """

    learns = True  # fit reads ID-train logits

    _parameter_constraints: dict = {}

    def fit(self, features, y=None):
        """Build the class templates from the ID logits.

        Parameters
        ----------
        features : Features
            Needs ``logits`` of shape (n_samples, n_classes), n_samples >= 1.
        y : ignored

        Returns
        -------
        self : KLMatchingScorer
        """
        (logits,) = features.require("logits", owner="KLMatching")
        logits = check_matrix(logits, "logits", "KLMatching")
        if len(logits) == 0:
            raise DataError("KLMatching needs at least one ID row to build its templates; got none.")
        self.classes_, self.log_templates_ = klm_templates(logits)
        return self

    def score(self, features):
        """KL divergence to the nearest class template.

        Parameters
        ----------
        features : Features
            Needs ``logits`` of shape (n_samples, n_classes).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        self._check_fitted()
        (logits,) = features.require("logits", owner="KLMatching")
        logits = check_matrix(logits, "logits", "KLMatching")
        if logits.shape[1] != self.log_templates_.shape[1]:
            raise DataError(f"KLMatching was fitted on {self.log_templates_.shape[1]} logit columns; "
                            f"got {logits.shape[1]}.")
        return klm_scores(logits, self.log_templates_)
