"""torch.distributed helpers shared by training and measurement: one code path for 1 process and for ``torchrun``.

With ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`setup` initialises the default
process group (gloo on CPU, NCCL on CUDA), pins each rank to its local GPU and divides the CPU
threads among local ranks. Without it, everything runs as a world of one and no collective is called.
Rank 0 alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flatlens.errors import DistributedError


@dataclass
class DistContext:
    """Where this process stands: rank, world size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DistributedError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N "
                               "(--device, or train.device in the config)") from None
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, meta...: torch accepts the name, flatlens is not built for it
        raise DistributedError(f"device {name!r} is not supported: flatlens runs on cpu or cuda; use auto, cpu, "
                               "cuda or cuda:N (--device, or train.device in the config)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"device {name!r} asked but CUDA is not available here; use cpu "
                                   "(--device cpu, or --set train.device=cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        n = torch.cuda.device_count()
        if dev.index >= n:
            raise DistributedError(f"device {str(dev)!r} asked but this machine has {n} CUDA device(s); use "
                                   f"cuda:0 to cuda:{n - 1}, or auto")
    return dev


def setup(device: str = "auto") -> DistContext:
    """Initialise torch.distributed when launched by torchrun; return this process's context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"cannot initialise torch.distributed ({backend}): {exc}; launch with torchrun") from None
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                       backend=backend, owns_group=owns)


def teardown(ctx: DistContext, finished: bool = False) -> None:
    """Destroy the process group this process created.

    ``finished``: this rank got to the end normally, so every rank will. They then meet at a barrier
    first: rank 0 writes the results after the last collective, and a rank that tore down its gloo
    connections meanwhile was seen to abort ("terminate called without an active exception", SIGABRT),
    failing a torchrun whose results were written. After an error there is no barrier (the other ranks
    may never arrive).
    """
    if ctx.owns_group and dist.is_initialized():
        if finished and ctx.distributed:
            dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op for a world of one)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(ctx: DistContext, obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def current() -> DistContext:
    """The context of an already-initialised process group (or a world of one), without initialising."""
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                           backend=str(backend))
    return DistContext()
