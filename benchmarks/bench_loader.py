"""Images per second delivered by the training loader, against TIRG's loading path.

Generates a few thousand JPEG photos (default 400x300, about the size of MIT-States and
Fashion200k images) in MIT-States's layout in a temporary folder, then delivers the same training
queries (source + target image each) with:

- ``tirg``: TIRG's path. For each image on the main process: one ``PIL.Image.open`` +
  ``convert('RGB')``, then torchvision ``Resize(224)``, ``CenterCrop(224)``, ``ToTensor()``,
  ``Normalize(ImageNet)``; the batch is stacked as TIRG's training loop did.
- ``ours_w0_nodraft``: our loader on the main process, JPEG draft decoding switched off.
- ``ours_w0``: our loader on the main process (``num_workers=0``).
- ``ours_w<N>``: our loader with N worker processes (persistent, prefetching).

Our loader delivers uint8 (B, 3, 224, 224) batches; ImageNet normalization happens per batch on
the training device (``torch_function.normalize_images``); its CPU cost per batch is reported
separately. Variants are interleaved over several rounds and the median is kept, since the
machine may be shared. Prints JSON.

    python benchmarks/bench_loader.py                      # 2000 images, workers 0 and 2
    python benchmarks/bench_loader.py --num_images 4000 --workers 0 2 4 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import PIL
import PIL.Image
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import torch_function  # noqa: E402


def generate_photos(root: str, num_images: int, width: int, height: int, seed: int = 0) -> None:
    """JPEGs (quality 90) with smooth structure plus sensor-like noise, so they compress like
    photographs (tens of kB), in ``root/images/<adj> <noun>/<k>.jpg``."""
    rng = np.random.default_rng(seed)
    nouns = [f"thing{n:02d}" for n in range(max(1, num_images // 50))]
    adjs = ["old", "new", "wet", "dry", "big"]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for k in range(num_images):
        folder = os.path.join(root, "images", f"{adjs[k % 5]} {nouns[(k // 5) % len(nouns)]}")
        os.makedirs(folder, exist_ok=True)
        freq = rng.uniform(0.005, 0.05, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        channels = [
            127 + 100 * np.sin(freq[c, 0] * xx + freq[c, 1] * yy + phase[c]) for c in range(3)
        ]
        img = np.stack(channels, axis=2) + rng.normal(0, 12, size=(height, width, 3))
        PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{k:06d}.jpg"), quality=90
        )


class NoDraft(datasets.ResizeCenterCrop):
    """Our transform without JPEG draft decoding (full-resolution decode)."""

    def __init__(self, size):
        super().__init__(size)
        self.draft_size = None


def tirg_batches(dataset, indices, batch_size):
    """TIRG's path: per image, PIL open + torchvision transforms on the main process."""
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(224),
            torchvision.transforms.CenterCrop(224),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(
                torch_function.IMAGENET_MEAN, torch_function.IMAGENET_STD
            ),
        ]
    )

    def load(idx):
        with open(dataset.imgs[idx]["file_path"], "rb") as f:
            img = PIL.Image.open(f)
            img = img.convert("RGB")
        return transform(img)

    batch = []
    for index in indices:
        query = dataset.sample_query(index)
        batch.append((load(query["source_img_id"]), load(query["target_img_id"])))
        if len(batch) == batch_size:
            yield torch.stack([s for s, _ in batch]), torch.stack([t for _, t in batch])
            batch = []


def our_batches(dataset, indices, batch_size, workers):
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices,
        drop_last=True,
        num_workers=workers,
        collate_fn=datasets.collate_queries,
        worker_init_fn=_worker_init,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    for batch in loader:
        yield batch["source_img_data"], batch["target_img_data"]


def _worker_init(worker_id):
    torch.set_num_threads(1)


def measure(batches) -> dict:
    """Images/s over the whole pass (worker start-up and pipeline fill included) and over the
    batches after the first (steady state; slightly flattering to workers, whose prefetch queue
    fills while the first batch is awaited)."""
    start = time.perf_counter()
    first = None
    images = images_after_first = 0
    for source, target in batches:
        n = source.shape[0] + target.shape[0]
        images += n
        if first is None:
            first = time.perf_counter()
        else:
            images_after_first += n
    end = time.perf_counter()
    return {
        "images": images,
        "seconds": round(end - start, 4),
        "seconds_to_first_batch": round(first - start, 4),
        "images_per_second": round(images / (end - start), 1),
        "steady_images_per_second": round(images_after_first / max(end - first, 1e-9), 1),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_images", type=int, default=2000)
    p.add_argument("--width", type=int, default=400)
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--queries", type=int, default=640, help="training queries per measurement")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--dir", default=None, help="where to generate the photos (default: a tmp dir)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        start = time.perf_counter()
        generate_photos(root, args.num_images, args.width, args.height)
        seconds_generate = time.perf_counter() - start
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs]
        dataset = datasets.MITStates(root, "train", datasets.ResizeCenterCrop(224))
        nodraft = datasets.MITStates(root, "train", NoDraft(224))
        # Every variant decodes every image once first (warm page cache, lazy imports).
        for idx in range(len(dataset.imgs)):
            datasets.load_rgb_image(dataset.imgs[idx]["file_path"])
        variants = {
            "tirg": functools.partial(tirg_batches, dataset, batch_size=args.batch_size),
            "ours_w0_nodraft": functools.partial(
                our_batches, nodraft, batch_size=args.batch_size, workers=0
            ),
        }
        for w in args.workers:
            variants[f"ours_w{w}"] = functools.partial(
                our_batches, dataset, batch_size=args.batch_size, workers=w
            )
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for r in range(args.rounds):
            # Fresh queries each round (the same for every variant within a round).
            indices = range(r * args.queries, (r + 1) * args.queries)
            for name, make in variants.items():
                runs[name].append(measure(make(indices)))

        batch = torch.randint(0, 256, (args.batch_size, 3, 224, 224), dtype=torch.uint8)
        start = time.perf_counter()
        for _ in range(10):
            torch_function.normalize_images(batch)
        normalize_ms = (time.perf_counter() - start) / 10 * 1e3

    results = {
        name: {
            key: statistics.median(r[key] for r in rs)
            for key in ("images_per_second", "steady_images_per_second", "seconds_to_first_batch")
        }
        | {"rounds": rs}
        for name, rs in runs.items()
    }
    tirg = results["tirg"]["images_per_second"]
    tirg_steady = results["tirg"]["steady_images_per_second"]
    report = {
        "benchmark": "training loader images/second (source + target per query)",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "main_process_torch_threads": args.threads,
        },
        "config": {
            "num_images": args.num_images,
            "image_size": [args.width, args.height],
            "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1024, 1),
            "queries_per_measurement": args.queries,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "seconds_to_generate": round(seconds_generate, 1),
        },
        "results": results,
        "speedup_vs_tirg": {
            name: round(r["images_per_second"] / tirg, 2) for name, r in results.items()
        },
        "steady_speedup_vs_tirg": {
            name: round(r["steady_images_per_second"] / tirg_steady, 2)
            for name, r in results.items()
        },
        "cpu_normalize_ms_per_batch": round(normalize_ms, 2),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
