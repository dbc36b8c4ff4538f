"""Process-group helpers for ``torchrun`` (DistributedDataParallel), and one process without it;
the device, the precision (autocast, GradScaler) and the seeds of a run.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them the run is a single
process and every helper here is a no-op. With them, ``init`` joins the process group: NCCL with
one GPU per process (``cuda:LOCAL_RANK``) when the run uses CUDA, gloo on CPU.

    torchrun --nproc_per_node=4 main.py --dataset=css3d --model=tirg --ga --batch_size=50

``--batch_size`` is per process: the global batch is WORLD_SIZE x --batch_size, and rank r of
iteration t takes the training queries ``t*N*B + r*B + j`` (j < B), so the global batch holds,
index for index, the queries a single process with ``--batch_size N*B`` would see. The batch-based
classification loss ranks each process's queries against the targets of *all* processes
(``gather_rows``), so its negatives, its value and its gradient are those of the global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import torch_function

# Only rank 0 evaluates and checkpoints while the others wait at a barrier; a full evaluation of a
# large dataset can take many minutes, longer than the default collective timeouts (10 min NCCL).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, its rank on its node, the number of processes, and
    the device it trains on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks(environ=None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    environ = os.environ if environ is None else environ
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers: {e}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local_rank}, "
            f"WORLD_SIZE={world_size}"
        )
    return rank, local_rank, world_size


def process_device(device: torch.device, local_rank: int, cuda_devices: int) -> torch.device:
    """The device of the process with ``local_rank`` on its node: ``cuda:LOCAL_RANK`` for a CUDA
    run (one GPU per process), the CPU otherwise. ValueError when the node has too few GPUs."""
    if device.type != "cuda":
        return torch.device("cpu")
    if local_rank >= cuda_devices:
        raise ValueError(
            f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this node has {cuda_devices}: "
            f"start at most that many processes per node"
        )
    return torch.device("cuda", local_rank)


def init(device: torch.device, environ=None) -> Context:
    """This process's place and device and, under torchrun, its process group.

    device: what the run asked for (``pick_device``: cpu or cuda). A CUDA run's process
    takes ``cuda:LOCAL_RANK`` and, under torchrun, the NCCL backend; a CPU run uses gloo.
    Raises ValueError for a request that cannot be met (fewer GPUs than processes per node).
    """
    rank, local_rank, world_size = env_ranks(environ)
    cuda_devices = torch.cuda.device_count() if device.type == "cuda" else 0
    device = process_device(device, local_rank, cuda_devices)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    context = Context(rank, local_rank, world_size, device)
    if context.distributed and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=COLLECTIVE_TIMEOUT,
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return context


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier(context: Context) -> None:
    if context.distributed:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.device.index])
        else:
            dist.barrier()


def broadcast_object(obj, context: Context):
    """Rank 0's ``obj`` on every rank (pickled: only for small metadata and checkpoints)."""
    if not context.distributed:
        return obj
    holder = [obj if context.is_main else None]
    dist.broadcast_object_list(holder, src=0, device=context.device)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    """The sum over ranks, in place (a no-op for one process)."""
    if context.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap(model: torch.nn.Module, context: Context, find_unused_parameters: bool):
    """``model`` in DistributedDataParallel under torchrun, unchanged otherwise.

    ``static_graph`` stays False, on purpose: with the double-backprop GA term (autograd.grad with
    create_graph=True before backward) DDP's static-graph mode silently gives gradients that are
    not the averaged ones (tests/test_distributed.py shows it). ``find_unused_parameters`` must
    be True when some parameters get no gradient in a step (the image-only model's text encoder;
    see ``unused_parameters``): DDP would otherwise wait for their gradients forever.
    """
    if not context.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[context.device.index] if context.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        static_graph=False,
    )


def unused_parameters(model: torch.nn.Module, outputs) -> list[str]:
    """Names of ``model``'s trainable parameters that no tensor in ``outputs`` depends on.

    ``outputs``: a tensor or a (nested) dict/list/tuple of them, from a forward pass with grad
    enabled. The autograd graph is walked back from them, as DDP's find_unused_parameters does
    every iteration; walking it once at start-up tells whether DDP needs that flag at all.
    """
    roots, stack = [], [outputs]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.grad_fn is not None:
                roots.append(item.grad_fn)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    reached, seen = set(), set()
    while roots:
        node = roots.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if variable is not None:
            reached.add(id(variable))
        roots.extend(next_node for next_node, _ in node.next_functions)
    return [
        name for name, p in model.named_parameters() if p.requires_grad and id(p) not in reached
    ]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- data


class RankBatches(torch.utils.data.Sampler):
    """Batches of training-query indices for one rank, iterations ``start`` .. ``stop - 1``.

    Iteration t of rank r holds ``t*N*B + r*B + j`` for j < B (N processes of B queries each):
    the N ranks together cover, index for index, iteration t of a single process with batch N*B.
    Training queries are a pure function of (seed, index), so this also makes a resumed run see
    exactly the batches of the uninterrupted one.
    """

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.start, self.stop = start, max(start, stop)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        global_batch = self.world_size * self.batch_size
        for t in range(self.start, self.stop):
            first = t * global_batch + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))


# --------------------------------------------------------------------------- losses


def _local_first(parts: list[torch.Tensor], rank: int) -> torch.Tensor:
    return torch.cat([parts[rank], *parts[:rank], *parts[rank + 1 :]])


