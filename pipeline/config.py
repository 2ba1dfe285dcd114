"""Typed, validated parameters: one frozen dataclass per stage.

``params.yaml`` has one section per stage. Each stage reads only its own section
(DVC tracks the dotted params a stage lists, so a stage must not read more than it
declares). Values are checked once, here, and errors name the dotted parameter,
what was expected and what was received, the way scikit-learn words them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import ConfigError, invalid_param

DEVICE_HINT = "use 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'."


SOURCE_NAMES = ("cifar10", "cifar100", "svhn", "mnist", "fashionmnist", "imagefolder", "imglist", "constant")
BENCHMARKS = ("digits", "sources")


@dataclass(frozen=True)
class SourceSpec:
    """One data set of a ``sources`` benchmark (``generate.id_train``, ``generate.far.svhn``, ...).

    ``source`` names a loader of :mod:`pipeline.sources`; ``part`` is torchvision's
    train/test part; ``path`` is an ``imagefolder`` directory relative to
    ``generate.root``, or the folder an ``imglist``'s image paths are relative to
    (``generate.root`` itself when unset); ``n`` caps this set (seeded, shuffled)
    or sizes ``constant``; ``list`` is an ``imglist``'s list file (relative to
    ``generate.root``), e.g. OpenOOD v1.5's ``benchmark_imglist/cifar10/test_tin.txt``.
    """

    source: str
    part: str = "test"
    path: str | None = None
    n: int | None = None
    list: str | None = None

    def check(self, name: str):
        """Validate, naming the entry's dotted parameter (e.g. ``generate.far.texture``)."""
        _check_choice(f"{name}.source", self.source, SOURCE_NAMES)
        _check_choice(f"{name}.part", self.part, ("train", "test"))
        if self.source == "imagefolder" and not self.path:
            raise invalid_param(f"{name}.path", "generate", "a directory (relative to generate.root) for "
                                "source 'imagefolder'", self.path, hint="e.g. path: texture")
        if self.source == "imglist" and not self.list:
            raise invalid_param(f"{name}.list", "generate", "an image list file (relative to generate.root) for "
                                "source 'imglist'", self.list, hint="e.g. list: benchmark_imglist/cifar10/"
                                "test_tin.txt, path: images_classic (OpenOOD v1.5's layout).")
        if self.source != "imglist" and self.list is not None:
            raise invalid_param(f"{name}.list", "generate", f"null for source '{self.source}' (only source "
                                "'imglist' reads a list file)", self.list, hint="set source: imglist, or remove list.")
        if self.n is not None:
            _check_positive(f"{name}.n", self.n)

    def describe(self) -> str:
        """The data in a few words, for messages: ``"imagefolder places365"``, ``"svhn (test part)"``."""
        if self.source == "imagefolder":
            return f"imagefolder {self.path}"
        if self.source == "imglist":
            return f"imglist {self.list}"
        if self.source == "constant":
            return "constant colours"
        return f"{self.source} ({self.part} part)"

    def overlaps(self, other: SourceSpec, root: str = ".") -> bool:
        """Whether this set and ``other`` can read the same samples.

        Image folders overlap when one directory (under ``root``, normalised,
        symlinks followed) is or contains the other: ``ImageFolder`` walks its
        class folders recursively, and ignores ``part``. Image lists overlap when
        they are the same list file (OpenOOD's ``val_tin.txt`` and ``test_tin.txt``
        name disjoint images of one folder); no list is read here. ``constant``
        sets share their colours (one seed). Any other source overlaps itself in
        the same part.
        """
        if self.source != other.source:
            return False
        if self.source == "imagefolder":
            mine, theirs = Path(root, self.path).resolve(), Path(root, other.path).resolve()
            return mine == theirs or mine in theirs.parents or theirs in mine.parents
        if self.source == "imglist":
            return Path(root, self.list).resolve() == Path(root, other.list).resolve()
        return self.source == "constant" or self.part == other.part


