"""Early-exit OOD detection at inference time: a model run block by block, stopped at the first flag.

Seed 000's argument, deployed: an intermediate layer can reject an
out-of-distribution input before the rest of the network is paid for.
:class:`Guard` wraps a classifier and the per-layer detectors ``fit`` produced.
It runs the model one block at a time. As soon as a guarded layer's output is
computed, it pools it the way extraction did and scores it with that layer's
detector. Inputs whose score is above the layer's threshold stop there; the
others go on. A forward pass through the classifier belongs here (and in
:mod:`pipeline.extract`) and nowhere else: detectors only see pooled arrays.

How the model is split: ``torch.fx`` traces it with every module that holds
no guarded layer kept whole (a leaf), so only the containers on the way to a
guarded layer are traced. The traced graph is cut after each guarded node into
segments, each compiled by fx into a module of its own whose outputs are the
values still needed after the cut (:func:`segments`); after a guarded node,
rows that stopped are dropped from every batch-shaped one. A model that cannot
be traced, or whose values do not keep the batch first, fails a self-check at
construction with a :class:`~pipeline.errors.ModelError`, never a silent full
pass.

How a layer is scored: each detector is checked once at construction and
compiled into torch arithmetic on the model's device (:mod:`pipeline.lean`:
Mahalanobis, Mahalanobis++, KNN-L2, standardised or not); the others (PyOD,
...) keep their own ``score``. The self-check also compares the compiled scores
with the detectors' own on its probe rows, and falls back to ``score`` for a
layer where they differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from pipeline.errors import ModelError, invalid_param
from pipeline.extract import _first_tensor, pool
from pipeline.lean import compile_scorer

log = logging.getLogger(__name__)


@dataclass
class GuardResult:
    """What the guarded model says about each input.

    Attributes
    ----------
    pred : ndarray of shape (n,), int64
        Predicted class, or -1 for an input flagged OOD.
    exit_layer : ndarray of shape (n,), int64
        Index into ``layers`` of the layer that flagged the input, -1 if none did.
    scores : ndarray of shape (n, n_layers), float64
        Each evaluated layer's score (higher = more OOD); NaN where the input
        had stopped before that layer.
    layers : list of str
        Guarded layers, in execution order.
    logits : ndarray of shape (n, n_classes), float32
        NaN rows for flagged inputs.
    """

    pred: np.ndarray
    exit_layer: np.ndarray
    scores: np.ndarray
    layers: list
    logits: np.ndarray = field(repr=False, default=None)

    @property
    def ood(self) -> np.ndarray:
        """(n,) bool: flagged by some layer."""
        return self.exit_layer >= 0

    @property
    def layers_computed(self) -> np.ndarray:
        """(n,) int: guarded layers each input reached (``n_layers`` + 1 for a full pass to the output)."""
        return np.where(self.ood, self.exit_layer + 1, len(self.layers) + 1)

    def records(self) -> list[dict]:
        """One JSON-ready dict per input: prediction or "OOD at layer k", scores of the layers evaluated."""
        out = []
        for i in range(len(self.pred)):
            k = int(self.exit_layer[i])
            out.append({"prediction": None if k >= 0 else int(self.pred[i]),
                        "ood_at_layer": self.layers[k] if k >= 0 else None,
                        "scores": {layer: float(self.scores[i, j]) for j, layer in enumerate(self.layers)
                                   if not np.isnan(self.scores[i, j])},
                        "layers_computed": int(self.layers_computed[i])})
        return out


class Guard:
    """A classifier run block by block that stops at the first guarded layer that flags an input.

    Parameters
    ----------
    model : nn.Module
        The classifier; put in eval mode (batch norm must not mix inputs).
    detectors : dict of str -> detector
        Guarded layer name -> a fitted per-layer detector (``score(X (n, C)) ->
        (n,)``, higher = more OOD), fitted on pooled activations as extracted.
    thresholds : dict of str -> float
        Guarded layer name -> threshold; an input stops where ``score > threshold``.
    input_shape : tuple of int
        ``(C, H, W)`` of one input, for the self-check and FLOP counts.
    device : str or torch.device, default="cpu"

    Raises
    ------
    ModelError
        When the model cannot be split at the guarded layers (see the module docstring).
    """

    def __init__(self, model, detectors, thresholds, input_shape, device="cpu"):
        missing = sorted(set(detectors) ^ set(thresholds))
        if missing or not detectors:
            raise invalid_param("thresholds", "Guard", "one threshold per guarded layer, for at least one layer",
                                missing or thresholds)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.input_shape = tuple(input_shape)
        self.graph, guard_nodes = split_at(model, list(detectors))
        self.layers = [name for name, _ in sorted(guard_nodes.items(), key=lambda kv: self._position(kv[1]))]
        self.detectors = [detectors[layer] for layer in self.layers]
        self.scorers = [compile_scorer(det, self.device) for det in self.detectors]
        self.thresholds = np.array([float(thresholds[layer]) for layer in self.layers])
        self._segments = segments(self.graph, [guard_nodes[layer] for layer in self.layers])
        self._self_check()

    def _position(self, node):
        return list(self.graph.graph.nodes).index(node)

    def __call__(self, x) -> GuardResult:
        """Run ``x`` (n, C, H, W) through the guarded model."""
        with torch.inference_mode():  # as a plain deployed forward would (the decorator costs two more calls)
            x = torch.as_tensor(x)
            if len(x) == 1:
                return self._run_one(x.to(self.device, torch.float32), self.thresholds.tolist())
            return self._run(x, thresholds=self.thresholds)

    def _run_one(self, x, thresholds) -> GuardResult:
        """:meth:`_run` for one input (the latency case): Python scalars for decisions, no index arrays."""
        scores = np.full((1, len(self.layers)), np.nan)
        values = (x,) * self._segments[0].n_inputs
        for k, seg in enumerate(self._segments):
            values = seg.forward(*values)
            if seg.guard is None:
                logits = _first_tensor(values).float().cpu().numpy()
                return GuardResult(_argmax(logits), np.full(1, -1, dtype=np.int64), scores, list(self.layers), logits)
            scores[0, k], stop = self.scorers[k].one(pool(_first_tensor(values[seg.guard])), thresholds[k])
            if stop:
                return GuardResult(np.full(1, -1, dtype=np.int64), np.full(1, k, dtype=np.int64), scores,
                                   list(self.layers), np.full((1, self.n_classes), np.nan, dtype=np.float32))
        raise AssertionError("unreachable: the last segment has no guard")

    def _run(self, x, thresholds, force=None, counter=None, boundaries=None, validated=False):
        """The guarded pass. ``force`` (layer index -> rows to drop) serves the self-check;
        ``counter``/``boundaries`` record cumulative FLOPs at each guard; ``validated``: score with the
        detectors' own ``score`` (no torch arithmetic for the FLOP counter to see).

        The common case, where every row goes on, touches no index arrays: ``alive``
        stays None (all rows, in order) until a row stops.
        """
        x = x.to(self.device, torch.float32)
        n = len(x)
        scores = np.full((n, len(self.layers)), np.nan)
        exit_layer = np.full(n, -1, dtype=np.int64)
        alive = None  # indices of the rows still running; None: all of them
        values = (x,) * self._segments[0].n_inputs
        for k, seg in enumerate(self._segments):
            values = seg.forward(*values)
            if seg.guard is None:
                return self._result(_first_tensor(values), alive, exit_layer, scores)
            if boundaries is not None:
                boundaries.append(counter.get_total_flops())
            pooled, threshold = pool(_first_tensor(values[seg.guard])), float(thresholds[k])
            if validated:
                s = self.scorers[k].validated(pooled)
                stop = s > threshold
            else:
                s, stop = self.scorers[k](pooled, threshold)
            if force is not None:
                stop = stop | np.isin(np.arange(n) if alive is None else alive, force.get(k, []))
            if alive is None:
                scores[:, k] = s
            else:
                scores[alive, k] = s
            if stop.any():
                rows = np.arange(n) if alive is None else alive
                exit_layer[rows[stop]] = k
                alive = rows[~stop]
                if not len(alive):
                    return self._result(None, alive, exit_layer, scores)
                keep = torch.from_numpy(np.flatnonzero(~stop)).to(self.device)
                values = tuple(_take_rows(v, keep, len(stop)) if batched else v
                               for v, batched in zip(values, seg.batched))
        raise AssertionError("unreachable: the last segment has no guard")  # segments() always ends with one

    def _result(self, output, alive, exit_layer, scores) -> GuardResult:
        """The result of a pass: ``output`` holds the logits of the rows in ``alive`` (None: of every row)."""
        if alive is None:  # nothing stopped: the output's rows are the inputs' (a view on the CPU, no copy)
            logits = output.float().cpu().numpy()
            return GuardResult(_argmax(logits), exit_layer, scores, list(self.layers), logits)
        n = len(exit_layer)
        logits = np.full((n, self.n_classes), np.nan, dtype=np.float32)
        pred = np.full(n, -1, dtype=np.int64)
        if len(alive):
            logits[alive] = out = output.float().cpu().numpy()
            pred[alive] = _argmax(out)
        return GuardResult(pred, exit_layer, scores, list(self.layers), logits)

    @torch.inference_mode()
    def _self_check(self):
        """Guarded rows must give the full model's logits; otherwise the split is wrong: refuse it."""
        gen = torch.Generator().manual_seed(0)
        x = torch.rand((3, *self.input_shape), generator=gen).to(self.device)
        try:
            full = _first_tensor(self.model(x)).float().cpu().numpy()
            self.n_classes = full.shape[1] if full.ndim == 2 else 1  # known even when every row stops early
            never = np.full(len(self.layers), np.inf)
            for k in range(len(self.layers)):
                got = self._run(x, never, force={k: [0]}).logits[1:]
                if not np.allclose(got, full[1:], rtol=1e-4, atol=1e-5):
                    raise ModelError(f"Guard cannot split this model at '{self.layers[k]}': the rows that go on do "
                                     "not give the full model's logits (a value computed before that layer is used "
                                     "after it, or keeps the batch off the first dimension). Hint: guard other "
                                     "layers, e.g. the blocks `layerscope layers` lists at the top level.")
            self._check_scorers(self._run(x, never).scores, self._run(x, never, validated=True).scores)
        except ModelError:
            raise
        except Exception as err:  # the model's own code failed on the split graph: say so in one line
            raise ModelError(f"Guard cannot run this model split at {self.layers}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}. Hint: guard other layers.") from err

    def _check_scorers(self, lean, exact):
        """A compiled scorer whose scores differ from its detector's own (rtol 1e-6) is replaced by ``score``."""
        for k, scorer in enumerate(self.scorers):
            if scorer.compiled and not np.allclose(lean[:, k], exact[:, k], rtol=1e-6, atol=0.0):
                log.warning("guard: the compiled scorer of %s at '%s' differs from its score(); using score()",
                            type(scorer.detector).__name__, self.layers[k])
                self.scorers[k] = scorer.uncompiled()

    @torch.inference_mode()
    def block_flops(self) -> np.ndarray:
        """FLOPs per input up to each guarded layer and to the output, from ``torch.utils.flop_counter``.

        Returns
        -------
        cumulative : ndarray of shape (n_layers + 1,)
            FLOPs of one input up to and including guarded layer k; the last
            entry is the whole network's.
        """
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.rand((1, *self.input_shape), generator=torch.Generator().manual_seed(0)).to(self.device)
        boundaries = []
        with FlopCounterMode(display=False) as counter:
            self._run(x, np.full(len(self.layers), np.inf), counter=counter, boundaries=boundaries, validated=True)
            total = counter.get_total_flops()
        return np.array([*boundaries, total], dtype=np.float64)


