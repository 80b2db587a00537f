"""Whether a run fits in memory, checked before anything is loaded or trained: a run that cannot
fit (`seq_len 100000000`, `image_size 100000`) is refused with its numbers instead of swapping
the machine to a standstill or dying of the out-of-memory killer an hour in.

The figures are lower bounds (float32): one batch of images, one batch of sequences and their
gradients, the weights with their gradients and two optimizer moments. A run refused here could
not have run; one that passes may still need more (a model's own activations)."""

from __future__ import annotations

import inspect

from seqlstm import SEQUENCES, count_params, create_model, sequence_shape
from seqlab import schema

FLOAT = 4  # bytes


def available_memory() -> tuple[int, str]:
    """(bytes free for a run, where): the GPU's free memory if there is one, else the RAM."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0], "GPU memory free"
    return psutil.virtual_memory().available, "memory available"


def size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000


def _refuse(name, value, need: float, what: str, advice: str):
    free, where = available_memory()
    if need > free:
        raise schema.ParamError(
            f"parameter {name} = {value}: {what} needs at least {size(need)}, above the "
            f"{size(free)} of {where}: {advice}"
        )


def _takes_seq_len(transform: str) -> bool:
    fn = SEQUENCES.get(transform)
    return fn is not None and "seq_len" in inspect.signature(fn).parameters


def check_before_loading(runs):
    """What the parameters alone say: images resized to image_size, sequences of seq_len steps
    (each step at least one value)."""
    for run in runs:
        batch, channels = run.train.batch_size, 1 if run.params.get("grayscale") else 3
        side = run.params.get("image_size") or 0
        if side:
            _refuse(
                "image_size",
                side,
                batch * channels * side * side * FLOAT,
                f"a batch of {batch} images of {channels}x{side}x{side}",
                "lower image_size (0 keeps the dataset's size) or batch_size",
            )
        if _takes_seq_len(run.transform):
            _refuse(
                "seq_len",
                run.seq_len,
                2 * batch * run.seq_len * FLOAT,
                f"a batch of {batch} sequences of {run.seq_len:,} steps and their gradients",
                "lower seq_len or batch_size",
            )


def _weights(run, n_feat, n_classes, built: dict) -> int:
    """Bytes of the run's weights, their gradients and two optimizer moments."""
    key = (repr(run.network), n_feat, n_classes)
    if key not in built:
        net = run.network
        model = create_model(net.model, in_features=n_feat, num_classes=n_classes, **net.model_args)
        built[key] = 4 * count_params(model) * FLOAT
    return built[key]


def check_runs(runs, loaded):
    """Each run against its loaded images: a batch of its sequences (T x F) and their gradients,
    and its weights (with gradients and Adam's two moments)."""
    built = {}
    for run in runs:
        data, batch = loaded[run.data.key], run.train.batch_size
        shape, args = data.image_shape, run.sequence.args
        T, n_feat = sequence_shape(run.transform, shape, run.seq_len, **args)
        weights = _weights(run, n_feat, len(data.classes), built)
        name, value = (
            ("seq_len", run.seq_len) if _takes_seq_len(run.transform) else ("batch_size", batch)
        )
        _refuse(
            name,
            value,
            2 * batch * T * n_feat * FLOAT + weights,
            f"model {run.model!r} on a batch of {batch} sequences of {T:,} steps x {n_feat:,} "
            f"features (with gradients, and {size(weights)} of weights and optimizer state)",
            "lower seq_len, batch_size or the model's size",
        )
