"""Passes through the classifier: forward hooks, pooling and per-layer energy.

This is the only module (with a deployment wrapper built on it) that runs the
network. Everything downstream reads what it writes into the feature store.

Per hooked layer and sample it keeps
- the pooled activation: mean over H, W for a (C, H, W) map, mean over tokens
  for a (T, D) sequence, the vector itself for a (C,) output;
- the energy of the **full, unpooled** activation, ``-logsumexp`` over all of
  its elements with temperature 1 (seed 000). It cannot be recovered from the
  pooled vector, so it has to be computed here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.store import GRAD_PREFIX, MAP_PREFIX, RESERVED, ArraySpec, StoreWriter, feature_dim, write_shard_data

log = logging.getLogger(__name__)

POOLING = {4: "mean_hw", 3: "mean_tokens", 2: "none"}


def pool(activation: torch.Tensor) -> torch.Tensor:
    """Pool an activation of shape (n, C, H, W), (n, T, D) or (n, C) to (n, C)."""
    if activation.dim() == 4:
        return activation.mean(dim=(2, 3))
    if activation.dim() == 3:
        return activation.mean(dim=1)
    if activation.dim() == 2:
        return activation
    raise ValueError(f"cannot pool an activation of shape {tuple(activation.shape)}")


def energy(activation: torch.Tensor) -> torch.Tensor:
    """``-logsumexp`` of each sample's whole activation, shape (n,). Higher = more OOD."""
    return -torch.logsumexp(activation.flatten(1).float(), dim=1)


def _first_tensor(output):
    """Some modules return tuples; the hooked value is their first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return next(o for o in output if isinstance(o, torch.Tensor))


def hookable_layers(model) -> list[str]:
    """Dotted names of every submodule (``layer1.0.conv2`` style)."""
    return [name for name, _ in model.named_modules() if name]


def layer_shapes(model, input_shape, device="cpu") -> dict[str, tuple]:
    """Output shape (without the batch axis) of every submodule, in execution order.

    Parameters
    ----------
    model : nn.Module
    input_shape : tuple
        One sample's shape, e.g. ``(1, 16, 16)``.
    """
    shapes = {}
    modules = dict(model.named_modules())

    def make_hook(name):
        def hook(_module, _inputs, output):
            shapes.setdefault(name, tuple(_first_tensor(output).shape[1:]))
        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in hookable_layers(model)]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return shapes


TYPE_SELECTOR = "type:"


def expand_selectors(model, layers) -> list[str]:
    """Replace each ``"type:Conv2d,BatchNorm2d"`` entry by every module of those class names.

    LA-OOD hooks every conv (``type:Conv2d``); seed 000 every Conv2d, BatchNorm2d
    and Linear. Plain names pass through unchanged.
    """
    modules = [(name, type(module).__name__) for name, module in model.named_modules() if name]
    expanded = []
    for entry in layers:
        if not entry.startswith(TYPE_SELECTOR):
            expanded.append(entry)
            continue
        wanted = {t.strip() for t in entry[len(TYPE_SELECTOR):].split(",") if t.strip()}
        matched = [name for name, kind in modules if kind in wanted]
        if not matched:
            kinds = sorted({kind for _, kind in modules})
            raise ConfigError(f"The 'extract.layers' entry {entry!r} matches no module of the model. Expected "
                              f"class names among {kinds}. Hint: `layerscope layers` shows each layer's type.")
        expanded += matched
    return expanded


def resolve_layers(model, layers, input_shape, device="cpu") -> list[str]:
    """Check layer names (or ``type:`` selectors) against the model; return names in network order."""
    layers = expand_selectors(model, layers)
    shapes = layer_shapes(model, input_shape, device)
    unknown = [name for name in layers if name not in shapes]
    if unknown:
        raise ConfigError(
            f"The 'extract.layers' parameter of extract must name modules of the model. Got {unknown[0]!r}; "
            f"valid names are {list(shapes)}. Hint: `layerscope layers` lists them with their shapes."
        )
    clash = [name for name in layers if name in RESERVED]
    if clash:
        raise ConfigError(f"Layer name {clash[0]!r} collides with a reserved array name {RESERVED}.")
    order = {name: i for i, name in enumerate(shapes)}
    return sorted(dict.fromkeys(layers), key=order.__getitem__)


def pool_sum(activation: torch.Tensor) -> torch.Tensor:
    """Sum over H, W (or tokens): NAC-UE's pooling of activations and gradients, shape (n, C)."""
    return pool(activation) * spatial_size(activation)


