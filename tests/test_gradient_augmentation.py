"""Gradient Augmentation: L_S, L_GA^A, L_GA^I, the FGSM/L1/L2 baselines and their training step."""

import contextlib
import copy
import gc
import json
import math
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
from tb_events import read_scalars

import gradient_augmentation as ga
import img_text_composition_models
import isotropic_noise
import main
import text_model
import torch_function

Q_VALUES = [1.0, 2.0, math.inf]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads spin-wait on each
    other and a tiny ResNet step takes ten times longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyComposer(torch.nn.Module):
    """The composition models' forward contract at toy size, smooth (tanh) so that second
    derivatives are exact: a conv image encoder, a character-embedding text encoder and one
    extra loss term (as ComposeAE's arrive)."""

    def __init__(self, dim: int = 6, dtype=torch.float32):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=dtype)
        self.fc = torch.nn.Linear(4, dim, dtype=dtype)
        self.chars = torch.nn.Embedding(128, dim, dtype=dtype)
        self.mix = torch.nn.Linear(dim, dim, dtype=dtype)
        self.normalization_layer = torch_function.NormalizationLayer(4.0)

    def encode(self, imgs):
        return self.fc(torch.tanh(self.conv(imgs)).mean(dim=(2, 3)))

    def forward(self, source, texts, target):
        source_features = self.encode(source)
        ids = [torch.tensor([ord(c) % 128 for c in text]) for text in texts]
        text_features = torch.stack([self.chars(i).mean(0) for i in ids])
        query = torch.tanh(self.mix(source_features * text_features)) + source_features
        return {
            "query": self.normalization_layer(query),
            "target": self.normalization_layer(self.encode(target)),
            "source_features": source_features,
            "extra_losses": {"aux": 0.1 * source_features.pow(2).mean()},
        }


