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
values still needed after the cut (:func:`segments`). A model that cannot be
traced, or whose values do not keep the batch first, fails a self-check at
construction with a :class:`~pipeline.errors.ModelError`, never a silent full
pass.

What happens to the rows that stop: dropping them moves the rows that go on
to the front of every batch-shaped value still needed, in place, and the
next segment runs on the front slice (:func:`_compact`: one row copied per
stopped row among the first ``n_live``, no new full-size tensor; a fresh
copy of every live row, ``index_select``, made the allocator page in several
MB per drop, which cost more than the rows saved). Carrying them on costs
their share of the rest of the network. After a guarded layer the guard drops
them only when that share, in the network's FLOPs
(``torch.utils.flop_counter``, counted at first need), is worth more than the
drop (:data:`DROP_FLOPS` per drop, :data:`COPY_FLOPS` per copied element);
otherwise they ride along, masked: they are neither scored nor decided again,
and their logits are discarded. A row's own values do not depend on the rows
beside it, nor on its place in the batch, so decisions, scores and logits are
the same either way. In practice rows that stop early are dropped, and rows
that stop at a layer near the output (where little is left to pay) are
carried. A value the guard does not own alone (the caller's input, a view
sharing memory with another value, an overlapping layout), or any value while
the model has forward hooks (which may keep a reference to it), is copied
instead (``index_select``), never changed in place.

Pooling is not paid twice: an ``nn.AdaptiveAvgPool2d(1)`` applied to a guarded
layer's output in the next segment (a ResNet's global pooling after its last
stage) is given the guard's pooled rows, reshaped, instead of pooling again:
both are ``mean`` over the spatial dimensions, bitwise (:func:`_avgpool`).

How a layer is scored: each detector is checked once at construction and
compiled into torch arithmetic on the model's device (:mod:`pipeline.lean`:
Mahalanobis, Mahalanobis++, KNN-L2, standardised or not); the others (PyOD,
...) keep their own ``score``. The self-check also compares the compiled scores
with the detectors' own on its probe rows, and falls back to ``score`` for a
layer where they differ.

