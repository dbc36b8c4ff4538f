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
import os
import signal
import sys

import torch
from tqdm import tqdm

import checkpoints
import clip4cir
import datasets
import distributed
import esa
import gradient_augmentation as ga
import hashing
import img_text_composition_models
import test_retrieval
import text_model
import torch_function
import visualize
import whm as whm_lib

LOSSES = {
    # Under torchrun each process's queries are ranked against the targets of every process (the
    # global batch); in one process this is torch_function.batch_classification_loss.
    "batch_based_classification": distributed.batch_classification_loss,
    # Under torchrun the triplets are drawn within each process's batch.
    "soft_triplet": torch_function.soft_triplet_loss,
}
LOSS_TERM = {"batch_based_classification": "ce", "soft_triplet": "triplet"}
UNTRAINED = "untrained"  # --model_checkpoint untrained: evaluate the freshly initialised model
RunError = checkpoints.RunError
# The other retrieval tasks, by --dataset. Each flat module offers:
#   add_arguments(parser); DEFAULTS (flags it sets when not given); DATASET_NAMES, MODEL_NAMES,
#   LOSS_NAMES; resolve_dataset_path(args) (generates its synthetic stand-in); build_datasets(args)
#   -> (train, test), train[index] a pure function of (seed, index), with .synthetic and
#   .collate_fn; build_model(args, train); build_optimizer(args, model) -> (optimizer, LambdaLR);
#   forward(model, batch, args, device, adv_input=None) -> {"losses": {name: loss},
#   "sim": (a, b) for L_S, "adv_input": what L_GA^A differentiates}; evaluate(model, train, test,
#   args, device) -> {"train": {..., "M"}, "test": {..., "M"}}, in percent.
# Composed image retrieval (``datasets.DATASETS``) is built by this module (``cir_forward``).
TASKS = {
    **{name: hashing for name in hashing.DATASET_NAMES},
    **{name: esa for name in esa.DATASET_NAMES},
    **{name: clip4cir for name in clip4cir.DATASET_NAMES},
}


def task_of(args):
    """The task module of a run: by --dataset, or clip4cir for --model clip_sum/clip4cir on a
    composed-retrieval dataset (css3d, fashioniq, ...); None for main's own composed retrieval."""
    return TASKS.get(args.dataset) or (clip4cir if args.model in clip4cir.MODEL_NAMES else None)


