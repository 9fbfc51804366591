"""Data-parallel training under torchrun: one process per GPU (NCCL) or per CPU worker (Gloo).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain `python -m seq2seq.train` has none of
them and runs as the single rank 0, so the same code serves both without flags.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, validates and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """What torchrun told this process (single-process defaults when not launched by it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun: NCCL between GPUs, Gloo between CPU processes."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank))
        else:
            dist.init_process_group("gloo")
    return info


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Other ranks wait here while rank 0 validates and writes checkpoints."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s value on every rank (a stop decision, a run folder); identity when not distributed."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place "sum" or "max" over ranks; identity when not distributed."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (RNG states for a checkpoint, weight digests)."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def global_token_normaliser(local_tokens: int, device: torch.device) -> int | torch.Tensor:
    """The divisor of a rank's summed token loss under which DDP's gradient average (a mean over ranks) is the
    gradient of the global per-token mean: the target tokens of all ranks / world size (`local_tokens` alone
    when not distributed). No host synchronisation: the count is filled on `device` (a CPU tensor for Gloo, a GPU
    one for NCCL) and the all-reduce is queued like any other kernel."""
    if not dist.is_initialized():
        return local_tokens
    total = torch.full((), float(local_tokens), device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-1 of the parameters' bytes in state_dict order: equal digests = bit-identical replicas."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
