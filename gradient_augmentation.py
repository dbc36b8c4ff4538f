"""Gradient Augmentation (Huang et al., IEEE TMM 2022) and the baselines of the paper's tables.

    L_all = L + L_GA^A + L_GA^I,    L = L_CE (or soft triplet) + model extra losses + eta * L_S

- ``similarity_matching_loss``: L_S.
- ``adversarial_gradient_augmentation``: L_GA^A from dL/dx, x the normalized query images (or
  the query image features, the cheap variant); dL/dx must come from
  ``torch.autograd.grad(..., create_graph=True)`` so that the term can be differentiated.
- Isotropic GA, L_GA^I = gamma * sum_p s_p <r_p, theta_p> with r redrawn every step. Its gradient
  w.r.t. theta_p is gamma * s_p * r_p, independent of theta, so training adds it to the gradients
  after backward (``add_isotropic_gradient_noise``; on CPU ``isotropic_sgd_step`` also takes
  SGD's step in the same pass) instead of building a graph over every parameter;
  ``isotropic_gradient_augmentation_loss`` is the loss form, kept as the reference the tests
  compare against.
- ``fast_double_backward``: a context for the forward pass under which convolutions and batch
  norms record fast second derivatives, which L_GA^A on pixels needs (same values and first
  derivatives as the built-in ops).
- Baselines of the paper's comparison tables: ``fgsm_example`` (FGSM adversarial training on the
  query image) and the ``l1_regularization`` / ``l2_regularization`` weight penalties.

The functions take tensors (and an optimizer) and return tensors; none knows about models or
datasets.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import math

import torch
import torch.nn.functional as F

import cpu_kernels
import isotropic_noise

ADVERSARIAL_Q = (1.0, 2.0, math.inf)
ISOTROPIC_NOISE = ("gaussian", "uniform", "sphere")
ISOTROPIC_SCALE = ("mean", "sum")


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


# --------------------------------------------------------------------------- fast double backward
#
# L_GA^A on pixels differentiates dL/dx, so the image encoder is differentiated twice. PyTorch's
# built-in second derivatives of convolution and batch norm are slow on CPU: the convolution's
# weight term runs as a convolution of batch-transposed tensors (copies, and kernels as large as
# the feature map), and batch norm's is a composite of some thirty passes. Inside
# ``fast_double_backward()`` conv2d and training-mode batch_norm run as the autograd Functions
# below: the same forward and first-derivative kernels, and second derivatives through the fast
# kernels (convolution_backward for the weight term; for batch norm a C kernel of two passes on
# CPU float32, else some ten passes of torch operations). dL/dx of an image stem is computed by
# a polyphase split (below).


def _engine_will_compute(node) -> bool:
    """Whether the running backward pass needs this gradient edge (False in the input-only pass
    that builds dL/dx; True when called outside the engine)."""
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # not inside a backward pass
        return True


def _gradient_node(tensor: torch.Tensor | None):
    if tensor is None or not tensor.requires_grad:
        return None
    return torch.autograd.graph.get_gradient_edge(tensor).node


def _first_order_mask(ctx, want_x: bool) -> list[bool]:
    """Which of (input, weight, bias) gradients a conv/batch-norm backward kernel must compute:
    the input's when asked for and not already built differentiably, the parameters' only when
    this backward pass will use them."""
    return [
        want_x,
        ctx.needs_input_grad[1] and _engine_will_compute(ctx.weight_node),
        ctx.needs_input_grad[2] and _engine_will_compute(ctx.bias_node),
    ]


class _Conv2dInputGrad(torch.autograd.Function):
    """dL/dx of conv2d as a differentiable function of (dL/dy, weight).

    ``token`` and ``merge`` come from the forward convolution (``_Conv2d``): where ``merge`` is
    set, the second derivative's weight term is handed to the forward convolution's node as
    the gradient of ``token`` (the upstream ggI), which computes it in one call with its own
    weight gradient (see ``_WeightMerge``)."""

    @staticmethod
    def forward(ctx, grad_output, x, weight, token, conf, merge):
        ctx.save_for_backward(grad_output, weight)
        ctx.conf, ctx.merge = conf, merge
        ctx.weight_node = _gradient_node(weight)
        return _conv2d_input_grad(grad_output, x, weight, *conf)

    @staticmethod
    def backward(ctx, grad_grad_input):
        grad_output, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        d_grad_output = d_weight = d_token = None
        if ctx.needs_input_grad[0]:
            d_grad_output = F.conv2d(
                grad_grad_input, weight, None, stride, padding, dilation, groups
            )
        if ctx.needs_input_grad[2] and _engine_will_compute(ctx.weight_node):
            if ctx.merge is not None and ctx.merge.applies():
                d_token = grad_grad_input
            else:
                # <ggI, convT(gO, W)> is linear in W: its gradient is conv2d's weight gradient
                # with ggI as the input and gO as the output gradient.
                d_weight = torch.ops.aten.convolution_backward(
                    grad_output, grad_grad_input, weight, None, stride, padding, dilation,
                    False, [0, 0], groups, [False, True, False],
                )[1]  # fmt: skip
        return d_grad_output, None, d_weight, d_token, None, None


# The query images' convolutions get their weight gradient twice in the parameters' backward:
# the first-order term <x, dL/dy> and the second derivative's <ggI, gO> (gO: dL/dy of the pass
# that built dL/dx). Where the output maps are tiny (ResNet's last stage at 64x64 images: 2x2),
# oneDNN's weight gradient has a large cost per call whatever the batch: 32 x 512 x 2 x 2 with a
# 3x3 kernel took 3.2 ms, so two calls and their sum took 9-14 ms where one call on the two
# pairs stacked along the batch takes 9 ms. On larger maps the copies for the stack cost more
# than they save.
_MERGE_MAX_OUTPUT_PIXELS = 4


class _WeightMerge:
    """Shared by a forward convolution's node and the dL/dx node built from it: how many dL/dx
    graphs were built through the convolution (the merge holds for exactly one), and that
    pass's dL/dy. No tensors with a graph: the nodes do not keep each other alive."""

    __slots__ = ("passes", "grad_output")

    def __init__(self):
        self.passes, self.grad_output = 0, None

    def applies(self) -> bool:
        # Not under create_graph: the merged weight term is computed without a graph.
        return self.passes == 1 and not torch.is_grad_enabled()