@dataclass(frozen=True)
class GenerateConfig:
    """Parameters of the ``generate`` stage.

    ``benchmark: digits`` builds the embedded benchmark (the digits fields);
    ``benchmark: sources`` writes index files over the user's data sets under
    ``root`` (the ``id_*``, ``near``, ``far`` and cap fields). ``image_size``,
    ``seed`` and ``val_fraction`` serve both: in ``sources`` mode, ``val_fraction``
    of the ID test part becomes ID-val, and the same fraction of each OOD set
    becomes its val half (for selection; only the test halves are reported).

    ``verify_checksums`` (sources): CIFAR-10/100 and SVHN files must have the
    official archives' md5 (True), or are used when they parse, each mismatch
    named in a warning (False); see :func:`pipeline.sources.load_source`.

    Separate val sets, as OpenOOD v1.5 holds them out (its ``val_<set>.txt``
    lists), leave the test sets whole: ``id_val`` is then ID-val, whole, and
    ``id_test`` is ID-test, whole (no ``val_fraction`` cut). ``ood_val`` names
    OOD sets kept for selection only: each becomes one ``<name>_val`` split
    (role ``"ood_val"``, which :func:`pipeline.report.ood_sets` takes as the val
    sets of both groups), and with any of them every near/far set is one whole
    ``<set>_test`` split. Neither may read a test or ID-train sample.

    ``aux`` names auxiliary-outlier sets (seed 002's heatmap decoder trains on
    them, e.g. TinyImages-300k): each becomes one ``<name>_aux`` split, capped
    like an OOD set, that never enters the metrics. An aux set may not read the
    samples of a near/far set or of the ID data (see :meth:`SourceSpec.overlaps`).
    """

    benchmark: str = "digits"
    seed: int = 0
    image_size: int = 16
    val_fraction: float = 0.2
    # digits
    holdout_classes: tuple[int, ...] = (8, 9)
    test_fraction: float = 0.2
    n_synthetic: int = 400
    # sources
    root: str = "data/raw"
    download: bool = False
    verify_checksums: bool = True  # CIFAR/SVHN md5 against the official archives; false: use copies, with a warning
    channels: int = 3
    resize: int | None = None  # shorter side before the centre crop; image_size when unset
    max_train: int | None = None
    max_test: int | None = None
    max_ood: int | None = 10_000
    id_train: SourceSpec | None = None
    id_test: SourceSpec | None = None
    id_val: SourceSpec | None = None  # a separate ID-val set (OpenOOD's val_<id>.txt); unset: a cut of id_test
    near: Mapping[str, SourceSpec] = field(default_factory=dict)
    far: Mapping[str, SourceSpec] = field(default_factory=dict)
    ood_val: Mapping[str, SourceSpec] = field(default_factory=dict)  # OOD sets for selection only (val_<set>.txt)
    aux: Mapping[str, SourceSpec] = field(default_factory=dict)  # auxiliary outliers: never a test OOD set

    _AUX_HINT: typing.ClassVar[str] = ("point it at a separate folder such as TinyImages-300k "
                                       "({source: imagefolder, path: tinyimages300k}).")
    _VAL_HINT: typing.ClassVar[str] = ("point it at held-out data, e.g. OpenOOD's val lists ({source: imglist, "
                                       "list: benchmark_imglist/cifar10/val_tin.txt, path: images_classic}).")

    def __post_init__(self):
        _check_choice("generate.benchmark", self.benchmark, BENCHMARKS)
        _check_positive("generate.image_size", self.image_size)
        _check_choice("generate.channels", self.channels, (1, 3))
        if not 0.0 < self.val_fraction < 1.0:
            raise invalid_param("generate.val_fraction", "generate", "a float in (0, 1)", self.val_fraction)
        for name in ("resize", "max_train", "max_test", "max_ood"):
            if getattr(self, name) is not None:
                _check_positive(f"generate.{name}", getattr(self, name))
        if self.benchmark == "sources":
            self._check_sources()
        else:
            from pipeline.datasets import check_digits_params

            check_digits_params(holdout_classes=self.holdout_classes, image_size=self.image_size,
                                val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                                n_synthetic=self.n_synthetic, seed=self.seed)

    def _check_sources(self):
        for name in ("id_train", "id_test"):
            if getattr(self, name) is None:
                raise invalid_param(f"generate.{name}", "generate", "a data set, e.g. {source: cifar10}", None,
                                    hint="see configs/ for complete presets.")
        if not (self.near or self.far):
            raise invalid_param("generate.far", "generate", "at least one OOD set in near or far", {})
        both = sorted(set(self.near) & set(self.far))
        if both:
            raise invalid_param(f"generate.far.{both[0]}", "generate", "a name not also used in generate.near",
                                both[0])
        for name, spec in self.id_sets.items():
            spec.check(f"generate.{name}")
            if spec.source == "constant":
                raise invalid_param(f"generate.{name}.source", "generate", "a data set with classes",
                                    "constant", hint="constant colours are an OOD set: put them under far.")
        for name, (role, spec) in self.ood_sets.items():
            if not name.isidentifier() or name.startswith("id"):
                raise invalid_param(f"generate.{role}", "generate", "OOD set names that are identifiers not "
                                    "starting with 'id'", name)
            spec.check(f"generate.{role}.{name}")
        if self.id_val is not None:  # after every spec is checked: overlaps compare valid specs
            self._check_held_out("generate.id_val", self.id_val, self.ood_sets)
        for name, spec in self.ood_val.items():
            self._check_ood_val(name, spec)
        for name, spec in self.aux.items():
            self._check_aux(name, spec)

    def _check_ood_val(self, name, spec):
        """Validate OOD val set ``name``: its name, its spec, and that it reads no test or ID sample."""
        if not name.isidentifier() or name.startswith("id"):
            raise invalid_param("generate.ood_val", "generate", "OOD val set names that are identifiers not "
                                "starting with 'id'", name, hint="e.g. ood_val: {val_tin: {source: imglist, "
                                "list: benchmark_imglist/cifar10/val_tin.txt, path: images_classic}}.")
        taken = {**{k: f"generate.{role}" for k, (role, _) in self.ood_sets.items()},
                 **{k: "generate.aux" for k in self.aux}}
        if name in taken:
            raise invalid_param(f"generate.ood_val.{name}", "generate", "a name not also used in generate.near, "
                                "generate.far or generate.aux", name, hint=f"rename it (e.g. val_{name}): "
                                f"'{name}' is already a set in {taken[name]}.")
        spec.check(f"generate.ood_val.{name}")
        self._check_held_out(f"generate.ood_val.{name}", spec, self.ood_sets)

    def _check_held_out(self, param, spec, ood_sets):
        """Refuse a val set (``id_val``, an ``ood_val`` set) that reads the samples of a test set or of ID-train.

        Selection on a test sample would leak it into the reported numbers.
        """
        for other, (role, ood) in ood_sets.items():
            if spec.overlaps(ood, self.root):
                raise invalid_param(param, "generate", f"data other than test OOD set '{other}' "
                                    f"(generate.{role}.{other}: {ood.describe()}); a val set never overlaps a test "
                                    "set", spec.describe(), hint=self._VAL_HINT)
        for id_name, id_spec in self.id_sets.items():
            if id_name != "id_val" and spec.overlaps(id_spec, self.root):
                raise invalid_param(param, "generate", f"data other than generate.{id_name} "
                                    f"({id_spec.describe()}); a val set never overlaps ID-train or a test set",
                                    spec.describe(), hint=self._VAL_HINT)

    def _check_aux(self, name, spec):
        """Validate auxiliary-outlier set ``name``: its name, its spec, and that it reads no test or ID sample."""
        if not name.isidentifier() or name.startswith("id"):
            raise invalid_param("generate.aux", "generate", "auxiliary-outlier set names that are identifiers not "
                                "starting with 'id'", name, hint="e.g. aux: {tinyimages: {source: imagefolder, "
                                "path: tinyimages300k}}.")
        if name in self.ood_sets:
            raise invalid_param(f"generate.aux.{name}", "generate", "a name not also used in generate.near or "
                                "generate.far", name, hint=f"rename it: '{name}' is already a test OOD set in "
                                f"generate.{self.ood_sets[name][0]}.")
        spec.check(f"generate.aux.{name}")
        self._check_aux_data(name, spec)

    def _check_aux_data(self, name, spec):
        """Refuse an aux set that reads the samples of a near/far set or of the ID data."""
        for other, (role, ood) in self.ood_sets.items():
            if spec.overlaps(ood, self.root):
                raise invalid_param(f"generate.aux.{name}", "generate", f"data other than test OOD set '{other}' "
                                    f"(generate.{role}.{other}: {ood.describe()}); auxiliary outliers never "
                                    "overlap a test OOD set", spec.describe(), hint=self._AUX_HINT)
        for id_name, id_spec in self.id_sets.items():
            if spec.overlaps(id_spec, self.root):
                raise invalid_param(f"generate.aux.{name}", "generate", f"data other than the ID data "
                                    f"(generate.{id_name}: {id_spec.describe()}); auxiliary "
                                    "outliers are never ID samples", spec.describe(), hint=self._AUX_HINT)

    @property
    def id_sets(self) -> dict[str, SourceSpec]:
        """``"id_train"``, ``"id_test"`` (and ``"id_val"`` when set) -> spec."""
        sets = {"id_train": self.id_train, "id_test": self.id_test}
        return sets if self.id_val is None else {**sets, "id_val": self.id_val}

    @property
    def ood_sets(self) -> dict[str, tuple[str, SourceSpec]]:
        """``name -> (role, spec)`` for every OOD test set, near first (not ``ood_val``: those are never tested)."""
        return {**{k: ("near", v) for k, v in self.near.items()}, **{k: ("far", v) for k, v in self.far.items()}}

    @property
    def specs(self) -> dict[str, SourceSpec]:
        """Every configured data set by its dotted parameter (``generate.far.texture``), in generate's order."""
        return {**{f"generate.{name}": spec for name, spec in self.id_sets.items()},
                **{f"generate.{role}.{name}": spec for name, (role, spec) in self.ood_sets.items()},
                **{f"generate.ood_val.{name}": spec for name, spec in self.ood_val.items()},
                **{f"generate.aux.{name}": spec for name, spec in self.aux.items()}}


