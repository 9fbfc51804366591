"""`python -m seq2seq.train`: compose the Hydra config, check it, and train.

    python -m seq2seq.train                                   # transformer on Tatoeba zh->en
    python -m seq2seq.train model=bahdanau trainer.max_steps=2000
    python -m seq2seq.train -m model=rnn,bahdanau,transformer  # one after another (Hydra multirun)
    python -m seq2seq.train trainer.resume=auto                # continue the newest run of this data/model
    torchrun --nproc_per_node=2 -m seq2seq.train              # data-parallel (NCCL on GPUs, Gloo on CPUs)

Configuration mistakes are reported before any data is read, as one readable message and exit status 2.
"""

from __future__ import annotations

from seq2seq.allocator import prepare_memory

if __name__ == "__main__":
    prepare_memory()  # `python -m seq2seq.train`: re-execute before torch and Hydra are imported (the imports below)

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from seq2seq.training import distributed
from seq2seq.checkpoint import CheckpointError
from seq2seq.config import RunConfig, check_config, composition_error_message, saved_config
from seq2seq.errors import Seq2SeqError
from seq2seq.training.lifecycle import (
    LAST_CHECKPOINT, RunFolderError, RunLock, StopSignals, TrainingInterrupted, accept_run, buffer_log_records, check_creatable,
    data_source, remove_if_empty, remove_stale_temporaries, run_folder,
)
from seq2seq.runtime import resolve_device, resolve_precision
from seq2seq.training.resume import check_resumable
from seq2seq.training.setup import build_trainer
from seq2seq.training.trainer import Trainer

log = logging.getLogger("seq2seq.train")



# ----------------------------------------------------------------------------- run folders


def _register_resolvers() -> None:
    """hydra.run.dir / hydra.sweep.subdir in configs/train.yaml call these, so a resumed run keeps its folder."""
    def run_dir(root: str, group: str, stamp: str, resume: Any, data: Any) -> str:
        return str(run_folder(root, group, stamp, resume, data_source(saved_config({"data": data}).data)))

    def run_subdir(root: str, group: str, stamp: str, resume: Any, data: Any) -> str:
        return os.path.relpath(run_dir(root, group, stamp, resume, data), root)

    OmegaConf.register_new_resolver("seq2seq_run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("seq2seq_run_subdir", run_subdir, replace=True)


_register_resolvers()


def resume_checkpoint(cfg: RunConfig, run_dir: Path) -> Path | None:
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
    path = Path(resume).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"trainer.resume={resume}: no such checkpoint file. Pass a run's checkpoints/last.pt, or "
            "trainer.resume=auto to continue the newest run of this data and model."
        )
    return path


# ----------------------------------------------------------------------------- entry point


def _fail(error: BaseException | str, status: int, trainer: Trainer | None) -> None:
    """One readable line on stderr and an exit status, instead of a traceback."""
    if trainer is not None:
        trainer.close()
    print(f"error: {error}", file=sys.stderr, flush=True)
    distributed.leave(status)


def _resume_command(checkpoint: Path) -> str:
    """The command line that continues this run from `checkpoint`."""
    overrides = [shlex.quote(a) for a in sys.argv[1:] if not a.startswith(("trainer.resume=", "hydra.run.dir="))]
    return " ".join(["python -m seq2seq.train", *overrides, f"trainer.resume={shlex.quote(str(checkpoint))}"])


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def _run(cfg: DictConfig) -> None:
    """Check the config and the checkpoint, lock and accept the run folder, then train. Nothing is written into
    the run folder before the run is accepted, so a rejected launch leaves an earlier run as it was."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    buffered = buffer_log_records()
    trainer = lock = None
    accepted = False
    try:
        config = check_config(cfg)  # the typed config: what every part below reads
        ranks = distributed.env_info()
        device = resolve_device(config.trainer.device, ranks.local_rank)  # check_config has checked both
        precision = resolve_precision(config.trainer.precision, device)
        checkpoint = resume_checkpoint(config, run_dir)
        resume = None if checkpoint is None else (checkpoint, check_resumable(checkpoint, config, device, precision))
        if ranks.is_main:
            lock = RunLock(run_dir)
        trainer = build_trainer(config, run_dir, device, precision, resume)
        if trainer.is_main:
            for stale in remove_stale_temporaries(trainer.run_dir):
                log.info("removed %s, left by a process killed while saving", stale)
            lock.record_holder()
            hydra_cfg = HydraConfig.get()  # train.log has the console's format (configs/train.yaml)
            accept_run(trainer.run_dir, config, list(hydra_cfg.overrides.task), checkpoint, buffered,
                       hydra_cfg.job_logging.formatters.simple.format)
        else:
            logging.getLogger().removeHandler(buffered)
        accepted = True
        with StopSignals() as stops:
            trainer.fit(stops)
        if trainer.is_main:
            log.info("run folder: %s", trainer.run_dir.resolve())
    except Seq2SeqError as error:
        if not accepted:
            if lock is not None:
                lock.release(remove=True)
            remove_if_empty(run_dir)
        message = str(error)
        if isinstance(error, TrainingInterrupted):
            message += f". Continue with:\n  {_resume_command(error.checkpoint)}"
        _fail(message, error.exit_code, trainer)
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        _fail(f"cannot write{where}: {error.strerror or error}. Free space or fix the permissions, then run "
              "again (trainer.resume=auto continues from the last checkpoint).", 2, trainer)
    except KeyboardInterrupt:
        _fail("interrupted before the current step finished; nothing was saved since the last checkpoint", 130,
              trainer)
    trainer.close()
    del trainer  # its DDP model holds the process group: free it now, not at interpreter exit
    distributed.cleanup()


def main() -> None:
    """Console entry: an explicit hydra.run.dir / hydra.sweep.dir that cannot be created, a misspelt key or a value
    of the wrong type is one line and exit status 2, not the report Hydra would print."""
    prepare_memory()  # the seq2seq-train console script comes here first; a no-op once jemalloc is loaded
    created: list[Path] = []
    for argument in sys.argv[1:]:
        setting, _, value = argument.partition("=")
        if setting in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            try:
                check_creatable(Path(value).expanduser(), setting)
            except RunFolderError as error:
                print(f"error: {error}", file=sys.stderr, flush=True)
                sys.exit(2)
            created.append(Path(value).expanduser())
    # Hydra reports a composition error itself (advice to add a misspelt key with `+`, exit 1) unless
    # HYDRA_FULL_ERROR=1 lets it through; then it is one line here, or the full trace for who asked for one.
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _run()
    except CompactHydraException as error:
        if full_error:
            raise
        for folder in created:
            remove_if_empty(folder)
        print(f"error: {composition_error_message(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BrokenPipeError:  # `--cfg job | head`: the reader went away; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
