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
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import datasets
import gradient_augmentation as ga
import img_text_composition_models
import test_retrieval
import text_model
import torch_function
import whm as whm_lib

GA_DEFAULTS = {"sim_weight": 1e-3, "ga_adv_eps": 1e-6, "ga_adv_q": 1.0, "ga_iso_gamma": 0.01}
LOSSES = {
    "batch_based_classification": torch_function.batch_classification_loss,
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
    g.add_argument("--loader_num_workers", type=int, default=2)
    add_bool(
        g,
        "--use_complete_text_query",
        False,
        "use the complete target description as the text (not for css3d)",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tirg", choices=sorted(img_text_composition_models.MODELS))
    g.add_argument("--image_embed_dim", type=int, default=512)
    add_bool(g, "--use_bert", False, "encode texts with BERT instead of TIRG's LSTM")
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
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    g = p.add_argument_group("gradient augmentation (each weight 0 switches its term off)")
    add_bool(
        g,
        "--ga",
        False,
        f"switch on L_S, L_GA^A and L_GA^I at the GA paper's defaults {GA_DEFAULTS}",
    )
    g.add_argument("--sim_weight", type=float, default=None, help="eta, weight of L_S")
    g.add_argument("--ga_adv_eps", type=float, default=None, help="eps of L_GA^A")
    g.add_argument(
        "--ga_adv_q",
        type=float,
        default=None,
        help="dual norm q of L_GA^A (1: the l_inf threat model)",
    )
    g.add_argument("--ga_iso_gamma", type=float, default=None, help="gamma of L_GA^I")
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
        "--log_every", type=int, default=10, help="write training scalars every N iterations"
    )
    g.add_argument("--comment", default="test_notebook")
    g.add_argument("--log_dir", default="./logs")
    add_bool(g, "--test_only", False, "only evaluate --model_checkpoint")
    g.add_argument("--model_checkpoint", default=None)
    g.add_argument(
        "--resume",
        default=None,
        help="continue a run from this checkpoint (its run folder is reused)",
    )
    args = p.parse_args(argv)

    for name, default in GA_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default if args.ga else 0.0)
    if args.pretrained is None:
        args.pretrained = args.dataset != "css3d"
    if args.test_only and not args.model_checkpoint:
        p.error("--test_only needs --model_checkpoint")
    if args.batch_size < 1 or args.num_iters < 0 or args.eval_every < 1:
        p.error("--batch_size and --eval_every must be positive and --num_iters >= 0")
    if args.loss == "soft_triplet" and args.batch_size < 2:
        p.error("--loss soft_triplet needs --batch_size >= 2")
    if args.dataset == "css3d" and args.use_complete_text_query:
        p.error(
            "--use_complete_text_query has no meaning for css3d: CSS has only "
            "modification texts, no target descriptions"
        )
    if args.use_bert:
        p.error("--use_bert needs the BERT text encoders, which are not implemented yet")
    return args


