"""One optimizer update: the code the trainer runs at every step and `scripts/benchmark.py` times.

Nothing here waits for the device: losses, gradient norms and non-finite flags stay tensors, the token counts
come from CPU masks, and a non-finite gradient skips the update inside the fused AdamW kernel (its `found_inf`
input) rather than by a Python branch on a device value.

The loss of a window (the accumulated micro-batches of one update) is its summed token cross-entropy divided by
the target tokens of the window on ALL ranks, times the world size: DDP averages gradients over ranks, so the
update is the gradient of the global per-token mean (as if one process had seen every rank's batches), whatever
the ranks' token counts.

A batch that runs out of memory is skipped, not fatal: the window's gradients are dropped, the update is not
made, and the trainer counts and logs it. Under DDP the ranks first agree (a host-side all-reduce of the flag
before each backward), so all skip the same window; an out-of-memory error inside the backward that all-reduces
the gradients cannot be recovered and propagates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from seq2seq.training import distributed
from seq2seq.data.batching import Batch
from seq2seq.data.tokenizer import PAD_ID
from seq2seq.models.base import Seq2SeqModel
from seq2seq.config import RunConfig
from seq2seq.training.optim import build_optimizer, build_scheduler
from seq2seq.runtime import autocast, grad_scaler

PhaseTimer = Callable[[str], contextlib.AbstractContextManager]


def token_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy summed over the real (non-PAD) target tokens, in float32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=PAD_ID,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


def wrap_model(model: Seq2SeqModel, device: torch.device, data_parallel: bool, compile: bool) -> torch.nn.Module:
    """The module the step runs forward through: DDP across ranks, then torch.compile when asked."""
    module: torch.nn.Module = model
    if data_parallel:
        # The models' only buffers are constant tables (sinusoidal positions): no broadcast before each forward,
        # so a forward is never a collective (and one rank's out-of-memory forward cannot desynchronise them).
        module = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if compile:
        module = torch.compile(module, dynamic=True)  # batch shapes change every step
    return module


@dataclass
class UpdateResult:
    """What one update leaves behind, all on the device: summed loss, gradient norm and its finiteness."""

    loss_sum: torch.Tensor
    tokens: int  # target tokens of this rank's window
    grad_norm: torch.Tensor
    finite: torch.Tensor
    nonfinite: torch.Tensor  # 1.0 when the step was an anomaly (non-finite loss, or gradient without a scaler)
    out_of_memory: bool = False  # the window was skipped (no update): a batch did not fit, on this rank or another
    failed_batch: str = ""  # the shape of this rank's batch that did not fit (empty when another rank's did not)


@dataclass
class Update:
    """Forward, backward and optimizer update of one window; `train_model` is `model`, maybe DDP-wrapped/compiled."""

    model: Seq2SeqModel
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    device: torch.device
    precision: str
    label_smoothing: float
    grad_clip: float  # 0: no clipping (the norm is still measured)

    @classmethod
    def from_config(cls, model: Seq2SeqModel, cfg: RunConfig, device: torch.device, precision: str,
                    data_parallel: bool, total_steps: int | None) -> Update:
        """The step `cfg` describes (optim, trainer.compile/label_smoothing/grad_clip), for the trainer and the
        benchmark alike."""
        optimizer = build_optimizer(model, cfg.optim, fused=True)
        return cls(
            model=model,
            train_model=wrap_model(model, device, data_parallel, cfg.trainer.compile),
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg.optim, total_steps),
            scaler=grad_scaler(device, precision),
            device=device,
            precision=precision,
            label_smoothing=cfg.trainer.label_smoothing,
            grad_clip=cfg.trainer.grad_clip or 0.0,
        )

    def move(self, batch: Batch) -> Batch:
        """To the device; asynchronous from pinned memory (the loader pins when training on a GPU)."""
        return batch.to(self.device, non_blocking=True)

    def forward(self, batch: Batch, normaliser: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss to back-propagate, summed token loss)."""
        with autocast(self.device, self.precision):
            output = self.train_model(batch.src, batch.src_mask, batch.tgt_in)
        loss_sum = token_loss(output.logits, batch.tgt_out, self.label_smoothing)
        return loss_sum / normaliser, loss_sum

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def apply_gradients(self, window_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clip, step (skipped when non-finite), schedule -> (grad norm, finite, nonfinite)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.grad_clip if self.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        finite = torch.isfinite(grad_norm)  # gradients are already all-reduced: every rank agrees
        if self.scaler is not None:
            # The scaler skips overflowing fp16 steps and lowers its scale; only a non-finite loss is an anomaly.
            nonfinite = (~torch.isfinite(window_loss)).float()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            nonfinite = (~finite | ~torch.isfinite(window_loss)).float()
            self.optimizer.found_inf = (~finite).float()  # the fused AdamW kernel then skips the whole update
            self.optimizer.step()
        self.scheduler.step()
        return grad_norm, finite, nonfinite

    def __call__(self, window: list[Batch], phase: PhaseTimer = lambda name: contextlib.nullcontext()) -> UpdateResult:
        """One optimizer update over `window`, without host synchronisation; `phase(name)` wraps each of the
        data / forward / backward / optimizer phases (the benchmark times them there).

        Accumulating N batches gives the same update as one N times larger batch.
        """
        window_tokens = sum(batch.num_tgt_tokens for batch in window)  # from CPU masks: no device sync
        normaliser = distributed.global_token_normaliser(window_tokens, self.device)
        data_parallel = isinstance(self._unwrapped(), DistributedDataParallel)
        self.optimizer.zero_grad(set_to_none=True)
        window_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(window):
            with phase("data"):
                batch = self.move(batch)
            all_reduces = data_parallel and i == len(window) - 1  # DDP all-reduces gradients in this backward
            with self._unwrapped().no_sync() if data_parallel and not all_reduces else contextlib.nullcontext():
                loss = self._forward_backward(batch, normaliser, window_loss, phase, backward=not all_reduces)
                ran_out = loss is None
                if data_parallel:
                    ran_out = distributed.any_rank(ran_out, "the other ranks' out-of-memory check")
                if ran_out:
                    failed_batch = describe(batch) if loss is None else ""
                    del loss  # its graph holds the batch's activations
                    return self._skip(failed_batch, data_parallel)
                if all_reduces:
                    with phase("backward"):
                        self.backward(loss)
        with phase("optimizer"):
            grad_norm, finite, nonfinite = self.apply_gradients(window_loss)
        return UpdateResult(window_loss, window_tokens, grad_norm, finite, nonfinite)

    def _forward_backward(self, batch: Batch, normaliser: float | torch.Tensor, window_loss: torch.Tensor,
                          phase: PhaseTimer, backward: bool) -> torch.Tensor | None:
        """Forward (and backward, unless it is DDP's all-reducing one) of one batch, its summed loss added to
        `window_loss` -> the loss to back-propagate, or None when the batch ran out of memory."""
        try:
            with phase("forward"):
                loss, loss_sum = self.forward(batch, normaliser)
            if backward:
                with phase("backward"):
                    self.backward(loss)
        except torch.OutOfMemoryError:
            return None  # leaving the handler frees the traceback and with it the batch's activations
        window_loss += loss_sum.detach()
        return loss

    def _skip(self, failed_batch: str, data_parallel: bool) -> UpdateResult:
        """Drop the window's gradients and hand the memory back; no update, no schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        if data_parallel:
            # A rank whose all-reducing forward succeeded now expects its backward; every rank resets DDP's
            # reducer alike, as DDP itself does when its process group changes (`_update_process_group`).
            self._unwrapped().reducer._reset_state()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        zero = torch.zeros((), device=self.device)
        return UpdateResult(zero, 0, zero, torch.zeros((), dtype=torch.bool, device=self.device), zero,
                          out_of_memory=True, failed_batch=failed_batch)

    def _unwrapped(self) -> torch.nn.Module:
        return getattr(self.train_model, "_orig_mod", self.train_model)  # under torch.compile


def describe(batch: Batch) -> str:
    """A batch's shape as a log line gives it: sentences x padded source / target positions."""
    return f"{batch.size} sentences x {batch.src.size(1)} source / {batch.tgt_in.size(1)} target positions"


class IntervalStats:
    """Device-side sums over a logging interval, read once per interval (the loop's one host synchronisation)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.streak = torch.zeros((), device=device)  # running non-finite streak; survives interval resets
        self.reset()

    def reset(self) -> None:
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.loss_sum, self.grad_norm_sum, self.finite_steps = zero(), zero(), zero()
        self.nonfinite, self.streak_max = zero(), zero()
        self.tokens = 0
        self.steps = 0

    def reduce(self, when: str) -> tuple[float, int, int, int]:
        """(summed loss, target tokens, non-finite steps, longest non-finite streak) of the interval on all ranks;
        reading them is the loop's one host synchronisation."""
        totals = torch.stack([self.loss_sum, torch.tensor(float(self.tokens), device=self.device)])
        anomalies = torch.stack([self.nonfinite, self.streak_max])
        distributed.all_reduce(totals, f"the training statistics of {when}", "sum")
        distributed.all_reduce(anomalies, f"the non-finite counts of {when}", "max")
        loss_sum, tokens = totals.tolist()
        nonfinite, streak_max = (int(value) for value in anomalies.tolist())
        return loss_sum, int(tokens), nonfinite, streak_max

    def add(self, result: UpdateResult) -> None:
        self.loss_sum += result.loss_sum
        self.grad_norm_sum += torch.where(result.finite, result.grad_norm, 0.0)
        self.finite_steps += result.finite.float()
        self.nonfinite += result.nonfinite
        self.streak = (self.streak + result.nonfinite) * result.nonfinite
        self.streak_max = torch.maximum(self.streak_max, self.streak)
        self.tokens += result.tokens
        self.steps += 1
