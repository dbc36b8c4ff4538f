"""Recall@k at the Fashion200k test shape: ours (exact, bf16 screen) vs TIRG's NumPy argsort loop.

    python benchmarks/bench_recall.py                  # 33,480 x 29,789 x 512, 2 threads
    python benchmarks/bench_recall.py --baseline_queries 1000 --variants exact tirg_numpy

Random features of the Fashion200k test shape (33,480 queries, 29,789 gallery images, 512-d),
labels with about 3 gallery items each (the paper's 3 targets per query) and one excluded source
per query. ``--near_target 5`` makes each query a gallery item plus noise (R@1 about 0.6: close
races, the bf16 screen's hard case). Each variant runs in its own process on ``--threads``
threads, so its peak memory is that process's resident-set high-water mark
(``resource.getrusage``; tracemalloc would miss torch's allocations):
- ``exact``: ``test_retrieval.recall_at_k`` as evaluation calls it (precision ``auto``: on a CPU
  with AVX512-BF16 or AMX, a bf16 screen decides the queries whose answer bf16 rounding cannot
  change and ranks the rest in fp32; the result equals the fp32 one);
- ``exact_no_sample``: ``exact`` without its sample pass (``SAMPLE_MIN_PER_K`` set out of
  reach), i.e. the screen scoring every (query, gallery item) pair;
- ``exact_fp32``: the same with ``precision='fp32'`` (chunked fp32 matmul + topk);
- ``faiss``: the same with ``backend='faiss'`` (an exact ``Flat`` index; only if faiss-cpu is
  installed);
- ``tirg_numpy``: google/tirg's ``test_retrieval.test`` from the features on: row-by-row
  normalization, the full similarity matrix ``all_queries.dot(all_imgs.T)``, the sources set to
  -10e10, ``np.argsort(-sims[i, :])[:110]`` row by row, recall over caption strings. It runs
  on the first ``--baseline_queries`` queries and is extrapolated linearly (time, and the
  memory: the full Q x N float32 matrix, 3.7 GB at this shape, plus the int64 argsort of every
  row, 7.4 GB, which the ``[:110]`` views keep alive); the gallery normalization is a fixed
  cost. The extrapolation misses the cost of building and faulting in gigabytes (the whole
  run, ``--baseline_queries 33480``, needs about 12 GB and takes 1.0-1.7x the extrapolated
  time). ``exact`` recomputes recall on that subset to check that both agree;
- ``tirg_numpy_rowwise``: the same one query at a time (a matrix-vector product per query and
  no Q x N matrix, as the brief for this benchmark describes TIRG's loop);
- ``matmul_floor``: only the Q x N similarity products, in the chunks, the reused output
  buffer and the precision ``exact`` uses (bf16 where the screen runs), nothing else: no method
  that scores every pair can beat it, so TIRG's time over it bounds the speed-up of such a
  method here. ``exact``'s sample pass beats it by not scoring most pairs of queries whose hits
  rank far down (nearly all of them with random features; few with ``--near_target``).
Prints one JSON object: wall and CPU seconds (all threads; steadier on a shared machine), peak
RSS (MB) and its increase after the features were made, and ``exact`` against the targets
(>= 20x faster than TIRG's loop, peak <= 2 GB).
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
TARGET_SPEEDUP = 20.0
TARGET_PEAK_MB = 2048.0
VARIANTS = [
    "exact",
    "exact_no_sample",
    "exact_fp32",
    "faiss",
    "tirg_numpy",
    "tirg_numpy_rowwise",
    "matmul_floor",
]


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


def tirg_numpy_rowwise_recall(queries, all_imgs, query_labels, gallery_labels, exclude, ks):
    """The same ranking one query at a time (``queries[i:i+1].dot(all_imgs.T)``, as older TIRG
    code did): no Q x N matrix, but a matrix-vector product per query."""
    import numpy as np

    all_queries = queries.copy()
    for i in range(all_queries.shape[0]):
        all_queries[i, :] /= np.linalg.norm(all_queries[i, :])
    nn_result = []
    for i in range(all_queries.shape[0]):
        sims = all_queries[i : i + 1, :].dot(all_imgs.T)
        sims[0, exclude[i]] = -10e10  # remove query image
        nn_result.append(np.argsort(-sims[0, :])[:110])
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
    if opts.worker in ("exact", "exact_no_sample", "exact_fp32", "faiss"):
        if opts.worker == "exact_no_sample":
            test_retrieval.SAMPLE_MIN_PER_K = float("inf")
        kwargs = {
            "exact": {},  # precision "auto": the bf16 screen on CPUs with AVX512-BF16 or AMX
            "exact_no_sample": {},
            "exact_fp32": {"precision": "fp32"},
            "faiss": {"backend": "faiss"},
        }[opts.worker]
        if opts.worker == "faiss":
            import faiss

            faiss.omp_set_num_threads(opts.threads)
        start = time.perf_counter()
        recall = test_retrieval.recall_at_k(
            queries, gallery, query_labels, gallery_labels, KS, exclude, **kwargs
        )
        out["seconds"] = time.perf_counter() - start
        out["cpu_seconds"] = cpu_seconds() - cpu_before
        out["recall"] = recall
        subset = slice(0, opts.baseline_queries)
        out["recall_subset"] = test_retrieval.recall_at_k(
            queries[subset], gallery, query_labels[subset], gallery_labels, KS, exclude[subset],
            **kwargs,
        )  # fmt: skip
    elif opts.worker == "matmul_floor":
        queries_t = torch.nn.functional.normalize(torch.from_numpy(queries), dim=1)
        gallery_t = torch.nn.functional.normalize(torch.from_numpy(gallery), dim=1)
        dtype = torch.bfloat16 if _bf16_screen_available() else torch.float32
        queries_t, gallery_t = queries_t.to(dtype), gallery_t.to(dtype)
        chunk = test_retrieval._default_chunk_size(opts.gallery)
        buffer = test_retrieval._similarity_buffer(min(chunk, opts.queries), gallery_t)
        start = time.perf_counter()
        for row in range(0, opts.queries, chunk):
            test_retrieval._similarities(queries_t[row : row + chunk], gallery_t, buffer)
        out["seconds"] = time.perf_counter() - start
        out["cpu_seconds"] = cpu_seconds() - cpu_before
        out["dtype"] = str(dtype)
    elif opts.worker in ("tirg_numpy", "tirg_numpy_rowwise"):
        n = opts.baseline_queries
        start = time.perf_counter()
        all_imgs = tirg_normalize_gallery(gallery)
        fixed_seconds, fixed_cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
        start, cpu_start = time.perf_counter(), cpu_seconds()
        baseline = tirg_numpy_recall if opts.worker == "tirg_numpy" else tirg_numpy_rowwise_recall
        recall = baseline(queries[:n], all_imgs, query_labels[:n], gallery_labels, exclude[:n], KS)
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


def _bf16_screen_available() -> bool:
    sys.path.insert(0, ROOT)
    import torch

    import test_retrieval

    return test_retrieval._use_bf16_screen("auto", torch.device("cpu"), "exact", 10**6, 50)


def run_variant(variant: str, opts) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(opts.threads)  # NumPy's BLAS too: TIRG's loop gets the same cores
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant]
    for name in ("queries", "gallery", "dim", "threads", "baseline_queries", "near_target"):
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
        if variant == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                variants.append({"variant": "faiss", "skipped": "faiss-cpu is not installed"})
                continue
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        variants.append(run_variant(variant, opts))
    by_name = {v["variant"]: v for v in variants}
    result = {
        "benchmark": "recall_at_k at the Fashion200k test shape",
        "shape": {"queries": opts.queries, "gallery": opts.gallery, "dim": opts.dim},
        "near_target": opts.near_target,
        "bf16_screen": _bf16_screen_available(),
        "ks": list(KS),
        "threads": opts.threads,
        "variants": variants,
    }
    exact = by_name.get("exact", {})
    for name in ("tirg_numpy", "tirg_numpy_rowwise"):
        tirg = by_name.get(name, {})
        if "seconds" not in exact or "seconds" not in tirg:
            continue
        speedup = tirg["seconds"] / exact["seconds"]
        result[f"speedup_exact_vs_{name}"] = speedup
        # CPU time (all threads) is steadier than wall time on a shared machine
        result[f"cpu_time_ratio_{name}_to_exact"] = tirg["cpu_seconds"] / exact["cpu_seconds"]
        result[f"exact_agrees_with_{name}_on_subset"] = (
            exact["recall_subset"] == tirg["recall_subset"]
        )
        result[f"targets_vs_{name}"] = {
            "speedup>=20x (wall clock)": speedup >= TARGET_SPEEDUP,
            "speedup>=20x (cpu time)": result[f"cpu_time_ratio_{name}_to_exact"] >= TARGET_SPEEDUP,
            "peak<=2GB": exact["peak_rss_mb"] <= TARGET_PEAK_MB,
        }
    floor = by_name.get("matmul_floor", {})
    tirg = by_name.get("tirg_numpy", {})
    if "seconds" in floor and "seconds" in tirg:
        result["max_speedup_vs_tirg_numpy_scoring_every_pair"] = tirg["seconds"] / floor["seconds"]
    whole = by_name.get("exact_no_sample", {})
    if "seconds" in exact and "seconds" in whole:
        result["no_sample_seconds_ratio_to_exact"] = whole["seconds"] / exact["seconds"]
        result["no_sample_agrees_with_exact"] = whole["recall"] == exact["recall"]
    fp32 = by_name.get("exact_fp32", {})
    if "seconds" in exact and "seconds" in fp32:
        result["fp32_seconds_ratio_to_exact"] = fp32["seconds"] / exact["seconds"]
        result["exact_agrees_with_fp32"] = fp32["recall"] == exact["recall"]
    for name in ("tirg_numpy", "tirg_numpy_rowwise"):
        tirg = by_name.get(name, {})
        if "seconds" in fp32 and "seconds" in tirg:
            result[f"speedup_fp32_vs_{name}"] = tirg["seconds"] / fp32["seconds"]
    faiss_result = by_name.get("faiss", {})
    if "seconds" in exact and "seconds" in faiss_result:
        result["faiss_seconds_ratio_to_exact"] = faiss_result["seconds"] / exact["seconds"]
        result["faiss_agrees_with_exact"] = faiss_result["recall"] == exact["recall"]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
