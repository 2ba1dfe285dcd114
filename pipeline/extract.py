"""Passes through the classifier: forward hooks, pooling and per-layer energy.

This is the only module (with a deployment wrapper built on it) that runs the
network. Everything downstream reads what it writes into the feature store.

Per hooked layer and sample it keeps
- the pooled activation: mean over H, W for a (C, H, W) map, mean over tokens
  for a (T, D) sequence, the vector itself for a (C,) output;
- the energy of the **full, unpooled** activation, ``-logsumexp`` over all of
  its elements with temperature 1 (seed 000). It cannot be recovered from the
  pooled vector, so it has to be computed here.

Opt-in methods that need the network itself (``extract.gram``, ``extract.odin``,
``extract.rankfeat``; none by default, and then the store is exactly what it
was without them) are computed here too, once per declared setting:

- Gram row sums (Sastry & Oore, ICML 2020): for a chosen layer's map ``F``
  (C x HW) and each power p, ``sign(s) |s|^(1/p)`` with ``s`` the row sums of
  ``F^p (F^p)^T`` (:func:`gram_rowsums`): statistics of the full map, which the
  pooled vector does not determine;
- ODIN (Liang et al., ICLR 2018): the confidence after temperature scaling and
  an input perturbation along the sign of the input gradient
  (:func:`odin_steps`, :func:`odin_confidences`): one backward pass per
  temperature, one forward pass per (temperature, noise);
- RankFeat (Song et al., NeurIPS 2022): the logits after removing the rank-1
  part of a chosen layer's map inside the network (:func:`rankfeat_logits`):
  one forward pass per layer.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.errors import ConfigError
from pipeline.store import (
    GRAD_PREFIX,
    GRAM_PREFIX,
    MAP_PREFIX,
    ODIN,
    RANKFEAT_PREFIX,
    RESERVED,
    ArraySpec,
    StoreWriter,
    WriteBehind,
    feature_dim,
    write_shard_data,
)

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
    # opt-in extraction-time methods (all empty: the store is exactly what it is without them)
    gram: tuple = ()  # layers whose Gram row sums are kept, one set per power of gram_powers
    gram_powers: tuple = ()
    odin_temperatures: tuple = ()  # ODIN's grid: every (temperature, noise) pair is computed
    odin_noises: tuple = ()
    rankfeat: tuple = ()  # layers whose rank-1 part RankFeat removes (one forward pass each)


def resolve_plan(model, layers, input_shape, *, grad_layers=(), head=None, device="cpu", maps=(),
                 images=False, gram=(), gram_powers=tuple(range(1, 11)), odin_temperatures=(), odin_noises=(),
                 rankfeat=()) -> Plan:
    """Validate the layer spec against the model; layers come back in network order.

    ``gram`` and ``rankfeat`` name layers with (C, H, W) outputs; ODIN's grid is
    every pair of ``odin_temperatures`` and ``odin_noises`` (both or neither).
    """
    layers = resolve_layers(model, layers, input_shape, device)
    stray = [name for name in grad_layers if name not in layers]
    if stray:
        raise ConfigError(f"The 'extract.grad_layers' parameter of extract must be a subset of extract.layers "
                          f"{layers}. Got {stray[0]!r}. Hint: add it to extract.layers too.")
    if head is not None:
        head_parameters(model, head)  # checks that it is a Linear module
    shapes = layer_shapes(model, input_shape, device)
    if bool(odin_temperatures) != bool(odin_noises):
        raise ConfigError("ODIN's grid needs both extract.odin.temperatures and extract.odin.noises (or neither). "
                          f"Got temperatures {list(odin_temperatures)} and noises {list(odin_noises)}.")
    return Plan(tuple(layers), tuple(n for n in layers if n in grad_layers), head,
                _spatial_layers("extract.maps", maps, shapes), bool(images),
                gram=_spatial_layers("extract.gram.layers", gram, shapes),
                gram_powers=tuple(int(p) for p in gram_powers) if gram else (),
                odin_temperatures=tuple(float(t) for t in odin_temperatures),
                odin_noises=tuple(float(e) for e in odin_noises),
                rankfeat=_spatial_layers("extract.rankfeat.layers", rankfeat, shapes))


def _spatial_layers(param, names, shapes) -> tuple:
    """``names`` in network order, each a module with a (C, H, W) output; else one line naming ``param``."""
    flat = [name for name in names if name in shapes and len(shapes[name]) != 3]
    unknown = [name for name in names if name not in shapes]
    if unknown or flat:
        bad = (unknown or flat)[0]
        got = "not a module of the model" if unknown else f"of output shape {shapes[bad]}"
        raise ConfigError(f"The '{param}' parameter of extract must name layers with (C, H, W) outputs. "
                          f"Got {bad!r}, {got}. Hint: `layerscope layers` lists the layers and their shapes.")
    order = {name: i for i, name in enumerate(shapes)}
    return tuple(sorted(dict.fromkeys(names), key=order.__getitem__))


@dataclass
class _Recorded:
    """What one thread's last pass left in a :class:`LayerRecorder`."""

    pooled: dict = field(default_factory=dict)
    energies: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)
    gram: dict = field(default_factory=dict)
    penultimate: torch.Tensor | None = None
    paused: bool = False
    rankfeat: str | None = None  # the layer whose rank-1 part this thread's passes remove now