What the guard adds to the network's own work, on the CPU, runs on the calling
thread (the Mahalanobis scores in numpy, a drop's row moves): an OpenMP region
of its own would be one more place where, on a machine shared with other
processes, the pass waits a scheduler tick for a descheduled thread (see
:data:`pipeline.lean.SERIAL_MACS`). The pooling is the exception: it must be
extraction's ``mean``, bit for bit.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules import module as _torch_module

from pipeline.errors import ModelError, invalid_param
from pipeline.extract import _first_tensor, pool
from pipeline.lean import compile_scorer

log = logging.getLogger(__name__)

#: What copying one element of a batch-shaped value costs, in the network's FLOPs (as ``torch.utils.flop_counter``
#: counts them: convolutions and matrix products), when rows that stopped are dropped. Measured on the CPU, 1 and 2
#: threads, digits ResNet: ``index_select`` of 250 of 256 rows costs 16 to 26 FLOPs of the next stages per element.
#: The lower end: a drop is rather made than skipped, as before carrying existed.
COPY_FLOPS = 16

#: What one drop costs besides its copies, in the network's FLOPs: the index arrays, the check of what may change
#: in place and a few calls per value, on code and rows the convolutions have pushed out of the caches. Measured
#: inside the guard's pass, digits ResNet at batch 256 on a shared 2-core machine: 50 to 125 us per drop, where the
#: network runs about 70 MFLOPs per ms on one thread. So a drop pays from two rows stopping at layer1 (8.4 MFLOPs
#: left each) and from three at layer2 (4.2 MFLOPs left each); fewer are carried.
DROP_FLOPS = 1e7


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
        # The hook dicts of every module (each module keeps its own dicts; registering a hook adds to them): while
        # one is not empty, activations are not changed in place. A list of dicts is checked in one C loop.
        self._hooks = [h for m in self.model.modules() for h in (m._forward_hooks, m._forward_pre_hooks)]
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
        """:meth:`_run` for one input (the latency case): Python scalars and lists, no index arrays, no copies."""
        scores = [math.nan] * len(self.layers)
        values = (x,) * self._segments[0].n_inputs
        for k, seg in enumerate(self._segments):
            values = seg.forward(*values)
            if seg.guard is None:
                logits = _host_float(_first_tensor(values))
                return GuardResult(_argmax_one(logits), np.full(1, -1, dtype=np.int64), np.array([scores]),
                                   list(self.layers), logits)
            pooled = pool(_first_tensor(values[seg.guard]))
            scores[k], stop = self.scorers[k].one(pooled, thresholds[k])
            if stop:
                return GuardResult(np.full(1, -1, dtype=np.int64), np.full(1, k, dtype=np.int64), np.array([scores]),
                                   list(self.layers), np.full((1, self.n_classes), np.nan, dtype=np.float32))
            if seg.feeds_pooled:
                values = (*values, pooled)
        raise AssertionError("unreachable: the last segment has no guard")

    def _run(self, x, thresholds, force=None, counter=None, boundaries=None, validated=False, carry=True,
             exact=None):
        """The guarded pass. ``force`` (layer index -> input rows to stop) serves the self-check, with ``carry``
        False (rows that stop are always dropped: the check must see the drop), and ``exact`` (n, n_layers),
        filled with the detectors' own ``score`` of every scored row; ``counter``/``boundaries`` record
        cumulative FLOPs at each guard; ``validated``: score with the detectors' own ``score`` (no torch arithmetic
        for the FLOP counter to see).

        The running rows are the rows of the segments' values: ``rows`` maps them to the inputs (None: all
        of them, in order) and ``dead`` marks those that stopped but are carried on (None: none). The common
        case, where every row goes on, touches no index arrays.
        """
        x = x.to(self.device, torch.float32)
        n = len(x)
        scores = np.full((n, len(self.layers)), np.nan)
        exit_layer = np.full(n, -1, dtype=np.int64)
        rows = dead = None
        values = (x,) * self._segments[0].n_inputs
        for k, seg in enumerate(self._segments):
            values = seg.forward(*values)
            if seg.guard is None:
                return self._result(_first_tensor(values), rows, dead, exit_layer, scores)
            if boundaries is not None:
                boundaries.append(counter.get_total_flops())
            pooled = pool(_first_tensor(values[seg.guard]))
            if seg.feeds_pooled:
                values = (*values, pooled)
            live = None if dead is None else np.flatnonzero(~dead)  # the running rows still undecided
            scored = _inputs(rows, live)  # their inputs (None: all)
            if live is not None:
                pooled = pooled.index_select(0, torch.from_numpy(live).to(self.device))
            s, stop = self._score(k, pooled, thresholds[k], validated)
            if exact is not None:
                exact[slice(None) if scored is None else scored, k] = self.scorers[k].validated(pooled)
            if force is not None:
                stop = stop | np.isin(np.arange(n) if scored is None else scored, force.get(k, []))
            scores[slice(None) if scored is None else scored, k] = s
            if not stop.any():
                continue
            exit_layer[stop if scored is None else scored[stop]] = k
            dead = stop if dead is None else _mark(dead, live, stop)
            if dead.all():
                return self._result(None, rows, dead, exit_layer, scores)
            if carry and not self._drop_pays(k, dead, values, seg.batched):  # dearer than carrying, even in place
                continue
            owned = self._owned(values, seg.batched, len(dead), x)
            if carry and owned is not None and not self._drop_pays(k, dead, values, seg.batched, owned):
                continue  # some value must be copied, and that costs more
            values, order = _compact(values, seg.batched, dead, owned, self.device)
            rows, dead = (order if rows is None else rows[order]), None
        raise AssertionError("unreachable: the last segment has no guard")  # segments() always ends with one

    def _score(self, k, pooled, threshold, validated) -> tuple[np.ndarray, np.ndarray]:
        """Scores of ``pooled`` at guarded layer ``k`` and which are above ``threshold``."""
        if validated:
            s = self.scorers[k].validated(pooled)
            return s, s > threshold
        return self.scorers[k](pooled, float(threshold))

    def _drop_pays(self, k, dead, values, batched, owned=None) -> bool:
        """Whether dropping the ``dead`` rows after guarded layer ``k`` costs less than carrying them to the output.

        Carrying costs the dead rows' FLOPs after the layer. Dropping costs :data:`DROP_FLOPS`, plus a copy
        (:data:`COPY_FLOPS` per element) of one row per dead row among the first ``n_live`` rows of each value
        the guard owns (``owned``, see :meth:`_owned`; None: all of them), and of every live row of the others.
        """
        n, n_dead = len(dead), int(np.count_nonzero(dead))
        moved = int(np.count_nonzero(dead[:n - n_dead]))
        copied = sum(_row_elements(v, n) * (moved if owned is None or id(v) in owned else n - n_dead)
                     for v in _batch_tensors(values, batched, n))
        return n_dead * self._tail_flops[k] > DROP_FLOPS + COPY_FLOPS * copied

    def _owned(self, values, batched, n, x) -> set | None:
        """``id`` of the tensors of ``values`` with ``n`` rows that :func:`_compact` may change in place; None: all.

        Empty while the model has forward hooks (a hook may hold an activation); otherwise those that
        :func:`_exclusive` finds alone in their memory and apart from the input ``x``.
        """
        if any(self._hooks) or _global_hooks():
            return set()
        tensors = _batch_tensors(values, batched, n)
        owned = _exclusive(tensors, x)
        return None if all(id(t) in owned for t in tensors) else owned

    def _result(self, output, rows, dead, exit_layer, scores) -> GuardResult:
        """The result of a pass: ``output`` holds the logits of the running rows (None: every row stopped).

        ``rows`` and ``dead`` as in :meth:`_run`: the running rows' inputs, and those among them that stopped.
        """
        if rows is None and dead is None:  # nothing stopped: the output's rows are the inputs' (a view on the CPU)
            logits = _host_float(output)
            return GuardResult(_argmax(logits), exit_layer, scores, list(self.layers), logits)
        n = len(exit_layer)
        logits = np.full((n, self.n_classes), np.nan, dtype=np.float32)
        pred = np.full(n, -1, dtype=np.int64)
        if output is not None:
            out = _host_float(output)
            passed = slice(None) if dead is None else ~dead
            to = _inputs(rows, None if dead is None else np.flatnonzero(~dead))
            logits[slice(None) if to is None else to] = out = out[passed]
            pred[slice(None) if to is None else to] = _argmax(out)
        return GuardResult(pred, exit_layer, scores, list(self.layers), logits)

    @torch.inference_mode()
    def _self_check(self):
        """Guarded rows must give the full model's logits; otherwise the split is wrong: refuse it.

        One pass of ``n_layers + 2`` inputs, input k stopped (and dropped) at guarded layer k: the last two go on
        through every drop and must end with the full model's logits. The same pass checks each compiled scorer
        against its detector's own ``score``. Only a failure pays for more passes, to name the layer.
        """
        n_layers = len(self.layers)
        x = torch.rand((n_layers + 2, *self.input_shape), generator=torch.Generator().manual_seed(0))
        x = x.to(self.device)
        exact, full = np.full((len(x), n_layers), np.nan), None
        try:
            full = _first_tensor(self.model(x[n_layers:])).float().cpu().numpy()
            self.n_classes = full.shape[1] if full.ndim == 2 else 1  # known even when every row stops early
            forced = self._run(x, np.full(n_layers, np.inf), force={k: [k] for k in range(n_layers)}, carry=False,
                               exact=exact)
            agrees = _same_logits(forced.logits[n_layers:], full)
        except ModelError:
            raise
        except Exception as err:  # the model's own code failed on the split graph: say so in one line
            self._locate(x[n_layers - 1:], full)
            raise self._refusal(self.layers, err) from err
        if not agrees:
            self._locate(x[n_layers - 1:], full)
            raise self._refusal(self.layers)
        self._check_scorers(forced.scores, exact)

    def _locate(self, x, full):
        """Raise the refusal naming the first guarded layer at which dropping input 0 of ``x`` alone breaks the
        split (the others, ``full``'s inputs, must keep the full model's logits); return if none does."""
        if full is None:  # the full model itself failed: no layer to blame
            return
        never = np.full(len(self.layers), np.inf)
        for k, layer in enumerate(self.layers):
            try:
                forced = self._run(x, never, force={k: [0]}, carry=False)
            except Exception as err:
                raise self._refusal([layer], err) from err
            if not _same_logits(forced.logits[1:], full):
                raise self._refusal([layer])

    def _refusal(self, layers, err=None) -> ModelError:
        """The one-line refusal of a split at ``layers``: the model's own error ``err``, or wrong logits."""
        where = f"'{layers[0]}'" if len(layers) == 1 else str(layers)
        if err is not None:
            return ModelError(f"Guard cannot run this model split at {where}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}. Hint: guard other layers.")
        return ModelError(f"Guard cannot split this model at {where}: the rows that go on do not give the full "
                          "model's logits (a value computed before that layer is used after it, or keeps the batch "
                          "off the first dimension). Hint: guard other layers, e.g. the blocks `layerscope layers` "
                          "lists at the top level.")

    def _check_scorers(self, lean, exact):
        """A compiled scorer whose scores differ from its detector's own (rtol 1e-6) is replaced by ``score``."""
        for k, scorer in enumerate(self.scorers):  # NaN where a row stopped before layer k: in both
            if scorer.compiled and not np.allclose(lean[:, k], exact[:, k], rtol=1e-6, atol=0.0, equal_nan=True):
                log.warning("guard: the compiled scorer of %s at '%s' differs from its score(); using score()",
                            type(scorer.detector).__name__, self.layers[k])
                self.scorers[k] = scorer.uncompiled()

    def block_flops(self) -> np.ndarray:
        """FLOPs per input up to each guarded layer and to the output, from ``torch.utils.flop_counter``.

        Returns
        -------
        cumulative : ndarray of shape (n_layers + 1,)
            FLOPs of one input up to and including guarded layer k; the last
            entry is the whole network's. Counted once, at first use.
        """
        return self._flops.copy()

    # Counted at first use, not at construction: the counter imports torch._dynamo (1-2 s), which loading a
    # guard, and serving it one input at a time, never needs. A batch pays it when rows first stop in it.
    @functools.cached_property
    def _flops(self) -> np.ndarray:
        return self._count_flops()

    @functools.cached_property
    def _tail_flops(self) -> list[float]:
        """FLOPs per input after each guarded layer: what a carried row still costs."""
        return (self._flops[-1] - self._flops[:-1]).tolist()

    @torch.inference_mode()
    def _count_flops(self) -> np.ndarray:
        """:meth:`block_flops`, counted on one input."""
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
        first), then the guarded rows pooled there when ``takes_pooled``;
        returns a tuple of the values still needed after its guarded node,
        that node's value included, or the model's output for the last.
    n_inputs : int
    guard : int or None
        Index of the guarded node's value in the outputs; None for the last segment.
    batched : tuple of bool
        Per value passed on (the outputs, then the pooled rows when ``feeds_pooled``): whether it derives from the
        input (its rows are dropped with the stopped inputs).
    takes_pooled : bool
        Whether its last input is the previous guard's pooled rows (:func:`_avgpool` reuses them).
    feeds_pooled : bool
        Whether the next segment takes this guard's pooled rows.
    """

    module: fx.GraphModule
    n_inputs: int
    guard: int | None
    batched: tuple
    takes_pooled: bool = False
    feeds_pooled: bool = False

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
    bodies = [[n for n in nodes[start:end + 1] if n.op != "placeholder"]
              for start, end in zip([0, *(e + 1 for e in ends[:-1])], ends)]
    reuse = [False] + [any(_pools_to_one(gm, n, cut) for n in body) for cut, body in zip(cuts, bodies[1:])]
    out, live_in = [], [n for n in nodes if n.op == "placeholder"]
    for i, (cut, end, body) in enumerate(zip([*cuts, None], ends, bodies)):
        later = set(nodes[end + 1:])
        live = [n for n in nodes[:end + 1] if n.op != "output" and any(u in later for u in n.users)]
        if cut is not None and cut not in live:
            live.append(cut)
        feeds = cut is not None and reuse[i + 1]
        module = _compile_segment(gm, live_in, body, None if cut is None else live, cuts[i - 1] if reuse[i] else None)
        out.append(Segment(module, len(live_in) + reuse[i], None if cut is None else live.index(cut),
                           tuple(n in batched for n in live) + (True,) * feeds, reuse[i], feeds))
        live_in = live
    return out


def _compile_segment(gm, inputs, body, outputs, pooled_of=None):
    """A GraphModule of ``body``'s nodes on ``inputs``; returns ``outputs`` (a tuple), or the graph's own output.

    With ``pooled_of`` (the guarded node before it), it takes that node's pooled rows as one more input and
    gives them to every ``AdaptiveAvgPool2d(1)`` of that node (:func:`_avgpool`).
    """
    graph = fx.Graph()
    env = {node: graph.placeholder(node.name) for node in inputs}
    pooled = graph.placeholder("guard_pooled") if pooled_of is not None else None
    for node in body:
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], env.__getitem__))
        elif pooled is not None and _pools_to_one(gm, node, pooled_of):
            env[node] = graph.call_function(_avgpool, (graph.get_attr(node.target), env[pooled_of], pooled))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    if outputs is not None:
        graph.output(tuple(env[node] for node in outputs))
    return fx.GraphModule(gm, graph)


def _pools_to_one(gm, node, of) -> bool:
    """Whether ``node`` is an ``nn.AdaptiveAvgPool2d`` to 1 x 1 of ``of``'s value alone."""
    if node.op != "call_module" or node.args != (of,) or node.kwargs:
        return False
    module = gm.get_submodule(node.target)
    return type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1), [1, 1])


