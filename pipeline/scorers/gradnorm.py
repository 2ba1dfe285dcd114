"""GradNorm: the L1 norm of the head's gradient of the loss against uniform labels, from cached features.

Huang, Geng & Li (2021), "On the Importance of Gradients for Detecting
Distributional Shifts in the Wild", NeurIPS.
"""

from __future__ import annotations

import numbers
from numbers import Real

import numpy as np
from scipy.special import softmax
from sklearn.utils._param_validation import Interval

from pipeline.errors import invalid_param
from pipeline.scorers.base import BaseScorer
from pipeline.scorers.energy import head_logits, read_head


def gradnorm_scores(a, weight, bias, temperature=1.0):
    """Negated GradNorm, ``-(1 / T) * sum_c |C p_c - 1| * sum_j |a_j|``; higher = more OOD.

    The reference's loss for one sample is ``L = -sum_c log softmax(z / T)_c``
    (all-ones targets) with ``z = W a + b``. Its gradient is
    ``dL/dz_c = (C p_c - 1) / T`` with ``p = softmax(z / T)``, so
    ``dL/dW = (C p - 1) a^T / T``, a rank-one matrix whose entry-wise L1 norm
    factorises into the two sums above. No backward pass is needed.

    Parameters
    ----------
    a : ndarray of shape (n_samples, n_features)
        Penultimate features.
    weight : ndarray of shape (n_classes, n_features)
    bias : ndarray of shape (n_classes,)
    temperature : float, default=1.0
        ``T > 0``.

    Returns
    -------
    scores : ndarray of shape (n_samples,)
        ``-||dL/dW||_1`` (float64).
    """
    p = softmax(head_logits(a, weight, bias) / temperature, axis=1)
    n_classes = weight.shape[0]
    return -np.abs(n_classes * p - 1.0).sum(axis=1) * np.abs(a).sum(axis=1) / temperature


class GradNormScorer(BaseScorer):
    """GradNorm (Huang et al., NeurIPS 2021): the head's gradient norm, from cached features.

    With ``z = W a + b`` and ``p = softmax(z / T)``:

    ``score(x) = -(1 / T) * sum_c |C p_c - 1| * sum_j |a_j|``

    the negated L1 norm of the gradient, w.r.t. the final linear layer's
    weight, of ``-sum_c log p_c`` (the cross-entropy against all-ones targets,
    ``C`` times ``KL(uniform || p)`` up to a constant). The gradient is higher
    for ID data, so it is negated here (higher = more OOD).

    Follows the authors' ``iterate_data_gradnorm`` (github.com/deeplearning-wisc/
    gradnorm_ood, ``test_ood.py``: batch size 1, ``targets = ones(C)``,
    ``outputs / T``, ``--temperature_gradnorm 1``) and OpenOOD v1.5's
    ``openood/postprocessors/gradnorm_postprocessor.py`` (``configs/
    postprocessors/gradnorm.yml``: no parameters, T = 1): both take the
    weight's gradient only, not the bias's. The factorised form equals their
    per-sample autograd result (tested against torch to 1e-6). OpenOOD
    hard-codes ``targets = ones(1, 1000)``, which only fits 1000 classes; the
    authors' ``num_classes`` is used here. Needs ``Features.penultimate``,
    ``head_weight`` and ``head_bias``; nothing to fit.

    Huang, Geng & Li, "On the Importance of Gradients for Detecting
    Distributional Shifts in the Wild", NeurIPS 2021.

    Parameters
    ----------
    temperature : float, default=1.0
        ``T > 0``.
    """

    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, *, temperature=1.0):
        self.temperature = temperature

    def fit(self, features, y=None):
        """Check the parameters; there is nothing to learn.

        Parameters
        ----------
        features : Features
        y : ignored

        Returns
        -------
        self : GradNormScorer
        """
        self._check_temperature()
        return super().fit(features)

    def score(self, features):
        """Negated L1 norm of the head's weight gradient.

        Parameters
        ----------
        features : Features
            Needs ``penultimate`` (n_samples, D), ``head_weight`` (C, D) and ``head_bias`` (C,).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher = more OOD.
        """
        self._check_temperature()
        a, weight, bias = read_head(features, "GradNorm")
        return gradnorm_scores(a, weight, bias, float(self.temperature))

    def _check_temperature(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (0 < t < np.inf):
            raise invalid_param("temperature", "GradNorm", "a positive finite float", t)
