"""Every composition model at the text dimensions of the encoders (MiniLM 384, LSTM 512, BERT 768),
the cached-feature composition evaluation relies on, and ComposeAE."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from tb_events import read_scalars

import img_text_composition_models as models
import main
import text_model
import torch_function

TEXTS = ["make circle small", "add red circle to top-center", "remove blue object", "make it red"]
TEXT_DIMS = (384, 512, 768)


def lstm(text_dim: int) -> text_model.TextLSTMModel:
    """A real text encoder of any output dimension (small word vectors keep it quick)."""
    return text_model.TextLSTMModel(TEXTS, word_embed_dim=16, lstm_hidden_dim=text_dim)


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    return torch_function.normalize_images(pixels)


def texts(batch: int) -> list[str]:
    return [TEXTS[i % len(TEXTS)] for i in range(batch)]


def scalar_tags(run_dir) -> set[str]:
    return set(read_scalars(run_dir))


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory):
    """The --data_dir shared with tests/test_text_model.py (same path): the small synthetic CSS
    and the MiniLM text-embedding cache are made once per session."""
    path = tmp_path_factory.getbasetemp() / "text_encoder_data"
    path.mkdir(exist_ok=True)
    return path


# The order of named_parameters() in the TIRG and GA codes' models (their modules' registration
# order, the model's own parameter `a` first), in our names: the public L_GA^I form
# (--ga_iso_form public) counts tensors by this order.
PUBLIC_PARAMETER_ORDER = {
    "tirg": ["a", "normalization_layer", "img_model", "text_model", "gated_feature_composer",
             "res_info_composer"],
    "tirg_lastconv": ["a", "normalization_layer", "img_model", "text_model", "mod2d",
                      "mod2d_gate"],
    "composeAE": ["a", "normalization_layer", "img_model", "text_model",
                  "projection_linear.text_mlp", "projection_linear.image_mlp", "mapping_linear",
                  "projection_conv.text_mlp", "projection_conv.image_mlp", "mapping_conv", "conv",
                  "image_decoder", "text_decoder"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLIC_PARAMETER_ORDER))
def test_parameter_order_is_the_public_codes(name):
    model = models.MODELS[name](lstm(16), embed_dim=32)
    groups = PUBLIC_PARAMETER_ORDER[name]
    order = []
    for parameter_name, _ in model.named_parameters():
        group = next(g for g in groups if parameter_name == g or parameter_name.startswith(g + "."))
        if not order or order[-1] != group:
            order.append(group)
    assert order == groups
    resnet = [n for n, _ in model.img_model.named_parameters()]
    assert resnet[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert resnet[-2:] == ["fc.0.weight", "fc.0.bias"]


@pytest.mark.parametrize("text_dim", TEXT_DIMS)
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_trains_at_every_text_dimension(name, text_dim):
    torch.manual_seed(0)
    embed_dim, batch = 64, 4
    model = models.MODELS[name](lstm(text_dim), embed_dim=embed_dim).train()
    assert model.text_dim == text_dim
    out = model(images(batch, 32), texts(batch), images(batch, 32, seed=1))
    assert out["query"].shape == out["target"].shape == (batch, embed_dim)
    if name == "tirg_lastconv":  # composed from the last feature map, not the pooled feature
        assert out["source_features"].shape == (batch, 512, 1, 1)
    else:
        assert out["source_features"].shape == (batch, embed_dim)
    expected_extra = set(models.ComposeAE.LOSS_WEIGHTS) if name == "composeAE" else set()
    assert set(out["extra_losses"]) == expected_extra
    loss = torch_function.batch_classification_loss(out["query"], out["target"])
    loss = loss + sum(out["extra_losses"].values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    text_grad = grads["text_model.fc_output.1.weight"]
    assert (text_grad is None) == (name == "imgonly")  # the text reaches every other model
    assert grads["img_model.fc.0.weight"] is not None


@pytest.mark.parametrize(
    "name", sorted(n for n, cls in models.MODELS.items() if cls.composes_features)
)
def test_composing_cached_features_equals_compose_img_text_in_eval_mode(name):
    """What evaluation does (encode each image and distinct text once, in other batches, then
    gather rows) must give the queries that compose_img_text gives."""
    torch.manual_seed(0)
    model = models.MODELS[name](lstm(384), embed_dim=64)
    model.train()(images(4, 32), texts(4), images(4, 32, seed=1))  # move BN statistics off init
    model.eval()
    imgs, query_texts = images(6, 32), [TEXTS[i] for i in (2, 0, 2, 3, 1, 0)]
    with torch.no_grad():
        direct = model.compose_img_text(imgs, query_texts)
        gallery = torch.cat([model.extract_img_feature(imgs[i : i + 4]) for i in (0, 4)])
        distinct = sorted(set(query_texts))
        text_features = model.extract_text_feature(distinct)
        rows = torch.tensor([distinct.index(t) for t in query_texts])
        cached = torch.cat(
            [
                model.compose_img_text_features(gallery[i : i + 5], text_features[rows[i : i + 5]])
                for i in (0, 5)
            ]
        )
    assert direct.shape == (6, 64)
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-4)


def test_tirg_lastconv_composes_images_batch_independently_in_eval_mode():
    torch.manual_seed(0)
    model = models.TIRGLastConv(lstm(768), embed_dim=64)
    assert not model.composes_features
    model.train()(images(4, 64), texts(4), images(4, 64, seed=1))
    model.eval()
    imgs = images(5, 64)
    with torch.no_grad():
        whole = model.compose_img_text(imgs, texts(5))
        parts = torch.cat(
            [
                model.compose_img_text(imgs[:2], texts(2)),
                model.compose_img_text(imgs[2:], texts(5)[2:]),
            ]
        )
        by_map = model.compose_feature_map(
            model.feature_map(imgs), model.extract_text_feature(texts(5))
        )
    assert whole.shape == (5, 64)
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(by_map, whole)


# --------------------------------------------------------------------------- ComposeAE


@pytest.mark.parametrize("text_dim", TEXT_DIMS)
@pytest.mark.parametrize("batch", [1, 7, 200])
def test_compose_ae_forward_backward_at_any_batch_size_and_text_dimension(batch, text_dim):
    torch.manual_seed(0)
    model = models.ComposeAE(lstm(text_dim)).train()  # embed_dim 512, as the paper
    # A training batch of one needs a 2x2 last feature map for ResNet's BatchNorm2d; the batch
    # of 200 uses 16x16 images to stay quick (the composition sees only 512-d features).
    size = {1: 64, 7: 32, 200: 16}[batch]
    bn = model.projection_linear.image_mlp[0]
    running_mean = bn.running_mean.clone()
    out = model(images(batch, size), texts(batch), images(batch, size, seed=1))
    assert out["query"].shape == out["target"].shape == out["source_features"].shape
    assert out["query"].shape == (batch, 512)
    losses = out["extra_losses"]
    assert set(losses) == {"decoder_img", "decoder_text", "rot_sym"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    # One sample has no batch statistics: it is normalized with the running ones, untouched.
    assert torch.equal(bn.running_mean, running_mean) == (batch == 1)
    total = torch_function.batch_classification_loss(out["query"], out["target"])
    (total + sum(losses.values())).backward()
    assert model.a.grad[:2].abs().min() > 0  # both branches (linear a[1], conv a[0]) are used
    assert model.text_decoder[-1].weight.grad.shape == (text_dim, text_dim)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compose_ae_extra_losses_are_returned_with_the_public_weights():
    torch.manual_seed(0)
    model = models.ComposeAE(lstm(384), embed_dim=64)
    model.train()(images(4, 32), texts(4), images(4, 32, seed=1))
    model.eval()  # no dropout, fixed BN: the same numbers twice
    src, tgt = images(4, 32), images(4, 32, seed=1)
    with torch.no_grad():
        out = model(src, texts(4), tgt)
        source, target = model.extract_img_feature(src), model.extract_img_feature(tgt)
        text = model.extract_text_feature(texts(4))
        theta = model.compose_img_text_features(source, text)
        back = model.compose_img_text_features(target, text, conjugate=True)
        norm = model.normalization_layer
        expected = {
            "decoder_img": 0.1 * F.mse_loss(model.image_decoder(theta), source),
            "decoder_text": 0.1 * F.mse_loss(model.text_decoder(theta), text),
            "rot_sym": 0.01 * torch_function.batch_classification_loss(norm(back), norm(source)),
        }
    assert models.ComposeAE.LOSS_WEIGHTS == {
        "decoder_img": 0.1,
        "decoder_text": 0.1,
        "rot_sym": 0.01,
    }
    for name, value in expected.items():
        torch.testing.assert_close(out["extra_losses"][name], value)
    torch.testing.assert_close(out["query"], norm(theta))
    soft = models.ComposeAE(lstm(384), embed_dim=64, matching_loss=torch_function.soft_triplet_loss)
    assert soft.matching_loss is torch_function.soft_triplet_loss


def test_rotation_by_a_text_then_by_its_conjugate_is_the_identity():
    torch.manual_seed(0)
    x, delta = torch.randn(5, 64, dtype=torch.float64), 10 * torch.randn(5, 64, dtype=torch.float64)
    real, imag = models.rotate(x, torch.zeros_like(x), delta)
    torch.testing.assert_close(real**2 + imag**2, x**2)  # a rotation keeps each modulus
    back_real, back_imag = models.rotate(real, imag, delta, conjugate=True)
    torch.testing.assert_close(back_real, x)
    torch.testing.assert_close(back_imag, torch.zeros_like(x))
    projection = models.ComplexProjection(64, 384).double().eval()
    phi = projection(x, torch.randn(5, 384, dtype=torch.float64))
    back = models.rotate(phi["real"], phi["imag"], phi["delta"], conjugate=True)
    torch.testing.assert_close(back[0], phi["x"])
    torch.testing.assert_close(back[1], torch.zeros_like(x))


def test_compose_ae_learns_to_undo_a_text_with_its_conjugate():
    """Composing a text and then its conjugate leads back to the source after a few steps on the
    rotational-symmetry loss (from a start where it does not)."""
    torch.manual_seed(0)
    batch, embed_dim = 32, 32
    model = models.ComposeAE(lstm(384), embed_dim=embed_dim)
    source, text = torch.randn(batch, embed_dim), torch.randn(batch, 384)

    def round_trip():
        model.eval()
        with torch.no_grad():
            query = model.compose_img_text_features(source, text)
            back = model.compose_img_text_features(query, text, conjugate=True)
        model.train()
        cosine = F.cosine_similarity(back, source).mean().item()
        nearest = (F.normalize(back) @ F.normalize(source).t()).argmax(1)
        return cosine, (nearest == torch.arange(batch)).float().mean().item()

    cosine_before, found_before = round_trip()
    head = [p for n, p in model.named_parameters() if not n.startswith(("img_", "text_model"))]
    optimizer = torch.optim.Adam(head, lr=3e-3)
    for _ in range(30):
        query = model.compose_img_text_features(source, text)
        loss = model.extra_losses(source, text, query, query)["rot_sym"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cosine_after, found_after = round_trip()
    assert cosine_before < 0.1 and found_before < 0.2
    assert cosine_after > cosine_before + 0.3 and found_after >= 0.75


def test_main_trains_compose_ae_with_the_offline_bert(shared_data_dir, tmp_path):
    argv = [
        "--dataset",
        "css3d",
        "--model",
        "composeAE",
        "--use_bert",
        "True",
        "--num_iters",
        "4",
        "--eval_every",
        "4",
        "--synthetic_size",
        "small",
        "--data_dir",
        str(shared_data_dir),
        "--log_dir",
        str(tmp_path),
        "--train_eval_queries",
        "50",
        "--loader_num_workers",
        "0",
        "--batch_size",
        "8",
    ]
    result = main.main(argv)
    assert 0 <= result["test"]["R@1"] <= result["test"]["R@10"] <= 100
    (run_dir,) = [tmp_path / d for d in os.listdir(tmp_path)]
    with open(run_dir / "args.json") as f:
        args = json.load(f)
    assert (args["text_encoder"], args["use_bert"]) == ("hf", True)
    (cache,) = os.listdir(shared_data_dir / "text_embeddings")
    assert cache.startswith("all-MiniLM-L6-v2-")
    state = torch.load(run_dir / "latest.pt", weights_only=True)
    text_keys = [k for k in state["model"] if k.startswith("text_model")]
    assert text_keys == ["text_model._extra_state"]  # no transformer weights in checkpoints
    assert {"train/decoder_img", "train/decoder_text", "train/rot_sym"} <= scalar_tags(run_dir)


def test_main_trains_compose_ae_with_gradient_augmentation(shared_data_dir, tmp_path):
    argv = [
        "--dataset",
        "css3d",
        "--model",
        "composeAE",
        "--ga",
        "--ga_adv_eps",
        "0.01",
        "--num_iters",
        "2",
        "--eval_every",
        "2",
        "--synthetic_size",
        "small",
        "--data_dir",
        str(shared_data_dir),
        "--log_dir",
        str(tmp_path),
        "--train_eval_queries",
        "20",
        "--loader_num_workers",
        "0",
        "--batch_size",
        "4",
    ]
    result = main.main(argv)
    assert 0 <= result["train"]["M"] <= 100
    (run_dir,) = [tmp_path / d for d in os.listdir(tmp_path)]
    assert {"train/rot_sym", "train/ga_adv", "train/ga_iso", "train/sim"} <= scalar_tags(run_dir)
