"""Gradient Augmentation: L_S, L_GA^A, L_GA^I, the FGSM/L1/L2 baselines and their training step."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from tb_events import read_scalars

import distributed
import gradient_augmentation as ga
import img_text_composition_models
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


def test_adversarial_term_rejects_an_unknown_norm():
    with pytest.raises(ValueError, match="q must be one of"):
        ga.adversarial_gradient_augmentation(torch.ones(2, 3), 1e-6, 3.0)


def sgd_step(model, batch, args, iteration=0):
    """``main.train_step`` with plain SGD at lr 1: its values, and the gradient it stepped by."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    values = main.train_step(model, optimizer, batch, args, torch.device("cpu"), iteration)
    stepped = [b - p.detach() for b, p in zip(before, params)]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return values, stepped


def assert_gradients(stepped, total, model, rtol=1e-5, atol=1e-7):
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(total, params, allow_unused=True, retain_graph=True)
    for got, want in zip(stepped, expected):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want,
                                   rtol=rtol, atol=atol)  # fmt: skip


@pytest.mark.parametrize("input_kind", ["pixels", "features"])
def test_training_step_adversarial_term_against_a_direct_computation(input_kind):
    torch.manual_seed(3)
    model = TinyComposer().eval()
    batch = make_batch()
    args = ga_args("--sim_weight", "0.01", "--ga_adv_eps", "0.02", "--ga_adv_q", "1",
                   "--ga_adv_input", input_kind)  # fmt: skip
    values, stepped = sgd_step(model, batch, args)
    assert set(values) == {"ce", "aux", "sim", "ga_adv", "total", "grad_norm"}

    source = torch_function.normalize_images(batch["source_img_data"]).requires_grad_()
    target = torch_function.normalize_images(batch["target_img_data"])
    out = model(source, batch["mod"], target)
    wrt = source if input_kind == "pixels" else out["source_features"]
    loss = reference_data_loss(out, args)
    (grad,) = torch.autograd.grad(loss, wrt, create_graph=True)
    per_sample = (len(grad) * grad).reshape(len(grad), -1).abs().sum(dim=1)
    ga_adv = 0.02 / 2 * per_sample.mean()
    torch.testing.assert_close(values["ga_adv"], ga_adv.detach(), rtol=1e-5, atol=0)
    # The step follows the gradient of L + L_GA^A: autograd's double backward, not a constant.
    # (stepped = theta - (theta - g) in float32 carries theta's rounding: atol 1e-6)
    assert_gradients(stepped, loss + ga_adv, model, atol=1e-6)
    (weight_grad,) = torch.autograd.grad(ga_adv, model.conv.weight, retain_graph=True)
    assert weight_grad.abs().sum() > 0


def ga_code_gpenalty(inputs, loss, lam, q):
    """The public GA code's ``gPenalty`` (its main.py), as written there."""
    bs, c, h, w = inputs.size()
    d_in = c * h * w
    g = torch.autograd.grad(loss, inputs, create_graph=True)[0] * bs
    g = g.view(bs, -1)
    qnorms = g.norm(q, 1).mean()
    lam = lam * math.pow(d_in, 1.0 - 1.0 / q)
    return lam * qnorms.mean() / 2.0


