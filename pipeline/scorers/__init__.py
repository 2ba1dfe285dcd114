"""Network-level post-hoc scorers over cached features, by name.

Each reads a :class:`~pipeline.scorers.base.Features` bundle (logits, the
penultimate features and the head, pooled activations and NAC-UE gradients)
and never the network. Scores are higher = more OOD.
"""

from __future__ import annotations

import inspect

import pipeline._sklearn  # noqa: F401  (first: scikit-learn without pandas, see there)
from pipeline.errors import ConfigError, invalid_param
from pipeline.scorers.ash import AshScorer
from pipeline.scorers.base import BaseScorer, Features
from pipeline.scorers.dice import DICEScorer
from pipeline.scorers.energy import EnergyScorer
from pipeline.scorers.entropy import EntropyScorer
from pipeline.scorers.fdbd import FDBDScorer
from pipeline.scorers.gen import GENScorer
from pipeline.scorers.gradnorm import GradNormScorer
from pipeline.scorers.gram import GramScorer
from pipeline.scorers.heatmap import HeatmapScorer
from pipeline.scorers.klm import KLMatchingScorer
from pipeline.scorers.maxlogit import MaxLogitScorer
from pipeline.scorers.msp import MSPScorer
from pipeline.scorers.nac import NACScorer
from pipeline.scorers.nnguide import NNGuideScorer
from pipeline.scorers.odin import ODINScorer
from pipeline.scorers.openmax import OpenMaxScorer
from pipeline.scorers.rankfeat import RankFeatScorer
from pipeline.scorers.react import ReActScorer
from pipeline.scorers.relation import RelationScorer
from pipeline.scorers.residual import ResidualScorer
from pipeline.scorers.scale import ScaleScorer
from pipeline.scorers.she import SHEScorer
from pipeline.scorers.tempscale import TempScaleScorer
from pipeline.scorers.vim import ViMScorer

#: name -> (class, fixed constructor arguments)
SCORERS = {
    "msp": (MSPScorer, {}),
    "maxlogit": (MaxLogitScorer, {}),
    "ebo": (EnergyScorer, {}),
    "tempscale": (TempScaleScorer, {}),
    "entropy": (EntropyScorer, {}),
    "gen": (GENScorer, {}),
    "klm": (KLMatchingScorer, {}),
    "scale": (ScaleScorer, {}),
    "ash_p": (AshScorer, {"variant": "p"}),
    "ash_b": (AshScorer, {"variant": "b"}),
    "ash_s": (AshScorer, {"variant": "s"}),
    "react": (ReActScorer, {}),
    "vim": (ViMScorer, {}),
    "nac_ue": (NACScorer, {}),
    "heatmap": (HeatmapScorer, {}),
    "dice": (DICEScorer, {}),
    "gradnorm": (GradNormScorer, {}),
    "residual": (ResidualScorer, {}),
    "fdbd": (FDBDScorer, {}),
    "nnguide": (NNGuideScorer, {}),
    "relation": (RelationScorer, {}),
    "she": (SHEScorer, {}),
    "openmax": (OpenMaxScorer, {}),
    # extraction-time methods: they read what extract.gram / extract.odin / extract.rankfeat stored
    "gram": (GramScorer, {}),
    "odin": (ODINScorer, {}),
    "rankfeat": (RankFeatScorer, {}),
}


def available_scorers() -> list[str]:
    return sorted(SCORERS)


def make_scorer(name: str, params=None, *, where="detect.methods") -> BaseScorer:
    """Build the scorer registered as ``name`` with ``params`` (checked by name; ``where`` names the section)."""
    if name not in SCORERS:
        raise invalid_param(where, where.split(".")[0], f"one of {available_scorers()}", name,
                            hint="per-layer detectors (knn, ecod, ...) go under fit.detectors.")
    cls, fixed = SCORERS[name]
    params = dict(params or {})
    accepted = sorted(p for p in inspect.signature(cls).parameters if p not in fixed)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"Unknown parameter {unknown[0]!r} for method '{name}' in {where}. "
                          f"Accepted parameters are {accepted}.")
    return cls(**fixed, **params)


__all__ = ["SCORERS", "BaseScorer", "Features", "available_scorers", "make_scorer"]
