"""Scaling of training: 1 vs 2 DDP processes on CPU (gloo), and GPU throughput when CUDA exists.

CPU: TIRG, 64x64 synthetic CSS through the real loader (``distributed.RankBatches``, no loader
workers), ``main.train_step`` under DistributedDataParallel exactly as ``main.train`` runs it.
The 2 cores are split two ways:
  - ``1proc_2threads``: one process, batch B, 2 intra-op threads;
  - ``2proc_1thread``: two gloo processes, batch B each (global batch 2B), 1 thread each (what
    torchrun sets: OMP_NUM_THREADS=1);
  - ``1proc_1thread``: the one-core baseline both are compared with.
samples/s counts training queries of the global batch per second. The two configurations are run
alternately, ``--rounds`` times each, and the median is reported, so that load from other
processes on the machine hits both alike.

GPU (only when torch sees CUDA): one process, TIRG, random uint8 images at 64x64 (CSS size) and
224x224, batch 32 and 200, fp32 vs bf16, GA off vs on (L_S + L_GA^A on pixels + L_GA^I):
step time, queries/s and images/s (2 images, source and target, per query).

    python benchmarks/bench_scaling.py                    # CPU part (+ GPU part with CUDA)
    python benchmarks/bench_scaling.py --ga --steps 6     # CPU part with GA on as well

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_ga import TEXTS  # noqa: E402

import datasets  # noqa: E402
import distributed  # noqa: E402
import main  # noqa: E402

GA_FLAGS = ["--ga"]  # L_S + L_GA^A (pixels) + L_GA^I at the paper's values
# name: (processes, threads per process)
CPU_CONFIGS = {"1proc_1thread": (1, 1), "1proc_2threads": (1, 2), "2proc_1thread": (2, 1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each CPU config")
    p.add_argument("--ga", action="store_true", help="also measure the CPU configs with GA on")
    p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "tirg_ga_bench"))
    p.add_argument("--skip_cpu", action="store_true")
    p.add_argument("--gpu_steps", type=int, default=20)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_argv(data_dir: str, batch_size: int, extra=()) -> list[str]:
    return [
        "--dataset", "css3d", "--synthetic_size", "small", "--data_dir", data_dir,
        "--model", "tirg", "--batch_size", str(batch_size), "--loader_num_workers", "0",
        "--device", "cpu", *extra,
    ]  # fmt: skip


def _cpu_worker(rank, world_size, threads, port, argv, warmup, steps, out_file):
    """One process of a CPU configuration: warmup + timed steps of main's training step."""
    torch.set_num_threads(threads)
    if world_size > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
        )
    context = distributed.init(torch.device("cpu"))
    try:
        args = main.parse_args(argv)
        main.seed_everything(args.seed)
        trainset, _ = main.build_datasets(args)
        model = main.build_model(args, trainset)
        optimizer = main.build_optimizer(args, model)
        unused = main.unused_parameters(model, trainset, args, context.device)
        net = distributed.wrap(model, context, find_unused_parameters=bool(unused))
        net.train()
        loader = torch.utils.data.DataLoader(
            trainset,
            batch_sampler=distributed.RankBatches(
                0, warmup + steps, args.batch_size, rank, world_size
            ),
            collate_fn=datasets.collate_queries,
        )
        start = None
        for iteration, batch in enumerate(loader):
            if iteration == warmup:
                distributed.barrier(context)
                start = time.perf_counter()
            main.seed_step(args.seed, rank, iteration)
            values = main.train_step(net, optimizer, batch, args, context.device, iteration)
            main.agree_on_log(values, 0, context)
        distributed.barrier(context)
        seconds = time.perf_counter() - start
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({"seconds": seconds}, f)
    finally:
        distributed.destroy()


def measure_cpu(config: str, argv, batch_size, warmup, steps) -> dict:
    world_size, threads = CPU_CONFIGS[config]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.json")
        mp.spawn(
            _cpu_worker,
            args=(world_size, threads, free_port(), argv, warmup, steps, out_file),
            nprocs=world_size,
            join=True,
        )
        with open(out_file) as f:
            seconds = json.load(f)["seconds"]
    global_batch = world_size * batch_size
    return {
        "processes": world_size,
        "threads_per_process": threads,
        "global_batch": global_batch,
        "step_s": seconds / steps,
        "samples_per_s": global_batch * steps / seconds,
    }