class HelpFormatter(argparse.HelpFormatter):
    """Every flag shows its default once: argparse's ArgumentDefaultsHelpFormatter skips flags
    without help text and repeats a default the text already states."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False
        if hidden or action.default == argparse.SUPPRESS or "(default" in text.lower():
            return text
        return f"{text} (default: %(default)s)".lstrip()


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
        description="Train and evaluate retrieval models with Gradient Augmentation: composed "
        "image retrieval (TIRG, ComposeAE), image-text matching (ESA), learning to hash.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="css3d",
        choices=sorted([*datasets.DATASETS, *TASKS]),
        help="composed image retrieval: css3d, mitstates, fashion200k, fashioniq, cirr, circo; "
        "image-text matching: f30k_precomp, coco_precomp; learning to hash: cub200, stanford_dogs, "
        "image_folder, hashing_synthetic",
    )
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
    g.add_argument(
        "--model",
        default="tirg",
        choices=sorted(
            [*img_text_composition_models.MODELS, *esa.MODEL_NAMES, *clip4cir.MODEL_NAMES, "hash"]
        ),
        help="composition model (esa for image-text matching; hash, the default there, for "
        "learning to hash)",
    )
    g.add_argument(
        "--image_embed_dim", type=int, default=512, help="image and composed feature size"
    )
    text_model.add_arguments(g, add_bool)
    add_bool(
        g,
        "--pretrained",
        None,
        "start the ResNet-18 from ImageNet weights (default: off for css3d, on otherwise)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument(
        "--loss",
        default="batch_based_classification",
        choices=sorted([*LOSSES, *esa.LOSS_NAMES, *clip4cir.LOSS_NAMES, "batch_all_triplet"]),
        help="L_CE over the batch or TIRG's soft triplet loss; esa: the self-expanding loss or "
        "VSE++'s; hashing: the batch-all triplet loss",
    )
    g.add_argument(
        "--learning_rate", type=float, default=1e-2, help="SGD's learning rate (the task's own)"
    )
    g.add_argument(
        "--learning_rate_decay_frequency",
        type=int,
        default=9999999,
        help="multiply the learning rate by 0.1 every this many iterations",
    )
    g.add_argument("--batch_size", type=int, default=32, help="queries per batch and process")
    g.add_argument("--weight_decay", type=float, default=1e-6, help="the optimizer's")
    g.add_argument(
        "--num_iters",
        type=int,
        default=210000,
        help="training iterations, as TIRG (esa: from its num_epochs)",
    )
    g.add_argument(
        "--grad_clip",
        type=float,
        default=0.0,
        help="clip the gradients' total l2 norm to this (0: no clipping)",
    )
    g.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="autocast precision of the forward passes (losses and the GA norms stay fp32); fp16 "
        "uses a GradScaler and runs on CUDA only (in fp32 on CPU, with a note)",
    )
    ga.add_arguments(p, add_bool)
    hashing.add_arguments(p)
    esa.add_arguments(p)
    clip4cir.add_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds every random draw of the run")
    g.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: CUDA when torch sees a GPU",
    )
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
    g.add_argument("--log_dir", default="./logs", help="run folders go here")
    add_bool(g, "--test_only", False, "only evaluate --model_checkpoint")
    g.add_argument(
        "--model_checkpoint",
        default=None,
        help=f"the checkpoint --test_only evaluates; '{UNTRAINED}': the model as initialised "
        "from --seed, the baseline that training should beat",
    )
    g.add_argument(
        "--resume",
        default=None,
        help="continue a run: 'auto' (the newest <log_dir>/<time>_<comment> folder with a "
        "latest.pt whose args.json equals this command's; else a new run, saying why), a run "
        "folder, or a checkpoint file (arguments may change). The run folder is reused and the "
        "run ends exactly as an uninterrupted one would",
    )
    g.add_argument(
        "--checkpoint_every",
        type=int,
        default=1000,
        help="also write latest.pt every N iterations (besides every evaluation), so a crash "
        "loses at most N iterations; 0: only at evaluations",
    )
    given = given_flags(p, argv)
    args = p.parse_args(argv)
    if args.ensemble and not args.test_only:
        p.error("--ensemble evaluates two checkpoints: add --test_only")
    if args.ensemble:
        if args.model_checkpoint:
            p.error("--ensemble names both checkpoints; leave out --model_checkpoint")
        args.model_checkpoint = args.ensemble[0]  # whose training settings label the result
    for name, value in getattr(task_of(args), "DEFAULTS", {}).items():
        if name not in given:  # before a checkpoint's settings, which take precedence
            setattr(args, name, value)
    if args.test_only and args.model_checkpoint not in (None, UNTRAINED):
        checkpoints.adopt_training_settings(p, args, given)
    task = task_of(args)
    if task is esa and "num_iters" not in given:
        args.num_iters = None  # --num_epochs of the training set: set once it is loaded
    if task is not None and (
        args.model not in task.MODEL_NAMES or args.loss not in task.LOSS_NAMES
    ):
        p.error(
            f"--dataset {args.dataset} trains --model {'/'.join(task.MODEL_NAMES)} with --loss "
            f"{'/'.join(task.LOSS_NAMES)}; got --model {args.model} --loss {args.loss}"
        )
    if task is None and (
        args.model not in img_text_composition_models.MODELS or args.loss not in LOSSES
    ):
        p.error(f"--model {args.model} --loss {args.loss} is not a composed-retrieval setting")
    ga.resolve_arguments(p, args)
    if args.comment is None:
        args.comment = f"{args.dataset}_{args.model}" + ("_ga" if args.ga else "")
    if "comment" not in given and args.test_only:  # not to be taken for the trained run
        if args.model_checkpoint == UNTRAINED:
            args.comment += "_untrained"
        elif args.ensemble:
            args.comment += "_ensemble"
    if args.pretrained is None:  # the synthetic stand-ins train from scratch
        args.pretrained = args.dataset != "css3d" and (task is None or bool(args.dataset_path))
    if args.test_only and not args.model_checkpoint:
        p.error(f"--test_only needs --model_checkpoint (a file, or '{UNTRAINED}')")
    if args.ensemble and TASKS.get(args.dataset) is not esa:
        p.error("--ensemble (ESA*) is for the image-text data sets")
    if args.batch_size < 2 or args.eval_every < 1:
        p.error("--batch_size must be >= 2 (batch norm and the batch losses need two) and "
                "--eval_every >= 1")  # fmt: skip
    if args.num_iters is not None and args.num_iters < 1:
        p.error("--num_iters must be >= 1 (to evaluate a checkpoint: --test_only)")
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
    if (args.image_size is not None and args.image_size < 32) or args.loader_num_workers < 0:
        p.error("--image_size must be >= 32 and --loader_num_workers >= 0")
    if args.category_to_train != "all" and args.dataset != "fashioniq":
        p.error("--category_to_train is a fashioniq option")
    if task in (hashing, clip4cir):
        args.text_encoder = "none"
    elif args.text_encoder is None:
        args.text_encoder = "hf" if args.use_bert else "lstm"
    elif args.use_bert and args.text_encoder == "lstm":
        p.error("--use_bert asks for a BERT text encoder, but --text_encoder is lstm")
    args.use_bert = args.text_encoder not in ("lstm", "gru", "none")
    photographs = (args.dataset in datasets.DATASETS and args.dataset != "css3d") or (
        task is hashing and args.dataset_path
    )
    if not photographs:
        args.image_size = None  # css3d, the precomputed features and the synthetic sets
    if args.text_model and args.text_encoder != "hf":
        p.error(
            "--text_model picks the model of --text_encoder hf; a bert-as-service server "
            "chooses its own (python text_model.py serve --text_model ...)"
        )
    if not args.bert_timeout > 0:
        p.error("--bert_timeout must be a positive number of seconds")
    return args


def given_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The destinations of the flags ``argv`` gives explicitly (the others take defaults)."""
    explicit = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"nargs": action.nargs} if action.nargs not in (None, 0) else {}
            if action.nargs == 0:
                kwargs = {"action": "store_const", "const": True}
            explicit.add_argument(*action.option_strings, dest=action.dest,
                                  default=argparse.SUPPRESS, **kwargs)  # fmt: skip
    return set(vars(explicit.parse_known_args(argv)[0]))


