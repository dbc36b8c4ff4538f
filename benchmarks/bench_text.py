"""Text encoders: TIRG training-step time with the frozen hf encoder (cache warm) vs the LSTM,
and the cost of the first pass that fills the embedding cache. Prints one JSON object.

    python benchmarks/bench_text.py                          # full synthetic CSS texts, 5 rounds
    python benchmarks/bench_text.py --css_size small --rounds 3 --out /tmp/bench_text.json

Both variants are TIRG (embed 512) on the same pre-collated CSS batches (batch 32, 64x64 images),
on CPU, timed in interleaved rounds in one process so machine load hits both alike; only the text
encoder differs (LSTM 512-d, trained; MiniLM 384-d, frozen, answered from its table). A step is
forward, the batch-based classification loss, backward and an SGD step (main.build_optimizer's
groups), as main.train_step without the GA terms. Target: warm hf step <= 1.1x the LSTM step.

The cache fill encodes every distinct text of the synthetic CSS (train and test) into an empty
cache folder, as a first run does; the "second run" numbers reload that folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import distributed  # noqa: E402
import main  # noqa: E402
import text_model  # noqa: E402
import torch_function  # noqa: E402


def make_batches(trainset, batch_size: int, count: int) -> list[dict]:
    return [
        datasets.collate_queries([trainset[b * batch_size + i] for i in range(batch_size)])
        for b in range(count)
    ]


def step(model, optimizer, batch) -> float:
    source = torch_function.normalize_images(batch["source_img_data"])
    target = torch_function.normalize_images(batch["target_img_data"])
    out = model(source, batch["mod"], target)
    loss = torch_function.batch_classification_loss(out["query"], out["target"])
    loss = loss + sum(out["extra_losses"].values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def time_steps(model, optimizer, batches) -> list[float]:
    times = []
    for batch in batches:
        start = time.perf_counter()
        step(model, optimizer, batch)
        times.append(time.perf_counter() - start)
    return times


def cache_fill(texts: list[str], cache_dir: str) -> dict:
    """First pass (empty cache, transformer loaded fresh) and a second run's reload."""
    text_model._LOADED.clear()  # time the load as a first run pays it
    start = time.perf_counter()
    encoder = text_model.HFTextEncoder(cache_dir=cache_dir)
    built = time.perf_counter()
    encoder(texts[:1])  # loads the transformer
    loaded = time.perf_counter()
    encoder.prefill(texts)
    filled = time.perf_counter()
    start2 = time.perf_counter()
    again = text_model.HFTextEncoder(cache_dir=cache_dir)
    new = again.prefill(texts)
    reloaded = time.perf_counter()
    return {
        "distinct_texts": len(texts),
        "first_run_seconds": filled - start,
        "identity_hash_seconds": built - start,
        "transformer_load_seconds": loaded - built,
        "encode_seconds": filled - loaded,
        "texts_per_second": (len(texts) - 1) / (filled - loaded),
        "cache_file_mb": os.path.getsize(encoder.table.path) / 2**20,
        "second_run_seconds": reloaded - start2,
        "second_run_texts_encoded": new,
        "second_run_loaded_transformer": again.transformer_loaded,
    }


def main_bench(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--css_size", default="full", help="synthetic CSS size: full or small")
    parser.add_argument("--data_dir", default=None, help="default: a temporary folder")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = opts.data_dir or os.path.join(tmp, "data")
        common = [
            "--dataset",
            "css3d",
            "--synthetic_size",
            opts.css_size,
            "--data_dir",
            data_dir,
            "--model",
            "tirg",
            "--batch_size",
            str(opts.batch_size),
            "--device",
            "cpu",
        ]
        args = {
            "lstm": main.parse_args([*common, "--text_encoder", "lstm"]),
            "hf": main.parse_args([*common, "--text_encoder", "hf"]),
        }
        trainset, testset = main.build_datasets(args["lstm"])
        texts = sorted(set(trainset.get_all_texts()) | set(testset.get_all_texts()))
        fill = cache_fill(texts, os.path.join(tmp, "fill_cache"))

        distributed.seed_everything(0)
        variants = {}
        for name, a in args.items():
            model = main.build_model(a, trainset, testset).train()
            variants[name] = (model, main.build_optimizer(a, model)[0])
        hf_encoder = variants["hf"][0].text_model
        calls_before = hf_encoder.encode_calls
        batches = make_batches(trainset, opts.batch_size, opts.steps + 1)
        for model, optimizer in variants.values():  # warm-up: allocator, first-call overheads
            time_steps(model, optimizer, batches[:1])
        times = {name: [] for name in variants}
        for _ in range(opts.rounds):
            for name, (model, optimizer) in variants.items():
                times[name] += time_steps(model, optimizer, batches[1:])
        median = {name: statistics.median(t) for name, t in times.items()}
        result = {
            "benchmark": "text encoders: TIRG train step, hf (warm cache) vs lstm; cache fill",
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "css": f"synthetic {opts.css_size}",
            "batch_size": opts.batch_size,
            "image_size": list(batches[0]["source_img_data"].shape[-2:]),
            "text_dims": {name: m.text_dim for name, (m, _) in variants.items()},
            "steps_per_variant": len(times["lstm"]),
            "step_seconds_median": median,
            "step_seconds_min": {name: min(t) for name, t in times.items()},
            "hf_over_lstm_median": median["hf"] / median["lstm"],
            "target_hf_over_lstm_at_most": 1.1,
            "meets_target": median["hf"] / median["lstm"] <= 1.1,
            "hf_transformer_calls_during_training": hf_encoder.encode_calls - calls_before,
            "cache_fill": fill,
        }
    text = json.dumps(result, indent=2)
    print(text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main_bench()