def test_training_step_adversarial_term_equals_the_ga_codes_gpenalty():
    """--ga_adv_eps 1e-6 --ga_adv_q 1 (the --ga defaults) is gPenalty(img1, loss, lam=1e-6, q=1)
    on the same graph: the value train_step logs, and the term's own parameter gradient."""
    torch.manual_seed(3)
    model = TinyComposer().eval()
    batch = make_batch()
    args = ga_args("--ga", "--ga_iso_gamma", "0")
    assert (args.ga_adv_eps, args.ga_adv_q, args.sim_weight) == (1e-6, 1.0, 1e-3)
    values, stepped = sgd_step(model, batch, args)
    source = torch_function.normalize_images(batch["source_img_data"]).requires_grad_()
    target = torch_function.normalize_images(batch["target_img_data"])
    loss = reference_data_loss(model(source, batch["mod"], target), args)
    penalty = ga_code_gpenalty(source, loss, lam=1e-6, q=1)
    (x_grad,) = torch.autograd.grad(loss, source, create_graph=True)
    ours = ga.adversarial_gradient_augmentation(x_grad, args.ga_adv_eps, args.ga_adv_q)
    torch.testing.assert_close(ours, penalty, rtol=1e-6, atol=0)
    assert_gradients(
        [g for g in torch.autograd.grad(ours, list(model.parameters()), retain_graph=True)],
        penalty, model, rtol=1e-5, atol=1e-14,
    )  # fmt: skip
    torch.testing.assert_close(values["ga_adv"], penalty.detach(), rtol=1e-5, atol=0)
    assert_gradients(stepped, loss + penalty, model)


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
    sphere = ga.draw_isotropic_noise(big, "sphere", 0, 0)
    assert sphere[0].norm().item() == pytest.approx(math.sqrt(200_000), rel=1e-5)
    assert sphere[1].norm().item() == pytest.approx(math.sqrt(1000), rel=1e-5)
    with pytest.raises(ValueError, match="noise must be one of"):
        ga.draw_isotropic_noise(big, "laplace", 0, 0)