def cpu_part(opts) -> dict:
    argv = train_argv(opts.data_dir, opts.batch_size)
    main.resolve_dataset_path(main.parse_args(argv))  # generate the data once, up front
    results = {}
    for ga in [False, True] if opts.ga else [False]:
        extra = GA_FLAGS if ga else []
        runs = {config: [] for config in CPU_CONFIGS}
        for _ in range(opts.rounds):
            for config in runs:
                runs[config].append(
                    measure_cpu(
                        config,
                        train_argv(opts.data_dir, opts.batch_size, extra),
                        opts.batch_size,
                        opts.warmup,
                        opts.steps,
                    )
                )
        summary = {}
        for config, measurements in runs.items():
            summary[config] = {
                **{
                    k: v for k, v in measurements[0].items() if k not in ("step_s", "samples_per_s")
                },
                "step_s_median": statistics.median(m["step_s"] for m in measurements),
                "samples_per_s_median": statistics.median(m["samples_per_s"] for m in measurements),
                "samples_per_s_all": [round(m["samples_per_s"], 2) for m in measurements],
            }
        base = summary["1proc_1thread"]["samples_per_s_median"]
        two_threads = summary["1proc_2threads"]["samples_per_s_median"]
        two_procs = summary["2proc_1thread"]["samples_per_s_median"]
        summary["speedup_2proc_vs_1proc_2threads"] = two_procs / two_threads
        summary["speedup_vs_1thread"] = {"1proc_2threads": two_threads / base,
                                         "2proc_1thread": two_procs / base}  # fmt: skip
        results["ga_on" if ga else "ga_off"] = summary
    return results


def gpu_part(opts, data_dir: str) -> dict:
    """Single-GPU throughput of main.train_step on random images (no loader)."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    vocabulary = main.parse_args(train_argv(data_dir, 32))
    trainset, _ = main.build_datasets(vocabulary)
    rows = []
    for image_size in (64, 224):
        for batch_size in (32, 200):
            for precision in ("fp32", "bf16"):
                for ga in (False, True):
                    argv = train_argv(data_dir, batch_size, ["--precision", precision])
                    argv += ["--device", "cuda", *(GA_FLAGS if ga else [])]
                    args = main.parse_args(argv)
                    main.seed_everything(0)
                    model = main.build_model(args, trainset).to(device)
                    optimizer = main.build_optimizer(args, model)
                    scaler = main.make_grad_scaler(args.precision, device)
                    generator = torch.Generator().manual_seed(0)
                    shape = (batch_size, 3, image_size, image_size)
                    batch = {
                        "source_img_data": torch.randint(0, 256, shape, dtype=torch.uint8,
                                                         generator=generator),
                        "target_img_data": torch.randint(0, 256, shape, dtype=torch.uint8,
                                                         generator=generator),
                        "mod": [TEXTS[i % len(TEXTS)] for i in range(batch_size)],
                    }  # fmt: skip
                    try:
                        for iteration in range(opts.warmup + opts.gpu_steps):
                            if iteration == opts.warmup:
                                torch.cuda.synchronize(device)
                                start = time.perf_counter()
                            main.train_step(
                                model, optimizer, batch, args, device, iteration, scaler
                            )
                        torch.cuda.synchronize(device)
                        step = (time.perf_counter() - start) / opts.gpu_steps
                        row = {
                            "step_s": step,
                            "queries_per_s": batch_size / step,
                            "images_per_s": 2 * batch_size / step,
                            "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                        }
                    except torch.OutOfMemoryError:
                        row = {"error": "out of memory"}
                    rows.append(
                        {"image_size": image_size, "batch_size": batch_size,
                         "precision": precision, "ga": ga, **row}
                    )  # fmt: skip
                    del model, optimizer
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
    return {"device": torch.cuda.get_device_name(device), "rows": rows}


def main_(argv=None) -> dict:
    opts = parse_args(argv)
    out = {
        "benchmark": "bench_scaling",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "batch_size_per_process": opts.batch_size,
        "warmup_steps": opts.warmup,
        "timed_steps": opts.steps,
    }
    if not opts.skip_cpu:
        out["cpu"] = cpu_part(opts)
    if torch.cuda.is_available():
        main.resolve_dataset_path(main.parse_args(train_argv(opts.data_dir, 32)))
        out["gpu"] = gpu_part(opts, opts.data_dir)
    else:
        out["gpu"] = None
        out["gpu_note"] = "torch sees no CUDA device: the GPU part was not run"
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main_()
