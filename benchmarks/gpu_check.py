"""The GPU check: what this project claims about CUDA, in one run of at most about 8 minutes.

    python benchmarks/gpu_check.py > gpu_check.json        # on a machine with one GPU

Runs, each with its own time limit, and prints one JSON object with what each printed:
1. the tests marked ``cuda`` (``pytest -m cuda``);
2. a 200-iteration run of ``main.py`` on the synthetic CSS with ``--ga``, in fp32 and in bf16
   (seconds per iteration, the final test metrics);
3. ``bench_ga.py`` at batch 200 on CUDA (step-time ratios of every GA term);
4. ``bench_recall.py`` at the Fashion200k test shape on CUDA (time, peak GPU memory);
5. a one-GPU ``torchrun`` run (NCCL) of ``main.py --ga``, 50 iterations.
A step that fails or times out is reported with its last output lines; the others still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run(name: str, command: list[str], timeout: float, env: dict | None = None) -> dict:
    print(f"[gpu_check] {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        )  # fmt: skip
        result = {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        result = {"rc": "timeout", "stdout": out, "stderr": err}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def tail(text: str, lines: int = 15) -> list[str]:
    return text.strip().splitlines()[-lines:]


def last_json(text: str):
    """The JSON object a benchmark printed last (they print one, possibly indented)."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.startswith("{") else start
    try:
        return json.loads(text[start:])
    except ValueError:
        return None


def main_run(name: str, extra: list[str], log_dir: str, launcher: list[str] | None = None):
    argv = ["--dataset", "css3d", "--model", "tirg", "--ga", "--device", "cuda",
            "--eval_every", "200", "--log_dir", log_dir, "--comment", name, *extra]  # fmt: skip
    command = (launcher or [PY]) + ["main.py", *argv]
    result = run(name, command, timeout=100)
    report = {"rc": result["rc"], "seconds": result["seconds"], "tail": tail(result["stderr"], 4)}
    runs = [d for d in os.listdir(log_dir) if d.endswith(name)]
    if runs:
        with open(os.path.join(log_dir, runs[0], "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        report["final_test"] = next((r for r in reversed(lines) if r["split"] == "test"), None)
    report["last_stdout"] = tail(result["stdout"], 2)
    return report


def main() -> dict:
    import torch

    report = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    tests = run(
        "cuda tests", [PY, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"], 90
    )
    report["cuda_tests"] = {"rc": tests["rc"], "seconds": tests["seconds"],
                            "summary": tail(tests["stdout"], 3)}  # fmt: skip
    with tempfile.TemporaryDirectory() as log_dir:
        for precision in ("fp32", "bf16"):
            report[f"css_ga_200_{precision}"] = main_run(
                f"gpu_ga_{precision}", ["--num_iters", "200", "--precision", precision], log_dir
            )
        report["torchrun_1gpu_nccl"] = main_run(
            "gpu_torchrun", ["--num_iters", "50", "--eval_every", "50"], log_dir,
            launcher=[PY, "-m", "torch.distributed.run", "--nproc_per_node", "1"],
        )  # fmt: skip
    benchmarks = {
        "bench_ga_cuda_b200": (["bench_ga.py", "--device", "cuda", "--batch_size", "200",
                                "--repeats", "6"], 60),
        "bench_recall_cuda": (["bench_recall.py", "--device", "cuda", "--variants", "ours"], 40),
    }  # fmt: skip
    for name, (argv, limit) in benchmarks.items():
        result = run(name, [PY, os.path.join("benchmarks", argv[0]), *argv[1:]], limit)
        report[name] = last_json(result["stdout"]) or {
            "rc": result["rc"],
            "tail": tail(result["stderr"]),
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
