"""Process-level tuning for entry points (the `deepencoder` CLI, benchmarks, training scripts): the memory allocator.

Never called by model code. The tower allocates many large temporaries (a (4096, 3072) MLP activation is 48 MB in
fp32); glibc's malloc serves every block above 32 MB with a fresh `mmap`, which the kernel zero-fills page by page on
each use and unmaps on free, so the same buffer is page-faulted in again for every block of every page. A caching
allocator (tcmalloc, jemalloc) or glibc told never to mmap keeps that memory and reuses it.

Allocators, fastest first as measured by `benchmarks/tower.py --allocators` on the development machine:
- `tcmalloc`: Debian `libtcmalloc-minimal4` (`LD_PRELOAD=libtcmalloc_minimal.so.4`);
- `glibc-tuned`: glibc with mmap disabled and trimming off (`mallopt` at start-up, or the environment
  `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`);
- `jemalloc`: Debian `libjemalloc2` (`LD_PRELOAD=libjemalloc.so.2`);
- `glibc`: the default.

`configure_allocator()` (what entry points call first) re-executes the process once with tcmalloc preloaded when it is
installed and nothing else is preloaded, and otherwise tunes glibc in place through `mallopt`. The environment variable
`DEEPENCODER_ALLOCATOR` (`tcmalloc` | `jemalloc` | `glibc-tuned` | `glibc` | `system`) overrides the choice; `system`
and `glibc` leave the process as it is. A library user gets the same with one line before starting Python:
`LD_PRELOAD=libtcmalloc_minimal.so.4 python ...` (or the `GLIBC_TUNABLES` line above).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

ENV_CHOICE = "DEEPENCODER_ALLOCATOR"
_ENV_DONE = "DEEPENCODER_ALLOCATOR_ACTIVE"  # set before the re-exec, so it happens at most once
PRELOADED: dict[str, tuple[str, ...]] = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
ALLOCATORS = ("glibc", "glibc-tuned", "tcmalloc", "jemalloc")
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def find_library(name: str) -> str | None:
    """Path of an installed preloadable allocator (`tcmalloc` | `jemalloc`), or None."""
    for filename in PRELOADED[name]:
        for directory in _LIBRARY_DIRS:
            candidate = Path(directory) / filename
            if candidate.exists():
                return str(candidate)
    return None


def available() -> list[str]:
    """The allocators this machine can run: glibc's two settings on Linux with glibc, plus installed preloads."""
    names = ["glibc", "glibc-tuned"] if _libc() is not None else []
    return names + [name for name in PRELOADED if find_library(name)]


def environment(name: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that runs under allocator `name` (for benchmarks spawning workers)."""
    env = dict(os.environ if base is None else base)
    env.pop("LD_PRELOAD", None)
    env.pop("GLIBC_TUNABLES", None)
    env[ENV_CHOICE] = "system"  # the child keeps exactly what it was given
    if name == "glibc-tuned":
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    elif name in PRELOADED:
        library = find_library(name)
        if library is None:
            raise RuntimeError(f"{name} is not installed (Debian: {_PACKAGES[name]})")
        env["LD_PRELOAD"] = library
    elif name != "glibc":
        raise ValueError(f"unknown allocator {name!r}; choose from {ALLOCATORS}")
    return env


_PACKAGES = {"tcmalloc": "apt-get install libtcmalloc-minimal4", "jemalloc": "apt-get install libjemalloc2"}


def active() -> str:
    """The allocator this process runs under: a preloaded library found in its memory map, else glibc's setting."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for name in PRELOADED:
        if f"lib{name}" in maps:
            return name
    if "mmap_max=0" in os.environ.get("GLIBC_TUNABLES", "") or os.environ.get(_ENV_DONE) == "glibc-tuned":
        return "glibc-tuned"
    return "glibc"


def tune_glibc() -> bool:
    """glibc in place: never serve a block by mmap, never trim the heap (what `GLIBC_TUNABLES` above does).
    Returns False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if ok:
        os.environ[_ENV_DONE] = "glibc-tuned"
    return ok


def cuda_requested(device: str | None) -> bool:
    """Whether a command's `--device` puts it on a GPU: `cuda...`, or `auto` on a machine with an NVIDIA driver and
    visible devices (read from the system, without importing torch: entry points decide before their imports)."""
    device = str(device or "cpu")
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return os.path.exists("/proc/driver/nvidia/version") and visible not in ("", "-1")


def configure_allocator(argv: Sequence[str] | None = None, prefer: Sequence[str] = ("tcmalloc", "glibc-tuned")) -> str:
    """Give this process the fastest allocator available; returns the one it runs under.

    A preloaded allocator has to be there before the process starts, so choosing one re-executes the same command
    (`sys.executable` with `argv`, default `sys.orig_argv`) once with `LD_PRELOAD` set; glibc is tuned in place.
    Nothing happens when an allocator is already preloaded, `DEEPENCODER_ALLOCATOR=system`, or not on Linux."""
    choice = os.environ.get(ENV_CHOICE, "").strip().lower()
    if choice in ("system", "glibc") or os.environ.get("LD_PRELOAD") or not sys.platform.startswith("linux"):
        return active()
    if choice and choice not in ALLOCATORS:
        raise ValueError(f"{ENV_CHOICE}={choice!r}; choose from {(*ALLOCATORS, 'system')}")
    for name in [choice] if choice else prefer:
        if name in PRELOADED and find_library(name) and os.environ.get(_ENV_DONE) != name:
            env = {**os.environ, "LD_PRELOAD": find_library(name), _ENV_DONE: name}
            command = list(argv) if argv is not None else list(sys.orig_argv)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, *command[1:]], env)
        if name == "glibc-tuned" and tune_glibc():
            return "glibc-tuned"
    return active()


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None