@dataclass(frozen=True)
class TrainConfig:
    """Parameters of the ``train`` stage (backbone architecture and optimiser).

    With ``checkpoint`` (a local state_dict) or ``weights`` (a torchvision weights
    name, ImageNet backbones only), nothing is trained: the stage imports the
    weights into a layerscope checkpoint, whose spec records their origin and
    sha256, and reports ID accuracy. ``mean``/``std`` are the model's input
    normalisation; when unset they are the ID-train channel statistics.
    """

    arch: str = "cifar_resnet"
    widths: tuple[int, ...] = (16, 32, 64)  # cifar_resnet only
    blocks: tuple[int, ...] = (1, 1, 1)  # cifar_resnet only
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False  # random crop (pad 4) and horizontal flip: CIFAR's standard augmentation
    seed: int = 0
    device: str = "auto"
    num_workers: int | str = 0  # DataLoader workers for data read from files; "auto": see data_workers
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    checkpoint: str | None = None
    openood_keys: bool = False  # rename an OpenOOD v1.5 checkpoint's keys (module./backbone./shortcut)
    weights: str | None = None
    evaluate: bool = True  # ID accuracy of the (trained or imported) model on every ID split
    threads: int = 1  # torch's CPU threads while training: the weights depend on it (pipeline/threads.py)

    def __post_init__(self):
        _check_positive("train.epochs", self.epochs)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise invalid_param("train.threads", "train", "a positive int", self.threads,
                                hint="training's thread count is part of its result: 1 gives the same weights "
                                     "on every machine.")
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.lr", self.lr)
        check_device("train.device", self.device)
        data_workers(self.num_workers, "train.num_workers")
        if (self.mean is None) != (self.std is None):
            raise invalid_param("train.std" if self.std is None else "train.mean", "train",
                                "set together with train.mean/train.std", None)
        if self.checkpoint is not None and self.weights is not None:
            raise invalid_param("train.weights", "train", "null when train.checkpoint is set", self.weights,
                                hint="give either a local checkpoint or a torchvision weights name.")

    @property
    def workers(self) -> int:
        """``num_workers`` as a number on this machine (see :func:`data_workers`)."""
        return data_workers(self.num_workers, "train.num_workers")

    @property
    def pretrained(self) -> bool:
        """True when the stage imports weights instead of training."""
        return self.checkpoint is not None or self.weights is not None


