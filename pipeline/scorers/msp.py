"""Maximum softmax probability (MSP).

Hendrycks & Gimpel (2017), "A Baseline for Detecting Misclassified and
Out-of-Distribution Examples in Neural Networks", ICLR.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import check_matrix


def msp_scores(logits):
    """Negated maximum softmax probability, ``-max_c softmax(logits)_c``.

    Computed stably as ``-exp(max(logits) - logsumexp(logits))``.

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        float64 in [-1, -1/n_classes]; higher = more OOD.
    """
    logits = np.asarray(logits, dtype=np.float64)
    return -np.exp(logits.max(axis=1) - logsumexp(logits, axis=1))


class MSPScorer(BaseScorer):
    """Maximum softmax probability baseline (Hendrycks & Gimpel, ICLR 2017).

    ``score(x) = -max_c softmax(logits(x))_c``

    The paper's score (the confidence) is higher = more ID; it is negated here
    so that higher = more OOD. Reads ``Features.logits`` only; nothing to fit.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks", ICLR 2017.
    """

    def score(self, features):
        """Negated maximum softmax probability.

        Parameters
        ----------
        features : Features
            Needs ``logits`` of shape (n_samples, n_classes).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        (logits,) = features.require("logits", owner="MSP")
        return msp_scores(check_matrix(logits, "logits", "MSP"))