def split_at(model, layers) -> tuple[fx.GraphModule, dict]:
    """Trace ``model`` so that every guarded layer is one node; returns the graph and ``layer -> node``.

    Modules that hold no guarded layer stay whole (leaves). A guarded layer that
    holds another guarded layer must be an ``nn.Sequential``: its output is then
    its last child's.

    Raises
    ------
    ModelError
        When a layer is not a module of the model, or tracing fails.
    """
    modules = dict(model.named_modules())
    unknown = [layer for layer in layers if layer not in modules or not layer]
    if unknown:
        raise invalid_param("layers", "Guard", "modules of the model (see `layerscope layers`)", unknown[0])

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return not any(g.startswith(qualname + ".") for g in layers) if qualname else False

    try:
        graph = _Tracer().trace(model)
    except Exception as err:
        raise ModelError(f"Guard cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}). Hint: guard top-level blocks, or "
                         "make the model's forward free of data-dependent control flow.") from err
    gm = fx.GraphModule(model, graph)
    by_target = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            by_target.setdefault(node.target, []).append(node)
    return gm, {layer: _node_of(layer, modules, by_target) for layer in layers}


def _node_of(layer, modules, by_target):
    """The one node whose output is ``layer``'s (its last child's, for a traced-through Sequential)."""
    name = layer
    while name not in by_target and isinstance(modules[name], nn.Sequential) and len(modules[name]):
        name = f"{name}.{len(modules[name]) - 1}"
    nodes = by_target.get(name, [])
    if len(nodes) != 1:
        why = "is not called" if not nodes else f"is called {len(nodes)} times"
        raise ModelError(f"Guard cannot split the model at '{layer}': module '{name}' {why} in the traced forward. "
                         "Hint: guard a module that runs exactly once per input (see `layerscope layers`).")
    return nodes[0]


