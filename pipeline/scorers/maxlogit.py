"""Maximum logit (MaxLogit).

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song (2022),
"Scaling Out-of-Distribution Detection for Real-World Settings", ICML.
"""

from __future__ import annotations

import numpy as np

from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import check_matrix


def maxlogit_scores(logits):
    """Negated maximum logit, ``-max_c logits_c``.

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        float64; higher = more OOD.
    """
    return -np.asarray(logits, dtype=np.float64).max(axis=1)


class MaxLogitScorer(BaseScorer):
    """Maximum logit (Hendrycks et al., ICML 2022).

    ``score(x) = -max_c logits(x)_c``

    The paper's score (the max logit) is higher = more ID; it is negated here
    so that higher = more OOD. Reads ``Features.logits`` only; nothing to fit.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
    Settings", ICML 2022.
    """

    def score(self, features):
        """Negated maximum logit.

        Parameters
        ----------
        features : Features
            Needs ``logits`` of shape (n_samples, n_classes).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        (logits,) = features.require("logits", owner="MaxLogit")
        return maxlogit_scores(check_matrix(logits, "logits", "MaxLogit"))