@dataclass(frozen=True)
class GramSpec:
    """``extract.gram``: Gram-matrix statistics (Sastry & Oore, ICML 2020) of these layers' maps, at these powers."""

    layers: tuple[str, ...] = ()
    powers: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)  # the paper's

    def __post_init__(self):
        if not self.layers:
            raise invalid_param("extract.gram.layers", "extract", "a non-empty list of layers with (C, H, W) outputs",
                                list(self.layers), hint="e.g. layers: [layer1, layer2, layer3]; `layerscope layers` "
                                "lists them.")
        if not _distinct(self.powers, lambda p: isinstance(p, int) and not isinstance(p, bool) and p >= 1):
            raise invalid_param("extract.gram.powers", "extract", "a non-empty list of distinct ints >= 1",
                                list(self.powers), hint="the paper uses 1 to 10.")


@dataclass(frozen=True)
class OdinSpec:
    """``extract.odin``: ODIN's confidence (Liang et al., ICLR 2018) for every (temperature, noise) pair."""

    temperatures: tuple[float, ...] = (1000.0,)  # OpenOOD v1.5's default; its sweep: 1, 10, 100, 1000
    noises: tuple[float, ...] = (0.0014,)  # OpenOOD v1.5's default; its sweep: 0.0014, 0.0028

    def __post_init__(self):
        if not _distinct(self.temperatures, lambda t: 0 < t < float("inf")):
            raise invalid_param("extract.odin.temperatures", "extract", "a non-empty list of distinct positive floats",
                                list(self.temperatures), hint="OpenOOD v1.5 sweeps [1, 10, 100, 1000].")
        if not _distinct(self.noises, lambda e: 0 <= e < float("inf")):
            raise invalid_param("extract.odin.noises", "extract", "a non-empty list of distinct floats >= 0",
                                list(self.noises), hint="OpenOOD v1.5 sweeps [0.0014, 0.0028].")


