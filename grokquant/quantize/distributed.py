"""Spreading `quantize` over processes with torch.distributed (gloo on CPU, NCCL on GPUs).

Launched by torchrun (`torchrun --nproc-per-node N -m grokquant quantize ...`, multi-node through
torchrun's rendezvous), every rank runs the same layer-streamed pass: each computes the layer's
forward pass (so the Hessians are summed in exactly the single-process order and the output is
byte-identical to it), the layer's quantization work — the stacks of matrices that GPTQ or the GGML
rounding handle together — is split among the ranks by cost, the results are gathered on rank 0
(on every rank in sequential mode, whose next layer needs them), and rank 0 alone writes. A rank
that dies makes the collectives of the others fail (gloo/NCCL timeout or closed connection); the
job exits non-zero and a re-run resumes after the last layer rank 0 wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

TIMEOUT = timedelta(minutes=30)  # one layer of the real model can take this long on CPUs


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj, everywhere: bool):
        """Every rank's `obj` as a list in rank order: on rank 0 (or on all ranks); None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        if everywhere:
            out = [None] * self.world
            dist.all_gather_object(out, obj)
            return out
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def current() -> Group:
    """The process group this process belongs to (a group of one when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def init_from_env(device: str) -> tuple[Group, str]:
    """Join the group torchrun describes in the environment (if any); returns it and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Group(), device
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    return current(), device


def assign(costs: list[float], world: int) -> list[int]:
    """Rank of each work item: largest first onto the least-loaded rank (deterministic on every rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner
