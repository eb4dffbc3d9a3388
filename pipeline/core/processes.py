"""This process's place in the work: which slice of stage one it owns, its device, and its torchrun group.

Stage one splits shards among workers (`worker_slot`, `owned`: explicit worker
flags or torchrun's environment) with no process group; a training run joins
torchrun's group (`Distributed`: the collectives a run uses, and rank 0 alone
doing what only one process may). `resolve_device` picks this process's
device (torchrun's LOCAL_RANK names its GPU).
"""

from __future__ import annotations

import gc
import os
from typing import Callable

import torch
import torch.distributed as dist

from pipeline.core.errors import MoekdError


def worker_slot(worker: int | None = None, num_workers: int | None = None) -> tuple[int, int]:
    """(index, count) of this worker.

    Explicit `--worker i --num-workers n` wins; otherwise torchrun's RANK and
    WORLD_SIZE; otherwise a single worker.
    """
    if worker is None and num_workers is None:
        worker = int(os.environ.get("RANK", 0))
        num_workers = int(os.environ.get("WORLD_SIZE", 1))
    elif worker is None or num_workers is None:
        raise MoekdError("--worker and --num-workers must be given together")
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise MoekdError(f"worker {worker} is out of range for {num_workers} workers (0 <= worker < num_workers)")
    return worker, num_workers


def owned(items: range | list[int], worker: int, num_workers: int) -> list[int]:
    """The items worker `worker` of `num_workers` handles (round-robin, so loads even out)."""
    return [item for item in items if item % num_workers == worker]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; a CUDA device without an index is this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise MoekdError(f"device {device!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MoekdError(f"device {device!r} was asked for but CUDA is not available here")
    if resolved.type == "cuda" and resolved.index is None:
        # torchrun starts one process per GPU and tells each which one in LOCAL_RANK.
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return resolved


class Distributed:
    """This process's place in a torchrun job (a lone process is rank 0 of 1), and the collectives used.

    Under torchrun (WORLD_SIZE > 1) it joins the process group: NCCL on GPUs,
    gloo on CPUs.
    """

    def __init__(self, device: str = "auto"):
        self.rank, self.world_size = worker_slot()
        self.device = resolve_device(device)
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def stop(self) -> None:
        """Leave the process group. Drop every DDP wrapper first (`Trainer.close`): a Reducer freed after
        this, with the GIL held, would hold the group's last reference and join gloo's worker threads,
        which may be waiting for the GIL to free a finished collective's tensors (a deadlock at exit)."""
        if self.world_size > 1 and dist.is_initialized():
            gc.collect()  # DDP's hooks make reference cycles: its Reducer goes only with a collection
            dist.destroy_process_group()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def on_rank0(self, fn: Callable):
        """fn() run by rank 0 alone; every rank gets its result, or raises the MoekdError it raised."""
        result = error = None
        if self.rank == 0:
            try:
                result = fn()
            except MoekdError as e:
                error = str(e)
        if self.world_size > 1:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if error is not None:
            raise MoekdError(error)
        return result

    def say(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.rank == 0:
            print(message)
