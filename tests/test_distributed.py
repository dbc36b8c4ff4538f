"""DistributedDataParallel on CPU (gloo), for real: two processes against one.

The equivalence tests run the training step of ``main`` (``train_step``, the GA terms, the
gathered batch-classification loss, DDP's gradient averaging, ``seed_step``, the rank batches)
in two spawned processes joined by a gloo process group on 127.0.0.1, and compare with one
process given the equivalent batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import datasets
import distributed
import main
import torch_function

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
PER_RANK_BATCH = 4
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The small synthetic CSS, generated once per session (shared with tests/test_main.py)."""
    path = tmp_path_factory.getbasetemp() / "shared_data"
    main.resolve_dataset_path(main.parse_args(tiny_argv(path)))
    return path


def tiny_argv(data_dir, *extra) -> list[str]:
    # A tiny TIRG with every GA term on. eps is raised from the paper's 1e-6 so that L_GA^A
    # moves the gradients well above float rounding: a wrong double backprop would show.
    return [
        "--dataset", "css3d", "--synthetic_size", "small", "--data_dir", str(data_dir),
        "--model", "tirg", "--image_embed_dim", "16", "--ga", "--ga_adv_eps", "0.05",
        "--sim_weight", "0.5", "--ga_iso_gamma", "0.01", "--learning_rate", "0.05",
        "--loader_num_workers", "0", "--seed", "3", *extra,
    ]  # fmt: skip


def shrink(batch: dict) -> dict:
    """Tiny 32x32 images, so that a few steps of ResNet-18 take well under a second."""
    for key in ("source_img_data", "target_img_data"):
        images = batch[key].float()
        batch[key] = F.interpolate(images, size=(32, 32), mode="area").round().to(torch.uint8)
    return batch


def run_steps(argv, rank, world_size, batch_size, context, variant="main"):
    """``STEPS`` training steps as ``main.train`` takes them, with the model in eval mode.

    Eval mode: BatchNorm normalizes with its running statistics and dropout is off, so a sample's
    features do not depend on which process's batch it shares. In train mode, BatchNorm's batch
    statistics are per process under DDP (standard DDP behaviour; SyncBatchNorm has no CPU
    kernel and no double backward) and dropout masks are drawn per process, so no exact
    equality with one process can hold there; everything else DDP must get right is exercised.
    Returns the gradients of the first step, the parameters after the last and the step values.
    """
    args = main.parse_args(argv + ["--batch_size", str(batch_size)])
    distributed.seed_everything(args.seed)
    trainset, _ = main.build_datasets(args)
    model = main.build_model(args, trainset)
    optimizer, scheduler = main.build_optimizer(args, model)
    model.eval()
    unused = main.unused_parameters(model, trainset, args, context.device)  # as main._run wraps
    net = distributed.wrap(model, context, find_unused_parameters=bool(unused))
    loader = torch.utils.data.DataLoader(
        trainset,
        batch_sampler=distributed.RankBatches(0, STEPS, batch_size, rank, world_size),
        collate_fn=datasets.collate_queries,
    )
    grads, values = None, []
    for iteration, batch in enumerate(loader):
        distributed.seed_step(args.seed, rank, iteration)
        main.set_learning_rate(optimizer, scheduler, iteration)
        step = main.train_step(net, optimizer, shrink(batch), args, context.device, iteration)
        values.append(distributed.agree_on_log(step, 0, context)[0])
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"grads": grads, "params": params, "values": values}


def _worker(rank, port, argv, out_dir, variants):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    context = distributed.init(torch.device("cpu"))
    try:
        for variant in variants:
            if variant == "local_loss":  # the loss without the other ranks' targets
                main.LOSSES["batch_based_classification"] = torch_function.batch_classification_loss
            result = run_steps(argv, rank, WORLD, PER_RANK_BATCH, context, variant)
            torch.save(result, os.path.join(out_dir, f"{variant}_rank{rank}.pt"))
        # Only rank 1 got SIGTERM: both ranks must stop at this step, and log the mean loss.
        agreed = distributed.agree_on_log(
            {"ce": torch.tensor(float(rank))}, 15 if rank == 1 else 0, context
        )
        torch.save({"agreed": list(agreed)}, os.path.join(out_dir, f"agree_rank{rank}.pt"))
        x = gather_inputs()[rank].requires_grad_(True)
        first, second = gather_objective(distributed.gather_rows(x), rank, x)
        second.backward()
        torch.save(
            {"first": first.detach(), "second": x.grad},
            os.path.join(out_dir, f"gather_rank{rank}.pt"),
        )
    finally:
        distributed.destroy()


def gather_inputs() -> list[torch.Tensor]:
    """Each rank's (2, 3) rows for the gather_rows check."""
    return [torch.linspace(-1.0, 1.0, 6).view(2, 3) * (r + 1) + r for r in range(WORLD)]


