"""S4D: the FFT convolution is the discretised state-space recurrence, the layer is causal unless
bidirectional, bad arguments are refused, and A and dt reach the optimizer with their own lr and no
weight decay. (The zoo's generic tests, parametrized over the registry, cover forward, backward,
finite values and a falling loss.)"""

import pytest
import torch
import torch.nn.functional as F

import seqlstm
from seqlab import lightning


def layer64(bidirectional=False, dim=3, state=8, seed=0):
    """A float64 S4DLayer whose A, dt and D are moved off their initial values, so that the test
    does not depend on S4D-Lin's particular numbers."""
    torch.manual_seed(seed)
    layer = seqlstm.S4DLayer(dim, state=state, bidirectional=bidirectional).double()
    with torch.no_grad():
        layer.log_dt.copy_(torch.empty_like(layer.log_dt).uniform_(-3, -1))  # dt in [0.05, 0.37]
        layer.log_A_real.add_(0.3 * torch.randn_like(layer.log_A_real))
        layer.A_imag.add_(torch.randn_like(layer.A_imag))
    return layer


def zoh(layer, c):
    """A_bar, B_bar and C of kernel set c from the raw parameters: zero-order hold with B = 1."""
    dt = torch.exp(layer.log_dt[c]).unsqueeze(-1)  # (H, 1)
    A = -torch.exp(layer.log_A_real[c]) + 1j * layer.A_imag[c]  # (H, N/2)
    A_bar = torch.exp(dt * A)
    return A_bar, (A_bar - 1) / A, torch.view_as_complex(layer.C[c])


def recurrence(u, A_bar, B_bar, C, reverse=False):
    """x_k = A_bar x_{k-1} + B_bar u_k, y_k = Re(C x_k) + Re(conj(C) conj(x_k)) = 2 Re(C x_k),
    step by step; reverse: the state runs from the end and step t reads u[t+1:] only."""
    B, L, H = u.shape
    x = torch.zeros(B, H, A_bar.shape[-1], dtype=A_bar.dtype)
    y = torch.zeros(B, L, H, dtype=u.dtype)
    for t in range(L - 1, -1, -1) if reverse else range(L):
        if reverse:  # y_t sees x built from u_{t+1} .. u_{L-1}
            y[:, t] = 2 * (C * x).sum(-1).real
            x = A_bar * x + B_bar * u[:, t, :, None]
        else:
            x = A_bar * x + B_bar * u[:, t, :, None]
            y[:, t] = 2 * (C * x).sum(-1).real
    return y


def test_fft_convolution_equals_the_recurrence():
    layer = layer64()
    u = torch.randn(2, 50, 3, dtype=torch.float64)
    expected = recurrence(u, *zoh(layer, 0)) + layer.D * u
    torch.testing.assert_close(layer.conv(u), expected, rtol=1e-10, atol=1e-10)


def test_bidirectional_fft_convolution_equals_two_recurrences():
    layer = layer64(bidirectional=True)
    u = torch.randn(2, 40, 3, dtype=torch.float64)
    expected = (
        recurrence(u, *zoh(layer, 0)) + recurrence(u, *zoh(layer, 1), reverse=True) + layer.D * u
    )
    torch.testing.assert_close(layer.conv(u), expected, rtol=1e-10, atol=1e-10)


