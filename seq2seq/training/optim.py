"""AdamW and the learning-rate schedules translation models are trained with.

Weight decay is applied to weight matrices only: decaying biases, normalisation gains or embedding rows
pulls them towards zero for no regularisation benefit (embeddings of rare tokens would simply shrink).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from seq2seq.config import SCHEDULES, OptimConfig

_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (weight matrices) and an undecayed one.

    A parameter owned by an embedding or a norm layer is never decayed, even when it is also used elsewhere
    (a tied output projection shares the target embedding's weight).
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for parameter in model.parameters():  # deduplicated, in a fixed order
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or id(parameter) in no_decay_ids:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with the configured peak learning rate; the schedule scales it step by step."""
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(
        parameter_groups(model, optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        **kwargs,
    )


def lr_multiplier(
    schedule: str, warmup_steps: int, total_steps: int | None = None, min_lr_ratio: float = 0.0,
    anchor: tuple[int, float] | None = None,
) -> Callable[[int], float]:
    """The factor applied to the peak learning rate after `step` optimizer updates (step 0 = the first update).

    inverse_sqrt: linear warmup, then decay with 1/sqrt(step) (Vaswani et al. 2017), equal to 1 at the end of warmup.
    cosine: linear warmup, then half a cosine down to `min_lr_ratio` at `total_steps` (the trainer re-fits it to the
    step a time limit ends the run at; with no length yet, a run bounded by time alone before its pace is known, it
    stays at the peak). With `anchor` = (update,
    factor), set when a resume changed `total_steps`: from that update on, half a cosine from that factor down to
    `min_lr_ratio` at the new `total_steps`, so the rate goes on from where it was instead of jumping.
    constant: linear warmup, then flat.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    warmup = max(warmup_steps, 0)

    def factor(step: int) -> float:
        update = step + 1  # LambdaLR asks for the factor of the update about to happen
        if update <= warmup:
            return update / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "inverse_sqrt":
            return math.sqrt(max(warmup, 1) / update)
        if not total_steps:
            return 1.0
        start, peak = (warmup, 1.0) if anchor is None or update < anchor[0] else anchor
        progress = min((update - start) / max(total_steps - start, 1), 1.0)
        return min_lr_ratio + (peak - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def schedule_of(
    optim_cfg: OptimConfig, total_steps: int | None, anchor: tuple[int, float] | None = None
) -> Callable[[int], float]:
    """The configured schedule's `lr_multiplier`."""
    return lr_multiplier(
        optim_cfg.schedule, optim_cfg.warmup_steps, total_steps, optim_cfg.min_lr_ratio, anchor,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, total_steps: int | None) -> LambdaLR:
    """A LambdaLR whose state (the step count) goes into checkpoints; the formula itself comes from the config."""
    return LambdaLR(optimizer, schedule_of(optim_cfg, total_steps))


def refit_scheduler(
    scheduler: LambdaLR, optimizer: torch.optim.Optimizer, lr: float, multiplier: Callable[[int], float]
) -> None:
    """After a resume: `lr` as the peak rate of every group and `multiplier` as the schedule, from the restored
    step count on. LambdaLR's state restores the old peak rates, which would silently ignore a changed optim.lr."""
    scheduler.lr_lambdas = [multiplier] * len(optimizer.param_groups)
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
