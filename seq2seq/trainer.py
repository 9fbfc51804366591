"""The training loop: token-budget batches, mixed precision, DDP, validation with BLEU, attention plots, checkpoints.

One `Trainer` runs on every rank. All ranks train; rank 0 alone logs, validates, decodes and writes files while
the others wait at a barrier, and every decision to stop is broadcast from rank 0 so ranks never disagree.

Nothing in the step loop waits for the device: losses, token counts, gradient norms and non-finite counts stay
tensors, and are read (one host synchronisation) only every `log_every` steps. A non-finite gradient skips the
update inside the fused AdamW kernel (its `found_inf` input) rather than by a Python branch on a device value.
Throughput (train/tokens_per_s, results.json) counts target tokens (y + EOS) of all ranks per second of training.

Exact resume: a checkpoint holds the model, optimizer, scheduler, scaler, every rank's RNG states and the sampler
position (epoch + batches consumed in it), taken between two updates, so a resumed run replays the same batches
with the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seq2seq import distributed
from seq2seq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from seq2seq.data.prepare import PreparedData, prepare_data
from seq2seq.data.batching import Batch, TokenBatchSampler, collate, make_loader
from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from seq2seq.decoding import decode
from seq2seq.metrics import bleu_by_length, corpus_scores
from seq2seq.models import build_model, count_parameters
from seq2seq.models.base import Seq2SeqModel
from seq2seq.optim import build_optimizer, build_scheduler
from seq2seq.plotting import attention_figure, figure_to_png, head_grid_figure
from seq2seq.predict import source_token_limit, translate_sentences

log = logging.getLogger("seq2seq.train")

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_SAMPLE_TOKENS = (3, 30)  # source lengths drawn as heatmaps: long enough to be interesting, short to read


class ConfigError(Exception):
    """A configuration value that cannot work; the message names the key and what to use instead."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and what to try."""


# ----------------------------------------------------------------------------- device, precision, seeds


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto = the GPU when one is visible; under torchrun each process takes the GPU of its local rank."""
    name = str(name)
    if name not in DEVICES:
        raise ConfigError(f"trainer.device={name!r} is not one of {', '.join(DEVICES)}.")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda but no CUDA GPU is visible (torch.cuda.is_available() is False with torch "
            f"{torch.__version__}). Use trainer.device=cpu or trainer.device=auto."
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 in hardware (x86 AMX / AVX512-BF16, Arm BF16).

    Without it PyTorch emulates bf16 matrix products, which is two orders of magnitude slower than fp32.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision (bf16 | fp16 | fp32) for `device`, or a ConfigError when the device cannot do it."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}.")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return "bf16" if bf16 else "fp16"
        if precision == "bf16" and not bf16:
            raise ConfigError(
                f"trainer.precision=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                "use trainer.precision=fp16 (with loss scaling) or fp32."
            )
        return precision
    native_bf16 = cpu_has_native_bf16()
    if precision == "auto":
        return "bf16" if native_bf16 else "fp32"
    if precision == "fp16":
        raise ConfigError(
            "trainer.precision=fp16 needs a CUDA GPU; on the CPU use trainer.precision=auto "
            "(bf16 where the CPU has AMX/AVX512-BF16, else fp32)."
        )
    if precision == "bf16" and not native_bf16:
        raise ConfigError(
            "trainer.precision=bf16 but this CPU has no native bfloat16 (no AMX or AVX512-BF16): PyTorch would "
            "emulate it about 100x slower than fp32. Use trainer.precision=fp32 or auto."
        )
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def token_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy summed over the real (non-PAD) target tokens, in float32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=PAD_ID,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point entries; other entries (counters, integer buffers) from the last."""
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            averaged[key] = (torch.stack([state[key].double() for state in states]).mean(0)).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-1 of the parameters' bytes in state_dict order: equal digests = bit-identical replicas."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ----------------------------------------------------------------------------- sampler position


class _SkipBatches(Sampler[list[int]]):
    """The sampler's batches for one epoch, without the first `skip` (already trained on before a resume)."""

    def __init__(self, sampler: TokenBatchSampler, skip: int) -> None:
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        for position, batch in enumerate(self.sampler):
            if position >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


@dataclass
class TrainState:
    """Counters that go into checkpoints so a resumed run carries on exactly."""

    step: int = 0
    epoch: int = 0  # sampler epoch of the next batch
    position: int = 0  # batches of that epoch already consumed
    best_bleu: float = -math.inf
    best_step: int = 0
    validations_since_best: int = 0
    nonfinite_steps: int = 0
    elapsed_seconds: float = 0.0  # wall clock of training (validations included), summed over sessions
    validation_seconds: float = 0.0
    tokens: int = 0  # target tokens trained on, all ranks
    last_validated_step: int = -1


