"""`python -m seq2seq.train`: compose the Hydra config, check it, and train.

    python -m seq2seq.train                                   # transformer on Tatoeba zh->en
    python -m seq2seq.train model=bahdanau trainer.max_steps=2000
    python -m seq2seq.train -m model=rnn,bahdanau,transformer  # one after another (Hydra multirun)
    python -m seq2seq.train trainer.resume=auto                # continue the newest run of this data/model
    torchrun --nproc_per_node=2 -m seq2seq.train              # data-parallel (NCCL on GPUs, Gloo on CPUs)

Configuration mistakes are reported before any data is read, as one readable message and exit status 2.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from seq2seq.training import distributed
from seq2seq.checkpoint import CheckpointError
from seq2seq.data.corpus import CorpusError
from seq2seq.models import build_model
from seq2seq.training.optim import SCHEDULES
from seq2seq.runtime import RuntimeSettingError, resolve_device, resolve_precision
from seq2seq.training.runs import (
    LAST_CHECKPOINT, RunFolderError, RunLock, StopSignals, TrainingInterrupted, accept_run, buffer_log_records, check_creatable,
    data_source, remove_if_empty, remove_stale_temporaries, run_folder,
)
from seq2seq.training.trainer import ConfigError, Trainer, TrainingError
from seq2seq.training.state import check_resumable

log = logging.getLogger("seq2seq.train")



# ----------------------------------------------------------------------------- run folders


def _register_resolvers() -> None:
    """hydra.run.dir / hydra.sweep.subdir in configs/train.yaml call these, so a resumed run keeps its folder."""
    def run_dir(root: str, group: str, stamp: str, resume: Any, data: Any) -> str:
        return str(run_folder(root, group, stamp, resume, data_source(data)))

    def run_subdir(root: str, group: str, stamp: str, resume: Any, data: Any) -> str:
        return os.path.relpath(run_dir(root, group, stamp, resume, data), root)

    OmegaConf.register_new_resolver("seq2seq_run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("seq2seq_run_subdir", run_subdir, replace=True)


_register_resolvers()


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint trainer.resume asks for, or None for a fresh start."""
    resume = cfg.trainer.resume
    if not resume:
        return None
    if resume == "auto":
        candidate = run_dir / LAST_CHECKPOINT
        if candidate.is_file():
            return candidate
        log.info(
            "trainer.resume=auto: no earlier run of %s/%s on %s has %s; starting a new run",
            cfg.data.name, cfg.model.name, data_source(cfg.data), LAST_CHECKPOINT,
        )
        return None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"trainer.resume={resume}: no such checkpoint file. Pass a run's checkpoints/last.pt, or "
            "trainer.resume=auto to continue the newest run of this data and model."
        )
    return path


