"""On a CUDA device: every registered model computes what it computes on the CPU (outputs and
gradients), the batched data path gives the CPU's batches, and a bf16-mixed run trains. Each test
is skipped without a device; `pytest -m cuda` runs these alone (scripts/gpu_check.sh does)."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import seqlstm
from seqlab import lightning, runner

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

K = 10
RTOL = 1e-3  # float32 on both, summed in other orders on the device: 1e-3 of a tensor's scale


@pytest.fixture
def full_float32():
    """float32 products and convolutions at full precision on the device, as on the CPU: TF32
    (cuDNN's default for convolutions and RNNs) rounds inputs to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_near(device_tensor, cpu_tensor, what):
    """Equal within RTOL of the CPU tensor's largest magnitude (and RTOL of each element)."""
    scale = cpu_tensor.abs().max().item()
    torch.testing.assert_close(
        device_tensor.cpu(),
        cpu_tensor,
        rtol=RTOL,
        atol=RTOL * scale + 1e-7,
        msg=lambda m: f"{what}: {m}",
    )


def forward_backward(model, x, y):
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------
# every model: the device computes what the CPU computes


@pytest.mark.parametrize("name", seqlstm.list_models())
def test_forward_and_gradients_on_cuda_match_the_cpu(name, full_float32):
    """Model `name` at its test input, in training mode (cuDNN's RNN backward needs it; the test
    inputs have no dropout, and batch norm's batch statistics are deterministic), one forward and
    backward on the CPU and on a copy of the same weights on the device."""
    x, n_in, args = seqlstm.model_input(name, 4, tiny=True)
    y = torch.arange(4) % K
    torch.manual_seed(0)
    cpu = seqlstm.create_model(name, in_features=n_in, num_classes=K, **args).train()
    device = seqlstm.create_model(name, in_features=n_in, num_classes=K, **args).train()
    device.load_state_dict(cpu.state_dict())  # before any forward: batch norm's running statistics
    device.cuda()
    out_cpu, grads_cpu = forward_backward(cpu, x, y)
    out_dev, grads_dev = forward_backward(device, x.cuda(), y.cuda())
    assert out_dev.is_cuda and torch.isfinite(out_dev).all()
    assert_near(out_dev, out_cpu, f"{name} logits")
    assert grads_dev.keys() == grads_cpu.keys()
    assert any(g is not None for g in grads_cpu.values())
    for n, g in grads_cpu.items():
        assert (g is None) == (grads_dev[n] is None), f"{name}: {n}'s gradient on one device only"
        if g is not None:
            assert_near(grads_dev[n], g, f"{name} gradient of {n}")


# ----------------------------------------------------------------------------------------
# the batched data path on the device


def _images(n=50, shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), torch.arange(n) % K


MEAN, STD = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])


def _data_path(device, augment, transform):
    """Every training batch of one epoch as the fast path makes it on `device`: Batches of
    device-resident uint8 images, augment_with_flips drawing from a CPU generator, normalize and
    the sequence transform."""
    x, y = _images()
    mean, std = MEAN.to(device), STD.to(device)
    fill = (mean * 255).round().to(torch.uint8)  # SeqClassifier's cutout fill
    gen, to_seq = torch.Generator().manual_seed(1), seqlstm.make_sequence(transform, seq_len=3)
    out = []
    for xb, yb, idx in seqlstm.Batches(
        x.to(device), y.to(device), 16, shuffle=True, seed=3, with_index=True
    ):
        xa, flip = seqlstm.augment_with_flips(xb, augment, gen, fill)
        out.append((xa, yb, idx, flip, to_seq(seqlstm.normalize(xa, mean, std))))
    return out


@pytest.mark.parametrize("augment", seqlstm.AUGMENTS)
def test_the_batched_data_path_on_cuda_gives_the_cpus_batches(augment):
    """The same images, labels, indices and flips, exactly (uint8, the draws on the CPU), and the
    same normalised sequences within float32 rounding, for each augmentation and layout."""
    for transform in ("identity", "rows", "pixels", "patches"):
        cpu, dev = _data_path("cpu", augment, transform), _data_path("cuda", augment, transform)
        assert len(cpu) == len(dev) == 4
        for (xc, yc, ic, fc, sc), (xd, yd, id_, fd, sd) in zip(cpu, dev):
            assert xd.is_cuda and sd.is_cuda and sd.dtype == torch.float32
            assert torch.equal(xd.cpu(), xc) and torch.equal(yd.cpu(), yc) and torch.equal(id_, ic)
            assert (fc is None) == (fd is None) and (fc is None or torch.equal(fd.cpu(), fc))
            torch.testing.assert_close(sd.cpu(), sc)


def test_a_training_loss_on_cuda_matches_the_cpu(full_float32):
    """SeqClassifier.train_loss (augment, normalise, identity sequence, BiLSTM + FC) on a batch
    of uint8 images: the same loss and logits on the device as on the CPU, the same weights and
    augmentation seed."""
    x, y = _images(16)

    def module():
        torch.manual_seed(0)
        model = seqlstm.BiLSTMFC(in_features=3 * 8 * 8, num_classes=K, hidden=8, fc=16)
        return lightning.SeqClassifier(
            model,
            to_seq=seqlstm.make_sequence("identity", seq_len=4),
            mean=MEAN,
            std=STD,
            augment="flip_crop_cutout",
            seed=0,
        )

    loss_cpu, logits_cpu = module().train_loss(x, y)
    loss_dev, logits_dev = module().cuda().train_loss(x.cuda(), y.cuda())
    assert logits_dev.is_cuda
    assert_near(logits_dev, logits_cpu.detach(), "logits")
    assert math.isclose(loss_dev.item(), loss_cpu.item(), rel_tol=RTOL)


# ----------------------------------------------------------------------------------------
# bf16-mixed


class OutputDtypes(pl.Callback):
    """The dtype and device of every output of the module's network while it trains."""

    def __init__(self):
        self.seen = set()

    def on_train_start(self, trainer, module):
        module.model.register_forward_hook(
            lambda m, inputs, out: self.seen.add((out.dtype, out.device.type))
        )


def test_a_bf16_mixed_run_trains_on_cuda(quick_report, outputs):
    """One epoch of the test task on digits through the runner's fit (Lightning picks the
    device), precision bf16-mixed: the network's outputs are bf16 on the device, the training
    loss is finite, and the best checkpoint tests."""
    runs, loaded = quick_report(precision="bf16-mixed")
    run = runs[0]
    data = loaded[run.data.key]
    dtypes = OutputDtypes()
    fit = runner.fit_run(run, data, None, None, callbacks=[dtypes])
    assert fit.module.device.type == "cuda"
    assert dtypes.seen == {(torch.bfloat16, "cuda")}
    assert len(fit.module.history) == 1 and math.isfinite(fit.module.history[0]["train_loss"])
    metrics = lightning.evaluate(fit.trainer, fit.module, data, fit.eval_batch)[0]
    assert 0 <= metrics["test_acc"] <= 1