def test_kernel_is_the_impulse_response():
    layer = layer64()
    u = torch.zeros(1, 30, 3, dtype=torch.float64)
    u[:, 0] = 1.0
    expected = layer.kernel(30).clone()  # (H, L)
    expected[:, 0] += layer.D  # the skip term answers at step 0 only
    torch.testing.assert_close(layer.conv(u)[0].T, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prenorm", [False, True])
def test_unidirectional_s4d_is_causal_and_bidirectional_is_not(prenorm):
    x = torch.randn(2, 64, 1, dtype=torch.float64)
    for bidirectional in (False, True):
        torch.manual_seed(0)
        model = (
            seqlstm.create_model(
                "s4d",
                in_features=1,
                num_classes=3,
                dim=8,
                layers=2,
                state=8,
                prenorm=prenorm,
                bidirectional=bidirectional,
            )
            .double()
            .eval()
        )
        for t in (0, 30, 62):
            y = x.clone()
            y[:, t + 1 :] += torch.randn_like(y[:, t + 1 :])
            past = (model.features(x)[:, : t + 1] - model.features(y)[:, : t + 1]).abs().max()
            future = (model.features(x)[:, t + 1 :] - model.features(y)[:, t + 1 :]).abs().max()
            assert future > 1e-3
            if bidirectional:
                assert past > 1e-3  # the backward kernel reads the later steps
            else:
                assert past < 1e-10  # FFT rounding only: the past never sees the future


def test_s4d_defaults_and_s4d_lin_initialisation():
    model = seqlstm.create_model("s4d", in_features=1, num_classes=10)
    assert len(model.layers) == 4 and model.encoder.out_features == 64 and not model.prenorm
    layer = model.layers[0]
    assert layer.C.shape == (1, 64, 32, 2)  # state 64: 32 complex modes and their conjugates
    dt, A, _ = layer.ssm()
    torch.testing.assert_close(
        A[0, 5], torch.complex(torch.full((32,), -0.5), torch.pi * torch.arange(32.0))
    )
    assert 1e-3 <= dt.min() and dt.max() <= 1e-1
    assert (
        seqlstm.create_model("s4d", in_features=1, num_classes=10, bidirectional=True)
        .layers[0]
        .C.shape[0]
        == 2
    )


@pytest.mark.parametrize(
    "kw, says",
    [
        (dict(state=0), "state must be >= 1"),
        (dict(state=3), "state must be even"),
        (dict(dim=0), "dim must be >= 1"),
        (dict(layers=0), "layers must be >= 1"),
        (dict(dropout=-0.1), "dropout must be in [0, 1), got -0.1"),
        (dict(bidirectional="yes"), "bidirectional must be True or False, got 'yes'"),
        (dict(bidirectional=1), "bidirectional must be True or False, got 1"),
        (dict(prenorm=None), "prenorm must be True or False, got None"),
        (dict(dt_min=0.2, dt_max=0.1), "dt_min=0.2"),
    ],
)
def test_bad_arguments_raise_value_error(kw, says):
    with pytest.raises(ValueError) as e:
        seqlstm.create_model("s4d", in_features=1, num_classes=10, **kw)
    assert says in str(e.value)


def test_param_groups_give_a_and_dt_their_own_lr_and_no_weight_decay():
    model = seqlstm.create_model("s4d", in_features=1, num_classes=10, layers=2, ssm_lr=1e-3)
    groups = lightning.param_groups(model, lr=0.01, weight_decay=0.05)
    ssm = {id(p) for layer in model.layers for p in (layer.log_dt, layer.log_A_real, layer.A_imag)}
    assert len(groups) == 2
    for g in groups:
        in_ssm = {id(p) in ssm for p in g["params"]}
        assert len(in_ssm) == 1  # a group holds SSM parameters only, or none
        expected = (1e-3, 0.0) if in_ssm.pop() else (0.01, 0.05)
        assert (g["lr"], g["weight_decay"]) == expected
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    lstm = seqlstm.create_model("lstm", in_features=3, num_classes=2)
    assert [(g["lr"], g["weight_decay"]) for g in lightning.param_groups(lstm, 0.1, 0.2)] == [
        (0.1, 0.2)
    ]


@pytest.mark.parametrize("schedule", ["onecycle", "none"])
def test_lightning_trains_a_and_dt_at_their_own_lr(schedule):
    """Through SeqClassifier and a real Trainer: the optimizer holds both groups, and the one-cycle
    schedule peaks each group at its own lr."""
    import pytorch_lightning as pl

    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 3, (16,))
    model = seqlstm.create_model("s4d", in_features=1, num_classes=3, dim=8, layers=1, state=4)
    module = lightning.SeqClassifier(
        model,
        to_seq=seqlstm.make_sequence("pixels"),
        mean=[0.5],
        std=[0.25],
        augment="none",
        lr=0.01,
        weight_decay=0.05,
        optimizer="adamw",
        schedule=schedule,
    )
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, seqlstm.Batches(x, y, 8, shuffle=True))
    groups = trainer.optimizers[0].param_groups
    ssm = {id(model.layers[0].log_dt), id(model.layers[0].log_A_real), id(model.layers[0].A_imag)}
    settings = {}
    for g in groups:
        key = "ssm" if id(g["params"][0]) in ssm else "rest"
        settings[key] = (g.get("max_lr", g["lr"]), g["weight_decay"])
    assert settings == {"ssm": (1e-3, 0.0), "rest": (0.01, 0.05)}


