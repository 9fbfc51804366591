"""Resuming a run: check a checkpoint against this run's config, then restore it; the file is read once.

Exact resume: a checkpoint holds the model, optimizer, scheduler, scaler, every rank's RNG states (the global
ones and its DataLoader's generator) and the sampler position (epoch + batches consumed in it), taken between
two updates, so a resumed run replays the same batches with the same dropout masks as an uninterrupted one.
`check_resumable` refuses, before anything is built or written, a checkpoint this config cannot continue exactly,
unless trainer.resume_reset names the part that may start afresh; `restore` then loads it into the built run.
Settings that change nothing in the saved state (optim.lr, max_steps, validation, ...) apply as given, each logged.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from seq2seq.checkpoint import CheckpointError, checkpoint_tokenizers, load_checkpoint
from seq2seq.config import RunConfig, saved_config
from seq2seq.runtime import seed_everything, set_rng_state
from seq2seq.training.optim import refit_scheduler, schedule_of
from seq2seq.training.lifecycle import data_source
from seq2seq.training.state import AveragingHistory, CheckpointParts, Counters, total_steps

log = logging.getLogger("seq2seq.train")

TRAINING_KEYS = ("optimizer", "scheduler", "rng", "train_state")
# Settings a resume cannot continue exactly, with the trainer.resume_reset that continues anyway (None: nothing
# can, the weights or vocabularies are those of that setting). Checked by prefix: "model." is every model key.
_RESUME_RULES: tuple[tuple[str, str | None, str], ...] = (
    ("model.", None, "the weights belong to that model"),
    ("tokenizer.", None, "the vocabularies belong to that tokenizer"),
    ("data source", "sampler", "it was trained on another corpus"),
    ("data.src_lang", None, "the model translates the other way"),
    ("data.tgt_lang", None, "the model translates the other way"),
    ("data.", "sampler", "the training split and its batches differ"),
    ("trainer.max_tokens", "sampler", "the saved batch position points into other batches"),
    ("trainer.accumulate", "sampler", "the saved batch position points into other updates"),
    ("trainer.pad_multiple", "sampler", "the saved batch position points into other batches"),
    ("trainer.seed", "sampler", "later epochs would shuffle differently"),
    ("trainer.device", "runtime", "the saved random states and the arithmetic are another device's"),
    ("trainer.precision", "runtime", "the saved loss scale and the arithmetic are another precision's"),
    ("optim.schedule", "schedule", "the learning-rate schedule would change its course"),
    ("optim.warmup_steps", "schedule", "the learning-rate schedule would change its course"),
    ("optim.min_lr_ratio", "schedule", "the learning-rate schedule would change its course"),
)
_NOT_COMPARED = ("data.name", "data.path", "data.mirror_path", "data.download_url", "data.download_member",
                 "data.num_proc", "data.alignments_path")  # name: languages; corpus: `data_source`; AER: not trained on
_RUNTIME = ("trainer.device", "trainer.precision")


def flat_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"group.key": value}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _compared(payload: dict[str, Any], cfg: RunConfig, device: torch.device, precision: str
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint's, this run's) settings as compared: the corpus as a resolved source, and the device type and
    precision the run really used (older files record only what was asked, e.g. auto, compared when both name one)."""
    saved = payload["config"]
    theirs, ours = flat_settings(saved), flat_settings(asdict(cfg))
    theirs["data source"], ours["data source"] = data_source(saved_config(saved).data), data_source(cfg.data)
    used = payload.get("runtime")
    if used:
        theirs.update({"trainer.device": used["device"], "trainer.precision": used["precision"]})
        ours.update({"trainer.device": device.type, "trainer.precision": precision})
    else:
        for key in _RUNTIME:
            if "auto" in (theirs.get(key), ours.get(key)):
                theirs.pop(key, None)
    return theirs, ours


def check_resumable(path: Path, cfg: RunConfig, device: torch.device, precision: str) -> dict[str, Any]:
    """The checkpoint at `path`, read once, if this run can continue it -> its contents, for `restore`.

    Refuses, in one line naming the first setting that differs, a file without training state, a model, tokenizer
    or direction change always, and a change of the data, batching, schedule, device or precision unless
    trainer.resume_reset asks for that part to start afresh. The weights are checked by `restore`.
    """
    payload = load_checkpoint(path, map_location="cpu")
    for key in TRAINING_KEYS:
        if payload.get(key) is None:
            raise CheckpointError(
                f"{path} holds no training state ({key} is missing): it can translate but not resume training. "
                "Resume from checkpoints/last.pt of a run, or start a new run."
            )
    resets = cfg.trainer.resets
    theirs, ours = _compared(payload, cfg, device, precision)
    for setting in ours:
        if setting in _NOT_COMPARED or setting not in theirs or theirs[setting] == ours[setting]:
            continue  # a key the checkpoint predates cannot be compared
        rule = next((rule for rule in _RESUME_RULES if setting.startswith(rule[0])), None)
        if rule is None or rule[1] in resets:
            continue
        _prefix, reset, why = rule
        advice = (
            f"resume with the checkpoint's value, or add trainer.resume_reset=[{reset}] to continue without "
            "an exact replay" if reset else "resume with that run's settings (its .hydra/config.yaml), or start a "
            "new run without trainer.resume"
        )
        raise CheckpointError(
            f"cannot resume from {path}: {setting} differs (checkpoint: {theirs[setting]}, this run: "
            f"{ours[setting]}) and {why}; {advice}."
        )
    return payload