@dataclass(frozen=True)
class Segment:
    """One compiled piece of the split graph: from the values live after a cut to the next guarded layer.

    Attributes
    ----------
    module : fx.GraphModule
        Takes the values live at the cut before it (the model's input, for the
        first); returns a tuple of the values still needed after its guarded
        node, that node's value included, or the model's output for the last.
    n_inputs : int
    guard : int or None
        Index of the guarded node's value in the outputs; None for the last segment.
    batched : tuple of bool
        Per output: whether it derives from the input (its rows are dropped with the stopped inputs).
    """

    module: fx.GraphModule
    n_inputs: int
    guard: int | None
    batched: tuple

    @property
    def forward(self):
        """The module's generated ``forward``, called without ``nn.Module.__call__``: no hooks are registered on a
        segment, and at batch 1 the five Python frames per call are a measurable share of the pass."""
        return self.module.forward


def segments(gm, cuts) -> list[Segment]:
    """Cut ``gm``'s graph after each node of ``cuts`` (in graph order) and compile every piece.

    Returns ``len(cuts) + 1`` segments; the last one ends at the graph's output.
    """
    nodes = list(gm.graph.nodes)
    batched = _batch_dependent(gm.graph)
    ends = [nodes.index(node) for node in cuts] + [len(nodes) - 1]
    out, start, live_in = [], 0, [n for n in nodes if n.op == "placeholder"]
    for cut, end in zip([*cuts, None], ends):
        body = [n for n in nodes[start:end + 1] if n.op != "placeholder"]
        later = set(nodes[end + 1:])
        live = [n for n in nodes[:end + 1] if n.op != "output" and any(u in later for u in n.users)]
        if cut is not None and cut not in live:
            live.append(cut)
        out.append(Segment(_compile_segment(gm, live_in, body, None if cut is None else live),
                           len(live_in), None if cut is None else live.index(cut), tuple(n in batched for n in live)))
        start, live_in = end + 1, live
    return out