def make_batch(batch_size=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = ["make circle small", "add red cube", "remove blue object", "make gray large"]
    return {
        "source_img_data": torch.randint(0, 256, (batch_size, 3, size, size), generator=g).to(
            torch.uint8
        ),
        "target_img_data": torch.randint(0, 256, (batch_size, 3, size, size), generator=g).to(
            torch.uint8
        ),
        "mod": [texts[i % len(texts)] for i in range(batch_size)],
    }


def ga_args(*argv):
    return main.parse_args(list(argv))


def reference_data_loss(out, args):
    """L written out for the TinyComposer: main loss + extra loss + eta * L_S."""
    query, target = out["query"], out["target"]
    loss = main.LOSSES[args.loss](query, target) + out["extra_losses"]["aux"]
    if args.sim_weight:
        loss = loss + args.sim_weight * ((query - target) ** 2).mean()
    return loss


# --------------------------------------------------------------------------- L_S


def test_similarity_matching_is_the_ga_codes_mean_over_entries():
    q = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    entries = [(a - b) ** 2 for qr, tr in zip(q.tolist(), t.tolist()) for a, b in zip(qr, tr)]
    assert ga.similarity_matching_loss(q, t).item() == pytest.approx(sum(entries) / 6)


# --------------------------------------------------------------------------- L_GA^A


@pytest.mark.parametrize("q", Q_VALUES)
def test_adversarial_term_matches_closed_form_on_a_linear_model(q):
    # f(x_i) = <w, x_i>, L = mean_i (f(x_i) - y_i)^2, so B * dL/dx_i = 2 (f(x_i) - y_i) w.
    torch.manual_seed(0)
    batch, shape, eps = 5, (2, 3, 3), 1e-3
    x = torch.randn(batch, *shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(batch, dtype=torch.float64)
    residual = (x * w).sum(dim=(1, 2, 3)) - y
    (grad,) = torch.autograd.grad(residual.pow(2).mean(), x, create_graph=True)
    term = ga.adversarial_gradient_augmentation(grad, eps, q)

    d = w.numel()
    flat_w = w.flatten().tolist()
    if q == 1.0:
        w_norm = sum(abs(v) for v in flat_w)
    elif q == 2.0:
        w_norm = math.sqrt(sum(v * v for v in flat_w))
    else:
        w_norm = max(abs(v) for v in flat_w)
    norms = [2 * abs(r) * w_norm for r in residual.tolist()]
    expected = eps / 2 * sum(norms) / batch * d ** (1 - 1 / q)
    assert term.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("q", Q_VALUES)
def test_adversarial_term_is_half_the_worst_first_order_increase_of_the_loss(q):
    """2 L_GA^A = max <dL/dx, delta> over ||delta_i||_p <= eps d^(1/p), 1/p + 1/q = 1."""
    torch.manual_seed(1)
    model = TinyComposer(dtype=torch.float64).eval()
    batch = make_batch()
    args = ga_args("--sim_weight", "0.5")
    x = torch_function.normalize_images(batch["source_img_data"]).double().requires_grad_()
    target = torch_function.normalize_images(batch["target_img_data"]).double()

    def loss_at(images):
        return reference_data_loss(model(images, batch["mod"], target), args)

    (grad,) = torch.autograd.grad(loss_at(x), x, create_graph=True)
    eps = 1e-5
    term = ga.adversarial_gradient_augmentation(grad, eps, q)
    g = grad.detach().reshape(len(x), -1)
    d = g.shape[1]
    if q == 1.0:  # l_inf ball: FGSM's step
        delta = eps * g.sign()
    elif q == 2.0:
        delta = eps * math.sqrt(d) * g / g.norm(dim=1, keepdim=True)
    else:  # l_1 ball: all the budget on the largest entry
        delta = torch.zeros_like(g)
        top = g.abs().argmax(dim=1)
        delta[torch.arange(len(g)), top] = eps * d * g[torch.arange(len(g)), top].sign()
    delta = delta.reshape(x.shape)
    with torch.no_grad():
        increase = (loss_at(x + delta) - loss_at(x - delta)) / 2  # central: error O(delta^3)
    assert 2 * term.item() == pytest.approx(increase.item(), rel=1e-6)


@pytest.mark.parametrize("q", Q_VALUES)
def test_adversarial_term_gradient_matches_finite_differences(q):
    """gradcheck of the whole term (double backprop) w.r.t. input and weights, float64."""
    torch.manual_seed(2)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    conv = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    linear = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(3, 3, dtype=torch.float64)

    def term(images, conv_weight, linear_weight):
        h = torch.tanh(F.conv2d(images, conv_weight, padding=1)).mean(dim=(2, 3))
        query = F.normalize(torch.tanh(h @ linear_weight), dim=1) * 4.0
        loss = torch_function.batch_classification_loss(query, F.normalize(targets, dim=1) * 4.0)
        (grad,) = torch.autograd.grad(loss, images, create_graph=True)
        return ga.adversarial_gradient_augmentation(grad, 0.1, q)

    assert torch.autograd.gradcheck(term, (x, conv, linear), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "dtype, bn_kernel", [(torch.float64, "1"), (torch.float32, "1"), (torch.float32, "0")]
)
def test_fast_double_backward_matches_the_built_in_second_derivatives(
    dtype, bn_kernel, monkeypatch
):
    """Convolutions (bias, stride, dilation, groups) and training-mode batch norms recorded
    by ``fast_double_backward``: same values, dL/dx, L_GA^A, weight gradients and running
    statistics as the built-in ops. float64 takes the torch paths; float32 the batch-norm
    C kernel where it is built (and TIRG_GA_BN_KERNEL=0 the torch path), against the built-in
    ops in float64."""
    monkeypatch.setenv("TIRG_GA_BN_KERNEL", bn_kernel)
    torch.manual_seed(7)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 5, stride=2, padding=2),  # a stem: the polyphase input gradient
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
        torch.nn.BatchNorm2d(6),
        torch.nn.Tanh(),
        torch.nn.Conv2d(6, 5, 3, stride=2, padding=1),  # a 2x2 map: batch norm's C kernel
        torch.nn.BatchNorm2d(5),
        torch.nn.Tanh(),
    ).double()
    images = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    targets = torch.randn(5, 5, dtype=torch.float64)

    def run(model, fast):
        x = images.clone().to(dtype if fast else torch.float64).requires_grad_()
        with ga.fast_double_backward() if fast else contextlib.nullcontext():
            features = model(x).mean(dim=(2, 3))
        loss = torch_function.batch_classification_loss(features, targets.to(x.dtype))
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        term = ga.adversarial_gradient_augmentation(grad, 0.3, 2.0)
        model.zero_grad()
        (loss + term).backward()
        grads = [p.grad for p in model.parameters()]
        return [features, grad, term, *grads, *model.buffers()]

    built_in, fast = run(copy.deepcopy(net), False), run(copy.deepcopy(net).to(dtype), True)
    for a, b in zip(built_in, fast, strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        else:
            # at least 1e-6: a bias before batch norm has a gradient of 0 in exact arithmetic,
            # float32 rounding there reaches 2e-7
            scale = max(a.abs().max().item() if a.is_floating_point() else 0, 0.1)
            torch.testing.assert_close(b.to(a.dtype), a, rtol=1e-4, atol=1e-5 * scale)
    # The Functions were used: the graph holds them, not the built-in nodes.
    x = images.clone().requires_grad_()
    with ga.fast_double_backward():
        names = {type(net[1](net[0](x)).grad_fn).__name__, type(net[0](x).grad_fn).__name__}
    assert names == {"_BatchNorm2dBackward", "_Conv2dBackward"}


def tiny_last_stage(seed=0):
    """Two convolutions, the second with 2x2 output maps (merged weight terms)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
        torch.nn.Conv2d(4, 5, 3, stride=2, padding=1), torch.nn.BatchNorm2d(5), torch.nn.Tanh(),
    ).double()  # fmt: skip
    return net, torch.randn(3, 3, 8, 8, dtype=torch.float64)


def ga_gradients(net, images, fast, passes=1, create_graph=False):
    """Weight gradients of L + sum over ``passes`` dL/dx graphs of L_GA^A (q = 2)."""
    x = images.clone().requires_grad_()
    with ga.fast_double_backward() if fast else contextlib.nullcontext():
        loss = net(x).pow(2).mean()
    total = loss
    for k in range(passes):
        (grad,) = torch.autograd.grad(loss * (k + 1), x, create_graph=True)
        total = total + ga.adversarial_gradient_augmentation(grad, 0.1, 2.0)
    grads = torch.autograd.grad(total, list(net.parameters()), create_graph=create_graph)
    return [g.detach() for g in grads]


def test_the_second_derivative_weight_term_on_tiny_maps_is_merged():
    """On 2x2 output maps the first-order weight gradient and the second derivative's weight
    term come from one convolution_backward call on the two stacked along the batch; with two
    dL/dx graphs through the convolution (no merge) and under create_graph the gradients stay
    those of the built-in ops."""
    net, images = tiny_last_stage()
    calls = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default and args[-1][1]:
                calls.append(tuple(args[1].shape))  # the input of a weight gradient
            return func(*args, **(kwargs or {}))

    with Record():
        fast = ga_gradients(net, images, fast=True)
    assert calls.count((6, 4, 4, 4)) == 1  # the 2x2 stage: one call, batch 3 + 3
    assert (3, 4, 4, 4) not in calls
    assert calls.count((3, 3, 8, 8)) == 2  # the 4x4 stage: two calls
    expected = ga_gradients(net, images, fast=False)
    cases = [
        (fast, expected),
        (ga_gradients(net, images, True, create_graph=True), expected),
        (ga_gradients(net, images, True, passes=2), ga_gradients(net, images, False, passes=2)),
    ]
    for got, want in cases:
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backward", [False, True])
def test_fast_double_backward_frees_its_graph(backward):
    """No reference cycle keeps the graph alive (the nodes share no tensor with a graph): an
    activation it saved is freed with the loss, whether or not backward ran."""
    net, images = tiny_last_stage()
    x = images.clone().requires_grad_()
    with ga.fast_double_backward():
        hidden = net[:3](x)
        loss = net[3:](hidden).pow(2).mean()
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    term = loss + ga.adversarial_gradient_augmentation(grad, 0.1)
    alive = weakref.ref(hidden)
    del hidden, loss, grad
    gc.collect()
    assert alive() is not None  # saved by the graph
    if backward:
        term.backward(inputs=list(net.parameters()))
    del term
    gc.collect()
    assert alive() is None


def batch_norm_input_grad(dtype, shape, seed=0):
    """dL/dx of a training-mode batch norm (``ga._BatchNormInputGrad``) at random data, as a
    function of (dL/dy, x, gamma), and an upstream gradient for it."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1).to(dtype)
    gamma = (torch.rand(shape[1], generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    grad_output = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    _, mean, invstd = torch.ops.aten.native_batch_norm(x, gamma, None, None, None, True, 0.1, 1e-5)
    inputs = [t.clone().requires_grad_() for t in (grad_output, x, gamma)]
    grad_x = ga._BatchNormInputGrad.apply(*inputs, mean, invstd, 1e-5)
    return grad_x, inputs, upstream


def assert_close_to_float32_rounding(got, want):
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize(
    "shape, threads",
    [((4, 3, 2, 2), 1), ((3, 5, 1, 3), 1), ((2, 4, 7, 5), 1), ((5, 3, 1, 1), 1),
     ((2, 4, 512, 512), 2)],  # 2^21 elements: two threads
)  # fmt: skip
def test_batch_norm_kernel_against_float64(shape, threads, monkeypatch):
    """batch_norm_kernel.c's dL/dx (maps of at most 4 pixels) and its second derivatives
    (d dL/dy, d x, d gamma) against the torch path in float64."""
    if ga.BATCH_NORM_KERNEL.load()[0] is None:
        pytest.skip(f"no C kernel here: {ga.BATCH_NORM_KERNEL.load()[1]}")
    torch.set_num_threads(threads)
    assert ga._kernel_threads(torch.empty(shape)) == threads
    calls = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        grad_x, inputs, upstream = batch_norm_input_grad(torch.float32, shape)
        grads = torch.autograd.grad(grad_x, inputs, upstream)
    backward = torch.ops.aten.native_batch_norm_backward.default
    assert (backward in calls) == (shape[2] * shape[3] > 4)  # only the forward's, on big maps
    expected_x, inputs64, upstream64 = batch_norm_input_grad(torch.float64, shape)
    expected = torch.autograd.grad(expected_x, inputs64, upstream64)
    for got, want in zip((grad_x, *grads), (expected_x, *expected), strict=True):
        assert got.dtype == torch.float32
        assert_close_to_float32_rounding(got, want)


def test_batch_norm_second_derivative_stays_differentiable_under_create_graph():
    """A backward with create_graph (a third derivative) takes the torch path: its results
    have a graph, where the kernel's would not."""
    grad_x, inputs, upstream = batch_norm_input_grad(torch.float32, (4, 3, 2, 2))
    grads = torch.autograd.grad(grad_x, inputs, upstream, create_graph=True)
    assert all(g.requires_grad for g in grads)
    expected = torch.autograd.grad(grad_x, inputs, upstream, retain_graph=True)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_without_a_compiler_batch_norm_runs_on_torch_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    ga.BATCH_NORM_KERNEL.reset()
    try:
        assert ga.BATCH_NORM_KERNEL.load() == (
            None,
            "torch operations (no C kernel: no C compiler (cc, or $CC) on PATH)",
        )
        grad_x, inputs, upstream = batch_norm_input_grad(torch.float32, (4, 3, 2, 2))
        grads = torch.autograd.grad(grad_x, inputs, upstream)
    finally:
        ga.BATCH_NORM_KERNEL.reset()
    expected_x, inputs64, upstream64 = batch_norm_input_grad(torch.float64, (4, 3, 2, 2))
    expected = torch.autograd.grad(expected_x, inputs64, upstream64)
    for got, want in zip((grad_x, *grads), (expected_x, *expected), strict=True):
        assert_close_to_float32_rounding(got, want)


def test_the_parameters_backward_skips_the_images_gradient(monkeypatch):
    """After dL/dx (create_graph), the backward for the parameters alone (train_step's
    ``inputs=``) computes no gradient for the images: the first convolution's input gradient is
    the costliest term there. The parameters' gradients are those of a full backward."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3, padding=1),
    ).double()  # fmt: skip
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    seen = []

    class RecordConvolutionBackward(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                seen.append((tuple(args[1].shape), args[-1][0]))  # (input shape, input grad?)
            return func(*args, **(kwargs or {}))

    # main.train_step with --ga: the images' gradient once, for dL/dx only (ResNet's stem takes
    # the polyphase path, which does not call convolution_backward).
    model, batch = small_real_model("tirg"), make_batch(size=32)
    optimizer = main.build_optimizer(ga_args("--ga"), model)
    input_grads = []

    def record(grad_output, x, *conf):
        input_grads.append(tuple(x.shape))
        return conv2d_input_grad(grad_output, x, *conf)

    conv2d_input_grad = ga._conv2d_input_grad
    monkeypatch.setattr(ga, "_conv2d_input_grad", record)
    with RecordConvolutionBackward():
        main.train_step(model, optimizer, batch, ga_args("--ga"), torch.device("cpu"), 0)
    shape = (4, 3, 32, 32)
    assert input_grads.count(shape) + sum(w for s, w in seen if s == shape) == 1

    grads = []
    for inputs in (None, list(net.parameters())):
        net.zero_grad()
        x = images.clone().requires_grad_()
        with ga.fast_double_backward():
            loss = net(x).pow(2).mean()
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        seen.clear()
        with RecordConvolutionBackward():
            (loss + ga.adversarial_gradient_augmentation(grad, 0.1)).backward(inputs=inputs)
        grads.append([p.grad.clone() for p in net.parameters()])
        image_gradients = sum(wanted for shape, wanted in seen if shape == images.shape)
        assert image_gradients == (1 if inputs is None else 0)
        assert (x.grad is None) == (inputs is not None)
    for full, parameters_only in zip(*grads):
        torch.testing.assert_close(parameters_only, full, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "shape, conf, polyphase",
    [
        ((2, 3, 16, 16), dict(kernel_size=7, stride=2, padding=3), True),  # ResNet's stem
        ((2, 3, 17, 15), dict(kernel_size=7, stride=2, padding=3), True),  # odd sizes
        ((2, 1, 17, 19), dict(kernel_size=(7, 5), stride=(3, 2), padding=(1, 2)), True),
        ((1, 2, 9, 9), dict(kernel_size=(5, 7), stride=2, padding=0), True),
        ((1, 4, 13, 12), dict(kernel_size=7, stride=3, padding=4), True),  # padding > stride
        ((2, 3, 16, 16), dict(kernel_size=3, stride=2, padding=1), False),  # few taps
        ((2, 6, 16, 16), dict(kernel_size=7, stride=2, padding=3), False),  # many channels
        ((2, 3, 9, 9), dict(kernel_size=5, stride=2, padding=2, dilation=2), False),
        ((2, 3, 9, 9), dict(kernel_size=3, stride=1, padding=1), False),
    ],
)
def test_conv2d_input_grad_equals_the_built_in(shape, conf, polyphase):
    """dL/dx of a convolution, by the polyphase correlation (image stems) or oneDNN."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 5, bias=False, **conf).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    grad_output = torch.randn(out.shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(out, x, grad_output)
    calls = []

    class RecordConvolutionBackward(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    pairs = [list(conv.stride), list(conv.padding), list(conv.dilation)]
    with RecordConvolutionBackward():
        got = ga._conv2d_input_grad(grad_output, x.detach(), conv.weight.detach(), *pairs, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (torch.ops.aten.convolution_backward.default not in calls) == polyphase


def test_adversarial_term_rejects_an_unknown_norm():
    with pytest.raises(ValueError, match="q must be one of"):
        ga.adversarial_gradient_augmentation(torch.ones(2, 3), 1e-6, 3.0)


@pytest.mark.parametrize("input_kind", ["pixels", "features"])
def test_training_step_adversarial_term_against_a_direct_computation(input_kind):
    torch.manual_seed(3)
    model = TinyComposer().eval()
    batch = make_batch()
    args = ga_args("--sim_weight", "0.01", "--ga_adv_eps", "0.02", "--ga_adv_q", "1",
                   "--ga_adv_input", input_kind)  # fmt: skip
    terms = main.compute_loss_terms(model, batch, args, torch.device("cpu"))
    assert set(terms) == {"ce", "aux", "sim", "ga_adv"}

    source = torch_function.normalize_images(batch["source_img_data"]).requires_grad_()
    target = torch_function.normalize_images(batch["target_img_data"])
    out = model(source, batch["mod"], target)
    wrt = source if input_kind == "pixels" else out["source_features"]
    (grad,) = torch.autograd.grad(reference_data_loss(out, args), wrt)
    per_sample = (len(grad) * grad).reshape(len(grad), -1).abs().sum(dim=1)
    torch.testing.assert_close(terms["ga_adv"], 0.02 / 2 * per_sample.mean(), rtol=1e-5, atol=0)
    # The term is differentiable w.r.t. the weights (second derivatives, not a constant).
    (weight_grad,) = torch.autograd.grad(terms["ga_adv"], model.conv.weight)
    assert weight_grad.abs().sum() > 0


# --------------------------------------------------------------------------- L_GA^I


def test_isotropic_noise_is_a_pure_function_of_seed_and_iteration():
    params = [torch.zeros(5, 3), torch.zeros(7)]

    def draw(seed, iteration, kind="gaussian"):
        noise = ga.draw_isotropic_noise(params, kind, seed, iteration)
        return torch.cat([r.flatten() for r in noise])

    assert torch.equal(draw(0, 5), draw(0, 5))  # every rank, and a resumed run, draws this
    assert not torch.equal(draw(0, 5), draw(0, 6))  # redrawn every step
    assert not torch.equal(draw(0, 5), draw(1, 5))
    torch.manual_seed(0)
    a = draw(0, 5)
    torch.manual_seed(1)
    assert torch.equal(a, draw(0, 5))  # independent of the global RNG
    torch.set_num_threads(3)  # drawn in parallel on CPU: the same numbers with any thread count
    params[:] = [torch.zeros(300, 7), torch.zeros(50), torch.zeros(2, 3, 4), torch.zeros(9)]
    for kind in ga.ISOTROPIC_NOISE:
        parallel = draw(2, 3, kind)
        torch.set_num_threads(1)
        assert torch.equal(parallel, draw(2, 3, kind))
        torch.set_num_threads(3)


def test_isotropic_gradient_noise_is_the_same_with_any_thread_count():
    shapes = [(300, 7), (50,), (2, 3, 4), (70_001,)]
    grads = {}
    for threads in (1, 3):
        torch.set_num_threads(threads)
        params = [torch.nn.Parameter(torch.ones(shape)) for shape in shapes]
        for p in params[:-1]:
            p.grad = torch.full_like(p, 0.5)  # the last one has no gradient yet
        for kind in ga.ISOTROPIC_NOISE:
            ga.add_isotropic_gradient_noise(params, 0.1, kind, "sum", 4, 9)
        grads[threads] = [p.grad for p in params]
    for one, three in zip(grads[1], grads[3]):
        assert torch.equal(one, three)


def test_isotropic_noise_distributions():
    big = [torch.zeros(400, 500), torch.zeros(1000)]
    gaussian = ga.draw_isotropic_noise(big, "gaussian", 0, 0)[0]
    assert abs(gaussian.mean().item()) < 0.01 and gaussian.var().item() == pytest.approx(
        1, abs=0.02
    )
    uniform = ga.draw_isotropic_noise(big, "uniform", 0, 0)[0]
    assert uniform.abs().max().item() <= math.sqrt(3)
    assert uniform.var().item() == pytest.approx(1, abs=0.02)
    sphere = ga.draw_isotropic_noise(big, "sphere", 0, 0, [1.0, 2.0])
    assert sphere[0].norm().item() == pytest.approx(math.sqrt(200_000), rel=1e-5)
    assert sphere[1].norm().item() == pytest.approx(2 * math.sqrt(1000), rel=1e-5)
    with pytest.raises(ValueError, match="noise must be one of"):
        ga.draw_isotropic_noise(big, "laplace", 0, 0)


@pytest.mark.parametrize("kind", ga.ISOTROPIC_NOISE)
@pytest.mark.parametrize("scale", ga.ISOTROPIC_SCALE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_isotropic_gradient_noise_gives_the_loss_forms_update(kind, scale, dtype):
    """SGD with momentum and weight decay, three steps: gradient noise == gamma * <r, theta>.

    float32 is the C kernel's fused path (draw, add and dot in one pass), float64 the chunked
    one; both must give the loss form's update."""
    torch.manual_seed(4)
    loss_form = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).to(dtype)
    exact = dtype == torch.float64
    noise_form = copy.deepcopy(loss_form)
    unused = [torch.nn.Parameter(torch.randn(3, dtype=dtype)) for _ in range(2)]
    params_loss = [*loss_form.parameters(), unused[0]]  # a parameter without any gradient
    params_noise = [*noise_form.parameters(), unused[1]]
    unused[1].data.copy_(unused[0].data)
    optimizers = [
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
        for params in (params_loss, params_noise)
    ]
    x, y = torch.randn(6, 3, dtype=dtype), torch.randn(6, 2, dtype=dtype)
    gamma = 0.3
    for iteration in range(3):
        # loss form
        stds = [gamma / p.numel() if scale == "mean" else gamma for p in params_loss]
        r = ga.draw_isotropic_noise(params_loss, kind, 7, iteration)
        expected_value = sum(s * (ri * p).sum() for s, ri, p in zip(stds, r, params_loss))
        loss = F.mse_loss(loss_form(x), y)
        iso = ga.isotropic_gradient_augmentation_loss(params_loss, r, gamma, scale)
        optimizers[0].zero_grad()
        (loss + iso).backward()
        optimizers[0].step()
        # gradient-noise form
        optimizers[1].zero_grad()
        F.mse_loss(noise_form(x), y).backward()
        value = ga.add_isotropic_gradient_noise(params_noise, gamma, kind, scale, 7, iteration)
        optimizers[1].step()
        assert value.item() == pytest.approx(iso.item(), rel=1e-10 if exact else 1e-5, abs=1e-14)
        assert iso.item() == pytest.approx(expected_value.item(), rel=1e-12 if exact else 1e-6)
        for a, b in zip(params_loss, params_noise):
            torch.testing.assert_close(a, b, rtol=1e-12 if exact else 1e-6, atol=1e-14)
    assert not torch.equal(unused[1], torch.zeros(3))  # the unused parameter moved by gamma*r


def sgd_setup(seed=3, **sgd):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(50, 300), torch.nn.Tanh(), torch.nn.Linear(300, 7))
    groups = [
        {"params": list(net[0].parameters()), "lr": 0.1},
        {"params": list(net[2].parameters()), "lr": 0.01},
    ]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.01, **sgd)
    return net, optimizer


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_fused_noise_and_sgd_step_equals_noise_then_sgd(kind):
    """Three steps (the first creates the momentum buffers), two groups with their own lr, one
    parameter without a gradient: the same gradients, buffers and parameters, bit for bit, as
    the noise added and torch's SGD step taken after it (the kernel rounds as torch does)."""
    if isotropic_noise.kernel_status().startswith("torch"):
        pytest.skip(isotropic_noise.kernel_status())
    x, y = torch.randn(20, 50, generator=torch.Generator().manual_seed(0)), torch.randn(20, 7)
    runs = []
    for fused in (False, True):
        net, optimizer = sgd_setup()
        params = list(net.parameters())
        values = []
        for iteration in range(3):
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(net(x), y).backward()
            if iteration == 1:
                params[3].grad = None  # no gradient: it gets the noise alone, and is stepped
            if fused:
                value = ga.isotropic_sgd_step(optimizer, params, 0.5, kind, "sum", 7, iteration)
                assert value is not None
            else:
                value = ga.add_isotropic_gradient_noise(params, 0.5, kind, "sum", 7, iteration)
                optimizer.step()
            values.append(value.item())
        state = [optimizer.state[p]["momentum_buffer"] for p in params]
        runs.append((values, [p.detach().clone() for p in params], [p.grad for p in params], state))
    (values, *tensors), (fused_values, *fused_tensors) = runs
    assert fused_values == pytest.approx(values, rel=1e-6)
    for unfused, fused in zip(tensors, fused_tensors, strict=True):
        for a, b in zip(unfused, fused, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "case",
    [
        "nesterov",
        "dampening",
        "no_momentum",
        "sphere",
        "float64",
        "unlisted",
        "foreign",
        "switched_off",
    ],
)
def test_fused_step_declines_what_it_does_not_handle(case, monkeypatch):
    sgd = {"nesterov": {"nesterov": True}, "dampening": {"dampening": 0.1}}.get(case, {})
    net, optimizer = sgd_setup(**sgd)
    if case == "no_momentum":
        for group in optimizer.param_groups:
            group["momentum"] = 0.0
    if case == "float64":
        net.double()
    if case == "switched_off":
        monkeypatch.setenv(isotropic_noise.ENV_SWITCH, "0")
    params = list(net.parameters())
    F.mse_loss(
        net(torch.randn(4, 50, dtype=params[0].dtype)), torch.zeros(4, 7, dtype=params[0].dtype)
    ).backward()
    if case == "unlisted":  # the optimizer holds a parameter with a gradient that gets no noise
        params = params[:-1]
    if case == "foreign":  # a parameter would get noise that no optimizer step applies
        params = [*params, torch.nn.Parameter(torch.zeros(3))]
        params[-1].grad = torch.zeros(3)
    before = [p.detach().clone() for p in params] + [p.grad.clone() for p in params]
    kind = "sphere" if case == "sphere" else "gaussian"
    assert ga.isotropic_sgd_step(optimizer, params, 0.5, kind, "sum", 0, 0) is None
    after = [p.detach() for p in params] + [p.grad for p in params]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing was touched
    assert not optimizer.state


def test_training_step_with_isotropic_ga_takes_the_fused_step_on_cpu(monkeypatch):
    """main.train_step with L_GA^I takes the fused step where the kernel is built, and the
    unfused one without it (TIRG_GA_NOISE_KERNEL=0); both give the same parameters and value."""
    if isotropic_noise.kernel_status().startswith("torch"):
        pytest.skip(isotropic_noise.kernel_status())
    args = ga_args("--ga_iso_gamma", "0.3", "--ga_iso_scale", "sum")
    real, taken = ga.isotropic_sgd_step, []

    def spy(*arguments):
        result = real(*arguments)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(ga, "isotropic_sgd_step", spy)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv(isotropic_noise.ENV_SWITCH, switch)
        model = small_real_model("tirg")
        optimizer = main.build_optimizer(args, model)
        cpu = torch.device("cpu")
        values, params = [], []
        for i in range(2):  # the first step creates the momentum buffers, the second uses them
            main.seed_step(args.seed, 0, i)  # dropout
            values.append(main.train_step(model, optimizer, make_batch(), args, cpu, i))
            params.append([p.detach().clone() for p in model.parameters()])
        results.append((values, params))
    assert taken == [True, True, False, False]
    (fused_values, fused_params), (values, params) = results
    for a, b in zip(fused_values, values):  # float32 dot products with much cancellation
        assert a["ga_iso"] == pytest.approx(b["ga_iso"], rel=1e-4)
    # The kernel's noise differs from torch's functions in the last bits; after one step that
    # is all, after two it has gone through a forward and backward pass (batch norm of 4).
    for step, atol in enumerate((3e-7, 2e-5)):
        for a, b in zip(fused_params[step], params[step]):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


# --------------------------------------------------------------------------- baselines


def test_l1_and_l2_against_plain_loops():
    torch.manual_seed(5)
    params = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    values = [v for p in params for v in p.flatten().tolist()]
    assert ga.l1_regularization(params).item() == pytest.approx(sum(abs(v) for v in values))
    assert ga.l2_regularization(params).item() == pytest.approx(sum(v * v for v in values))


def test_l1_l2_terms_of_the_training_step_cover_every_trainable_parameter():
    model = TinyComposer()
    model.chars.weight.requires_grad_(False)  # frozen: not penalized
    args = ga_args("--l1_weight", "1e-3", "--l2_weight", "1e-2")
    terms = main.compute_loss_terms(model, make_batch(), args, torch.device("cpu"))
    trainable = [p for n, p in model.named_parameters() if n != "chars.weight"]
    assert terms["l1"].item() == pytest.approx(sum(p.abs().sum().item() for p in trainable))
    assert terms["l2"].item() == pytest.approx(sum(p.pow(2).sum().item() for p in trainable))
    total = main.total_loss(terms, args)
    plain = terms["ce"] + terms["aux"] + 1e-3 * terms["l1"] + 1e-2 * terms["l2"]
    torch.testing.assert_close(total, plain)


def test_fgsm_term_against_a_direct_computation():
    torch.manual_seed(6)
    model = TinyComposer().eval()
    batch = make_batch()
    args = ga_args("--fgsm_eps", "0.05", "--sim_weight", "0.01")
    terms = main.compute_loss_terms(model, batch, args, torch.device("cpu"))
    assert set(terms) == {"ce", "aux", "sim", "fgsm"}

    source = torch_function.normalize_images(batch["source_img_data"]).requires_grad_()
    target = torch_function.normalize_images(batch["target_img_data"])
    clean = reference_data_loss(model(source, batch["mod"], target), args)
    (grad,) = torch.autograd.grad(clean, source)
    adversarial = source.detach() + 0.05 * grad.sign()
    expected = reference_data_loss(model(adversarial, batch["mod"], target), args)
    torch.testing.assert_close(terms["fgsm"], expected, rtol=1e-5, atol=0)
    assert terms["fgsm"].item() > clean.item()  # the FGSM image is worse for the model
    torch.testing.assert_close(
        main.total_loss(terms, args), 0.5 * (clean + expected), rtol=1e-5, atol=0
    )


# --------------------------------------------------------------------------- the training step


def small_real_model(name, seed=0):
    torch.manual_seed(seed)
    texts = ["make circle small", "add red cube", "remove blue object", "make gray large"]
    encoder = text_model.TextLSTMModel(texts, word_embed_dim=16, lstm_hidden_dim=16)
    return img_text_composition_models.MODELS[name](encoder, embed_dim=16, pretrained=False)


def baseline_step(model, optimizer, batch, loss_name):
    """The plain step, written out: forward, main loss (+ model extras), backward, SGD."""
    source = torch_function.normalize_images(batch["source_img_data"])
    target = torch_function.normalize_images(batch["target_img_data"])
    out = model(source, batch["mod"], target)
    loss = main.LOSSES[loss_name](out["query"], out["target"])
    for value in out["extra_losses"].values():
        loss = loss + value
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("loss_name", sorted(main.LOSSES))
def test_all_weights_zero_is_bit_identical_to_the_baseline_step(loss_name):
    batch = make_batch(size=16)
    args = ga_args("--loss", loss_name, "--ga", "--sim_weight", "0", "--ga_adv_eps", "0",
                   "--ga_iso_gamma", "0", "--fgsm_eps", "0", "--l1_weight", "0",
                   "--l2_weight", "0")  # fmt: skip
    reference = small_real_model("tirg")
    stepped = copy.deepcopy(reference)
    optimizers = [main.build_optimizer(args, m) for m in (reference, stepped)]
    torch.manual_seed(11)  # dropout and triplet sampling draw the same numbers
    baseline_step(reference, optimizers[0], batch, loss_name)
    torch.manual_seed(11)
    values = main.train_step(stepped, optimizers[1], batch, args, torch.device("cpu"), 0)
    assert set(values) == {main.LOSS_TERM[loss_name], "total"}
    for (name, a), b in zip(reference.named_parameters(), stepped.parameters()):
        assert torch.equal(a, b), name
    if loss_name == "soft_triplet":
        return
    # ...and the comparison can fail: a GA term changes the step.
    args = ga_args("--loss", loss_name, "--ga_adv_eps", "1e-3", "--ga_adv_input", "features")
    torch.manual_seed(11)
    baseline_step(reference, optimizers[0], batch, loss_name)
    torch.manual_seed(11)
    main.train_step(stepped, optimizers[1], batch, args, torch.device("cpu"), 1)
    assert not all(torch.equal(a, b) for a, b in zip(reference.parameters(), stepped.parameters()))


FAST_MODEL_CASES = {("tirg", "pixels"), ("tirg_lastconv", "features")}
MODEL_CASES = [
    pytest.param(
        name, input_kind, marks=() if (name, input_kind) in FAST_MODEL_CASES else pytest.mark.slow
    )
    for name in sorted(img_text_composition_models.MODELS)
    for input_kind in ("pixels", "features")
]


@pytest.mark.parametrize("model_name, input_kind", MODEL_CASES)
def test_ga_step_runs_on_every_model(model_name, input_kind):
    batch = make_batch(size=16)
    loss_name = "soft_triplet" if input_kind == "features" else "batch_based_classification"
    model = small_real_model(model_name)
    args = ga_args("--ga", "--ga_adv_eps", "1e-3", "--ga_adv_input", input_kind,
                   "--loss", loss_name)  # fmt: skip
    optimizer = main.build_optimizer(args, model)
    before = [p.detach().clone() for p in model.parameters()]
    values = main.train_step(model, optimizer, batch, args, torch.device("cpu"), 3)
    assert {main.LOSS_TERM[loss_name], "sim", "ga_adv", "ga_iso", "total"} <= set(values)
    assert all(math.isfinite(v) for v in values.values())
    if model_name != "textonly":  # textonly ignores the image: L_GA^A is 0
        assert values["ga_adv"] > 0
    # L_GA^I reaches every trainable parameter, even one the loss does not use.
    assert all(p.grad is not None for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("input_kind", ["pixels", pytest.param("features", marks=pytest.mark.slow)])
def test_ga_and_fgsm_step_under_bf16_autocast(input_kind):
    model = small_real_model("tirg")
    args = ga_args("--ga", "--ga_adv_eps", "1e-3", "--ga_adv_input", input_kind,
                   "--precision", "bf16", "--fgsm_eps", "0.01")  # fmt: skip
    optimizer = main.build_optimizer(args, model)
    values = main.train_step(model, optimizer, make_batch(size=16), args, torch.device("cpu"), 0)
    assert all(math.isfinite(v) for v in values.values()), values
    assert values["ga_adv"] > 0 and values["fgsm"] > 0


# --------------------------------------------------------------------------- flags and the run


def test_ga_flags():
    args = ga_args("--ga")
    assert (args.sim_weight, args.ga_adv_eps, args.ga_iso_gamma) == (1e-3, 1e-6, 0.01)
    assert (args.ga_adv_q, args.ga_adv_input) == (1.0, "pixels")
    assert (args.ga_iso_noise, args.ga_iso_scale) == ("gaussian", "mean")
    assert (args.fgsm_eps, args.l1_weight, args.l2_weight) == (0.0, 0.0, 0.0)
    off = ga_args()
    assert (off.sim_weight, off.ga_adv_eps, off.ga_iso_gamma) == (0.0, 0.0, 0.0)
    args = ga_args("--ga", "--ga_adv_eps", "0", "--ga_adv_q", "inf", "--ga_iso_gamma", "0.1")
    assert (args.sim_weight, args.ga_adv_eps, args.ga_iso_gamma) == (1e-3, 0.0, 0.1)
    assert args.ga_adv_q == math.inf
    for bad in (["--ga_adv_q", "3"], ["--ga_iso_gamma", "-1"], ["--fgsm_eps", "nan"],
                ["--ga_iso_noise", "laplace"], ["--ga_adv_input", "text"]):  # fmt: skip
        with pytest.raises(SystemExit):
            ga_args(*bad)


def small_run(tmp_path, *extra):
    return [
        "--dataset", "css3d", "--synthetic_size", "small",
        "--data_dir", str(tmp_path.parent / "shared_data"), "--log_dir", str(tmp_path / "logs"),
        "--num_iters", "4", "--eval_every", "2", "--train_eval_queries", "50",
        "--loader_num_workers", "0", "--batch_size", "8", "--log_every", "1", *extra,
    ]  # fmt: skip


def test_ga_run_logs_every_term(tmp_path):
    result = main.main(small_run(tmp_path, "--ga", "--l1_weight", "1e-6", "--l2_weight", "1e-6"))
    assert result is not None
    (run_name,) = os.listdir(tmp_path / "logs")
    run_dir = tmp_path / "logs" / run_name
    scalars = read_scalars(run_dir)
    for term in ("ce", "sim", "ga_adv", "ga_iso", "l1", "l2", "total"):
        values = scalars[f"train/{term}"]
        assert len(values) == 4 and all(math.isfinite(v) for v in values), term
    assert all(v > 0 for v in scalars["train/ga_adv"])
    with open(run_dir / "args.json") as f:
        saved = json.load(f)
    assert saved["ga_adv_eps"] == 1e-6 and saved["ga_iso_scale"] == "mean"


def test_a_run_says_when_the_c_kernels_are_off(tmp_path, capsys, monkeypatch):
    """With the kernels switched off, --ga on CPU runs on torch operations and says so."""
    monkeypatch.setenv(isotropic_noise.ENV_SWITCH, "0")
    monkeypatch.setenv("TIRG_GA_BN_KERNEL", "0")
    args = small_run(tmp_path, "--ga")
    args[args.index("--num_iters") + 1] = "1"
    assert main.main(args) is not None
    out = capsys.readouterr().out
    assert (
        f"note: L_GA^I's noise comes from torch operations ({isotropic_noise.ENV_SWITCH}=0)" in out
    )
    assert "batch norm second derivatives come from torch operations (TIRG_GA_BN_KERNEL=0)" in out
    monkeypatch.delenv("TIRG_GA_BN_KERNEL")
    monkeypatch.delenv(isotropic_noise.ENV_SWITCH)
    if ga.BATCH_NORM_KERNEL.load()[0] is not None and isotropic_noise.KERNEL.load()[0] is not None:
        assert main.main(small_run(tmp_path / "built", "--ga")) is not None
        assert "note: L_GA" not in capsys.readouterr().out  # built: nothing to say


def test_a_non_finite_term_stops_the_run_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(small_run(tmp_path, "--ga_adv_eps", "1e300"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "iteration 0" in err and "'ga_adv'" in err
