"""One DP-SGD step: mmshield against the non-private step and Opacus, same model, batch and run.

Run ``python -m benchmarks.dpsgd`` (``--quick``: a smoke test, 2 timed rounds at 1 thread only,
one clipping norm checked, no profile). Every method takes one full optimiser step on the same
batch of 256 ``av-digits`` training records, starting from the same weights, with
``torch.set_num_threads(2)`` (then 1):

- **non-private**: the model as a normal ``nn.Module``, forward, backward, ``torch.optim.SGD``;
- **mmshield**: :func:`mmshield.privacy.dpsgd.clipped_grad_sum` (``vmap`` over records of
  ``grad`` of one record's loss, per-record clipping of the whole gradient, sum), Gaussian noise
  from :meth:`mmshield.privacy.dpsgd.DPSGD.noise` (ChaCha20, Box-Muller), division by the batch
  size, SGD update: the step :func:`mmshield.fl.client.train_stacked` takes;
- **Opacus hooks** and **Opacus ghost clipping**: ``PrivacyEngine.make_private`` (Opacus 1.6,
  ``grad_sample_mode="hooks"`` / ``"ghost"``), one ``DPOptimizer`` step;
- **prototypes** (not in ``mmshield/``; measured here so they can be adopted): the same
  algorithm with per-record norms by ``torch.linalg.vector_norm`` instead of ``pow(2).sum``;
  :class:`BookKeeping`, per-record norms from each layer's input and output gradient (ghost
  norms) and the clipped sum from one backward pass (book-keeping, Bu et al. 2023), with the
  shipped noise and with :func:`torch_noise` (the same ChaCha20 Gaussians, bit for bit, computed
  in torch).

Same noise multiplier (1.0), clipping norm (1.0) and learning rate everywhere. Workloads (the
model factories are mmshield's :func:`~mmshield.models.build_model`):

- ``cnn``: the image view alone (28×28 MNIST digits), 2 conv + 2 linear layers (mmshield's
  ``ConvEncoder`` with LayerNorm, then a linear head): the ANCHORS reference workload's shape;
- ``av-digits``: the demo's 3-modality model (image and audio CNNs, text embedding bag) with
  concatenation fusion (Opacus 1.6 cannot wrap the attention fusion: a module with its own
  parameters and two inputs);
- ``av-digits-attention``: the demo's model as configured (attention fusion); Opacus rows n/a.

Methods are timed round-robin (one step each per round, order rotated) after warm-up; figures are
medians. Before timing, mmshield's clipped sum is checked against Opacus's (hooks and ghost
clipping, noise 0, ``loss_reduction="sum"``) at two clipping norms. Writes
``benchmarks/results/dpsgd.json`` and, for full runs, the ``dpsgd`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vjp, vmap
from torch.profiler import record_function

from mmshield.data.av_digits import load_av_digits
from mmshield.models import build_model
from mmshield.models.model import MultimodalModel
from mmshield.privacy.dpsgd import DPSGD, clipped_grad_sum, per_sample_loss_fn
from mmshield.privacy.noise import NoiseSource

from benchmarks._common import (
    CpuMonitor,
    machine_info,
    machine_line,
    target,
    update_results_md,
    wait_for_quiet,
    write_json,
)

NAME = "dpsgd"
BATCH = 256
LR = 0.05
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
TARGET_RATIO = 1.3
DISTURBED = 0.25  # cores kept busy by other processes above which a block is re-measured
TOLERANCE = 1e-4  # |mmshield - Opacus| <= TOLERANCE * (1 + |Opacus|), elementwise
DATA_SEED = 0

METHODS = {
    "plain": "non-private (nn.Module + SGD)",
    "mmshield": "mmshield DP-SGD (vmap(grad), shipped)",
    "opacus_hooks": "Opacus 1.6 hooks",
    "opacus_ghost": "Opacus 1.6 ghost clipping",
    "proto_vector_norm": "prototype: shipped + vector_norm",
    "proto_bookkeeping": "prototype: ghost norms + book-keeping",
    "proto_bookkeeping_torch_noise": "prototype: book-keeping + torch noise",
}
NOISE_ROW = "mmshield_noise_only"
TORCH_NOISE_ROW = "proto_torch_noise_only"
EXTRA_ROWS = {
    NOISE_ROW: "mmshield's DPSGD.noise alone",
    TORCH_NOISE_ROW: "prototype torch noise alone",
}


# --- Prototype: ghost norms + book-keeping ------------------------------------------------------


def _linear_norms(mod: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Squared per-record gradient norms of a Linear layer from its input and output gradient."""
    b = g.shape[0]
    if a.dim() == 2:  # ||a g^T||_F = ||a|| ||g||
        g_sq = torch.linalg.vector_norm(g, dim=1).square()
        out = {"weight": torch.linalg.vector_norm(a, dim=1).square() * g_sq}
        if mod.bias is not None:
            out["bias"] = g_sq
        return out
    a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
    t = a3.shape[1]
    if t * t <= a3.shape[2] * g3.shape[2]:  # ghost norm: <A A^T, G G^T>
        w = (a3 @ a3.transpose(1, 2) * (g3 @ g3.transpose(1, 2))).sum((1, 2))
    else:
        w = torch.linalg.vector_norm(g3.transpose(1, 2) @ a3, dim=(1, 2)).square()
    out = {"weight": w}
    if mod.bias is not None:
        out["bias"] = torch.linalg.vector_norm(g3.sum(1), dim=1).square()
    return out