def _conv2d_input_grad(grad_output, x, weight, stride, padding, dilation, groups):
    """conv2d's input gradient for output gradient ``grad_output`` at ``x``."""
    kernel = weight.shape[2:]
    if (
        x.device.type == "cpu"
        and groups == 1
        and dilation == [1, 1]
        and x.shape[1] <= 4
        and max(stride) > 1
        and all(k > 2 * s for k, s in zip(kernel, stride))
    ):
        return _conv2d_input_grad_polyphase(grad_output, x.shape, weight, stride, padding)
    return torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
        [True, False, False],
    )[0]  # fmt: skip


# A strided convolution's input gradient to an image (ResNet's stem: 3 channels, 7x7, stride 2)
# is slow in oneDNN on CPU: 9.7 ms for 32 images of 64x64 (2 threads), of which little is
# arithmetic. Split by the phase (i mod s, j mod s) of the input pixel, it is s*s stride-1
# correlations of dL/dy with sub-kernels of the weight; run as one convolution with C_in*s*s
# output channels and interleaved by pixel_shuffle, it takes 3.6 ms. Per dimension, with
# y[a] = sum_p x[s a - P + p] w[p] and i = s u + r: dL/dx[i] = sum_m dL/dy[u - m] w[s m + r + P],
# m from M0 = ceil(-(s - 1 + P) / s) to M1 = floor((k - 1 - P) / s), taps outside the kernel
# being 0. Larger kernels per phase win; few taps (a 3x3, stride 2 stem) and many input
# channels do not, and stay with oneDNN.


def _phase_taps(kernel: int, stride: int, padding: int):
    """(M0, M1, index, inside): for each phase r (rows) and tap t (columns, m = M1 - t) the
    kernel index s m + r + P, and whether it lies in the kernel."""
    m0, m1 = -((stride - 1 + padding) // stride), (kernel - 1 - padding) // stride
    index = stride * torch.arange(m1, m0 - 1, -1) + torch.arange(stride)[:, None] + padding
    return m0, m1, index.clamp(0, kernel - 1), (index >= 0) & (index < kernel)


def _conv2d_input_grad_polyphase(grad_output, input_shape, weight, stride, padding):
    batch, channels_in = input_shape[:2]
    sizes = input_shape[2:]
    (m0_h, m1_h, rows, rows_in), (m0_w, m1_w, cols, cols_in) = (
        _phase_taps(k, s, p) for k, s, p in zip(weight.shape[2:], stride, padding)
    )
    # sub-kernels (C_out, C_in, s_h, T_h, s_w, T_w) -> (C_in s_h s_w, C_out, T_h, T_w)
    inside = rows_in[:, :, None, None] & cols_in[None, None]
    sub = torch.where(inside, weight[:, :, rows[:, :, None, None], cols[None, None]], 0)
    sub = sub.permute(1, 2, 4, 0, 3, 5).reshape(-1, weight.shape[0], rows.shape[1], cols.shape[1])
    counts, pads, crops = [], [], []
    for size, out_size, s, m0, m1 in zip(
        sizes, grad_output.shape[2:], stride, (m0_h, m0_w), (m1_h, m1_w)
    ):
        count = -(-size // s)  # phase positions u = 0 .. count - 1 reach every input index
        pad = max(m1, count - m0 - out_size, 0)  # dL/dy[u - M1] .. dL/dy[u - M0], 0 outside
        counts.append(count)
        pads.append(pad)
        crops.append(slice(pad - m1, pad - m1 + count))
    y = F.conv2d(grad_output, sub, None, 1, pads)[:, :, crops[0], crops[1]]
    y = y.reshape(batch, channels_in, stride[0], stride[1], counts[0], counts[1])
    grad = y.permute(0, 1, 4, 2, 5, 3).reshape(
        batch, channels_in, counts[0] * stride[0], counts[1] * stride[1]
    )
    return grad[:, :, : sizes[0], : sizes[1]]


class _Conv2d(torch.autograd.Function):
    """conv2d; returns (y, token): token is an empty tensor of x's shape through which the dL/dx
    node hands back the second derivative's weight term (where it is merged, else 0-size)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conf):
        stride, padding, dilation, groups = conf
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        merge = x.device.type == "cpu" and y.shape[2] * y.shape[3] <= _MERGE_MAX_OUTPUT_PIXELS
        ctx.merge = _WeightMerge() if merge else None
        token = x.new_empty(x.shape if merge else (0,))
        ctx.save_for_backward(x, weight, token)
        ctx.conf = conf
        ctx.has_bias = bias is not None
        ctx.input_node = _gradient_node(x)
        ctx.weight_node, ctx.bias_node = _gradient_node(weight), _gradient_node(bias)
        ctx.set_materialize_grads(False)
        return y, token

    @staticmethod
    def backward(ctx, grad_output, grad_token):
        x, weight, token = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_weight = grad_bias = None
        if grad_output is None and grad_token is None:
            return None, None, None, None
        want_x = ctx.needs_input_grad[0] and grad_output is not None
        if want_x and torch.is_grad_enabled():  # create_graph: dL/dx must be differentiable
            if ctx.merge is not None:
                ctx.merge.passes += 1
                ctx.merge.grad_output = grad_output.detach()
            grad_x = _Conv2dInputGrad.apply(grad_output, x, weight, token, ctx.conf, ctx.merge)
            want_x = False
        # The images' gradient only when this pass uses it (not in the final backward, which
        # train_step runs for the parameters alone): the first layer's costliest term.
        if grad_output is None:  # only the merged weight term arrives
            mask = [False, False, False]
        else:
            mask = _first_order_mask(ctx, want_x and _engine_will_compute(ctx.input_node))
        if grad_token is not None:  # the second derivative's weight term, merged (see above)
            pairs = [(ctx.merge.grad_output, grad_token)]
            if mask[1]:
                pairs.insert(0, (grad_output, x))
                mask[1] = False
            grad_weight = torch.ops.aten.convolution_backward(
                torch.cat([g for g, _ in pairs]), torch.cat([i for _, i in pairs]), weight, None,
                stride, padding, dilation, False, [0, 0], groups, [False, True, False],
            )[1]  # fmt: skip
        if any(mask):
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            gx, gw, grad_bias = torch.ops.aten.convolution_backward(
                grad_output, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0],
                groups, mask,
            )  # fmt: skip
            grad_x = gx if mask[0] else grad_x
            grad_weight = gw if mask[1] else grad_weight
        return grad_x, grad_weight, grad_bias, None


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _declare_batch_norm(lib) -> None:
    sizes, pointer = [ctypes.c_int64] * 3, ctypes.c_void_p
    lib.tirg_bn_backward.restype = lib.tirg_bn_double_backward.restype = None
    lib.tirg_bn_backward.argtypes = [*sizes, *[pointer] * 8, ctypes.c_int]
    lib.tirg_bn_double_backward.argtypes = [*sizes, *[pointer] * 11, ctypes.c_int]


# batch_norm_kernel.c: batch norm's first and second derivatives in two passes each, on CPU
# float32. TIRG_GA_BN_KERNEL=0 keeps it off (torch operations then, the same values to float32
# rounding).
BATCH_NORM_KERNEL = cpu_kernels.Kernel(
    "batch_norm_kernel.c", "tirg_bn_", 1, _declare_batch_norm, "TIRG_GA_BN_KERNEL", ("-pthread",)
)


def _batch_norm_kernel(*tensors: torch.Tensor):
    """The kernel where it is built and these are contiguous float32 CPU tensors, else None."""
    if all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors
    ):
        return BATCH_NORM_KERNEL.load()[0]
    return None


def _ncl(x: torch.Tensor) -> tuple[int, int, int]:
    return x.shape[0], x.shape[1], x.numel() // (x.shape[0] * x.shape[1])


def _kernel_threads(x: torch.Tensor) -> int:
    """Threads for the kernel: one per 2^20 elements (starting threads costs more than it
    saves below that), at most torch's."""
    return max(1, min(torch.get_num_threads(), x.numel() >> 20))


class _BatchNormInputGrad(torch.autograd.Function):
    """dL/dx of training-mode batch norm as a differentiable function of (dL/dy, x, gamma).

    With x_hat = (x - mu) s, s = 1/sqrt(var + eps), M = N*H*W, per-channel means m1 = <gy>,
    m2 = <gy x_hat>: dL/dx = gamma s (gy - m1 - x_hat m2). For an upstream gradient a:
    d gy = gamma s (a - <a> - x_hat <a x_hat>),
    d x = gamma s^2 (x_hat (3 m2 <a x_hat> + m1 <a> - <a gy>) - <a x_hat>(gy - m1) - m2 (a - <a>)),
    d gamma = M s (<a gy> - m1 <a> - m2 <a x_hat>).
    """

    @staticmethod
    def forward(ctx, grad_output, x, weight, mean, invstd, eps):
        # torch's kernel is slow on maps of a few pixels (0.32 ms for 32 x 512 x 2 x 2 where
        # the C kernel takes 0.09); on larger maps it is the faster one.
        small = x.shape[2] * x.shape[3] <= 4
        lib = _batch_norm_kernel(grad_output, x, weight, mean, invstd) if small else None
        if lib is not None:
            grad_x = torch.empty_like(x)
            sum_gy, sum_gy_xhat = x.new_empty(x.shape[1]), x.new_empty(x.shape[1])
            lib.tirg_bn_backward(
                *_ncl(x), grad_output.data_ptr(), x.data_ptr(), mean.data_ptr(),
                invstd.data_ptr(), weight.data_ptr(), grad_x.data_ptr(), sum_gy.data_ptr(),
                sum_gy_xhat.data_ptr(), _kernel_threads(x),
            )  # fmt: skip
        else:
            grad_x, sum_gy_xhat, sum_gy = torch.ops.aten.native_batch_norm_backward(
                grad_output, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
            )
        ctx.save_for_backward(grad_output, x, weight, mean, invstd, sum_gy_xhat, sum_gy)
        ctx.eps = eps
        return grad_x

    @staticmethod
    def backward(ctx, a):
        grad_output, x, weight, mean, invstd, sum_gy_xhat, sum_gy = ctx.saved_tensors
        lib = None
        if not torch.is_grad_enabled():  # the kernel's outputs are not differentiable
            a = a.contiguous()
            lib = _batch_norm_kernel(a, grad_output, x, weight, mean, invstd)
        if lib is not None:
            want = ctx.needs_input_grad
            d_grad_output = torch.empty_like(a) if want[0] else None
            d_x = torch.empty_like(x) if want[1] else None
            d_gamma = torch.empty_like(weight) if want[2] else None
            lib.tirg_bn_double_backward(
                *_ncl(x), a.data_ptr(), grad_output.data_ptr(), x.data_ptr(), mean.data_ptr(),
                invstd.data_ptr(), weight.data_ptr(), sum_gy.data_ptr(), sum_gy_xhat.data_ptr(),
                *[None if t is None else t.data_ptr() for t in (d_grad_output, d_x, d_gamma)],
                _kernel_threads(x),
            )  # fmt: skip
            return d_grad_output, d_x, d_gamma, None, None, None
        count = x.numel() // x.shape[1]
        s, gamma = invstd, weight
        m1, m2 = sum_gy / count, sum_gy_xhat / count
        # d gy is batch norm's own input gradient for the upstream a, and the same fused pass
        # sums a x_hat and a over each channel.
        d_grad_output, sum_a_xhat, sum_a = torch.ops.aten.native_batch_norm_backward(
            a, x, weight, None, None, mean, invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], True, True],
        )  # fmt: skip
        a_mean, a_xhat = sum_a / count, sum_a_xhat / count
        d_x = d_gamma = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            a_gy = (a * grad_output).sum((0, 2, 3)) / count
        if ctx.needs_input_grad[1]:
            gs2 = gamma * s * s
            k_xhat = gs2 * (3 * m2 * a_xhat + m1 * a_mean - a_gy)
            constant = gs2 * (a_xhat * m1 + m2 * a_mean)
            # x_hat k = (x - mu) (s k): one pass fewer than forming x_hat
            d_x = torch.addcmul(_channel(constant), x - _channel(mean), _channel(s * k_xhat))
            d_x.addcmul_(grad_output, _channel(-gs2 * a_xhat))
            d_x.addcmul_(a, _channel(-gs2 * m2))
        if ctx.needs_input_grad[2]:
            d_gamma = count * s * (a_gy - m1 * a_mean - m2 * a_xhat)
        return d_grad_output, d_x, d_gamma, None, None, None


