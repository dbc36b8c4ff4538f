"""Composed image retrieval on CLIP (CLIP4Cir, Baldrati et al., CVPR-W 2022 / TOMM 2023).

A task module of main.py (see ``TASKS`` there): flags, defaults, the datasets (the CIRR and
CIRCO loaders and the synthetic CIRR live in datasets.py), the models, the optimizer, one
training forward, the evaluation and the submission files. The loss terms and GA are
assembled in ``main.train_step`` as for every task.

    # stage 1: fine-tune both CLIP encoders with the element-wise sum (CLIP4Cir's clip_fine_tune)
    python main.py --dataset cirr --dataset_path data/cirr_dataset --model clip_sum \\
        --clip_model RN50x4 --clip_pretrained openai
    # stage 2: frozen encoders (features cached on disk), the Combiner trains (combiner_train)
    python main.py --dataset cirr --dataset_path data/cirr_dataset --model clip4cir \\
        --clip_model RN50x4 --clip_weights logs/RUN/best.pt --learning_rate 2e-5 \\
        --batch_size 4096 --weight_decay 0 --num_iters 2100 --eval_every 70
    # server-ready CIRR test1 files (recall and recall_subset)
    python main.py --dataset cirr --dataset_path data/cirr_dataset --test_only \\
        --model_checkpoint logs/RUN/best.pt --write_submission submissions/
    # a tiny CPU run on the synthetic CIRR stand-in (no download)
    python main.py --dataset cirr --model clip4cir --clip_model clip_tiny --num_iters 50

Models. ``clip_sum``: the query is ``normalize(f_I(reference) + f_T(caption))``. ``clip4cir``:
CLIP4Cir's Combiner on the two features (``Combiner``). Both are scored against the normalised
target image features, with InfoNCE over the batch at logit scale 100 (``info_nce_loss``).

Stages (``--clip_stage``): ``finetune`` trains both encoders (and the Combiner, if the model has
one); ``combiner`` freezes them and computes every image and caption feature once, cached on disk
under ``--feature_cache_dir`` keyed by model, weights, preprocessing and data, so the Combiner
trains on cached features. The default stage follows the model: clip_sum finetunes, clip4cir
trains the Combiner.

``--model clip_sum/clip4cir`` on main's composed-retrieval datasets (fashioniq, css3d, ...)
dispatches here too (``main.task_of``): finetune stage only, evaluated by ``test_retrieval``
with the dataset's own protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datasets

DATASET_NAMES = ("cirr", "circo")
MODEL_NAMES = ("clip_sum", "clip4cir")
LOSS_NAMES = ("infonce",)
STAGES = ("finetune", "combiner")
PREPROCESS = ("targetpad", "clip")
LOGIT_SCALE = 100.0  # CLIP4Cir's fixed logit scale (its Combiner's, and its fine-tuning's)
RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)
SUBMISSION_K = 50
SUBMISSION_MAX_BYTES = 5 * 2**20
TRAIN_SAMPLE_SEED = 10_000_019  # the fixed sample of training triplets that measures M_s
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: CLIP4Cir's stage-1 recipe (its README's clip_fine_tune.py command): AdamW lr 2e-6 (eps 1e-7,
#: torch's weight decay 0.01), batch 128, 100 epochs of CIRR's 28,225 training triplets (22,000
#: iterations), evaluated every 5 epochs (it validates every epoch). Stage 2 (combiner_train.py:
#: Adam lr 2e-5, batch 4096, 300 epochs) is given by flags; see the README.
DEFAULTS: dict[str, object] = {
    "model": "clip_sum",
    "loss": "infonce",
    "learning_rate": 2e-6,
    "batch_size": 128,
    "weight_decay": 1e-2,
    "num_iters": 22_000,
    "eval_every": 1_100,
    "grad_clip": 0.0,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("composed retrieval on CLIP (--dataset cirr/circo)")
    g.add_argument(
        "--clip_model",
        default="RN50x4",
        help="an open_clip model name (RN50, RN50x4, ViT-B-32, ...) or a config of configs/ "
        "such as clip_tiny (a 32-px test model)",
    )
    g.add_argument(
        "--clip_pretrained",
        default="none",
        help="none (random initialisation), a local open_clip/OpenAI checkpoint file, or an "
        "open_clip tag such as openai (downloaded: needs the hub)",
    )
    g.add_argument(
        "--clip_weights",
        default=None,
        help="a checkpoint of a --clip_stage finetune run whose CLIP weights this run starts "
        "from (CLIP4Cir's stage 2 on its stage-1 model)",
    )
    g.add_argument(
        "--clip_stage",
        default=None,
        choices=STAGES,
        help="finetune: both encoders train; combiner: frozen encoders, cached features "
        "(default: finetune for clip_sum, combiner for clip4cir)",
    )
    g.add_argument(
        "--clip_preprocess",
        default="targetpad",
        choices=PREPROCESS,
        help="targetpad: CLIP4Cir's padding to an aspect ratio of at most --target_ratio, then "
        "CLIP's resize and centre crop; clip: CLIP's own",
    )
    g.add_argument("--target_ratio", type=float, default=1.25, help="TargetPad's ratio")
    g.add_argument(
        "--combiner_projection_dim",
        type=int,
        default=None,
        help="Combiner projection size (default: 4x the CLIP feature size, CLIP4Cir's 2560 "
        "for RN50x4)",
    )
    g.add_argument(
        "--combiner_hidden_dim",
        type=int,
        default=None,
        help="Combiner hidden size (default: 8x the CLIP feature size, CLIP4Cir's 5120)",
    )
    g.add_argument(
        "--feature_cache_dir",
        default=None,
        help="--clip_stage combiner: where frozen features are cached (default: "
        "<data_dir>/clip_features)",
    )
    g.add_argument(
        "--write_submission",
        default=None,
        metavar="DIR",
        help="with --test_only: rank CIRR's test1 (or CIRCO's test) split and write the "
        "evaluation server's JSON files into DIR",
    )
    g.add_argument(
        "--circo_path",
        default=None,
        metavar="DIR",
        help="with --dataset cirr --test_only: also evaluate the CIRCO val split at DIR "
        "(circo_mAP@K among the test metrics, not in M) and, with --write_submission, write "
        "CIRCO's test file: a CIRR-trained model on CIRCO",
    )


def stage(args) -> str:
    if getattr(args, "clip_stage", None):
        return args.clip_stage
    return "combiner" if args.model == "clip4cir" else "finetune"


def _run_error(message: str):
    import checkpoints

    return checkpoints.RunError(message)


def resolve_dataset_path(args) -> str:
    """--dataset_path, or (cirr only) the synthetic stand-in, generated on first use."""
    if args.dataset_path:
        return os.path.expanduser(args.dataset_path)
    if args.dataset != "cirr":
        raise _run_error(
            f"--dataset {args.dataset} needs --dataset_path (only cirr has a synthetic "
            f"stand-in), a folder laid out as:\n{datasets.CIRCO_LAYOUT}"
        )
    size = getattr(args, "synthetic_size", "small")
    size = int(size) if str(size).isdigit() else size
    path = os.path.join(args.data_dir, f"cirr_synthetic_{size}_seed{args.seed}")
    if not os.path.isfile(os.path.join(path, datasets.SYNTHETIC_MARKER)):
        print(
            f"No --dataset_path given: generating the SYNTHETIC CIRR stand-in (CSS scenes in "
            f"CIRR's layout, not CIRR) into {path} ...",
            flush=True,
        )
        datasets.generate_cirr_synthetic(path, seed=args.seed, size=size)
    return path


def image_transform(args) -> datasets.ClipImageTransform:
    size = model_config(args)["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    ratio = args.target_ratio if args.clip_preprocess == "targetpad" else None
    return datasets.ClipImageTransform(size, ratio)


def build_datasets(args):
    """(train, test): CIRR's train and val splits; CIRCO (--test_only only): its val split
    twice (it has no training split)."""
    path = resolve_dataset_path(args)
    transform = image_transform(args)
    options = {"on_bad_image": getattr(args, "on_bad_image", "skip")}
    try:
        if args.dataset == "circo":
            if not args.test_only:
                raise _run_error(
                    "CIRCO has no training split: train on cirr, then evaluate with --dataset "
                    "circo --test_only"
                )
            val = datasets.CIRCODataset(path, "val", transform, **options)
            return val, val
        load = stage(args) == "finetune"
        trainset = datasets.CIRRDataset(path, "train", transform, load_images=load, **options)
        testset = datasets.CIRRDataset(path, "val", transform, **options)
    except (FileNotFoundError, datasets.DatasetFormatError) as e:
        raise _run_error(str(e)) from None
    trainset.seed = testset.seed = args.seed
    return trainset, testset


# ----------------------------------------------------------------------------------- model


def model_config(args) -> dict:
    """The open_clip config of --clip_model (registering the configs of configs/ first)."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    config = open_clip.get_model_config(args.clip_model)
    if config is None:
        raise _run_error(
            f"--clip_model {args.clip_model}: not an open_clip model "
            f"({', '.join(open_clip.list_models()[:8])}, ... or a config of {CONFIG_DIR})"
        )
    return config