@dataclass(frozen=True)
class RankFeatSpec:
    """``extract.rankfeat``: RankFeat's logits (Song et al., NeurIPS 2022) with each layer's rank-1 part removed."""

    layers: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.layers:
            raise invalid_param("extract.rankfeat.layers", "extract", "a non-empty list of layers with (C, H, W) "
                                "outputs", list(self.layers), hint="OpenOOD v1.5 uses a ResNet's last two blocks, "
                                "e.g. layers: [layer3, layer4].")


def _distinct(values, valid) -> bool:
    """Whether ``values`` is non-empty, every value ``valid`` and none repeated."""
    return bool(values) and all(valid(v) for v in values) and len(set(values)) == len(values)


#: ``extract``'s opt-in extraction-time methods: each costs passes through the network (see ExtractConfig).
EXTRACT_METHODS = {"gram": GramSpec, "odin": OdinSpec, "rankfeat": RankFeatSpec}


@dataclass(frozen=True)
class ExtractConfig:
    """Parameters of the ``extract`` stage (which layers, and the store's format).

    ``gram``, ``odin`` and ``rankfeat`` (off by default) compute methods that
    need the network itself at extraction: Gram row sums of some layers'
    maps, ODIN's confidence for a grid of (temperature, noise), RankFeat's
    logits for some layers. Each ODIN setting and each RankFeat layer costs a
    pass through the network; the scorers ``gram``, ``odin`` and ``rankfeat``
    then read what was stored.
    """

    layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "avgpool", "fc")
    grad_layers: tuple[str, ...] = ()  # NAC-UE: layers whose KL gradient is stored (one backward pass)
    head: str | None = "fc"  # the final linear layer: its input and parameters are stored
    maps: tuple[str, ...] = ()  # layers whose unpooled (C, H, W) outputs are stored (seed 002's decoder)
    images: bool = False  # store the input images too (the decoder's targets)
    batch_size: int = 128
    device: str = "auto"
    dtype: str = "float32"
    chunk_rows: int = 512
    shard_rows: int = 4096
    compression_level: int = 3
    num_workers: int | str = 0  # DataLoader workers for data read from files; "auto": see data_workers
    gram: GramSpec | None = None  # {layers, powers}: Gram row sums per power (Sastry & Oore)
    odin: OdinSpec | None = None  # {temperatures, noises}: ODIN's confidence per pair, one pass each
    rankfeat: RankFeatSpec | None = None  # {layers}: RankFeat's logits per layer, one pass each

    @property
    def workers(self) -> int:
        """``num_workers`` as a number on this machine (see :func:`data_workers`)."""
        return data_workers(self.num_workers, "extract.num_workers")

    def __post_init__(self):
        for name, spec in EXTRACT_METHODS.items():  # a plain mapping (built in code) is checked as params.yaml's
            value = getattr(self, name)
            if value is not None and not isinstance(value, spec):
                if not isinstance(value, Mapping):
                    raise invalid_param(f"extract.{name}", "extract", "a mapping of its settings, or null (off)", value)
                object.__setattr__(self, name, build_config(spec, value, prefix=f"extract.{name}"))
        data_workers(self.num_workers, "extract.num_workers")
        if not self.layers:
            raise invalid_param("extract.layers", "extract", "a non-empty list", list(self.layers))
        _check_positive("extract.batch_size", self.batch_size)
        _check_positive("extract.chunk_rows", self.chunk_rows)
        _check_positive("extract.shard_rows", self.shard_rows)
        if not -7 <= self.compression_level <= 22:  # Zstd's levels (negative: faster, 0: its default)
            raise invalid_param("extract.compression_level", "extract", "an int in [-7, 22] (Zstd's levels)",
                                self.compression_level, hint="3 is a good default; higher is smaller and slower.")
        _check_choice("extract.dtype", self.dtype, ("float32", "float16"))
        check_device("extract.device", self.device)
        if self.shard_rows % self.chunk_rows:
            raise invalid_param(
                "extract.shard_rows", "extract", f"a multiple of extract.chunk_rows={self.chunk_rows}",
                self.shard_rows, hint="zarr shards hold a whole number of chunks.",
            )


def data_workers(value, name="num_workers") -> int:
    """DataLoader worker processes for ``value``: an int >= 0, or ``"auto"``.

    ``"auto"`` is ``min(4, usable cores - 1)``: enough to feed a GPU from image
    files, never more processes than the machine runs at once (DataLoader warns
    above that), and 0 (load in the main process) on a 1-core machine. It is
    not a result-changing setting (the same batches come out), so a preset can
    say ``auto`` and run on any machine.
    """
    import os

    if value == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(4, cores - 1))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid_param(name, name.split(".")[0], "a non-negative int or 'auto'", value,
                            hint="'auto' uses up to 4 workers, fewer on a small machine.")
    return value


