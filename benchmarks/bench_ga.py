"""Cost of the Gradient Augmentation terms: training-step time relative to the plain step.

Every variant runs ``main.train_step`` on the same model and the same batch (random 64x64
images, CSS-like texts), in one process, interleaved: each repetition times every variant once,
in a shuffled order, so that load from other processes hits all of them alike. Each ratio is
reported as the median over repetitions of (variant step time / plain step time of the same
repetition) and as the ratio of the fastest steps, for wall-clock and for this process's CPU time.

    python benchmarks/bench_ga.py                       # CPU, batch 32, 2 threads
    python benchmarks/bench_ga.py --device cuda --batch_size 200 --repeats 30

Prints one JSON object. Expected on CPU (TIRG, batch 32, 64x64), the price of plain autograd:
about 1.8x for ga_pixels (L_S + L_GA^A on pixels + L_GA^I) and about 1.15x for iso.
``iso_noise_seconds`` is L_GA^I's own work outside the step (``add_isotropic_gradient_noise`` on
the model's parameters: draw, add, dot).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradient_augmentation  # noqa: E402
import img_text_composition_models  # noqa: E402
import main  # noqa: E402
import text_model  # noqa: E402

TEXTS = [
    "make circle small",
    "add small red circle to top-center",
    "remove red object",
    "make middle-left small gray object large",
    "make triangle blue",
    "add large cyan rectangle to bottom-right",
]

VARIANTS = {
    "plain": [],
    "adv_pixels": ["--ga_adv_eps", "1e-6"],
    "adv_features": ["--ga_adv_eps", "1e-6", "--ga_adv_input", "features"],
    "iso": ["--ga_iso_gamma", "0.01"],
    "ga_pixels": ["--ga"],  # L_S + L_GA^A (pixels) + L_GA^I: "both"
    "ga_features": ["--ga", "--ga_adv_input", "features"],
    "fgsm": ["--fgsm_eps", "0.01"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tirg", choices=sorted(img_text_composition_models.MODELS))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--repeats", type=int, default=12, help="timed rounds over all variants")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    return p.parse_args(argv)


def make_batch(batch_size: int, image_size: int, generator: torch.Generator) -> dict:
    shape = (batch_size, 3, image_size, image_size)
    return {
        "source_img_data": torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8),
        "target_img_data": torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8),
        "mod": [TEXTS[i % len(TEXTS)] for i in range(batch_size)],
    }


def timed_step(model, optimizer, batch, args, device, iteration) -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds) of one training step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    main.train_step(model, optimizer, batch, args, device, iteration)["total"].item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def summarize(times: dict[str, list[float]]) -> dict:
    plain = times["plain"]
    others = [name for name in times if name != "plain"]
    return {
        "median_step_seconds": {name: statistics.median(t) for name, t in times.items()},
        "min_step_seconds": {name: min(t) for name, t in times.items()},
        "ratio_to_plain": {
            name: statistics.median(v / p for v, p in zip(times[name], plain)) for name in others
        },
        "ratio_of_minimums": {name: min(times[name]) / min(plain) for name in others},
    }


def run(options) -> dict:
    if options.device == "cpu":
        torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    torch.manual_seed(0)
    encoder = text_model.TextLSTMModel(TEXTS)
    model = img_text_composition_models.MODELS[options.model](encoder).to(device).train()
    variants = ["plain"] + [v for v in options.variants if v != "plain"]
    step_args = {
        name: main.parse_args(
            [*VARIANTS[name], "--model", options.model, "--precision", options.precision]
        )
        for name in variants
    }
    optimizer = main.build_optimizer(step_args["plain"], model)[0]
    batch = make_batch(options.batch_size, options.image_size, torch.Generator().manual_seed(0))

    iteration = 0
    for name in variants:
        for _ in range(options.warmup):
            timed_step(model, optimizer, batch, step_args[name], device, iteration)
            iteration += 1
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    order = random.Random(0)
    for _ in range(options.repeats):
        round_order = variants[:]
        order.shuffle(round_order)
        for name in round_order:
            seconds, cpu_seconds = timed_step(
                model, optimizer, batch, step_args[name], device, iteration
            )
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            iteration += 1

    # L_GA^I's own work: draw, add to the gradients, dot for the logged value.
    params = main.trainable_parameters(model)
    iso_seconds = []
    for i in range(max(options.repeats // 2, 3)):
        start = time.perf_counter()
        gradient_augmentation.add_isotropic_gradient_noise(params, 0.01, "gaussian", "mean", 0, i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        iso_seconds.append(time.perf_counter() - start)
    plain_seconds = statistics.median(wall["plain"])

    return {
        "model": options.model,
        "trainable_parameters": sum(p.numel() for p in params),
        "iso_noise_seconds": statistics.median(iso_seconds),
        "iso_noise_ratio_to_plain": statistics.median(iso_seconds) / plain_seconds,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch_size": options.batch_size,
        "image_size": options.image_size,
        "precision": options.precision,
        "repeats": options.repeats,
        "wall_clock": summarize(wall),
        # CPU time of this process: on a machine shared with other jobs, waiting for a core does
        # not count, so it is the steadier measure (with one thread it is the work done).
        "cpu_time": summarize(cpu),
    }


if __name__ == "__main__":
    print(json.dumps(run(parse_args()), indent=2))