class Combiner(nn.Module):
    """CLIP4Cir's Combiner (its combiner.py): image and text features (B, D) -> the composed,
    L2-normalised query (B, D).

    p_T = dropout(relu(W_T t)), p_I = dropout(relu(W_I i)), c = [p_T, p_I];
    lambda = sigmoid(MLP(c)) (a dynamic scalar per query); out = W_o dropout(relu(W_c c)) +
    lambda t + (1 - lambda) i; dropout 0.5 throughout.
    """

    def __init__(self, feature_dim: int, projection_dim: int, hidden_dim: int):
        super().__init__()
        self.text_projection = nn.Linear(feature_dim, projection_dim)
        self.image_projection = nn.Linear(feature_dim, projection_dim)
        self.combiner_layer = nn.Linear(2 * projection_dim, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, feature_dim)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden_dim, 1),
            nn.Sigmoid(),
        )
        self.dropout = nn.Dropout(0.5)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        text = self.dropout(F.relu(self.text_projection(text_features)))
        image = self.dropout(F.relu(self.image_projection(image_features)))
        joint = torch.cat([text, image], dim=-1)
        mixed = self.output_layer(self.dropout(F.relu(self.combiner_layer(joint))))
        weight = self.dynamic_scalar(joint)
        out = mixed + weight * text_features + (1 - weight) * image_features
        return F.normalize(out, dim=-1)