def _avgpool(module, activation, pooled):
    """``module(activation)`` for an ``AdaptiveAvgPool2d(1)``: the guard's ``pooled`` rows, reshaped, when equal.

    On a dense 4-D tensor (CPU or CUDA), adaptive average pooling to 1 x 1 is
    ``activation.mean((-1, -2), keepdim=True)`` (ATen's own shortcut), the
    guard's :func:`~pipeline.extract.pool` bitwise; hooks on the module, or
    any other input, get the module's own call.
    """
    if (isinstance(activation, torch.Tensor) and activation.dim() == 4 and activation.layout == torch.strided
            and activation.device.type in ("cpu", "cuda") and not activation.is_quantized
            and not (module._forward_hooks or module._forward_pre_hooks)):
        return pooled.view(*pooled.shape, 1, 1)
    return module(activation)


def _batch_dependent(graph) -> set:
    """Nodes whose value derives from the input (the only ones with rows to drop)."""
    out = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in out for arg in node.all_input_nodes):
            out.add(node)
    return out


def _inputs(rows, live):
    """Input indices of the running rows ``live`` (positions; None: all), ``rows`` mapping them (None: identity)."""
    if live is None:
        return rows
    return live if rows is None else rows[live]


def _mark(dead, live, stop):
    """``dead`` with the ``live`` running rows that ``stop`` (a mask over ``live``) marked too."""
    dead = dead.copy()
    dead[live[stop]] = True
    return dead