# The layer as it was before its speed-up (a Vandermonde kernel of L complex exponentials per
# mode, GELU on a (B, L, H) view of the FFT's (B, H, L) output, D added after the convolution):
# the reference that the factorised kernel and the channels-first layer must equal.
def reference_kernel(dt, A, C, L):
    dtA = dt.unsqueeze(-1) * A  # (..., H, N/2)
    steps = torch.arange(L, device=A.device, dtype=dt.dtype)
    powers = torch.exp(dtA.unsqueeze(-1) * steps)  # (..., H, N/2, L): A_bar^l
    return 2 * torch.einsum("...hn,...hnl->...hl", C * torch.expm1(dtA) / A, powers).real


def reference_forward(layer, u):  # (B, L, H)
    L = u.shape[1]
    k = reference_kernel(*layer.ssm(), L)  # (c, H, L)
    if layer.bidirectional:
        k = F.pad(k[0], (0, L)) + F.pad(k[1].flip(-1), (L, 0))
    else:
        k = k[0]
    k_f = torch.fft.rfft(k, n=2 * L)
    y = torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n=2 * L) * k_f, n=2 * L)[..., :L]
    y = F.gelu(y.transpose(1, 2) + u * layer.D).transpose(1, 2)  # (B, H, L)
    return layer.out(F.dropout1d(y, layer.dropout, layer.training).transpose(1, 2))


@pytest.mark.parametrize("L", [1, 7, 64, 784, 1024])
def test_factorised_kernel_equals_the_vandermonde_product(L):
    """float32, S4D-Lin's A with the default model's step sizes: every L, square or not."""
    torch.manual_seed(0)
    layer = seqlstm.S4DLayer(16, state=64)
    dt, A, C = layer.ssm()
    ref = reference_kernel(dt, A, C, L)
    torch.testing.assert_close(seqlstm.s4d_kernel(dt, A, C, L), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_outputs_and_gradients_equal_the_reference(bidirectional):
    """Training mode with dropout: the same masks (one dropout1d call on (B, H, L) from the same
    RNG state), outputs and every parameter's and the input's gradient within 1e-5."""
    torch.manual_seed(0)
    layer = seqlstm.S4DLayer(32, state=16, bidirectional=bidirectional, dropout=0.2)
    u = torch.randn(4, 256, 32, requires_grad=True)
    results = []
    for forward in (layer, lambda x: reference_forward(layer, x)):
        torch.manual_seed(1)
        out = forward(u)
        grads = torch.autograd.grad(out.square().sum(), [u, *layer.parameters()])
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


@pytest.mark.parametrize("L, taps", [(5, 5), (6, 12), (1, 2)])
def test_fft_convolution_backward_is_the_gradient(L, taps):
    """FFTConv's hand-written backward against finite differences (float64), for a causal kernel
    (taps = L) and for a bidirectional one (taps = n = 2L, its second half wrapping round)."""
    torch.manual_seed(0)
    u = torch.randn(2, 3, L, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, taps, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, k: seqlstm.FFTConv.apply(u, k, 2 * L), (u, k))


def test_fft_convolution_is_the_direct_sum():
    """y[b, h, t] = sum_s k[h, (t - s) mod n] u[b, h, s], t < L: the forward pass, wrap included."""
    torch.manual_seed(0)
    B, H, L, n = 2, 3, 4, 8
    u, k = torch.randn(B, H, L, dtype=torch.float64), torch.randn(H, n, dtype=torch.float64)
    expected = torch.zeros(B, H, L, dtype=torch.float64)
    for t in range(L):
        for s in range(L):
            expected[:, :, t] += k[:, (t - s) % n] * u[:, :, s]
    torch.testing.assert_close(seqlstm.FFTConv.apply(u, k, n), expected)


def test_swap_hands_on_contiguous_memory_both_ways():
    """SwapLH is a transpose whose forward output and backward gradient are both contiguous (a
    plain transpose().contiguous() hands back a strided gradient), values unchanged."""
    x = torch.randn(2, 5, 3, requires_grad=True)
    seen = []
    t = x * 1
    t.register_hook(lambda g: seen.append(g.is_contiguous()))
    y = seqlstm.SwapLH.apply(t)
    assert y.is_contiguous() and torch.equal(y, x.detach().transpose(1, 2))
    g = torch.randn(2, 3, 5)
    y.backward(g)
    assert seen == [True] and torch.equal(x.grad, g.transpose(1, 2))