# ----------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_from: Path | None = None) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dist = distributed.env_info()
        self.device = resolve_device(self.tcfg.device, self.dist.local_rank)
        self.precision = resolve_precision(self.tcfg.precision, self.device)
        self.dist = distributed.init_distributed(self.device.type)
        self.is_main = self.dist.is_main
        if self.dist.enabled:
            self._share_run_dir()
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        self._configure_threads()

        log.info("run folder: %s", self.run_dir.resolve())
        self.data = self._prepare_data()
        self.src_tok, self.tgt_tok = self.data.src_tokenizer, self.data.tgt_tokenizer

        seed_everything(int(self.tcfg.seed))  # identical initial weights on every rank
        try:
            self.model: Seq2SeqModel = build_model(cfg.model, self.src_tok.vocab_size, self.tgt_tok.vocab_size)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self.model.to(self.device)
        self.num_parameters = count_parameters(self.model)
        log.info(
            "model %s: %s trainable parameters | device %s, precision %s, %d thread(s)%s",
            cfg.model.name, f"{self.num_parameters:,}", self.device, self.precision, torch.get_num_threads(),
            f", {self.dist.world_size} ranks" if self.dist.enabled else "",
        )

        self.loader = make_loader(
            self.data.splits["train"], int(self.tcfg.max_tokens), shuffle=True, seed=int(self.tcfg.seed),
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.sampler: TokenBatchSampler = self.loader.batch_sampler
        self.accumulate = int(self.tcfg.accumulate)
        self.steps_per_epoch = max(math.ceil(len(self.sampler) / self.accumulate), 1)
        self.total_steps = self._total_steps()

        self.optimizer = build_optimizer(self.model, cfg.optim, fused=True)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.train_model = self._wrap_model()
        self.state = TrainState()
        self.resumed = False
        if resume_from is not None:
            self._resume(resume_from)
        # Different dropout masks per rank; after a resume the restored RNG states take over instead.
        if not self.resumed:
            seed_everything(int(self.tcfg.seed) + self.dist.rank)

        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            purge = {"purge_step": self.state.step + 1} if self.resumed else {}
            self.writer = SummaryWriter(log_dir=str(self.run_dir), **purge)
        self._attention_sources = self._pick_attention_sources() if self.is_main else []
        self._elapsed_base = self.state.elapsed_seconds
        self._session_start = time.perf_counter()
        self._reset_interval()

    # ------------------------------------------------------------------ setup

    def _share_run_dir(self) -> None:
        """Each torchrun process composed its own timestamped folder; all follow rank 0's, and a rank whose own
        folder differs (its clock ticked over) removes it when it holds nothing but Hydra's files."""
        shared = Path(distributed.broadcast_object(str(self.run_dir)))
        if shared != self.run_dir:
            own = self.run_dir
            if own.is_dir() and all(entry.name == ".hydra" or entry.suffix == ".log" for entry in own.iterdir()):
                shutil.rmtree(own, ignore_errors=True)
            self.run_dir, self.ckpt_dir = shared, shared / "checkpoints"

    def _configure_threads(self) -> None:
        """trainer.num_threads, else OMP_NUM_THREADS (torchrun sets 1 per process unless told otherwise), else
        PyTorch's default (one thread per physical core) split between the processes on this machine."""
        requested = self.tcfg.get("num_threads")
        if requested:
            torch.set_num_threads(int(requested))
        elif self.device.type == "cpu" and self.dist.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, torch.get_num_threads() // self.dist.local_world_size))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _prepare_data(self) -> PreparedData:
        """Rank 0 builds the tokenized cache first; the other ranks then load it instead of racing to build it."""
        if not self.is_main:
            distributed.barrier()
        try:
            prepared = prepare_data(self.cfg, log=self._data_log)
        except ValueError as error:  # e.g. a vocabulary too small for the corpus' characters
            raise ConfigError(f"cannot prepare data={self.cfg.data.name}: {error}") from error
        if self.is_main:
            distributed.barrier()
        return prepared

    def _data_log(self, message: str) -> None:
        """The cleaning report and cache location, logged once (by rank 0)."""
        if self.is_main:
            log.info("%s", message)

    def _total_steps(self) -> int | None:
        """Updates the run will make when it is bounded by steps or epochs (for the cosine schedule and the ETA)."""
        bounds = []
        if self.tcfg.max_steps:
            bounds.append(int(self.tcfg.max_steps))
        if self.tcfg.max_epochs:
            bounds.append(int(self.tcfg.max_epochs) * self.steps_per_epoch)
        return min(bounds) if bounds else None

    def _wrap_model(self) -> torch.nn.Module:
        module: torch.nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids)
        if self.tcfg.compile:
            module = torch.compile(module, dynamic=True)  # batch shapes change every step
        return module

    def _pick_attention_sources(self) -> list[str]:
        """Fixed sentences drawn at every validation: the first few readable-length validation sources, then
        the configured examples (e.g. 我是一个学生。)."""
        wanted = int(self.tcfg.num_attention_samples)
        valid = self.data.splits["valid"]
        low, high = ATTENTION_SAMPLE_TOKENS
        picked: list[str] = []
        for source, ids in zip(valid["src"], valid["src_ids"]):
            if len(picked) >= wanted:
                break
            if low <= len(ids) <= high:
                picked.append(source)
        return picked + [str(s) for s in (self.cfg.get("attention_examples") or [])]

    # ------------------------------------------------------------------ checkpoints

    def _payload(self, rng_states: list[dict[str, Any]], metrics: dict[str, Any], model_state=None) -> dict:
        return {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "model": model_state if model_state is not None else self.model.state_dict(),
            "src_tokenizer": self.src_tok.proto,
            "tgt_tokenizer": self.tgt_tok.proto,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "best_valid_bleu": self.state.best_bleu,
            "metrics": metrics,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_states,
            "sampler": {"epoch": self.state.epoch, "position": self.state.position},
            "train_state": asdict(self.state),
            "world_size": self.dist.world_size,
            "num_parameters": self.num_parameters,
        }

    def _resume(self, path: Path) -> None:
        payload = load_checkpoint(path, map_location="cpu")
        for key in ("optimizer", "scheduler", "rng", "train_state"):
            if payload.get(key) is None:
                raise CheckpointError(
                    f"{path} holds no training state ({key} is missing): it can translate but not resume training. "
                    "Resume from checkpoints/last.pt of a run, or start a new run."
                )
        if payload["src_tokenizer"] != self.src_tok.proto or payload["tgt_tokenizer"] != self.tgt_tok.proto:
            raise CheckpointError(
                f"{path} was trained with other SentencePiece models than data={self.cfg.data.name} and this "
                "tokenizer config produce; resume with the data and tokenizer settings of that run."
            )
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(
                f"{path} does not fit the configured model {self.cfg.model.name} ({error}). Resume with the "
                "model settings the checkpoint was trained with (see its run's .hydra/config.yaml)."
            ) from error
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainState(**payload["train_state"])
        rng = payload["rng"]
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
        else:
            log.warning(
                "%s was written by %d rank(s), this run has %d: training continues from its weights and "
                "optimizer state, but batches and dropout masks differ from an uninterrupted run.",
                path, len(rng), self.dist.world_size,
            )
            seed_everything(int(self.tcfg.seed) + self.dist.rank + self.state.step)
        if self.is_main:  # weights saved for averaging after this step belong to the abandoned continuation
            for stale in self._history_dir().glob("step_*.pt"):
                if int(stale.stem.split("_")[1]) > self.state.step:
                    stale.unlink()
        self.resumed = True
        log.info(
            "resumed from %s at step %d (epoch %d, %d batches into it), best valid BLEU %.2f",
            path, self.state.step, self.state.epoch + 1, self.state.position, self.state.best_bleu,
        )

    def _history_dir(self) -> Path:
        return self.ckpt_dir / "average"

    def _remember_for_average(self) -> None:
        """Keep the weights of the last `average_last` validations as small files (they survive a resume)."""
        keep = int(self.tcfg.average_last)
        if keep <= 0:
            return
        folder = self._history_dir()
        save_checkpoint(folder / f"step_{self.state.step:09d}.pt", {"model": self.model.state_dict(), "step": self.state.step})
        for old in sorted(folder.glob("step_*.pt"))[:-keep]:
            old.unlink()

    # ------------------------------------------------------------------ training

    def _batches(self) -> Iterator[Batch]:
        """Training batches across epochs, from the saved position on; updates `state.epoch/position` as it goes."""
        max_epochs = int(self.tcfg.max_epochs) if self.tcfg.max_epochs else None
        while max_epochs is None or self.state.epoch < max_epochs:
            self.sampler.set_epoch(self.state.epoch)
            if len(self.sampler) == 0:
                raise TrainingError("the training split yields no batches; check the data config and max_tokens.")
            skip = self.state.position
            loader = DataLoader(
                self.loader.dataset, batch_sampler=_SkipBatches(self.sampler, skip), collate_fn=collate,
                num_workers=0, pin_memory=self.device.type == "cuda",
            )
            for batch in loader:
                self.state.position += 1
                yield batch
            self.state.epoch += 1
            self.state.position = 0

    def _reset_interval(self) -> None:
        """Start a new logging interval; the running non-finite streak carries over."""
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self._loss_sum, self._grad_norm_sum, self._finite_steps = zero(), zero(), zero()
        self._nonfinite, self._streak_max = zero(), zero()
        if not hasattr(self, "_streak"):
            self._streak = zero()
        self._interval_tokens = 0
        self._interval_steps = 0
        self._interval_start = time.perf_counter()

    def _train_step(self, window: list[Batch]) -> None:
        """One optimizer update over `window` (the accumulated micro-batches), without host synchronisation.

        The loss is summed over target tokens and divided by the window's token count, so accumulating N
        batches gives the same update as one N times larger batch.
        """
        window_tokens = sum(batch.num_tgt_tokens for batch in window)  # from CPU masks: no device sync
        label_smoothing = float(self.tcfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        window_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(window):
            batch = batch.to(self.device, non_blocking=True)
            skip_sync = self.dist.enabled and i < len(window) - 1  # all-reduce gradients once, after the last
            with self._ddp().no_sync() if skip_sync else contextlib.nullcontext():
                with autocast(self.device, self.precision):
                    output = self.train_model(batch.src, batch.src_mask, batch.tgt_in)
                loss_sum = token_loss(output.logits, batch.tgt_out, label_smoothing)
                loss = loss_sum / window_tokens
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            window_loss += loss_sum.detach()

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = float(self.tcfg.grad_clip) if self.tcfg.grad_clip else math.inf
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

        self.state.step += 1
        self._loss_sum += window_loss
        self._grad_norm_sum += torch.where(finite, grad_norm, 0.0)
        self._finite_steps += finite.float()
        self._nonfinite += nonfinite
        self._streak = (self._streak + nonfinite) * nonfinite
        self._streak_max = torch.maximum(self._streak_max, self._streak)
        self._interval_tokens += window_tokens
        self._interval_steps += 1

    def _ddp(self) -> DistributedDataParallel:
        module = getattr(self.train_model, "_orig_mod", self.train_model)  # under torch.compile
        assert isinstance(module, DistributedDataParallel)
        return module

    def _log_interval(self, progress: tqdm | None) -> None:
        """Read the interval's statistics (the one host synchronisation) and log them on rank 0.

        Raises TrainingError, on every rank alike, after `max_nonfinite_steps` consecutive non-finite steps.
        """
        totals = torch.stack([self._loss_sum, torch.tensor(float(self._interval_tokens), device=self.device)])
        anomalies = torch.stack([self._nonfinite, self._streak_max])
        distributed.all_reduce(totals, "sum")
        distributed.all_reduce(anomalies, "max")
        loss_sum, tokens = totals.tolist()
        nonfinite, streak_max = (int(v) for v in anomalies.tolist())
        finite_steps = self._finite_steps.item()
        grad_norm = self._grad_norm_sum.item() / finite_steps if finite_steps else math.nan
        elapsed = time.perf_counter() - self._interval_start
        self.state.nonfinite_steps += nonfinite
        self.state.tokens += int(tokens)
        loss = loss_sum / max(tokens, 1.0)
        lr = self.scheduler.get_last_lr()[0]
        tokens_per_s = tokens / max(elapsed, 1e-9)
        step = self.state.step
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
            self.writer.add_scalar("train/nonfinite_steps", self.state.nonfinite_steps, step)
            self.writer.add_scalar("train/epoch", self.state.epoch + self.state.position / max(len(self.sampler), 1), step)
        if progress is not None:
            postfix = {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
            if self.tcfg.time_limit_minutes:
                left = max(float(self.tcfg.time_limit_minutes) * 60 - self._elapsed(), 0.0)
                postfix["time left"] = f"{left / 60:.1f}min"
            progress.set_postfix(postfix, refresh=False)
        if nonfinite:
            log.warning(
                "step %d: %d step(s) with a non-finite loss or gradient skipped in the last %d (%d in total)",
                step, nonfinite, self._interval_steps, self.state.nonfinite_steps,
            )
        self._reset_interval()
        if streak_max >= int(self.tcfg.max_nonfinite_steps):
            raise TrainingError(
                f"stopped at step {step}: {streak_max} consecutive steps had a non-finite loss or gradient "
                f"(trainer.max_nonfinite_steps={self.tcfg.max_nonfinite_steps}); the model diverged. Lower optim.lr, "
                "raise optim.warmup_steps, keep trainer.grad_clip on or use trainer.precision=fp32, then resume "
                "from checkpoints/last.pt or start again."
            )

    def _elapsed(self) -> float:
        """Wall-clock seconds of training, validations included, summed over resumed sessions."""
        return self._elapsed_base + (time.perf_counter() - self._session_start)

    def _time_is_up(self) -> bool:
        limit = self.tcfg.time_limit_minutes
        return bool(limit) and self._elapsed() >= float(limit) * 60

    def _budget_reached(self) -> bool:
        if self.tcfg.max_steps and self.state.step >= int(self.tcfg.max_steps):
            return True
        return bool(self.tcfg.max_epochs) and self.state.epoch >= int(self.tcfg.max_epochs)

    def fit(self) -> dict[str, Any]:
        """Train until a limit is reached, then validate, average, test and write results.json (rank 0)."""
        self._elapsed_base = self.state.elapsed_seconds
        self._session_start = time.perf_counter()
        if self._budget_reached() or self._time_is_up():
            log.info(
                "the run in %s is already complete (step %d, epoch %d, %.1f minutes); raise trainer.max_steps, "
                "trainer.max_epochs or trainer.time_limit_minutes to train it further.",
                self.run_dir, self.state.step, self.state.epoch, self._elapsed() / 60,
            )
            return {}
        self._reset_interval()
        max_steps = int(self.tcfg.max_steps) if self.tcfg.max_steps else None
        eval_every, log_every = int(self.tcfg.eval_every), int(self.tcfg.log_every)
        progress = None
        if self.is_main:
            progress = tqdm(
                total=self.total_steps, initial=self.state.step, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, smoothing=0.05,
            )
        reason = "max_epochs"
        batches = self._batches()
        with logging_redirect_tqdm():
            try:
                while True:
                    if max_steps is not None and self.state.step >= max_steps:
                        reason = "max_steps"
                        break
                    window = list(itertools.islice(batches, self.accumulate))
                    if not window:
                        break
                    self._train_step(window)
                    if progress is not None:
                        progress.update(1)
                    step = self.state.step
                    boundary = step % log_every == 0 or step % eval_every == 0
                    if boundary:
                        self._log_interval(progress)
                    stop = "time_limit_minutes" if (boundary or not self.dist.enabled) and self._time_is_up() else None
                    if step % eval_every == 0:
                        stop = self._validate_and_save() or stop
                    if boundary and self.dist.enabled:
                        stop = distributed.broadcast_object(stop)
                    if stop:
                        reason = stop
                        break
            finally:
                if progress is not None:
                    progress.close()
        if self._interval_steps:
            self._log_interval(None)
        log.info("training stopped at step %d (%s) after %.1f minutes", self.state.step, reason, self._elapsed() / 60)
        if self.state.last_validated_step != self.state.step:
            self._validate_and_save()
        self._check_replicas()
        results = self._finish(reason) if self.is_main else {}
        distributed.barrier()
        return results

    def _check_replicas(self) -> None:
        """Under DDP, compare the ranks' weights bit for bit: a silent desynchronisation would waste the run."""
        if not self.dist.enabled:
            return
        digests = distributed.all_gather_object(weights_digest(self.model))
        listing = ", ".join(f"rank{rank}={digest}" for rank, digest in enumerate(digests))
        if len(set(digests)) != 1:
            raise TrainingError(f"replica weights differ after step {self.state.step}: {listing}")
        log.info("replica weights identical on %d ranks at step %d (sha1: %s)", len(digests), self.state.step, listing)

    # ------------------------------------------------------------------ validation

    def _validate_and_save(self) -> str | None:
        """Validate, log and checkpoint on rank 0 while the other ranks wait; returns a stop reason or None."""
        rng_states = distributed.all_gather_object(rng_state())
        self.state.last_validated_step = self.state.step
        stop = None
        if self.is_main:
            started = time.perf_counter()
            metrics = self.validate(self.model, self.state.step)
            improved = metrics["bleu"] > self.state.best_bleu
            if improved:
                self.state.best_bleu, self.state.best_step = metrics["bleu"], self.state.step
                self.state.validations_since_best = 0
            else:
                self.state.validations_since_best += 1
            log.info(
                "step %d | valid loss %.3f | ppl %.2f | BLEU %.2f | chrF %.2f | best BLEU %.2f (step %d)",
                self.state.step, metrics["loss"], metrics["ppl"], metrics["bleu"], metrics["chrf"],
                self.state.best_bleu, self.state.best_step,
            )
            self.state.validation_seconds += time.perf_counter() - started
            self.state.elapsed_seconds = self._elapsed()
            payload = self._payload(rng_states, metrics)
            # last.pt goes last: whatever step it records, best.pt and the averaging history are as new.
            if improved:
                save_checkpoint(self.ckpt_dir / "best.pt", payload)
            self._remember_for_average()
            save_checkpoint(self.ckpt_dir / "last.pt", payload)
            self.writer.flush()
            patience = self.tcfg.patience
            if patience and self.state.validations_since_best >= int(patience):
                log.info("no BLEU improvement in %d validations: stopping early (trainer.patience)", patience)
                stop = "patience"
        distributed.barrier()
        self._reset_interval()  # validation time does not count towards tokens/s
        return stop

    @torch.inference_mode()
    def valid_loss(self, model: Seq2SeqModel, split: str = "valid") -> tuple[float, float]:
        """Per-token negative log-likelihood (no label smoothing) over a whole split, and its perplexity."""
        was_training = model.training
        model.eval()
        loader = make_loader(self.data.splits[split], int(self.tcfg.max_tokens), shuffle=False)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens = 0
        for batch in loader:
            tokens += batch.num_tgt_tokens
            batch = batch.to(self.device, non_blocking=True)
            with autocast(self.device, self.precision):
                logits = model(batch.src, batch.src_mask, batch.tgt_in).logits
            total += token_loss(logits, batch.tgt_out)
        model.train(was_training)
        loss = total.item() / max(tokens, 1)
        return loss, math.exp(min(loss, 50.0))

    def translate(self, model: Seq2SeqModel, sources: list[str], beam_size: int) -> list[str]:
        """Detokenized translations through the same path as `seq2seq.translate`."""
        return [
            translation.text
            for translation in translate_sentences(
                model, self.src_tok, self.tgt_tok, sources, beam_size=beam_size,
                length_penalty=float(self.tcfg.length_penalty), max_len_a=float(self.tcfg.max_len_a),
                max_len_b=int(self.tcfg.max_len_b), max_tokens=int(self.tcfg.max_tokens), device=self.device,
                precision=self.precision,
            )
        ]

    def validate(self, model: Seq2SeqModel, step: int, prefix: str = "valid", illustrate: bool = True) -> dict:
        """Loss, perplexity, BLEU and chrF on the validation split, logged under `prefix`; with `illustrate`,
        also the sample table and the attention heatmaps."""
        loss, ppl = self.valid_loss(model)
        valid = self.data.splits["valid"]
        count = len(valid) if self.tcfg.valid_max_sentences is None else min(len(valid), int(self.tcfg.valid_max_sentences))
        sources, references = list(valid["src"][:count]), list(valid["tgt"][:count])
        hypotheses = self.translate(model, sources, int(self.tcfg.valid_beam_size))
        scores = corpus_scores(hypotheses, references, str(self.cfg.data.tgt_lang))
        metrics = {"loss": loss, "ppl": ppl, "bleu": scores["bleu"], "chrf": scores["chrf"],
                   "bleu_signature": scores["bleu_signature"], "sentences": count}
        self.writer.add_scalar(f"{prefix}/loss", loss, step)
        self.writer.add_scalar(f"{prefix}/ppl", ppl, step)
        self.writer.add_scalar(f"{prefix}/bleu", scores["bleu"], step)
        self.writer.add_scalar(f"{prefix}/chrf", scores["chrf"], step)
        if illustrate:
            self._log_samples(sources, references, hypotheses, step)
            self._log_attention(model, step)
        return metrics

    def _log_samples(self, sources: list[str], references: list[str], hypotheses: list[str], step: int) -> None:
        rows = ["| # | source | reference | hypothesis |", "|---|---|---|---|"]
        for i, (src, ref, hyp) in enumerate(zip(sources, references, hypotheses)):
            if i >= int(self.tcfg.num_text_samples):
                break
            rows.append(f"| {i} | {_markdown_cell(src)} | {_markdown_cell(ref)} | {_markdown_cell(hyp)} |")
        self.writer.add_text("valid/samples", "\n".join(rows), step)

    @torch.inference_mode()
    def _log_attention(self, model: Seq2SeqModel, step: int) -> None:
        """Greedy translations of the fixed sentences, then a teacher-forced pass over them for the maps."""
        if not model.has_attention:
            self.writer.add_text(
                "attention",
                f"The {self.cfg.model.name} model has no attention: the decoder sees the source only through the "
                "encoder's final state, so there is no source-target alignment to draw.",
                step,
            )
            return
        was_training = model.training
        model.eval()
        limit = source_token_limit(model, float(self.tcfg.max_len_a), int(self.tcfg.max_len_b))
        for i, sentence in enumerate(self._attention_sources):
            ids = self.src_tok.encode(sentence)[:limit]
            if not ids:
                continue
            src = torch.tensor([ids + [EOS_ID]], device=self.device)
            src_mask = torch.ones_like(src, dtype=torch.bool)
            hypothesis = decode(
                model, src, src_mask, beam_size=1, length_penalty=1.0,
                max_len_a=float(self.tcfg.max_len_a), max_len_b=int(self.tcfg.max_len_b),
            )[0][0]
            tgt_in = torch.tensor([[BOS_ID, *hypothesis.tokens]], device=self.device)
            attention = model(src, src_mask, tgt_in, return_attention=True).attention
            src_pieces = self.src_tok.pieces(ids + [EOS_ID])
            tgt_pieces = self.tgt_tok.pieces(hypothesis.tokens) + ["</s>"]
            title = f"{sentence} → {self.tgt_tok.decode(hypothesis.tokens)}"
            tag = f"attention/{i:02d}"
            if "cross_layers" in attention:  # transformer: (L, 1, H, T, S)
                layers = attention["cross_layers"][:, 0].float().cpu()
                for layer, heads in enumerate(layers, start=1):
                    figure = attention_figure(heads.mean(0), src_pieces, tgt_pieces, f"{title} (layer {layer}, mean of heads)")
                    self._add_figure(f"{tag}/layer_{layer}", figure, step)
                figure = head_grid_figure(layers[-1], src_pieces, tgt_pieces, f"{title} (layer {len(layers)} heads)")
                self._add_figure(f"{tag}/heads_layer_{len(layers)}", figure, step)
            else:
                figure = attention_figure(attention["cross"][0].float().cpu(), src_pieces, tgt_pieces, title)
                self._add_figure(tag, figure, step)
        model.train(was_training)

    def _add_figure(self, tag: str, figure, step: int) -> None:
        """Render with the shared PNG renderer (the one `translate --attention-plot` uses) and log the image."""
        image = np.asarray(Image.open(io.BytesIO(figure_to_png(figure))).convert("RGB"))
        self.writer.add_image(tag, image, step, dataformats="HWC")

    # ------------------------------------------------------------------ end of training

    def _average_checkpoints(self) -> bool:
        """Evaluate the mean of the last validation weights; keep it as best.pt when it beats the best BLEU."""
        files = sorted(self._history_dir().glob("step_*.pt"))
        if len(files) < 2:
            return False
        states = [torch.load(f, map_location="cpu", weights_only=False)["model"] for f in files]
        steps = [int(f.stem.split("_")[1]) for f in files]
        self.model.load_state_dict(average_state_dicts(states))
        metrics = self.validate(self.model, self.state.step, prefix="valid_averaged", illustrate=False)
        log.info(
            "average of the weights at steps %s: valid BLEU %.2f, chrF %.2f (best single checkpoint %.2f)",
            ", ".join(map(str, steps)), metrics["bleu"], metrics["chrf"], self.state.best_bleu,
        )
        if metrics["bleu"] <= self.state.best_bleu:
            return False
        payload = self._payload(distributed.all_gather_object(rng_state()), {**metrics, "averaged_steps": steps})
        save_checkpoint(self.ckpt_dir / "best.pt", payload)
        log.info("the averaged weights score higher: saved as %s", self.ckpt_dir / "best.pt")
        self.state.best_bleu = metrics["bleu"]
        return True

    def _finish(self, reason: str) -> dict[str, Any]:
        """Rank 0: averaging, test of best.pt (beam search), BLEU by source length, results.json, hparams."""
        averaged = int(self.tcfg.average_last) > 0 and self._average_checkpoints()
        best_path = self.ckpt_dir / "best.pt"
        if not best_path.is_file():
            log.warning("%s is missing (deleted?); testing %s instead", best_path, self.ckpt_dir / "last.pt")
            best_path = self.ckpt_dir / "last.pt"
        best = load_checkpoint(best_path)
        self.model.load_state_dict(best["model"])
        test_split = self.data.splits["test"]
        test: dict[str, Any] = {"test_bleu": None, "test_chrf": None, "test_bleu_by_length": []}
        step = self.state.step
        if len(test_split):
            beam = int(self.tcfg.test_beam_size)
            hypotheses = self.translate(self.model, list(test_split["src"]), beam)
            references = list(test_split["tgt"])
            tgt_lang = str(self.cfg.data.tgt_lang)
            scores = corpus_scores(hypotheses, references, tgt_lang)
            buckets = bleu_by_length([len(ids) for ids in test_split["src_ids"]], hypotheses, references, tgt_lang)
            test = {
                "test_bleu": scores["bleu"], "test_chrf": scores["chrf"], "test_sentences": len(hypotheses),
                "test_beam_size": beam, "length_penalty": float(self.tcfg.length_penalty),
                "bleu_signature": scores["bleu_signature"], "chrf_signature": scores["chrf_signature"],
                "test_bleu_by_length": buckets,
            }
            self.writer.add_scalar("test/bleu", scores["bleu"], step)
            self.writer.add_scalar("test/chrf", scores["chrf"], step)
            rows = ["| source tokens | sentences | BLEU |", "|---|---|---|"]
            for bucket in buckets:
                self.writer.add_scalar(f"test/bleu_by_length/{bucket['bucket']}", bucket["bleu"], step)
                rows.append(f"| {bucket['bucket']} | {bucket['count']} | {bucket['bleu']:.2f} |")
            self.writer.add_text("test/bleu_by_length", "\n".join(rows), step)
            log.info(
                "test (best.pt from step %d%s, beam %d): BLEU %.2f | chrF %.2f | %s",
                best["step"], ", averaged" if averaged else "", beam, scores["bleu"], scores["chrf"],
                scores["bleu_signature"],
            )
            log.info("test BLEU by source length: %s", ", ".join(f"{b['bucket']}: {b['bleu']:.1f} ({b['count']})" for b in buckets))
        else:
            log.warning("data=%s has no test split: skipping the test evaluation", self.cfg.data.name)

        train_seconds = self.state.elapsed_seconds
        compute_seconds = max(train_seconds - self.state.validation_seconds, 1e-9)
        valid = best.get("metrics") or {}
        results = {  # flat keys, read by scripts/compare.py
            "model": str(self.cfg.model.name),
            "data": str(self.cfg.data.name),
            "run_dir": str(self.run_dir.resolve()),
            "parameters": self.num_parameters,
            "steps": step,
            "epochs": round(self.state.epoch + self.state.position / max(len(self.sampler), 1), 3),
            "stopped_by": reason,
            "train_minutes": train_seconds / 60,
            "target_tokens_per_s": self.state.tokens / compute_seconds,
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.dist.world_size,
            "best_step": int(best["step"]),
            "averaged": averaged,
            "nonfinite_steps": self.state.nonfinite_steps,
            "valid_loss": valid.get("loss"),
            "valid_ppl": valid.get("ppl"),
            "valid_bleu": valid.get("bleu"),
            "valid_chrf": valid.get("chrf"),
            "valid_sentences": valid.get("sentences"),
            **test,
        }
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        self._log_hparams(results)
        log.info("results written to %s", self.run_dir / "results.json")
        return results

    def close(self) -> None:
        """Flush TensorBoard events, also when training ends with an error (the curves up to it stay readable)."""
        if self.writer is not None:
            self.writer.close()

    def _log_hparams(self, results: dict[str, Any]) -> None:
        """One HPARAMS row per run, in the run's own folder, so TensorBoard lines variants up side by side."""
        hparams: dict[str, Any] = {"model": results["model"], "data": results["data"], "params": results["parameters"]}
        for key, value in OmegaConf.to_container(self.cfg.model, resolve=True).items():
            if key != "name":
                hparams[f"model.{key}"] = _hparam_value(value)
        for key in ("lr", "schedule", "warmup_steps", "weight_decay"):
            hparams[f"optim.{key}"] = _hparam_value(self.cfg.optim[key])
        for key in ("max_tokens", "accumulate", "label_smoothing", "grad_clip", "seed"):
            hparams[f"trainer.{key}"] = _hparam_value(self.tcfg[key])
        hparams["precision"] = self.precision
        metrics = {
            "hparam/valid_bleu": float(results["valid_bleu"] or 0.0),
            "hparam/test_bleu": float(results["test_bleu"] or 0.0),
            "hparam/test_chrf": float(results["test_chrf"] or 0.0),
            "hparam/train_minutes": float(results["train_minutes"]),
            "hparam/params": float(results["parameters"]),
        }
        self.writer.add_hparams(hparams, metrics, run_name=".", global_step=self.state.step)
