"""Data-parallel training over ``torch.distributed`` (launched by ``torchrun``).

When a process group is initialised (``torch.distributed.init_process_group``), every rank
runs the same cmtl calls on the same data; :func:`cmtl.training.loop.train` gives each rank its
share of every global batch, and :func:`all_reduce_gradients` sums the trainable (LoRA and
head) gradients across ranks after each backward pass — one flat all-reduce per step, the
frozen backbone never travels. Each rank's loss is weighted by its share of the global
batch, so a step equals the single-process step on the same global batch. Only rank 0
writes to the registry; the others wait and then read what it wrote (the registry folder
must be on a file system every rank sees).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """Whether ``flag`` holds on any rank (every rank must call this; ``device`` must suit the backend:
    CUDA for NCCL)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shard(batch: Sequence[int]) -> list[int]:
    """This rank's rows of a global batch: every ``world``-th row from its rank on."""
    rank, size = world()
    return list(batch[rank::size])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks (a new tensor; ``tensor`` itself without a process group)."""
    if world()[1] == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all ranks, in place. A gradient missing on some ranks counts
    as zero there; one missing on every rank stays ``None``, as in one process (AdamW then leaves the
    parameter alone instead of decaying it and applying its momentum)."""
    if world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device, dtype=grads[0].dtype)
    flat = torch.cat([g.reshape(-1) for g in grads] + [has])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset, anywhere = 0, flat[-len(params):].tolist()
    for p, g, found in zip(params, grads, anywhere):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if found else None
        offset += n
