"""Timing for `bench`: torch.utils.benchmark's medians of a function, rates with their spread,
and one training step as a function to time."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def measure(fn, min_run_time):
    """torch.utils.benchmark's Measurement of fn() (median, iqr, times) on all of torch's threads
    (Timer's default is one thread), measured for min_run_time to 5x that seconds."""
    import torch.utils.benchmark  # here: it logs a CUDA note at import on CPU-only machines

    timer = torch.utils.benchmark.Timer(
        "fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    )
    return timer.adaptive_autorange(
        threshold=0.1, min_run_time=min_run_time, max_run_time=5 * min_run_time
    )


def _rate(items, m):
    """items per second at the median time, and the spread: the IQR in % of the median."""
    return {
        "per_s": items / m.median,
        "iqr_pct": round(100 * m.iqr / m.median, 1),
        "runs": len(m.times),
    }


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model, make_batch, device="cpu", loss=None):
    """One Adam training step on make_batch()'s (x, y[, idx]), as a function; waits for the device.
    `loss(*batch)` -> (loss, logits) replaces cross-entropy of model(x)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    loss_of = loss or (lambda x, y: (F.cross_entropy(model(x), y), None))

    def step():
        loss, _ = loss_of(*make_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)

    return step


