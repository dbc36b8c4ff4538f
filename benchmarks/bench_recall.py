"""Recall@k at the Fashion200k test shape: our chunked fp32 ranking vs TIRG's NumPy argsort loop.

    python benchmarks/bench_recall.py                          # 33,480 x 29,789 x 512, 2 threads
    python benchmarks/bench_recall.py --baseline_queries 33480 # TIRG's loop run whole (~12 GB)
    python benchmarks/bench_recall.py --device cuda --variants ours

Random features of the Fashion200k test shape (33,480 queries, 29,789 gallery images, 512-d),
labels with about 3 gallery items each (the paper's 3 targets per query) and one excluded source
per query. ``--near_target 5`` makes each query a gallery item plus noise (R@1 about 0.6). Each
variant runs in its own process on ``--threads`` threads, so its peak memory is that process's
resident-set high-water mark (``resource.getrusage``; tracemalloc would miss torch's
allocations):
- ``ours``: ``test_retrieval.recall_at_k`` as evaluation calls it: chunks of ``q @ g.T`` in fp32
  and ``topk`` on ``--device`` (on CUDA its peak GPU memory is reported too);
- ``tirg_numpy``: google/tirg's ``test_retrieval.test`` from the features on: row-by-row
  normalization, the full similarity matrix ``all_queries.dot(all_imgs.T)``, the sources set to
  -10e10, ``np.argsort(-sims[i, :])[:110]`` row by row, recall over caption strings. It runs on
  the first ``--baseline_queries`` queries and is extrapolated linearly (time, and memory: the
  full Q x N float32 matrix, 3.7 GB at this shape, plus the int64 argsort of every row, 7.4 GB,
  which the ``[:110]`` views keep alive); ``ours`` recomputes recall on that subset to check
  that both agree.
Prints one JSON object: wall and CPU seconds (all threads; steadier on a shared machine), peak
RSS (MB) and its increase after the features were made, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KS = (1, 10, 50)  # Fashion200k's recalls
VARIANTS = ["ours", "tirg_numpy"]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime  # all threads of this process


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def make_data(n_queries: int, n_gallery: int, dim: int, near_target: float = 0.0, seed: int = 0):
    """Features, labels (about 3 gallery items each) and excluded sources. near_target = 0:
    independent queries (hits are rare and far down); > 0: each query is a random gallery item
    plus that much Gaussian noise per unit of its scale, and takes that item's label."""
    import numpy as np

    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n_gallery, dim), dtype=np.float32)
    n_labels = max(1, n_gallery // 3)
    gallery_labels = rng.integers(0, n_labels, size=n_gallery)
    if near_target > 0:
        target = rng.integers(0, n_gallery, size=n_queries)
        noise = rng.standard_normal((n_queries, dim), dtype=np.float32)
        queries = gallery[target] + np.float32(near_target) * noise
        query_labels = gallery_labels[target]
    else:
        queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
        query_labels = rng.integers(0, n_labels, size=n_queries)
    exclude = rng.integers(0, n_gallery, size=n_queries)
    return queries, gallery, query_labels, gallery_labels, exclude


def tirg_normalize_gallery(gallery):
    """TIRG's gallery normalization, row by row (a fixed cost, not extrapolated per query)."""
    import numpy as np

    all_imgs = gallery.copy()
    for i in range(all_imgs.shape[0]):
        all_imgs[i, :] /= np.linalg.norm(all_imgs[i, :])
    return all_imgs


def tirg_recall_from_lists(nn_result, query_labels, gallery_labels, ks):
    """TIRG's recall: captions of the listed items, then a membership test per query and k."""
    all_captions = [str(label) for label in gallery_labels]
    all_target_captions = [str(label) for label in query_labels]
    nn_result = [[all_captions[nn] for nn in nns] for nns in nn_result]
    out = {}
    for k in ks:
        r = 0.0
        for i, nns in enumerate(nn_result):
            if all_target_captions[i] in nns[:k]:
                r += 1
        out[k] = r / len(nn_result)
    return out


def tirg_numpy_recall(queries, all_imgs, query_labels, gallery_labels, exclude, ks):
    """google/tirg's test_retrieval.test from the normalized gallery on: the queries normalized
    row by row, the full (Q, N) similarity matrix, the source set to -10e10, one
    ``np.argsort(-sims[i, :])[:110]`` per row, then recall over caption strings."""
    import numpy as np

    all_queries = queries.copy()
    for i in range(all_queries.shape[0]):
        all_queries[i, :] /= np.linalg.norm(all_queries[i, :])
    sims = all_queries.dot(all_imgs.T)
    for i in range(len(exclude)):
        sims[i, exclude[i]] = -10e10  # remove query image
    nn_result = [np.argsort(-sims[i, :])[:110] for i in range(sims.shape[0])]
    return tirg_recall_from_lists(nn_result, query_labels, gallery_labels, ks)


def worker(opts) -> dict:
    """One variant in this process; returns its measurements."""
    import torch

    torch.set_num_threads(opts.threads)
    sys.path.insert(0, ROOT)
    import test_retrieval

    data = make_data(opts.queries, opts.gallery, opts.dim, opts.near_target)
    queries, gallery, query_labels, gallery_labels, exclude = data
    before = peak_rss_mb()
    cpu_before = cpu_seconds()
    out = {"variant": opts.worker, "threads": opts.threads}
    if opts.worker == "ours":
        device = torch.device(opts.device)
        queries_t, gallery_t = (
            torch.from_numpy(queries).to(device),
            torch.from_numpy(gallery).to(device),
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        recall = test_retrieval.recall_at_k(
            queries_t, gallery_t, query_labels, gallery_labels, KS, exclude
        )  # .item() at the end synchronizes
        out["seconds"] = time.perf_counter() - start
        out["cpu_seconds"] = cpu_seconds() - cpu_before
        out["recall"] = recall
        if device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            out["device_name"] = torch.cuda.get_device_name(device)
        subset = slice(0, opts.baseline_queries)
        out["recall_subset"] = test_retrieval.recall_at_k(
            queries[subset], gallery, query_labels[subset], gallery_labels, KS, exclude[subset]
        )
    elif opts.worker == "tirg_numpy":
        n = opts.baseline_queries
        start = time.perf_counter()
        all_imgs = tirg_normalize_gallery(gallery)
        fixed_seconds, fixed_cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
        start, cpu_start = time.perf_counter(), cpu_seconds()
        recall = tirg_numpy_recall(
            queries[:n], all_imgs, query_labels[:n], gallery_labels, exclude[:n], KS
        )
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        scale = opts.queries / n
        out.update(
            subset_queries=n,
            extrapolated=n < opts.queries,
            seconds_subset=seconds,
            seconds_gallery_normalization=fixed_seconds,
            seconds=fixed_seconds + seconds * scale,
            cpu_seconds=fixed_cpu + cpu * scale,
            recall_subset=recall,
        )
    else:
        raise ValueError(opts.worker)
    out["peak_rss_mb"] = peak_rss_mb()
    out["rss_increase_mb"] = out["peak_rss_mb"] - before
    if opts.worker == "tirg_numpy" and n < opts.queries:
        # TIRG holds the Q x N float32 matrix and, through nn_result's [:110] views, every
        # row's whole int64 argsort.
        out["peak_rss_mb_extrapolated"] = (
            out["peak_rss_mb"] + (opts.queries - n) * opts.gallery * (4 + 8) / 2**20
        )
    out["features_mb"] = (queries.nbytes + gallery.nbytes) / 2**20
    return out


def run_variant(variant: str, opts) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(opts.threads)  # NumPy's BLAS too: TIRG's loop gets the same cores
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant]
    for name in (
        "queries",
        "gallery",
        "dim",
        "threads",
        "baseline_queries",
        "near_target",
        "device",
    ):
        cmd += [f"--{name}", str(getattr(opts, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=33480)
    p.add_argument("--gallery", type=int, default=29789)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where ours ranks")
    p.add_argument("--baseline_queries", type=int, default=500, help="TIRG loop subset size")
    p.add_argument(
        "--near_target",
        type=float,
        default=0.0,
        help="0: independent random queries; >0: queries = a gallery item + this much noise",
    )
    p.add_argument(
        "--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
    )  # fmt: skip
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.baseline_queries = min(opts.baseline_queries, opts.queries)
    if opts.worker:
        print(json.dumps(worker(opts)))
        return None
    variants = []
    for variant in opts.variants:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        variants.append(run_variant(variant, opts))
    by_name = {v["variant"]: v for v in variants}
    result = {
        "benchmark": "recall_at_k at the Fashion200k test shape",
        "shape": {"queries": opts.queries, "gallery": opts.gallery, "dim": opts.dim},
        "near_target": opts.near_target,
        "ks": list(KS),
        "threads": opts.threads,
        "device": opts.device,
        "variants": variants,
    }
    ours, tirg = by_name.get("ours", {}), by_name.get("tirg_numpy", {})
    if "seconds" in ours and "seconds" in tirg:
        result["speedup_vs_tirg_numpy"] = tirg["seconds"] / ours["seconds"]
        # CPU time (all threads) is steadier than wall time on a shared machine
        result["cpu_time_ratio_tirg_numpy_to_ours"] = tirg["cpu_seconds"] / ours["cpu_seconds"]
        result["peak_rss_ratio_tirg_numpy_to_ours"] = (
            tirg.get("peak_rss_mb_extrapolated", tirg["peak_rss_mb"]) / ours["peak_rss_mb"]
        )
        result["ours_agrees_with_tirg_numpy_on_subset"] = (
            ours["recall_subset"] == tirg["recall_subset"]
        )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