class LayerRecorder:
    """Context manager: forward hooks that keep pooled activations and energies.

    After each forward pass, ``pooled[name]`` is (n, C) and ``energies[name]`` is
    (n,); ``raw[name]`` keeps the un-detached output of gradient layers,
    ``penultimate`` the input of the head, ``maps[name]`` the unpooled maps and
    ``gram[name]`` (n, P, C) the Gram row sums of ``extract.gram`` layers. Inside
    :meth:`pause` the hooks keep nothing. Hooks are removed on exit.

    Each thread sees what its own passes left (the values live in a
    ``threading.local``), so several threads may run passes through one
    model and one recorder at once. Every hook is installed at enter, the
    RankFeat ones too (idle until :meth:`rankfeat_logits`): adding a hook
    while another thread runs a pass would change the module's hook dict
    under its iteration.
    """

    def __init__(self, model, plan: Plan):
        self.model, self.plan = model, plan
        self._handles, self._local = [], threading.local()

    def _state(self) -> _Recorded:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _Recorded()
        return state

    pooled = property(lambda self: self._state().pooled)
    energies = property(lambda self: self._state().energies)
    raw = property(lambda self: self._state().raw)
    maps = property(lambda self: self._state().maps)
    gram = property(lambda self: self._state().gram)
    penultimate = property(lambda self: self._state().penultimate)
    paused = property(lambda self: self._state().paused)

    def __enter__(self):
        modules = dict(self.model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.plan.layers]
        self._handles += [modules[name].register_forward_hook(self._map_hook(name)) for name in self.plan.maps]
        self._handles += [modules[name].register_forward_hook(self._gram_hook(name)) for name in self.plan.gram]
        self._handles += [modules[name].register_forward_hook(self._rankfeat_hook(name)) for name in self.plan.rankfeat]
        if self.plan.head is not None:
            self._handles.append(modules[self.plan.head].register_forward_pre_hook(self._head_hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def pause(self):
        """Hooks keep nothing inside: the extra passes (ODIN, RankFeat) leave the main pass's values alone."""
        state = self._state()
        state.paused = True
        try:
            yield self
        finally:
            state.paused = False

    def rankfeat_logits(self, x, layer: str) -> torch.Tensor:
        """:func:`rankfeat_logits` through this recorder's own hook on ``layer`` (call it inside :meth:`pause`)."""
        state = self._state()
        state.rankfeat = layer
        try:
            with torch.inference_mode():
                return self.model(x.detach()).float()
        finally:
            state.rankfeat = None

    def _hook(self, name):
        def hook(_module, _inputs, output):
            state = self._state()
            if state.paused:
                return
            act = _first_tensor(output)
            if name in self.plan.grad_layers:
                state.raw[name] = act
            act = act.detach()
            state.pooled[name] = pool(act).float()
            state.energies[name] = energy(act)
        return hook

    def _map_hook(self, name):
        def hook(_module, _inputs, output):
            state = self._state()
            if not state.paused:
                state.maps[name] = _first_tensor(output).detach().float()
        return hook

    def _gram_hook(self, name):
        def hook(_module, _inputs, output):
            state = self._state()
            if not state.paused:
                state.gram[name] = gram_rowsums(_first_tensor(output), self.plan.gram_powers).float()
        return hook

    def _rankfeat_hook(self, name):
        def hook(_module, _inputs, output):
            if self._state().rankfeat == name:
                return _rank1_output(name, output)
        return hook

    def _head_hook(self, _module, inputs):
        state = self._state()
        if not state.paused:
            state.penultimate = torch.flatten(_first_tensor(inputs).detach(), 1).float()


def extract_batch(model, x, recorder: LayerRecorder) -> dict[str, np.ndarray]:
    """One forward pass (plus one backward pass for gradient layers).

    With ODIN, the same pass also gives one backward pass per temperature
    (w.r.t. the input), then one forward pass per (temperature, noise); with
    RankFeat, one forward pass per layer. Returns every array the store keeps
    for these samples.
    """
    plan = recorder.plan
    if plan.odin_temperatures:  # ODIN steps the input along its own gradient
        x = x.detach().requires_grad_(True)
    with torch.enable_grad() if plan.grad_layers or plan.odin_temperatures else torch.inference_mode():
        logits = model(x).float()
        grads = _kl_grads(logits, [recorder.raw[n] for n in plan.grad_layers],
                          retain_graph=bool(plan.odin_temperatures)) if plan.grad_layers else []
        steps = odin_steps(logits, x, plan.odin_temperatures) if plan.odin_temperatures else []
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
    out.update({f"{GRAM_PREFIX}{name}": recorder.gram[name].cpu().numpy() for name in plan.gram})
    if plan.odin_temperatures or plan.rankfeat:
        with recorder.pause():  # extra passes: the hooks keep what the main pass gave
            if plan.odin_temperatures:
                out[ODIN] = odin_confidences(model, x, logits, steps, plan.odin_temperatures, plan.odin_noises)
            out.update({f"{RANKFEAT_PREFIX}{name}": recorder.rankfeat_logits(x, name).cpu().numpy()
                        for name in plan.rankfeat})
    return out


def _kl_grads(logits, activations, retain_graph=False):
    """Gradients of the KL loss w.r.t. each activation, summed over H, W: list of (n, C)."""
    grads = torch.autograd.grad(kl_uniform_loss(logits), activations, retain_graph=retain_graph)
    return [pool_sum(g.float()).cpu().numpy() for g in grads]


def gram_rowsums(activation: torch.Tensor, powers) -> torch.Tensor:
    """Sastry & Oore's Gram statistic of each sample's map, per power: shape (n, len(powers), C), float64.

    With ``F`` the map as a C x HW matrix and ``F^p`` its elementwise power,
    ``s = (F^p (F^p)^T) 1`` (the Gram matrix's row sums) and the value is
    ``sign(s) * |s|^(1/p)``: the authors' ``G_p`` (their notebook, and OpenOOD
    v1.5's ``gram_postprocessor.py``), which sums the rows *before* the p-th
    root. The row sums are computed as ``F^p (1^T F^p)^T`` (O(C HW), not
    O(C^2 HW)), in float64: ``F^10`` overflows float32 for activations above
    about 80.

    Parameters
    ----------
    activation : Tensor of shape (n, C, H, W)
    powers : sequence of int

    Returns
    -------
    Tensor of shape (n, len(powers), C)
    """
    f = activation.detach().flatten(2).double()
    out = []
    for p in powers:
        fp = f ** p
        s = (fp * fp.sum(dim=1, keepdim=True)).sum(dim=2)
        out.append(s.sign() * s.abs() ** (1.0 / p))
    return torch.stack(out, dim=1)


def odin_steps(logits, x, temperatures) -> list[torch.Tensor]:
    """ODIN's input step for each temperature: the sign of the input gradient of the cross-entropy, as +-1.

    The loss is the cross-entropy of ``logits / T`` against the predicted
    class (OpenOOD v1.5's ``odin_postprocessor.py``, from the authors' code),
    summed over the batch (OpenOOD averages: the sign is the same, and each
    sample's gradient is its own). A zero gradient counts as positive
    (OpenOOD's ``torch.ge(grad, 0)``). One backward pass per temperature,
    through the graph of the pass that gave ``logits``.

    Parameters
    ----------
    logits : Tensor of shape (n, K)
        Computed from ``x`` with autograd on.
    x : Tensor of shape (n, C, H, W)
        The model's input (it ``requires_grad``).
    temperatures : sequence of float

    Returns
    -------
    list of Tensor of shape (n, C, H, W)
    """
    labels = logits.detach().argmax(1)
    steps = []
    for i, t in enumerate(temperatures):
        loss = F.cross_entropy(logits / t, labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, retain_graph=i < len(temperatures) - 1)
        steps.append((grad >= 0).to(x.dtype) * 2 - 1)
    return steps


def odin_confidences(model, x, logits, steps, temperatures, noises) -> np.ndarray:
    """ODIN's confidence ``max softmax(f(x - eps * step_T) / T)`` for every (T, eps): shape (n, n_T, n_eps).

    ``x`` is the image **before** the model's own normalisation (our models
    hold it as their ``normalize`` module). OpenOOD perturbs the normalised
    input by ``eps * sign / std`` per channel, which is ``eps * sign`` before
    normalisation: the same input reaches the network (when OpenOOD's std is
    the model's), and the gradient's sign is the same in both spaces (std > 0).
    ``eps = 0`` reuses ``logits`` (no pass). The softmax is taken in float64:
    at T = 1000 the confidences differ in their fifth digit.

    Returns
    -------
    ndarray of shape (n, len(temperatures), len(noises)), float64
        Higher = more ID (OpenOOD's ``conf``).
    """
    out = np.empty((len(x), len(temperatures), len(noises)))
    base = x.detach()
    with torch.inference_mode():
        for i, (t, step) in enumerate(zip(temperatures, steps)):
            for j, eps in enumerate(noises):
                scaled = (logits.detach() if eps == 0 else model(base - eps * step)).double() / t
                out[:, i, j] = torch.softmax(scaled, dim=1).max(dim=1).values.cpu().numpy()
    return out


def rank1_removed(activation: torch.Tensor) -> torch.Tensor:
    """RankFeat's feature: each sample's (C, HW) map minus its rank-1 part ``s_1 u_1 v_1^T`` (exact SVD).

    As OpenOOD v1.5's ``rankfeat_postprocessor.py`` with ``accelerate: False``
    (``torch.linalg.svd``); the SVD runs in float64 and the result comes back
    in the map's dtype.

    Parameters
    ----------
    activation : Tensor of shape (n, C, H, W)

    Returns
    -------
    Tensor of shape (n, C, H, W)
    """
    m = activation.flatten(2).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    top = s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])
    return (m - top).reshape(activation.shape).to(activation.dtype)


