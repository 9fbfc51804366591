"""Where and in what precision the models run, and the random state: one rule for training, translation,
evaluation and benchmarks.

`auto` means the same everywhere:
  - device: the CUDA GPU of this process's local rank when one is visible, else the CPU;
  - precision: bf16 where the hardware multiplies bfloat16 natively (a GPU with bf16, a CPU with AMX /
    AVX512-BF16 / Arm BF16), fp16 on a GPU without bf16 (the trainer adds a gradient scaler), else fp32.
Precisions the device cannot do well are refused with a message naming the setting, never silently emulated:
fp16 needs a GPU, and bf16 on a CPU without native support would run about 100x slower than fp32.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seq2seq.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")
CONCRETE_PRECISIONS = ("bf16", "fp16", "fp32")
PRECISIONS = ("auto", *CONCRETE_PRECISIONS)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RuntimeSettingError(UsageError, ValueError):
    """A device or precision this machine cannot run; the message names the setting and what to use instead."""


def resident_memory() -> tuple[float, float] | None:
    """This process's resident memory now and its peak so far, in GiB (Linux /proc; None elsewhere): the figure
    that decides whether a run fits a laptop, logged at every validation and at the end of a run."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        now, peak = (int(fields[key].split()[0]) * 1024 / 2**30 for key in ("VmRSS", "VmHWM"))
    except (KeyError, ValueError, IndexError):
        return None
    return now, peak


def resolve_device(name: str, local_rank: int = 0, setting: str = "trainer.device") -> torch.device:
    """auto = the GPU when one is visible; under torchrun each process takes the GPU of its local rank."""
    name = str(name)
    if name not in DEVICES:
        raise RuntimeSettingError(f"{setting}={name!r} is not one of {', '.join(DEVICES)}.")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeSettingError(
            f"{setting}=cuda but no CUDA GPU is visible (torch.cuda.is_available() is False with torch "
            f"{torch.__version__}). Use {setting}=cpu or {setting}=auto."
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU multiplies bfloat16 in hardware (x86 AMX / AVX512-BF16, Arm BF16).

    Without it PyTorch emulates bf16 matrix products, which is two orders of magnitude slower than fp32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 matrix products in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_precision(name: str, device: torch.device, setting: str = "trainer.precision",
                      bf16_native: bool | None = None) -> str:
    """The concrete precision (bf16 | fp16 | fp32) for `device`, or a RuntimeSettingError when it cannot do it.

    `bf16_native` overrides the hardware probe (tests use it to reach every branch on any machine).
    """
    name = str(name)
    if name not in PRECISIONS:
        raise RuntimeSettingError(f"{setting}={name!r} is not one of {', '.join(PRECISIONS)}.")
    bf16 = native_bf16(device) if bf16_native is None else bf16_native
    if device.type == "cuda":
        if name == "auto":
            return "bf16" if bf16 else "fp16"
        if name == "bf16" and not bf16:
            raise RuntimeSettingError(
                f"{setting}=bf16 but this GPU has no bfloat16 support (it needs compute capability 8.0+); "
                f"use {setting}=fp16 (with loss scaling in training) or fp32."
            )
        return name
    if name == "auto":
        return "bf16" if bf16 else "fp32"
    if name == "fp16":
        raise RuntimeSettingError(
            f"{setting}=fp16 needs a CUDA GPU; on the CPU use {setting}=auto "
            "(bf16 where the CPU has AMX/AVX512-BF16, else fp32)."
        )
    if name == "bf16" and not bf16:
        raise RuntimeSettingError(
            f"{setting}=bf16 but this CPU has no native bfloat16 (no AMX or AVX512-BF16): PyTorch would "
            f"emulate it about 100x slower than fp32. Use {setting}=fp32 or auto."
        )
    return name


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's, for benchmark reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("cpu" where it cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"


def configure_device(device: torch.device) -> None:
    """TF32 matrix products for the fp32 parts on GPUs (the usual trade; autocast regions are unaffected)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for `precision` on `device`; models keep softmaxes and log-probabilities in float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its range is too small for gradients); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing; the training loop itself never waits)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The global Python/NumPy/torch(/CUDA) RNG states plus those of named generators (e.g. a DataLoader's)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    state["generators"] = {name: generator.get_state() for name, generator in (generators or {}).items()}
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what `rng_state` saved; a named generator missing from `state` keeps its own seeding."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name in saved:
            generator.set_state(saved[name])