class _BatchNorm2d(torch.autograd.Function):
    """Training-mode batch norm over (N, C, H, W) with an affine weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.weight_node, ctx.bias_node = _gradient_node(weight), _gradient_node(bias)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x = None
        want_x = ctx.needs_input_grad[0]
        if want_x and torch.is_grad_enabled():
            grad_x = _BatchNormInputGrad.apply(grad_output, x, weight, mean, invstd, ctx.eps)
            want_x = False
        mask = _first_order_mask(ctx, want_x)
        grad_weight = grad_bias = None
        if any(mask):
            gx, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_output, x, weight, None, None, mean, invstd, True, ctx.eps, mask
            )
            grad_x = gx if mask[0] else grad_x
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _conv2d_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, stride, padding, dilation, groups


def _batch_norm_args(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
    eps=1e-5,
):  # fmt: skip
    return input, running_mean, running_var, weight, bias, training, momentum, eps


def _pair(value) -> list[int] | None:
    if isinstance(value, int):
        return [value, value]
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return list(value)
    return None


class fast_double_backward(torch.overrides.TorchFunctionMode):
    """Within this context, conv2d and training-mode batch norm (4-D input, affine) record the
    autograd Functions above, whose second derivatives are fast. Values and first derivatives
    are those of the built-in ops (the same kernels). Anything else, and everything under
    autocast, runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.conv2d or func is F.batch_norm) and torch.is_grad_enabled():
            if func is torch.conv2d:
                x, weight, bias, stride, padding, dilation, groups = _conv2d_args(*args, **kwargs)
                conf = (_pair(stride), _pair(padding), _pair(dilation), groups)
                if _plain_4d(x, weight, bias) and None not in conf[:3]:
                    return _Conv2d.apply(x, weight, bias, conf)[0]
            else:
                x, mean, var, weight, bias, training, momentum, eps = _batch_norm_args(
                    *args, **kwargs
                )
                if training and _plain_4d(x, weight, bias) and bias is not None:
                    momentum = 0.0 if momentum is None else momentum
                    return _BatchNorm2d.apply(x, weight, bias, mean, var, momentum, eps)
        return func(*args, **kwargs)


