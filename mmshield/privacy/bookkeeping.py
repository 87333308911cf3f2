"""Per-record clipped gradient sums from one backward pass: ghost norms and book-keeping.

DP-SGD needs, for a batch, the sum of each record's gradient scaled to norm at most ``C``. The
reference path (:func:`mmshield.privacy.dpsgd.clipped_grad_sum`) materialises every record's whole
gradient with ``vmap(grad)``: its cost grows with the batch times the model. Book-keeping (Bu,
Mao and Xu 2023, "Differentially private optimization on large model at small cost", ICML) gets
the same result for little more than one non-private step:

1. One forward pass records each layer's input ``a``; one backward pass gives each layer's output
   gradient ``g`` for every record, and computes no parameter gradient at all (the forward adds a
   zero *probe* to each layer's output and ``torch.func.vjp`` differentiates with respect to the
   probes only).
2. Per-record gradient norms follow from ``(a, g)`` alone (ghost norms, Goodfellow 2015; Li et al.
   2022): a Linear layer's weight gradient for a record is ``g^T a``, whose squared norm is
   ``||a||^2 ||g||^2`` for one token and ``<a a^T, g g^T>`` for a sequence; an embedding's sums
   the output gradients of a record's repeated ids. Layers whose per-record gradients are small
   (Conv2d kernels, LayerNorm's affine vectors) have them materialised; a module the rules do not
   know has its own parameters' per-record gradients computed by ``vmap(grad)`` of that module
   alone (the generic rule), so any model works.
3. From the norms, each record's clip factor; each layer's clipped sum is then one more matmul
   with the *scaled* output gradients (``sum_i s_i g_i^T a_i``), one scatter per embedding, or a
   weighted sum of the materialised per-record gradients.

Written by hand because Opacus's ghost clipping (``grad_sample_mode="ghost"``) hooks a module's
autograd backward and calls ``loss.backward()`` twice: it cannot run inside ``torch.func.vmap``
over clients, which is how the simulator trains a whole cohort at once, and it cannot wrap our
attention fusion (a module with its own parameters and two inputs). Here everything is a
``torch.func`` transform, so :class:`BookKeeping` nests inside ``vmap`` exactly as the reference
does, and the generic rule covers modules that have no fast rule.

A parameter's gradient must flow through its module's output only. What breaks that is detected
(by the forward pass that learns the model's structure, once per input shape) and handed to a
fallback (the reference path, when :class:`mmshield.privacy.dpsgd.DPSGD` builds the clipper): a
module that runs more than once per forward, tied weights, a parameter read outside the module
that holds it (a parent reading a child's weight; a parent using a child's weights *instead* of
calling it is fine: the parent takes the generic rule). Losses coupling records have no
per-record gradient in either path. Random operations (dropout) inside a module handled by the
generic rule raise, as in the reference path without ``randomness`` set.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.profiler import record_function
from torch.utils._pytree import tree_flatten, tree_unflatten

Rule = Literal["linear", "conv", "layer_norm", "embedding", "generic"]
ClippedSum = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]


# --- Fast rules: (layer input a, output gradient g) -> squared norms, per-record grads, sums ------


def _linear_norms(
    mod: nn.Linear, a: torch.Tensor, g: torch.Tensor, which: set[str]
) -> dict[str, torch.Tensor]:
    """Squared per-record norms of a Linear layer's gradients from its input and output gradient.

    One token per record (``a``: ``(B, in)``): ``||g^T a||^2 = ||a||^2 ||g||^2``. A sequence
    (``(B, ..., in)``): ``<A A^T, G G^T>`` (ghost norm) when the sequence is short next to the
    layer, else the norm of the materialised ``G^T A``.
    """
    b = g.shape[0]
    out: dict[str, torch.Tensor] = {}
    if a.dim() == 2:
        g_sq = torch.linalg.vector_norm(g, dim=1).square()
        if "weight" in which:
            out["weight"] = torch.linalg.vector_norm(a, dim=1).square() * g_sq
        if "bias" in which:
            out["bias"] = g_sq
        return out
    a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
    if "weight" in which:
        t = a3.shape[1]
        if t * t <= a3.shape[2] * g3.shape[2]:
            gram = (a3 @ a3.transpose(1, 2)) * (g3 @ g3.transpose(1, 2))
            out["weight"] = gram.sum((1, 2))
        else:
            out["weight"] = torch.linalg.vector_norm(g3.transpose(1, 2) @ a3, dim=(1, 2)).square()
    if "bias" in which:
        out["bias"] = torch.linalg.vector_norm(g3.sum(1), dim=1).square()
    return out


def _linear_sums(a: torch.Tensor, sg: torch.Tensor, which: set[str]) -> dict[str, torch.Tensor]:
    """Summed Linear gradients over records, given the output gradients times the clip factors."""
    a2, g2 = a.reshape(-1, a.shape[-1]), sg.reshape(-1, sg.shape[-1])
    out: dict[str, torch.Tensor] = {}
    if "weight" in which:
        out["weight"] = g2.t() @ a2
    if "bias" in which:
        out["bias"] = g2.sum(0)
    return out


def _conv_per_record(
    mod: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, which: set[str]
) -> dict[str, torch.Tensor]:
    """Per-record Conv2d gradients (kernels are small), by a vmapped weight-only conv backward.

    ``weight`` only gives the kernel's shape; an unbatched tensor keeps the backward a plain
    convolution under an outer ``vmap`` over clients (a batched one makes it a grouped one).
    """

    def one(x: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            gi.unsqueeze(0), x.unsqueeze(0), weight, None, list(mod.stride), list(mod.padding),
            list(mod.dilation), False, [0, 0], mod.groups, [False, True, False],
        )[1]  # fmt: skip

    per: dict[str, torch.Tensor] = {}
    if "weight" in which:
        per["weight"] = vmap(one)(a, g)
    if "bias" in which:
        per["bias"] = g.sum((2, 3))
    return per


def _layer_norm_per_record(
    mod: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor, which: set[str]
) -> dict[str, torch.Tensor]:
    """Per-record LayerNorm affine gradients (one vector each)."""
    b, shape = a.shape[0], tuple(mod.normalized_shape)
    per: dict[str, torch.Tensor] = {}
    if "weight" in which:
        xhat = F.layer_norm(a, shape, None, None, mod.eps)
        per["weight"] = (xhat * g).reshape(b, -1, *shape).sum(1)
    if "bias" in which:
        per["bias"] = g.reshape(b, -1, *shape).sum(1)
    return per


def _embedding_norms(mod: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Squared per-record norms of an embedding's gradient: a record's repeated ids add up."""
    b = ids.shape[0]
    ids2 = ids.reshape(b, -1)
    length = ids2.shape[1]
    g3 = g.reshape(b, length, -1)
    if mod.padding_idx is not None:
        g3 = g3 * (ids2 != mod.padding_idx).unsqueeze(-1)
    sid, perm = ids2.sort(dim=1)
    first = torch.ones_like(sid[:, :1], dtype=torch.bool)
    start = torch.cat([first, sid[:, 1:] != sid[:, :-1]], 1)
    rank = start.long().cumsum(1) - 1  # slot of each distinct id of a record, in sorted order
    slot = torch.empty_like(rank).scatter(1, perm, rank)  # back in token order
    flat = (slot + torch.arange(b, device=slot.device).unsqueeze(1) * length).reshape(-1)
    summed = torch.zeros_like(g3).reshape(b * length, -1)
    summed.index_add_(0, flat, g3.reshape(b * length, -1))
    return torch.linalg.vector_norm(summed.reshape(b, -1), dim=1).square()


