"""`python seqlstm.py bench`: speed as ratios and fractions of the matmul peak, measured in one
run. Every figure is the median of repeated timings by torch.utils.benchmark (adaptive_autorange:
a warm-up, then at least 4 timed blocks, until the interquartile range is within 10% of the median
or the time is up), printed with its spread. `--quick` only measures for less time; `--tiny` runs
every figure at toy sizes for a moment, a dry run of the command whose numbers mean nothing."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from seqlstm import (
    MODEL_INFO,
    Batches,
    BiLSTMFC,
    ReferenceBiLSTMFC,
    Teacher,
    TensorImages,
    augment_batch,
    build_teacher,
    count_params,
    create_model,
    identity,
    list_models,
    logits_table,
    make_sequence,
    model_input,
    normalize,
    per_sample_pipeline,
    sequence_transform,
)
from seqlab import cores, lightning
from seqlab.levers import TINY_LEVER_MODELS, bench_levers, format_levers  # noqa: F401 (tests)
from seqlab.teacher import TEACHER_RECIPE
from seqlab.timing import _rate, _sync, _train_step, measure


def matmul_gflops(n=2048, min_run_time=1.0, device="cpu"):
    """float32 matrix-multiply peak: GFLOP/s of an n x n product at the median time."""
    a = torch.randn(n, n, device=device)

    def product():
        a @ a
        _sync(device)

    return 2 * n**3 / measure(product, min_run_time).median / 1e9


def _fft_flops(x_shape, dim, *args, out_shape=None, **kwargs):
    """5 n log2 n FLOPs per complex transform of n points (Cooley-Tukey), half for a real one."""
    n = math.prod(max(x_shape[d], out_shape[d]) for d in dim)
    transforms = math.prod(x_shape) // math.prod(x_shape[d] for d in dim)
    return transforms * 5 * n * math.log2(max(n, 2))


def _lstm_layer_flops(x_shape, w_ih_shape, w_hh_shape, *args, **kwargs):
    """One LSTM layer on oneDNN (nn.LSTM on CPU): the gates' products, 2 T B (|W_ih| + |W_hh|)
    FLOPs."""
    return 2 * x_shape[0] * x_shape[1] * (math.prod(w_ih_shape) + math.prod(w_hh_shape))


def _cumsum_flops(x_shape, *args, **kwargs):
    """One add per element: Vim's chunked scan (seqlstm._scan_chunked) is two cumulative sums over
    its (B, L, D, N) states, the log decays' and the inputs', so 2 FLOPs per state element and
    step, the multiply-add of h_t = a_t h_{t-1} + u_t that its sequential scan does by addcmul."""
    return math.prod(x_shape)


def _addcmul_flops(x_shape, *args, out_shape=None, **kwargs):
    """A multiply-add per output element (Vim's sequential scan step a_t h + u_t)."""
    return 2 * math.prod(out_shape)


# What FlopCounterMode does not count by itself: FFTs (S4D, FNet), nn.LSTM's CPU kernel (its
# backward: the input and the weight gradients, two products per forward one), cumulative sums and
# multiply-adds (the scans of Vim and of ViL's forget gates).
EXTRA_FLOPS = {
    torch.ops.aten.cumsum: _cumsum_flops,
    torch.ops.aten.addcmul: _addcmul_flops,
    torch.ops.aten._fft_c2c: _fft_flops,
    torch.ops.aten._fft_r2c: lambda *a, **k: _fft_flops(*a, **k) / 2,
    torch.ops.aten._fft_c2r: lambda *a, **k: _fft_flops(*a, **k) / 2,
    torch.ops.aten.mkldnn_rnn_layer: _lstm_layer_flops,
    torch.ops.aten.mkldnn_rnn_layer_backward: lambda *a, **k: 2 * _lstm_layer_flops(*a, **k),
}


def train_flops(model, x, y):
    """Training FLOPs per image: forward + backward of one batch as FlopCounterMode counts them
    (matrix products, convolutions, attention; FFTs, nn.LSTM and the scans by EXTRA_FLOPS; no other
    element-wise work) / batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(y)


def bilstm_train_flops(in_features, seq_len, hidden=32, fc=100, classes=10, dirs=2):
    """Multiply-add FLOPs of one training image on the hoisted path (forward + backward = 3x
    forward)."""
    gates = dirs * 4 * hidden
    forward = 2 * (
        in_features * gates + seq_len * gates * hidden + dirs * hidden * fc + fc * classes
    )
    return 3 * forward


def lightning_epoch(device, n_train=45_000, n_val=5_000, seq_len=20):
    """A function that runs one real training epoch of the test task (Lightning, fast path, flips,
    validation included) on CIFAR-10-shaped uint8 data."""
    x = torch.randint(0, 256, (n_train + n_val, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (n_train + n_val,))
    logging.getLogger("pytorch_lightning").setLevel(
        logging.WARNING
    )  # no start-up notes inside the table

    def epoch():
        module = lightning.SeqClassifier(
            BiLSTMFC(in_features=3 * 32 * 32, num_classes=10),
            to_seq=make_sequence("identity", seq_len=seq_len),
            mean=torch.full((3,), 0.47),
            std=torch.full((3,), 0.25),
            augment="flip",
        )
        trainer = pl.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            accelerator=device,
            devices=1,
        )
        trainer.fit(
            module,
            Batches(x[:n_train], y[:n_train], 256, shuffle=True),
            Batches(x[n_train:], y[n_train:], 1024),
        )

    return epoch


def _cifar_batches(device, B=256, n=2048):
    """uint8 CIFAR-10-shaped images and labels, and make(seq_len, materialise) -> a batch maker of
    normalised identity sequences (materialise: the repeated sequence copied, for nn.LSTM)."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    mean, std = torch.full((3,), 0.47, device=device), torch.full((3,), 0.25, device=device)

    def make(seq_len, materialise=False):
        def batch():
            idx = torch.randint(0, n, (B,))
            x = identity(normalize(images[idx].to(device), mean, std), seq_len=seq_len)
            return (x.contiguous() if materialise else x), labels[idx].to(device)

        return batch

    return images, labels, make


def bench_identity(device, min_run_time, B=256):
    """The test task's training images/s: naive nn.LSTM, the fast (loop) and the hoisted+fused
    path."""
    _, _, batches = _cifar_batches(device, B)
    out = {}
    for L in (5, 10, 20):
        model = BiLSTMFC(in_features=3 * 32 * 32, num_classes=10).to(device)
        naive = _rate(
            B,
            measure(
                _train_step(ReferenceBiLSTMFC(model).to(device), batches(L, True), device),
                min_run_time,
            ),
        )
        fast = _rate(
            B, measure(_train_step(model, batches(L), device), min_run_time)
        )  # the default path
        fused_model = BiLSTMFC(in_features=3 * 32 * 32, num_classes=10, recurrence="fused").to(
            device
        )
        fused = _rate(B, measure(_train_step(fused_model, batches(L), device), min_run_time))
        out[str(L)] = {
            "naive": naive,
            "fast": fast,
            "fused": fused,
            "ratio": fast["per_s"] / naive["per_s"],
            "fast_gflops": fast["per_s"] * bilstm_train_flops(3 * 32 * 32, L) / 1e9,
        }
    return out


def bench_data(min_run_time, B=256, n=2048):
    """Images/s of the torchvision per-sample pipeline and of the batched fast path (flip, crop,
    L=20) over n images."""
    images, labels, _ = _cifar_batches("cpu", B, n)
    mean, std = torch.full((3,), 0.47), torch.full((3,), 0.25)
    per_sample = TensorImages(
        images,
        labels,
        per_sample_pipeline(
            mean, std, sequence_transform("identity", seq_len=20), augment="flip_crop"
        ),
    )
    loader = torch.utils.data.DataLoader(per_sample, batch_size=B, shuffle=True)
    gen = torch.Generator().manual_seed(0)

    def torchvision_pass():
        for _ in loader:
            pass

    def fast_pass():
        for x, _ in Batches(images, labels, B, shuffle=True):
            identity(normalize(augment_batch(x, "flip_crop", gen), mean, std), seq_len=20)

    tv = _rate(len(images), measure(torchvision_pass, min_run_time))
    fast = _rate(len(images), measure(fast_pass, min_run_time))
    return {"torchvision": tv, "fast": fast, "ratio": fast["per_s"] / tv["per_s"]}


def bench_models(device, min_run_time, peak_gflops, B=64, K=10, tiny=False):
    """Every registered model at its default input (tiny: its test input), batch B: training
    images/s, training FLOPs per image and the GFLOP/s they make, in % of the matmul peak of the
    same run."""
    out = {}
    for name in list_models():
        x, n_in, args = model_input(name, B, tiny=tiny)
        x, y = x.to(device), torch.randint(0, K, (B,), device=device)
        model = create_model(name, in_features=n_in, num_classes=K, **args).to(device)
        flops = train_flops(model, x, y)
        rate = _rate(B, measure(_train_step(model, lambda: (x, y), device), min_run_time))
        gflops = rate["per_s"] * flops / 1e9
        info = MODEL_INFO[name]["test_input" if tiny else "input"]
        out[name] = {
            "params": count_params(model),
            "train": rate,
            "train_gflop_per_img": flops / 1e9,
            "input": f"{info['transform']} of {'x'.join(map(str, info['image']))}",
            "gflops": gflops,
            "pct_peak": 100 * gflops / peak_gflops,
        }
    return out


def _endless(batches):
    while True:
        yield from batches


def _student_rate(device, images, labels, mean, std, seq_len, taught, min_run_time):
    """Training images/s of the test-task student (batch 256, or all images if fewer; flips),
    taught by `taught`."""
    module = lightning.SeqClassifier(
        BiLSTMFC(in_features=3 * 32 * 32, num_classes=10),
        to_seq=make_sequence("identity", seq_len=seq_len),
        mean=mean,
        std=std,
        augment="flip",
        teacher=taught,
        distill_alpha=0.9,
        distill_T=4.0,
    ).to(device)
    B = min(256, len(labels))
    batches = _endless(Batches(images, labels, B, shuffle=True, with_index=True))
    step = _train_step(module, lambda: next(batches), device, loss=module.train_loss)
    return _rate(B, measure(step, min_run_time))


def _teacher_rate(device, model, to_input, images, labels, mean, std, min_run_time):
    """The teacher's own training images/s by TEACHER_RECIPE (its batch, or all images)."""
    r = TEACHER_RECIPE
    net = lightning.SeqClassifier(
        model.train().requires_grad_(True),
        to_seq=to_input,
        mean=mean,
        std=std,
        augment=r["augment"],
        label_smoothing=r["label_smoothing"],
    ).to(device)
    B = min(r["batch_size"], len(labels))
    batches = _endless(Batches(images, labels, B, shuffle=True, with_index=True))
    step = _train_step(net, lambda: next(batches), device, loss=net.train_loss)
    return _rate(B, measure(step, min_run_time))


def bench_distill(device, min_run_time, seq_len=10, teacher_name="fast_cnn", n=2048):
    """Training images/s of the test-task student (BiLSTM + FC, identity L = seq_len, flips, batch
    256, or n if fewer) without a teacher, with a cached logits table and with the teacher run
    live; and the teacher's own training images/s (TEACHER_RECIPE). The teacher is untrained: speed
    does not depend on its weights."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (n,)).to(device)
    mean, std = torch.full((3,), 0.47, device=device), torch.full((3,), 0.25, device=device)
    model, to_input = build_teacher(teacher_name, {}, (3, 32, 32), 10)
    live = Teacher(model.to(device), to_input, mean, std, tta=TEACHER_RECIPE["tta"])
    cached = Teacher(model, to_input, mean, std, table=logits_table(live, images))
    result = {
        name: _student_rate(device, images, labels, mean, std, seq_len, t, min_run_time)
        for name, t in (("none", None), ("cached", cached), ("live", live))
    }
    result["teacher_train"] = _teacher_rate(
        device, model, to_input, images, labels, mean, std, min_run_time
    )
    ratio = result["cached"]["per_s"] / result["none"]["per_s"]
    return {**result, "cached_ratio": round(ratio, 2), "seq_len": seq_len, "teacher": teacher_name,
            "batch": min(256, n), "teacher_batch": min(TEACHER_RECIPE["batch_size"], n)}


def format_distill(t):
    r = TEACHER_RECIPE
    return [
        f"distillation: the test-task student (identity L={t['seq_len']}, flips, "
        f"batch {t.get('batch', 256)}), "
        "training images/s",
        f"{'no teacher':>24} {_cell(t['none'])}",
        f"{'cached teacher logits':>24} {_cell(t['cached'])}   "
        f"({t['cached_ratio']:.2f}x of no teacher)",
        f"{'live teacher ' + t['teacher']:>24} {_cell(t['live'])}   (test-time views: {r['tta']})",
        f"{'teacher training':>24} {_cell(t['teacher_train'])}   (TEACHER_RECIPE: batch "
        f"{t.get('teacher_batch', r['batch_size'])}, {r['augment']})",
        "",
    ]


# Of the figures: the matmul's side, the batch, the images of the data and distillation figures,
# the training and validation images of the epoch, the batch of every model's figure.
SIZES = {
    "full": dict(matmul=2048, batch=256, images=2048, train=45_000, val=5_000, model_batch=64),
    "tiny": dict(matmul=256, batch=16, images=64, train=256, val=64, model_batch=4),  # a dry run
}


def bench(quick=False, json_path=None, device=None, threads=0, tiny=False):
    """Training throughput of the fast path against the naive one, of the data paths and of every
    model, each as the median of repeated timings with its spread, against the matmul peak.
    `tiny`: SIZES["tiny"], the models' test inputs and 0.01 s per figure, a dry run of every figure
    (the numbers mean nothing)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cores.training_process()  # as every training process runs (levers: the bench without each)
    threads = cores.set_threads(threads)
    torch.manual_seed(0)
    size = SIZES["tiny" if tiny else "full"]
    t = 0.01 if tiny else 1.0 if quick else 3.0  # seconds of measuring per figure (1 run at least)
    peak = matmul_gflops(size["matmul"], min_run_time=t, device=device)
    result = {
        "threads": threads,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "quick": quick,
        "tiny": tiny,
        "sizes": size,
        "matmul_gflops": peak,
        "identity": bench_identity(device, t, size["batch"]),
        "data": bench_data(t, size["batch"], size["images"]),
    }
    epoch = measure(lightning_epoch(device, size["train"], size["val"]), 2 * t)
    result["epoch"] = {
        "seconds": epoch.median,
        "iqr_pct": round(100 * epoch.iqr / epoch.median, 1),
        "runs": len(epoch.times),
        "train_images": size["train"],
        "val_images": size["val"],
        "seq_len": 20,
    }
    result["distill"] = bench_distill(device, t, n=size["images"])
    result["models"] = bench_models(device, 2 * t, peak, size["model_batch"], tiny=tiny)
    result["levers"] = bench_levers(device, t, size["model_batch"], tiny, threads)
    print(format_bench(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def _cell(rate, width=12, digits=0):
    """A rate and its spread: '   1,234 ±5%' (± half the interquartile range, in % of the
    median)."""
    return f"{rate['per_s']:>{width},.{digits}f} {'±%.0f%%' % (rate['iqr_pct'] / 2):>5}"


def format_bench(r):
    size = r.get("sizes", SIZES["full"])
    lines = [
        f"device {r['device']}, {r['threads']} threads, float32 matmul peak "
        f"{r['matmul_gflops']:.0f} GFLOP/s; medians of repeated timings, ± half the "
        "interquartile range",
        *["tiny sizes: a dry run of every figure, the numbers mean nothing"] * bool(r.get("tiny")),
        "",
        f"identity sequence, BiLSTM(32)+FC(100), CIFAR-10 shapes, batch {size['batch']}, "
        "training images/s",
        f"{'L':>4} {'naive nn.LSTM':>18} {'fast (loop)':>18} {'ratio':>6} {'GFLOP/s':>8} "
        f"{'hoisted+fused':>18}",
    ]
    for L, v in r["identity"].items():
        lines.append(
            f"{L:>4} {_cell(v['naive'])} {_cell(v['fast'])} {v['ratio']:>5.1f}x "
            f"{v['fast_gflops']:>8.1f} {_cell(v['fused'])}"
        )
    d, e = r["data"], r["epoch"]
    lines += [
        "",
        "data pipeline (normalise + flip + crop + identity L=20), images/s",
        f"{'torchvision per-sample':>24} {_cell(d['torchvision'])}",
        f"{'batched fast path':>24} {_cell(d['fast'])}   ({d['ratio']:.1f}x)",
        "",
        f"one Lightning epoch of the test task at L={e['seq_len']} ({e['train_images']:,} "
        f"training + {e['val_images']:,} validation images): {e['seconds']:.1f} s "
        f"±{e['iqr_pct'] / 2:.0f}% "
        f"({e['runs']} runs)",
        "",
    ]
    models = format_models(r["models"], size["model_batch"], r.get("tiny", False))
    levers = format_levers(r["levers"], size["model_batch"]) if "levers" in r else []
    return "\n".join(lines + format_distill(r["distill"]) + models + [""] + levers)


def format_models(models, batch=64, tiny=False):
    lines = [
        f"every model at its {'test' if tiny else 'default'} input, batch {batch}: training "
        "images/s; training GFLOP per image",
        "(FlopCounterMode: products, convolutions, attention, FFTs), achieved GFLOP/s, "
        "% of the peak",
        f"{'model':<18} {'params':>10} {'train img/s':>16} {'GFLOP/img':>10} {'GFLOP/s':>8} "
        f"{'% peak':>7}   {'test' if tiny else 'default'} input",
    ]
    for k, v in models.items():
        lines.append(
            f"{k:<18} {v['params']:>10,} {_cell(v['train'], 10, 1)} "
            f"{v['train_gflop_per_img']:>10.3f} {v['gflops']:>8.2f} {v['pct_peak']:>6.1f}%   "
            f"{v['input']}"
        )
    return lines
