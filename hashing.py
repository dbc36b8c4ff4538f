"""Learning to hash for image-to-image retrieval (seed: xiami2019/Image-Retrieve).

A backbone (ResNet-18 or ViT-B/32) maps an image to a feature, a linear layer to ``--hash_bits``
outputs, and tanh to (-1, 1): the relaxed codes trained with a batch-all triplet loss on squared
Euclidean distance (``batch_all_triplet_loss``). At test time the codes are ``sign`` (0 -> -1) and
the database is ranked by Hamming distance (``test_retrieval.hamming_map``). Protocol: the test
split holds the queries, the training split is the database; M_t is the test mAP, M_s the mAP of
a fixed sample of training images against the training database, each query itself excluded.

This module is the task's half of main.py's contract (see ``TASKS`` in main.py):
``add_arguments``, ``DEFAULTS``, ``build_datasets``, ``build_model``, ``build_optimizer``,
``forward`` and ``evaluate``. It has no training loop of its own.

Examples:
    python main.py --dataset cub200 --dataset_path data/CUB_200_2011 --hash_bits 32
    python main.py --dataset stanford_dogs --dataset_path data/Stanford_Dogs --hash_bits 64 --ga
    python main.py --dataset hashing_synthetic --num_iters 300 --eval_every 100  # stand-in
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
import torchvision

import datasets
import test_retrieval
from img_text_composition_models import PretrainedWeightsMissing, resnet18_backbone
from torch_function import normalize_images

HASH_BITS = (16, 32, 48, 64)
DATASET_NAMES = ("cub200", "stanford_dogs", "image_folder", "hashing_synthetic")
MODEL_NAMES = ("hash",)
LOSS_NAMES = ("batch_all_triplet",)
#: Seed of the fixed sample of training images that measures M_s (main.py's constant for CIR).
TRAIN_EVAL_SEED = 10_000_019
#: The seed's AdamInverseSqrtWithWarmup starts its warm-up at this learning rate.
WARMUP_INIT_LR = 1e-7

# Task defaults that differ from main's CIR defaults (applied only to flags the user did not
# give). The seed run behind its README table (2019, ResNet-18): adam_inverse_sqrt with lr 1e-3,
# beta2 0.98, warm-up 4000, no weight decay; batch 100; up to 4000 epochs of CUB's 60 batches,
# evaluated every 100 epochs (6,000 iterations). We stop at 60K iterations (1000 CUB epochs, the
# low end of the seed's "best model at 1000-4000 epochs"). Its 2021 commit wrote lr=0.0001 in
# the same --optimizer string but no longer used that optimizer (AdamW 1e-4, linear schedule).
DEFAULTS: dict[str, object] = {
    "model": "hash",
    "loss": "batch_all_triplet",
    "learning_rate": 1e-3,
    "batch_size": 100,
    "weight_decay": 0.0,
    "num_iters": 60_000,
    "eval_every": 6_000,
    "grad_clip": 0.0,
}


def _str2bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The hashing flags, in their own argument group."""
    g = parser.add_argument_group("learning to hash (--dataset cub200/stanford_dogs/...)")
    g.add_argument("--hash_backbone", default="resnet18", choices=sorted(BACKBONES))
    g.add_argument(
        "--hash_bits", type=int, default=32, choices=HASH_BITS, help="code length in bits"
    )
    g.add_argument(
        "--triplet_margin",
        type=float,
        default=None,
        help="margin of the batch-all triplet loss on squared distances (default: bits / 4, "
        "the seed's 8 at 32 bits)",
    )
    g.add_argument(
        "--classes_per_batch",
        type=int,
        default=8,
        help="classes in each training batch, with an equal share of its images each",
    )
    g.add_argument(
        "--hash_warmup_steps",
        type=int,
        default=4000,
        help="linear learning-rate warm-up from 1e-7, then decay as 1/sqrt(step) (the seed's "
        "adam_inverse_sqrt); 0: 1/sqrt(step) from the first step",
    )
    g.add_argument("--hash_top_k", type=int, default=100, help="K of the reported P@K and mAP@K")
    g.add_argument(
        "--hash_flip",
        type=_str2bool,
        nargs="?",
        const=True,
        default=True,
        help="random horizontal flips of training images (the seed's RandomHorizontalFlip)",
    )


