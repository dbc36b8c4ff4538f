"""Gradient Augmentation (Huang et al., IEEE TMM 2022) and the baselines of the paper's tables.

    L_all = L + L_GA^A + L_GA^I,    L = L_CE (or soft triplet) + model extra losses + eta * L_S

- ``similarity_matching_loss``: L_S.
- ``adversarial_gradient_augmentation``: L_GA^A from dL/dx, x the normalized query images (or
  the query image features, the cheap variant); dL/dx must come from
  ``torch.autograd.grad(..., create_graph=True)`` so that the term can be differentiated
  (autograd's own double backward).
- Isotropic GA, L_GA^I = gamma * sum_p s_p <r_p, theta_p> with r redrawn every step. Its gradient
  w.r.t. theta_p is gamma * s_p * r_p, independent of theta, so training adds it to the gradients
  after backward (``add_isotropic_gradient_noise``) instead of building a graph over every
  parameter; ``isotropic_gradient_augmentation_loss`` is the loss form, kept as the reference the
  tests compare against.
- Baselines of the paper's comparison tables: ``fgsm_example`` (FGSM adversarial training on the
  query image) and the ``l1_regularization`` / ``l2_regularization`` weight penalties.

The functions take tensors and return tensors; none knows about models or datasets.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ADVERSARIAL_Q = (1.0, 2.0, math.inf)
ISOTROPIC_NOISE = ("gaussian", "uniform", "sphere")
ISOTROPIC_SCALE = ("mean", "sum")
ISOTROPIC_FORMS = ("paper", "public")


def similarity_matching_loss(
    query_features: torch.Tensor, target_features: torch.Tensor
) -> torch.Tensor:
    """L_S: the mean over the B x D entries of (f_comp - f_target)^2.

    This is the public GA code's reduction (``((mod_img1 - img2) ** 2).mean()``), so its weight
    eta = 0.001 keeps its meaning; it equals (1/D) * mean_i ||f_comp_i - f_target_i||^2.
    query_features, target_features: (B, D) -> scalar.
    """
    return (query_features - target_features).pow(2).mean()


def adversarial_gradient_augmentation(
    input_grad: torch.Tensor, eps: float, q: float = 1.0
) -> torch.Tensor:
    """L_GA^A = (eps / 2) * mean_i ||B * dL/dx_i||_q * d^(1 - 1/q).

    input_grad: (B, ...) = dL/dx for the B query images (or features) x_i of d elements each;
    B * dL/dx_i is sample i's own gradient when L is a batch mean. q is the dual norm of the
    threat model: q = 1 is l_inf (the public code), 2 is l_2, inf is l_1 (d^(1-1/q) = d).
    To first order, 2 * L_GA^A is the largest increase of L over perturbations with
    ||delta_i||_p <= eps * d^(1/p) (1/p + 1/q = 1), so with q = 1 it is half the FGSM step's
    increase of L. Returns a scalar; a bf16/fp16 gradient (autocast) is normed in float32.
    """
    if q not in ADVERSARIAL_Q:
        raise ValueError(f"q must be one of {ADVERSARIAL_Q}, got {q}")
    batch = input_grad.shape[0]
    per_sample = input_grad.reshape(batch, -1)
    if per_sample.dtype in (torch.float16, torch.bfloat16):
        per_sample = per_sample.float()
    d = per_sample.shape[1]
    norms = torch.linalg.vector_norm(batch * per_sample, ord=q, dim=1)
    return (0.5 * eps * d ** (1.0 - 1.0 / q)) * norms.mean()


# --------------------------------------------------------------------------- isotropic GA
#
# r is drawn from one torch.Generator per step, on the parameters' device, seeded from (seed,
# iteration) alone: every DDP rank draws the same r (so the replicas stay equal after the noise
# is added to the averaged gradients), and a resumed run draws what the uninterrupted run drew.

# Mixed into the seed so that the noise never coincides with another stream seeded by --seed.
_ISOTROPIC_STREAM = 0x15_07_0C


def isotropic_generator(seed: int, iteration: int, device: torch.device | str) -> torch.Generator:
    """The generator of step ``iteration``'s noise in a run seeded with ``seed``."""
    state = np.random.SeedSequence([seed, iteration, _ISOTROPIC_STREAM]).generate_state(1)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]))
    return generator


