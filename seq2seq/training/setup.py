"""`build_trainer`: everything a run needs, built from the typed config, in the order the ranks must agree on.

Processes and threads first, then the data (rank 0 builds the tokenized cache while the others wait, then they
load it), the model (the same initial weights on every rank), the training loader, the optimisation step, and,
when resuming, the checkpoint restored into them; rank 0 alone writes TensorBoard events and validates.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from seq2seq.allocator import active_allocator
from seq2seq.config import ConfigError, RunConfig
from seq2seq.data.batching import make_loader
from seq2seq.data.prepare import PreparedData, prepare_data
from seq2seq.models import build_model, count_parameters
from seq2seq.runtime import configure_device, seed_everything
from seq2seq.training import board, distributed
from seq2seq.training.keeper import CheckpointKeeper
from seq2seq.training.limits import StoppingRules
from seq2seq.training.resume import restore
from seq2seq.training.lifecycle import share_main_rank_folder
from seq2seq.training.state import AveragingHistory, CheckpointParts, Counters, total_steps
from seq2seq.training.update import Update
from seq2seq.training.trainer import Trainer
from seq2seq.training.validation import Evaluator

log = logging.getLogger("seq2seq.train")


def _configure_threads(cfg: RunConfig, device: torch.device, local_world_size: int) -> None:
    """trainer.num_threads, else OMP_NUM_THREADS (torchrun sets 1 per process unless told otherwise), else
    PyTorch's default (one thread per physical core) split between the processes on this machine."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    elif device.type == "cpu" and local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world_size))


def _prepare_data(cfg: RunConfig, is_main: bool) -> PreparedData:
    """Rank 0 builds the tokenized cache first; the other ranks then load it instead of racing to build it."""
    if not is_main:
        distributed.barrier("rank 0's data preparation")
    try:
        prepared = prepare_data(cfg, log=log.info if is_main else lambda message: None)
    except ValueError as error:  # e.g. a vocabulary too small for the corpus' characters
        raise ConfigError(f"cannot prepare data={cfg.data.name}: {error}") from error
    if is_main:
        distributed.barrier("rank 0's data preparation")
    return prepared


def build_trainer(cfg: RunConfig, run_dir: Path, device: torch.device, precision: str,
                  resume: tuple[Path, dict[str, Any]] | None = None) -> Trainer:
    """The run `cfg` describes, on `device` in `precision` (this rank's, resolved once by the caller); `resume`:
    a checkpoint's path and contents that `resume.check_resumable` accepted."""
    dist = distributed.init_distributed(device.type, timedelta(minutes=cfg.trainer.collective_timeout_minutes))
    if dist.enabled:
        run_dir = share_main_rank_folder(run_dir)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    _configure_threads(cfg, device, dist.local_world_size)
    configure_device(device)
    log.info("run folder: %s", run_dir.resolve())
    data = _prepare_data(cfg, dist.is_main)

    seed_everything(cfg.trainer.seed)  # identical initial weights on every rank
    try:  # the vocabularies exist only now: too small, or two where share_embeddings needs one
        model = build_model(cfg.model, data.src_tokenizer.vocab_size, data.tgt_tokenizer.vocab_size).to(device)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    num_parameters = count_parameters(model)
    log.info(
        "model %s: %s trainable parameters | device %s, precision %s, %d thread(s)%s, %s allocator",
        cfg.model.name, f"{num_parameters:,}", device, precision, torch.get_num_threads(),
        f", {dist.world_size} ranks" if dist.enabled else "", active_allocator(),
    )

    loader = make_loader(
        data.splits["train"], cfg.trainer.max_tokens, shuffle=True, seed=cfg.trainer.seed, rank=dist.rank,
        world_size=dist.world_size, pad_multiple=cfg.trainer.pad_multiple, pin_memory=device.type == "cuda",
    )
    steps_per_epoch = max(math.ceil(loader.batch_sampler.batches_per_epoch / cfg.trainer.accumulate), 1)
    steps = total_steps(cfg.trainer, steps_per_epoch)
    update = Update.from_config(model, cfg, device, precision, dist.enabled, steps)
    parts = CheckpointParts(cfg, model, data.src_tokenizer, data.tgt_tokenizer, update.optimizer, update.scheduler,
                            update.scaler, dist.world_size, num_parameters, device, precision)
    folder = run_dir / "checkpoints"
    history = AveragingHistory(folder / "average", cfg.trainer.average_last) if dist.is_main else None
    counters = Counters()
    if resume is not None:
        counters = restore(*resume, parts, loader.generator, history, steps_per_epoch, dist.rank)
    else:
        seed_everything(cfg.trainer.seed + dist.rank)  # different dropout masks per rank

    rules = StoppingRules(cfg.trainer, steps)
    keeper = None
    if dist.is_main:
        writer = board.open_writer(run_dir, counters.step + 1 if resume is not None else None)
        evaluator = Evaluator(cfg, data, device, precision, writer)
        keeper = CheckpointKeeper(folder, parts, evaluator, history, writer, rules)
    trainer = Trainer(cfg, run_dir, dist, device, precision, model, loader, update, counters, rules, keeper)
    if resume is not None:  # epochs counted as the log and TensorBoard's train/epoch count them everywhere
        log.info("resumed from %s at step %d (%.2f epochs), best valid BLEU %.2f", resume[0], counters.step,
                 trainer.epochs_done(), counters.best_bleu)
    return trainer