def _compile_segment(gm, inputs, body, outputs):
    """A GraphModule of ``body``'s nodes on ``inputs``; returns ``outputs`` (a tuple), or the graph's own output."""
    graph = fx.Graph()
    env = {node: graph.placeholder(node.name) for node in inputs}
    for node in body:
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], env.__getitem__))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    if outputs is not None:
        graph.output(tuple(env[node] for node in outputs))
    return fx.GraphModule(gm, graph)


def _batch_dependent(graph) -> set:
    """Nodes whose value derives from the input (the only ones with rows to drop)."""
    out = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in out for arg in node.all_input_nodes):
            out.add(node)
    return out


def _take_rows(value, keep, n):
    """``value``'s rows ``keep`` (int64 indices) where its first dimension is the batch's ``n``; others as they are.

    ``index_select`` copies whole rows (contiguous in a batch-first tensor): cheaper than a boolean mask, which
    gathers element by element.
    """
    if isinstance(value, torch.Tensor):
        return value.index_select(0, keep) if value.dim() and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, keep, n) for v in value)
    return value


def _argmax(logits) -> np.ndarray:
    """(n,) int64 argmax of (n, n_classes) logits, NaN read as 0 (as ``np.nan_to_num``; only paid for when present)."""
    return (logits if np.isfinite(logits).all() else np.nan_to_num(logits)).argmax(axis=1)
