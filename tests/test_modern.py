"""ViL (mLSTM) and Vim (Mamba): each training form equals its step-by-step recurrence, forward and
gradients; ViL alternates the direction block by block; Vim reads both directions; the bench counts
Vim's scan. The zoo tests (tests/test_zoo.py) cover building, training and the image input."""

import copy
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import seqlstm
from seqlab import bench

f64 = dict(dtype=torch.float64)


def tiny(name, **overrides):
    """Model `name` in float64 at its test input (3x8x8 images: a 2x2 grid of 4 tokens), and the
    input."""
    x, n_feat, args = seqlstm.model_input(name, 3, tiny=True)
    torch.manual_seed(0)
    model = seqlstm.create_model(name, in_features=n_feat, num_classes=5, **{**args, **overrides})
    return model.double(), x.double()


def outputs_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), **f64).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, tol=1e-5):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=tol)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=tol, rtol=tol, msg=n)


# ----------------------------------------------------------------------------------------
# ViL: the mLSTM's parallel form is its recurrence; the direction alternates


def test_mlstm_parallel_form_equals_the_recurrence():
    """Random q, k, v and gates far from their initial values (input gates up to +-6, forget gates
    from strongly closed to open), so that the stabiliser m_t moves: forward and gradients."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g, **f64).requires_grad_() for _ in range(3))
    i_pre = (3 * torch.randn(2, 3, 9, generator=g, **f64)).requires_grad_()
    f_pre = (3 * torch.randn(2, 3, 9, generator=g, **f64)).requires_grad_()
    inputs = (q, k, v, i_pre, f_pre)
    results = []
    for form in (seqlstm.mlstm_parallel, seqlstm.mlstm_recurrent):
        h = form(*inputs)
        grads = torch.autograd.grad((h * h.detach().sin()).sum(), inputs)
        results.append((h.detach(), dict(enumerate(grads))))
    assert_same(*results, tol=1e-10)


def test_vil_parallel_and_recurrent_models_agree():
    model, x = tiny("vil")
    parallel = outputs_and_grads(model, x)
    recurrent = outputs_and_grads(model.set_mode("recurrent"), x)
    assert all(b.cell.mode == "recurrent" for b in model.blocks)
    assert_same(parallel, recurrent)


def test_vil_blocks_alternate_the_token_direction():
    """Block 1 (odd) is flip(block(flip(x))) of the same weights read forward; block 0 (even)
    is causal from the first token, block 1 from the last."""
    model, _ = tiny("vil", layers=2)
    even, odd = model.blocks
    assert not even.reverse and odd.reverse
    z = torch.randn(2, 6, even.norm.normalized_shape[0], **f64)
    forward_twin = copy.deepcopy(odd)
    forward_twin.reverse = False
    torch.testing.assert_close(odd(z), forward_twin(z.flip(1)).flip(1))
    changed = z.clone()
    changed[:, -1] += torch.randn(z.shape[-1], **f64)  # the last token (not a constant: LayerNorm)
    assert torch.equal(even(z)[:, :-1], even(changed)[:, :-1])  # the past never sees the future
    assert (odd(z)[:, 0] - odd(changed)[:, 0]).abs().max() > 1e-6  # the first token sees the last
    changed = z.clone()
    changed[:, 0] += torch.randn(z.shape[-1], **f64)  # the first token
    assert torch.equal(odd(z)[:, 1:], odd(changed)[:, 1:])
    assert (even(z)[:, -1] - even(changed)[:, -1]).abs().max() > 1e-6


def test_vil_reads_the_first_and_last_token():
    model, x = tiny("vil")
    z = model.features(x)
    assert z.shape[1] == 4  # a 2x2 grid of 4x4 patches
    torch.testing.assert_close(model(x), model.head((z[:, 0] + z[:, -1]) / 2))


# ----------------------------------------------------------------------------------------
# Vim: the chunked scan is the recurrence; both directions; the middle class token


@pytest.mark.parametrize("strongest", [-1.0, -25.0])
def test_chunked_scan_equals_the_sequential_recurrence(strongest):
    """19 steps (two chunks of 8 and a padded one): forward and gradients. Log decays down to the
    clamp (-20 per step: 160 over a chunk of 8, whose exp(160) would overflow float32 without the
    chunk's middle as reference), in float32 as the models run."""
    g = torch.Generator().manual_seed(0)
    log_a = torch.rand(2, 19, 3, 4, generator=g) * strongest
    log_a = log_a.clamp(min=seqlstm.LOG_DECAY_MIN).requires_grad_()
    u = torch.randn(2, 19, 3, 4, generator=g, requires_grad=True)
    c = torch.randn(2, 19, 4, generator=g, requires_grad=True)
    results = []
    for mode in ("chunked", "sequential"):
        y = seqlstm.selective_scan(log_a, u, c, mode=mode)
        assert torch.isfinite(y).all()
        grads = torch.autograd.grad((y * y.detach().sin()).sum(), (log_a, u, c))
        results.append((y.detach(), dict(enumerate(grads))))
    assert_same(*results, tol=1e-5)


def test_scan_is_the_recurrence_written_out():
    g = torch.Generator().manual_seed(1)
    log_a, u = -torch.rand(1, 5, 2, 3, generator=g), torch.randn(1, 5, 2, 3, generator=g)
    c = torch.randn(1, 5, 3, generator=g)
    h, ys = torch.zeros(1, 2, 3), []
    for t in range(5):
        h = torch.exp(log_a[:, t]) * h + u[:, t]
        ys.append((h * c[:, t, None]).sum(-1))
    torch.testing.assert_close(seqlstm.selective_scan(log_a, u, c), torch.stack(ys, 1))


def test_vim_chunked_and_sequential_models_agree():
    model, x = tiny("vim")
    sequential = outputs_and_grads(model, x)
    chunked = outputs_and_grads(model.set_scan("chunked"), x)
    assert all(m.forward_ssm.scan == m.backward_ssm.scan == "chunked" for m in model.mixers)
    assert_same(chunked, sequential)


def test_vim_mixer_reads_both_directions():
    """Changing the last token changes the first token's output of the mixer; its forward SSM
    alone is causal, and the backward one has parameters of its own."""
    torch.manual_seed(0)
    mixer = seqlstm.BiMamba(8, expand=2, state=4, conv_kernel=4, dt_rank=2, dt_min=1e-3,
                            dt_max=1e-1, scan="chunked").double()
    x = torch.randn(2, 7, 8, **f64)
    changed = x.clone()
    changed[:, -1] += torch.randn(8, **f64)
    assert (mixer(x)[:, 0] - mixer(changed)[:, 0]).abs().max() > 1e-6
    branch = mixer.in_proj(x).chunk(2, -1)[0]
    branch_changed = mixer.in_proj(changed).chunk(2, -1)[0]
    forward = mixer.forward_ssm
    assert torch.equal(forward(branch)[:, :-1], forward(branch_changed)[:, :-1])
    own = {id(p) for p in mixer.backward_ssm.parameters()}
    assert own.isdisjoint(id(p) for p in forward.parameters())


def test_vim_reads_the_middle_class_token():
    model, x = tiny("vim")
    z = model.features(x)
    assert z.shape[1] == 4 + 1  # 4 patch tokens and the class token at index 2
    torch.testing.assert_close(model(x), model.head(z[:, 2]))
    mean = tiny("vim", readout="mean")[0]
    assert mean.cls is None and mean.features(x).shape[1] == 4


@pytest.mark.parametrize("mode", ["chunked", "sequential"])
def test_the_bench_counts_the_scan(mode):
    """The multiply-add of the recurrence per state element and step in the forward pass (two
    cumulative sums over the (B, L, D, N) states, or one addcmul per step); FlopCounterMode alone
    counts only the readout."""
    B, L, D, N = 2, 16, 3, 4
    log_a, u, c = -torch.rand(B, L, D, N), torch.randn(B, L, D, N), torch.randn(B, L, N)
    with FlopCounterMode(display=False) as plain:
        seqlstm.selective_scan(log_a, u, c, mode=mode)
    with FlopCounterMode(display=False, custom_mapping=bench.EXTRA_FLOPS) as counted:
        seqlstm.selective_scan(log_a, u, c, mode=mode)
    assert counted.get_total_flops() - plain.get_total_flops() == 2 * B * L * D * N
    assert plain.get_total_flops() == 2 * B * L * D * N  # the readout y_t = h_t c_t


def test_default_sizes():
    """64 tokens of 4x4 patches on 32x32 images, a few hundred thousand parameters."""
    for name in ("vil", "vim"):
        x, n_feat, args = seqlstm.model_input(name, 1)
        model = seqlstm.create_model(name, in_features=n_feat, num_classes=10, **args)
        assert model.embed.pos.shape[-2:] == (8, 8)
        assert 200_000 < seqlstm.count_params(model) < 600_000
    assert math.isclose(seqlstm.LOG_DECAY_MIN * seqlstm.SCAN_CHUNK / 2, -80)
