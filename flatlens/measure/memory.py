"""How much memory a device has room for, and one-line refusals of allocations that would not fit.

A Krylov basis, a Hutch++ sketch, the cached samples of a split and the retained graphs of an HVP block
can each outgrow a machine. Allocating them anyway ends in an OOM kill (no message, no result) or a
``RuntimeError`` deep inside torch. The measures ask here first: :func:`available_bytes` is what the
device (CPU: the tighter of ``MemAvailable`` and this process's memory cgroup, e.g. a SLURM job's
limit; CUDA: ``mem_get_info``) can still give, :func:`require_memory` refuses a shape that would not fit
with a ``ValueError`` naming the option that shrinks it, and :func:`alloc_basis` allocates with the same
refusal when torch itself reports no room.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

CGROUP_ROOT = "/sys/fs/cgroup"
"""Where the cgroup file systems are mounted (a parameter for tests)."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup (a SLURM job, a container) still has room for, or None.

    ``MemAvailable`` is the whole machine's: a job limited to 16 GB on a 512 GB node would pass any
    check against it and then be OOM-killed. Room = limit - (usage - inactive file cache), the working
    set, since the kernel reclaims inactive page cache before it kills (cgroup v2, then v1; the
    tightest limit on the path from this process's cgroup to the root).
    """
    import os

    cg = _read("/proc/self/cgroup") or ""
    rooms = []
    for line in cg.splitlines():
        hier, _, controllers_path = line.partition(":")
        controllers, _, rel = controllers_path.partition(":")
        v2 = hier == "0" and controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        base = CGROUP_ROOT if v2 else os.path.join(CGROUP_ROOT, "memory")
        names = ("memory.max", "memory.current", "inactive_file") if v2 else (
            "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        parts = [p for p in rel.strip().split("/") if p]
        for depth in range(len(parts), -1, -1):  # this cgroup, then its parents (a namespaced root is "/")
            d = os.path.join(base, *parts[:depth])
            limit = (_read(os.path.join(d, names[0])) or "").strip()
            usage = (_read(os.path.join(d, names[1])) or "").strip()
            if not limit.isdigit() or not usage.isdigit() or int(limit) >= 2**60:
                continue
            inactive = 0
            for stat_line in (_read(os.path.join(d, "memory.stat")) or "").splitlines():
                key, _, value = stat_line.partition(" ")
                if key == names[2] and value.strip().isdigit():
                    inactive = int(value)
            rooms.append(int(limit) - max(int(usage) - inactive, 0))
    return min(rooms) if rooms else None


def available_bytes(device: Any) -> int | None:
    """Memory a new tensor on ``device`` can take now: free GPU memory (``torch.cuda.mem_get_info``), or
    the system's ``MemAvailable`` (Linux; physical pages elsewhere) capped by the room left in this
    process's memory cgroup (:func:`_cgroup_room`); None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except RuntimeError:
            return None
    system = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            system = int(line.split()[1]) * 1024
    if system is None:
        try:
            import os

            system = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            system = None
    room = _cgroup_room()
    if room is None:
        return system
    return max(room, 0) if system is None else max(min(system, room), 0)


def _bytes(n: float) -> str:
    """``n`` bytes for a message: GiB, or MiB below one GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _values(shape: tuple[int, ...], dtype: torch.dtype, copies: float = 1.0) -> tuple[float, str]:
    """Bytes of ``copies`` tensors of ``shape`` and ``dtype``, and how a message names them."""
    need = copies * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    size = " x ".join(f"{s:,}" for s in shape)
    return need, (f"{_bytes(need)} ({size} {str(dtype).replace('torch.', '')} values"
                  + (f", {copies:g} copies" if copies != 1 else "") + ")")


def require_memory(shape: tuple[int, ...], dtype: torch.dtype, device: Any, what: str, fix: str,
                   copies: float = 1.0) -> None:
    """A one-line ValueError unless ``copies`` tensors of ``shape`` fit in the memory ``device`` has
    available now (see :func:`alloc_basis`; nothing is checked when that is unknown)."""
    need, text = _values(shape, dtype, copies)
    avail = available_bytes(device)
    if avail is not None and need > avail:
        raise ValueError(f"{what} needs {text} and {torch.device(device).type} has {_bytes(avail)} available; {fix}.")


def alloc_basis(shape: tuple[int, ...], dtype: torch.dtype, device: Any, what: str, fix: str) -> Tensor:
    """``torch.empty(shape)`` for a Krylov basis, or a one-line ValueError saying how much it needs.

    An ``m x n`` basis of a large model is the one allocation here that can exceed the machine: 1,000
    Lanczos vectors of ResNet-18 are 44 GB in float32. Without this check the allocator's refusal was
    a traceback from deep inside ("DefaultCPUAllocator: can't allocate memory"), and an allocation the
    kernel accepted lazily could end in the OOM killer hours later. Checked against what is available
    now (:func:`available_bytes`), then the allocation itself.
    """
    require_memory(shape, dtype, device, what, fix)
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower() and "out of memory" not in str(exc):
            raise
        raise ValueError(f"{what} needs {_values(shape, dtype)[1]}, more than {torch.device(device).type} can "
                         f"allocate; {fix}.") from None