def triplet_margin(args) -> float:
    margin = getattr(args, "triplet_margin", None)
    return args.hash_bits / 4.0 if margin is None else float(margin)


# --------------------------------------------------------------------------------------- data


def resolve_dataset_path(args) -> str:
    """``--dataset_path``, or the synthetic stand-in under ``--data_dir`` (generated once, by
    whichever process gets there first; main may call this on rank 0 before the others)."""
    if getattr(args, "dataset_path", None):
        return os.path.expanduser(args.dataset_path)
    data_dir = getattr(args, "data_dir", None) or "./data"
    path = os.path.join(data_dir, f"hashing_synthetic_seed{args.seed}")
    if not os.path.isfile(os.path.join(path, datasets.SYNTHETIC_MARKER)):
        real = "" if args.dataset == "hashing_synthetic" else f", not {args.dataset} data"
        print(
            f"No --dataset_path given: generating the SYNTHETIC hashing stand-in (20 shape/colour "
            f"classes{real}) into {path} ...",
            flush=True,
        )
        datasets.generate_hashing_synthetic(path, seed=args.seed)
    return path


def build_datasets(args):
    """(train, test) ``datasets.ClassImageDataset``s. Without ``--dataset_path`` both are the
    synthetic stand-in (64x64 images kept at their size); real photographs are resized and
    center-cropped to ``--image_size``. The training set yields class-balanced batches as a pure
    function of (seed, index)."""
    path = resolve_dataset_path(args)
    synthetic = not getattr(args, "dataset_path", None)
    cls = datasets.HashingSynthetic if synthetic else datasets.HASHING_DATASETS[args.dataset]
    size = 64 if synthetic else getattr(args, "image_size", datasets.IMAGE_SIZE)
    options = {"on_bad_image": getattr(args, "on_bad_image", "skip")}
    transform = datasets.ResizeCenterCrop(size)
    trainset = cls(path, split="train", transform=transform, **options)
    testset = cls(path, split="test", transform=transform, **options)
    trainset.seed = testset.seed = args.seed
    trainset.use_class_balanced_batches(args.batch_size, args.classes_per_batch)
    return trainset, testset


# -------------------------------------------------------------------------------------- model


def _vit_b_32(pretrained: bool, image_size: int) -> torch.nn.Module:
    if image_size % 32:
        raise ValueError(f"vit_b_32 needs an image size divisible by 32, got {image_size}")
    model = torchvision.models.vit_b_32(weights=None, image_size=image_size)
    if pretrained:
        weights = torchvision.models.ViT_B_32_Weights.IMAGENET1K_V1
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        if not os.path.isfile(path):
            raise PretrainedWeightsMissing(
                f"--pretrained needs torchvision's ImageNet ViT-B/32 weights at {path}, and that "
                f"file does not exist (nothing is downloaded at run time). Download "
                f"{weights.url} to that path (or set TORCH_HOME to a folder whose checkpoints/ "
                f"holds it), or pass --pretrained False to train the backbone from scratch."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if image_size != 224:  # the position embeddings of a 7x7 patch grid, resized
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = interpolate_embeddings(image_size, 32, state)
        model.load_state_dict(state)
    return model


def _resnet18_features(pretrained: bool, image_size: int) -> tuple[torch.nn.Module, int]:
    model = resnet18_backbone(pretrained)
    dim = model.fc.in_features
    model.fc = torch.nn.Identity()
    return model, dim


def _vit_features(pretrained: bool, image_size: int) -> tuple[torch.nn.Module, int]:
    model = _vit_b_32(pretrained, image_size)
    dim = model.heads.head.in_features
    model.heads = torch.nn.Identity()
    return model, dim


BACKBONES = {"resnet18": _resnet18_features, "vit_b_32": _vit_features}


class HashingModel(torch.nn.Module):
    """backbone -> linear to ``bits`` -> tanh. ``forward``: normalized images (B, 3, H, W) ->
    relaxed codes (B, bits) in (-1, 1); ``binarize`` turns them into ±1 codes."""

    def __init__(self, backbone: str, bits: int, pretrained: bool = False, image_size: int = 224):
        super().__init__()
        self.bits = bits
        self.backbone, dim = BACKBONES[backbone](pretrained, image_size)
        self.hash_layer = torch.nn.Linear(dim, bits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hash_layer(self.backbone(images)))


def binarize(codes: torch.Tensor) -> torch.Tensor:
    """sign(codes) with 0 mapped to -1 (the seed's README rule; its code's torch.sign kept 0s,
    which then count as a third symbol in Hamming distance): float ±1."""
    return torch.where(codes > 0, 1.0, -1.0).to(torch.float32)


def build_model(args, trainset) -> torch.nn.Module:
    size = getattr(trainset.transform, "size", datasets.IMAGE_SIZE)
    return HashingModel(
        args.hash_backbone, args.hash_bits, bool(getattr(args, "pretrained", False)), size
    )


def inverse_sqrt_warmup(step: int, warmup_steps: int, init_ratio: float) -> float:
    """Learning-rate factor of the seed's AdamInverseSqrtWithWarmup after ``step`` updates:
    linear from ``init_ratio`` to 1 over ``warmup_steps``, then sqrt(warmup_steps / step)."""
    if warmup_steps <= 0:
        return 1.0 / math.sqrt(max(step, 1))
    if step < warmup_steps:
        return init_ratio + step * (1.0 - init_ratio) / warmup_steps
    return math.sqrt(warmup_steps / step)


def build_optimizer(args, model):
    """Adam (beta2 0.98) with the seed's inverse-square-root decay after a linear warm-up from
    1e-7 over ``--hash_warmup_steps`` (its AdamInverseSqrtWithWarmup's default 4000), as a
    LambdaLR that main steps once per iteration. (The seed's 2021 ViT commit switched to AdamW
    with a linear schedule; its README numbers predate it.)"""
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=args.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-8,
        weight_decay=getattr(args, "weight_decay", 0.0),
    )
    init_ratio = min(1.0, WARMUP_INIT_LR / args.learning_rate) if args.learning_rate > 0 else 1.0
    warmup = args.hash_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: inverse_sqrt_warmup(step, warmup, init_ratio)
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------------------- loss