class ClipComposer(nn.Module):
    """An open_clip CLIP and the composition (``combiner``, or None for the normalised sum).

    ``frozen``: the encoders are fixed in eval mode (stage 2) and the Combiner learns from the
    features ``train_image_features`` (N_images, D) and ``train_text_features`` (N_triplets, D)
    cached for the training split (non-persistent buffers: the checkpoint holds the weights).
    """

    def __init__(self, clip, tokenizer, combiner=None, frozen=False, mean=None, std=None):
        super().__init__()
        self.clip, self.tokenizer, self.combiner, self.frozen = clip, tokenizer, combiner, frozen
        self.clip.logit_scale.requires_grad_(False)  # the loss uses CLIP4Cir's fixed 100
        if frozen:
            self.clip.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.train_image_features = None
        self.train_text_features = None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.clip.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> CLIP's normalised float input at CLIP's size (a loader of
        another size, css3d's or --image_size's, is resized here: bicubic, antialiased)."""
        x = images.to(self.mean.dtype) / 255.0
        size = self.clip.visual.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std

    # test_retrieval's composed-model interface (css3d, fashioniq): ImageNet-normalised input
    composes_features = True

    def extract_img_feature(self, imagenet_normalized: torch.Tensor) -> torch.Tensor:
        from torch_function import IMAGENET_MEAN, IMAGENET_STD

        mean = torch.tensor(IMAGENET_MEAN, device=imagenet_normalized.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=imagenet_normalized.device).view(1, 3, 1, 1)
        pixels = ((imagenet_normalized * std + mean) * 255.0).round().clamp(0, 255)
        return self.encode_images(self.normalize(pixels.to(torch.uint8)))

    def extract_text_feature(self, texts: list[str]) -> torch.Tensor:
        return self.encode_texts(list(texts), self.mean.device)

    def compose_img_text_features(self, image_features, text_features) -> torch.Tensor:
        return self.compose(image_features, text_features)

    def compose_img_text(self, imagenet_normalized, texts) -> torch.Tensor:
        return self.compose(
            self.extract_img_feature(imagenet_normalized), self.extract_text_feature(texts)
        )

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> CLIP image features (B, D), not normalised."""
        return self.clip.encode_image(pixels)

    def encode_texts(self, texts: list[str], device) -> torch.Tensor:
        return self.clip.encode_text(self.tokenizer(texts).to(device))

    def compose(self, image_features, text_features) -> torch.Tensor:
        """(B, D), (B, D) -> the L2-normalised query (B, D)."""
        if self.combiner is None:
            return F.normalize(image_features + text_features, dim=-1)
        return self.combiner(image_features, text_features)