def _compact(values, batched, dead, owned, device) -> tuple[tuple, np.ndarray]:
    """The batch-shaped ``values`` without their ``dead`` rows, and the running rows they keep, in their new order.

    Rows that go on are moved to the front: each dead row among the first
    ``n_live`` takes the place of a live row from behind them, and every value
    becomes its first ``n_live`` rows (a view). A tensor of ``owned`` (ids; None:
    every tensor) is changed in place (:func:`_move_rows`); any other is copied,
    its rows in the same order.

    Returns
    -------
    values : tuple
    order : ndarray of shape (n_live,), int64
        Running row (before the drop) of each row after it.
    """
    n = len(dead)
    m = n - int(np.count_nonzero(dead))
    holes = np.flatnonzero(dead[:m])
    order = np.arange(m)
    order[holes] = m + np.flatnonzero(~dead[m:])  # as many live rows behind as dead rows in front
    moves = _Moves(holes, order[holes], order, device)
    done = {}
    return tuple(_compact_value(v, moves, n, m, owned, done) if b else v for v, b in zip(values, batched)), order


@dataclass
class _Moves:
    """The row indices of one :func:`_compact`, as numpy arrays, and as tensors on ``device`` once one needs them."""

    holes: np.ndarray
    fillers: np.ndarray
    order: np.ndarray
    device: torch.device

    @functools.cached_property
    def tensors(self) -> dict:
        return {k: torch.from_numpy(getattr(self, k)).to(self.device) for k in ("holes", "fillers", "order")}