def batch_all_triplet_loss(
    codes: torch.Tensor, labels: torch.Tensor, margin: float
) -> torch.Tensor:
    """The seed's batch-all triplet loss on squared Euclidean distances, vectorised.

    L = mean over triplets (a, p, n) of max(0, ||c_a - c_p||^2 - ||c_a - c_n||^2 + margin),
    over the seed's triplets exactly: every pair of images of one class taken once, the one
    earlier in the batch as the anchor (a < p, its ``itertools`` combinations), with every
    image of another class as the negative. The mean runs over ALL those triplets, those with
    zero loss included (the seed's ``F.relu(...).mean()``), not only the positive ones.

    Args:
        codes: (B, bits) relaxed codes; labels: (B,) int; margin: float.
    Returns:
        0-dim tensor of codes' dtype; 0 (still attached to the graph) when the batch has no
        triplet, where the seed crashed. Memory is O(B^3) booleans and floats.
    """
    distances = (codes[:, None, :] - codes[None, :, :]).pow(2).sum(-1)  # (B, B)
    same = labels[:, None] == labels[None, :]
    positions = torch.arange(len(labels), device=codes.device)
    anchor_positive = same & (positions[:, None] < positions[None, :])
    valid = anchor_positive[:, :, None] & ~same[:, None, :]  # (a, p, n)
    losses = F.relu(distances[:, :, None] - distances[:, None, :] + margin)
    count = valid.sum()
    if int(count) == 0:
        return codes.sum() * 0.0
    return (losses * valid).sum() / count


def next_positive_indices(labels: torch.Tensor) -> torch.Tensor:
    """For each batch position, the next position with the same label (cyclically, in batch
    order); a position alone in its class gets itself. (B,) -> (B,) int64."""
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    ends = torch.repeat_interleave(counts.cumsum(0), counts)
    following = torch.arange(len(labels), device=labels.device) + 1
    following = torch.where(following < ends, following, starts)
    positives = torch.empty_like(order)
    positives[order] = order[following]
    return positives


