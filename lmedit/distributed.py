"""Data parallelism over torch.distributed: what each process (rank) does, and gathering results.

Example (two processes on one machine, gloo on CPU, NCCL on GPUs)::

    torchrun --nproc-per-node 2 -m lmedit stats --layers 4-8 --n-samples 20000
    torchrun --nproc-per-node 2 -m lmedit eval --data cf.json --n 256 --batch-size 16

The CLI initialises the process group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``); library callers initialise it themselves and lmedit's functions notice. Work is
split into fixed units (corpus chunks, batches of records, sweep cells) assigned round-robin,
so the gathered result is the single-process one, whatever the number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without torch.distributed."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_main() -> bool:
    return rank_world()[0] == 0


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); a no-op otherwise.

    torch picks the backend per device (gloo for CPU tensors, NCCL for CUDA ones); with an
    accelerator each process uses the one numbered ``LOCAL_RANK``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if acc is not None:
            torch.accelerator.set_device_index(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=None if acc is not None else "gloo")
    return rank_world()


def local_device() -> torch.device | None:
    """This rank's accelerator under torch.distributed (None on CPU or without distributed)."""
    if _dist() is None or not torch.accelerator.is_available():
        return None
    return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())


def mine(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's share of ``items`` as (index, item): indices rank, rank + world, ..."""
    rank, world = rank_world()
    return [(i, items[i]) for i in range(rank, len(items), world)]


def gather_indexed(pairs: list[tuple[int, Any]], n: int) -> list[Any]:
    """Every rank's (index, value) pairs, as one list in index order (all ranks get it)."""
    dist = _dist()
    got: list[list[tuple[int, Any]]] = [pairs]
    if dist is not None:
        got = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(got, pairs)
    out: dict[int, Any] = {i: v for part in got for i, v in part}
    if sorted(out) != list(range(n)):
        raise RuntimeError(f"gathered {len(out)} of {n} results (ranks out of step)")
    return [out[i] for i in range(n)]


def from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (decisions that must agree, e.g. which cache files exist)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish() -> None:
    """Leave the process group (after the last collective)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