def gather_objective(rows_local_first, rank, x):
    """Rank ``rank``'s loss over all rows (its own first), its gradient w.r.t. its own rows
    taken with create_graph (as L_GA^A takes dL/dx), and a function of that gradient."""
    weights = torch.arange(rows_local_first.numel(), dtype=torch.float32).view_as(rows_local_first)
    loss = (torch.sin(rows_local_first) * (weights + rank)).sum()
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    return grad, (grad**2).sum() + loss


def gather_reference() -> list[dict]:
    """The same in one process: rank r's loss sees the rows in rank r's order; every rank's
    gradient w.r.t. its rows is the gradient of the sum of all ranks' losses."""
    inputs = [t.clone().requires_grad_(True) for t in gather_inputs()]
    order = [[inputs[r]] + [inputs[s] for s in range(WORLD) if s != r] for r in range(WORLD)]
    weights = torch.arange(2 * 3 * WORLD, dtype=torch.float32).view(2 * WORLD, 3)
    losses = [(torch.sin(torch.cat(o)) * (weights + r)).sum() for r, o in enumerate(order)]
    total = sum(losses)
    grads = torch.autograd.grad(total, inputs, create_graph=True)
    (sum((g**2).sum() for g in grads) + total).backward()
    return [{"first": g.detach(), "second": x.grad} for g, x in zip(grads, inputs)]


