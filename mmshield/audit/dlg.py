"""Gradient inversion: reconstruct a client's image from the gradient it shares (DLG, iDLG, IG).

Methods
-------
An honest-but-curious server that sees one client's update for one record can look for the input
whose gradient matches it. Starting from random pixels ``x'`` (and, for DLG, a random soft label),
an optimiser minimises a distance between the gradient of the loss at ``x'`` and the observed one,
differentiating through the gradient computation (a second-order derivative):

* **DLG** — "Deep Leakage from Gradients" (Zhu, Liu, Han, NeurIPS 2019): squared Euclidean
  distance ``sum ||∇θ L(x', y') - g||²``, optimised jointly over the image and a soft label
  ``y' = softmax(l')`` with L-BFGS. It recovers single images exactly from a small sigmoid LeNet.
* **iDLG** — "improved DLG" (Zhao, Mopuri, Bilen 2020): the label is read off the observed gradient
  first. With softmax cross-entropy, the last linear layer's weight gradient is
  ``(p - onehot(y)) h^T``; when its input ``h`` is non-negative (after a sigmoid or ReLU) only the
  true class's row sums to a negative number, so ``y = argmin_j sum_k ∂L/∂W_jk``. Then only the
  image is optimised (same distance, L-BFGS), which converges faster and more reliably.
* **Inverting Gradients** — Geiping, Bauermeister, Dröge, Moeller (NeurIPS 2020): cosine distance
  ``1 - <∇θ L(x', y), g> / (||∇θ L(x', y)|| ||g||)`` (insensitive to the gradient's scale, e.g. to a
  learning rate or an averaging factor) plus a total-variation prior ``tv_weight · TV(x')``,
  minimised with Adam on the **signed** gradient, learning rate decayed tenfold at 3/8, 5/8 and 7/8
  of the iterations, and the image projected onto the data range after every step.

The gradient may come from a model (:func:`model_gradient_fn`; for a
:class:`~mmshield.models.model.MultimodalModel`, one modality's path through encoder, fusion and
head, the others absent, via :func:`modality_forward`) or from any callable ``(x, soft_label) ->
gradients`` that keeps the graph (``create_graph=True``). The optimiser keeps the iterate with the
lowest objective, so a diverging L-BFGS run returns its best point, not NaNs.

Metrics
-------
* **PSNR** ``10 log10(L² / MSE)`` for data range ``L`` (``inf`` for identical images).
* **SSIM** (Wang, Bovik, Sheikh, Simoncelli 2004) with the standard settings: an 11×11 Gaussian
  window of standard deviation 1.5, ``K1 = 0.01``, ``K2 = 0.03``, ``C1 = (K1 L)²``,
  ``C2 = (K2 L)²``, population (biased) local statistics, computed per channel over the positions
  where the window fits ("valid"; the same numbers as scikit-image's ``gaussian_weights=True``
  after its border crop) and averaged.

DP defeats the attack: with Gaussian noise of variance 1e-2 on the gradient (standard deviation
0.1 per coordinate, small next to what DP-SGD adds) the reconstruction is noise (Zhu et al. 2019,
Fig. 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmshield.models.model import MultimodalModel

__all__ = [
    "GradientFn",
    "Method",
    "Reconstruction",
    "cross_entropy_gradient_fn",
    "infer_label",
    "modality_forward",
    "model_gradient_fn",
    "psnr",
    "reconstruct",
    "ssim",
    "total_variation",
]

Method = Literal["dlg", "idlg", "inverting"]
Optimizer = Literal["lbfgs", "adam"]

GradientFn = Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]]
"""``(x (1, *shape), soft_label (1, classes)) -> gradients``, differentiable w.r.t. ``x``."""


# --------------------------------------------------------------------------------------------
# Image metrics


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` when the images are equal).

    Parameters
    ----------
    image, reference
        Tensors of the same shape.
    data_range
        ``max - min`` of the valid pixel values (1 for images in [0, 1]).
    """
    if image.shape != reference.shape:
        raise ValueError(f"PSNR of shapes {tuple(image.shape)} and {tuple(reference.shape)}")
    mse = float(((image.detach().double() - reference.detach().double()) ** 2).mean())
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    image: torch.Tensor,
    reference: torch.Tensor,
    data_range: float = 1.0,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Structural similarity (Wang et al. 2004) with the standard Gaussian window.

    Parameters
    ----------
    image, reference
        ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)`` tensors of the same shape, with
        ``H, W >= window_size``.
    data_range
        ``max - min`` of the valid pixel values.
    window_size, sigma
        Gaussian window (11 and 1.5 by default).
    k1, k2
        Stabilising constants (0.01 and 0.03 by default).

    Returns
    -------
    float
        Mean SSIM over channels, images and valid window positions; 1 for identical images.
    """
    if image.shape != reference.shape:
        raise ValueError(f"SSIM of shapes {tuple(image.shape)} and {tuple(reference.shape)}")
    x = image.detach().double()
    y = reference.detach().double()
    while x.dim() < 4:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"SSIM takes (H, W), (C, H, W) or (N, C, H, W), got {tuple(image.shape)}")
    _, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {h}x{w}")
    kernel = _gaussian_window(window_size, sigma).expand(c, 1, window_size, window_size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float((num / den).mean())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels (H and W)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dh + dw


# --------------------------------------------------------------------------------------------
# Gradient functions


def cross_entropy_gradient_fn(
    forward: Callable[[torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor]
) -> GradientFn:
    """Gradient of softmax cross-entropy w.r.t. ``params``, for a (soft) label, keeping the graph.

    Parameters
    ----------
    forward
        ``x (B, *shape) -> logits (B, classes)``.
    params
        Parameters whose gradient the client shares (in the order of the observed gradient).

    Returns
    -------
    GradientFn
        ``(x, soft_label) -> [∂L/∂p for p in params]`` with
        ``L = mean_b(-sum_j soft_label_bj log softmax(forward(x))_bj)``.
    """
    plist = list(params)
    if not plist:
        raise ValueError("no parameters to take the gradient of")

    def gradient(x: torch.Tensor, soft_label: torch.Tensor) -> Sequence[torch.Tensor]:
        logits = forward(x)
        loss = -(soft_label * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
        return torch.autograd.grad(loss, plist, create_graph=True)

    return gradient


def modality_forward(
    model: MultimodalModel, modality: str = "image"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of ``model`` for inputs of one modality, every other modality absent.

    The other modalities' embeddings are zeros with their presence masked off, exactly what the
    fusion sees when they are absent, so their encoders need not run.
    """
    if modality not in model.encoders:
        raise ValueError(
            f"the model has no {modality!r} encoder; its modalities are {model.modalities}"
        )
    names = model.modalities

    def forward(x: torch.Tensor) -> torch.Tensor:
        emb = model.encoders[modality](x)
        b = emb.shape[0]
        embeddings = [emb if m == modality else torch.zeros_like(emb) for m in names]
        mask = torch.tensor([m == modality for m in names], device=emb.device).expand(b, -1)
        logits: torch.Tensor = model.head(model.fusion(torch.stack(embeddings, dim=1), mask))
        return logits

    return forward