def _plain_4d(x, weight, bias) -> bool:
    """A 4-D input with a weight of its dtype, outside autocast: what the Functions handle."""
    return (
        isinstance(x, torch.Tensor)
        and x.dim() == 4
        and isinstance(weight, torch.Tensor)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and not torch.is_autocast_enabled(x.device.type)
    )


# --------------------------------------------------------------------------- isotropic GA
#
# r is a pure function of (seed, iteration, tensor): every DDP rank draws the same r (so the
# parameters stay in sync after the noise is added to the averaged gradients), and a resumed run
# draws what the uninterrupted run drew. On CPU it comes from isotropic_noise's counter-based
# stream (a C kernel that draws, adds and dots in one pass); on other devices from one torch
# generator per tensor. The numbers do not depend on the number of threads.


def isotropic_generators(
    seed: int, iteration: int, count: int, device: torch.device | str
) -> list[torch.Generator]:
    """``count`` torch generators for step ``iteration``'s noise on a non-CPU device, one per
    parameter tensor, seeded from the same keys as the CPU stream."""
    generators = []
    for key in isotropic_noise.step_keys(seed, iteration, count):
        generator = torch.Generator(device=device)
        generator.manual_seed(key >> 1)  # 63 bits: manual_seed takes any int64
        generators.append(generator)
    return generators