def spatial_size(activation: torch.Tensor) -> int:
    """H * W of a (n, C, H, W) map, T of a (n, T, D) sequence, 1 for a vector."""
    if activation.dim() == 4:
        return activation.shape[2] * activation.shape[3]
    return activation.shape[1] if activation.dim() == 3 else 1


def kl_uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of KL(uniform || softmax(logits)), up to a constant.

    This is cross-entropy against the uniform target, as in GradNorm and NAC-UE.
    Each sample's gradient depends on that sample only.
    """
    return -(torch.log_softmax(logits, dim=1).mean(dim=1)).sum()


@dataclass(frozen=True)
class Plan:
    """What extraction keeps: hooked layers, gradient layers (NAC-UE), the final linear layer."""

    layers: tuple
    grad_layers: tuple = ()
    head: str | None = None
    maps: tuple = ()  # layers whose unpooled (C, H, W) output is kept (seed 002's decoder skips)
    images: bool = False  # keep the input images (the decoder's targets)


def resolve_plan(model, layers, input_shape, *, grad_layers=(), head=None, device="cpu", maps=(),
                 images=False) -> Plan:
    """Validate the layer spec against the model; layers come back in network order."""
    layers = resolve_layers(model, layers, input_shape, device)
    stray = [name for name in grad_layers if name not in layers]
    if stray:
        raise ConfigError(f"The 'extract.grad_layers' parameter of extract must be a subset of extract.layers "
                          f"{layers}. Got {stray[0]!r}. Hint: add it to extract.layers too.")
    if head is not None:
        head_parameters(model, head)  # checks that it is a Linear module
    shapes = layer_shapes(model, input_shape, device)
    flat = [name for name in maps if name in shapes and len(shapes[name]) != 3]
    unknown = [name for name in maps if name not in shapes]
    if unknown or flat:
        bad = (unknown or flat)[0]
        got = "not a module of the model" if unknown else f"of output shape {shapes[bad]}"
        raise ConfigError(f"The 'extract.maps' parameter of extract must name layers with (C, H, W) outputs. "
                          f"Got {bad!r}, {got}. Hint: `layerscope layers` lists the layers and their shapes.")
    order = {name: i for i, name in enumerate(shapes)}
    return Plan(tuple(layers), tuple(n for n in layers if n in grad_layers), head,
                tuple(sorted(dict.fromkeys(maps), key=order.__getitem__)), bool(images))


class LayerRecorder:
    """Context manager: forward hooks that keep pooled activations and energies.

    After each forward pass, ``pooled[name]`` is (n, C) and ``energies[name]`` is
    (n,); ``raw[name]`` keeps the un-detached output of gradient layers, and
    ``penultimate`` the input of the head. Hooks are removed on exit.
    """

    def __init__(self, model, plan: Plan):
        self.model, self.plan = model, plan
        self.pooled, self.energies, self.raw, self.penultimate, self._handles = {}, {}, {}, None, []
        self.maps = {}

    def __enter__(self):
        modules = dict(self.model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.plan.layers]
        self._handles += [modules[name].register_forward_hook(self._map_hook(name)) for name in self.plan.maps]
        if self.plan.head is not None:
            self._handles.append(modules[self.plan.head].register_forward_pre_hook(self._head_hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name):
        def hook(_module, _inputs, output):
            act = _first_tensor(output)
            if name in self.plan.grad_layers:
                self.raw[name] = act
            act = act.detach()
            self.pooled[name] = pool(act).float()
            self.energies[name] = energy(act)
        return hook

    def _map_hook(self, name):
        def hook(_module, _inputs, output):
            self.maps[name] = _first_tensor(output).detach().float()
        return hook

    def _head_hook(self, _module, inputs):
        self.penultimate = torch.flatten(_first_tensor(inputs).detach(), 1).float()


def extract_batch(model, x, recorder: LayerRecorder) -> dict[str, np.ndarray]:
    """One forward pass (plus one backward pass for gradient layers).

    Returns every array the store keeps for these samples.
    """
    plan = recorder.plan
    with torch.enable_grad() if plan.grad_layers else torch.inference_mode():
        logits = model(x).float()
        grads = _kl_grads(logits, [recorder.raw[n] for n in plan.grad_layers]) if plan.grad_layers else []
    out = {name: recorder.pooled[name].cpu().numpy() for name in plan.layers}
    out.update({f"{GRAD_PREFIX}{name}": g for name, g in zip(plan.grad_layers, grads)})
    out["energy"] = torch.stack([recorder.energies[n] for n in plan.layers], dim=1).cpu().numpy()
    out["logits"] = logits.detach().cpu().numpy()
    out["pred"] = logits.detach().argmax(1).cpu().numpy().astype(np.int64)
    if plan.head is not None:
        out["penultimate"] = recorder.penultimate.cpu().numpy()
    out.update({f"{MAP_PREFIX}{name}": recorder.maps[name].cpu().numpy() for name in plan.maps})
    if plan.images:
        out["image"] = x.detach().float().cpu().numpy()
    return out


def _kl_grads(logits, activations):
    """Gradients of the KL loss w.r.t. each activation, summed over H, W: list of (n, C)."""
    grads = torch.autograd.grad(kl_uniform_loss(logits), activations)
    return [pool_sum(g.float()).cpu().numpy() for g in grads]


def _width(shape):
    """Feature count after pooling, from an output shape without the batch axis."""
    return shape[-1] if len(shape) == 2 else shape[0]


def _spatial(shape):
    return int(np.prod(shape[1:])) if len(shape) == 3 else (shape[0] if len(shape) == 2 else 1)


def array_specs(shapes: dict, plan: Plan, n_classes: int, dtype: str, head_width=None,
                input_shape=None) -> list[ArraySpec]:
    """The arrays of one split: pooled activations, gradients, energy, logits, penultimate, pred, label."""
    layer_specs = [
        ArraySpec(name, _width(shapes[name]), dtype, attrs={
            "layer": name, "pooling": POOLING[len(shapes[name]) + 1], "spatial_size": _spatial(shapes[name])})
        for name in plan.layers
    ]
    grad_specs = [
        ArraySpec(f"{GRAD_PREFIX}{name}", _width(shapes[name]), "float32", dim=feature_dim(name), attrs={
            "layer": name, "formula": "sum over H,W of d KL(uniform || softmax(logits)) / d output"})
        for name in plan.grad_layers
    ]
    head_specs = []
    if plan.head is not None:
        head_specs = [ArraySpec("penultimate", head_width, "float32",
                                attrs={"head": plan.head, "what": "input of the final linear layer"})]
    map_specs = [
        ArraySpec(f"{MAP_PREFIX}{name}", None, dtype, sample_shape=tuple(shapes[name]),
                  dims=tuple(f"{axis}_{name}" for axis in ("channel", "height", "width")),
                  attrs={"layer": name, "what": "unpooled output (C, H, W)"})
        for name in plan.maps
    ]
    if plan.images:
        map_specs.append(ArraySpec("image", None, dtype, sample_shape=tuple(input_shape),
                                   dims=("image_channel", "image_height", "image_width"),
                                   attrs={"what": "the model's input, as extracted (before its normalisation)"}))
    return layer_specs + grad_specs + head_specs + map_specs + [
        ArraySpec("energy", len(plan.layers), "float32", dim="layer",
                  attrs={"layers": list(plan.layers), "temperature": 1.0, "formula": "-logsumexp(full activation)"}),
        ArraySpec("logits", n_classes, "float32", dim="class"),
        ArraySpec("pred", None, "int64"),
        ArraySpec("label", None, "int64"),
        # the ``sample`` dimension's coordinate: which image of its data set each row is
        ArraySpec("sample", None, "int64", attrs={"what": "index of the row's image in its data set (the split's "
                                                          "own file for digits; the torchvision or ImageFolder set, "
                                                          "before any cap, for a sources benchmark)"}),
    ]


def head_parameters(model, head: str) -> dict[str, np.ndarray]:
    """Weight (K, D) and bias (K,) of the final linear layer, for SCALE, ASH, ReAct and ViM."""
    modules = dict(model.named_modules())
    if head not in modules:
        raise ConfigError(f"The 'extract.head' parameter of extract must name the model's final linear layer. "
                          f"Got {head!r}. Hint: `layerscope layers` lists the modules.")
    module = modules[head]
    if not isinstance(module, torch.nn.Linear):
        raise ConfigError(f"The 'extract.head' parameter of extract must name a torch.nn.Linear module. "
                          f"Got {head!r}, a {type(module).__name__}. Hint: `layerscope layers` shows the types.")
    bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
    return {"weight": module.weight.detach().cpu().numpy(), "bias": bias.detach().cpu().numpy()}


class InMemory:
    """A model, or a mapping of split name -> dataset, served as it is (threads; small objects)."""

    def __init__(self, obj):
        self.obj = obj

    def __call__(self, name=None):
        return self.obj if name is None else self.obj[name]


_PROCESS_CACHE: dict = {}


@dataclass(frozen=True)
class CheckpointModel:
    """Loads a checkpoint once per process: what each Dask worker does before its first shard."""

    path: str
    device: str = "auto"

    def __call__(self):
        from pipeline.models import load_checkpoint, resolve_device

        stat = os.stat(self.path)
        key = ("model", os.path.abspath(self.path), stat.st_mtime_ns, stat.st_size, self.device)
        if key not in _PROCESS_CACHE:
            _PROCESS_CACHE[key] = load_checkpoint(self.path, resolve_device(self.device))[0]
        return _PROCESS_CACHE[key]


@dataclass(frozen=True)
class BenchmarkData:
    """Opens a benchmark directory's splits once per process (see :func:`pipeline.userdata.open_split`)."""

    directory: str
    params: str = "params.yaml"  # its generate.root says where a sources benchmark's data is

    def __call__(self, name):
        from pipeline.userdata import open_benchmark

        key = ("data", os.path.abspath(self.directory), name)
        if key not in _PROCESS_CACHE:
            _PROCESS_CACHE[key] = open_benchmark(self.directory, [name], params=self.params)[name].dataset
        return _PROCESS_CACHE[key]


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs for shards of any split: picklable, small."""

    model: object  # () -> nn.Module in this process
    data: object  # (split name) -> Dataset in this process
    plan: Plan
    store: str  # the staged store
    shard_rows: int
    batch_size: int
    num_workers: int

    def __call__(self, task):
        """Compute and write one whole shard; ``task`` is ``(split, index, start, stop)``."""
        split, index, start, stop = task
        model = self.model()
        device = next(model.parameters()).device
        with LayerRecorder(model, self.plan) as recorder:
            data = _extract_rows(model, self.data(split), start, stop, recorder, self.batch_size, device,
                                 self.num_workers)
        write_shard_data(self.store, split, index, self.shard_rows, data)
        return stop - start


def extract_to_store(model, splits: dict, plan: Plan, writer: StoreWriter, *, batch_size=128, device="cpu",
                     dtype="float32", num_workers=0, runner=None, sources=None):
    """Run every split through the model and write whole shards to ``writer``.

    Groups and arrays are created here, before the fan-out; then each pending
    shard is one task (:class:`ShardJob`) on ``runner``: this process's thread,
    or a Dask worker that loads the model once and writes its whole shards
    itself. Progress is recorded here as shards finish, so a run interrupted
    anywhere (or a killed worker) resumes from the shards already recorded.

    Parameters
    ----------
    model : nn.Module
        In eval mode; used here for shapes and the head's parameters.
    splits : dict
        ``name -> (dataset, attrs)``; items of ``dataset`` are ``(image, label)``.
    plan : Plan
        Resolved layer names (network order), gradient layers and head.
    writer : StoreWriter
        An entered writer; shards it already holds are skipped (resume).
    batch_size : int
        Batches never cross a shard boundary, so every shard is computed from
        exactly the same batches whichever process computes it, and whenever.
    device : torch.device or str
    dtype : {"float32", "float16"}
        Storage dtype of the pooled activations.
    num_workers : int
        DataLoader workers for datasets read item by item (decoded from files).
    runner : pipeline.compute.Runner, optional
        Where shards are computed; default: this process, one shard at a time.
    sources : (model source, data source), optional
        Picklable callables that give the model and a split's dataset in a
        worker process (:class:`CheckpointModel`, :class:`BenchmarkData`);
        default: ``model`` and ``splits`` themselves (:class:`InMemory`).
    """
    from pipeline.compute import Runner

    first = next(iter(splits.values()))[0]
    input_shape = tuple(first[0][0].shape)
    shapes = layer_shapes(model, input_shape, device)
    head = head_parameters(model, plan.head) if plan.head is not None else None
    head_width = None if head is None else head["weight"].shape[1]
    specs = array_specs(shapes, plan, _n_classes(model, input_shape, device), dtype, head_width, input_shape)
    if head is not None:
        writer.write_constants("head", head, dims={"weight": ("class", "head_input"), "bias": ("class",)})
    tasks = []
    for name, (dataset, attrs) in splits.items():
        # the ``layer`` dimension's coordinate (energy's columns): ``energy.sel(layer="layer3")`` in xarray
        writer.create_split(name, len(dataset), specs, {**attrs, "n_samples": len(dataset)},
                            coords={"layer": np.asarray(plan.layers, dtype=str)})
        tasks += [(name, i, *writer.shard_range(i, len(dataset))) for i in writer.pending_shards(name, len(dataset))]
    model_source, data_source = sources or (InMemory(model), InMemory({n: ds for n, (ds, _) in splits.items()}))
    job = ShardJob(model_source, data_source, plan, str(writer.staged_store), writer.shard_rows, batch_size,
                   num_workers)
    # one thread in this process: the shards share one model and its hooks
    for (name, index, _, _), _rows in (runner or Runner()).map_unordered(job, tasks, desc="extract", unit="shard",
                                                                        threads=1):
        writer.mark_done(name, index)
    return specs


def _n_classes(model, input_shape, device):
    with torch.inference_mode():
        return int(model(torch.zeros((1, *input_shape), device=device)).shape[1])


def _extract_rows(model, dataset, start, stop, recorder, batch_size, device, num_workers=0):
    """Rows ``[start, stop)`` of every array, computed batch by batch."""
    parts = []
    for x, y in _batches(dataset, start, stop, batch_size, num_workers):
        batch = extract_batch(model, x.to(device), recorder)
        batch["label"] = np.asarray(y, dtype=np.int64)
        parts.append(batch)
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    rows["sample"] = source_index(dataset)[start:stop]
    return rows


def source_index(dataset) -> np.ndarray:
    """``(n,)`` int64: each row's index in its data set (an index split's chosen indices, else 0..n-1)."""
    indices = getattr(dataset, "indices", None)
    return np.asarray(indices if indices is not None else np.arange(len(dataset)), dtype=np.int64)


def _batches(dataset, start, stop, batch_size, num_workers=0):
    """Batches of rows ``[start, stop)``: sliced when the dataset can (in memory), else a DataLoader."""
    if hasattr(dataset, "rows"):
        return (dataset.rows(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size))
    subset = torch.utils.data.Subset(dataset, range(start, stop))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def store_key(**inputs) -> str:
    """Fingerprint of everything that determines a store's content."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