def model_gradient_fn(
    model: nn.Module,
    names: Sequence[str] | None = None,
    *,
    modality: str | None = None,
) -> GradientFn:
    """Cross-entropy gradient function of a model's named parameters.

    Parameters
    ----------
    model
        A classifier ``x -> logits``, or a :class:`~mmshield.models.model.MultimodalModel` (then
        ``modality`` picks the input; default ``"image"``).
    names
        Parameter names in the order of the observed gradient; default every parameter that
        requires a gradient (for a multimodal model, those of the chosen modality's encoder,
        the fusion and the head).
    modality
        Modality of the reconstructed input for a multimodal model.
    """
    forward: Callable[[torch.Tensor], torch.Tensor]
    named = dict(model.named_parameters())
    if isinstance(model, MultimodalModel):
        mod = modality or "image"
        forward = modality_forward(model, mod)
        if names is None:
            names = [
                k
                for k, p in named.items()
                if p.requires_grad
                and (k.startswith(f"encoders.{mod}.") or not k.startswith("encoders."))
            ]
    else:
        if modality is not None:
            raise ValueError("modality applies only to a MultimodalModel")
        forward = model
        if names is None:
            names = [k for k, p in named.items() if p.requires_grad]
    unknown = [k for k in names if k not in named]
    if unknown:
        raise ValueError(f"parameters not in the model: {unknown}")
    return cross_entropy_gradient_fn(forward, [named[k] for k in names])