def resolve_dataset_path(args) -> str:
    if args.dataset in TASKS:
        return TASKS[args.dataset].resolve_dataset_path(args)
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
    if args.dataset in TASKS:
        return TASKS[args.dataset].build_datasets(args)
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
    elif cls is datasets.CSSDataset:
        options = {"on_bad_image": args.on_bad_image}
    try:
        trainset = cls(path, split="train", transform=transform, **options)
        testset = cls(path, split="test", transform=transform, **options)
    except (FileNotFoundError, datasets.DatasetFormatError) as e:
        raise RunError(str(e)) from None
    trainset.seed = args.seed
    return trainset, testset


def build_text_encoder(args, texts: list[str]) -> torch.nn.Module:
    """The --text_encoder (``text_model.build_text_encoder``), prefilled on the run's device."""
    try:
        return text_model.build_text_encoder(args, texts, distributed.pick_device(args.device))
    except text_model.TextEncoderError as e:
        raise RunError(str(e)) from None


def build_model(args, trainset, testset=None) -> torch.nn.Module:
    """The --model with the --text_encoder; a frozen text encoder is prefilled with the texts of
    ``trainset`` (and of ``testset`` when given, so evaluation encodes nothing new either)."""
    if task_of(args) is not None:
        return task_of(args).build_model(args, trainset)
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


