"""ODIN: temperature scaling and input perturbation (Liang, Li & Srikant, ICLR 2018).

ODIN perturbs the input along its own gradient, so it cannot be computed from
cached features: ``extract.odin`` computes the confidence of every declared
(temperature, noise) pair at extraction (:func:`pipeline.extract.odin_steps`,
:func:`pipeline.extract.odin_confidences`), and this scorer reads its column.
Reference code: OpenOOD v1.5's ``openood/postprocessors/odin_postprocessor.py``
(adapted from ``facebookresearch/odin``), ``configs/postprocessors/odin.yml``.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval

from pipeline.errors import ConfigError, DataError
from pipeline.scorers.base import BaseScorer, Features

HINT = "each new setting costs a pass through the network: add it to extract.odin.{} and rerun extract."


def odin_column(odin, grid, temperature, noise):
    """The stored confidences of one (temperature, noise) setting, shape (n_samples,).

    Parameters
    ----------
    odin : ndarray of shape (n_samples, n_temperatures, n_noises)
    grid : tuple
        ``(temperatures, noises)`` of ``odin``'s last two axes.
    temperature, noise : float

    Raises
    ------
    DataError
        One line naming ``extract.odin`` when the setting was not extracted.
    """
    temperatures, noises = (np.asarray(v, dtype=np.float64) for v in grid)
    i = np.flatnonzero(np.isclose(temperatures, temperature, rtol=1e-9, atol=0))
    j = np.flatnonzero(np.isclose(noises, noise, rtol=1e-9, atol=1e-15))
    if not len(i) or not len(j):
        missing = "temperatures" if not len(i) else "noises"
        raise DataError(f"ODIN's setting temperature={temperature:g}, noise={noise:g} was not extracted: the store "
                        f"holds temperatures {temperatures.tolist()} and noises {noises.tolist()}. Hint: "
                        + HINT.format(missing))
    return np.asarray(odin, dtype=np.float64)[:, i[0], j[0]]


class ODINScorer(BaseScorer):
    """ODIN (Liang, Li & Srikant, ICLR 2018): negated confidence after temperature scaling and perturbation.

    ``x~ = x - noise * sign(-grad_x log softmax_{y^}(f(x) / T))``, ``y^`` the
    predicted class, and ``score(x) = -max_c softmax(f(x~) / T)_c``: OpenOOD
    v1.5's ``conf``, negated so that higher = more OOD. ``x`` is the image
    before the model's normalisation, where OpenOOD's ``noise * sign / std``
    step in normalised space is ``noise * sign``.

    The confidences are computed at extraction for every pair of
    ``extract.odin.temperatures`` and ``extract.odin.noises``; this scorer only
    reads the column of its own setting, and refuses one that was not
    extracted. Nothing is learned: a search over the stored grid reads columns.

    Parameters
    ----------
    temperature : float, default=1000.0
        OpenOOD v1.5's default (its sweep: 1, 10, 100, 1000).
    noise : float, default=0.0014
        Perturbation size in [0, 1] pixel units; OpenOOD v1.5's default (its sweep: 0.0014, 0.0028).
    """

    refit_free_params = ("temperature", "noise")

    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")],
                              "noise": [Interval(Real, 0, None, closed="left")]}

    def __init__(self, *, temperature=1000.0, noise=0.0014):
        self.temperature = temperature
        self.noise = noise

    def fit(self, features, y=None):
        """Check the parameters; there is nothing to learn. Returns self."""
        self.check_params()
        return super().fit(features)

    def set_refit_free(self, **params):
        """Change ``temperature`` and/or ``noise`` (another stored column); returns self."""
        unknown = sorted(set(params) - set(self.refit_free_params))
        if unknown:
            raise ConfigError(f"ODIN can change only {list(self.refit_free_params)} without refitting; "
                              f"got {unknown[0]!r}.")
        self.set_params(**params)
        return self.check_params()

    def score(self, features: Features) -> np.ndarray:
        """Negated stored ODIN confidence of this setting; shape (n_samples,), higher = more OOD."""
        self.check_params()
        if features.odin is None:
            raise DataError("ODIN needs confidences computed at extraction (extract.odin), which this store does not "
                            "hold. Hint: set extract.odin: {temperatures: [1000], noises: [0.0014]} and rerun "
                            "extract; each setting costs a pass through the network.")
        return -odin_column(features.odin, features.odin_grid, float(self.temperature), float(self.noise))