def rankfeat_logits(model, x, layer: str) -> torch.Tensor:
    """The logits of a pass in which ``layer``'s output is replaced by :func:`rank1_removed` of it: (n, K)."""
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _module, _inputs, output: _rank1_output(layer, output))
    try:
        with torch.inference_mode():
            return model(x.detach()).float()
    finally:
        handle.remove()


def _rank1_output(layer: str, output) -> torch.Tensor:
    """A RankFeat hook's replacement for ``layer``'s output: :func:`rank1_removed` of it (one tensor only)."""
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"The 'extract.rankfeat.layers' entry {layer!r} returns a {type(output).__name__}; "
                          "RankFeat needs a module whose output is one (C, H, W) tensor.")
    return rank1_removed(output)


def method_provenance(plan: Plan) -> dict:
    """What the opt-in extraction-time methods computed, for the store's provenance (and key): {} when none."""
    out = {}
    if plan.gram:
        out["gram"] = {"layers": list(plan.gram), "powers": list(plan.gram_powers),
                       "formula": "sign(s)|s|^(1/p), s = row sums of F^p (F^p)^T, F the C x HW map (Sastry & Oore)"}
    if plan.odin_temperatures:
        out["odin"] = {"temperatures": list(plan.odin_temperatures), "noises": list(plan.odin_noises),
                       "formula": "max softmax(f(x - eps sign(grad_x CE(f(x)/T, argmax)))/T), x before normalisation"}
    if plan.rankfeat:
        out["rankfeat"] = {"layers": list(plan.rankfeat),
                           "formula": "logits after removing s1 u1 v1^T (exact SVD) from the layer's C x HW map"}
    return out