# ----------------------------------------------------------------------------- validation


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError listing every value that cannot work, before any data is read or model built."""
    problems: list[str] = []
    t, o = cfg.trainer, cfg.optim

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    try:
        build_model(cfg.model, 8, 8)  # checks the family name and every model option; tiny and cheap
    except ValueError as error:
        problems.append(str(error))
    except Exception as error:  # a model option of the wrong type can fail inside a constructor
        problems.append(f"model={cfg.model.get('name')!r}: {error}")

    for key in ("max_steps", "max_epochs", "patience", "valid_max_sentences"):
        need(t[key] is None or _positive_int(t[key]), f"trainer.{key}={t[key]!r} must be a positive integer or null")
    for key in ("time_limit_minutes", "save_every_minutes"):
        need(t.get(key) is None or (_number(t.get(key)) and t.get(key) > 0),
             f"trainer.{key}={t.get(key)!r} must be a positive number or null")
    need(bool(t.max_steps or t.max_epochs or t.time_limit_minutes),
         "set at least one of trainer.max_steps, trainer.max_epochs or trainer.time_limit_minutes, or training never ends")
    for key in ("eval_every", "log_every", "max_tokens", "accumulate", "max_nonfinite_steps", "valid_beam_size",
                "test_beam_size"):
        need(_positive_int(t[key]), f"trainer.{key}={t[key]!r} must be a positive integer")
    for key in ("average_last", "num_attention_samples", "num_text_samples"):
        need(isinstance(t[key], int) and not isinstance(t[key], bool) and t[key] >= 0,
             f"trainer.{key}={t[key]!r} must be an integer >= 0")
    need(t.grad_clip is None or (_number(t.grad_clip) and t.grad_clip >= 0),
         f"trainer.grad_clip={t.grad_clip!r} must be a number >= 0 (0 or null: no clipping)")
    need(_number(t.label_smoothing) and 0 <= t.label_smoothing < 1,
         f"trainer.label_smoothing={t.label_smoothing!r} must be in [0, 1)")
    need(_number(t.length_penalty) and t.length_penalty >= 0, f"trainer.length_penalty={t.length_penalty!r} must be >= 0")
    need(_number(t.max_len_a) and t.max_len_a >= 0, f"trainer.max_len_a={t.max_len_a!r} must be a number >= 0")
    need(_positive_int(t.max_len_b), f"trainer.max_len_b={t.max_len_b!r} must be a positive integer")
    need(isinstance(t.seed, int) and not isinstance(t.seed, bool), f"trainer.seed={t.seed!r} must be an integer")
    need(isinstance(t.compile, bool), f"trainer.compile={t.compile!r} must be true or false")
    need(t.get("num_threads") is None or _positive_int(t.get("num_threads")),
         f"trainer.num_threads={t.get('num_threads')!r} must be a positive integer or null (all cores)")
    need(t.resume is None or isinstance(t.resume, str), f"trainer.resume={t.resume!r} must be a checkpoint path or auto")

    try:
        device = resolve_device(t.device)
        resolve_precision(t.precision, device)
    except RuntimeSettingError as error:
        problems.append(str(error))

    need(_number(o.lr) and o.lr > 0, f"optim.lr={o.lr!r} must be a positive number")
    need(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r} is not one of {', '.join(SCHEDULES)}")
    need(o.schedule != "cosine" or bool(t.max_steps or t.max_epochs),
         "optim.schedule=cosine needs trainer.max_steps or trainer.max_epochs (it decays to the last step)")
    need(isinstance(o.warmup_steps, int) and not isinstance(o.warmup_steps, bool) and o.warmup_steps >= 0,
         f"optim.warmup_steps={o.warmup_steps!r} must be an integer >= 0")
    betas = list(o.betas) if OmegaConf.is_list(o.betas) else None
    need(betas is not None and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas),
         f"optim.betas={o.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
    need(_number(o.eps) and o.eps > 0, f"optim.eps={o.eps!r} must be a positive number")
    need(_number(o.weight_decay) and o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay!r} must be >= 0")
    need(_number(o.get("min_lr_ratio", 0.0)) and 0 <= o.get("min_lr_ratio", 0.0) <= 1,
         f"optim.min_lr_ratio={o.get('min_lr_ratio')!r} must be in [0, 1]")

    tok = cfg.tokenizer
    need(tok.model_type in ("unigram", "bpe"), f"tokenizer.model_type={tok.model_type!r} must be unigram or bpe")
    for key in ("src_vocab_size", "tgt_vocab_size"):
        need(_positive_int(tok[key]) and tok[key] >= 8, f"tokenizer.{key}={tok[key]!r} must be an integer >= 8")
    need(not (cfg.model.get("share_embeddings") and not tok.joint),
         "model.share_embeddings=true needs tokenizer.joint=true (one vocabulary for both sides)")
    examples = cfg.get("attention_examples")
    need(examples is None or (OmegaConf.is_list(examples) and all(isinstance(e, str) for e in examples)),
         "attention_examples must be a list of source-language sentences")

    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------- entry point


def _fail(error: BaseException | str, status: int, trainer: Trainer | None) -> None:
    """One readable line on stderr and an exit status, instead of a traceback."""
    if trainer is not None:
        trainer.close()
    print(f"error: {error}", file=sys.stderr, flush=True)
    distributed.cleanup()
    sys.exit(status)


def _resume_command(checkpoint: Path) -> str:
    """The command line that continues this run from `checkpoint`."""
    overrides = [shlex.quote(a) for a in sys.argv[1:] if not a.startswith(("trainer.resume=", "hydra.run.dir="))]
    return " ".join(["python -m seq2seq.train", *overrides, f"trainer.resume={shlex.quote(str(checkpoint))}"])


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def _train(cfg: DictConfig) -> None:
    """Check the config and the checkpoint, lock and accept the run folder, then train. Nothing is written into
    the run folder before the run is accepted, so a rejected launch leaves an earlier run as it was."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    buffered = buffer_log_records()
    trainer = lock = None
    accepted = False
    try:
        validate_config(cfg)
        checkpoint = resume_checkpoint(cfg, run_dir)
        if checkpoint is not None:
            check_resumable(checkpoint, cfg)
        if distributed.env_info().is_main:
            lock = RunLock(run_dir)
        trainer = Trainer(cfg, run_dir, checkpoint)
        if trainer.is_main:
            for stale in remove_stale_temporaries(trainer.run_dir):
                log.info("removed %s, left by a process killed while saving", stale)
            lock.record_holder()
            accept_run(trainer.run_dir, cfg, list(HydraConfig.get().overrides.task), checkpoint, buffered)
        else:
            logging.getLogger().removeHandler(buffered)
        accepted = True
        with StopSignals() as stops:
            trainer.fit(stops)
        if trainer.is_main:
            log.info("run folder: %s", trainer.run_dir.resolve())
    except TrainingInterrupted as stop:
        _fail(f"{stop}. Continue with:\n  {_resume_command(stop.checkpoint)}", stop.status, trainer)
    except (ConfigError, CheckpointError, CorpusError, RunFolderError) as error:
        if not accepted:
            if lock is not None:
                lock.release(remove=True)
            remove_if_empty(run_dir)
        _fail(error, 2, trainer)
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        _fail(f"cannot write{where}: {error.strerror or error}. Free space or fix the permissions, then run "
              "again (trainer.resume=auto continues from the last checkpoint).", 2, trainer)
    except TrainingError as error:
        _fail(error, 1, trainer)
    except KeyboardInterrupt:
        _fail("interrupted before the current step finished; nothing was saved since the last checkpoint", 130,
              trainer)
    trainer.close()
    distributed.cleanup()


def main() -> None:
    """Console entry: an explicit hydra.run.dir / hydra.sweep.dir that cannot be created is one line, not the
    traceback Hydra would print when it creates the folder."""
    for argument in sys.argv[1:]:
        setting, _, value = argument.partition("=")
        if setting in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            try:
                check_creatable(Path(value).expanduser(), setting)
            except RunFolderError as error:
                print(f"error: {error}", file=sys.stderr, flush=True)
                sys.exit(2)
    _train()


if __name__ == "__main__":
    main()
