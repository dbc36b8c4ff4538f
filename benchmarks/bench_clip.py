"""One stage-1 training step of composed retrieval on CLIP: ours against CLIP4Cir's.

    nice python benchmarks/bench_clip.py                         # clip_tiny, batch 32, CPU
    python benchmarks/bench_clip.py --clip_model RN50 --batch_size 128 --device cuda

- ``ours``: ``main.train_step`` with ``clip4cir.forward`` (--model clip_sum, --clip_stage
  finetune): uint8 batches normalised on the device, InfoNCE at scale 100, AdamW;
- ``clip4cir``: our re-creation of the step of CLIP4Cir's ``clip_fine_tune.py`` (written from
  reading it): tokenise, encode the reference, caption and target, ``normalize(ref + caption)``,
  logits ``100 * pred @ normalize(target).T``, cross-entropy, backward, AdamW step;
- ``ours_ga_features`` and ``ours_ga_pixels``: ours with --ga (L_S, L_GA^A, L_GA^I), L_GA^A on the
  query image features or on the pixels (double backward, math SDPA backend).

Both start from the same weights and batch; ``first_loss_equal`` says whether their first losses
agree. Prints one JSON object (milliseconds per step, the median of --steps after --warmup).
Wall times on a shared machine are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import clip4cir  # noqa: E402
import main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip_model", default="clip_tiny")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def time_steps(step, steps: int, warmup: int, device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    return times


def clip4cir_step(model, optimizer, batch, device) -> torch.Tensor:
    """CLIP4Cir's clip_fine_tune.py step (element-wise sum, both encoders), re-created."""
    clip = model.clip
    reference = model.normalize(batch["reference_img_data"].to(device))
    target = model.normalize(batch["target_img_data"].to(device))
    optimizer.zero_grad()
    text_inputs = model.tokenizer(batch["caption"]).to(device)
    reference_features = clip.encode_image(reference)
    caption_features = clip.encode_text(text_inputs)
    predicted = F.normalize(reference_features + caption_features, dim=-1)
    target_features = F.normalize(clip.encode_image(target), dim=-1)
    logits = 100 * predicted @ target_features.T
    loss = F.cross_entropy(logits, torch.arange(len(logits), device=device))
    loss.backward()
    optimizer.step()
    return loss.detach()


def main_(argv=None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    size = clip4cir.model_config(argparse.Namespace(clip_model=opts.clip_model))["vision_cfg"][
        "image_size"
    ]
    size = size[0] if isinstance(size, (list, tuple)) else size
    base = [
        "--dataset",
        "cirr",
        "--clip_model",
        opts.clip_model,
        "--model",
        "clip_sum",
        "--batch_size",
        str(opts.batch_size),
        "--learning_rate",
        "1e-5",
        "--device",
        opts.device,
    ]
    g = torch.Generator().manual_seed(0)
    b = opts.batch_size
    shape = (b, 3, size, size)
    batch = {
        "reference_img_data": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
        "target_img_data": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
        "caption": [f"change the object {i} to red and make it larger" for i in range(b)],
        "triplet": torch.arange(b),
        "reference": torch.arange(b),
        "target": torch.arange(b),
    }
    torch.manual_seed(0)
    args = main.parse_args(base)
    reference_model = clip4cir.build_model(args, None).to(device)
    result = {
        "clip_model": opts.clip_model,
        "batch_size": b,
        "device": str(device),
        "threads": opts.threads,
        "steps": opts.steps,
    }
    first = {}
    for name, extra in (
        ("ours", []),
        ("ours_ga_features", ["--ga", "--ga_adv_input", "features"]),
        ("ours_ga_pixels", ["--ga"]),
    ):
        args = main.parse_args(base + extra)
        model = copy.deepcopy(reference_model).train()
        optimizer, _ = clip4cir.build_optimizer(args, model)

        def step(i, model=model, optimizer=optimizer, args=args, name=name):
            values = main.train_step(
                model, optimizer, batch, args, device, i, forward=clip4cir.forward
            )
            first.setdefault(name, float(values["infonce"]))

        result[f"{name}_ms"] = statistics.median(time_steps(step, opts.steps, opts.warmup, device))
    model = copy.deepcopy(reference_model).train()
    optimizer = torch.optim.AdamW(
        model.clip.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-7, weight_decay=1e-2
    )

    def theirs(i):
        loss = clip4cir_step(model, optimizer, batch, device)
        first.setdefault("clip4cir", float(loss))

    result["clip4cir_ms"] = statistics.median(time_steps(theirs, opts.steps, opts.warmup, device))
    result["ours_over_clip4cir"] = result["ours_ms"] / result["clip4cir_ms"]
    result["first_loss"] = first
    result["first_loss_equal"] = abs(first["ours"] - first["clip4cir"]) <= 1e-5 * abs(
        first["clip4cir"]
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main_()