class _GatherRows(torch.autograd.Function):
    """Every rank's (B, D) rows as one (N*B, D) tensor, this rank's rows first.

    Backward (``_SumRows``): every rank's loss may use every rank's rows, so the gradient of a
    rank's own rows is the sum over ranks of the gradients their copies received: an all-reduce,
    sliced to its rows. With each rank's loss the mean over its own queries, the sum over ranks
    is N times the global-batch loss, whose 1/N DDP's gradient averaging supplies; a gradient
    w.r.t. a rank's own inputs (L_GA^A's dL/dx) comes out as in one process, cross-rank terms
    included. The two functions are each other's backward, so double backprop works through
    them (ComposeAE's rotational-symmetry loss ranks against gathered *source* features, which
    the GA term differentiates twice).
    """

    @staticmethod
    def forward(ctx, tensor):
        world_size, rank = dist.get_world_size(), dist.get_rank()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor)
        parts[rank] = tensor
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return _local_first(parts, rank)

    @staticmethod
    def backward(ctx, grad):
        return _SumRows.apply(grad, ctx.rank, ctx.rows)


class _SumRows(torch.autograd.Function):
    """(N*B, D) gradients of the gathered rows (local first) -> (B, D): the sum over ranks of the
    gradients of this rank's rows. Its own backward is ``_GatherRows``."""

    @staticmethod
    def forward(ctx, grad, rank, rows):
        # Back to rank order, sum over ranks, keep this rank's rows.
        ordered = torch.cat(
            [grad[rows : rows * (rank + 1)], grad[:rows], grad[rows * (rank + 1) :]]
        )
        ordered = ordered.contiguous()
        dist.all_reduce(ordered, op=dist.ReduceOp.SUM)
        return ordered[rank * rows : (rank + 1) * rows].clone()

    @staticmethod
    def backward(ctx, grad):
        return _GatherRows.apply(grad), None, None


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (N*B, D): every rank's rows, this rank's first, differentiable; unchanged for
    one process. All ranks must call it with the same B (DDP's batches are equal)."""
    if not active():
        return tensor
    return _GatherRows.apply(tensor)


def batch_classification_loss(
    query_features: torch.Tensor, target_features: torch.Tensor
) -> torch.Tensor:
    """TIRG's batch-based classification loss over the global batch (the GA paper's L_CE).

    query_features, target_features: this process's (B, D). Each of the B queries is ranked
    against the targets of all N processes (N*B logits, its own target the positive), and the
    mean is over the B local queries. DDP averages the gradients over ranks, so the step is the
    step of the mean over all N*B queries with N*B - 1 negatives each: exactly the loss of one
    process with batch N*B (up to float rounding). In one process it is
    ``torch_function.batch_classification_loss``.
    """
    # (N*B, D) with the local targets first: query i's positive stays column i.
    return torch_function.batch_classification_loss(query_features, gather_rows(target_features))


def agree_on_log(totals: dict[str, torch.Tensor], signum: int, context) -> tuple[dict, int]:
    """The summed step values of this log interval, over all ranks, and whether any rank got a
    stop signal: one all-reduce every --log_every steps, so that every rank logs the global
    batch's loss and all stop at the same iteration."""
    names = sorted(totals)
    data = torch.stack([totals[n].double() for n in names] + [torch.tensor(float(signum))])
    if context.distributed:
        data = all_reduce_sum(data.to(context.device), context) / context.world_size
    data = data.tolist()
    return dict(zip(names, data)), (signum or int(signal.SIGTERM)) if data[-1] > 0 else 0


# ------------------------------------------------------------ devices, precision, seeds


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (model initialization uses torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_step(seed: int, rank: int, iteration: int) -> None:
    """Reseed torch (CPU and CUDA) for training step ``iteration`` of process ``rank``.

    Every random draw of a step (dropout masks, soft-triplet negatives) is then a pure function of
    (seed, rank, iteration), as the training queries are of (seed, index): a resumed run draws
    what the uninterrupted run drew, whatever evaluation, data loaders or a restart consumed in
    between, and no RNG state has to be checkpointed. Ranks draw different dropout masks.
    """
    state = np.random.SeedSequence([seed, rank, iteration, 0x7E57]).generate_state(1, np.uint64)
    torch.manual_seed(int(state[0]) >> 1)


def pick_device(name: str) -> torch.device:
    """The device of a single-process run: 'auto' is CUDA when torch sees a GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """One autocast context for the run; fp32, and fp16 on CPU, run without autocast.

    bf16 autocasts on CPU and CUDA; fp16 only on CUDA, where a GradScaler (``make_grad_scaler``)
    keeps small gradients from flushing to zero. The losses are computed in fp32 from the
    features (``main.cir_forward`` casts them), and double backprop (L_GA^A) runs through the
    autocast graph like the first backward does.
    """
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 on CUDA only (a disabled one passes everything through)."""
    enabled = precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def on_rank_zero(fn, context, error_type: type[Exception]):
    """``fn()`` on rank 0, its result (or its ``error_type`` error) handed to every rank."""
    if not context.distributed:
        return fn()
    payload = None
    if context.is_main:
        try:
            payload = ("ok", fn())
        except error_type as e:
            payload = ("error", str(e))
    kind, value = broadcast_object(payload, context)
    if kind == "error":
        raise error_type(value)
    return value