# --------------------------------------------------------------------------- building blocks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """One autocast context for the run; fp32, and fp16 on CPU, run without autocast."""
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_dataset_path(args) -> str:
    if args.dataset_path:
        return args.dataset_path
    if args.dataset != "css3d":
        raise RunError(
            f"--dataset {args.dataset} needs --dataset_path (only css3d has a synthetic stand-in)"
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
    path = resolve_dataset_path(args)
    cls = datasets.DATASETS[args.dataset]
    transform = datasets.to_uint8_tensor
    try:
        trainset = cls(path, split="train", transform=transform)
        testset = cls(path, split="test", transform=transform)
    except (FileNotFoundError, datasets.DatasetFormatError) as e:
        raise RunError(str(e)) from None
    trainset.seed = args.seed
    return trainset, testset


def build_model(args, trainset) -> torch.nn.Module:
    text_encoder = text_model.TextLSTMModel(
        trainset.get_all_texts(),
        word_embed_dim=args.image_embed_dim,
        lstm_hidden_dim=args.image_embed_dim,
    )
    cls = img_text_composition_models.MODELS[args.model]
    try:
        return cls(text_encoder, embed_dim=args.image_embed_dim, pretrained=args.pretrained)
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


def compute_loss_terms(model, batch, args, device) -> dict[str, torch.Tensor]:
    """The unweighted loss terms of one batch, e.g. {'ce': ..., 'sim': ...}."""
    source = torch_function.normalize_images(batch["source_img_data"].to(device, non_blocking=True))
    target = torch_function.normalize_images(batch["target_img_data"].to(device, non_blocking=True))
    with autocast(args.precision, device):
        out = model(source, batch["mod"], target)
    query, target_features = out["query"].float(), out["target"].float()
    terms = {LOSS_TERM[args.loss]: LOSSES[args.loss](query, target_features)}
    terms.update(out["extra_losses"])
    if args.sim_weight:
        terms["sim"] = ga.similarity_matching_loss(query, target_features)
    return terms


def loss_weights(args) -> dict[str, float]:
    return {"sim": args.sim_weight}


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


def train_step(model, optimizer, batch, args, device) -> dict[str, float]:
    """One SGD step; returns every loss term and the total as floats."""
    terms = compute_loss_terms(model, batch, args, device)
    weights = loss_weights(args)
    total = sum(weights.get(name, 1.0) * value for name, value in terms.items())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    values = {name: value.item() for name, value in terms.items()}
    values["total"] = total.item()
    return values


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, args) -> dict:
    if not os.path.isfile(path):
        raise RunError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(
            f"{path} is not a readable TIRG-GA checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "args" not in state:
        raise RunError(f"{path} is not a TIRG-GA checkpoint (no 'model'/'args' entries)")
    saved = state["args"]
    for key in ("model", "dataset", "image_embed_dim"):
        if saved.get(key) != getattr(args, key):
            raise RunError(
                f"{path} holds a checkpoint of --{key} {saved.get(key)}, but this run "
                f"asks for --{key} {getattr(args, key)}"
            )
    return state


def restore_model(model, state: dict, path: str) -> None:
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RunError(f"{path} does not fit this model: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------- evaluation


def evaluate_all(model, trainset, testset, train_queries, args, device) -> dict:
    """M_s on the fixed training sample, M_t on the test queries, and WHM (alpha 0.5)."""
    workers = args.loader_num_workers
    train = test_retrieval.test_on_training_queries(
        model, trainset, train_queries, args.batch_size, device, workers
    )
    test = test_retrieval.test(model, testset, args.batch_size, device, workers)
    result = {}
    for split, res in (("train", train), ("test", test)):
        recalls = {f"R@{k}": 100.0 * v for k, v in res["recall"].items()}
        result[split] = {
            **recalls,
            "M": sum(recalls.values()) / len(recalls),
            "seconds_features": res["seconds_features"],
            "seconds_ranking": res["seconds_ranking"],
        }
    result["WHM"] = whm_lib.whm(result["train"]["M"], result["test"]["M"], alpha=0.5)
    return result


def record_evaluation(run, iteration: int, result: dict, synthetic: bool) -> None:
    """Append to metrics.jsonl (no timings there, so equal seeds give equal files) and TB."""
    lines = []
    for split in ("train", "test"):
        metrics = {k: v for k, v in result[split].items() if not k.startswith("seconds")}
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
        for key, value in metrics.items():
            run.writer.add_scalar(f"eval/{split}/{key}", value, iteration)
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
    """The run folder and its TensorBoard writer."""

    def __init__(self, args, resume_dir: str | None = None):
        from tensorboardX import SummaryWriter

        if resume_dir:
            self.dir = resume_dir
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = os.path.join(args.log_dir, f"{stamp}_{args.comment}")
            self.dir, n = base, 1
            while os.path.exists(self.dir):
                self.dir, n = f"{base}.{n}", n + 1
            os.makedirs(self.dir)
        with open(os.path.join(self.dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True)
        self.writer = SummaryWriter(self.dir)

    def close(self):
        self.writer.close()


def truncate_metrics(run_dir: str, iteration: int) -> None:
    """Drop metrics.jsonl lines written after ``iteration`` (a resumed run writes them again)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if json.loads(line)["iteration"] <= iteration]
    with open(path, "w") as f:
        f.writelines(kept)


def worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # loader workers render/decode; leave the cores to the model


def train(
    args, model, optimizer, trainset, testset, device, run, start_iteration: int, best_metric: float
) -> dict | None:
    train_queries = trainset.sample_training_queries(args.train_eval_queries, seed=10_000_019)
    sampler = range(start_iteration * args.batch_size, args.num_iters * args.batch_size)
    loader = torch.utils.data.DataLoader(
        trainset,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.loader_num_workers,
        collate_fn=datasets.collate_queries,
        worker_init_fn=worker_init,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    latest = os.path.join(run.dir, "latest.pt")
    last_good = latest if os.path.isfile(latest) else None
    totals: dict[str, float] = {}
    result = None
    model.train()
    progress = tqdm(
        loader, total=len(loader), initial=0, desc="train", dynamic_ncols=True, disable=None
    )
    iteration = start_iteration
    for batch in progress:
        lr = set_learning_rate(optimizer, args, iteration)
        values = train_step(model, optimizer, batch, args, device)
        check_finite(values, iteration, last_good)
        iteration += 1
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value
        if iteration % args.log_every == 0 or iteration == args.num_iters:
            count = (
                args.log_every if iteration % args.log_every == 0 else (iteration % args.log_every)
            )
            for name, value in totals.items():
                run.writer.add_scalar(f"train/{name}", value / count, iteration)
            run.writer.add_scalar("train/lr", lr, iteration)
            progress.set_postfix(loss=f"{totals['total'] / count:.4f}", lr=f"{lr:.1e}")
            totals = {}
        if iteration % args.eval_every == 0 or iteration == args.num_iters:
            result = evaluate_all(model, trainset, testset, train_queries, args, device)
            record_evaluation(run, iteration, result, trainset.synthetic)
            tqdm.write(format_result(result, iteration, trainset.synthetic))
            improved = result["train"]["M"] > best_metric
            best_metric = max(best_metric, result["train"]["M"])
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "iteration": iteration,
                "best_metric": best_metric,
                "args": vars(args),
                "torch_rng": torch.get_rng_state(),
            }
            save_checkpoint(latest, state)
            last_good = latest
            if improved:
                save_checkpoint(os.path.join(run.dir, "best.pt"), state)
    return result


def main(argv=None) -> dict | None:
    """Run what the command line runs; returns the final evaluation result."""
    args = parse_args(argv)
    try:
        return _main(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(args) -> dict | None:
    seed_everything(args.seed)
    device = pick_device(args.device)
    trainset, testset = build_datasets(args)
    print(datasets.describe(trainset))
    print(datasets.describe(testset))
    model = build_model(args, trainset).to(device)
    optimizer = build_optimizer(args, model)

    start_iteration, best_metric, resume_dir = 0, -1.0, None
    checkpoint = args.resume or (args.model_checkpoint if args.test_only else None)
    if checkpoint:
        state = load_checkpoint(checkpoint, args)
        restore_model(model, state, checkpoint)
        if args.resume:
            optimizer.load_state_dict(state["optimizer"])
            start_iteration, best_metric = state["iteration"], state["best_metric"]
            torch.set_rng_state(state["torch_rng"])
            resume_dir = os.path.dirname(os.path.abspath(checkpoint))
            truncate_metrics(resume_dir, start_iteration)
            print(f"resuming {resume_dir} at iteration {start_iteration}")

    run = Run(args, resume_dir)
    print(f"run folder: {run.dir}")
    try:
        if args.test_only:
            train_queries = trainset.sample_training_queries(
                args.train_eval_queries, seed=10_000_019
            )
            result = evaluate_all(model, trainset, testset, train_queries, args, device)
            record_evaluation(run, 0, result, trainset.synthetic)
            print(format_result(result, 0, trainset.synthetic))
            return result
        result = train(
            args, model, optimizer, trainset, testset, device, run, start_iteration, best_metric
        )
        if result is not None:
            print(format_result(result, args.num_iters, trainset.synthetic))
        return result
    finally:
        run.close()


if __name__ == "__main__":
    main()