def _noise_std(param: torch.Tensor, gamma: float, scale: str) -> float:
    if scale not in ISOTROPIC_SCALE:
        raise ValueError(f"scale must be one of {ISOTROPIC_SCALE}, got {scale!r}")
    return gamma / param.numel() if scale == "mean" else gamma


def _run_per_tensor(function, params: list[torch.Tensor]) -> list:
    """function(k) for every tensor k, largest first, on a CPU thread pool when torch has more
    than one thread (results are the same either way); returns the results in tensor order."""
    order = sorted(range(len(params)), key=lambda k: -params[k].numel())
    workers = torch.get_num_threads()
    results: list = [None] * len(params)
    if params and params[0].device.type == "cpu" and workers > 1 and len(params) > 1:
        # The kernel and torch's CPU samplers release the GIL and run serially, so threads run
        # them in parallel. The pool lives for one call: no idle threads are left for a later
        # fork (DataLoader workers) to copy.
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for k, result in zip(order, pool.map(function, order)):
                results[k] = result
    else:
        for k in order:
            results[k] = function(k)
    return results


def _draw(
    param: torch.Tensor, kind: str, coefficient: float, key: int, generator: torch.Generator | None
) -> torch.Tensor:
    """coefficient * r for one tensor, flat, in the parameter's dtype and on its device."""
    flat = torch.empty(param.numel(), dtype=param.dtype, device=param.device)
    base = "gaussian" if kind == "sphere" else kind
    unit = 1.0 if kind == "sphere" else coefficient
    if generator is None:
        isotropic_noise.fill_(flat, base, key, unit)
    elif base == "uniform":
        bound = math.sqrt(3.0) * unit
        flat.uniform_(-bound, bound, generator=generator)
    else:
        flat.normal_(0.0, unit, generator=generator)
    if kind == "sphere":
        flat.mul_(coefficient * math.sqrt(flat.numel()) / _norm(flat))
    return flat