def _linear_sum(mod: nn.Linear, a: torch.Tensor, sg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum over records of a Linear layer's gradients, given scaled output gradients."""
    a2, g2 = a.reshape(-1, a.shape[-1]), sg.reshape(-1, sg.shape[-1])
    out = {"weight": g2.t() @ a2}
    if mod.bias is not None:
        out["bias"] = g2.sum(0)
    return out


def _conv_per_record(
    mod: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, weight: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-record Conv2d gradients (small: kernels), by a vmapped weight-only conv backward."""

    def one(x: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            gi.unsqueeze(0), x.unsqueeze(0), weight, None, list(mod.stride), list(mod.padding),
            list(mod.dilation), False, [0, 0], mod.groups, [False, True, False],
        )[1]  # fmt: skip

    per = {"weight": vmap(one)(a, g)}
    if mod.bias is not None:
        per["bias"] = g.sum((2, 3))
    return per


def _layer_norm_per_record(
    mod: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-record LayerNorm affine gradients (small: one vector each)."""
    b, shape = a.shape[0], tuple(mod.normalized_shape)
    xhat = F.layer_norm(a, shape, None, None, mod.eps)
    per = {"weight": (xhat * g).reshape(b, -1, *shape).sum(1)}
    if mod.bias is not None:
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
    summed = torch.zeros_like(g3).reshape(b * length, -1)  # in place below: no clone
    summed.index_add_(0, flat, g3.reshape(b * length, -1))
    return torch.linalg.vector_norm(summed.reshape(b, -1), dim=1).square()


def _embedding_sum(
    mod: nn.Embedding, ids: torch.Tensor, sg: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    if mod.padding_idx is not None:
        sg = sg * (ids != mod.padding_idx).unsqueeze(-1)
    out = torch.zeros_like(weight)
    return out.index_add_(0, ids.reshape(-1), sg.reshape(-1, sg.shape[-1]))


def _fast_rule(mod: nn.Module) -> str | None:
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
    return None


class BookKeeping:
    """Prototype drop-in for :func:`mmshield.privacy.dpsgd.clipped_grad_sum`.

    Same call, ``fn(params, inputs, present, labels, weight) -> (clipped_sum, loss_sum, norms)``,
    same result (also under an outer ``vmap`` over clients), computed differently:

    1. Forward hooks on every module that owns parameters record the module's input and add a
       zero *probe* to its output; ``torch.func.vjp`` with respect to the probes gives each such
       module's output gradient for every record in one backward pass that computes no parameter
       gradients at all.
    2. Per-record squared gradient norms per layer from (input, output gradient): Linear
       ``||a||² ||g||²`` (ghost norm; Gram form for sequence inputs), Embedding by summing the
       output gradients of a record's repeated ids, Conv2d and LayerNorm by materialising their
       (small) per-record gradients, any other module with its own parameters by ``vmap`` over
       records of ``grad`` of that module alone.
    3. Clip factors, then each layer's clipped sum from the scaled output gradients (one matmul
       per Linear, one scatter per Embedding, a weighted sum of the kept per-record gradients
       otherwise).

    Hooks are registered on ``model`` for the object's lifetime (inactive outside calls). Every
    parameter must be passed in ``params``; a module called twice in one forward (tied weights)
    and losses coupling records are not supported.
    """

    def __init__(self, model: MultimodalModel, max_grad_norm: float) -> None:
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.buffers = dict(model.named_buffers())
        self.modules: dict[str, nn.Module] = {}
        for name, mod in model.named_modules():
            if any(True for _ in mod.parameters(recurse=False)):
                self.modules[name] = mod
                mod.register_forward_hook(self._hook(name))
        self._names = {n for n, _ in model.named_parameters()}
        self._mode: str | None = None
        self._shapes: dict[tuple[Any, ...], dict[str, tuple[torch.Size, torch.dtype]]] = {}
        self._seen: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._probes: dict[str, torch.Tensor] = {}
        self._acts: dict[str, tuple[Any, ...]] = {}

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
            if self._mode == "shape":
                if name in self._seen:
                    raise NotImplementedError(f"module {name!r} runs twice in one forward")
                self._seen[name] = (out.shape, out.dtype)
            elif self._mode == "tap":
                self._acts[name] = args
                return out + self._probes[name]
            return None

        return hook

    def _probe_shapes(
        self, params: Mapping[str, torch.Tensor], inputs: dict[str, Any], present: dict[str, Any]
    ) -> dict[str, tuple[torch.Size, torch.dtype]]:
        key = tuple((k, tuple(v.shape)) for k, v in inputs.items())
        if key not in self._shapes:
            self._seen, self._mode = {}, "shape"
            try:
                with torch.no_grad():
                    functional_call(self.model, (dict(params), self.buffers), (inputs, present))
            finally:
                self._mode = None
            self._shapes[key] = self._seen
        return self._shapes[key]

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        weight: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        if set(params) != self._names:
            raise ValueError("BookKeeping needs every parameter of the model in params")
        model, params = self.model, dict(params)
        inputs, present = dict(inputs), dict(present)
        shapes = self._probe_shapes(params, inputs, present)
        probes = {n: torch.zeros(s, dtype=d, device=labels.device) for n, (s, d) in shapes.items()}

        def tapped(
            probes: dict[str, torch.Tensor],
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, dict[str, tuple[Any, ...]]]]:
            self._probes, self._acts, self._mode = probes, {}, "tap"
            try:
                logits = functional_call(model, (params, self.buffers), (inputs, present))
            finally:
                self._mode = None
            losses = F.cross_entropy(logits, labels, reduction="none")
            return losses.sum(), (losses, self._acts)

        with record_function("bookkeeping: forward"):
            _, back, (losses, acts) = vjp(tapped, probes, has_aux=True)  # type: ignore[misc]
        with record_function("bookkeeping: backward (output gradients only)"):
            (outgrads,) = back(torch.ones((), dtype=losses.dtype, device=losses.device))
        self._probes, self._acts = {}, {}
        b = labels.shape[0]
        squared = torch.zeros(b, dtype=losses.dtype, device=losses.device)
        kept: dict[str, dict[str, torch.Tensor]] = {}
        with record_function("bookkeeping: per-record norms"):
            for name, mod in self.modules.items():
                a, g, rule = acts[name], outgrads[name], _fast_rule(mod)
                prefix = f"{name}." if name else ""
                if rule == "linear":
                    parts = _linear_norms(mod, a[0], g)  # type: ignore[arg-type]
                elif rule == "embedding":
                    parts = {"weight": _embedding_norms(mod, a[0], g)}  # type: ignore[arg-type]
                else:
                    if rule == "conv":
                        per = _conv_per_record(mod, a[0], g, params[prefix + "weight"])  # type: ignore[arg-type]
                    elif rule == "layer_norm":
                        per = _layer_norm_per_record(mod, a[0], g)  # type: ignore[arg-type]
                    else:
                        per = self._generic_per_record(name, mod, params, a, g)
                    kept[name] = per
                    parts = {
                        k: torch.linalg.vector_norm(v.reshape(b, -1), dim=1).square()
                        for k, v in per.items()
                    }
                for v in parts.values():
                    squared = squared + v
        norms = squared.sqrt()
        scale = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * weight
        out: dict[str, torch.Tensor] = {}
        with record_function("bookkeeping: clipped sums"):
            for name, mod in self.modules.items():
                a, g = acts[name], outgrads[name]
                prefix = f"{name}." if name else ""
                if name in kept:
                    for k, v in kept[name].items():
                        out[prefix + k] = torch.tensordot(scale, v, dims=1).reshape(
                            params[prefix + k].shape
                        )
                    continue
                sg = g * scale.view(-1, *([1] * (g.dim() - 1)))
                if _fast_rule(mod) == "linear":
                    for k, v in _linear_sum(mod, a[0], sg).items():  # type: ignore[arg-type]
                        out[prefix + k] = v
                else:
                    out[prefix + "weight"] = _embedding_sum(
                        mod,  # type: ignore[arg-type]
                        a[0],
                        sg,
                        params[prefix + "weight"],
                    )
        return {k: out[k] for k in params}, (losses * weight).sum(), norms

    def _generic_per_record(
        self,
        name: str,
        mod: nn.Module,
        params: dict[str, torch.Tensor],
        args: tuple[Any, ...],
        g: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-record gradients of a module's own parameters, by ``vmap(grad)`` of it alone."""
        prefix = f"{name}." if name else ""
        local = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        direct = {n for n, _ in mod.named_parameters(recurse=False)}
        own = {k: v for k, v in local.items() if k in direct}
        rest = {k: v for k, v in local.items() if k not in direct}

        def one(p: dict[str, torch.Tensor], xs: tuple[Any, ...], gi: torch.Tensor) -> Any:
            y = functional_call(mod, {**p, **rest}, tuple(x.unsqueeze(0) for x in xs))
            return (y * gi.unsqueeze(0)).sum()

        return vmap(grad(one), in_dims=(None, 0, 0))(own, tuple(args), g)


def vector_norm_clipped_grad_sum(
    model: MultimodalModel, max_grad_norm: float
) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Prototype: the shipped :func:`clipped_grad_sum` with norms by ``linalg.vector_norm``."""
    per_sample = vmap(
        grad_and_value(per_sample_loss_fn(model)), in_dims=(None, 0, 0, 0), randomness="different"
    )

    def fn(
        params: dict[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        weight: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        grads, losses = per_sample(params, dict(inputs), dict(present), labels)
        squared = sum(
            torch.linalg.vector_norm(g.flatten(1), dim=1).square() for g in grads.values()
        )
        norms = torch.as_tensor(squared).sqrt()
        scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * weight
        clipped = {k: torch.tensordot(scale, g, dims=1) for k, g in grads.items()}
        return clipped, (losses * weight).sum(), norms

    return fn


_ZEROS = bytearray()
_KEYSTREAM = bytearray()


def _keystream(source: NoiseSource, count: int) -> torch.Tensor:
    """The next ``count`` 64-bit words of ``source``'s stream (as ``NoiseSource._uint64``).

    Encrypts into reused buffers (``update_into``): fresh 100 MB buffers per draw cost more in
    page faults than ChaCha20 itself. The tensor is a view of a buffer the next call reuses.
    """
    global _ZEROS, _KEYSTREAM
    size = 8 * count
    if len(_ZEROS) < size:
        _ZEROS = bytearray(size)
        _KEYSTREAM = bytearray(size + 64)
    source._stream.update_into(memoryview(_ZEROS)[:size], _KEYSTREAM)
    return torch.frombuffer(_KEYSTREAM, dtype=torch.int64, count=count)


def torch_noise(
    source: NoiseSource, like: Mapping[str, torch.Tensor], std: float, chunk: int = 1 << 18
) -> dict[str, torch.Tensor]:
    """Prototype of :meth:`NoiseSource.normal` for many tensors at once, in torch.

    The same ChaCha20 stream, 53-bit uniforms and float64 Box-Muller as the shipped sampler, so
    the same numbers bit for bit as one shipped draw of all the tensors' elements (checked), but
    computed with torch's vectorised (and multithreaded) in-place ``log``/``cos``/``sin`` in
    cache-sized chunks instead of NumPy's whole-array temporaries.
    """
    sizes = [v.numel() for v in like.values()]
    n = sum(sizes)
    half = (n + 1) // 2
    bits = _keystream(source, 2 * half)
    z = torch.empty(2 * half, dtype=torch.float32)
    mask = (1 << 53) - 1
    for lo in range(0, half, chunk):
        hi = min(half, lo + chunk)
        u1 = ((bits[lo:hi] >> 11) & mask).to(torch.float64).add_(0.5).mul_(2.0**-53)
        u2 = ((bits[half + lo : half + hi] >> 11) & mask).to(torch.float64).add_(0.5)
        radius = u1.log_().mul_(-2.0).sqrt_()
        angle = u2.mul_(2.0**-53 * 2.0 * math.pi)
        z[lo:hi] = radius * angle.cos()
        z[half + lo : half + hi] = radius.mul_(angle.sin_())
    out = {}
    for (k, v), part in zip(like.items(), z[:n].split(sizes), strict=True):
        out[k] = part.reshape(v.shape).to(device=v.device, dtype=v.dtype) * std
    return out


# --- Workloads ----------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model and one batch of av-digits training records."""

    key: str
    description: str
    model: MultimodalModel
    inputs: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    labels: torch.Tensor
    opacus: bool

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def workloads(keys: list[str]) -> list[Workload]:
    """The benchmark's workloads (same records, drawn once with :data:`DATA_SEED`)."""
    train, _ = load_av_digits()
    gen = torch.Generator().manual_seed(DATA_SEED)
    rows = torch.randperm(len(train), generator=gen)[:BATCH]
    out = []
    for key in keys:
        if key == "cnn":
            specs = [s for s in train.specs if s.name == "image"]
            model = build_model(specs, 10, embed_dim=64, fusion="concat", fusion_hidden=0)
            desc = (
                "image 1×28×28: conv 5×5/2 (16) → conv 3×3/2 (32) → linear 1568→64 → "
                "LayerNorm → linear 64→10"
            )
        elif key == "av-digits":
            specs = train.specs
            model = build_model(specs, 10, embed_dim=64, fusion="concat", fusion_hidden=64)
            desc = "demo model, concat fusion: image + audio CNNs, text embedding bag (4096×64)"
        else:
            specs = train.specs
            model = build_model(specs, 10, embed_dim=64, fusion="attention", fusion_hidden=64)
            desc = "demo model as configured (attention fusion); Opacus cannot wrap it"
        mods = [s.name for s in specs]
        out.append(
            Workload(
                key=key,
                description=desc,
                model=model,
                inputs={m: train.inputs[m][rows].clone() for m in mods},
                present={m: train.present[m][rows].clone() for m in mods},
                labels=train.labels[rows].clone(),
                opacus=key != "av-digits-attention",
            )
        )
    return out


# --- Steps --------------------------------------------------------------------------------------


def _loader(w: Workload) -> torch.utils.data.DataLoader:
    """A one-batch loader: Opacus takes the expected batch size (256) from it."""
    ds = torch.utils.data.TensorDataset(w.labels)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH)


def make_steps(w: Workload) -> dict[str, Callable[[], None]]:
    """One full optimiser step per method, each on its own copy of the same initial weights."""
    from opacus import PrivacyEngine

    inputs, present, labels = w.inputs, w.present, w.labels
    steps: dict[str, Callable[[], None]] = {}

    plain = copy.deepcopy(w.model)
    opt = torch.optim.SGD(plain.parameters(), lr=LR)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(inputs, present), labels).backward()
        opt.step()

    steps["plain"] = plain_step

    def functional_step(
        fn: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]],
        model: MultimodalModel,
        fast_noise: bool = False,
    ) -> Callable[[], None]:
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        source = NoiseSource(False, 0, "dpsgd-noise")
        mech = DPSGD(MAX_GRAD_NORM, NOISE_MULTIPLIER, source)
        weight = torch.ones(len(labels))

        def step() -> None:
            sums, _, _ = fn(params, inputs, present, labels, weight)
            if fast_noise:
                noise = torch_noise(source, sums, NOISE_MULTIPLIER * MAX_GRAD_NORM)
            else:
                noise = mech.noise(sums)
            with torch.no_grad():
                for k, p in params.items():
                    p.add_((sums[k] + noise[k]) / BATCH, alpha=-LR)

        return step

    m = copy.deepcopy(w.model)
    steps["mmshield"] = functional_step(clipped_grad_sum(m, MAX_GRAD_NORM), m)

    if w.opacus:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hm = copy.deepcopy(w.model)
            hooks_model, hooks_opt, _ = PrivacyEngine().make_private(
                module=hm, optimizer=torch.optim.SGD(hm.parameters(), lr=LR),
                data_loader=_loader(w), noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False,
            )  # fmt: skip
            gm = copy.deepcopy(w.model)
            ghost_model, ghost_opt, ghost_loss, _ = PrivacyEngine().make_private(
                module=gm, optimizer=torch.optim.SGD(gm.parameters(), lr=LR),
                criterion=nn.CrossEntropyLoss(), data_loader=_loader(w),
                noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                poisson_sampling=False, grad_sample_mode="ghost",
            )  # fmt: skip

        def hooks_step() -> None:
            hooks_opt.zero_grad(set_to_none=True)
            F.cross_entropy(hooks_model(inputs, present), labels).backward()
            hooks_opt.step()

        def ghost_step() -> None:
            ghost_opt.zero_grad(set_to_none=True)
            ghost_loss(ghost_model(inputs, present), labels).backward()
            ghost_opt.step()

        steps["opacus_hooks"] = hooks_step
        steps["opacus_ghost"] = ghost_step

    m = copy.deepcopy(w.model)
    steps["proto_vector_norm"] = functional_step(vector_norm_clipped_grad_sum(m, MAX_GRAD_NORM), m)
    m = copy.deepcopy(w.model)
    steps["proto_bookkeeping"] = functional_step(BookKeeping(m, MAX_GRAD_NORM), m)
    m = copy.deepcopy(w.model)
    steps["proto_bookkeeping_torch_noise"] = functional_step(
        BookKeeping(m, MAX_GRAD_NORM), m, fast_noise=True
    )

    source = NoiseSource(False, 0, "dpsgd-noise")
    mech = DPSGD(MAX_GRAD_NORM, NOISE_MULTIPLIER, source)
    like = {k: v.detach() for k, v in w.model.named_parameters()}

    def noise_only() -> None:
        mech.noise(like)

    def torch_noise_only() -> None:
        torch_noise(source, like, NOISE_MULTIPLIER * MAX_GRAD_NORM)

    steps[TORCH_NOISE_ROW] = torch_noise_only
    steps[NOISE_ROW] = noise_only
    return steps


