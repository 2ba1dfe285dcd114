"""Entropy of the softmax: the flatter the predictive distribution, the more OOD.

No single paper introduced it; it is the standard uncertainty baseline (used
for OOD detection e.g. by Malinin & Gales (2018), "Predictive Uncertainty
Estimation via Prior Networks", NeurIPS). Reference code: pytorch-ood's
``src/pytorch_ood/detector/entropy.py`` (OpenOOD v1.5 has no entropy
postprocessor).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import check_matrix


def entropy_scores(logits):
    """Shannon entropy of ``softmax(logits)``, ``-sum_c p_c log p_c`` (natural log).

    Computed from ``log_softmax`` (no overflow for huge logits; a probability
    that underflows to 0 adds 0, its limit).

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        float64 in [0, log(n_classes)]; higher = more OOD.
    """
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    return -(np.exp(log_p) * log_p).sum(axis=1)


class EntropyScorer(BaseScorer):
    """Entropy of the softmax (the standard uncertainty baseline).

    ``score(x) = -sum_c p_c(x) log p_c(x)``, ``p(x) = softmax(logits(x))``

    Higher entropy = flatter posterior = more OOD, so the entropy is the score
    as it is. This is pytorch-ood's ``Entropy`` detector
    (``src/pytorch_ood/detector/entropy.py``), except that pytorch-ood clips
    ``p`` to ``[1e-7, 1]`` before the log; here the exact entropy is computed
    from ``log_softmax``. Reads ``Features.logits`` only; nothing to fit.

    Malinin & Gales, "Predictive Uncertainty Estimation via Prior Networks",
    NeurIPS 2018 (entropy of the predictive distribution as an OOD score).
    """

    def score(self, features):
        """Entropy of the softmax of the logits.

        Parameters
        ----------
        features : Features
            Needs ``logits`` of shape (n_samples, n_classes).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        (logits,) = features.require("logits", owner="Entropy")
        return entropy_scores(check_matrix(logits, "logits", "Entropy"))