def _coefficient(param: torch.Tensor, gamma: float, scale: str) -> float:
    """gamma * s_p: s_p = 1/numel(p) for 'mean' (the public code), 1 for 'sum' (the paper)."""
    if scale not in ISOTROPIC_SCALE:
        raise ValueError(f"scale must be one of {ISOTROPIC_SCALE}, got {scale!r}")
    return gamma / param.numel() if scale == "mean" else gamma


def _check_noise(kind: str) -> None:
    if kind not in ISOTROPIC_NOISE:
        raise ValueError(f"noise must be one of {ISOTROPIC_NOISE}, got {kind!r}")


def _draw(param: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance r shaped like ``param``, in its dtype, on its device."""
    r = torch.empty_like(param, memory_format=torch.contiguous_format)
    if kind == "uniform":
        return r.uniform_(-math.sqrt(3.0), math.sqrt(3.0), generator=generator)
    r.normal_(generator=generator)
    if kind == "sphere":  # uniform on the sphere of radius sqrt(numel): the Gaussian's norm
        r.mul_(math.sqrt(r.numel()) / torch.linalg.vector_norm(r))
    return r


def draw_isotropic_noise(
    params: list[torch.Tensor], kind: str, seed: int, iteration: int
) -> list[torch.Tensor]:
    """Step ``iteration``'s draw of r_p for each parameter tensor, each shaped like it.

    kind: 'gaussian' r ~ N(0, I); 'uniform' r ~ U(-sqrt 3, sqrt 3) per entry (unit variance, as
    the Gaussian); 'sphere' r_p uniform on the sphere of radius sqrt(numel(p)) (the Gaussian's
    expected norm), per tensor. These are the numbers ``add_isotropic_gradient_noise`` adds
    (times gamma * s_p) for the same (seed, iteration).
    """
    _check_noise(kind)
    if not params:
        return []
    generator = isotropic_generator(seed, iteration, params[0].device)
    return [_draw(p, kind, generator) for p in params]


def isotropic_coefficients(
    params: list[torch.Tensor], gamma: float, scale: str, cumulative: bool = False
) -> list[float]:
    """gamma * s_p * c_p per tensor: c_p = 1, or with ``cumulative`` N - k for the k-th of N
    tensors (0-based), the count of the public GA code's loop (its running sum of the terms is
    added to the loss on every pass, so tensor k is counted by passes k, ..., N - 1)."""
    n = len(params)
    return [
        _coefficient(p, gamma, scale) * (n - k if cumulative else 1) for k, p in enumerate(params)
    ]


@torch.no_grad()
def add_isotropic_gradient_noise(
    params: list[torch.Tensor],
    gamma: float,
    kind: str,
    scale: str,
    seed: int,
    iteration: int,
    *,
    cumulative: bool = False,
    drift: bool = False,
) -> torch.Tensor:
    """Apply L_GA^I as gradient noise: p.grad += a_p * r_p (+ a_p with ``drift``), a_p from
    ``isotropic_coefficients``, r drawn for ``iteration`` (none with kind 'none').

    The paper's form is the default. ``cumulative`` and ``drift`` give the public GA code's
    ``--random_grad``: sum over passes k of 0.01 * sum_{j<=k} (mean(r_j * p_j) + mean(p_j)),
    whose gradient is exactly this (the form is linear in p, so no graph is needed).

    Call after backward (after DDP's gradient averaging and after a GradScaler's ``unscale_``)
    and before ``optimizer.step()``: the step is then the step on L + L_GA^I, weight decay and
    momentum included. A parameter without a gradient gets the noise alone, as the loss form
    would give it. Returns the loss-form value at the current parameters, for logging: a 0-dim
    float64 tensor on the parameters' device (no host sync).
    """
    noise = draw_isotropic_noise(params, kind, seed, iteration) if kind != "none" else None
    values = []
    for k, (p, a) in enumerate(
        zip(params, isotropic_coefficients(params, gamma, scale, cumulative))
    ):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if noise is not None:
            p.grad.add_(noise[k], alpha=a)
            values.append(a * torch.vdot(noise[k].flatten(), p.detach().flatten()).double())
        if drift:
            p.grad.add_(a)
            values.append(a * p.detach().sum().double())
    return torch.stack(values).sum() if values else torch.zeros((), dtype=torch.float64)


def isotropic_gradient_augmentation_loss(
    params: list[torch.Tensor],
    noise: list[torch.Tensor] | None,
    gamma: float,
    scale: str = "mean",
    *,
    cumulative: bool = False,
    drift: bool = False,
) -> torch.Tensor:
    """The loss form sum_p a_p (<r_p, theta_p> [+ sum(theta_p) with ``drift``]), a_p from
    ``isotropic_coefficients`` (the paper's L_GA^I = gamma * sum_p s_p <r_p, theta_p> by
    default); ``noise`` None leaves the r term out.

    params, noise: matching lists of tensors -> scalar, differentiable w.r.t. params. Training
    uses ``add_isotropic_gradient_noise``, which gives the same update without this graph.
    """
    coefficients = isotropic_coefficients(params, gamma, scale, cumulative)
    total = params[0].new_zeros(())
    for k, (p, a) in enumerate(zip(params, coefficients)):
        if noise is not None:
            total = total + a * (noise[k] * p).sum()
        if drift:
            total = total + a * p.sum()
    return total


BATCH_NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
)


@torch.no_grad()
def scale_norms(model) -> dict[str, torch.Tensor]:
    """What a drift on the parameters (the public L_GA^I's mean(theta) term) would shrink:
    'bn_weight_norm', the l2 norm of all batch-norm weights together, and 'norm_scale', the
    learnable scale of the normalization layer, where the model has them."""
    weights = [
        m.weight for m in model.modules() if isinstance(m, BATCH_NORMS) and m.weight is not None
    ]
    out = {}
    if weights:
        out["bn_weight_norm"] = torch.linalg.vector_norm(torch.cat([w.flatten() for w in weights]))
    scale = getattr(getattr(model, "normalization_layer", None), "norm_s", None)
    if isinstance(scale, torch.nn.Parameter):
        out["norm_scale"] = scale.detach()
    return out


# --------------------------------------------------------------------------- baselines


def fgsm_example(images: torch.Tensor, input_grad: torch.Tensor, eps: float) -> torch.Tensor:
    """The FGSM query image x + eps * sign(dL/dx), detached (Goodfellow et al., 2015).

    images, input_grad: (B, 3, H, W) normalized images and dL/dx -> (B, 3, H, W). eps is in
    normalized-image units (one 8-bit grey level is about 0.017). The FGSM objective is
    0.5 * (L(x) + L(x_adv)).
    """
    return (images.detach() + eps * input_grad.detach().sign()).detach()


def l1_regularization(params: list[torch.Tensor]) -> torch.Tensor:
    """sum_p ||theta_p||_1 over the given parameter tensors -> scalar."""
    return torch.stack([torch.linalg.vector_norm(p, 1) for p in params]).sum()


def l2_regularization(params: list[torch.Tensor]) -> torch.Tensor:
    """sum_p ||theta_p||_2^2 over the given parameter tensors -> scalar.

    With weight w it adds 2 * w * theta to the gradient: SGD's ``weight_decay`` = 2 * w.
    """
    return torch.stack([p.pow(2).sum() for p in params]).sum()


# --------------------------------------------------------------------------- flags

# The weights --ga switches on (the public GA code's values); each one given explicitly wins, and
# 0 switches its term off. L_GA^A's q (1), input (pixels), noise (gaussian) and scale (mean)
# default to the GA code's choices with or without --ga.
GA_DEFAULTS = {"sim_weight": 1e-3, "ga_adv_eps": 1e-6, "ga_iso_gamma": 0.01}


def add_arguments(parser, add_bool) -> None:
    """The GA flags of main.py (``add_bool`` adds a flag that takes ``--x`` or ``--x True``)."""
    g = parser.add_argument_group("gradient augmentation (each weight 0 switches its term off)")
    add_bool(
        g,
        "--ga",
        False,
        f"switch on L_S, L_GA^A and L_GA^I at the GA paper's defaults {GA_DEFAULTS}",
    )
    g.add_argument(
        "--sim_weight", type=float, default=None, help="eta, weight of L_S (default 0 without --ga)"
    )
    g.add_argument(
        "--ga_adv_eps", type=float, default=None, help="eps of L_GA^A (default: 0 without --ga)"
    )
    g.add_argument(
        "--ga_adv_q",
        type=float,
        default=1.0,
        choices=ADVERSARIAL_Q,
        help="dual norm q of L_GA^A: 1 (the l_inf threat model, as the GA code), 2 or inf",
    )
    g.add_argument(
        "--ga_adv_input",
        default="pixels",
        choices=["pixels", "features"],
        help="take L_GA^A's gradient w.r.t. the normalized query image pixels (the paper; double "
        "backprop through the image encoder) or w.r.t. the query image features the text is "
        "composed with (far cheaper)",
    )
    g.add_argument(
        "--ga_iso_gamma", type=float, default=None, help="gamma of L_GA^I (default: 0 without --ga)"
    )
    g.add_argument(
        "--ga_iso_noise",
        default="gaussian",
        choices=(*ISOTROPIC_NOISE, "none"),
        help="distribution of L_GA^I's r: N(0, I) (the GA code), unit-variance uniform, "
        "uniform on the sphere of radius sqrt(numel) per tensor, or none (the drift alone)",
    )
    g.add_argument(
        "--ga_iso_scale",
        default="mean",
        choices=ISOTROPIC_SCALE,
        help="mean: gamma * <r_p, theta_p> / numel(p) per tensor (the GA code); sum: the plain "
        "gamma * <r, theta>",
    )
    g.add_argument(
        "--ga_iso_form",
        default="paper",
        choices=ISOTROPIC_FORMS,
        help="paper: gamma * sum_p s_p <r_p, theta_p>; public: the GA code's --random_grad, "
        "which also counts the k-th of N tensors N - k times (cumulative) and adds "
        "gamma * mean(theta_p) per count (drift); --ga_iso_cumulative and --ga_iso_drift "
        "switch these parts on or off",
    )
    for part in ("cumulative", "drift"):
        g.add_argument(
            f"--ga_iso_{part}",
            default=None,
            choices=["on", "off"],
            help=f"L_GA^I's {part} part of the public form (default: on with --ga_iso_form "
            "public, off with paper)",
        )
    g.add_argument(
        "--fgsm_eps",
        type=float,
        default=0.0,
        help="baseline: FGSM adversarial training on the query image, "
        "0.5 * (L(x) + L(x + eps * sign(dL/dx))), eps in normalized-image units; 0 is off",
    )
    g.add_argument(
        "--l1_weight", type=float, default=0.0, help="baseline: weight of sum_p ||theta_p||_1"
    )
    g.add_argument(
        "--l2_weight", type=float, default=0.0, help="baseline: weight of sum_p ||theta_p||_2^2"
    )


def resolve_arguments(parser, args) -> None:
    """Fill the GA weights left unset (GA_DEFAULTS with --ga, 0 without) and check them."""
    for name, default in GA_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default if args.ga else 0.0)
    for part in ("cumulative", "drift"):
        if getattr(args, f"ga_iso_{part}") is None:
            setattr(args, f"ga_iso_{part}", "on" if args.ga_iso_form == "public" else "off")
    if args.ga_iso_noise == "none" and args.ga_iso_drift == "off" and args.ga_iso_gamma > 0:
        parser.error("--ga_iso_noise none without the drift leaves L_GA^I nothing to add")
    for name in (*GA_DEFAULTS, "fgsm_eps", "l1_weight", "l2_weight"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name} must be a finite number >= 0 (0 switches it off), got {value}")


# --------------------------------------------------------------------------- building blocks