@pytest.mark.parametrize("kind", ga.ISOTROPIC_NOISE)
@pytest.mark.parametrize("scale", ga.ISOTROPIC_SCALE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_isotropic_gradient_noise_gives_the_loss_forms_update(kind, scale, dtype):
    """SGD with momentum and weight decay, three steps: gradient noise == gamma * <r, theta>.

    Both dtypes must give the loss form's update."""
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


def ga_code_random_grad(model, loss_value, noise, drift=True, cumulative=True):
    """The public GA code's ``--random_grad`` loop (training_1_iter), with torch.randn_like(p)
    replaced by the given draws; ``drift``/``cumulative`` False drop its mean(p) term / its
    running sum, the two parts --ga_iso_drift and --ga_iso_cumulative switch."""
    regularization_loss = 0
    for (_name, parms), r in zip(model.named_parameters(), noise, strict=True):
        term = (r * parms).mean().mean().mean() if r is not None else 0
        if drift:
            term = term + parms.mean().mean().mean()
        regularization_loss = (regularization_loss if cumulative else 0) + term
        loss_value = loss_value + 0.01 * regularization_loss
    return loss_value


@pytest.mark.parametrize(
    "flags, noise, drift, cumulative",
    [
        ([], True, False, False),  # the paper's form
        (["--ga_iso_form", "public"], True, True, True),
        (["--ga_iso_form", "public", "--ga_iso_noise", "none"], False, True, True),
        (["--ga_iso_form", "public", "--ga_iso_drift", "off"], True, False, True),
        (["--ga_iso_cumulative", "on"], True, False, True),
        (["--ga_iso_form", "public", "--ga_iso_cumulative", "off"], True, True, False),
    ],
)
def test_isotropic_forms_equal_the_ga_codes_loop(flags, noise, drift, cumulative):
    """train_step with --ga_iso_gamma 0.01 and each form steps by the gradient of L plus the GA
    code's loop over named_parameters() (its order, counting and drift)."""
    torch.manual_seed(6)
    model = TinyComposer().eval()
    batch = make_batch()
    args = ga_args("--ga_iso_gamma", "0.01", "--seed", "5", *flags)
    values, stepped = sgd_step(model, batch, args, iteration=11)
    params = [p for p in model.parameters() if p.requires_grad]
    draws = ga.draw_isotropic_noise(params, "gaussian", 5, 11) if noise else [None] * len(params)
    source = torch_function.normalize_images(batch["source_img_data"])
    target = torch_function.normalize_images(batch["target_img_data"])
    loss = reference_data_loss(model(source, batch["mod"], target), args)
    literal = ga_code_random_grad(model, loss, draws, drift=drift, cumulative=cumulative)
    torch.testing.assert_close(
        values["ga_iso"].float(), (literal - loss).detach(), rtol=1e-5, atol=1e-7
    )
    # (stepped = theta - (theta - g) in float32 carries theta's rounding: atol 1e-6)
    assert_gradients(stepped, literal, model, atol=1e-6)
    if drift and cumulative:  # the first tensor of N gets the constant 0.01 * N / numel
        n, first = len(params), params[0]
        drift_only = ga_code_random_grad(model, loss, [None] * n) - loss
        (g,) = torch.autograd.grad(drift_only, first)
        torch.testing.assert_close(g, torch.full_like(first, 0.01 * n / first.numel()))


def test_isotropic_form_flags():
    args = ga_args("--ga", "--ga_iso_form", "public")
    assert (args.ga_iso_cumulative, args.ga_iso_drift) == ("on", "on")
    args = ga_args("--ga")
    assert (args.ga_iso_form, args.ga_iso_cumulative, args.ga_iso_drift) == ("paper", "off", "off")
    with pytest.raises(SystemExit):  # nothing left to add
        ga_args("--ga", "--ga_iso_noise", "none")


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
    values, stepped = sgd_step(model, make_batch(), args)
    trainable = [p for n, p in model.named_parameters() if n != "chars.weight"]
    assert values["l1"].item() == pytest.approx(sum(p.abs().sum().item() for p in trainable))
    assert values["l2"].item() == pytest.approx(sum(p.pow(2).sum().item() for p in trainable))
    plain = values["ce"] + values["aux"] + 1e-3 * values["l1"] + 1e-2 * values["l2"]
    torch.testing.assert_close(values["total"], plain)
    source = torch_function.normalize_images(make_batch()["source_img_data"])
    target = torch_function.normalize_images(make_batch()["target_img_data"])
    out = model(source, make_batch()["mod"], target)
    l1 = sum(p.abs().sum() for p in trainable)
    l2 = sum(p.pow(2).sum() for p in trainable)
    assert_gradients(stepped, reference_data_loss(out, args) + 1e-3 * l1 + 1e-2 * l2, model)


def test_fgsm_term_against_a_direct_computation():
    torch.manual_seed(6)
    model = TinyComposer().eval()
    batch = make_batch()
    args = ga_args("--fgsm_eps", "0.05", "--sim_weight", "0.01")
    values, stepped = sgd_step(model, batch, args)
    assert set(values) == {"ce", "aux", "sim", "fgsm", "total", "grad_norm"}

    source = torch_function.normalize_images(batch["source_img_data"]).requires_grad_()
    target = torch_function.normalize_images(batch["target_img_data"])
    clean = reference_data_loss(model(source, batch["mod"], target), args)
    (grad,) = torch.autograd.grad(clean, source, retain_graph=True)
    adversarial = source.detach() + 0.05 * grad.sign()
    expected = reference_data_loss(model(adversarial, batch["mod"], target), args)
    torch.testing.assert_close(values["fgsm"], expected.detach(), rtol=1e-5, atol=0)
    assert values["fgsm"].item() > clean.item()  # the FGSM image is worse for the model
    total = 0.5 * (clean + expected)
    torch.testing.assert_close(values["total"], total.detach(), rtol=1e-5, atol=0)
    assert_gradients(stepped, total, model)


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
    optimizers = [main.build_optimizer(args, m)[0] for m in (reference, stepped)]
    torch.manual_seed(11)  # dropout and triplet sampling draw the same numbers
    baseline_step(reference, optimizers[0], batch, loss_name)
    torch.manual_seed(11)
    values = main.train_step(stepped, optimizers[1], batch, args, torch.device("cpu"), 0)
    assert set(values) == {main.LOSS_TERM[loss_name], "total", "grad_norm"}
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
    optimizer = main.build_optimizer(args, model)[0]
    before = [p.detach().clone() for p in model.parameters()]
    values = main.train_step(model, optimizer, batch, args, torch.device("cpu"), 3)
    assert {main.LOSS_TERM[loss_name], "sim", "ga_adv", "ga_iso", "total"} <= set(values)
    assert all(torch.isfinite(v) for v in values.values())
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
    optimizer = main.build_optimizer(args, model)[0]
    # 32 px: at 16 px ResNet's layer4 gets a 1 x 1 map, where oneDNN's bf16 weight gradient of
    # its stride-2 3 x 3 conv returns non-finite garbage on AMX CPUs (torch 2.14, upstream).
    values = main.train_step(model, optimizer, make_batch(size=32), args, torch.device("cpu"), 0)
    assert all(torch.isfinite(v) for v in values.values()), values
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
    for name in ("bn_weight_norm", "norm_scale"):  # what the public form's drift would shrink
        assert len(scalars[f"train/{name}"]) == 4 and all(v > 0 for v in scalars[f"train/{name}"])
    with open(run_dir / "args.json") as f:
        saved = json.load(f)
    assert saved["ga_adv_eps"] == 1e-6 and saved["ga_iso_scale"] == "mean"


def test_a_non_finite_term_stops_the_run_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(small_run(tmp_path, "--ga_adv_eps", "1e300"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "iteration 0" in err and "'ga_adv'" in err


@pytest.mark.cuda
def test_isotropic_noise_on_cuda_is_a_pure_function_of_seed_and_iteration():
    params = [torch.zeros(300, 7, device="cuda"), torch.zeros(50, device="cuda")]
    for kind in ga.ISOTROPIC_NOISE:
        a = ga.draw_isotropic_noise(params, kind, 2, 3)
        b = ga.draw_isotropic_noise(params, kind, 2, 3)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert all(r.device.type == "cuda" for r in a)
        assert not torch.equal(a[0], ga.draw_isotropic_noise(params, kind, 2, 4)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ga_step_on_cuda_agrees_with_cpu(precision):
    """Every GA term, L_GA^A on pixels by autograd's double backward: the CUDA step's values are
    those of the CPU step (TF32 off; bf16 and fp16 autocast within their rounding)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    args = ga_args("--ga", "--ga_adv_eps", "1e-3", "--precision", precision)
    values = {}
    for device in ("cpu", "cuda"):
        model = small_real_model("tirg").to(device).eval()
        optimizer = main.build_optimizer(args, model)[0]
        scaler = distributed.make_grad_scaler(precision, torch.device(device))
        step = main.train_step(
            model, optimizer, make_batch(size=32), args, torch.device(device), 0, scaler
        )
        values[device] = {k: v.item() for k, v in step.items() if k != "fp16_skipped"}
    tolerance = 1e-3 if precision == "fp32" else 0.1
    for name in ("ce", "sim", "ga_adv", "total"):
        assert values["cuda"][name] == pytest.approx(values["cpu"][name], rel=tolerance), name


def test_scale_norms_against_a_loop_over_the_modules():
    import torchvision

    model = torch.nn.Sequential(torchvision.models.resnet18(), torch.nn.BatchNorm1d(1000))
    model.normalization_layer = torch_function.NormalizationLayer(3.5)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)
    squares = 0.0
    for module in model.modules():
        if type(module).__name__.startswith("BatchNorm"):
            squares += sum(w * w for w in module.weight.flatten().tolist())
    norms = ga.scale_norms(model)
    assert norms["bn_weight_norm"].item() == pytest.approx(math.sqrt(squares), rel=1e-5)
    assert norms["norm_scale"].item() == pytest.approx(model.normalization_layer.norm_s.item())
    assert ga.scale_norms(torch.nn.Linear(2, 2)) == {}
