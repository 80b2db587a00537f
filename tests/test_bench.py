"""The benchmark's FLOP counting and timing helpers, and its dry run."""

import json
import math
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import seqlstm
from seqlab import bench, cli


def test_flop_counting_agrees_with_the_analytical_count_for_bilstm_fc():
    """FlopCounterMode over one training step of bilstm_fc against bilstm_train_flops (3x the
    forward multiply-adds): the counted figure is about 0.70x, because the backward pass computes
    no gradient for the input images (the input projection, 2/3 of the forward work, costs 2x
    rather than 3x)."""
    x, n_feat, args = seqlstm.model_input("bilstm_fc", 8)
    model = seqlstm.create_model("bilstm_fc", in_features=n_feat, num_classes=10, **args)
    counted = bench.train_flops(model, x, torch.randint(0, 10, (8,)))
    analytical = bench.bilstm_train_flops(n_feat, x.shape[1])
    assert 0.6 * analytical < counted < analytical
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


def test_flop_counting_covers_lstm_kernels_and_ffts():
    """nn.LSTM's CPU kernel and FFTs, which FlopCounterMode does not count by itself, are
    counted: a 1-layer LSTM is 3x its forward products (gates and head), and S4D's count gains at
    least its forward FFTs (per layer: the kernel's rfft, the input's rfft and the output's
    irfft, of 2L points)."""
    x, n_feat, _ = seqlstm.model_input("lstm", 4)  # rows of 3x32x32: T = 32, F = 96
    model = seqlstm.create_model("lstm", in_features=n_feat, num_classes=10, hidden=16)
    T, I, H = 32, 96, 16
    forward = 2 * T * 4 * H * (I + H) + 2 * H * 10
    assert bench.train_flops(model, x, torch.randint(0, 10, (4,))) == 3 * forward
    B, L, D = 2, 64, 8
    layer = seqlstm.S4DLayer(D, state=4)
    u = torch.randn(B, L, D)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:  # products only
        layer.conv(u)
    with (
        torch.no_grad(),
        FlopCounterMode(display=False, custom_mapping=bench.EXTRA_FLOPS) as counted,
    ):
        layer.conv(u)
    real_fft = 2.5 * 2 * L * math.log2(2 * L)  # one real transform of 2L points: half of 5 n log2 n
    # the kernel's rfft (D channels), the input's rfft and the output's irfft (B x D each)
    assert counted.get_total_flops() - plain.get_total_flops() == (D + 2 * B * D) * real_fft


def test_measure_times_one_call_as_the_median_of_several():
    """A 10 ms sleep (independent of the CPU load): several timed blocks, a median per call near
    10 ms."""
    m = bench.measure(lambda: time.sleep(0.01), 0.2)
    assert len(m.times) >= 4 and 0.01 <= m.median < 0.015 and m.iqr >= 0
    rate = bench._rate(10, m)
    assert rate["per_s"] == 10 / m.median and rate["runs"] == len(m.times)


def test_the_distillation_bench_measures_each_way_and_formats_a_table():
    from seqlab import teacher

    t = bench.bench_distill("cpu", 0.01, seq_len=2, n=512)
    assert {"none", "cached", "live", "teacher_train"} <= set(t) and t["teacher"] == "fast_cnn"
    assert all(t[k]["per_s"] > 0 for k in ("none", "cached", "live", "teacher_train"))
    lines = bench.format_distill(t)
    assert f"(test-time views: {teacher.TEACHER_RECIPE['tta']})" in lines[3]


@pytest.mark.slow
def test_the_tiny_bench_runs_every_figure_and_saves_what_it_prints(tmp_path, capsys):
    """`bench --tiny`, the dry run of the command: every model and every figure measured (finite,
    positive rates) at the toy sizes, and the JSON holds what the table printed."""
    threads = torch.get_num_threads()
    try:
        cli.main(["bench", "--tiny", "--threads", "1", "--json", str(tmp_path / "bench.json")])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["tiny"] and saved["sizes"] == bench.SIZES["tiny"]
    assert sorted(saved["models"]) == seqlstm.list_models()
    rates = [v["train"]["per_s"] for v in saved["models"].values()]
    rates += [v[k]["per_s"] for v in saved["identity"].values() for k in ("naive", "fast", "fused")]
    rates += [saved["data"][k]["per_s"] for k in ("torchvision", "fast")]
    rates += [saved["distill"][k]["per_s"] for k in ("none", "cached", "live", "teacher_train")]
    assert all(math.isfinite(r) and r > 0 for r in rates)
    assert (saved["epoch"]["train_images"], saved["epoch"]["val_images"]) == (256, 64)
    levers = saved["levers"]  # each lever against its absence, for the tiny bench's one model
    assert set(levers["allocator"]) == set(levers["compile"]) == set(bench.TINY_LEVER_MODELS)
    assert set(levers["denormals"]) == {"bilstm_fc"}  # the saturated test-task step (CPU)
    kinds = ("allocator", "denormals", "compile")
    ratios = [v["speedup"] for kind in kinds for v in levers[kind].values()]
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    assert capsys.readouterr().out.strip() == bench.format_bench(saved)
