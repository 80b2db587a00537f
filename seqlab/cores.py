"""CPU threads: how many a run uses, and a note when other processes keep the cores busy; the
process-wide settings of training processes (training_process: the C allocator's setting and
denormal floats flushed to zero)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

import torch


def usable_cores():
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def set_threads(threads=0):
    """Use `threads` CPU threads (0: every core this process may run on); returns the number."""
    n = threads or usable_cores()
    torch.set_num_threads(n)
    return n


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
ALLOCATOR = {}  # what keep_freed_memory set in this process: {} until it is called, or elsewhere


def _glibc():
    """glibc's C library, or None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):  # no gnu_get_libc_version: not glibc
        return None
    return libc


def keep_freed_memory(trim_threshold=1 << 30):
    """Keep freed memory in the process instead of handing it back to the OS: glibc serves each
    big tensor by mmap and unmaps it on free, so every training step page-faults its activations
    in afresh (250-330k faults per s4d step here; 1.2-1.7x slower steps, docs/speed.md). No mmap
    (M_MMAP_MAX 0) and no trimming below 1 GiB; results are bit-identical, peak memory ~4% higher.
    glibc only, a no-op elsewhere; returns (and records in ALLOCATOR) what it set."""
    libc = _glibc()
    if libc is None:
        return {}
    settings = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": trim_threshold}
    for name, value in settings.items():
        if libc.mallopt(globals()[name], value) != 1:  # mallopt returns 1 on success
            raise OSError(f"mallopt({name}, {value}) failed")
    ALLOCATOR.update(settings)
    return dict(settings)


DENORMALS = {}  # what flush_denormals set in this process: {} until it is called


def flush_denormals():
    """Treat denormal floats (below 1.2e-38) as zero on the CPU: x86's FTZ and DAZ flags, through
    torch.set_flush_denormal. A trained LSTM's saturated gates send its backward pass through
    denormal products, which x86 cores compute many times slower than normal ones: the
    test-task BiLSTM's epochs grew from 6 to about 16 s as it trained on the Intel Xeon VM, and a
    trained checkpoint's training step ran about 2x faster with the flags (docs/speed.md). A
    result changes only where a value would have been denormal. Returns (and records in
    DENORMALS) whether the CPU has the flags (False: a no-op)."""
    DENORMALS["flush"] = bool(torch.set_flush_denormal(True))
    return DENORMALS["flush"]


def training_process():
    """The process-wide settings every training process starts with: keep_freed_memory and
    flush_denormals."""
    keep_freed_memory()
    flush_denormals()


def other_load(seconds=0.25):
    """Cores kept busy by other processes over the next `seconds`: the machine's busy time (Linux
    /proc/stat, idle and iowait excluded) less this process's own; 0.0 where /proc is missing."""

    def busy():
        cpu = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        own = open("/proc/self/stat").read().rsplit(")", 1)[1].split()[11:13]  # utime, stime
        return sum(cpu) - cpu[3] - cpu[4] - sum(int(v) for v in own)

    try:
        before = busy()
        time.sleep(seconds)
        return max(0.0, (busy() - before) / (os.sysconf("SC_CLK_TCK") * seconds))
    except (OSError, ValueError, IndexError):
        return 0.0


def note_shared_cores(threads, cores=None, others=None):
    """A note when other processes keep busy the cores this run's threads need: two 2-thread
    trainings on 2 cores each ran 3.8x slower than one alone here, two 1-thread ones 1.3x
    (docs/speed.md). The thread count is left as set: it changes floating-point sums, so it must
    not follow the load."""
    cores = cores or usable_cores()
    others = other_load() if others is None else others
    if threads > 1 and others >= 0.5 and threads + others > cores + 0.25:
        print(
            f"note: other processes keep {others:.1f} of this machine's {cores} cores busy, and "
            f"this run uses {threads} threads: sharing cores this way trained 3.8x slower here "
            f"(docs/speed.md). Give each job its share (threads: "
            f"{max(1, cores - round(others))}), or start both with OMP_WAIT_POLICY=PASSIVE.",
            flush=True,
        )
