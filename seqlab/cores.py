"""CPU threads: how many a run uses, and a note when other processes keep the cores busy."""

from __future__ import annotations

import os
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
