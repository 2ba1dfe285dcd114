"""Backbones, their training, and checkpoints.

The default backbone is a small CIFAR-style ResNet (He et al. 2016, the CIFAR
variant with three stages) whose blocks carry the usual names, so that layer
specs read the same as on a full ResNet: ``layer1``, ``layer1.0.conv2``,
``layer3``, ``avgpool``, ``fc``. Input normalisation is a buffer inside the
model, so a checkpoint is self-contained and every pass (extraction, a deployed
guard) sees the same preprocessing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from pipeline.artifacts import file_sha256  # noqa: F401  (re-exported: checkpoints are hashed by it)
from pipeline.errors import ConfigError, DataError, invalid_param
from pipeline.threads import torch_threads

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def resolve_device(device: str = "auto") -> torch.device:
    """Map the ``device`` param to a torch device; ``"auto"`` picks CUDA when present."""
    from pipeline.config import check_device

    check_device("device", device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"The 'device' parameter is {device!r}, but CUDA is not available here. Hint: use 'auto'.")
    return torch.device(device)


class Normalize(nn.Module):
    """Per-channel standardisation with statistics fixed at training time."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18's block)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, one stage per width, global pooling, fc.

    Parameters
    ----------
    num_classes : int
    in_channels : int
        1 for grey images, 3 for RGB.
    widths : tuple of int
        Channels of each stage; stage ``i`` is named ``layer{i+1}``.
    blocks : tuple of int
        Basic blocks per stage, same length as ``widths``.
    mean, std : sequence of float, optional
        Input normalisation per channel (0 and 1 if omitted).
    """

    def __init__(self, num_classes, in_channels=1, widths=(16, 32, 64), blocks=(1, 1, 1), mean=None, std=None):
        super().__init__()
        mean = [0.0] * in_channels if mean is None else mean
        std = [1.0] * in_channels if std is None else std
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (width, n_blocks) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_planes if b == 0 else width, width, stride if b == 0 else 1) for b in range(n_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_planes = width
        self.n_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def architectures() -> dict:
    """Every buildable backbone: the default CIFAR ResNet and the seeds' backbones.

    :mod:`pipeline.backbones` builds on this module, so it is imported here, late.
    """
    from pipeline.backbones import BACKBONES

    return {"cifar_resnet": CifarResNet, **BACKBONES}


def build_model(spec: dict) -> nn.Module:
    """Build an untrained backbone from its spec (the ``arch`` key picks the class).

    Parameters
    ----------
    spec : dict
        ``{"arch": "cifar_resnet", "num_classes": 8, "in_channels": 1, ...}``;
        every other key is passed to the architecture's constructor.
    """
    spec = dict(spec)
    arch = spec.pop("arch", None)
    spec.pop("origin", None)  # where imported weights came from: provenance, not a constructor argument
    archs = architectures()
    if arch not in archs:
        raise invalid_param("train.arch", "train", f"one of {sorted(archs)}", arch)
    if len(spec.get("widths", ())) != len(spec.get("blocks", ())):
        raise invalid_param("train.blocks", "train", "a list as long as train.widths", spec.get("blocks"))
    return archs[arch](**spec)


def init_model(spec: dict, seed: int) -> nn.Module:
    """Build a model with seeded weights, leaving torch's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


def untrained_model(gen_cfg, train_cfg) -> tuple[nn.Module, tuple]:
    """``train.arch`` with seeded weights and one input's shape (C, H, W): its layer names and shapes, no data.

    Digits are grey with ``10 - len(holdout_classes)`` classes; a sources benchmark
    has ``generate.channels`` (its number of classes only sizes the head, so 10
    stands in before generate has counted them).
    """
    channels = 1 if gen_cfg.benchmark == "digits" else gen_cfg.channels
    n_classes = 10 - len(gen_cfg.holdout_classes) if gen_cfg.benchmark == "digits" else 10
    spec = model_spec(train_cfg, num_classes=n_classes, in_channels=channels)
    return init_model(spec, train_cfg.seed), (channels, gen_cfg.image_size, gen_cfg.image_size)


def model_spec(cfg, *, num_classes, in_channels, mean=None, std=None) -> dict:
    """The architecture spec a checkpoint records, from the ``train`` params.

    Parameters
    ----------
    cfg : pipeline.config.TrainConfig
    num_classes, in_channels : int
        From the ID data.
    mean, std : list of float, optional
        Input normalisation; ``cfg.mean``/``cfg.std`` take precedence. None lets
        the architecture choose (ImageNet statistics for torchvision backbones).
    """
    spec = {"arch": cfg.arch, "num_classes": num_classes, "in_channels": in_channels,
            "mean": list(cfg.mean) if cfg.mean is not None else mean,
            "std": list(cfg.std) if cfg.std is not None else std}
    if cfg.arch == "cifar_resnet":  # the only architecture with a configurable size
        spec.update(widths=list(cfg.widths), blocks=list(cfg.blocks))
    return spec


