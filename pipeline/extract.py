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

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.errors import ConfigError
from pipeline.store import RESERVED, ArraySpec, StoreWriter

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


def resolve_layers(model, layers, input_shape, device="cpu") -> list[str]:
    """Check layer names against the model and return them in network order."""
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


class LayerRecorder:
    """Context manager: forward hooks that keep pooled activations and energies.

    After each forward pass, ``pooled[name]`` is (n, C) and ``energies[name]`` is
    (n,). Hooks are removed on exit, whatever happens.
    """

    def __init__(self, model, layers):
        self.model, self.layers = model, list(layers)
        self.pooled, self.energies, self._handles = {}, {}, []

    def __enter__(self):
        modules = dict(self.model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name):
        def hook(_module, _inputs, output):
            act = _first_tensor(output)
            self.pooled[name] = pool(act).float()
            self.energies[name] = energy(act)
        return hook


def extract_batch(model, x, recorder: LayerRecorder) -> dict[str, np.ndarray]:
    """One forward pass; returns every array the store keeps for these samples."""
    logits = model(x).float()
    out = {name: recorder.pooled[name].cpu().numpy() for name in recorder.layers}
    out["energy"] = torch.stack([recorder.energies[n] for n in recorder.layers], dim=1).cpu().numpy()
    out["logits"] = logits.cpu().numpy()
    out["pred"] = logits.argmax(1).cpu().numpy().astype(np.int64)
    return out


def array_specs(shapes: dict, layers, n_classes: int, dtype: str) -> list[ArraySpec]:
    """The arrays of one split: a pooled array per layer, energy, logits, pred, label."""
    specs = [
        ArraySpec(name, shapes[name][-1] if len(shapes[name]) == 2 else shapes[name][0], dtype,
                  attrs={"layer": name, "pooling": POOLING[len(shapes[name]) + 1]})
        for name in layers
    ]
    return specs + [
        ArraySpec("energy", len(layers), "float32", dim="layer",
                  attrs={"layers": list(layers), "temperature": 1.0, "formula": "-logsumexp(full activation)"}),
        ArraySpec("logits", n_classes, "float32", dim="class"),
        ArraySpec("pred", None, "int64"),
        ArraySpec("label", None, "int64"),
    ]


def extract_to_store(model, splits: dict, layers, writer: StoreWriter, *, batch_size=128, device="cpu", dtype="float32"):
    """Run every split through the model and write whole shards to ``writer``.

    Parameters
    ----------
    model : nn.Module
        In eval mode.
    splits : dict
        ``name -> (dataset, attrs)``; items of ``dataset`` are ``(image, label)``.
    layers : list of str
        Resolved layer names, in network order.
    writer : StoreWriter
        An entered writer; shards it already holds are skipped (resume).
    batch_size : int
        Batches never cross a shard boundary, so a resumed run computes every
        shard from exactly the same batches as an uninterrupted one.
    device : torch.device or str
    dtype : {"float32", "float16"}
        Storage dtype of the pooled activations.
    """
    first = next(iter(splits.values()))[0]
    input_shape = tuple(first[0][0].shape)
    shapes = layer_shapes(model, input_shape, device)
    n_classes = _n_classes(model, input_shape, device)
    specs = array_specs(shapes, layers, n_classes, dtype)
    todo = {name: writer.pending_shards(name, len(ds)) for name, (ds, _) in splits.items()}
    total = sum(_rows(writer, todo[name], len(ds)) for name, (ds, _) in splits.items())
    with LayerRecorder(model, layers) as recorder, tqdm(total=total, desc="extract", unit="img", disable=None) as bar:
        for name, (dataset, attrs) in splits.items():
            writer.create_split(name, len(dataset), specs, {**attrs, "n_samples": len(dataset)})
            for index in todo[name]:
                start, stop = writer.shard_range(index, len(dataset))
                data = _extract_rows(model, dataset, start, stop, recorder, batch_size, device)
                writer.write_shard(name, index, data)
                bar.update(stop - start)
    return specs


def _rows(writer, shards, n):
    """Number of samples in the given shards."""
    return sum(stop - start for start, stop in (writer.shard_range(i, n) for i in shards))


def _n_classes(model, input_shape, device):
    with torch.inference_mode():
        return int(model(torch.zeros((1, *input_shape), device=device)).shape[1])


@torch.inference_mode()
def _extract_rows(model, dataset, start, stop, recorder, batch_size, device):
    """Rows ``[start, stop)`` of every array, computed batch by batch."""
    subset = torch.utils.data.Subset(dataset, range(start, stop))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)
    parts = []
    for x, y in loader:
        batch = extract_batch(model, x.to(device), recorder)
        batch["label"] = np.asarray(y, dtype=np.int64)
        parts.append(batch)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def store_key(**inputs) -> str:
    """Fingerprint of everything that determines a store's content."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