def build_model(args, trainset) -> ClipComposer:
    import open_clip

    config = model_config(args)
    frozen = stage(args) == "combiner"
    if frozen and args.dataset not in DATASET_NAMES:
        raise _run_error(
            f"--dataset {args.dataset} with --model {args.model} trains end to end only: add "
            f"--clip_stage finetune (the cached-feature stage is for cirr)"
        )
    if frozen and args.model == "clip_sum":
        raise _run_error(
            "--model clip_sum has nothing to train with --clip_stage combiner "
            "(frozen encoders): use --model clip4cir, or --clip_stage finetune"
        )
    if frozen and args.ga_adv_eps > 0 and args.ga_adv_input == "pixels":
        raise _run_error(
            "--clip_stage combiner trains on cached features: L_GA^A needs "
            "--ga_adv_input features there"
        )
    pretrained = None if args.clip_pretrained in (None, "none") else args.clip_pretrained
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No pretrained weights loaded")
        try:
            clip = open_clip.create_model(args.clip_model, pretrained=pretrained)
        except RuntimeError as e:  # an unknown tag, an unreadable file, no hub
            raise _run_error(f"--clip_pretrained {args.clip_pretrained}: {e}") from None
    clip = clip.float()
    # --test_only of a checkpoint restores the CLIP from it: the stage-1 file is not needed
    restored = args.test_only and args.model_checkpoint not in (None, "untrained")
    if args.clip_weights and not restored:
        import checkpoints

        state = checkpoints.load_checkpoint(args.clip_weights, None, keys=("model",))["model"]
        weights = {k[len("clip.") :]: v for k, v in state.items() if k.startswith("clip.")}
        try:
            clip.load_state_dict(weights)
        except RuntimeError as e:
            raise _run_error(
                f"--clip_weights {args.clip_weights}: not a CLIP of --clip_model "
                f"{args.clip_model} ({str(e)[:200]})"
            ) from None
    dim = config["embed_dim"]
    combiner = None
    if args.model == "clip4cir":
        combiner = Combiner(
            dim, args.combiner_projection_dim or 4 * dim, args.combiner_hidden_dim or 8 * dim
        )
    cfg = getattr(clip.visual, "preprocess_cfg", {})
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    model = ClipComposer(
        clip, open_clip.get_tokenizer(args.clip_model), combiner, frozen, mean, std
    )
    model.embed_dim = dim
    if frozen and not args.test_only:  # evaluation reads the fingerprinted cache itself
        import distributed

        device = distributed.pick_device(args.device)
        model.to(device)
        images, texts = cached_features(model, trainset, args, device)
        model.train_image_features, model.train_text_features = images, texts
    return model


def build_optimizer(args, model: ClipComposer):
    """AdamW over every trainable parameter (betas 0.9/0.999, eps 1e-7 as CLIP4Cir), a constant
    learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-7, weight_decay=args.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)


# ----------------------------------------------------------------------------------- features


def _weights_fingerprint(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cache_key(model: ClipComposer, dataset, args) -> str:
    """What the cached features depend on: model, weights, preprocessing and data."""
    files = [im["file"] for im in dataset.imgs]
    key = {
        "clip_model": args.clip_model,
        "weights": _weights_fingerprint(model.clip),
        "transform": repr(dataset.transform),
        "path": os.path.abspath(dataset.path),
        "split": dataset.split,
        "images": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        "captions": hashlib.sha256("\n".join(dataset.get_all_texts()).encode()).hexdigest(),
        "sizes": [
            os.path.getsize(dataset.image_path(i)) if os.path.exists(dataset.image_path(i)) else -1
            for i in range(len(files))
        ],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset, ids):
        self.dataset, self.ids = dataset, list(ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.dataset.get_img(self.ids[i])


@torch.no_grad()
def encode_images(model: ClipComposer, dataset, ids, args, device) -> torch.Tensor:
    """CLIP features (len(ids), D) of the dataset's images, each read once (float32)."""
    workers = getattr(args, "loader_num_workers", 0)
    loader = torch.utils.data.DataLoader(
        _Images(dataset, ids),
        batch_size=getattr(args, "eval_batch_size", 256),
        num_workers=workers,
        worker_init_fn=datasets.worker_init if workers else None,
    )
    out = []
    for images in datasets.progress(
        loader, desc=f"CLIP features ({dataset.split})", leave=False, disable=len(loader) < 4
    ):
        out.append(model.encode_images(model.normalize(images.to(device))).float())
    if not out:
        return torch.zeros(0, model.embed_dim, device=device)
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model: ClipComposer, texts: list[str], args, device) -> torch.Tensor:
    size = getattr(args, "eval_batch_size", 256)
    chunks = [
        model.encode_texts(texts[i : i + size], device).float() for i in range(0, len(texts), size)
    ]
    return torch.cat(chunks)