def _norm(flat: torch.Tensor) -> float:
    # A fixed chunking, so that the norm (and the sphere's r) does not depend on the threads.
    step = 32_768 if flat.device.type == "cpu" else max(flat.numel(), 1)
    chunks = [flat[start : start + step] for start in range(0, flat.numel(), step)]
    # ATen's serial sum, not BLAS, whose summation order depends on its thread count.
    return math.sqrt(sum(c.square().sum().item() for c in chunks))


def _check_noise(kind: str) -> None:
    if kind not in ISOTROPIC_NOISE:
        raise ValueError(f"noise must be one of {ISOTROPIC_NOISE}, got {kind!r}")


def _sources(params, seed, iteration):
    """Per tensor: (key, generator), the generator None on CPU (the kernel's stream)."""
    device = params[0].device if params else torch.device("cpu")
    keys = isotropic_noise.step_keys(seed, iteration, len(params))
    if device.type == "cpu":
        return keys, [None] * len(params)
    return keys, isotropic_generators(seed, iteration, len(params), device)


def draw_isotropic_noise(
    params: list[torch.Tensor],
    kind: str,
    seed: int,
    iteration: int,
    coefficients: list[float] | None = None,
) -> list[torch.Tensor]:
    """Step ``iteration``'s draw of r_p for each parameter tensor, each shaped like it.

    kind: 'gaussian' r ~ N(0, I); 'uniform' r ~ U(-sqrt 3, sqrt 3) per entry (unit variance, as
    the Gaussian); 'sphere' r_p uniform on the sphere of radius sqrt(numel(p)) (the Gaussian's
    expected norm), per tensor. ``coefficients[k]`` (default 1) multiplies r_k. These are the
    numbers ``add_isotropic_gradient_noise`` adds for the same (seed, iteration).
    """
    _check_noise(kind)
    coefficients = [1.0] * len(params) if coefficients is None else coefficients
    keys, generators = _sources(params, seed, iteration)

    def draw(k: int) -> torch.Tensor:
        flat = _draw(params[k], kind, coefficients[k], keys[k], generators[k])
        return flat.view(params[k].shape)

    return _run_per_tensor(draw, params)


def add_isotropic_gradient_noise(
    params: list[torch.Tensor], gamma: float, kind: str, scale: str, seed: int, iteration: int
) -> torch.Tensor:
    """Apply L_GA^I as gradient noise: p.grad += gamma * s_p * r_p, r drawn for ``iteration``.

    s_p = 1/numel(p) for scale 'mean' (the public code's per-tensor mean), 1 for 'sum' (the
    paper's plain inner product). Call after backward (after DDP's gradient averaging and after
    a GradScaler's ``unscale_``) and before ``optimizer.step()``: the step is then the step on
    L + L_GA^I, weight decay and momentum included. A parameter without a gradient gets the noise
    alone, as the loss form would give it. Returns the loss-form value
    gamma * sum_p s_p <r_p, theta_p> at the current parameters, for logging: a 0-dim tensor.

    On CPU the Gaussian and uniform noise is drawn, added and dotted in one pass over the
    gradient and the parameter (no noise tensor), the tensors spread over a thread pool.
    """
    _check_noise(kind)
    std = [_noise_std(p, gamma, scale) for p in params]
    keys, generators = _sources(params, seed, iteration)
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

        def add(k: int) -> torch.Tensor:
            param, grad = params[k].detach(), params[k].grad
            fused = generators[k] is None and kind != "sphere"
            if fused and param.is_contiguous() and grad.is_contiguous():
                value = isotropic_noise.add_(grad.view(-1), param.view(-1), kind, keys[k], std[k])
                return torch.tensor(value, dtype=torch.float64)
            r = _draw(param, kind, std[k], keys[k], generators[k])
            grad.add_(r.view(param.shape))
            return torch.dot(r, param.reshape(-1))

        values = _run_per_tensor(add, params)
    if not values:
        return torch.zeros((), dtype=torch.float64)
    device = params[0].device
    return torch.stack([v.to(device=device, dtype=torch.float64) for v in values]).sum()


