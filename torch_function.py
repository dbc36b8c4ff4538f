"""Small tensor functions shared by the models and the training loop.

Every loss here takes tensors and returns a scalar tensor; none knows about models or datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float (B, 3, H, W), ImageNet-normalized.

    Equals torchvision's ``ToTensor()`` followed by ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``,
    but runs once per batch on the model's device instead of once per image in the loader.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got {images.dtype}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean) / std


class NormalizationLayer(torch.nn.Module):
    """L2-normalize rows and multiply by a (learnable) scale: f = s * x / ||x||.

    TIRG and the GA code start the scale at 4.0.
    """

    def __init__(self, normalize_scale: float = 4.0, learn_scale: bool = True):
        super().__init__()
        scale = torch.tensor(float(normalize_scale))
        if learn_scale:
            self.norm_s = torch.nn.Parameter(scale)
        else:
            self.register_buffer("norm_s", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D) -> (B, D)."""
        return self.norm_s * x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pairwise_squared_distances(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances. x: (N, D), y: (M, D) or None (= x) -> (N, M), clamped >= 0."""
    y = x if y is None else y
    x_norm = (x * x).sum(1, keepdim=True)
    y_norm = (y * y).sum(1, keepdim=True)
    distances = x_norm + y_norm.t() - 2.0 * x @ y.t()
    return distances.clamp_min(0.0)


def batch_classification_loss(
    query_features: torch.Tensor, target_features: torch.Tensor
) -> torch.Tensor:
    """TIRG's batch-based classification loss (the GA paper's L_CE).

    Cross-entropy over the (B, B) logits ``query_features @ target_features.T``; the positive
    of query i is target i. query_features, target_features: (B, D) -> scalar.
    """
    logits = query_features @ target_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def sample_soft_triplets(
    batch_size: int,
    per_anchor: int = 3,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Triplets (anchor, positive, negative) over the 2B stacked features [queries; targets].

    As in TIRG, query i and target i share label i. Every one of the 2B features is an anchor;
    its only positive is its partner, and ``per_anchor`` negatives are drawn without replacement
    from the 2B - 2 features with another label. Returns a (2B * n, 3) LongTensor, anchors in
    order, n = min(per_anchor, 2B - 2).
    """
    if batch_size < 2:
        raise ValueError(
            "the soft triplet loss needs a batch of at least 2 queries "
            f"(got {batch_size}): with one pair there is no negative"
        )
    n = 2 * batch_size
    per_anchor = min(per_anchor, n - 2)
    index = torch.arange(n, device=device)
    positive = (index + batch_size) % n
    scores = torch.rand(n, n, generator=generator).to(device)  # CPU draw: same on every device
    scores[index, index] = -1.0
    scores[index, positive] = -1.0
    negatives = scores.topk(per_anchor, dim=1).indices  # distinct, uniformly random
    anchors = index.repeat_interleave(per_anchor)
    return torch.stack(
        [anchors, positive.repeat_interleave(per_anchor), negatives.reshape(-1)], dim=1
    )


def soft_triplet_loss(
    query_features: torch.Tensor,
    target_features: torch.Tensor,
    triplets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TIRG's soft triplet loss: mean over triplets of log(1 + exp(d(a, p) - d(a, n))).

    d is the squared Euclidean distance between rows of [query_features; target_features].
    query_features, target_features: (B, D); triplets: (T, 3) as from ``sample_soft_triplets``
    (drawn here when None) -> scalar. Vectorized; TIRG ran a NumPy loop in a custom Function.
    """
    features = torch.cat([query_features, target_features], dim=0)
    if triplets is None:
        triplets = sample_soft_triplets(
            query_features.shape[0], generator=generator, device=features.device
        )
    anchor, positive, negative = triplets.t()
    d_ap = (features[anchor] - features[positive]).pow(2).sum(1)
    d_an = (features[anchor] - features[negative]).pow(2).sum(1)
    return F.softplus(d_ap - d_an).mean()
