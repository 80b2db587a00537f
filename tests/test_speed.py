"""The speed levers: the allocator setting in every training process, and torch.compile where it
helps (refused, before training, where it does not). Their gains are measured by `bench`
(docs/speed.md), not asserted here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from seqlab import cores

ROOT = Path(__file__).resolve().parents[1]

# Bytes glibc holds in mmapped chunks (mallinfo2's hblkhd) grown by allocating a 64 MB tensor:
# 0 once keep_freed_memory is in effect, the tensor's size under glibc's default.
MMAPPED = """
import ctypes, torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblkhd
x = torch.empty(16 << 20)  # 64 MB
print(json.dumps({"mmapped": libc.mallinfo2().hblkhd - before, "set": cores.ALLOCATOR}))
"""

glibc_only = pytest.mark.skipif(cores._glibc() is None, reason="mallopt is glibc's")


def _in_subprocess(setup):
    code = f"import json\nfrom seqlab import cores\n{setup}\n{MMAPPED}"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_keep_freed_memory_serves_big_tensors_from_the_heap():
    """Without the setting glibc maps a 64 MB tensor by mmap (and unmaps it on free); with it the
    tensor comes from the heap, and the function says what it set."""
    assert _in_subprocess("")["mmapped"] >= 64 << 20
    on = _in_subprocess("print(json.dumps(cores.keep_freed_memory()))")
    assert on == {"mmapped": 0, "set": {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30}}


@glibc_only
def test_the_allocator_setting_is_in_effect_in_the_kernel_process_of_a_report(outputs):
    """What the notebook's setup cell runs (report.prepare_report on the quick digits report)
    leaves the kernel's process with the setting, before its first run trains."""
    from conftest import QUICK

    setup = (
        "from seqlab import report, schema\n"
        f"report.prepare_report({{**schema.defaults(), **{QUICK!r}}})"
    )
    assert _in_subprocess(setup) == {
        "mmapped": 0,
        "set": {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30},
    }


def test_every_training_process_sets_the_allocator(monkeypatch, quick_report, outputs):
    """runner.fit_run (every process that trains: the kernel, `train`, DDP ranks, tune workers)
    and bench call keep_freed_memory, whatever set up the process before."""
    from seqlab import bench, runner

    calls = []
    monkeypatch.setattr(cores, "keep_freed_memory", lambda: calls.append(1) or {})
    runs, loaded = quick_report()
    assert calls == [1]  # prepare_report
    monkeypatch.setattr(runner.lightning, "make_trainer", _stop)
    with pytest.raises(_Stop):
        runner.fit_run(runs[0], loaded[runs[0].data.key], None, None)
    assert calls == [1, 1]
    monkeypatch.setattr(bench, "matmul_gflops", _stop)
    with pytest.raises(_Stop):
        bench.bench(tiny=True, threads=1)
    assert calls == [1, 1, 1]


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop
