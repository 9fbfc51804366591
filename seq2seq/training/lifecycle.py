"""Run folders and the life of a run: unique names, one live writer, a launch history, and stops that keep the work.

A run lives in runs/<data>/<model>/<timestamp>_<pid>/. The pid suffix keeps two runs started in the same second
apart; `run.lock` (an flock the operating system drops when the process dies, so kill -9 leaves no stale lock)
keeps a second process, e.g. a second `trainer.resume=auto`, from writing into a run that is in use. Nothing is
written into a run folder before the run is accepted (config checked, checkpoint compatible): Hydra only creates
the folder, `accept_run` then writes `.hydra/config.yaml` (first launch), appends to `.hydra/launches.jsonl` (every
launch, with its overrides) and opens `train.log`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import logging.handlers
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seq2seq.config import DataConfig, RunConfig, saved_config
from seq2seq.errors import Seq2SeqError, UsageError
from seq2seq.training import distributed

LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
LOCK_FILE = "run.lock"
LAUNCHES = Path(".hydra") / "launches.jsonl"


class RunFolderError(UsageError):
    """A run folder that cannot be used: in use by another process, or not writable."""


# ----------------------------------------------------------------------------- where a run writes


def data_source(data: DataConfig) -> str:
    """What a run was trained on, beyond the data config's name: the hub dataset, the corpus file (resolved, so one
    file given by a relative and by an absolute path is one source), or its path below the data mirror."""
    if data.format == "hub":
        return f"hub:{data.hub_name}/{data.hub_config}"
    if data.path:
        return str(Path(data.path).expanduser().resolve())
    return str(data.mirror_path)


def newest_run(base: Path, source: str | None = None) -> Path | None:
    """The run folder under `base` (runs/<data>/<model>) whose checkpoints/last.pt was written last, among the
    runs trained on `source` (see `data_source`; None: any)."""
    candidates = [path.parent.parent for path in base.glob(f"*/{LAST_CHECKPOINT}") if path.is_file()]
    if source is not None:
        candidates = [run for run in candidates if _run_source(run) == source]
    if not candidates:
        return None
    return max(candidates, key=lambda run: (run / LAST_CHECKPOINT).stat().st_mtime)


def _run_source(run: Path) -> str | None:
    try:
        return data_source(saved_config(OmegaConf.load(run / ".hydra" / "config.yaml")).data)
    except (OSError, ValueError, AttributeError, TypeError, OmegaConfBaseException):
        return None


def run_folder(root: str, group: str, stamp: str, resume: Any, source: str | None = None) -> Path:
    """Where a run writes: a new <root>/<group>/<stamp>_<pid>, or, when resuming, the folder of the run it continues
    (trainer.resume=auto: the newest run of this data/model/corpus; a checkpoint inside a run folder: that run)."""
    base = Path(root) / group
    if resume == "auto":
        found = newest_run(base, source)
        if found is not None:
            return found
    elif resume:
        checkpoint = Path(str(resume)).expanduser()
        if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / ".hydra").is_dir():
            return checkpoint.parent.parent
    return base / f"{stamp}_{os.getpid()}"


def check_creatable(folder: Path, setting: str) -> None:
    """Create `folder` (as Hydra is about to) or raise RunFolderError naming the path and the cause."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(
            f"cannot create the run folder {folder}: {error.strerror or error}. Choose a writable place with "
            f"{setting}=/some/writable/folder."
        ) from error


