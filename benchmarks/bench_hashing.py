"""Hashing retrieval speed: Hamming mAP at the CUB shape, and top-100 Hamming search at 1M codes.

    nice python benchmarks/bench_hashing.py                       # both parts, 2 threads
    python benchmarks/bench_hashing.py --parts map --threads 2
    python benchmarks/bench_hashing.py --parts search --search_queries 10000

Part ``map`` (CUB-200-2011's shape: 5,794 test queries, 5,994 training database, 64 bits,
random ±1 codes, 200 classes):
- ``ours``: ``test_retrieval.hamming_map`` (fp32 matmul distances, (segment, distance)
  histograms, no sort);
- ``sort``: the same distances ranked by a chunked stable ``torch.sort`` per row, then the
  cumulative-precision AP (the obvious vectorised alternative, for the record);
- ``seed_numpy``: our NumPy re-creation of the seed's ``utils.compute_mAP`` loop (per query:
  Hamming distances ``(q != D).sum(1)``, an argsort, relevance, cumsum / rank, AP), written from
  reading its code. The seed's ``torch.sort`` leaves the order of ties unspecified; here the
  argsort is stable, so ties follow our rule (database index) and the values must agree.
  ``--seed_queries`` < 5,794 runs the loop on that many queries and extrapolates linearly.

Part ``search`` (``--search_db`` 1,000,000 database items, ``--search_queries`` queries, top
100, each method in its own process so its peak RSS is its own):
- ``hamming``: ``test_retrieval.hamming_top_k`` over 64-bit ±1 codes (ties by index);
- ``cosine``: fp32 cosine top-100 over 512-d L2-normalized features, chunked ``q @ g.T`` + topk;
- ``faiss_binary``: ``faiss.IndexBinaryFlat`` on the packed codes (a reference only: its order
  among tied distances is not the rule; skipped without faiss-cpu).
``--search_time_queries`` < ``--search_queries`` times that many queries and extrapolates
linearly (both scale with the number of queries; the database is built once and not timed).

Peak RSS is the process's high-water mark, building the data included (the 1M x 512 fp32
database alone is 2 GB; its random generation needs more).

Prints one JSON object. On a shared machine, two threads can lose badly to other processes'
load (each small op waits for the busy core); ``--threads 1`` is then the steadier comparison
with the single-threaded NumPy loop. Wall times on a shared machine are noisy: run it with
``nice`` and read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import test_retrieval  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def random_codes(n: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, bits), generator=g).float() * 2 - 1


def seed_numpy_map(query_codes, db_codes, query_labels, db_labels) -> float:
    """The seed's per-query compute_mAP loop, re-created in NumPy (stable argsort)."""
    ranks = np.arange(1, db_codes.shape[0] + 1, dtype=np.float64)
    aps = []
    for i in range(query_codes.shape[0]):
        hamming = (query_codes[i] != db_codes).astype(np.int64).sum(1)
        order = np.argsort(hamming, kind="stable")
        correct = (query_labels[i] == db_labels[order]).astype(np.float64)
        precision = np.cumsum(correct) / ranks
        aps.append((precision * correct).sum() / correct.sum())
    return float(np.mean(aps))


def sort_based_map(query_codes, db_codes, query_labels, db_labels, chunk=256) -> float:
    aps = []
    ranks = torch.arange(1, db_codes.shape[0] + 1, dtype=torch.float64)
    for s in range(0, len(query_codes), chunk):
        h = test_retrieval.hamming_distances(query_codes[s : s + chunk], db_codes)
        order = torch.sort(h, dim=1, stable=True).indices
        rel = (db_labels[order] == query_labels[s : s + chunk, None]).double()
        aps.append(((rel.cumsum(1) / ranks) * rel).sum(1) / rel.sum(1))
    return float(torch.cat(aps).mean())


