"""The speed levers of `bench` (docs/speed.md), each against its absence: glibc's allocator
setting (process-wide, so measured in fresh processes taking turns), denormals flushed to zero
(a saturated BiLSTM's step, the CPU's flags toggled in turns) and torch.compile (per model, in one
process, eager and compiled copies timed in turns)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from seqlstm import create_model, model_input
from seqlab import cores, lightning
from seqlab.timing import _train_step, measure

# The levers of docs/speed.md, each against its absence: the allocator setting (a process-wide
# one, so in fresh processes, taking turns) and torch.compile (per model, in this process).
LEVER_MODELS = ("s4d", "trellisnet", "lstm", "bilstm_fc")
TINY_LEVER_MODELS = ("s4d",)  # --tiny: one model, so that the dry run stays short


def _model_step(name, device, B, tiny, K=10):
    x, n_in, args = model_input(name, B, tiny=tiny)
    x, y = x.to(device), torch.randint(0, K, (B,), device=device)
    torch.manual_seed(0)
    return create_model(name, in_features=n_in, num_classes=K, **args).to(device), (x, y)


def _alternate(steps, rounds, min_run_time):
    """Seconds per call of each of `steps` (name -> fn), measured in turn `rounds` times: a
    neighbour's load then falls on all of them alike. Lists, one median per round."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(measure(fn, min_run_time).median)
    return times


def _speedup(before, after):
    """The median over rounds of before / after (each round's pair measured side by side)."""
    return statistics.median(b / a for b, a in zip(before, after))


def _lever_models(tiny):
    return TINY_LEVER_MODELS if tiny else LEVER_MODELS


def allocator_worker(on, device, B, tiny, min_run_time, threads):
    """In a fresh process: seconds per training step of each lever model, with (`on`) or
    without the allocator setting; prints them as JSON."""
    if on:
        cores.keep_freed_memory()
    torch.set_num_threads(threads)
    steps = {}
    for name in _lever_models(tiny):
        model, batch = _model_step(name, device, B, tiny)
        steps[name] = _train_step(model, lambda batch=batch: batch, device)
    print(json.dumps({k: v[0] for k, v in _alternate(steps, 1, min_run_time).items()}))


def bench_allocator(device, min_run_time, B, tiny, threads, rounds):
    """Training steps with glibc's default allocator and with keep_freed_memory, in fresh
    processes taking turns (off, on, off, on, ...): per model the seconds of each and the speed-up,
    the median of the rounds' ratios."""
    import subprocess
    import sys

    runs = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            code = (
                "from seqlab import levers; "
                f"levers.allocator_worker({on}, {device!r}, {B}, {tiny}, {min_run_time}, {threads})"
            )
            out = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parents[1],
            )
            runs[on].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        name: {
            "off_s": statistics.median(r[name] for r in runs[False]),
            "on_s": statistics.median(r[name] for r in runs[True]),
            "speedup": _speedup([r[name] for r in runs[False]], [r[name] for r in runs[True]]),
            "rounds_s": [[r[name] for r in runs[on]] for on in (False, True)],  # off, on
        }
        for name in _lever_models(tiny)
    }


def bench_denormals(device, min_run_time, B, tiny, rounds, scale=100.0):
    """The test-task BiLSTM's training step with gates saturated as a trained model's are (its
    input projection `scale` times its initial size), with denormal floats computed and flushed
    to zero (cores.flush_denormals), in turns: the seconds of each and the speed-up (median of
    the rounds' ratios). CPU only ({} on a GPU, whose kernels do not take the CPU's flags)."""
    if device != "cpu":
        return {}
    model, batch = _model_step("bilstm_fc", device, B, tiny)
    with torch.no_grad():
        model.in_proj.weight.mul_(scale)
    step = _train_step(model, lambda: batch, device)

    def flagged(on):
        def run():
            torch.set_flush_denormal(on)
            step()
        return run

    try:
        times = _alternate({"off": flagged(False), "on": flagged(True)}, rounds, min_run_time)
    finally:
        cores.flush_denormals()  # back to every training process's setting
    off, on = times["off"], times["on"]
    return {
        "bilstm_fc": {
            "off_s": statistics.median(off),
            "on_s": statistics.median(on),
            "speedup": _speedup(off, on),
            "rounds_s": [off, on],
        }
    }


def bench_compile(device, min_run_time, B, tiny, rounds):
    """Per model of lightning.COMPILED and LEVER_MODELS (tiny: TINY_LEVER_MODELS, compiled by
    torch.compile's "eager" backend: a dry run without code generation): a training step eager
    and compiled, timed in turns; the first compiled step's seconds (the cold compile) and the
    speed-up (median of the rounds' ratios)."""
    import copy
    import time

    out = {}
    names = _lever_models(tiny) if tiny else dict.fromkeys([*lightning.COMPILED, *LEVER_MODELS])
    for name in names:
        model, batch = _model_step(name, device, B, tiny)
        fast = copy.deepcopy(model)
        fast.compile(backend="eager" if tiny else "inductor")
        steps = {
            "eager": _train_step(model, lambda batch=batch: batch, device),
            "compiled": _train_step(fast, lambda batch=batch: batch, device),
        }
        start = time.perf_counter()
        try:
            steps["compiled"]()
        except Exception as e:  # noqa: BLE001 (a model that does not compile is a finding)
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        cold = time.perf_counter() - start
        times = _alternate(steps, rounds, min_run_time)
        out[name] = {
            "eager_s": statistics.median(times["eager"]),
            "compiled_s": statistics.median(times["compiled"]),
            "speedup": _speedup(times["eager"], times["compiled"]),
            "rounds_s": [times["eager"], times["compiled"]],
            "first_step_s": cold,
        }
    return out


def format_levers(levers, batch):
    lines = [
        f"levers, each against its absence: training seconds per step, batch {batch}; "
        "speed-up: median of the rounds' ratios (measured in turns)",
        f"{'model':<18} {'malloc default':>14} {'keep_freed':>10} {'speed-up':>8}",
    ]
    for name, v in levers["allocator"].items():
        lines.append(f"{name:<18} {v['off_s']:>14.4f} {v['on_s']:>10.4f} {v['speedup']:>7.2f}x")
    for name, v in levers.get("denormals", {}).items():
        lines.append(f"{name + ', saturated':<18} {v['off_s']:>14.4f} {v['on_s']:>10.4f} "
                     f"{v['speedup']:>7.2f}x   (denormals computed / flushed to zero)")
    lines.append(f"{'model':<18} {'eager':>14} {'compiled':>10} {'speed-up':>8} {'1st step':>9}")
    for name, v in levers["compile"].items():
        if "error" in v:
            lines.append(f"{name:<18} compile failed: {v['error']}")
            continue
        lines.append(
            f"{name:<18} {v['eager_s']:>14.4f} {v['compiled_s']:>10.4f} "
            f"{v['speedup']:>7.2f}x {v['first_step_s']:>8.1f}s"
        )
    return lines


def bench_levers(device, min_run_time, B, tiny, threads, rounds=None):
    """The allocator setting, flushed denormals and torch.compile against their absence
    (rounds: 1 tiny, else 3)."""
    rounds = rounds or (1 if tiny else 3)
    return {
        "rounds": rounds,
        "allocator": bench_allocator(device, min_run_time, B, tiny, threads, rounds),
        "denormals": bench_denormals(device, min_run_time, B, tiny, rounds),
        "compile": bench_compile(device, min_run_time, B, tiny, rounds),
    }