def spawn_two_ranks(argv, out_dir, variants):
    mp.spawn(_worker, args=(free_port(), argv, str(out_dir), variants), nprocs=WORLD, join=True)
    return {
        v: [torch.load(out_dir / f"{v}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
        for v in [*variants, "agree", "gather"]
    }


def single_process(argv):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_steps(argv, 0, 1, WORLD * PER_RANK_BATCH, distributed.Context())
    finally:
        torch.set_num_threads(threads)


def relative_error(a: dict, b: dict) -> float:
    """max over tensors of max|a - b| / max|b| (names must match)."""
    assert a.keys() == b.keys()
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in b)


def test_rank_batches_cover_the_single_process_batch_index_for_index():
    single = list(distributed.RankBatches(5, 8, 6))
    ranks = [list(distributed.RankBatches(5, 8, 2, rank, 3)) for rank in range(3)]
    for t in range(3):
        assert sum((ranks[r][t] for r in range(3)), []) == single[t]
    assert single[0] == list(range(30, 36)) and len(distributed.RankBatches(5, 8, 6)) == 3


def test_process_device_is_cuda_local_rank_or_cpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert distributed.process_device(cuda, 0, 1) == torch.device("cuda", 0)
    assert distributed.process_device(cuda, 3, 4) == torch.device("cuda", 3)
    assert distributed.process_device(cpu, 3, 0) == cpu
    with pytest.raises(ValueError, match="LOCAL_RANK 2 needs GPU 2, but this node has 2"):
        distributed.process_device(cuda, 2, 2)
    context = distributed.init(cpu, environ={})  # one process: no process group
    assert context == distributed.Context(0, 0, 1, cpu) and not distributed.active()


def test_env_ranks():
    assert distributed.env_ranks({}) == (0, 0, 1)
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    assert distributed.env_ranks(env) == (5, 1, 8)
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.env_ranks({"RANK": "2", "WORLD_SIZE": "2"})


def test_unused_parameters_finds_the_image_only_models_text_encoder(data_dir):
    for model_name, expected_prefix in (("imgonly", "text_model."), ("tirg", None)):
        args = main.parse_args(tiny_argv(data_dir, "--model", model_name))
        trainset, _ = main.build_datasets(args)
        model = main.build_model(args, trainset)
        unused = main.unused_parameters(model, trainset, args, torch.device("cpu"))
        text_params = [n for n, _ in model.named_parameters() if n.startswith("text_model.")]
        assert unused == (text_params if expected_prefix else [])
        assert model.training  # the probe restores the mode


def test_two_process_ddp_equals_one_process_with_the_global_batch_ga_on(data_dir, tmp_path):
    """Same gradients after one step and same parameters after three, GA on (L_GA^A on the
    pixels by double backprop, L_GA^I noise, L_S), to float rounding. Controls show the
    comparison is sensitive: without the gathered targets (each process's own negatives) the
    gradients differ."""
    argv = tiny_argv(data_dir)
    reference = single_process(argv)
    results = spawn_two_ranks(argv, tmp_path, ["main", "local_loss"])
    rank0, rank1 = results["main"]
    assert relative_error(rank0["params"], rank1["params"]) == 0.0  # replicas stay identical
    assert relative_error(rank0["grads"], reference["grads"]) < 1e-4
    assert relative_error(rank0["params"], reference["params"]) < 1e-4
    moved = relative_error(reference["params"], single_process_initial(argv))
    assert moved > 1e-3  # the steps did change the parameters
    for ddp, single in zip(rank0["values"], reference["values"]):
        assert ddp.keys() == single.keys() >= {"ce", "sim", "ga_adv", "ga_iso", "total"}
        for name in single:
            assert ddp[name] == pytest.approx(single[name], rel=1e-4, abs=1e-7), name
    assert relative_error(results["local_loss"][0]["grads"], reference["grads"]) > 1e-2
    assert [r["agreed"] for r in results["agree"]] == [[{"ce": 0.5}, 15], [{"ce": 0.5}, 15]]
    # gather_rows: first and second derivatives across ranks, as in one process
    for ddp, single in zip(results["gather"], gather_reference()):
        assert torch.allclose(ddp["first"], single["first"], atol=1e-5)
        assert torch.allclose(ddp["second"], single["second"], atol=1e-5)


def single_process_initial(argv):
    args = main.parse_args(argv)
    distributed.seed_everything(args.seed)
    trainset, _ = main.build_datasets(args)
    model = main.build_model(args, trainset)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--model", "imgonly"],  # a text encoder without gradients: find_unused_parameters
        ["--model", "imgonly", "--l2_weight", "1e-3"],  # L2 reaches it: no find_unused
        ["--fgsm_eps", "0.01"],  # two forward passes before one backward
        ["--ga_adv_input", "features"],
        ["--model", "concat"],
        ["--model", "tirg_lastconv"],
        ["--model", "composeAE"],
    ],
    ids=lambda extra: "_".join(a.strip("-") for a in extra),
)
def test_ddp_equivalence_other_configurations(data_dir, tmp_path, extra):
    argv = tiny_argv(data_dir, *extra)
    reference = single_process(argv)
    rank0, rank1 = spawn_two_ranks(argv, tmp_path, ["main"])["main"]
    assert relative_error(rank0["params"], rank1["params"]) == 0.0
    assert relative_error(rank0["grads"], reference["grads"]) < 1e-4
    # FGSM steps along sign(dL/dx): float rounding flips the sign of near-zero entries, and the
    # flips compound over steps, so only the first step is compared tightly.
    tolerance = 1e-2 if "--fgsm_eps" in extra else 1e-4
    assert relative_error(rank0["params"], reference["params"]) < tolerance


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "main.py", *argv,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_torchrun_two_processes_end_to_end_and_resume(data_dir, tmp_path):
    """``torchrun --nproc_per_node 2 main.py`` on CPU (gloo), in train mode: one run folder
    written by rank 0 alone, a checkpoint of 2 processes, evaluation results identical to a
    single-process ``--test_only`` evaluation of the same weights; and 2 iterations then
    ``--resume RUN`` to 4 (the checkpoint handed from rank 0 to rank 1) end with the same
    metrics as 4 in one go."""
    argv = [
        # the paper's eps: in train mode (BatchNorm on 4-image batches) 0.05 diverges
        *tiny_argv(data_dir), "--ga_adv_eps", "1e-6", "--device", "cpu", "--batch_size", "4",
        "--eval_every", "2", "--train_eval_queries", "24", "--comment", "ddp",
    ]  # fmt: skip
    log_dir = tmp_path / "logs"
    result = torchrun([*argv, "--num_iters", "4", "--log_dir", str(log_dir)])
    (name,) = os.listdir(log_dir)
    run_dir = log_dir / name
    assert result.stdout.count("run folder:") == 1  # rank 0 alone reports
    metrics = (run_dir / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in metrics.splitlines()]
    assert [m["iteration"] for m in lines] == [2, 2, 4, 4]
    state = torch.load(run_dir / "latest.pt", weights_only=True)
    assert state["world_size"] == 2 and state["iteration"] == 4
    single = main.main(
        [*argv, "--num_iters", "4", "--test_only", "--model_checkpoint",
         str(run_dir / "latest.pt"), "--log_dir", str(tmp_path / "single")]
    )  # fmt: skip
    for m in lines[-2:]:
        recorded = {k: v for k, v in m.items() if k.startswith("R@")}
        assert recorded == {k: v for k, v in single[m["split"]].items() if k.startswith("R@")}

    split_dir = tmp_path / "split"
    torchrun([*argv, "--num_iters", "2", "--log_dir", str(split_dir)])
    (first,) = os.listdir(split_dir)  # named: --resume auto continues equal arguments only
    resumed = torchrun([*argv, "--num_iters", "4", "--log_dir", str(split_dir),
                        "--resume", str(split_dir / first)])  # fmt: skip
    assert "resuming" in resumed.stdout
    (name,) = os.listdir(split_dir)
    assert (split_dir / name / "metrics.jsonl").read_text() == metrics
