"""The memory allocator of a training process: jemalloc when the machine has it, glibc's malloc otherwise.

glibc's malloc keeps freed blocks of every tensor size it has seen in its heap, and training on CPUs allocates
activations of a new size at nearly every batch, so the heap grows far beyond what is live. jemalloc's size classes
and decay return that memory. An allocator cannot be swapped in a running process, so `use_jemalloc` re-executes
the command once with jemalloc preloaded (the same process id, so torchrun and job schedulers see no difference);
SEQ2SEQ_ALLOCATOR=system keeps glibc. Standard library only: it runs before torch is loaded.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

ENV_CHOICE = "SEQ2SEQ_ALLOCATOR"  # jemalloc (default: when installed) | system
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
    """'jemalloc' when this process has it loaded, else 'glibc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def use_jemalloc() -> None:
    """Re-execute this command with jemalloc preloaded, unless it is loaded already, absent, or not wanted."""
    choice = os.environ.get(ENV_CHOICE, "jemalloc")
    if choice not in ("jemalloc", "system"):
        print(f"error: {ENV_CHOICE}={choice!r} must be jemalloc or system", file=sys.stderr)
        sys.exit(2)
    if choice == "system" or sys.platform != "linux" or active_allocator() == "jemalloc":
        return
    library = find_jemalloc()
    if library is None or library in os.environ.get("LD_PRELOAD", ""):  # absent, or preloaded and still not loaded
        return
    preload = " ".join(filter(None, (library, os.environ.get("LD_PRELOAD"))))
    os.environ["LD_PRELOAD"] = preload
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