def cached_features(model: ClipComposer, dataset, args, device):
    """(image features (N_images, D), caption features (N_triplets, D)) of a split under the
    frozen CLIP, from ``<feature_cache_dir>/<split>_<key>.pt`` or computed and written there
    (atomically). The images found unusable are remembered with them."""
    folder = args.feature_cache_dir or os.path.join(args.data_dir, "clip_features")
    kind = "circo" if isinstance(dataset, datasets.CIRCODataset) else "cirr"
    file = os.path.join(folder, f"{kind}_{dataset.split}_{_cache_key(model, dataset, args)}.pt")
    if os.path.isfile(file):
        cached = torch.load(file, weights_only=True)
        dataset._bad.copy_(cached["bad"])
        return cached["images"].to(device), cached["texts"].to(device)
    was_training = model.training
    model.eval()
    images = encode_images(model, dataset, range(len(dataset.imgs)), args, device)
    texts = encode_texts(model, dataset.get_all_texts(), args, device)
    model.train(was_training)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{file}.{os.getpid()}.tmp"
    torch.save({"images": images.cpu(), "texts": texts.cpu(), "bad": dataset._bad.clone()}, tmp)
    os.replace(tmp, file)
    print(f"cached the frozen CLIP features of {args.dataset} {dataset.split} in {file}")
    return images, texts


# ----------------------------------------------------------------------------------- training