# --- Correctness --------------------------------------------------------------------------------


def _opacus_sums(w: Workload, max_grad_norm: float, ghost: bool) -> dict[str, torch.Tensor]:
    """Opacus's clipped gradient sum on the batch (noise 0, sum reduction)."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = copy.deepcopy(w.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ghost:
            gsm: nn.Module = GradSampleModuleFastGradientClipping(
                model, max_grad_norm=max_grad_norm, use_ghost_clipping=True, loss_reduction="sum"
            )
            opt: Any = DPOptimizerFastGradientClipping(
                torch.optim.SGD(gsm.parameters(), lr=LR), noise_multiplier=0.0,
                max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="sum",
            )  # fmt: skip
            crit = DPLossFastGradientClipping(
                gsm,
                opt,
                nn.CrossEntropyLoss(reduction="sum"),
                loss_reduction="sum",
            )
            crit(gsm(w.inputs, w.present), w.labels).backward()
        else:
            gsm = GradSampleModule(model, loss_reduction="sum")
            opt = DPOptimizer(
                torch.optim.SGD(gsm.parameters(), lr=LR), noise_multiplier=0.0,
                max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="sum",
            )  # fmt: skip
            F.cross_entropy(gsm(w.inputs, w.present), w.labels, reduction="sum").backward()
        opt.pre_step()  # clip, sum, add (zero) noise, divide by expected batch size 1
    return {
        n.removeprefix("_module."): p.grad.detach().clone()  # type: ignore[union-attr]
        for n, p in gsm.named_parameters()
    }


def _compare(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    worst_abs, worst_excess = 0.0, 0.0
    for k, r in ref.items():
        diff = (got[k] - r).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        worst_excess = max(worst_excess, float((diff / (1.0 + r.abs())).max()))
    scale = max(float(r.abs().max()) for r in ref.values())
    return {
        "max_abs_diff": worst_abs,
        "max_diff_over_1_plus_abs": worst_excess,
        "max_abs_value": scale,
        "passed": worst_excess <= TOLERANCE and set(got) >= set(ref),
    }


def check(w: Workload, both: bool = True) -> dict[str, Any]:
    """mmshield's (and the prototypes') clipped sums against Opacus's.

    At the benchmark's clipping norm and at the median record norm (about half the records
    clipped); ``both=False``: the median only.
    """
    params = {k: v.detach() for k, v in w.model.named_parameters()}
    weight = torch.ones(len(w.labels))
    args = (params, w.inputs, w.present, w.labels, weight)
    _, _, norms = clipped_grad_sum(w.model, MAX_GRAD_NORM)(*args)
    out: dict[str, Any] = {
        "norms": {
            "median": float(norms.median()),
            "min": float(norms.min()),
            "max": float(norms.max()),
        },
        "cases": [],
    }
    for c in (MAX_GRAD_NORM, float(norms.median())) if both else (float(norms.median()),):
        shipped, _, _ = clipped_grad_sum(w.model, c)(*args)
        bk, _, bk_norms = BookKeeping(copy.deepcopy(w.model), c)(*args)
        vn, _, _ = vector_norm_clipped_grad_sum(w.model, c)(*args)
        case: dict[str, Any] = {
            "max_grad_norm": c,
            "clipped_fraction": float((norms > c).float().mean()),
            "prototype_bookkeeping_vs_mmshield": _compare(bk, shipped),
            "prototype_vector_norm_vs_mmshield": _compare(vn, shipped),
            "bookkeeping_norms_max_rel_diff": float(((bk_norms - norms).abs() / norms).max()),
        }
        if w.opacus:
            for mode in ("hooks", "ghost"):
                ref = _opacus_sums(w, c, ghost=mode == "ghost")
                case[f"mmshield_vs_opacus_{mode}"] = _compare(shipped, ref)
                case[f"prototype_bookkeeping_vs_opacus_{mode}"] = _compare(bk, ref)
        out["cases"].append(case)
    out["passed"] = all(
        v["passed"] for case in out["cases"] for v in case.values() if isinstance(v, dict)
    )
    return out


def check_noise() -> bool:
    """The torch noise prototype draws the shipped sampler's numbers, bit for bit."""
    like = {"a": torch.zeros(3, 5), "b": torch.zeros(7), "c": torch.zeros(700_001)}
    got = torch_noise(NoiseSource(False, 3, "check"), like, 2.0)
    flat = NoiseSource(False, 3, "check").normal((sum(v.numel() for v in like.values()),), 2.0)
    return torch.equal(torch.cat([v.flatten() for v in got.values()]), flat)


