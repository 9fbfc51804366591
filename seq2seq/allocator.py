"""The memory allocator of a training process: jemalloc when the machine has it, glibc's malloc otherwise.

glibc's malloc keeps freed blocks of every tensor size it has seen in its heap, and training on CPUs allocates
activations of a new size at nearly every batch, so the heap grows far beyond what is live. jemalloc's size classes
and decay return that memory. An allocator cannot be swapped in a running process, so `use_jemalloc` re-executes
the command once with jemalloc preloaded (the same process id, so torchrun and job schedulers see no difference);
SEQ2SEQ_ALLOCATOR=system keeps glibc, and an allocator the user preloads (LD_PRELOAD naming tcmalloc, mimalloc, ...)
is left in charge.

oneDNN, which runs the CPU's matrix products and recurrent layers, keeps every primitive it builds in a cache of 1,024
by default, and each new shape builds new ones: validation decoding, whose batches shrink as sentences finish,
fills it within a few validations, and the cache then holds hundreds of MiB. `bound_onednn_cache` caps it at 256:
that memory back, for the time to rebuild what decoding evicts (docs/results.md); ONEDNN_PRIMITIVE_CACHE_CAPACITY
set by the user wins. Standard library only: it runs before torch is loaded.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 256  # primitives; oneDNN reads the variable when it builds its first one
ENV_CHOICE = "SEQ2SEQ_ALLOCATOR"  # jemalloc (default: when installed) | system
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "snmalloc", "tbbmalloc", "hoard")  # malloc replacements, by name
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_jemalloc() -> str | None:
    """The path of libjemalloc.so.2 (Debian/Ubuntu `libjemalloc2`, Fedora `jemalloc`), or None."""
    for folder in _LIBRARY_DIRS:
        candidate = Path(folder) / "libjemalloc.so.2"
        if candidate.is_file():
            return str(candidate)
    name = ctypes.util.find_library("jemalloc")
    return name if name and Path(name).is_absolute() else None


def active_allocator() -> str:
    """The malloc replacement this process has loaded ('jemalloc', 'tcmalloc', ...), else 'glibc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return next((name for name in ALLOCATORS if f"lib{name}" in maps), "glibc")


def preloaded_allocator() -> str | None:
    """The allocator LD_PRELOAD names, if any: the user's choice, which a re-exec must not override."""
    libraries = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    return next((name for library in libraries for name in ALLOCATORS if name in Path(library).name), None)


def prepare_memory() -> None:
    """Before torch is imported: cap oneDNN's primitive cache, then re-execute with jemalloc (the re-executed
    process inherits the cap)."""
    bound_onednn_cache()
    use_jemalloc()


def bound_onednn_cache() -> None:
    """Cap oneDNN's primitive cache unless the user chose a capacity (this process and those it starts)."""
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE_CAPACITY))


def use_jemalloc() -> None:
    """Re-execute this command with jemalloc preloaded, unless it is loaded already, absent, or not wanted."""
    choice = os.environ.get(ENV_CHOICE, "jemalloc")
    if choice not in ("jemalloc", "system"):
        print(f"error: {ENV_CHOICE}={choice!r} must be jemalloc or system", file=sys.stderr)
        sys.exit(2)
    if choice == "system" or sys.platform != "linux" or active_allocator() != "glibc" or preloaded_allocator():
        return
    library = find_jemalloc()
    if library is None:
        return
    preload = " ".join(filter(None, (library, os.environ.get("LD_PRELOAD"))))
    os.environ["LD_PRELOAD"] = preload
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