@dataclass(frozen=True)
class FitConfig:
    """Parameters of the ``fit`` stage: which detectors, with which settings.

    ``heatmap`` (optional) trains seed 002's heatmap decoder with these
    :class:`~pipeline.scorers.heatmap.HeatmapScorer` params; ``detect.methods:
    {heatmap: {}}`` then scores with it.
    """

    detectors: Mapping[str, Mapping] = field(
        default_factory=lambda: {"iforest": {}, "ecod": {}, "knn": {}, "ocsvm": {}, "mahalanobis": {}}
    )
    standardize: bool = True
    max_train_samples: int | None = None
    seed: int = 0
    heatmap: Mapping | None = None

    def __post_init__(self):
        if self.heatmap is not None:
            self._check_heatmap()
        if not self.detectors:
            raise invalid_param("fit.detectors", "fit", "a non-empty mapping of name -> params", self.detectors)
        for name, params in self.detectors.items():
            if params is not None and not isinstance(params, Mapping):
                raise invalid_param(f"fit.detectors.{name}", "fit", "a mapping of parameters", params)
        if self.max_train_samples is not None:
            _check_positive("fit.max_train_samples", self.max_train_samples)
        from pipeline.detectors import make_detector

        for name, params in self.detectors.items():  # names and values, before any data is read
            make_detector(name, params)

    def _check_heatmap(self):
        from pipeline.scorers import make_scorer

        if not isinstance(self.heatmap, Mapping):
            raise invalid_param("fit.heatmap", "fit", "a mapping of heatmap decoder parameters (or null)", self.heatmap)
        make_scorer("heatmap", self.heatmap, where="fit.heatmap").check_params(prefix="fit.heatmap.")


@dataclass(frozen=True)
class DetectConfig:
    """Parameters of the ``detect`` stage: aggregation and reporting."""

    methods: Mapping[str, Mapping] = field(default_factory=lambda: {"msp": {}, "maxlogit": {}, "ebo": {}})
    aggregations: tuple[str, ...] = ("max_z", "mean_z", "max")
    recall: float = 0.95
    aupr: str = "average_precision"  # or "trapezoid", as OpenOOD and pytorch-ood integrate the PR curve
    figures: bool = True

    def __post_init__(self):
        for name, params in self.methods.items():
            if params is not None and not isinstance(params, Mapping):
                raise invalid_param(f"detect.methods.{name}", "detect", "a mapping of parameters", params)
        for agg in self.aggregations:
            _check_choice("detect.aggregations", agg, ("max_z", "mean_z", "max"))
        if not 0.0 < self.recall <= 1.0:
            raise invalid_param("detect.recall", "detect", "a float in (0, 1]", self.recall)
        from pipeline.metrics import AUPR_RULES

        _check_choice("detect.aupr", self.aupr, AUPR_RULES)
        from pipeline.scorers import make_scorer

        for name, params in self.methods.items():  # names and values, before any data is read
            scorer = make_scorer(name, params)
            if name != "heatmap":  # detect's heatmap entry scores fit's decoder: its params are fit.heatmap's
                scorer.check_params(prefix=f"detect.methods.{name}.")


@dataclass(frozen=True)
class SearchConfig:
    """Parameters of ``search``: the grid, the selection metric and the parallelism."""

    methods: Mapping[str, Mapping] = field(default_factory=lambda: {"ebo": {"temperature": [0.5, 1.0, 2.0]}})
    metric: str = "auroc"
    aggregations: tuple[str, ...] = ("max_z", "mean_z", "max")
    recall: float = 0.95
    n_jobs: int = -1
    top: int = 15

    def __post_init__(self):
        if not self.methods:
            raise invalid_param("search.methods", "search", "a non-empty mapping of method -> grid", self.methods)
        for name, grid in self.methods.items():
            if grid is not None and not isinstance(grid, Mapping):
                raise invalid_param(f"search.methods.{name}", "search", "a mapping of param -> values", grid)
        if isinstance(self.recall, bool) or not isinstance(self.recall, (int, float)) or not 0 < self.recall <= 1:
            raise invalid_param("search.recall", "search", "a float in (0, 1]", self.recall)
        from pipeline.search import selection_key

        selection_key(self.metric, self.recall)  # "auroc" or "fpr" (at search.recall)
        for agg in self.aggregations:
            _check_choice("search.aggregations", agg, ("max_z", "mean_z", "max"))
        if self.n_jobs == 0:
            raise invalid_param("search.n_jobs", "search", "a non-zero int (-1 = all cores)", self.n_jobs)
        _check_positive("search.top", self.top)
        from pipeline.search import expand_grid

        expand_grid(self.methods, self.aggregations)  # every configuration's names and values, before the search