def remove_if_empty(folder: Path) -> None:
    """Take back the folder Hydra created for a run that was rejected before it wrote anything."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def share_main_rank_folder(run_dir: Path) -> Path:
    """Under torchrun every process composed a folder of its own (the pid differs): all follow rank 0's, and the
    others take back theirs, which Hydra created empty."""
    shared = Path(distributed.broadcast_object(str(run_dir), "rank 0's run folder"))
    if shared != run_dir:
        remove_if_empty(run_dir)
    return shared


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete half-written checkpoint files (`.<name>.*.tmp`) left by a process killed mid-save. Only call this
    while holding the run's lock: then no live writer owns them."""
    stale = [path for path in (run_dir / "checkpoints").rglob(".*.tmp") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------- one writer per run


class RunLock:
    """An exclusive flock on <run>/run.lock for the life of this process; the file records the holder's pid."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        created = not self.path.exists()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunFolderError(f"cannot open {self.path}: {error.strerror or error}.") from error
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderError(f"cannot lock {self.path}: {error.strerror or error}.") from error
            raise RunFolderError(
                f"run {run_dir} is in use by pid {holder}; wait for it to finish (or stop it), or start a new run "
                "without trainer.resume."
            ) from error
        self._created = created

    def release(self, remove: bool = False) -> None:
        """Drop the lock; `remove` also deletes a lock file this process created (a run rejected at its start)."""
        if remove and self._created:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)

    def record_holder(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)


# ----------------------------------------------------------------------------- accepting a launch


def buffer_log_records() -> logging.handlers.MemoryHandler:
    """Hold log records until the run is accepted; `accept_run` then writes them to train.log."""
    handler = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(handler)
    return handler


def accept_run(run_dir: Path, cfg: RunConfig, overrides: list[str], resumed_from: Path | None,
               buffered: logging.handlers.MemoryHandler, log_format: str) -> None:
    """The run is going ahead: keep its config (first launch), record this launch, and start train.log, whose lines
    have `log_format`."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    if not (hydra_dir / "config.yaml").exists():
        OmegaConf.save(OmegaConf.create(dataclasses.asdict(cfg)), hydra_dir / "config.yaml")
        (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    launch = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "pid": os.getpid(),
        "command": sys.argv,
        "overrides": list(overrides),
        "resumed_from": str(resumed_from) if resumed_from else None,
    }
    with open(run_dir / LAUNCHES, "a", encoding="utf-8") as history:
        history.write(json.dumps(launch, ensure_ascii=False) + "\n")
    file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(log_format))
    root = logging.getLogger()
    buffered.setTarget(file_handler)
    buffered.flush()
    root.removeHandler(buffered)
    buffered.close()
    root.addHandler(file_handler)


# ----------------------------------------------------------------------------- stopping on a signal


class TrainingInterrupted(Seq2SeqError):
    """SIGINT/SIGTERM stopped training after a step; `checkpoint` holds that step, `exit_code` is 128 + the signal."""

    def __init__(self, message: str, checkpoint: Path, exit_code: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code


class StopSignals:
    """SIGINT and SIGTERM (Ctrl-C, schedulers, torchrun) ask the training loop to stop after the current step
    and save; a second Ctrl-C stops at once. Where nothing is left to save (a rank waiting for the others, the
    end-of-training work), `at_once` makes a signal stop the process where it is: a worker whose peer hangs
    or died still ends on SIGTERM."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._at_once: tuple[str, Path] | None = None

    def __enter__(self) -> StopSignals:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @contextlib.contextmanager
    def at_once(self, doing: str, checkpoint: Path) -> Iterator[None]:
        """Inside, a signal (or one received before) raises TrainingInterrupted at once, saying it stopped
        `doing`; `checkpoint`, already written, is where the run continues."""
        outer, self._at_once = self._at_once, (doing, checkpoint)
        try:
            if self.received is not None:
                self._interrupt(self.received)
            yield
        finally:
            self._at_once = outer

    def _interrupt(self, number: int) -> None:
        doing, checkpoint = self._at_once
        raise TrainingInterrupted(
            f"{signal.Signals(number).name} stopped {doing}; checkpoints up to {checkpoint} are saved", checkpoint,
            128 + number,
        )

    def _handle(self, number: int, frame: object) -> None:
        if self._at_once is not None:
            self.received = number
            self._interrupt(number)
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = number
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logging.getLogger("seq2seq.train").warning(
            "%s received: stopping after this step and saving checkpoints/last.pt (Ctrl-C again to stop at once)",
            signal.Signals(number).name,
        )

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