def import_model(spec: dict, *, checkpoint=None, openood_keys=False, weights=None):
    """Build ``spec``'s architecture with pretrained weights instead of training it.

    Parameters
    ----------
    spec : dict
        From :func:`model_spec`.
    checkpoint : str or Path, optional
        A local state_dict (or a dict holding one under ``"state_dict"``), read
        with ``torch.load(weights_only=True)``; see :func:`pipeline.backbones.load_weights`.
    openood_keys : bool
        Rename an OpenOOD v1.5 checkpoint's keys first.
    weights : str, optional
        A torchvision weights name (ImageNet backbones); torchvision fetches it
        unless it is in its cache (``TORCH_HOME``).

    Returns
    -------
    model : nn.Module
        In eval mode.
    spec : dict
        ``spec`` plus ``origin``: the checkpoint's path and sha256, or the weights name.
    """
    from pipeline.backbones import load_weights

    if (checkpoint is None) == (weights is None):
        raise ConfigError("import_model needs exactly one of 'checkpoint' (train.checkpoint) and 'weights' "
                          f"(train.weights). Got checkpoint={checkpoint!r}, weights={weights!r}.")
    if checkpoint is not None:
        model = load_weights(build_model(spec), checkpoint, openood=openood_keys)
        origin = {"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint), "openood_keys": openood_keys}
    else:
        try:
            model = build_model({**spec, "weights": weights})
        except TypeError:
            raise invalid_param("train.weights", "train", "null for this architecture (torchvision weights names "
                                "are for resnet50_imagenet and vit_b16_imagenet)", weights,
                                hint="give a local state_dict as train.checkpoint instead.") from None
        origin = {"weights": weights}
    return model.eval(), {**spec, "origin": origin}


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """CIFAR's standard augmentation: a random crop after zero-padding by ``pad``, then a random flip.

    Parameters
    ----------
    x : Tensor of shape (batch, C, S, S)
    generator : torch.Generator
        A CPU generator: the same seed gives the same crops and flips.

    Returns
    -------
    Tensor of shape (batch, C, S, S)
    """
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (b, h)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def train_model(model, dataset, *, epochs, batch_size, lr, momentum=0.9, weight_decay=5e-4, seed=0, device="cpu",
                augment=False, num_workers=0, threads=1):
    """Train with SGD + one-cycle schedule on a (image, label) dataset.

    Parameters
    ----------
    model : nn.Module
    dataset : torch Dataset
        Items are ``(image of shape (C, H, W), int label)``.
    epochs, batch_size : int
    lr, momentum, weight_decay : float
    seed : int
        Seeds the shuffling (a dedicated ``torch.Generator``).
    device : torch.device or str
    augment : bool
        Apply :func:`augment_batch` (seeded) to every batch.
    num_workers : int
        DataLoader workers (for data sets decoded from files).
    threads : int, default=1
        torch's CPU threads while training: the learned weights depend on
        the count (:func:`pipeline.threads.torch_threads`), so it is a
        parameter like ``lr``, not whatever the machine has free.

    Returns
    -------
    history : list of float
        Mean training loss per epoch.
    """
    with torch_threads(threads):
        return _train_model(model, dataset, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                            weight_decay=weight_decay, seed=seed, device=device, augment=augment,
                            num_workers=num_workers)


def _train_model(model, dataset, *, epochs, batch_size, lr, momentum, weight_decay, seed, device, augment,
                 num_workers):
    model.to(device).train()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
    )
    aug = torch.Generator().manual_seed(seed + 1) if augment else None
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    history = []
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=None)
    for _ in bar:
        losses = [_train_step(model, opt, sched, _maybe_augment(x.to(device), aug), y.to(device)) for x, y in loader]
        history.append(float(np.mean(losses)))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history


def _maybe_augment(x, generator):
    return x if generator is None else augment_batch(x, generator)


def _train_step(model, opt, sched, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


@torch.inference_mode()
def predict(model, dataset, *, batch_size=256, device="cpu", num_workers=0) -> np.ndarray:
    """Predicted class per item, shape (n_samples,). Used for the training report."""
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return np.concatenate([model(x.to(device)).argmax(1).cpu().numpy() for x, _ in loader])


def save_checkpoint(model, spec: dict, path) -> Path:
    """Write ``{"format", "spec", "state_dict"}`` atomically (tmp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "spec": spec, "state_dict": state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Returns
    -------
    model : nn.Module
        In eval mode, on ``device``.
    spec : dict
        The architecture spec it was built from.
    """
    from pipeline.files import load_torch

    ckpt = load_torch(path, "Checkpoint", "run `layerscope train` (or `dvc repro train`) to write one; import your "
                      "own weights with train.checkpoint.")
    if not isinstance(ckpt, dict) or "spec" not in ckpt or "state_dict" not in ckpt:
        raise DataError(f"Checkpoint '{path}' is not a layerscope checkpoint (expected keys 'spec' and 'state_dict'). "
                        "Hint: import a plain state_dict with train.checkpoint, then use the checkpoint train writes.")
    model = build_model(ckpt["spec"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt["spec"]