def _compact_value(value, moves, n, m, owned, done):
    """:func:`_compact` of one value: in place for an ``owned`` tensor (once per tensor: ``done``), else a copy."""
    if isinstance(value, torch.Tensor):
        if not (value.dim() and value.shape[0] == n):
            return value
        if owned is not None and id(value) not in owned:
            return value.index_select(0, moves.tensors["order"])
        if id(value) not in done:
            if len(moves.holes):
                _move_rows(value, moves)
            done[id(value)] = value[:m]
        return done[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_compact_value(v, moves, n, m, owned, done) for v in value)
    return value


def _move_rows(value, moves):
    """Rows ``moves.fillers`` of ``value`` copied onto its rows ``moves.holes``, in place.

    On the CPU, in numpy (a view of the same memory): on the calling thread. ``index_copy_`` of a few rows of a
    large activation is an OpenMP region, which on a busy machine can wait a scheduler tick for its second thread.
    """
    rows = _numpy_view(value)
    if rows is not None:
        rows[moves.holes] = rows[moves.fillers]
    else:
        value.index_copy_(0, moves.tensors["holes"], value.index_select(0, moves.tensors["fillers"]))


def _numpy_view(value):
    """``value.numpy()`` for a CPU tensor of a dtype numpy has; None otherwise (another device, bfloat16, ...)."""
    if value.device.type != "cpu" or value.dtype in (torch.bfloat16, torch.complex32) or value.is_quantized:
        return None
    return value.numpy()