SCHEDULER_MODES = ("threads", "local")
ADDRESS_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")


@dataclass(frozen=True)
class CalibrateConfig:
    """Parameters of ``calibrate``: the early-exit guard's layers, detector and target ID TPR.

    Thresholds come from ID-val scores in the store: each guarded layer gets a
    false-alarm budget (``weights``, equal when unset), scaled so that the
    whole cascade lets ``target_tpr`` of ID-val through (see :mod:`pipeline.cascade`).
    """

    detector: str = "mahalanobis"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    target_tpr: float = 0.95
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise invalid_param("calibrate.layers", "calibrate", "a non-empty list of distinct layers", self.layers)
        if not 0.0 < self.target_tpr < 1.0:
            raise invalid_param("calibrate.target_tpr", "calibrate", "a float in (0, 1)", self.target_tpr,
                                hint="0.95 keeps 95% of ID inputs.")
        if self.weights is not None and (len(self.weights) != len(self.layers) or min(self.weights) < 0
                                         or not sum(self.weights) > 0):
            raise invalid_param("calibrate.weights", "calibrate", f"{len(self.layers)} non-negative numbers (one per "
                                "layer), not all zero, or null for equal budgets", self.weights)


@dataclass(frozen=True)
class ComputeConfig:
    """Where extract, fit, detect and search run (see :mod:`pipeline.compute`).

    ``scheduler`` is ``"threads"`` (this process; the default), ``"local"`` (a
    ``dask.distributed.LocalCluster`` of ``n_workers`` processes) or the address
    of an existing scheduler (``tcp://host:8786``). With ``"threads"``, the
    environment variable ``DASK_SCHEDULER_ADDRESS`` selects a scheduler too.

    This section is deliberately *not* a DVC dependency of any stage: results do
    not depend on where they are computed (the tests check bit-identity), so
    moving to a cluster must not invalidate the cache.
    """

    scheduler: str = "threads"
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    dashboard: bool = True
    threads: int | str = "auto"  # per process; "auto": the cores free at start (pipeline/threads.py)

    def __post_init__(self):
        if self.scheduler not in SCHEDULER_MODES and not self.scheduler.startswith(ADDRESS_SCHEMES):
            raise invalid_param("compute.scheduler", "compute", f"one of {set(SCHEDULER_MODES)} or a scheduler "
                                "address such as 'tcp://host:8786'", self.scheduler,
                                hint="start one with `dask scheduler` and `dask worker ADDRESS`.")
        _check_positive("compute.n_workers", self.n_workers)
        _check_positive("compute.threads_per_worker", self.threads_per_worker)
        if self.threads != "auto":
            if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
                raise invalid_param("compute.threads", "compute", "'auto' or a positive int", self.threads,
                                    hint="'auto' takes the cores that are free when a stage starts.")
        if self.memory_limit not in ("auto", "none"):
            from dask.utils import parse_bytes

            try:
                parse_bytes(self.memory_limit)
            except (ValueError, TypeError):
                raise invalid_param("compute.memory_limit", "compute", "'auto', 'none' or a size such as '4GB'",
                                    self.memory_limit) from None


SECTIONS = {
    "generate": GenerateConfig,
    "train": TrainConfig,
    "extract": ExtractConfig,
    "fit": FitConfig,
    "detect": DetectConfig,
    "search": SearchConfig,
    "calibrate": CalibrateConfig,
    "compute": ComputeConfig,
}


#: Sections a stage may go without, with the documented default they stand for.
OPTIONAL_SECTIONS = {"compute": "threads in this process (see ComputeConfig)"}


class Params(dict):
    """A parsed params file: a dict of sections that remembers the file it came from (for messages)."""

    def __init__(self, values, source):
        super().__init__(values)
        self.source = source


def read_params(path: str | Path = "params.yaml", *, what="Params file", option="--params") -> Params:
    """Read a YAML file of parameters into a dict, with a one-line error if it is unusable.

    Parameters
    ----------
    path : path-like
    what : str
        What the file is, for messages: ``"Params file"``, ``"Grid file"``.
    option : str
        The command-line option that names it, for hints.
    """
    path = Path(path)
    hint = f"run from the project root, or pass {option} FILE."
    if path.is_dir():
        raise ConfigError(f"{what} '{path}' is a directory; expected a YAML file. Hint: {hint}")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist. Hint: {hint}")
    try:
        params = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{what} '{path}' is not YAML (it is not text). Hint: {hint}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{what} '{path}' is not valid YAML{where}. Hint: check indentation.") from None
    if params is None:
        raise ConfigError(f"{what} '{path}' is empty; expected a mapping of sections. Hint: "
                          + ("`layerscope init --preset digits` writes a complete params file."
                             if option == "--params" else "see the search section of params.yaml for the keys."))
    if not isinstance(params, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of sections. Got a {type(params).__name__}. "
                          f"Hint: {hint}")
    return Params(params, str(path))


