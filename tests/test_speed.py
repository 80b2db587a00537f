"""The speed levers: the allocator setting and denormals flushed to zero in every training process,
and torch.compile where it helps (refused, before training, where it does not). Their gains are
measured by `bench` (docs/speed.md), not asserted here."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

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


def _in_subprocess(setup, probe=MMAPPED):
    """The JSON that `probe` prints in a fresh process after `setup`."""
    code = f"import json\nfrom seqlab import cores\n{setup}\n{probe}"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
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


# Denormal inputs multiplied on 2 threads, the pool started before the flags are set (POOL, then
# the setup): how many products stay non-zero (none once denormals are flushed), and what cores
# recorded.
POOL = "import torch\ntorch.set_num_threads(2)\n(torch.ones(1 << 22) * 2).sum()\n"
DENORMAL = """
y = torch.full((1 << 22,), 1e-39) * 1.5
print(json.dumps({"nonzero": int((y != 0).sum()), "set": cores.DENORMALS}))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"),
                    reason="torch.set_flush_denormal has flags on x86 and ARM only")
def test_a_training_process_flushes_denormals_on_every_thread(outputs):
    """prepare_report (the notebook's setup cell, `train`, tune workers) leaves the process
    treating denormal floats as zero on all its threads; a plain process computes them."""
    from conftest import QUICK

    assert _in_subprocess(POOL, DENORMAL) == {"nonzero": 1 << 22, "set": {}}
    setup = ("from seqlab import report, schema\n"
             f"report.prepare_report({{**schema.defaults(), **{QUICK!r}}})")
    assert _in_subprocess(POOL + setup, DENORMAL) == {"nonzero": 0, "set": {"flush": True}}


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop


@pytest.mark.parametrize(
    "model, why", [("lipschitz_rnn", "RecursionError"), ("lstm", "fused kernel")]
)
def test_compile_is_refused_before_training_for_models_it_does_not_help(model, why):
    from seqlab import plan, schema

    params = {**schema.defaults(), "model": ["trellisnet", model], "transform": "pixels"}
    params["compile"] = True
    with pytest.raises(schema.ParamError) as e:
        plan.plan_report(params)
    message = str(e.value)
    assert "parameter compile = True" in message and repr(model) in message and why in message
    assert "\n" not in message
    # per_model can keep it for the models it helps
    params["per_model"] = {model: {"compile": False}}
    runs = plan.plan_report(params)
    assert [(r.model, r.compute.compile) for r in runs] == [("trellisnet", True), (model, False)]


def test_the_runner_compiles_the_model_when_asked(quick_report, outputs):
    from seqlab import runner

    for flag in (False, True):
        runs, loaded = quick_report(
            model="trellisnet", transform="pixels", compile=flag, model_args={"layers": 3}
        )
        _, module = runner.build_run(runs[0], loaded[runs[0].data.key])
        assert (module.model._compiled_call_impl is not None) == flag


@pytest.mark.slow
def test_compiled_trellisnet_equals_eager_on_one_batch():
    """torch.compile (inductor's C++ kernels) against eager: logits and gradients on one batch of
    the test input (about 100 s to compile on one busy core)."""
    import copy

    import torch

    import seqlstm
    from seqlab import lightning

    x, n_in, args = seqlstm.model_input("trellisnet", 8, tiny=True)
    torch.manual_seed(0)
    eager = seqlstm.create_model("trellisnet", in_features=n_in, num_classes=10, **args)
    fast = lightning.compiled(copy.deepcopy(eager), True)
    assert fast._compiled_call_impl is not None
    y = torch.randint(0, 10, (8,))
    results = []
    for model in (eager, fast):
        logits = model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), list(model.parameters()))
        results.append((logits, grads))
    (logits, grads), (ref, ref_grads) = results[1], results[0]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_speed_goal_script_times_two_checkouts_in_fresh_processes(capsys):
    """scripts/speed_goal.py against this checkout itself: a before and a now figure per round in
    their own processes, and the median ratio; a bad checkout is refused before anything runs."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("speed_goal", root / "scripts" / "speed_goal.py")
    goal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(goal)
    goal.main([str(root), "rnn", "--rounds", "1", "--batch", "2", "--steps", "1"])
    out = capsys.readouterr().out
    assert "round 0: rnn before" in out and "round 0: rnn now" in out
    assert out.strip().splitlines()[-1].startswith("rnn: ") and "x (rounds " in out
    with pytest.raises(SystemExit):
        goal.main(["/nonexistent", "rnn"])
    assert "before = '/nonexistent'" in capsys.readouterr().err
