"""Foundation benchmarks (issue 2); each part prints one JSON object.

    python benchmarks/bench_foundation.py step      # train step: ours vs the public GA code's
    python benchmarks/bench_foundation.py generate  # full-size synthetic CSS generation
    python benchmarks/bench_foundation.py eval      # evaluation on the full synthetic CSS test

``step`` times TIRG at batch 32 on 64x64 images with 2 CPU threads, data loading included, and,
in the same process and interleaved, a re-creation of the public GA code's training step as it is
written: its ``--model tirg`` is TIRGLastConv; it renders each CSS image in float64 with per-row
Python loops and applies ToTensor + Normalize per image on the main process; its LSTM gathers
the last output with a Python loop per sample; it uses one parameter group; and it switches
``torch.autograd.set_detect_anomaly(True)`` on inside every step (here only around backward;
the public code leaves it on globally, which also slows its forward, so this errs in its
favour). Beside it: the same public pipeline with the plain TIRG model, and a bare ResNet-18
forward+backward of the two batches (the floor). Numbers are seconds per iteration (median of
the repetitions) and ratios to the public step as written.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import css_generator  # noqa: E402
import datasets  # noqa: E402
import main  # noqa: E402
import test_retrieval  # noqa: E402
import torch_function  # noqa: E402

DATA_DIR = os.path.join(tempfile.gettempdir(), "tirg_ga_bench_data")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def full_css_path() -> str:
    path = os.path.join(DATA_DIR, "css3d_synthetic_full_seed0")
    if not os.path.isfile(os.path.join(path, datasets.CSS_NPY)):
        css_generator.generate(path, seed=0, size="full")
    return path


# --------------------------------------------------------------------------- the public GA path


def render_like_public_code(objects) -> np.ndarray:
    """TIRG/GA's 2D drawing as their code runs it: float64 canvas, a Python loop per row."""
    img = np.ones((64, 64, 3))
    for obj in objects:
        s = 4.0 * (2 if obj["size"] == "large" else 1)
        c = [v / 255.0 for v in css_generator.COLORS[obj["color"]]]
        y, x = obj["pos"][0] * 64, obj["pos"][1] * 64
        if obj["shape"] == "rectangle":
            img[int(y - s) : int(y + s), int(x - s) : int(x + s), :] = c
        elif obj["shape"] == "circle":
            for y0 in range(int(y - s), int(y + s) + 1):
                x0 = x + (abs(y0 - y) - s)
                img[y0, int(x0) : int(2 * x - x0), :] = c
        else:
            for y0 in range(int(y - s), int(y + s)):
                x0 = x + (y0 - y + s) / 2
                x1 = 2 * x - x0
                img[y0, int(min(x0, x1)) : int(max(x0, x1)), :] = c
    return img


class PublicStyleLSTM(torch.nn.Module):
    """The GA code's text path: per-text tensor building and a per-sample gather loop."""

    def __init__(self, lstm_model):
        super().__init__()
        self.inner = lstm_model
        self.out_dim = lstm_model.out_dim

    def forward(self, texts):
        m = self.inner
        encoded = [m.vocab.encode_text(t) for t in texts]
        lengths = [len(t) for t in encoded]
        ids = torch.zeros((max(lengths), len(texts))).long()
        for i in range(len(texts)):
            ids[: lengths[i], i] = torch.tensor(encoded[i])
        out, _ = m.lstm(m.embedding_layer(ids))
        last = torch.stack([out[lengths[i] - 1, i, :] for i in range(len(texts))])
        return m.fc_output(last)


def public_step_factory(trainset, batch_size, model_class="TIRGLastConv"):
    """The public step; ``model_class`` TIRGLastConv is what its ``--model tirg`` builds."""
    import torchvision

    import img_text_composition_models as models
    import text_model

    lstm = text_model.TextLSTMModel(trainset.get_all_texts(), 512, 512)
    model = getattr(models, model_class)(PublicStyleLSTM(lstm), embed_dim=512)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-6)
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(
                torch_function.IMAGENET_MEAN, torch_function.IMAGENET_STD
            ),
        ]
    )
    counter = [0]

    def step():
        items = []
        for _ in range(batch_size):
            query = trainset.sample_query(counter[0])
            counter[0] += 1
            items.append(
                (
                    transform(
                        render_like_public_code(trainset.imgs[query["source_img_id"]]["objects"])
                    ),
                    transform(
                        render_like_public_code(trainset.imgs[query["target_img_id"]]["objects"])
                    ),
                    query["mod"]["str"],
                )
            )
        img1 = torch.from_numpy(np.stack([it[0].numpy() for it in items])).float().requires_grad_()
        img2 = torch.from_numpy(np.stack([it[1].numpy() for it in items])).float()
        texts = [it[2] for it in items]
        query_features = model.normalization_layer(model.compose_img_text(img1, texts))
        target_features = model.normalization_layer(model.extract_img_feature(img2))
        loss = torch_function.batch_classification_loss(query_features, target_features)
        assert not torch.isnan(loss)
        loss.item()
        with torch.autograd.set_detect_anomaly(True):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return step