def load_section(section: str, params: Mapping | str | Path = "params.yaml"):
    """Load one stage's section into its frozen, validated dataclass.

    Parameters
    ----------
    section : str
        One of ``SECTIONS`` (``"generate"``, ``"train"``, ...).
    params : mapping or path
        The parsed params, or the path to ``params.yaml``.

    Returns
    -------
    config : dataclass instance
        E.g. an :class:`ExtractConfig`. Missing keys take the dataclass default.
    """
    if not isinstance(params, Mapping):
        params = read_params(params)
    if section not in SECTIONS:
        raise invalid_param("section", "load_section", f"one of {sorted(SECTIONS)}", section)
    if section not in params and section not in OPTIONAL_SECTIONS:
        source = f"Params file '{params.source}'" if isinstance(params, Params) else "The params mapping"
        raise ConfigError(f"{source} has no '{section}' section; the {section} stage reads its parameters there "
                          f"(it has {sorted(params)}). Hint: add a '{section}:' section; every preset in configs/ "
                          "has one (`layerscope init --preset NAME` writes a complete params file).")
    values = params.get(section) or {}
    if not isinstance(values, Mapping):
        raise invalid_param(section, "params.yaml", "a mapping", values)
    return build_config(SECTIONS[section], values, prefix=section)


def build_config(cls, values: Mapping, prefix: str):
    """Coerce a mapping into dataclass ``cls``, rejecting unknown keys and bad types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown parameter '{prefix}.{unknown[0]}'. Valid parameters of '{prefix}' are {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(f"{prefix}.{name}", value, hints[name]) for name, value in values.items()}
    return cls(**kwargs)


def _coerce(name, value, hint):
    """Check ``value`` against a (simple) type hint and normalise lists to tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(name, value, inner[0])
        for candidate in inner:  # e.g. ``int | str``: the first type the value is
            try:
                return _coerce(name, value, candidate)
            except ConfigError:
                continue
        raise invalid_param(name, "params.yaml", f"of type {' or '.join(t.__name__ for t in inner)}", value)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]  # a lone value is a one-element list (`-S extract.layers=fc`)
        return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is not None and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            raise invalid_param(name, "params.yaml", "a mapping", value)
        if dataclasses.is_dataclass(args[1]):
            return {str(k): _coerce(f"{name}.{k}", v, args[1]) for k, v in value.items()}
        return {str(k): (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise invalid_param(name, "params.yaml", "a mapping", value)
        return build_config(hint, value, prefix=name)
    return _coerce_scalar(name, value, hint)


def _coerce_scalar(name, value, hint):
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads '5e-4' as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise invalid_param(name, "params.yaml", f"of type {hint.__name__}", value)


def _check_positive(name, value):
    if value <= 0:
        raise invalid_param(name, name.split(".")[0], "a positive number", value)


def _check_choice(name, value, choices):
    if value not in choices:
        raise invalid_param(name, name.split(".")[0], f"one of {set(choices)}", value)


def check_device(name, value):
    """Raise ConfigError unless ``value`` is a device layerscope accepts (``auto``, ``cpu``, ``cuda[:N]``, ``mps``)."""
    ok = isinstance(value, str) and (value in ("auto", "cpu", "cuda", "mps")
                                     or (value.startswith("cuda:") and value[5:].isdigit()))
    if not ok:
        owner = name.split(".")[0] if "." in name else "layerscope"
        raise invalid_param(name, owner, "a torch device", value, hint=DEVICE_HINT)


def project_paths(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, str]:
    """The ``paths`` mapping from ``dvc.yaml``'s ``vars``: the one place paths are written.

    The CLI uses it for its defaults, and ``dvc.yaml`` interpolates the same
    values into its commands, deps and outs.
    """
    dvc_yaml = Path(dvc_yaml)
    if not dvc_yaml.is_file():
        raise ConfigError(f"'{dvc_yaml}' does not exist. Hint: run layerscope from the project root, "
                          "or pass every path as an option.")
    doc = yaml.safe_load(dvc_yaml.read_text()) or {}
    for entry in doc.get("vars", []):
        if isinstance(entry, Mapping) and isinstance(entry.get("paths"), Mapping):
            return {str(k): str(v) for k, v in entry["paths"].items()}
    raise ConfigError(f"'{dvc_yaml}' has no 'paths' mapping under 'vars'. Hint: see the project's dvc.yaml.")