def build_optimizer(args, model):
    """(optimizer, scheduler): SGD, momentum 0.9, the ResNet body at 0.1x the learning rate (as
    TIRG intended), x0.1 every ``--learning_rate_decay_frequency`` iterations; the other tasks
    bring their own. The scheduler is a LambdaLR that ``set_learning_rate`` reads."""
    if task_of(args) is not None:
        return task_of(args).build_optimizer(args, model)
    backbone = model.backbone_parameters()
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in backbone_ids]
    groups = [
        {"params": rest, "lr": args.learning_rate},
        {"params": backbone, "lr": 0.1 * args.learning_rate},
    ]
    optimizer = torch.optim.SGD(
        groups, lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay
    )
    decay = args.learning_rate_decay_frequency
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.1 ** (i // decay))


def set_learning_rate(optimizer, scheduler, iteration: int) -> float:
    """Set the scheduler's rates for ``iteration`` without stepping it: the rate is a pure
    function of the iteration, so a resumed run needs no scheduler state. Returns the first
    group's rate."""
    for group, base, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
    ):
        group["lr"] = base * factor(iteration)
    return optimizer.param_groups[0]["lr"]


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters L_GA^I perturbs and L1/L2 penalize: every trainable one (as the GA code's
    ``model.named_parameters()`` loop, and as SGD's weight decay)."""
    return [p for p in model.parameters() if p.requires_grad]


def cir_forward(model, batch, args, device, adv_input=None) -> dict:
    """One training forward of composed image retrieval (the task contract of main.py).

    Returns ``losses`` ({'ce' or 'triplet': the main loss, and the model's own losses}), ``sim``
    (the composed query and target features, for L_S), ``adv_input`` (what L_GA^A
    differentiates: the normalized query images, or the query image features the text is
    composed with) and ``fgsm_input`` (the query images). ``adv_input``: query images to use in
    place of the batch's (FGSM's second forward).
    """
    source = torch_function.normalize_images(batch["source_img_data"].to(device, non_blocking=True))
    target = torch_function.normalize_images(batch["target_img_data"].to(device, non_blocking=True))
    if adv_input is not None:
        source = adv_input
    elif (args.ga_adv_eps > 0 and args.ga_adv_input == "pixels") or args.fgsm_eps > 0:
        source.requires_grad_(True)
    with distributed.autocast(args.precision, device):
        out = model(source, batch["mod"], target)
    query, target_features = out["query"].float(), out["target"].float()
    losses = {LOSS_TERM[args.loss]: LOSSES[args.loss](query, target_features)}
    losses.update({name: value.float() for name, value in out["extra_losses"].items()})
    pixels = args.ga_adv_input == "pixels"
    return {
        "losses": losses,
        "sim": (query, target_features),
        "adv_input": source if pixels else out["source_features"],
        "fgsm_input": source,
    }


def input_gradient(loss, x, scaler=None, create_graph=False) -> torch.Tensor:
    """dL/dx, zeros where x does not reach L (textonly ignores the image).

    Under fp16 it is taken of the loss times the GradScaler's scale, so that it does not flush
    to zero, and divided by it again (torch.amp's gradient-penalty recipe).
    """
    scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
    (grad,) = torch.autograd.grad(
        loss * scale, x, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    if grad is None:
        return torch.zeros_like(x)
    return grad / scale if scale != 1.0 else grad


def data_loss(out: dict, args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = main loss + the model's own losses + eta * L_S, and its terms by name."""
    terms = dict(out["losses"])
    if args.sim_weight > 0:
        terms["sim"] = ga.similarity_matching_loss(*out["sim"])
    loss = sum(args.sim_weight * v if name == "sim" else v for name, v in terms.items())
    return loss, terms


def train_step(
    model, optimizer, batch, args, device, iteration: int, scaler=None, forward=cir_forward
) -> dict[str, torch.Tensor]:
    """One step on L_all = L + L_GA^A + L_GA^I (GA paper, eq. 9); ``forward``: the task's.

    Returns every term, 'total' and 'grad_norm' as detached 0-dim tensors: nothing here waits
    for the device. ``iteration`` seeds L_GA^I's noise (with --seed), so resumed and
    multi-process runs draw the same r. With an enabled GradScaler (fp16) the values also hold
    'fp16_skipped': 1 when the scaler skipped the step (inf/NaN gradients).
    """
    params = trainable_parameters(model)
    out = forward(model, batch, args, device)
    loss, terms = data_loss(out, args)  # L = L_CE (or triplet) + model losses + eta * L_S
    total = loss
    x_grad = None
    if args.ga_adv_eps > 0:  # L_GA^A: a function of dL/dx, so backward differentiates twice
        x_grad = input_gradient(loss, out["adv_input"], scaler, create_graph=True)
        terms["ga_adv"] = ga.adversarial_gradient_augmentation(
            x_grad, args.ga_adv_eps, args.ga_adv_q
        )
        total = total + terms["ga_adv"]
    if args.fgsm_eps > 0:  # baseline: 0.5 (L(x) + L(x + eps sign dL/dx))
        x = out.get("fgsm_input", out["adv_input"])
        if x_grad is None or x is not out["adv_input"]:
            x_grad = input_gradient(loss, x, scaler)
        x_adv = ga.fgsm_example(x, x_grad, args.fgsm_eps)
        terms["fgsm"] = data_loss(forward(model, batch, args, device, adv_input=x_adv), args)[0]
        total = total + 0.5 * (terms["fgsm"] - loss)
    if args.l1_weight > 0:
        terms["l1"] = ga.l1_regularization(params)
        total = total + args.l1_weight * terms["l1"]
    if args.l2_weight > 0:
        terms["l2"] = ga.l2_regularization(params)
        total = total + args.l2_weight * terms["l2"]

    optimizer.zero_grad(set_to_none=True)
    # The query images may require gradients (L_GA^A on pixels, FGSM); only the parameters'
    # are wanted here.
    (total if scaler is None else scaler.scale(total)).backward(inputs=params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if args.ga_iso_gamma > 0:  # L_GA^I as gradient noise, after DDP has averaged the gradients
        terms["ga_iso"] = ga.add_isotropic_gradient_noise(
            params, args.ga_iso_gamma, args.ga_iso_noise, args.ga_iso_scale, args.seed, iteration,
            cumulative=args.ga_iso_cumulative == "on", drift=args.ga_iso_drift == "on",
        )  # fmt: skip
        total = total + terms["ga_iso"]
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if args.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, args.grad_clip, grad_norm)
    values = {name: value.detach() for name, value in terms.items()}
    values["total"], values["grad_norm"] = total.detach(), grad_norm
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.is_enabled():
            values["fp16_skipped"] = torch.tensor(float(scaler.get_scale() < scale))
    return values


# --------------------------------------------------------------------------- evaluation


def evaluate_all(model, trainset, testset, train_queries, args, device) -> dict:
    """M_s on the fixed training sample, M_t on the test split, and WHM (alpha 0.5).

    ``train_queries``: composed retrieval's fixed training sample (the other tasks draw theirs).
    """
    models = model if isinstance(model, list) else [model]  # a list: ESA*'s ensemble
    was_training = models[0].training
    for m in models:
        m.eval()
    with torch.no_grad():
        if task_of(args) is not None:
            result = task_of(args).evaluate(model, trainset, testset, args, device)
        else:
            result = test_retrieval.evaluate_composed(
                model, trainset, testset, train_queries, device,
                args.eval_batch_size, args.loader_num_workers,
            )  # fmt: skip
    for m in models:
        m.train(was_training)
    result["WHM"] = whm_lib.whm(result["train"]["M"], result["test"]["M"], alpha=0.5)
    return result


# --------------------------------------------------------------------------- the run


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
    scheduler,
    scaler=None,
    context=None,
    run_dir: str | None = None,
    last_good: str | None = None,
) -> dict | None:
    """Train from ``start_iteration`` to --num_iters; returns the last evaluation (rank 0).

    ``model`` may be wrapped in DDP (``context`` then says which rank this is); rank 0 alone
    (``run`` is None elsewhere) logs, evaluates the unwrapped model and writes checkpoints.
    Raises TrainingInterrupted after writing a checkpoint when SIGINT/SIGTERM arrived (at the
    end of the step in one process; at the next --log_every step under torchrun, where the
    ranks agree), and RunError on a non-finite loss (the last good checkpoint is kept).
    """
    context = context or distributed.Context(device=device)
    module = distributed.unwrap(model)
    forward = getattr(task_of(args), "forward", cir_forward)
    run_dir = run.dir if run is not None else run_dir
    latest = os.path.join(run_dir, "latest.pt")
    if last_good is None and os.path.isfile(latest):
        last_good = latest
    train_queries = training_sample(trainset, args)
    loader = torch.utils.data.DataLoader(
        trainset,
        batch_sampler=distributed.RankBatches(
            start_iteration, args.num_iters, args.batch_size, context.rank, context.world_size
        ),
        num_workers=args.loader_num_workers,
        collate_fn=getattr(trainset, "collate_fn", datasets.collate_queries),
        worker_init_fn=datasets.worker_init,
        pin_memory=device.type == "cuda",
        persistent_workers=args.loader_num_workers > 0,
        prefetch_factor=4 if args.loader_num_workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed),  # leaves torch's global RNG alone
    )
    totals: dict[str, torch.Tensor] = {}
    result = None
    model.train()
    progress = datasets.progress(  # in a log file: redrawn every 30 s
        total=len(loader), desc="train", dynamic_ncols=True, disable=not context.is_main
    )
    iteration = start_iteration
    with checkpoints.StopOnSignal() as stop, progress:
        for batch in loader:
            distributed.seed_step(args.seed, context.rank, iteration)
            lr = set_learning_rate(optimizer, scheduler, iteration)
            values = train_step(model, optimizer, batch, args, device, iteration, scaler, forward)
            checkpoints.check_finite(values, iteration, last_good)
            iteration += 1
            progress.update(1)
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + value
            signum = stop.signum if not context.distributed else 0
            if iteration % args.log_every == 0 or iteration == args.num_iters:
                count = iteration % args.log_every or args.log_every
                averages, signum = distributed.agree_on_log(totals, stop.signum, context)
                averages = {name: value / count for name, value in averages.items()}
                if run is not None:
                    for name, value in {**averages, **ga.scale_norms(module)}.items():
                        run.writer.add_scalar(f"train/{name}", value, iteration)
                    run.writer.add_scalar("train/lr", lr, iteration)
                progress.set_postfix(loss=f"{averages['total']:.4f}", lr=f"{lr:.1e}", refresh=False)
                totals = {}
            if signum and context.is_main:
                tqdm.write(
                    f"received {signal.Signals(signum).name}: writing a checkpoint of iteration "
                    f"{iteration}, then stopping"
                )
            evaluate = iteration % args.eval_every == 0 or iteration == args.num_iters
            periodic = args.checkpoint_every and iteration % args.checkpoint_every == 0
            if evaluate or periodic or signum:
                # A finite loss can still end in non-finite weights (an overflowing update);
                # they must never replace the last good checkpoint. Every rank checks (the
                # replicas are equal), so all stop together.
                checkpoints.check_finite_parameters(module, iteration, last_good)
            if (evaluate or periodic or signum) and context.is_main:
                improved = False
                if evaluate:
                    result = evaluate_all(module, trainset, testset, train_queries, args, device)
                    last = {k: v.item() for k, v in values.items()}
                    checkpoints.record_evaluation(run, iteration, result, trainset.synthetic, last)
                    tqdm.write(checkpoints.format_result(result, iteration, trainset.synthetic))
                    improved = result["train"]["M"] > best_metric
                    best_metric = max(best_metric, result["train"]["M"])
                state = checkpoints.checkpoint_state(
                    model, optimizer, scaler, args, iteration, best_metric, context.world_size
                )
                checkpoints.save_checkpoint(latest, state)
                if improved:
                    checkpoints.copy_checkpoint(latest, os.path.join(run_dir, "best.pt"), state)
            if evaluate or periodic or signum:
                distributed.barrier(context)  # the other ranks wait for rank 0's evaluation
                last_good = latest
            if signum:
                raise checkpoints.TrainingInterrupted(signum, iteration, latest, run_dir)
    return result


def training_sample(trainset, args):
    """Composed retrieval's fixed sample of training queries for M_s (None for other tasks)."""
    if args.dataset in TASKS:
        return None
    return trainset.sample_training_queries(args.train_eval_queries, seed=10_000_019)


def unused_parameters(model, trainset, args, device) -> list[str]:
    """Names of the trainable parameters this model's loss never reaches (DDP must be told).

    One forward pass of two training queries in eval mode (so BatchNorm's running statistics and
    the RNG are left alone), its autograd graph walked back from the outputs. L1/L2 reach every
    parameter.
    """
    if args.l1_weight > 0 or args.l2_weight > 0 or task_of(args) is not None:
        return []  # the other tasks' losses reach every parameter
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
    except checkpoints.TrainingInterrupted as e:
        if rank == 0:
            print(
                f"{e}; the checkpoint {e.checkpoint} holds it.\n"
                f"resume with:  {checkpoints.resume_command(argv, e.run_dir)}\n"
                f"(or the same command with --resume auto)",
                file=sys.stderr,
            )
        raise SystemExit(128 + e.signum) from None
    finally:
        checkpoints.stop_workers()  # an error must end the process, not wait on its workers
        checkpoints.release_run_folders()


def _main(args) -> dict | None:
    distributed.seed_everything(args.seed)
    try:
        context = distributed.init(distributed.pick_device(args.device))
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
    if context.distributed:
        # One process generates the synthetic data (per node too, for folders that are not
        # shared); the others read what it wrote.
        distributed.on_rank_zero(lambda: resolve_dataset_path(args), context, RunError)
        if context.local_rank == 0 and not is_main:
            resolve_dataset_path(args)
        distributed.barrier(context)
    trainset, testset = build_datasets(args)
    if is_main:
        print(datasets.describe(trainset))
        print(datasets.describe(testset))
    if TASKS.get(args.dataset) is esa:
        args.world_size = context.world_size  # the epoch count of its learning-rate step
        if args.num_iters is None:
            args.num_iters = esa.num_iters_for(args, trainset, context.world_size)
    model = build_model(args, trainset, testset).to(device)
    optimizer, scheduler = build_optimizer(args, model)
    scaler = distributed.make_grad_scaler(args.precision, device)

    if args.test_only:
        if not is_main:  # evaluation is one process's job
            return None
        models, iteration = [], 0
        for path in args.ensemble or [args.model_checkpoint]:
            if models:  # ESA*: a second model of the same settings
                model = build_model(args, trainset, testset).to(device)
            if path == UNTRAINED:
                print(f"evaluating the untrained model (initialised from --seed {args.seed})")
            else:
                state = checkpoints.load_checkpoint(path, args)
                checkpoints.restore_model(model, state, path)
                iteration = max(iteration, state.get("iteration", 0))
            models.append(model)
        run = checkpoints.Run(args)
        print(f"run folder: {run.dir}")
        try:
            train_queries = training_sample(trainset, args)
            result = evaluate_all(
                models if args.ensemble else model, trainset, testset, train_queries, args, device
            )
            checkpoints.record_evaluation(run, iteration, result, trainset.synthetic)
            if "ranked" in result:
                visualize.log_qualitative(run, testset, result, iteration)
            print(checkpoints.format_result(result, iteration, trainset.synthetic))
            return result
        finally:
            run.close()

    start_iteration, best_metric, resume_dir, checkpoint = 0, -1.0, None, None
    if args.resume:

        def read_resume_state():
            defaults = vars(parse_args(["--dataset", args.dataset, "--model", args.model]))
            path = checkpoints.find_resume_checkpoint(args, defaults)
            return path, (
                checkpoints.load_checkpoint(path, args, checkpoints.RESUME_KEYS) if path else None
            )

        checkpoint, state = distributed.on_rank_zero(read_resume_state, context, RunError)
        if checkpoint is not None:  # (--resume auto without a matching run said why)
            checkpoints.restore_model(model, state, checkpoint)
            checkpoints.restore_training(optimizer, scaler, state, checkpoint)
            start_iteration, best_metric = state["iteration"], state["best_metric"]
            resume_dir = os.path.dirname(os.path.abspath(checkpoint))
            if is_main:
                checkpoints.reopen_run(args, state, checkpoint, context.world_size)
            del state

    run = checkpoints.Run(args, resume_dir, purge_step=start_iteration or None) if is_main else None
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
            train_queries = training_sample(trainset, args)
            result = evaluate_all(model, trainset, testset, train_queries, args, device)
            print(checkpoints.format_result(result, start_iteration, trainset.synthetic))
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
            scheduler=scheduler,
            scaler=scaler,
            context=context,
            run_dir=run_dir,
            last_good=checkpoint,
        )
        if is_main:
            if result is not None and "ranked" in result:  # <run>/qualitative.png
                visualize.log_qualitative(run, testset, result, args.num_iters)
            summary = datasets.bad_image_summary(trainset, testset)
            if summary:
                print(summary, file=sys.stderr)
            # The last evaluation printed the final result already: the last line on stdout.
        return result
    finally:
        if run is not None:
            run.close()


if __name__ == "__main__":
    main()