def infer_label(last_weight_grad: torch.Tensor) -> int:
    """iDLG: the true label from the last linear layer's weight (or bias) gradient.

    Valid for softmax cross-entropy on one record when the layer's input is non-negative
    (sigmoid, ReLU): only the true class's row sums to a negative number.

    Parameters
    ----------
    last_weight_grad
        ``(classes, features)`` weight gradient or ``(classes,)`` bias gradient.
    """
    g = last_weight_grad.detach()
    if g.dim() not in (1, 2) or g.shape[0] < 2:
        raise ValueError(
            f"need a (classes, features) weight or (classes,) bias gradient, got {tuple(g.shape)}"
        )
    rows = g.sum(dim=1) if g.dim() == 2 else g
    return int(torch.argmin(rows))


# --------------------------------------------------------------------------------------------
# Reconstruction


@dataclass
class Reconstruction:
    """Result of a gradient-inversion attack.

    Attributes
    ----------
    image
        The reconstruction, shape ``shape``, clipped to the data range.
    label
        The label used (iDLG: inferred; DLG: argmax of the optimised soft label).
    method, optimizer
        What ran.
    iterations
        Objective evaluations made.
    objective
        Lowest objective reached (the returned image's).
    history
        Objective after each evaluation.
    psnr, ssim
        Against ``reference`` when one was given, else ``None``.
    """

    image: torch.Tensor
    label: int
    method: str
    optimizer: str
    iterations: int
    objective: float
    history: list[float] = field(default_factory=list, repr=False)
    psnr: float | None = None
    ssim: float | None = None