def method_coords(plan: Plan) -> dict:
    """Coordinates of the opt-in arrays' extra dimensions (none when no method is set)."""
    out = {}
    if plan.gram:
        out["gram_power"] = np.asarray(plan.gram_powers, dtype=np.int64)
    if plan.odin_temperatures:
        out["odin_temperature"] = np.asarray(plan.odin_temperatures, dtype=np.float64)
        out["odin_noise"] = np.asarray(plan.odin_noises, dtype=np.float64)
    return out


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
    return layer_specs + grad_specs + head_specs + map_specs + _method_specs(shapes, plan, n_classes) + [
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


def _method_specs(shapes: dict, plan: Plan, n_classes: int) -> list[ArraySpec]:
    """The opt-in arrays of Gram, ODIN and RankFeat: none when no method is set.

    Never float16 (``extract.dtype``): Gram row sums exceed its range, and
    ODIN's confidences at T = 1000 differ beyond its precision.
    """
    specs = [ArraySpec(f"{GRAM_PREFIX}{name}", None, "float32", sample_shape=(len(plan.gram_powers), shapes[name][0]),
                       dims=("gram_power", feature_dim(name)),
                       attrs={"layer": name, "powers": list(plan.gram_powers),
                              "formula": "sign(s)|s|^(1/p), s = row sums of F^p (F^p)^T, F the C x HW map"})
             for name in plan.gram]
    if plan.odin_temperatures:
        specs.append(ArraySpec(ODIN, None, "float64", sample_shape=(len(plan.odin_temperatures), len(plan.odin_noises)),
                               dims=("odin_temperature", "odin_noise"),
                               attrs={"temperatures": list(plan.odin_temperatures), "noises": list(plan.odin_noises),
                                      "what": "ODIN's confidence max softmax(f(x~)/T), higher = more ID"}))
    specs += [ArraySpec(f"{RANKFEAT_PREFIX}{name}", n_classes, "float32", dim="class",
                        attrs={"layer": name, "what": "logits with the layer's rank-1 part removed (RankFeat)"})
              for name in plan.rankfeat]
    return specs


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
    lanes: int = 1  # threads computing a shard's batches side by side, one torch thread each (:class:`Lanes`)

    def __call__(self, task):
        """Compute and write one whole shard (what a Dask worker runs); ``task`` is ``(split, index, start, stop)``."""
        split, index, start, stop = task
        write_shard_data(self.store, split, index, self.shard_rows, self.compute(task))
        return stop - start

    def compute(self, task, lanes: Lanes | None = None) -> dict[str, np.ndarray]:
        """Every array's rows of one shard, ``name -> (stop - start, ...)``, without writing them.

        ``lanes``: an entered :class:`Lanes` kept across shards; default: ``self.lanes`` of them for this shard.
        """
        if lanes is None:
            with Lanes(self.lanes) as lanes:
                return self.compute(task, lanes)
        split, _index, start, stop = task
        model = self.model()
        device = next(model.parameters()).device
        with LayerRecorder(model, self.plan) as recorder:
            return _extract_rows(model, self.data(split), start, stop, recorder, self.batch_size, device,
                                 self.num_workers, lanes)


def extract_to_store(model, splits: dict, plan: Plan, writer: StoreWriter, *, batch_size=128, device="cpu",
                     dtype="float32", num_workers=0, runner=None, sources=None, lanes=None):
    """Run every split through the model and write whole shards to ``writer``.

    Groups and arrays are created here, before the fan-out; then each pending
    shard is one task (:class:`ShardJob`). Without a cluster, this thread
    computes the shards one after the other and a background thread writes
    each finished one meanwhile (:class:`~pipeline.store.WriteBehind`); on a
    cluster, a Dask worker loads the model once and writes its whole shards
    itself. A shard is recorded as done once it is written, so a run
    interrupted anywhere (or a killed worker) resumes from the shards already
    recorded.

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
        Where shards are computed: a cluster's runner sends them to its workers;
        default (or a runner without a cluster): this thread, one shard at a
        time, with each finished shard written in the background.
    sources : (model source, data source), optional
        Picklable callables that give the model and a split's dataset in a
        worker process (:class:`CheckpointModel`, :class:`BenchmarkData`);
        default: ``model`` and ``splits`` themselves (:class:`InMemory`).
    lanes : int, optional
        Threads that compute each shard's batches side by side in this
        process, one torch thread each (see :func:`_extract_rows`); default:
        torch's thread count for a network on the CPU, else 1. Cluster
        workers compute with one lane. The store is the same whatever the count.
    """
    first = next(iter(splits.values()))[0]
    input_shape = tuple(first[0][0].shape)
    shapes = layer_shapes(model, input_shape, device)
    head = head_parameters(model, plan.head) if plan.head is not None else None
    head_width = None if head is None else head["weight"].shape[1]
    specs = array_specs(shapes, plan, _n_classes(model, input_shape, device), dtype, head_width, input_shape)
    if head is not None:
        writer.write_constants("head", head, dims={"weight": ("class", "head_input"), "bias": ("class",)})
    # the ``layer`` dimension's coordinate (energy's columns): ``energy.sel(layer="layer3")`` in xarray
    writer.create_splits({name: (len(ds), {**attrs, "n_samples": len(ds)}) for name, (ds, attrs) in splits.items()},
                         specs, coords={"layer": np.asarray(plan.layers, dtype=str), **method_coords(plan)})
    tasks = [(name, i, *writer.shard_range(i, len(ds))) for name, (ds, _) in splits.items()
             for i in writer.pending_shards(name, len(ds))]
    model_source, data_source = sources or (InMemory(model), InMemory({n: ds for n, (ds, _) in splits.items()}))
    job = ShardJob(model_source, data_source, plan, str(writer.staged_store), writer.shard_rows, batch_size,
                   num_workers)
    if runner is not None and runner.distributed:
        for (name, index, _, _), _rows in runner.map_unordered(job, tasks, desc="extract", unit="shard"):
            writer.mark_done(name, index)
    else:
        lanes = default_lanes(model, shapes, batch_size) if lanes is None else int(lanes)
        _extract_here(replace(job, lanes=lanes), tasks, writer)
    return specs


# Activation memory the lanes beyond the first may hold (each runs a pass of its own batch at once).
LANE_MEMORY = 2**30
LIVE_MAPS = 3  # maps of a batch alive at once in a pass, for that estimate (a block's input, its branch, its output)


def default_lanes(model, shapes: dict | None = None, batch_size: int | None = None) -> int:
    """Lanes for a network in this process: torch's thread count on the CPU, 1 on an accelerator.

    On the CPU, one torch thread per lane computes each operation alone: no
    thread waits at the end of every operation for the others (a pass through
    a small network is many short operations and Python between them), and a
    writer thread beside the lanes only shares a core, as any process does.
    Every lane holds a batch's activations, though: given the network's
    output ``shapes`` (:func:`layer_shapes`) and the ``batch_size``, the
    lanes beyond the first fit in :data:`LANE_MEMORY` (a CIFAR ResNet-18 at
    batch 128 takes about 100 MB a lane, an ImageNet ResNet-50 1.2 GB: one
    lane, torch's threads on each operation as before).
    """
    if next(model.parameters()).device.type != "cpu":
        return 1
    lanes = torch.get_num_threads()
    if shapes and batch_size:
        per_lane = batch_size * max(int(np.prod(shape)) for shape in shapes.values()) * 4 * LIVE_MAPS
        lanes = min(lanes, 1 + LANE_MEMORY // per_lane)
    return max(1, lanes)


def _extract_here(job: ShardJob, tasks: list, writer: StoreWriter):
    """Compute ``tasks`` in order, in this process; each finished shard is written in the background.

    The shards share one model and its hooks; a shard's batches are computed
    by ``job.lanes`` threads side by side (:func:`_extract_rows`). When the
    writer hinders no pass (:func:`_write_behind_depth`), writing shard k
    (Zstd, files) overlaps the passes of shard k + 1, and at most two shards
    are in memory (:class:`~pipeline.store.WriteBehind` with depth 1); else
    each shard is written as it is finished. The shard's files are encoded
    by as many threads as the passes use (lanes, or torch's threads when the
    passes wait for the write), by one beside passes on one torch thread.
    """
    from tqdm.auto import tqdm

    depth = _write_behind_depth(job)
    # lanes: their threads (idle at the last shard); a blocking write: torch's (they wait); else the writer alone
    encoders = job.lanes if job.lanes > 1 else torch.get_num_threads() if depth == 0 else 1
    with Lanes(job.lanes) as lanes, WriteBehind(writer, depth=depth, encoders=encoders) as behind, \
            tqdm(total=len(tasks), desc="extract", unit="shard", disable=None) as bar:
        for task in tasks:
            behind.submit(task[0], task[1], job.compute(task, lanes))
            bar.update(1)


def _write_behind_depth(job: ShardJob) -> int:
    """1 (write in the background) when the writer hinders no pass, 0 (write in this thread) when it would.

    The writer hinders none when the network runs on an accelerator, when
    torch's pool is smaller than the cores this process may use, or when the
    passes run in lanes (each operation on one thread: a writer beside them
    only shares a core). Otherwise the writer thread takes a core from the
    passes' OpenMP threads, which then wait for each other at every
    operation (see :mod:`pipeline.threads`): on 2 cores, background writes
    made extraction slower, not faster.
    """
    from pipeline.threads import usable_cores

    device = next(job.model().parameters()).device
    return 1 if device.type != "cpu" or job.lanes > 1 or torch.get_num_threads() < usable_cores() else 0


def _n_classes(model, input_shape, device):
    with torch.inference_mode():
        return int(model(torch.zeros((1, *input_shape), device=device)).shape[1])


def _extract_rows(model, dataset, start, stop, recorder, batch_size, device, num_workers=0, lanes=None):
    """Rows ``[start, stop)`` of every array, computed batch by batch.

    Each batch is copied straight into arrays of the shard's size, at its own
    rows (:class:`_ShardRows`): one copy of the data, where concatenating
    the batches at the end made two and held both at once. With ``lanes``
    (an entered :class:`Lanes`), its threads take the next batch in turn;
    every batch is computed as it would be alone, so the rows are the same
    whichever lane computes them. None: this thread computes them all.
    """
    rows = _ShardRows(stop - start)
    batches = _Shared(_numbered(_batches(dataset, start, stop, batch_size, num_workers)))

    def lane():
        for offset, x, y in batches:
            batch = extract_batch(model, x.to(device), recorder)
            batch["label"] = np.asarray(y, dtype=np.int64)
            rows.put(offset, batch)

    (lanes or Lanes()).run(lane, batches.close)
    out = rows.arrays(start, stop)
    out["sample"] = source_index(dataset)[start:stop]
    return out


class _ShardRows:
    """One shard's arrays, ``name -> (n, ...)``, allocated at the first batch and filled at each batch's rows."""

    def __init__(self, n: int):
        self.n, self.done, self._arrays, self._lock = n, 0, {}, threading.Lock()

    def put(self, offset: int, batch: dict[str, np.ndarray]):
        """Copy ``batch`` (``name -> (rows, ...)``) into rows ``[offset, offset + rows)``; any thread."""
        with self._lock:
            for key, values in batch.items():
                if key not in self._arrays:
                    self._arrays[key] = np.empty((self.n, *values.shape[1:]), dtype=values.dtype)
            self.done += len(batch["label"])
        for key, values in batch.items():
            self._arrays[key][offset:offset + len(values)] = values

    def arrays(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The filled arrays; raises unless every row was put (an empty row would be written as np.empty held)."""
        if self.done != self.n:
            raise RuntimeError(f"the dataset gave {self.done} rows for rows [{start}, {stop}), expected {self.n}")
        return dict(self._arrays)


def _numbered(batches):
    """``(offset, x, y)``: each batch with its first row within the shard."""
    offset = 0
    for x, y in batches:
        yield offset, x, y
        offset += len(x)


class _Shared:
    """An iterator that several threads draw from in turn, until it ends or :meth:`close` is called."""

    def __init__(self, iterator):
        self._iterator, self._lock, self._closed = iterator, threading.Lock(), False

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            if self._closed:
                raise StopIteration
            return next(self._iterator)

    def close(self):
        """The other threads stop at their next draw (one has failed, or the caller is interrupted)."""
        self._closed = True


class Lanes:
    """``n`` threads that compute batches side by side, one torch thread each, for as long as the block lasts.

    A pass through a small network is many short operations with Python in
    between; on torch's pool, every thread waits for the others at the end
    of each. In a lane, one torch thread computes each operation alone, and
    the lanes take batches in turn: on 2 cores, the default network's bare
    forward pass ran 1.4x faster in 2 lanes than on 2 torch threads. The
    threads live as long as the block: new ones for every shard ran 1.15x
    faster only (a new thread's first passes warm up again). ``n`` = 1: the
    caller's thread computes, as it is.
    """

    def __init__(self, n: int = 1):
        self.n = int(n)
        self._pool = self._before = None

    def __enter__(self):
        if self.n > 1:
            self._before = torch.get_num_threads()
            # each lane sets its own count as it starts; that also sets the count threads started later
            # take at their first operation, which __exit__ puts back
            self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="layerscope-lane",
                                            initializer=torch.set_num_threads, initargs=(1,))
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            torch.set_num_threads(self._before)

    def run(self, work, stop):
        """``work()`` on every lane (in this thread outside the block, or with one lane).

        The first error of a lane is raised once every lane has ended:
        ``stop()`` makes the others end at their next batch (the caller then
        removes hooks that a running lane would still iterate over).
        """
        if self._pool is None:
            return work()

        def lane():
            try:
                work()
            except BaseException:
                stop()
                raise

        futures = [self._pool.submit(lane) for _ in range(self.n)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            stop()
            concurrent.futures.wait(futures)
            raise


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