def changed_settings(saved: dict[str, Any], cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The settings of this run that differ from the checkpoint's: {key: (checkpoint, this run)}."""
    theirs = flat_settings(saved)
    ours = flat_settings(asdict(cfg))
    return {key: (theirs[key], value) for key, value in ours.items() if key in theirs and theirs[key] != value}


def restore(path: Path, payload: dict[str, Any], parts: CheckpointParts, loader_generator: torch.Generator,
            history: AveragingHistory | None, steps_per_epoch: int, rank: int) -> Counters:
    """Load `payload` (read from `path` by `check_resumable`) into the built run -> the saved counters. The parts
    trainer.resume_reset names start afresh: the optimizer or the schedule as freshly built, the sampler at the
    start of its epoch with new random states. `history` (rank 0's) forgets weights saved past the checkpoint."""
    cfg, resets = parts.cfg, parts.cfg.trainer.resets
    if checkpoint_tokenizers(payload) != (parts.src_tok, parts.tgt_tok):
        raise CheckpointError(
            f"{path} was trained with other SentencePiece models or normalisation than data={cfg.data.name} "
            "and this tokenizer config produce; resume with the data and tokenizer settings of that run."
        )
    try:
        parts.model.load_state_dict(payload["model"])
        if "optimizer" not in resets:
            parts.optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[-1].strip()[:200]  # torch lists every key; one says enough
        raise CheckpointError(
            f"{path} does not fit the configured {cfg.model.name} model ({first}). Resume with the "
            "model settings the checkpoint was trained with (see its run's .hydra/config.yaml)."
        ) from error
    if "schedule" not in resets:
        parts.scheduler.load_state_dict(payload["scheduler"])
    if parts.scaler is not None and payload.get("scaler"):
        parts.scaler.load_state_dict(payload["scaler"])
    counters = Counters(**payload["train_state"])
    if "schedule" in resets:
        counters.schedule_anchor = counters.planned_steps = None
    _restore_random_state(path, payload["rng"], counters, loader_generator, parts, rank)
    for part in sorted(resets - {"sampler"}):
        log.warning("trainer.resume_reset: the %s starts afresh", part)
    _refit_schedule(payload["config"], parts, counters, steps_per_epoch)
    if history is not None:
        history.forget_after(counters.step)
    return counters


def _restore_random_state(path: Path, states: list[dict[str, Any]], counters: Counters,
                          loader_generator: torch.Generator, parts: CheckpointParts, rank: int) -> None:
    """Each rank's saved RNG states, or (trainer.resume_reset=[sampler]) the epoch from its start, seeded anew."""
    seed = parts.cfg.trainer.seed
    if "sampler" in parts.cfg.trainer.resets:
        counters.position = 0
        log.warning("trainer.resume_reset: the sampler starts its current epoch afresh, with new random states")
        seed_everything(seed + rank + counters.step)
    elif len(states) != parts.world_size:
        raise CheckpointError(
            f"cannot resume from {path}: it was written by {len(states)} process(es) and this run has "
            f"{parts.world_size}, so batches and dropout masks would differ; resume with {len(states)}, or add "
            "trainer.resume_reset=[sampler] to continue without an exact replay."
        )
    else:
        set_rng_state(states[rank], {"train_loader": loader_generator})


def _refit_schedule(saved: dict[str, Any], parts: CheckpointParts, counters: Counters, steps_per_epoch: int) -> None:
    """This run's optimizer hyper-parameters and peak rate over the restored ones, and a cosine schedule whose
    length changed re-fitted to go on from its current rate (optim.lr_multiplier's anchor); each change logged."""
    cfg = parts.cfg
    changed = {key: pair for key, pair in changed_settings(saved, cfg).items()
               if not key.startswith("trainer.resume")}
    if changed:
        log.info("settings changed since the checkpoint, applied as given: %s",
                 ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items()))
    optimizer, scheduler, optim = parts.optimizer, parts.scheduler, cfg.optim
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = tuple(optim.betas), optim.eps
    optimizer.param_groups[0]["weight_decay"] = optim.weight_decay  # the decayed group (optim.py)
    old_trainer = saved_config(saved).trainer
    old_total = total_steps(old_trainer, steps_per_epoch)
    new_total = total_steps(cfg.trainer, steps_per_epoch)
    moved = old_total != new_total or old_trainer.time_limit_minutes != cfg.trainer.time_limit_minutes
    if optim.schedule == "cosine" and "schedule" not in cfg.trainer.resets and moved:
        if scheduler.last_epoch >= optim.warmup_steps:
            old_length = counters.planned_steps or old_total
            before = schedule_of(optim, old_length, counters.schedule_anchor)(scheduler.last_epoch)
            counters.schedule_anchor = (scheduler.last_epoch + 1, before)
            counters.planned_steps = None  # the new time limit's end is estimated afresh
            log.info("cosine schedule: %s -> %s steps%s; it decays from %.3g x lr at update %d to its floor at "
                     "the new end, without a jump", old_length, new_total,
                     " or where the new time limit stops the run" if cfg.trainer.time_limit_minutes else "",
                     before, scheduler.last_epoch + 1)
    length = counters.planned_steps or new_total  # a time limit's estimate holds until the next log interval
    refit_scheduler(scheduler, optimizer, optim.lr, schedule_of(optim, length, counters.schedule_anchor))
    if "optim.lr" in changed:
        log.info("optim.lr %s -> %s: the schedule goes on at step %d with the new peak (lr now %.3g)",
                 *changed["optim.lr"], counters.step, optimizer.param_groups[0]["lr"])