@dataclass
class _Best:
    """The iterate with the lowest objective so far."""

    value: float
    x: torch.Tensor
    label: int | None


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def reconstruct(
    observed: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    gradient_fn: GradientFn,
    shape: Sequence[int],
    *,
    method: Method = "idlg",
    label: int | None = None,
    num_classes: int | None = None,
    optimizer: Optimizer | None = None,
    iterations: int | None = None,
    lr: float | None = None,
    tv_weight: float = 1e-4,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    reference: torch.Tensor | None = None,
) -> Reconstruction:
    """Reconstruct one input from its observed gradient.

    Parameters
    ----------
    observed
        The gradient the client shared (a sequence, or a mapping whose values are taken in
        order), matching what ``gradient_fn`` returns.
    gradient_fn
        ``(x, soft_label) -> gradients`` (see :func:`model_gradient_fn`).
    shape
        Shape of one input, e.g. ``(1, 28, 28)``.
    method
        ``"dlg"`` (optimise the label too), ``"idlg"`` (infer the label first) or
        ``"inverting"`` (cosine distance + total variation, Adam).
    label
        The label if known; otherwise iDLG / Inverting Gradients infer it from the last 2-D
        tensor of ``observed`` (see :func:`infer_label`), and DLG optimises it.
    num_classes
        Number of classes (default: the first dimension of the last 2-D observed tensor).
    optimizer
        ``"lbfgs"`` (default for DLG and iDLG) or ``"adam"`` (default for Inverting Gradients).
    iterations
        Objective evaluations for L-BFGS, steps for Adam (default 100 and 1,000).
    lr
        Learning rate (default 1 for L-BFGS, 0.1 for Adam).
    tv_weight
        Weight of the total-variation prior (Inverting Gradients only).
    bounds
        Valid data range: Adam projects onto it after each step; the result is clipped to it.
        ``None`` for unbounded inputs.
    seed
        Seed of the random starting point.
    reference
        The true input, to report PSNR and SSIM (never used by the attack).

    Returns
    -------
    Reconstruction
    """
    obs = [t.detach() for t in (observed.values() if isinstance(observed, Mapping) else observed)]
    if not obs:
        raise ValueError("the observed gradient is empty")
    if method not in ("dlg", "idlg", "inverting"):
        raise ValueError(f"unknown method {method!r}; use 'dlg', 'idlg' or 'inverting'")
    opt_name: Optimizer = optimizer or ("adam" if method == "inverting" else "lbfgs")
    if opt_name not in ("lbfgs", "adam"):
        raise ValueError(f"unknown optimizer {opt_name!r}; use 'lbfgs' or 'adam'")
    n_iter = iterations if iterations is not None else (1000 if opt_name == "adam" else 100)
    if n_iter < 1:
        raise ValueError(f"iterations must be >= 1, got {n_iter}")
    step = lr if lr is not None else (0.1 if opt_name == "adam" else 1.0)
    last_2d = next((t for t in reversed(obs) if t.dim() == 2), None)
    classes = num_classes or (int(last_2d.shape[0]) if last_2d is not None else None)
    if classes is None:
        raise ValueError("give num_classes: no 2-D (classes, features) tensor in the gradient")
    if label is None and method != "dlg":
        if last_2d is None:
            raise ValueError("give label: no last-layer weight gradient to infer it from")
        label = infer_label(last_2d)
    if label is not None and not 0 <= label < classes:
        raise ValueError(f"label {label} is outside [0, {classes})")
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}")

    dtype = obs[0].dtype if obs[0].is_floating_point() else torch.float32
    device = obs[0].device
    gen = torch.Generator().manual_seed(seed)
    start = torch.rand((1, *shape), generator=gen, dtype=torch.float64)
    if bounds is not None:
        start = bounds[0] + (bounds[1] - bounds[0]) * start
    x = start.to(device=device, dtype=dtype).requires_grad_(True)
    variables = [x]
    label_logits: torch.Tensor | None = None
    if method == "dlg" and label is None:
        label_logits = torch.randn((1, classes), generator=gen, dtype=torch.float64)
        label_logits = label_logits.to(device=device, dtype=dtype).requires_grad_(True)
        variables.append(label_logits)
    fixed = None
    if label is not None:
        fixed = F.one_hot(torch.tensor([label], device=device), classes).to(dtype)
    obs_flat = _flat(obs)
    obs_norm = obs_flat.norm()

    history: list[float] = []
    best = _Best(math.inf, x.detach().clone(), label)

    def objective() -> torch.Tensor:
        soft = torch.softmax(label_logits, dim=-1) if label_logits is not None else fixed
        assert soft is not None
        grads = gradient_fn(x, soft)
        if len(grads) != len(obs):
            raise ValueError(f"gradient_fn returned {len(grads)} tensors, observed has {len(obs)}")
        if method == "inverting":
            g = _flat(grads)
            cos = (g * obs_flat).sum() / (g.norm() * obs_norm + 1e-12)
            return 1 - cos + tv_weight * total_variation(x)
        dist = torch.zeros((), dtype=dtype, device=device)
        for g, o in zip(grads, obs, strict=True):
            dist = dist + ((g - o) ** 2).sum()
        return dist

    def evaluate() -> torch.Tensor:
        value = objective()
        derivs = torch.autograd.grad(value, variables)
        for v, d in zip(variables, derivs, strict=True):
            v.grad = d
        val = float(value.detach())
        history.append(val)
        if math.isfinite(val) and val < best.value:
            best.value = val
            best.x = x.detach().clone()
            if label_logits is not None:
                best.label = int(label_logits.detach().argmax())
        return value.detach()

    if opt_name == "lbfgs":
        lbfgs = torch.optim.LBFGS(
            variables,
            lr=step,
            max_iter=n_iter,
            max_eval=n_iter,
            history_size=100,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )
        lbfgs.step(evaluate)
    else:
        adam = torch.optim.Adam(variables, lr=step)
        milestones = [int(n_iter * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        sched = torch.optim.lr_scheduler.MultiStepLR(adam, milestones=milestones, gamma=0.1)
        for _ in range(n_iter):
            adam.zero_grad()
            evaluate()
            if method == "inverting":
                for v in variables:
                    assert v.grad is not None
                    v.grad.sign_()
            adam.step()
            sched.step()
            if bounds is not None:
                with torch.no_grad():
                    x.clamp_(bounds[0], bounds[1])

    image = best.x
    if bounds is not None:
        image = image.clamp(bounds[0], bounds[1])
    image = image.reshape(tuple(shape))
    final_label = best.label
    if final_label is None:
        assert label_logits is not None
        final_label = int(label_logits.detach().argmax())
    result = Reconstruction(
        image=image,
        label=final_label,
        method=method,
        optimizer=opt_name,
        iterations=len(history),
        objective=best.value,
        history=history,
    )
    if reference is not None:
        ref = reference.detach().reshape(tuple(shape)).to(image)
        data_range = bounds[1] - bounds[0] if bounds is not None else 1.0
        result.psnr = psnr(image, ref, data_range)
        result.ssim = ssim(image, ref, data_range)
    return result