def info_nce_loss(query: torch.Tensor, target: torch.Tensor, scale: float = LOGIT_SCALE):
    """Cross-entropy of ``scale * query @ normalize(target).T`` (B, B) against the diagonal:
    query i must pick target i among the batch's targets (CLIP4Cir's training loss). query is
    L2-normalised already."""
    logits = scale * query @ F.normalize(target, dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features (autocast) in float32 for the loss; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _adversarial(args) -> bool:
    return (getattr(args, "ga_adv_eps", 0) or 0) > 0 or (getattr(args, "fgsm_eps", 0) or 0) > 0


def forward(model: ClipComposer, batch: dict, args, device, adv_input=None) -> dict:
    """One training forward (main.py's contract): ``losses: {"infonce"}``, ``sim``: the composed
    queries and the normalised targets, ``adv_input``: the normalised query pixels (L_GA^A
    through the image tower, --ga_adv_input pixels) or the query image features.

    L_GA^A on pixels differentiates dL/dx once more; attention's fused SDPA kernels have no
    double backward, so the query tower then runs on the math backend (only then).
    """
    import distributed

    if "source_img_data" in batch:  # a composed-retrieval batch of main's datasets
        batch = {
            "reference_img_data": batch["source_img_data"],
            "caption": batch["mod"],
            "target_img_data": batch["target_img_data"],
        }
    pixels = args.ga_adv_input == "pixels" and not model.frozen
    autocast = distributed.autocast(args.precision, device)
    if model.frozen:  # cached features; the frozen CLIP is not run
        image = model.train_image_features[batch["reference"].to(device)]
        target = model.train_image_features[batch["target"].to(device)]
        text = model.train_text_features[batch["triplet"].to(device)]
        if adv_input is not None:
            image = adv_input
        elif _adversarial(args):
            image = image.detach().requires_grad_(True)
        with autocast:
            query = model.compose(image, text)
        query = _fp32(query)
        return {
            "losses": {"infonce": info_nce_loss(query, target)},
            "sim": (query, F.normalize(target, dim=-1)),
            "adv_input": image,
        }
    reference = model.normalize(batch["reference_img_data"].to(device, non_blocking=True))
    target_pixels = model.normalize(batch["target_img_data"].to(device, non_blocking=True))
    if adv_input is not None and pixels:
        reference = adv_input
    elif pixels and _adversarial(args):
        reference = reference.requires_grad_(True)
    double_backward = pixels and args.ga_adv_eps > 0
    math_only = contextlib.nullcontext()
    if double_backward:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        math_only = sdpa_kernel(SDPBackend.MATH)
    with autocast:
        with math_only:
            image = model.encode_images(reference)
        if adv_input is not None and not pixels:
            image = adv_input  # FGSM's second forward on perturbed features
        text = model.encode_texts(batch["caption"], device)
        target = model.encode_images(target_pixels)
        query = model.compose(image, text)
    query, target = _fp32(query), _fp32(target)
    return {
        "losses": {"infonce": info_nce_loss(query, target)},
        "sim": (query, F.normalize(target, dim=-1)),
        "adv_input": reference if pixels else image,
    }


# ----------------------------------------------------------------------------------- metrics


@torch.no_grad()
def ranked_gallery(query_features, gallery_features, reference, k: int) -> torch.Tensor:
    """The k best gallery indices of each query (Q, min(k, N - 1)) with its reference image
    removed from its ranking (CIRR's protocol; our choice for CIRCO too). Cosine similarity;
    ties by ascending gallery index (test_retrieval's rule). reference (Q,): gallery indices."""
    import test_retrieval

    reference = torch.as_tensor(reference, dtype=torch.long).to(gallery_features.device)
    top = test_retrieval.top_k_gallery(query_features, gallery_features, k + 1, reference)
    keep = top != reference[:, None]
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # the reference last
    width = min(k, gallery_features.shape[0] - 1)
    return top.gather(1, order)[:, :width]


def recall_at_ks(top: torch.Tensor, target: torch.Tensor, ks, prefix="R") -> dict[str, float]:
    """{f"{prefix}@k": percent of rows whose target is among their first k}; top (Q, K)."""
    hits = top == torch.as_tensor(target, device=top.device)[:, None]
    return {f"{prefix}@{k}": 100.0 * float(hits[:, :k].any(1).float().mean()) for k in ks}


@torch.no_grad()
def ranked_subset(query_features, gallery_features, members: list[list[int]]) -> torch.Tensor:
    """Each query's img_set members (without its reference) in rank order: (Q, M) gallery
    indices, -1 padding last. Ranked as in the whole gallery: cosine similarity, ties by
    gallery index."""
    width = max((len(m) for m in members), default=0)
    device = gallery_features.device
    padded = torch.full((len(members), width), -1, dtype=torch.long, device=device)
    for row, m in enumerate(members):
        padded[row, : len(m)] = torch.tensor(m, dtype=torch.long)
    queries = F.normalize(query_features.float().to(device), dim=-1)
    gallery = F.normalize(gallery_features.float(), dim=-1)
    sims = torch.einsum("qd,qmd->qm", queries, gallery[padded.clamp(min=0)])
    sims = sims.masked_fill(padded < 0, float("-inf"))
    by_index = torch.argsort(padded.masked_fill(padded < 0, torch.iinfo(torch.long).max), 1)
    sims, padded = sims.gather(1, by_index), padded.gather(1, by_index)
    order = torch.argsort(-sims, dim=1, stable=True)
    return padded.gather(1, order)


def circo_map(top: torch.Tensor, ground_truth: list[list[int]], ks=CIRCO_KS) -> dict[str, float]:
    """CIRCO's mAP@K in percent: AP@K = sum_{k<=K} P@k rel_k / min(|GT|, K), averaged over the
    queries; top (Q, >= max K) ranked gallery indices, ground_truth per query."""
    width = max(len(g) for g in ground_truth)
    gt = torch.full((len(ground_truth), width), -2, dtype=torch.long, device=top.device)
    for row, g in enumerate(ground_truth):
        gt[row, : len(g)] = torch.tensor(g, dtype=torch.long)
    relevant = (top[:, :, None] == gt[:, None, :]).any(-1).double()  # (Q, K)
    ranks = torch.arange(1, top.shape[1] + 1, device=top.device, dtype=torch.float64)
    precision = relevant.cumsum(1) / ranks
    n_gt = torch.tensor([len(g) for g in ground_truth], device=top.device, dtype=torch.float64)
    out = {}
    for k in ks:
        ap = (precision[:, :k] * relevant[:, :k]).sum(1) / n_gt.clamp(max=k)
        out[f"mAP@{k}"] = 100.0 * float(ap.mean())
    return out


# ----------------------------------------------------------------------------------- evaluation


def split_features(model: ClipComposer, dataset, image_ids, args, device):
    """(image features (len(image_ids), D), caption features (len(queries), D)) of a split:
    from the on-disk cache with frozen encoders, else encoded now (each image once)."""
    if model.frozen:
        # by the weights' fingerprint: right even when a checkpoint was restored after build
        images, texts = cached_features(model, dataset, args, device)
        return images[
            torch.as_tensor(list(image_ids), dtype=torch.long, device=images.device)
        ], texts
    texts = encode_texts(model, dataset.get_all_texts(), args, device)
    return encode_images(model, dataset, image_ids, args, device), texts


@torch.no_grad()
def compose_queries(model, image_features, text_features, reference_rows, batch=1024):
    """The composed, normalised queries (Q, D): reference features looked up by row."""
    rows = torch.as_tensor(reference_rows, dtype=torch.long, device=image_features.device)
    return torch.cat(
        [
            model.compose(image_features[rows[i : i + batch]], text_features[i : i + batch])
            for i in range(0, len(rows), batch)
        ]
    )


def cirr_metrics(top, subset, target) -> dict[str, float]:
    """R@{1,5,10,50} over the split, Rs@{1,2,3} over the subsets, M = (R@5 + Rs@1) / 2."""
    metrics = recall_at_ks(top, target, RECALL_KS)
    metrics.update(recall_at_ks(subset, target, SUBSET_KS, prefix="Rs"))
    metrics["M"] = (metrics["R@5"] + metrics["Rs@1"]) / 2
    return metrics


def training_sample(trainset, n: int) -> list[int]:
    """A fixed sample of at most n training triplets (without replacement), sorted."""
    rng = np.random.default_rng(TRAIN_SAMPLE_SEED)
    count = min(max(n, 1), len(trainset.queries))
    return sorted(rng.choice(len(trainset.queries), count, replace=False).tolist())


def evaluate_cirr_split(model, dataset, args, device, query_ids=None) -> dict:
    """CIRR's metrics of a split's queries (all, or ``query_ids``) against the gallery of every
    image of the split (all of them; for a training sample, the images its triplets name)."""
    queries = [dataset.queries[j] for j in (query_ids or range(len(dataset.queries)))]
    if query_ids is None:
        gallery_ids = list(range(len(dataset.imgs)))
    else:
        gallery_ids = sorted(
            {i for q in queries for i in (q["reference"], q["target"], *q["members"])}
        )
    position = {g: p for p, g in enumerate(gallery_ids)}
    images, texts = split_features(model, dataset, gallery_ids, args, device)
    if query_ids is not None:
        texts = texts[torch.as_tensor(query_ids, device=texts.device)]
    reference = [position[q["reference"]] for q in queries]
    query = compose_queries(model, images, texts, reference)
    top = ranked_gallery(query, images, reference, max(RECALL_KS))
    subset = ranked_subset(query, images, [[position[m] for m in q["members"]] for q in queries])
    return {
        "metrics": cirr_metrics(top, subset, [position[q["target"]] for q in queries]),
        "top": top,
        "subset": subset,
        "gallery_ids": gallery_ids,
        "queries": queries,
    }


def evaluate_circo_split(model, dataset, args, device) -> dict:
    images, texts = split_features(model, dataset, range(len(dataset.imgs)), args, device)
    reference = [q["reference"] for q in dataset.queries]
    query = compose_queries(model, images, texts, reference)
    top = ranked_gallery(query, images, reference, SUBMISSION_K)
    metrics = {}
    if dataset.split == "val":
        metrics = circo_map(top, [q["gt"] for q in dataset.queries])
        metrics["M"] = metrics["mAP@10"]
    return {"metrics": metrics, "top": top}


def evaluate(model, trainset, testset, args, device) -> dict:
    """{"train", "test"} in percent. CIRR: test = the val split, train = a fixed sample of
    training triplets against the images they name; M = (R@5 + Rs@1) / 2. CIRCO: test = the
    val split's mAP@K (M = mAP@10); CIRCO has no training split, so train M is NaN. With
    --test_only --write_submission DIR the test split's server files are written too."""
    if args.dataset not in DATASET_NAMES:  # css3d, fashioniq, ...: their own protocol
        import test_retrieval

        queries = trainset.sample_training_queries(args.train_eval_queries, seed=TRAIN_SAMPLE_SEED)
        return test_retrieval.evaluate_composed(
            model, trainset, testset, queries, device, args.eval_batch_size, args.loader_num_workers
        )
    if args.dataset == "circo":
        result = {
            "train": {"M": float("nan")},
            "test": evaluate_circo_split(model, testset, args, device)["metrics"],
        }
    else:
        sample = training_sample(trainset, args.train_eval_queries)
        result = {
            "train": evaluate_cirr_split(model, trainset, args, device, sample)["metrics"],
            "test": evaluate_cirr_split(model, testset, args, device)["metrics"],
        }
    if args.dataset == "cirr" and args.test_only and args.circo_path:
        try:
            circo = datasets.CIRCODataset(
                args.circo_path,
                "val",
                testset.transform,
                on_bad_image=getattr(args, "on_bad_image", "skip"),
            )
        except (FileNotFoundError, datasets.DatasetFormatError) as e:
            raise _run_error(str(e)) from None
        metrics = evaluate_circo_split(model, circo, args, device)["metrics"]
        result["test"].update({f"circo_{k}": v for k, v in metrics.items() if k != "M"})
    if args.test_only and args.write_submission:
        for file in write_submission(model, args, device, testset.transform):
            print(f"wrote the submission file {file}")
    return result


# ----------------------------------------------------------------------------------- submission


def cirr_submissions(top, subset, dataset, gallery_ids=None) -> tuple[dict, dict]:
    """CIRR's two server files: {"version": "rc2", "metric": "recall", "<pairid>": [50
    names]} and the same with "recall_subset" and 3 names."""
    gallery_ids = gallery_ids or range(len(dataset.imgs))
    names = [dataset.imgs[g]["name"] for g in gallery_ids]
    recall = {"version": "rc2", "metric": "recall"}
    recall_subset = {"version": "rc2", "metric": "recall_subset"}
    for q, row, sub in zip(dataset.queries, top.tolist(), subset.tolist()):
        recall[str(q["pairid"])] = [names[g] for g in row[:SUBMISSION_K]]
        recall_subset[str(q["pairid"])] = [names[g] for g in sub[:3] if g >= 0]
    return recall, recall_subset


def circo_submission(top, dataset) -> dict:
    """CIRCO's server file: {"<query id>": [50 gallery image ids]}."""
    return {
        str(q["id"]): [dataset.imgs[g]["name"] for g in row[:SUBMISSION_K]]
        for q, row in zip(dataset.queries, top.tolist())
    }


def validate_submission(submission: dict, dataset, metric: str) -> None:
    """Raise ValueError unless ``submission`` is what the server takes: every query present
    and nothing else, lists of the right length of names of the split's images without
    duplicates (nor the query's own reference), JSON under 5 MB. metric: recall,
    recall_subset (CIRR) or circo."""
    body = dict(submission)
    if metric != "circo":
        if body.pop("version", None) != "rc2" or body.pop("metric", None) != metric:
            raise ValueError(f"a CIRR {metric} file needs version 'rc2' and metric '{metric}'")
    key = "id" if metric == "circo" else "pairid"
    queries = {str(q[key]): q for q in dataset.queries}
    if set(body) != set(queries):
        missing, extra = sorted(set(queries) - set(body)), sorted(set(body) - set(queries))
        raise ValueError(f"{metric}: queries missing {missing[:5]}, unknown {extra[:5]}")
    names = {im["name"]: i for i, im in enumerate(dataset.imgs)}
    for qid, ranked in body.items():
        q = queries[qid]
        want = (
            min(3, len(q["members"]))
            if metric == "recall_subset"
            else min(SUBMISSION_K, len(dataset.imgs) - 1)
        )
        if not isinstance(ranked, list) or len(ranked) != want:
            raise ValueError(f"{metric}: query {qid} needs a list of {want} images")
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"{metric}: query {qid} lists an image twice")
        unknown = [r for r in ranked if r not in names]
        if unknown:
            raise ValueError(f"{metric}: query {qid} names {unknown[0]!r}, not of the split")
        if names[ranked[0]] == q["reference"] or q["reference"] in [names[r] for r in ranked]:
            raise ValueError(f"{metric}: query {qid} ranks its own reference image")
        if metric == "recall_subset" and not {names[r] for r in ranked} <= set(q["members"]):
            raise ValueError(f"{metric}: query {qid} names an image outside its img_set")
    size = len(json.dumps(submission).encode())
    if size >= SUBMISSION_MAX_BYTES:
        raise ValueError(f"{metric}: {size} bytes, over the server's 5 MB")