def resnet_floor_factory(batch_size):
    """A bare ResNet-18 forward+backward of a source and a target batch: the floor to approach."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=512)
    images = torch.randn(batch_size, 3, 64, 64)

    def step():
        net.zero_grad(set_to_none=True)
        (net(images).sum() + net(images).sum()).backward()

    return step


def our_step_factory(trainset, batch_size, model_name, workers, precision="fp32"):
    args = main.parse_args(
        ["--model", model_name, "--batch_size", str(batch_size), "--precision", precision]
    )
    model = main.build_model(args, trainset)
    optimizer = main.build_optimizer(args, model)[0]
    loader = torch.utils.data.DataLoader(
        trainset,
        batch_size=batch_size,
        sampler=range(10**9),
        num_workers=workers,
        collate_fn=datasets.collate_queries,
        worker_init_fn=datasets.worker_init,
        persistent_workers=workers > 0,
    )
    iterator = iter(loader)
    device = torch.device("cpu")
    counter = [0]

    def step():
        main.train_step(model, optimizer, next(iterator), args, device, counter[0])["total"].item()
        counter[0] += 1

    return step


def bench_step(args):
    torch.set_num_threads(2)
    trainset = datasets.CSSDataset(full_css_path(), "train", transform=datasets.to_uint8_tensor)
    variants = {
        "public_ga_code_step": public_step_factory(trainset, args.batch_size),
        "public_pipeline_with_tirg_model": public_step_factory(trainset, args.batch_size, "TIRG"),
        "resnet18_fwd_bwd_floor": resnet_floor_factory(args.batch_size),
        "ours_tirg_workers0": our_step_factory(trainset, args.batch_size, "tirg", 0),
        "ours_tirg_workers2": our_step_factory(trainset, args.batch_size, "tirg", 2),
        "ours_tirg_lastconv_workers0": our_step_factory(
            trainset, args.batch_size, "tirg_lastconv", 0
        ),
        "ours_tirg_bf16_workers0": our_step_factory(trainset, args.batch_size, "tirg", 0, "bf16"),
    }
    times = {name: [] for name in variants}
    for step in variants.values():  # warm-up
        for _ in range(2):
            step()
    for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
        for name, step in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(v) for name, v in times.items()}
    public = median["public_ga_code_step"]
    return {
        "benchmark": "train_step",
        "batch_size": args.batch_size,
        "image_size": 64,
        "threads": torch.get_num_threads(),
        "seconds_per_iter": {k: round(v, 4) for k, v in median.items()},
        "all_repetitions": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_to_public": {k: round(v / public, 3) for k, v in median.items()},
    }


def bench_generate(args):
    import tracemalloc

    out = tempfile.mkdtemp(prefix="css_gen_")
    start = time.perf_counter()
    meta = css_generator.generate(out, seed=0, size="full")
    seconds = time.perf_counter() - start
    tracemalloc.start()  # a second, traced run for memory: tracing slows it several times
    css_generator.generate(tempfile.mkdtemp(prefix="css_gen_"), seed=0, size="full")
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "benchmark": "generate_full_css",
        "seconds": round(seconds, 2),
        "peak_python_alloc_mb": round(traced_peak / 2**20, 1),
        "peak_rss_mb_process_incl_torch_import": round(peak_rss_mb(), 1),
        "counts": meta["counts"],
        "npy_mb": round(os.path.getsize(os.path.join(out, datasets.CSS_NPY)) / 2**20, 1),
    }


def bench_eval(args):
    torch.set_num_threads(2)
    testset = datasets.CSSDataset(full_css_path(), "test", transform=datasets.to_uint8_tensor)
    trainset = datasets.CSSDataset(full_css_path(), "train", transform=datasets.to_uint8_tensor)
    model_args = main.parse_args(["--model", args.model])
    model = main.build_model(model_args, trainset)
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    result = test_retrieval.test(
        model, testset, batch_size=256, device=torch.device("cpu"), num_workers=args.workers
    )
    return {
        "benchmark": "evaluate_css_test_split",
        "model": args.model,
        "queries": len(testset.test_queries),
        "gallery": len(testset.imgs),
        "workers": args.workers,
        "seconds_total": round(time.perf_counter() - start, 2),
        "seconds_features": round(result["seconds_features"], 2),
        "seconds_ranking": round(result["seconds_ranking"], 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_mb_before_eval": round(rss_before, 1),
    }


def main_cli(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("part", choices=["step", "generate", "eval"])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="tirg")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    result = {"step": bench_step, "generate": bench_generate, "eval": bench_eval}[args.part](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main_cli()
