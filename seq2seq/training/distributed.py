"""Data-parallel training under torchrun: one process per GPU (NCCL) or per CPU worker (Gloo).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain `python -m seq2seq.train` has none of
them and runs as the single rank 0, so the same code serves both without flags.

No silent hangs: every collective names what it waits for (`what`, e.g. "rank 0's validation at step 400"), and
one that fails or does not complete within the timeout (trainer.collective_timeout_minutes) raises CollectiveError
with that name. Code that rank 0 runs alone while the others wait (validation, the final test, writing files) runs
inside `main_rank_only`, where a collective raises at once, also in a single process: the other ranks would never
join it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from seq2seq.errors import Seq2SeqError

DEFAULT_TIMEOUT = timedelta(minutes=30)


class CollectiveError(Seq2SeqError, RuntimeError):
    """A collective that failed or timed out; the message names the rank, what it waited for and what to do."""


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


@dataclass
class _Session:
    """This process's settings for its collectives."""

    timeout: timedelta = DEFAULT_TIMEOUT
    host_group: Any = None  # a Gloo group for host-side flags when the default group is NCCL
    abandoned: bool = False  # a collective failed or was given up: the group can no longer be torn down
    main_rank_section: str | None = None  # what rank 0 is doing alone, while inside `main_rank_only`


_session = _Session()


def env_info() -> DistInfo:
    """What torchrun told this process (single-process defaults when not launched by it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


def init_distributed(device_type: str, timeout: timedelta = DEFAULT_TIMEOUT) -> DistInfo:
    """Join the process group when launched by torchrun: NCCL between GPUs, Gloo between CPU processes; a
    collective that waits longer than `timeout` fails instead of hanging."""
    info = env_info()
    _session.timeout = timeout
    if info.enabled and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank), timeout=timeout)
            _session.host_group = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return info


def cleanup() -> None:
    """Tear the process group down while the interpreter is whole. A DDP model that is garbage but not yet
    collected keeps the group alive, and a Gloo group freed during interpreter shutdown aborts the process
    ("terminate called without an active exception"): collect first, and drop such models before calling this."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _session.host_group = None


def leave(status: int) -> NoReturn:
    """End the process with `status`. After a collective was given up, tearing the group down (or letting the
    interpreter do it) waits for that collective forever, in Gloo and NCCL alike: then exit without teardown,
    once the output is flushed."""
    if _session.abandoned:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    cleanup()
    sys.exit(status)


@contextlib.contextmanager
def main_rank_only(what: str) -> Iterator[None]:
    """Mark `what` as work rank 0 does alone while the other ranks wait: a collective inside raises at once."""
    outer, _session.main_rank_section = _session.main_rank_section, what
    try:
        yield
    finally:
        _session.main_rank_section = outer


def _minutes(timeout: timedelta) -> str:
    return f"{timeout.total_seconds() / 60:g} minutes"


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Refuse a collective in rank-0-only code; turn a failure or timeout into a CollectiveError naming `what`."""
    if _session.main_rank_section is not None:
        raise CollectiveError(
            f"a collective ({what}) was called during {_session.main_rank_section}, which rank 0 runs alone: the "
            "other ranks would never join it. This is a bug in seq2seq; please report it."
        )
    try:
        yield
    except CollectiveError:
        _session.abandoned = True
        raise
    except RuntimeError as error:  # Gloo and NCCL timeouts, a peer that closed its connection
        _session.abandoned = True
        raise _failure(what, str(error).strip().splitlines()[-1][:200]) from error


def _failure(what: str, cause: str) -> CollectiveError:
    return CollectiveError(
        f"rank {dist.get_rank()} stopped waiting for {what} ({cause}; timeout {_minutes(_session.timeout)}): "
        "another rank died, hung or took longer. See its output above; if it is only slow, raise "
        "trainer.collective_timeout_minutes. Continue with trainer.resume=auto (checkpoints/last.pt)."
    )


def barrier(what: str) -> None:
    """Wait until every rank arrives (e.g. while rank 0 validates). The wait polls, so a signal handler runs
    meanwhile (SIGTERM can stop a waiting worker), and it gives up after the timeout."""
    with _collective(what):
        if not dist.is_initialized():
            return
        work = dist.barrier(async_op=True)
        deadline = time.monotonic() + _session.timeout.total_seconds()
        pause = 0.001
        try:
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise _failure(what, "no answer")
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
        except BaseException:  # the deadline, or a signal handler's exception (see runs.StopSignals.at_once)
            _session.abandoned = True
            raise
        work.wait()


def broadcast_object(value: Any, what: str, src: int = 0) -> Any:
    """Rank `src`'s value on every rank (a stop decision, a run folder); identity when not distributed."""
    with _collective(what):
        if not dist.is_initialized():
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]


def all_reduce(tensor: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
    """In-place "sum" or "max" over ranks; identity when not distributed."""
    with _collective(what):
        if dist.is_initialized():
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def any_rank(flag: bool, what: str) -> bool:
    """Whether `flag` is true on some rank, through a host-side (Gloo) all-reduce: no wait for the GPU."""
    with _collective(what):
        if not dist.is_initialized():
            return flag
        value = torch.tensor(float(flag))
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_session.host_group)
        return bool(value.item())


def all_gather_object(value: Any, what: str) -> list[Any]:
    """Every rank's `value`, in rank order (RNG states for a checkpoint, weight digests)."""
    with _collective(what):
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
    with _collective("the target-token count of the next update"):
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