def isotropic_sgd_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    gamma: float,
    kind: str,
    scale: str,
    seed: int,
    iteration: int,
) -> torch.Tensor | None:
    """``add_isotropic_gradient_noise`` and then ``optimizer.step()``, fused: one pass per tensor
    through the CPU kernel draws the noise, adds it to the gradient and takes SGD's step.

    For torch.optim.SGD with momentum (no dampening, not Nesterov, not maximizing) on float32 CPU
    tensors, when ``params`` are the optimizer's parameters that have gradients and the kernel
    is built; otherwise it does nothing and returns None, and the caller adds the noise and steps
    as usual. The gradients, momentum buffers and parameters are those of the unfused path, bit
    for bit (tested). Returns the loss-form value, as ``add_isotropic_gradient_noise``.
    """
    _check_noise(kind)
    if type(optimizer) is not torch.optim.SGD or kind == "sphere" or not params:
        return None
    groups = {}
    for group in optimizer.param_groups:
        plain = not (group["dampening"] or group["nesterov"] or group["maximize"])
        numbers = all(isinstance(group[k], float | int) for k in ("lr", "weight_decay"))
        if not (plain and numbers and group["momentum"] and not group.get("differentiable")):
            return None
        for p in group["params"]:
            groups[p] = group
    wanted = {id(p) for p in params}
    with_grad = {id(p) for p in groups if p.grad is not None}
    if not wanted <= {id(p) for p in groups} or not with_grad <= wanted:
        return None  # the noise would go unstepped, or the optimizer step tensors without noise
    buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
    tensors = [t for p, b in zip(params, buffers) for t in (p, p.grad, b) if t is not None]
    if not isotropic_noise.kernel_accepts(*tensors):
        return None
    std = [_noise_std(p, gamma, scale) for p in params]
    keys = isotropic_noise.step_keys(seed, iteration, len(params))
    first = [b is None for b in buffers]
    with torch.no_grad():
        for k, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if first[k]:  # SGD's first step: the buffer becomes the gradient
                buffers[k] = optimizer.state[p]["momentum_buffer"] = torch.empty_like(p)

        def step(k: int) -> float:
            p, group = params[k], groups[params[k]]
            return isotropic_noise.sgd_(
                p.grad.view(-1), p.detach().view(-1), buffers[k].view(-1), first[k], group["lr"],
                group["momentum"], group["weight_decay"], kind, keys[k], std[k],
            )  # fmt: skip

        values = _run_per_tensor(step, params)
    return torch.tensor(sum(values), dtype=torch.float64)


def isotropic_gradient_augmentation_loss(
    params: list[torch.Tensor], noise: list[torch.Tensor], gamma: float, scale: str = "mean"
) -> torch.Tensor:
    """The loss form L_GA^I = gamma * sum_p s_p <r_p, theta_p> (s_p as in the noise form).

    params, noise: matching lists of tensors -> scalar, differentiable w.r.t. params. Training
    uses ``add_isotropic_gradient_noise``, which gives the same update without this graph.
    """
    return sum(
        _noise_std(p, gamma, scale) * (r * p).sum() for p, r in zip(params, noise, strict=True)
    )


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