def part_map(args) -> dict:
    n_q, n_db, bits, n_classes = 5794, 5994, 64, 200
    q, d = random_codes(n_q, bits, 0), random_codes(n_db, bits, 1)
    g = torch.Generator().manual_seed(2)
    ql = torch.randint(0, n_classes, (n_q,), generator=g)
    dl = torch.randint(0, n_classes, (n_db,), generator=g)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours = test_retrieval.hamming_map(q, d, ql, dl)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    by_sort = sort_based_map(q, d, ql, dl)
    sort_s = time.perf_counter() - t
    m = min(args.seed_queries, n_q)
    qn, dn, qln, dln = q.numpy(), d.numpy(), ql.numpy(), dl.numpy()
    t = time.perf_counter()
    seed_value = seed_numpy_map(qn[:m], dn, qln[:m], dln)
    seed_s = (time.perf_counter() - t) * n_q / m
    ours_subset = test_retrieval.hamming_map(q[:m], d, ql[:m], dl) if m < n_q else ours
    return {
        "shape": {"queries": n_q, "database": n_db, "bits": bits, "classes": n_classes},
        "ours_s": round(min(times), 4),
        "ours_s_all_repeats": [round(x, 4) for x in times],
        "sort_based_s": round(sort_s, 4),
        "seed_numpy_s": round(seed_s, 3),
        "seed_queries_timed": m,
        "speedup_vs_seed": round(seed_s / min(times), 1),
        "target_speedup": 50,
        "map_ours": ours,
        "map_sort_based": by_sort,
        "map_seed_numpy_on_timed_queries": seed_value,
        "map_ours_on_timed_queries": ours_subset,
        "abs_difference": abs(seed_value - ours_subset),
    }


def search_child(method: str, args) -> dict:
    torch.set_num_threads(args.threads)
    n_db, k = args.search_db, 100
    n_time = min(args.search_time_queries, args.search_queries)
    if method == "cosine":
        g = torch.Generator().manual_seed(5)
        db = torch.nn.functional.normalize(torch.randn(n_db, 512, generator=g), dim=1)
        q = torch.nn.functional.normalize(torch.randn(n_time, 512, generator=g), dim=1)
        t = time.perf_counter()
        rows = max(1, (1 << 24) // n_db)
        for s in range(0, n_time, rows):
            torch.topk(q[s : s + rows] @ db.T, k, dim=1)
        seconds = time.perf_counter() - t
    else:
        db, q = random_codes(n_db, 64, 6), random_codes(n_time, 64, 7)
        if method == "faiss_binary":
            import faiss

            faiss.omp_set_num_threads(args.threads)

            def pack(codes):
                return np.packbits((codes.numpy() > 0).astype(np.uint8), axis=1)

            index = faiss.IndexBinaryFlat(64)
            index.add(pack(db))
            q_packed = pack(q)
            t = time.perf_counter()
            index.search(q_packed, k)
        else:
            t = time.perf_counter()
            test_retrieval.hamming_top_k(q, db, k)
        seconds = time.perf_counter() - t
    scale = args.search_queries / n_time
    return {
        "seconds_timed": round(seconds, 3),
        "seconds_for_all_queries": round(seconds * scale, 2),
        "extrapolated": n_time < args.search_queries,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def part_search(args) -> dict:
    methods = ["hamming", "cosine"]
    try:
        import faiss  # noqa: F401

        methods.append("faiss_binary")
    except ImportError:
        pass
    result = {
        "database": args.search_db,
        "queries": args.search_queries,
        "queries_timed": min(args.search_time_queries, args.search_queries),
        "k": 100,
    }
    for method in methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", method]
        cmd += [f"--{name}={getattr(args, name)}" for name in (
            "threads", "search_db", "search_queries", "search_time_queries")]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result[method] = json.loads(out.strip().splitlines()[-1])
    hamming, cosine = result["hamming"]["seconds_timed"], result["cosine"]["seconds_timed"]
    result["speedup_hamming_vs_cosine"] = round(cosine / hamming, 2)
    if "faiss_binary" in result:
        result["speedup_faiss_binary_vs_cosine"] = round(
            cosine / result["faiss_binary"]["seconds_timed"], 2
        )
    result["target_speedup"] = 10
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["map", "search"], choices=["map", "search"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed_queries", type=int, default=5794)
    p.add_argument("--search_db", type=int, default=1_000_000)
    p.add_argument("--search_queries", type=int, default=10_000)
    p.add_argument("--search_time_queries", type=int, default=10_000)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(search_child(args.child, args)))
        return
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if "map" in args.parts:
        result["map_cub_shape"] = part_map(args)
    if "search" in args.parts:
        result["top100_search"] = part_search(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