# --- Timing -------------------------------------------------------------------------------------


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def time_steps(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], float | None]:
    """Seconds per step of each method, round-robin (order rotated each round)."""
    for f in steps.values():
        for _ in range(warmup):
            f()
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    with CpuMonitor() as mon:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for k in order:
                t0 = time.perf_counter()
                steps[k]()
                times[k].append(time.perf_counter() - t0)
    return times, mon.foreign_cores


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Median, quartiles and ratio to the non-private step (also median of per-round ratios)."""
    plain = times["plain"]
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        med = statistics.median(ts)
        per_round = [t / p for t, p in zip(ts, plain, strict=True)]
        out[k] = {
            "median_ms": med * 1e3,
            "p25_ms": q[0] * 1e3,
            "p75_ms": q[2] * 1e3,
            "ratio": med / statistics.median(plain),
            "ratio_median_per_round": statistics.median(per_round),
            "samples_ms": [round(t * 1e3, 3) for t in ts],
        }
    return out


def measure(
    ws: list[Workload],
    threads: int,
    rounds: int,
    warmup: int,
    console: Console,
    quiet_wait: float = 0.0,
    attempts: int = 1,
) -> dict[str, Any]:
    """Time every workload's methods at ``threads`` torch threads.

    A block (one workload) disturbed by other processes (more than :data:`DISTURBED` cores busy)
    is measured again, up to ``attempts`` times in all; the least disturbed attempt is kept.
    """
    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    for w in ws:
        steps = make_steps(w)
        best: dict[str, Any] | None = None
        tried: list[float | None] = []
        for _ in range(attempts):
            before = wait_for_quiet(quiet_wait) if quiet_wait > 0 else None
            load = _load()
            times, foreign = time_steps(steps, rounds, warmup)
            tried.append(None if foreign is None else round(foreign, 3))
            block = {
                "methods": summarise(times),
                "foreign_cores": foreign,
                "foreign_cores_before": before,
                "load_average": load,
            }
            if best is None or (foreign or 0.0) < (best["foreign_cores"] or 0.0):
                best = block
            if foreign is None or foreign <= DISTURBED:
                break
        assert best is not None
        best["foreign_cores_attempts"] = tried
        out[w.key] = best
        console.print(
            f"  {w.key}, {threads} thread(s): other processes kept {tried} cores busy "
            f"(attempts); plain {best['methods']['plain']['median_ms']:.1f} ms, mmshield "
            f"{best['methods']['mmshield']['ratio']:.2f}x"
        )
    return out


def profile_steps(ws: list[Workload], steps_per: int = 3) -> dict[str, Any]:
    """Top operators (self CPU time) of mmshield's and the book-keeping prototype's steps."""
    from torch.profiler import profile

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for w in ws:
        steps = make_steps(w)
        out[w.key] = {}
        for method in ("mmshield", "proto_bookkeeping"):
            f = steps[method]
            f()
            with profile() as prof:
                for _ in range(steps_per):
                    f()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
            out[w.key][method] = {
                "step_ms": total / steps_per / 1e3,
                "top_ops": [
                    {
                        "op": e.key,
                        "self_ms_per_step": e.self_cpu_time_total / steps_per / 1e3,
                        "share": e.self_cpu_time_total / total,
                    }
                    for e in top
                ],
                "phases_ms_per_step": {
                    e.key.removeprefix("bookkeeping: "): e.cpu_time_total / steps_per / 1e3
                    for e in events
                    if e.key.startswith("bookkeeping: ")
                },
            }
    return out


# --- In the simulator: train_stacked over a cohort of clients -----------------------------------

SIM_CLIENTS = 20  # the demo's clients per round
SIM_BATCH = 32  # the demo's batch size
SIM_STEPS = 2  # local steps per timed call


class _BookKeepingDPSGD(DPSGD):
    """DPSGD whose clipped sum is the book-keeping prototype (optionally torch noise too)."""

    def __init__(self, *args: Any, fast_noise: bool = False) -> None:
        super().__init__(*args)
        self.fast_noise = fast_noise

    def clipped_sum_fn(self, model: MultimodalModel) -> Any:
        return BookKeeping(model, self.max_grad_norm)

    def noise(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.fast_noise:
            return super().noise(like)
        return torch_noise(self.source, like, self.noise_multiplier * self.max_grad_norm)


def simulator(threads: int, rounds: int, warmup: int, quick: bool) -> dict[str, Any]:
    """Local DP-SGD steps of a cohort in :func:`train_stacked`, as the simulator runs them.

    The demo's model (attention fusion), 20 clients × 32 records per step, vmapped over
    clients; momentum 0.9. Methods: non-private, shipped DPSGD, DPSGD with the book-keeping
    clipped sum (shipped noise, then torch noise). Also checks at σ = 0 that the book-keeping
    trainer ends where the shipped one does.
    """
    from mmshield.fl.client import LocalTraining, train_stacked

    torch.set_num_threads(threads)
    train, _ = load_av_digits()
    k = 2 if quick else SIM_CLIENTS
    gen = torch.Generator().manual_seed(DATA_SEED)
    index = torch.randint(0, len(train), (k, SIM_STEPS, SIM_BATCH), generator=gen)
    weight = torch.ones(k, SIM_STEPS, SIM_BATCH)
    model = build_model(train.specs, 10, embed_dim=64, fusion="attention", fusion_hidden=64)
    params = {n: v.detach().unsqueeze(0).expand(k, *v.shape) for n, v in model.named_parameters()}
    training = LocalTraining(local_epochs=1, batch_size=SIM_BATCH, lr=LR, momentum=0.9)
    bk_model = copy.deepcopy(model)

    def source() -> NoiseSource:
        return NoiseSource(False, 0, "dpsgd-noise")

    def run(private: DPSGD | None, m: MultimodalModel) -> dict[str, torch.Tensor]:
        out, _ = train_stacked(m, params, train, index, weight, training, None, private)
        return out

    shipped0 = run(DPSGD(MAX_GRAD_NORM, 0.0, source()), model)
    bk0 = run(_BookKeepingDPSGD(MAX_GRAD_NORM, 0.0, source()), bk_model)
    agree = _compare(bk0, shipped0)

    def stepper(private: DPSGD | None, m: MultimodalModel) -> Callable[[], None]:
        def step() -> None:
            run(private, m)

        return step

    steps: dict[str, Callable[[], None]] = {
        "plain": stepper(None, model),
        "mmshield": stepper(DPSGD(MAX_GRAD_NORM, NOISE_MULTIPLIER, source()), model),
        "proto_bookkeeping": stepper(
            _BookKeepingDPSGD(MAX_GRAD_NORM, NOISE_MULTIPLIER, source()), bk_model
        ),
        "proto_bookkeeping_torch_noise": stepper(
            _BookKeepingDPSGD(MAX_GRAD_NORM, NOISE_MULTIPLIER, source(), fast_noise=True),
            bk_model,
        ),
    }
    mech = DPSGD(MAX_GRAD_NORM, NOISE_MULTIPLIER, source())
    src = source()
    like = {n: torch.zeros(k, *v.shape) for n, v in model.named_parameters()}

    def noise_only() -> None:
        for _ in range(SIM_STEPS):
            mech.noise(like)

    def torch_noise_only() -> None:
        for _ in range(SIM_STEPS):
            torch_noise(src, like, NOISE_MULTIPLIER * MAX_GRAD_NORM)

    steps[NOISE_ROW] = noise_only
    steps[TORCH_NOISE_ROW] = torch_noise_only
    best: tuple[dict[str, list[float]], float | None, float | None] | None = None
    tried: list[float | None] = []
    for _ in range(1 if quick else 3):
        quiet = None if quick else wait_for_quiet(60.0)
        times, foreign = time_steps(steps, rounds, warmup)
        tried.append(None if foreign is None else round(foreign, 3))
        if best is None or (foreign or 0.0) < (best[1] or 0.0):
            best = (times, foreign, quiet)
        if foreign is None or foreign <= DISTURBED:
            break
    assert best is not None
    times, foreign, quiet = best
    per_step = {n: [t / SIM_STEPS for t in ts] for n, ts in times.items()}
    return {
        "clients": k,
        "batch": SIM_BATCH,
        "steps_per_call": SIM_STEPS,
        "threads": threads,
        "records_per_step": k * SIM_BATCH,
        "methods": summarise(per_step),
        "foreign_cores": foreign,
        "foreign_cores_before": quiet,
        "foreign_cores_attempts": tried,
        "bookkeeping_vs_shipped_at_sigma_0": agree,
    }


# --- Reporting ----------------------------------------------------------------------------------


def _cell(m: dict[str, Any] | None) -> tuple[str, str]:
    if m is None:
        return "n/a", "n/a"
    return f"{m['median_ms']:.1f}", f"{m['ratio']:.2f}x"


def print_table(console: Console, ws: list[Workload], timings: dict[str, Any]) -> None:
    for w in ws:
        table = Table(title=f"{w.key}: {w.parameters:,} parameters, batch {BATCH}")
        table.add_column("method")
        for t in timings:
            table.add_column(f"{t} ms")
            table.add_column(f"{t} / plain")
        for k in [*METHODS, *EXTRA_ROWS]:
            label = METHODS.get(k) or "  " + EXTRA_ROWS[k]
            cells: list[str] = []
            for t in timings:
                cells.extend(_cell(timings[t][w.key]["methods"].get(k)))
            table.add_row(label, *cells)
        console.print(table)


SIM_ROWS = {
    "plain": "non-private",
    "mmshield": "mmshield DPSGD (shipped)",
    "proto_bookkeeping": "prototype: book-keeping",
    "proto_bookkeeping_torch_noise": "prototype: book-keeping + torch noise",
    NOISE_ROW: "shipped noise alone",
    TORCH_NOISE_ROW: "torch noise alone",
}


def print_simulator(console: Console, sim: dict[str, Any]) -> None:
    table = Table(
        title=(
            f"train_stacked, {sim['clients']} clients × {sim['batch']} records per step, "
            f"{sim['threads']} thread(s): ms per local step"
        )
    )
    for col in ("method", "ms per step", "/ non-private"):
        table.add_column(col)
    for k, label in SIM_ROWS.items():
        table.add_row(label, *_cell(sim["methods"][k]))
    console.print(table)


def markdown(payload: dict[str, Any]) -> str:
    """The ``dpsgd`` section of RESULTS.md."""
    ws, timings = payload["workloads"], payload["timings"]
    lines = [
        f"`python -m benchmarks.dpsgd`, {payload['timestamp_utc']}; machine: "
        f"{machine_line(payload['machine'])}, opacus {payload['opacus']}. One full optimiser "
        f"step on the same {BATCH} av-digits training records and the same initial weights, "
        f"noise multiplier {NOISE_MULTIPLIER}, clipping norm {MAX_GRAD_NORM}; medians of "
        f"{payload['rounds']} round-robin rounds after warm-up. Load average at the start "
        f"{payload['load_average_start']}, at the end {payload['load_average_end']}.",
        "",
        "Workloads (mmshield's `build_model`):",
        "",
        *[f"- `{k}` ({v['parameters']:,} parameters): {v['description']}" for k, v in ws.items()],
        "",
    ]
    heads = " | ".join(f"{t} ms | {t} / plain" for t in timings)
    lines += [
        f"| workload | method | {heads} |",
        "|---|---|" + "---|---|" * len(timings),
    ]
    for key in ws:
        for k in [*METHODS, *EXTRA_ROWS]:
            cells: list[str] = []
            for t in timings:
                cells.extend(_cell(timings[t][key]["methods"].get(k)))
            label = METHODS.get(k) or EXTRA_ROWS[k]
            lines.append(f"| {key} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for k, t in payload["targets"].items():
        lines.append(f"| {k} | {t['value']:.2f} {t['unit']} | {t['op']} {t['goal']} | {t['met']} |")
    noise = [
        f"{t}, {key}: {v['foreign_cores']:.2f}"
        for t, per in timings.items()
        for key, v in per.items()
        if v["foreign_cores"] is not None
    ]
    corr = payload["correctness"]
    worst = max(
        v["max_diff_over_1_plus_abs"]
        for c in corr.values()
        for case in c["cases"]
        for name, v in case.items()
        if isinstance(v, dict) and "opacus" in name
    )
    spreads = [
        (m["p75_ms"] - m["p25_ms"]) / m["median_ms"]
        for per in timings.values()
        for v in per.values()
        for m in v["methods"].values()
    ]
    lines += [
        "",
        "Noise: mmshield draws Gaussians from ChaCha20 (Box-Muller in float64), Opacus from "
        "`torch.normal` (not cryptographic unless `secure_mode`); both are inside their rows. "
        f"Spread of step times (interquartile range over median): median "
        f"{statistics.median(spreads):.0%}, worst {max(spreads):.0%}.",
    ]
    lines += [
        "",
        f"Correctness: clipped sums of mmshield and of the book-keeping prototype equal Opacus's "
        f"(hooks and ghost clipping, noise 0) within {TOLERANCE:g}·(1 + |g|) at clipping norms "
        f"{MAX_GRAD_NORM} and the median record norm: **{payload['correctness_passed']}** "
        f"(worst {worst:.1e}).",
        "",
        "Cores kept busy by other processes during each timing block (2-core machine shared "
        "with other work; 2-thread figures suffer most): " + "; ".join(noise) + "; "
        f"simulator: {payload['simulator']['foreign_cores'] or 0.0:.2f}.",
    ]
    sim = payload["simulator"]
    lines += [
        "",
        f"In the simulator (`train_stacked`, vmapped over clients): the demo model (attention "
        f"fusion), {sim['clients']} clients × {sim['batch']} records per local step, momentum "
        f"0.9, {sim['threads']} threads, ms per local step of the whole cohort:",
        "",
        "| method | ms per step | / non-private |",
        "|---|---|---|",
        *[
            f"| {label} | " + " | ".join(_cell(sim["methods"][k])) + " |"
            for k, label in SIM_ROWS.items()
        ],
        "",
        f"Book-keeping trainer vs shipped at σ = 0 after {sim['steps_per_call']} steps: max "
        f"|Δparam| {sim['bookkeeping_vs_shipped_at_sigma_0']['max_abs_diff']:.1e}. Torch noise "
        "prototype equals the shipped sampler bit for bit: "
        f"{payload['torch_noise_bit_identical']}.",
    ]
    prof = payload.get("profile")
    if prof:
        lines += [
            "",
            "Where mmshield's step goes (1 thread, torch profiler, top self-time ops; the "
            "NumPy noise is invisible to it):",
        ]
        for key, per in prof.items():
            top = per["mmshield"]["top_ops"][:4]
            ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in top)
            phases = per["proto_bookkeeping"]["phases_ms_per_step"]
            ph = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
            lines.append(
                f"- {key}: shipped step {per['mmshield']['step_ms']:.0f} ms: {ops}; "
                f"book-keeping prototype {per['proto_bookkeeping']['step_ms']:.0f} ms ({ph} ms)."
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpsgd")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 rounds at 1 thread, no warm-up, one clipping norm, no profile",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Optimal order is the")
    console = Console()
    load_start = _load()
    t_start = time.perf_counter()
    keys = ["cnn", "av-digits", "av-digits-attention"]
    ws = workloads(keys)
    rounds, warmup = (2, 0) if args.quick else (15, 2)
    quiet_wait, attempts = (0.0, 1) if args.quick else (60.0, 3)

    # Quick runs (smoke tests) time at 1 thread: a 2-thread step slows down many times over
    # when another process holds one of the 2 cores, which would blow the test's time limit.
    thread_counts = (1,) if args.quick else (2, 1)
    torch.set_num_threads(thread_counts[0])
    console.print("checking clipped sums against Opacus ...")
    correctness = {w.key: check(w, both=not args.quick) for w in ws}
    noise_identical = check_noise()
    passed = all(c["passed"] for c in correctness.values()) and noise_identical
    console.print(
        f"clipped sums equal Opacus's: {passed} ({time.perf_counter() - t_start:.0f} s so far)"
    )

    timings: dict[str, Any] = {}
    for threads in thread_counts:
        console.print(f"timing at {threads} thread(s) ...")
        timings[f"{threads}t"] = measure(ws, threads, rounds, warmup, console, quiet_wait, attempts)
    console.print(f"timing train_stacked (simulator) at {thread_counts[0]} thread(s) ...")
    sim = simulator(thread_counts[0], 2 if args.quick else 5, warmup, args.quick)
    passed = passed and sim["bookkeeping_vs_shipped_at_sigma_0"]["passed"]
    prof = None if args.quick else profile_steps(ws)
    torch.set_num_threads(2)
    print_table(console, ws, timings)
    print_simulator(console, sim)

    main_key = f"{thread_counts[0]}t"
    main_t = timings[main_key]
    targets = {
        f"{w.key}_mmshield_over_plain": target(
            main_t[w.key]["methods"]["mmshield"]["ratio"], TARGET_RATIO, "<=", "x"
        )
        for w in ws
    }
    for w in ws:
        ratio = main_t[w.key]["methods"]["mmshield"]["ratio"]
        bk = main_t[w.key]["methods"]["proto_bookkeeping_torch_noise"]["ratio"]
        console.print(
            f"{w.key}, {main_key}: mmshield {ratio:.2f}x the non-private step "
            f"(target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'missed'}); "
            f"prototype (book-keeping + torch noise) {bk:.2f}x"
        )
    from importlib import metadata

    payload: dict[str, Any] = {
        "quick": args.quick,
        "rounds": rounds,
        "warmup": warmup,
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "opacus": metadata.version("opacus"),
        "settings": {
            "batch": BATCH,
            "lr": LR,
            "noise_multiplier": NOISE_MULTIPLIER,
            "max_grad_norm": MAX_GRAD_NORM,
            "noise_source": "NoiseSource(secure=False): ChaCha20 keyed by the seed, as fast as "
            "secure=True",
            "data": f"av-digits train, {BATCH} records drawn with seed {DATA_SEED}",
        },
        "methods": {**METHODS, **EXTRA_ROWS},
        "workloads": {
            w.key: {"description": w.description, "parameters": w.parameters, "opacus": w.opacus}
            for w in ws
        },
        "correctness": correctness,
        "torch_noise_bit_identical": noise_identical,
        "correctness_passed": passed,
        "timings": timings,
        "simulator": sim,
        "profile": prof,
        "load_average_start": load_start,
        "load_average_end": _load(),
        "targets_threads": thread_counts[0],
        "targets": targets,
    }
    write_json(NAME, payload, args.out)
    if not args.quick and args.out is None:
        payload.setdefault("machine", machine_info())
        update_results_md(NAME, markdown(payload))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
