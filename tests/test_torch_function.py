import math

import pytest
import torch

import torch_function as tf


def test_normalize_images_matches_totensor_normalize():
    torchvision = pytest.importorskip("torchvision")
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    pipeline = torchvision.transforms.Compose(
        [
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(tf.IMAGENET_MEAN, tf.IMAGENET_STD),
        ]
    )
    expected = torch.stack([pipeline(img.permute(1, 2, 0).numpy()) for img in images])
    torch.testing.assert_close(tf.normalize_images(images), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError):
        tf.normalize_images(images.float())


def test_normalization_layer_scale_and_norm():
    layer = tf.NormalizationLayer(4.0, learn_scale=True)
    x = torch.randn(5, 7)
    y = layer(x)
    torch.testing.assert_close(y.norm(dim=1), torch.full((5,), 4.0))
    assert isinstance(layer.norm_s, torch.nn.Parameter)
    assert not isinstance(tf.NormalizationLayer(2.0, learn_scale=False).norm_s, torch.nn.Parameter)


def test_pairwise_squared_distances_against_loop():
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    d = tf.pairwise_squared_distances(x, y)
    for i in range(4):
        for j in range(5):
            assert math.isclose(d[i, j].item(), ((x[i] - y[j]) ** 2).sum().item(), rel_tol=1e-9)


def test_batch_classification_loss_against_loop_and_gradcheck():
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = tf.batch_classification_loss(q, t)
    expected = 0.0
    for i in range(4):
        logits = [float(q[i].detach() @ t[j].detach()) for j in range(4)]
        expected += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert math.isclose(loss.item(), expected / 4, rel_tol=1e-10)
    assert torch.autograd.gradcheck(tf.batch_classification_loss, (q, t))


def test_sample_soft_triplets_are_valid_and_distinct():
    b = 5
    triplets = tf.sample_soft_triplets(b, per_anchor=3, generator=torch.Generator().manual_seed(0))
    assert triplets.shape == (2 * b * 3, 3)
    for anchor in range(2 * b):
        rows = triplets[triplets[:, 0] == anchor]
        assert len(rows) == 3
        assert (rows[:, 1] == (anchor + b) % (2 * b)).all()
        negatives = rows[:, 2].tolist()
        assert len(set(negatives)) == 3
        assert all(n % b != anchor % b for n in negatives)  # a different label
    # a batch of 2 has only 2 negatives per anchor
    assert tf.sample_soft_triplets(2).shape == (4 * 2, 3)
    with pytest.raises(ValueError, match="at least 2"):
        tf.sample_soft_triplets(1)


def test_soft_triplet_loss_against_plain_loop_and_gradcheck():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    triplets = tf.sample_soft_triplets(4, generator=gen)
    loss = tf.soft_triplet_loss(q, t, triplets)
    features = torch.cat([q, t]).detach()
    expected = 0.0
    for i, j, k in triplets.tolist():  # TIRG's loop
        d_ij = ((features[i] - features[j]) ** 2).sum().item()
        d_ik = ((features[i] - features[k]) ** 2).sum().item()
        expected += math.log(1 + math.exp(d_ij - d_ik))
    assert math.isclose(loss.item(), expected / len(triplets), rel_tol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b: tf.soft_triplet_loss(a, b, triplets), (q, t))


def test_soft_triplet_loss_samples_with_generator():
    q, t = torch.randn(6, 4), torch.randn(6, 4)
    a = tf.soft_triplet_loss(q, t, generator=torch.Generator().manual_seed(1))
    b = tf.soft_triplet_loss(q, t, generator=torch.Generator().manual_seed(1))
    assert a.item() == b.item()