def _write_json(path: str, content: dict) -> str:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(content, f)
    os.replace(tmp, path)
    return path


def write_submission(model, args, device, transform) -> list[str]:
    """Rank the test split (CIRR test1, CIRCO test; both with --dataset cirr --circo_path),
    validate and write the server files into --write_submission; returns their paths."""
    options = {"on_bad_image": getattr(args, "on_bad_image", "skip")}
    os.makedirs(args.write_submission, exist_ok=True)
    files = []  # (metric, content, dataset)
    try:
        if args.dataset == "cirr":
            dataset = datasets.CIRRDataset(
                resolve_dataset_path(args), "test1", transform, **options
            )
            ranked = evaluate_cirr_split_unlabelled(model, dataset, args, device)
            recall, recall_subset = cirr_submissions(ranked["top"], ranked["subset"], dataset)
            files += [("recall", recall, dataset), ("recall_subset", recall_subset, dataset)]
        circo_path = args.dataset_path if args.dataset == "circo" else args.circo_path
        if circo_path:
            dataset = datasets.CIRCODataset(circo_path, "test", transform, **options)
            top = evaluate_circo_split(model, dataset, args, device)["top"]
            files.append(("circo", circo_submission(top, dataset), dataset))
    except (FileNotFoundError, datasets.DatasetFormatError) as e:
        raise _run_error(str(e)) from None
    written = []
    for metric, content, dataset in files:
        try:
            validate_submission(content, dataset, metric)
        except ValueError as e:
            raise _run_error(f"refusing to write an invalid submission: {e}") from None
        name = "circo_test_submission.json" if metric == "circo" else f"cirr_test1_{metric}.json"
        written.append(_write_json(os.path.join(args.write_submission, name), content))
    return written


def evaluate_cirr_split_unlabelled(model, dataset, args, device) -> dict:
    """test1's rankings (no targets): the whole split and each query's subset."""
    images, texts = split_features(model, dataset, range(len(dataset.imgs)), args, device)
    reference = [q["reference"] for q in dataset.queries]
    query = compose_queries(model, images, texts, reference)
    return {
        "top": ranked_gallery(query, images, reference, SUBMISSION_K),
        "subset": ranked_subset(query, images, [q["members"] for q in dataset.queries]),
    }