def _batch_tensors(values, batched, n) -> list:
    """The tensors with ``n`` rows among the batch-shaped (``batched``) ``values``, nested ones included."""
    out = []

    def visit(value):
        if isinstance(value, torch.Tensor):
            if value.dim() and value.shape[0] == n:
                out.append(value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)

    for v, b in zip(values, batched):
        if b:
            visit(v)
    return out


def _exclusive(tensors, x) -> set:
    """``id`` of the ``tensors`` whose memory no other tensor of them, nor ``x``, shares, laid out without overlap.

    Rows of such a tensor can be moved in place without changing any other value. The same tensor object
    listed twice counts once (:func:`_compact` moves its rows once).
    """
    unique = list({id(t): t for t in tensors}.values())
    storage = [t.untyped_storage().data_ptr() for t in unique]
    shared = {p for p in storage if storage.count(p) > 1} | {x.untyped_storage().data_ptr()}
    return {id(t) for t, p in zip(unique, storage) if p not in shared and _dense(t)}


def _dense(t) -> bool:
    """Whether no two elements of ``t`` share memory (contiguous, channels last or not)."""
    if t.dim() == 4:
        return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
    return t.is_contiguous()


def _global_hooks() -> bool:
    """Whether forward hooks registered for every module are in place (``nn.modules.module.register_module_*``)."""
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


def _row_elements(value, n) -> int:
    """Elements per row of ``value``'s tensors with ``n`` rows (what a drop may copy)."""
    if isinstance(value, torch.Tensor):
        return value.numel() // n if value.dim() and value.shape[0] == n else 0
    if isinstance(value, (tuple, list)):
        return sum(_row_elements(v, n) for v in value)
    return 0


def _same_logits(got, full) -> bool:
    """Whether the guard's logits ``got`` are the full model's ``full`` (both (n, n_classes)), to float rounding."""
    return got.shape == full.shape and np.allclose(got, full, rtol=1e-4, atol=1e-5)


def _argmax_one(logits) -> np.ndarray:
    """:func:`_argmax` of one row (1, n_classes): the first maximum, found in Python floats when all are finite."""
    row = logits[0].tolist()
    if not math.isfinite(sum(row)):
        return _argmax(logits)
    return np.array([row.index(max(row))], dtype=np.int64)


def _host_float(output) -> np.ndarray:
    """``output.float().cpu().numpy()``, without the two calls when they change nothing (a CPU float32 tensor)."""
    if output.dtype != torch.float32 or output.device.type != "cpu":
        output = output.float().cpu()
    return output.numpy()


def _argmax(logits) -> np.ndarray:
    """(n,) int64 argmax of (n, n_classes) logits, NaN read as 0 (as ``np.nan_to_num``; only paid for when present)."""
    return (logits if np.isfinite(logits).all() else np.nan_to_num(logits)).argmax(axis=1)