def forward(model, batch: dict, args, device: torch.device, adv_input=None) -> dict:
    """One training forward (main.py's contract).

    Returns ``losses: {"triplet"}``; ``sim``: (codes of each image, codes of the next image of
    its class in the batch), the positive pairs L_S pulls together; ``adv_input``: the
    normalized (and randomly flipped) batch pixels, a leaf requiring grad when L_GA^A or FGSM is
    on. Every image of the batch is an anchor, so all of them are the adversarial input.
    """
    labels = batch["labels"].to(device, non_blocking=True)
    if adv_input is None:
        images = normalize_images(batch["images"].to(device, non_blocking=True))
        if model.training and getattr(args, "hash_flip", True):
            flip = torch.rand(images.shape[0]) < 0.5  # torch's global RNG, seeded per step
            images = torch.where(flip.to(device)[:, None, None, None], images.flip(3), images)
        needs_grad = (getattr(args, "ga_adv_eps", 0) or 0) > 0 or (
            getattr(args, "fgsm_eps", 0) or 0
        ) > 0
        adv_input = images.detach().requires_grad_(needs_grad)
    codes = model(adv_input).float()
    loss = batch_all_triplet_loss(codes, labels, triplet_margin(args))
    positives = next_positive_indices(labels)
    return {
        "losses": {"triplet": loss},
        "sim": (codes, codes[positives]),
        "adv_input": adv_input,
    }


# --------------------------------------------------------------------------------- evaluation


class _ImagesByIndex(torch.utils.data.Dataset):
    """Image i of a dataset (its evaluation view, whatever its training ``__getitem__`` does)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.imgs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset.get_img(index)


@torch.no_grad()
def encode_codes(model, dataset, args, device: torch.device, desc: str) -> torch.Tensor:
    """±1 codes (N, bits) of every image of ``dataset``, in index order, each encoded once."""
    workers = getattr(args, "loader_num_workers", 0)
    loader = torch.utils.data.DataLoader(
        _ImagesByIndex(dataset),
        batch_size=getattr(args, "eval_batch_size", 256),
        shuffle=False,
        num_workers=workers,
        worker_init_fn=datasets.worker_init if workers else None,
    )
    codes = []
    for images in datasets.progress(loader, desc=desc, leave=False, disable=len(loader) < 4):
        codes.append(binarize(model(normalize_images(images.to(device)))).cpu())
    return torch.cat(codes)


def fixed_train_sample(n_images: int, n_max: int) -> torch.Tensor:
    """The M_s queries: at most ``n_max`` training image ids, drawn without replacement by a
    fixed seed, sorted."""
    generator = torch.Generator().manual_seed(TRAIN_EVAL_SEED)
    sample = torch.randperm(n_images, generator=generator)[: max(0, min(n_max, n_images))]
    return sample.sort().values


def retrieval_metrics(
    query_codes, database_codes, query_labels, database_labels, k: int, exclude=None
) -> dict[str, float]:
    """{"mAP", "mAP@k", "P@k", "M"} in percent (M = mAP over the whole database)."""
    full = test_retrieval.hamming_map(
        query_codes, database_codes, query_labels, database_labels, exclude_indices=exclude
    )
    top = test_retrieval.hamming_ranking_metrics(
        query_codes, database_codes, query_labels, database_labels, k, exclude
    )
    n_at_k = top["candidates"].clamp(max=k).clamp_min(1).double()
    return {
        "mAP": 100.0 * full,
        f"mAP@{k}": 100.0 * float(top["ap"].mean()),
        f"P@{k}": 100.0 * float((top["relevant_in_top_k"] / n_at_k).mean()),
        "M": 100.0 * full,
    }


def evaluate(model, trainset, testset, args, device: torch.device) -> dict:
    """M_t: test images as queries against the training database; M_s: a fixed sample of
    training images against the same database, each query's own image excluded. Each image is
    encoded once. Values in percent."""
    database = encode_codes(model, trainset, args, device, "hash codes: database (train)")
    queries = encode_codes(model, testset, args, device, "hash codes: queries (test)")
    db_labels = torch.tensor(trainset.labels)
    k = getattr(args, "hash_top_k", 100)
    test = retrieval_metrics(queries, database, torch.tensor(testset.labels), db_labels, k)
    sample = fixed_train_sample(len(trainset.imgs), args.train_eval_queries)
    train = retrieval_metrics(
        database[sample], database, db_labels[sample], db_labels, k, exclude=sample
    )
    return {"train": train, "test": test}