def _embedding_sum(
    mod: nn.Embedding, ids: torch.Tensor, sg: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Summed embedding gradient over records, given output gradients times the clip factors."""
    if mod.padding_idx is not None:
        sg = sg * (ids != mod.padding_idx).unsqueeze(-1)
    out = torch.zeros_like(weight)
    return out.index_add_(0, ids.reshape(-1), sg.reshape(-1, sg.shape[-1]))


def fast_rule(mod: nn.Module) -> Rule:
    """The rule :class:`BookKeeping` applies to a module's own parameters."""
    if type(mod) is nn.Linear:
        return "linear"
    if type(mod) is nn.Conv2d and isinstance(mod.padding, tuple) and mod.padding_mode == "zeros":
        return "conv"
    if type(mod) is nn.LayerNorm:
        return "layer_norm"
    if (
        type(mod) is nn.Embedding
        and mod.max_norm is None
        and not mod.scale_grad_by_freq
        and not mod.sparse
    ):
        return "embedding"
    return "generic"


# --- The plan: which modules carry which parameters ----------------------------------------------


@dataclass
class _Unit:
    """A module whose output gets a probe, and the parameters differentiated through it."""

    name: str
    module: nn.Module
    rule: Rule
    params: dict[str, str]  # name inside the module -> name in ``params``
    outputs: list[tuple[torch.Size, torch.dtype, torch.device] | None]  # per output leaf
    local: set[str] = field(init=False)
    probes: list[int | None] = field(default_factory=list)  # per output leaf: its probe

    def __post_init__(self) -> None:
        self.local = set(self.params)

    @property
    def fast(self) -> bool:
        """A fast rule: one tensor in, one tensor out, a backward that never reads the output."""
        return self.rule != "generic"


@dataclass
class _Plan:
    units: list[_Unit]
    reason: str | None = None  # why the fallback must be used, when it must
    probes: list[tuple[torch.Size, torch.dtype, torch.device]] = field(default_factory=list)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


class _ParameterUses(TorchFunctionMode):
    """Records which modules were running whenever an operation read a watched tensor."""

    def __init__(self, watched: Mapping[int, str], stack: list[str]) -> None:
        super().__init__()
        self.watched, self.stack = watched, stack
        self.uses: dict[str, list[frozenset[str]]] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # A use computes a tensor from it (reading .dtype or .shape is none) inside the model's
        # forward (functional_call's own calls are none).
        if self.stack and any(isinstance(o, torch.Tensor) for o in tree_flatten(out)[0]):
            for a in tree_flatten((args, kwargs))[0]:
                name = self.watched.get(id(a)) if isinstance(a, torch.Tensor) else None
                if name is not None:
                    self.uses.setdefault(name, []).append(frozenset(self.stack))
        return out


class BookKeeping:
    """Sum over a batch of per-record clipped gradients, by ghost norms and book-keeping.

    A drop-in for :func:`mmshield.privacy.dpsgd.clipped_grad_sum`: called as ``fn(params,
    inputs, present, labels, weight)`` it returns ``(clipped_sum, loss_sum, norms)`` (``name ->``
    sum of the clipped gradients, the weighted loss sum, each record's unclipped gradient norm),
    also when wrapped in ``vmap`` over clients. See the module docstring for the method.

    Parameters
    ----------
    model
        The model; called as ``model(inputs, present)``, cross-entropy loss per record.
    max_grad_norm
        Per-record clipping norm ``C``.
    fallback
        Called with the same arguments when the model does something the method cannot handle
        (a parameter used twice in one forward); without one, that raises ``NotImplementedError``.

    Notes
    -----
    Forward hooks are registered on the model's modules during each call only. ``params`` may
    hold a subset of the model's parameters: the others are constants (the module's own values),
    as with ``functional_call``; buffers are the model's, as in the reference. What the model's
    modules do is learned once per input shape by a forward pass without gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        fallback: Callable[..., ClippedSum] | None = None,
    ) -> None:
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.fallback = fallback
        self.buffers = dict(model.named_buffers())
        self._modules = dict(model.named_modules())
        self._names = {n for n, _ in model.named_parameters()}
        # A parameter registered in two places (tied weights) appears once in named_parameters.
        self._tied = len(list(model.named_parameters(remove_duplicate=False))) != len(self._names)
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._mode: Literal["shape", "tap"] | None = None
        self._fired: dict[str, list[Any]] = {}
        # While tapping: the plan's units by name, the probes, what each unit was called with.
        self._units: dict[str, _Unit] = {}
        self._probes: list[torch.Tensor] = []
        self._acts: dict[str, Any] = {}
        self._again: list[str] = []

    # --- hooks ---------------------------------------------------------------------------------

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            if self._mode == "shape":
                leaves, _ = tree_flatten(out)
                self._fired.setdefault(name, []).append(
                    [
                        (x.shape, x.dtype, x.device)
                        if isinstance(x, torch.Tensor) and x.is_floating_point()
                        else None
                        for x in leaves
                    ]
                )
                return None
            if self._mode != "tap":
                return None
            u = self._units[name]
            if name in self._acts:
                self._again.append(name)
            if u.fast:  # in place: saves a copy of the output
                self._acts[name] = args[0] if args else next(iter(kwargs.values()))
                return out.add_(self._probes[u.probes[0]])  # type: ignore[index]
            self._acts[name] = (args, kwargs)
            leaves, spec = tree_flatten(out)
            probes = self._probes
            tapped = [
                x if i is None else x + probes[i] for x, i in zip(leaves, u.probes, strict=True)
            ]
            return tree_unflatten(tapped, spec)

        return hook

    def _register(self, names: Collection[str]) -> list[Any]:
        return [
            self._modules[name].register_forward_hook(self._hook(name), with_kwargs=True)
            for name in names
        ]

    # --- planning ------------------------------------------------------------------------------

    def _plan(
        self,
        params: Mapping[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
    ) -> _Plan:
        key = (
            tuple(sorted(params)),
            *((k, v.shape, v.dtype, v.device) for k, v in sorted(inputs.items())),
            *((k, v.shape) for k, v in sorted(present.items())),
        )
        if key not in self._plans:
            self._plans[key] = self._make_plan(params, inputs, present)
        return self._plans[key]

    def _make_plan(
        self,
        params: Mapping[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
    ) -> _Plan:
        if self._tied:
            return _Plan([], "a parameter is registered in two modules (tied weights)")
        modules = self._modules
        holders = [n for n, m in modules.items() if any(True for _ in m.parameters())]
        stack: list[str] = []  # the modules running, outermost first
        tracker = _ParameterUses({id(v): k for k, v in params.items()}, stack)

        def push(name: str) -> Callable[..., None]:
            return lambda mod, args: stack.append(name)

        def pop(mod: nn.Module, args: Any, out: Any) -> None:
            stack.pop()

        self._fired, self._mode = {}, "shape"
        handles = self._register(holders)
        for n in holders:
            handles.append(modules[n].register_forward_pre_hook(push(n)))
            handles.append(modules[n].register_forward_hook(pop))
        try:
            with torch.no_grad(), tracker:
                functional_call(self.model, (dict(params), self.buffers), (inputs, present))
        finally:
            self._mode = None
            for h in handles:
                h.remove()
        fired, self._fired = self._fired, {}
        # Each trainable parameter goes to its module when that module ran, else to the nearest
        # enclosing module that ran (a parent using its child's weights directly).
        owner: dict[str, dict[str, str]] = {}
        for full in params:
            mod_name, _, _ = full.rpartition(".")
            unit = mod_name
            while unit not in fired:
                if not unit:
                    return _Plan([], f"parameter {full!r} is not used by any module that runs")
                unit = unit.rpartition(".")[0]
            owner.setdefault(unit, {})[full[len(_prefix(unit)) :]] = full
            # Its gradient flows through that module's probe only if every use is inside it.
            if any(unit not in running for running in tracker.uses.get(full, [])):
                return _Plan([], f"parameter {full!r} is used outside module {unit!r}")
        plan = _Plan([])
        for name, local in owner.items():
            if len(fired[name]) > 1:
                return _Plan([], f"module {name!r} runs {len(fired[name])} times in one forward")
            mod = modules[name]
            direct = {n for n, _ in mod.named_parameters(recurse=False)}
            outputs = fired[name][0]
            rule = fast_rule(mod) if set(local) <= direct and len(outputs) == 1 else "generic"
            if all(o is None for o in outputs):
                return _Plan([], f"module {name!r} has no floating-point output")
            new = _Unit(name, mod, rule, local, outputs)
            for o in outputs:
                new.probes.append(None if o is None else len(plan.probes))
                if o is not None:
                    plan.probes.append(o)
            plan.units.append(new)
        return plan

    # --- the clipped sum -----------------------------------------------------------------------

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        weight: torch.Tensor,
    ) -> ClippedSum:
        """Clipped gradient sum, loss sum and per-record norms of one batch.

        Parameters
        ----------
        params
            ``name -> tensor`` parameters to differentiate (all of the model's, or a subset).
        inputs, present
            The batch: ``modality -> (B, *shape)`` inputs and ``(B,)`` presence masks.
        labels
            ``(B,)`` class indices.
        weight
            ``(B,)``: 1 for a real record, 0 for padding (its gradient is not added).
        """
        unknown = set(params) - self._names
        if unknown:
            raise ValueError(f"parameters not in the model: {sorted(unknown)}")
        params, inputs, present = dict(params), dict(inputs), dict(present)
        plan = self._plan(params, inputs, present)
        if plan.reason is not None:
            return self._fall_back(plan.reason, params, inputs, present, labels, weight)
        units = plan.units
        # Zero probes, one per output: a broadcast scalar costs no memory; its gradient is full.
        probes = [torch.zeros((), dtype=d, device=v).expand(s) for s, d, v in plan.probes]
        # Where each unit's inputs sit in vjp's auxiliary output (which holds tensors only).
        where: dict[str, Any] = {}

        def tapped(
            probes: list[torch.Tensor],
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]:
            self._probes, self._acts, self._again, self._mode = probes, {}, [], "tap"
            try:
                logits = functional_call(self.model, (params, self.buffers), (inputs, present))
            finally:
                self._mode = None
            losses = F.cross_entropy(logits, labels, reduction="none")
            flat: list[torch.Tensor] = []
            for u in units:
                if u.name not in self._acts:
                    continue
                call = self._acts[u.name]
                if u.fast:
                    where[u.name] = len(flat)
                    flat.append(call)
                    continue
                leaves, spec = tree_flatten(call)
                slots = []
                for x in leaves:
                    slots.append(len(flat) if isinstance(x, torch.Tensor) else None)
                    if isinstance(x, torch.Tensor):
                        flat.append(x)
                where[u.name] = (spec, leaves, slots)
            return losses.sum(), (losses, flat)

        self._units = {u.name: u for u in units}
        handles = self._register(self._units)
        try:
            with record_function("bookkeeping: forward"):
                _, back, (losses, flat) = vjp(tapped, probes, has_aux=True)  # type: ignore[misc]
        finally:
            for h in handles:
                h.remove()
            self._units, self._probes, self._acts = {}, [], {}
        if self._again or len(where) != len(units):  # control flow that the plan did not see
            reason = "a module ran a different number of times than when planned"
            return self._fall_back(reason, params, inputs, present, labels, weight)
        acts: dict[str, Any] = {}
        for u in units:
            if u.fast:
                acts[u.name] = flat[where[u.name]]
            else:
                spec, leaves, slots = where[u.name]
                values = [x if i is None else flat[i] for x, i in zip(leaves, slots, strict=True)]
                acts[u.name] = tree_unflatten(values, spec)
        with record_function("bookkeeping: backward (output gradients only)"):
            (grads,) = back(torch.ones((), dtype=losses.dtype, device=losses.device))
        outgrads = {u.name: [None if i is None else grads[i] for i in u.probes] for u in units}
        b = labels.shape[0]
        squared = torch.zeros(b, dtype=losses.dtype, device=losses.device)
        kept: dict[str, dict[str, torch.Tensor]] = {}
        with record_function("bookkeeping: per-record norms"):
            for u in units:
                parts = self._norms(u, params, acts[u.name], outgrads[u.name], kept)
                for v in parts.values():
                    squared = squared + v
        norms = squared.sqrt()
        scale = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * weight
        out: dict[str, torch.Tensor] = {}
        with record_function("bookkeeping: clipped sums"):
            for u in units:
                if u.name in kept:
                    for k, v in kept[u.name].items():
                        out[u.params[k]] = torch.tensordot(scale, v, dims=1)
                    continue
                (g,) = outgrads[u.name]
                assert g is not None
                a = acts[u.name]
                sg = g * scale.view(-1, *([1] * (g.dim() - 1)))
                if u.rule == "linear":
                    for k, v in _linear_sums(a, sg, u.local).items():
                        out[u.params[k]] = v
                else:  # embedding
                    w = params[u.params["weight"]]
                    out[u.params["weight"]] = _embedding_sum(u.module, a, sg, w)  # type: ignore[arg-type]
        return {k: out[k] for k in params}, (losses * weight).sum(), norms

    def _fall_back(
        self,
        reason: str,
        params: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
        labels: torch.Tensor,
        weight: torch.Tensor,
    ) -> ClippedSum:
        if self.fallback is None:
            raise NotImplementedError(f"book-keeping clipping: {reason}")
        return self.fallback(params, inputs, present, labels, weight)

    def _norms(
        self,
        u: _Unit,
        params: dict[str, torch.Tensor],
        call: Any,
        g_leaves: list[torch.Tensor | None],
        kept: dict[str, dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Squared per-record norms of a unit's parameters' gradients (keeps materialised ones).

        ``call`` is a fast unit's input tensor, a generic unit's ``(args, kwargs)``.
        """
        mod = u.module
        if u.fast:
            a, (g,) = call, g_leaves
            assert g is not None
            if u.rule == "linear":
                return _linear_norms(mod, a, g, u.local)  # type: ignore[arg-type]
            if u.rule == "embedding":
                return {"weight": _embedding_norms(mod, a, g)}  # type: ignore[arg-type]
            if u.rule == "conv":
                # Only the kernel's shape matters: the module's own (never vmapped) tensor.
                w = mod.weight.detach()  # type: ignore[operator]
                per = _conv_per_record(mod, a, g, w, u.local)  # type: ignore[arg-type]
            else:
                per = _layer_norm_per_record(mod, a, g, u.local)  # type: ignore[arg-type]
        else:
            per = self._generic_per_record(u, params, call, g_leaves)
        kept[u.name] = per
        b = next(iter(per.values())).shape[0]
        return {
            k: torch.linalg.vector_norm(v.reshape(b, -1), dim=1).square() for k, v in per.items()
        }

    def _generic_per_record(
        self,
        u: _Unit,
        params: dict[str, torch.Tensor],
        call: tuple[tuple[Any, ...], dict[str, Any]],
        g_leaves: list[torch.Tensor | None],
    ) -> dict[str, torch.Tensor]:
        """Per-record gradients of a unit's parameters, by ``vmap(grad)`` of that module alone.

        Tensor inputs whose first dimension is the batch's are taken as per-record, other inputs
        as constants; the other parameters inside the module keep the values passed in
        ``params``.
        """
        prefix = _prefix(u.name)
        own = {local: params[full] for local, full in u.params.items()}
        rest = {
            k[len(prefix) :]: v
            for k, v in params.items()
            if k.startswith(prefix) and k[len(prefix) :] not in own
        }
        leaves, spec = tree_flatten(call)
        probed = [g for g in g_leaves if g is not None]
        b = probed[0].shape[0]
        batched = [isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == b for x in leaves]

        def one(p: dict[str, torch.Tensor], xs: list[Any], gs: list[torch.Tensor]) -> torch.Tensor:
            args, kwargs = tree_unflatten(
                [x.unsqueeze(0) if f else x for x, f in zip(xs, batched, strict=True)], spec
            )
            y, _ = tree_flatten(functional_call(u.module, {**p, **rest}, args, kwargs))
            ys = [yi for yi, o in zip(y, u.outputs, strict=True) if o is not None]
            return sum(
                ((yi * gi.unsqueeze(0)).sum() for yi, gi in zip(ys, gs, strict=True)),
                torch.zeros((), dtype=gs[0].dtype, device=gs[0].device),
            )

        in_dims = (None, [0 if f else None for f in batched], 0)
        per: dict[str, torch.Tensor] = vmap(grad(one), in_dims=in_dims)(own, leaves, probed)
        return per
