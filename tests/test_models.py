"""Models: shapes, gradients, equivalence of the hoisted BiLSTM with nn.LSTM, the registry, the
losses."""

import pytest
import torch
import torch.nn.functional as F

import seqlstm
from seqlab import runner

B, C, H, W, K = 4, 3, 2, 2, 5  # small shapes: in_features = 12
N_FEAT = C * H * W


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(in_features=N_FEAT, num_classes=K, hidden=8, fc=10)
    return seqlstm.BiLSTMFC(**{**args, **kw})


def random_images(seed=1, b=B):
    return torch.randn(b, C, H, W, generator=torch.Generator().manual_seed(seed))


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------
# forward / backward


@pytest.mark.parametrize(
    "name", ["bilstm_fc"]
)  # the registry at each model's own input: test_zoo.py
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("sequence", ["identity", "general"])
def test_forward_shape_and_finite_gradients(name, layers, sequence):
    torch.manual_seed(0)
    model = seqlstm.create_model(name, in_features=N_FEAT, num_classes=K, layers=layers)
    if sequence == "identity":
        x = seqlstm.identity(random_images(), seq_len=6)
    else:  # every step different, contiguous
        x = torch.randn(B, 6, N_FEAT)
    out = model(x)
    assert out.shape == (B, K)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(B) % K).backward()
    for n, p in trainable(model).items():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{n} has non-finite gradients"
    assert any(p.grad.abs().sum() > 0 for p in trainable(model).values())


def test_general_sequence_depends_on_every_step():
    model = make_model().eval()
    x = torch.randn(B, 5, N_FEAT)
    y = x.clone()
    y[:, 0] += 1  # change only the first step: the forward direction's last state must see it
    assert max_diff(model(x), model(y)) > 1e-4


# ----------------------------------------------------------------------------------------
# equivalence of the hoisted (and the unhoisted) model with nn.LSTM on the repeated sequence


def grad_pairs(model, ref):
    """(name, model gradient, reference gradient) for every weight of the network."""
    D = model.dirs
    pairs = []
    for d, suffix in enumerate(["", "_reverse"][:D]):
        pairs += [
            (
                f"in_proj.weight[{d}]",
                model.in_proj.weight.grad.chunk(D)[d],
                getattr(ref.rnn, f"weight_ih_l0{suffix}").grad,
            ),
            (
                f"in_proj.bias[{d}]",
                model.in_proj.bias.grad.chunk(D)[d],
                getattr(ref.rnn, f"bias_ih_l0{suffix}").grad,
            ),
            (
                f"recur[{d}].weight_hh_l0",
                model.recur[d].weight_hh_l0.grad,
                getattr(ref.rnn, f"weight_hh_l0{suffix}").grad,
            ),
            (
                f"recur[{d}].bias_hh_l0",
                model.recur[d].bias_hh_l0.grad,
                getattr(ref.rnn, f"bias_hh_l0{suffix}").grad,
            ),
        ]
    for name, p in model.upper.named_parameters() if model.upper else []:
        kind, layer = name.rsplit(
            "_l", 1
        )  # weight_ih_l0_reverse -> upper layer 0, reverse direction
        num, _, suffix = layer.partition("_")
        ref_name = f"{kind}_l{int(num) + 1}{'_' + suffix if suffix else ''}"
        pairs.append((f"upper.{name}", p.grad, getattr(ref.rnn, ref_name).grad))
    for (name, p), q in zip(model.head.named_parameters(), ref.head.parameters()):
        pairs.append((f"head.{name}", p.grad, q.grad))
    return pairs


def run(model, seq, leaf, weights):
    out = model(seq)
    (out * weights).sum().backward()
    return out.detach(), leaf.grad.clone()


@pytest.mark.parametrize("seq_len", [1, 5, 20])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_hoisted_model_equals_nn_lstm_on_repeated_sequence(bidirectional, layers, seq_len):
    model = make_model(layers=layers, bidirectional=bidirectional)
    ref = seqlstm.ReferenceBiLSTMFC(model)
    images = random_images().flatten(1)
    weights = torch.randn(B, K, generator=torch.Generator().manual_seed(2))
    x_fast = images.clone().requires_grad_()
    seq = x_fast.view(B, 1, -1).expand(B, seq_len, -1)  # the identity sequence, time stride 0
    out_fast, dx_fast = run(model, seq, x_fast, weights)
    x_ref = images.clone().requires_grad_()
    out_ref, dx_ref = run(
        ref, x_ref.view(B, 1, -1).expand(B, seq_len, -1).contiguous(), x_ref, weights
    )

    assert out_fast.shape == (B, K)
    assert max_diff(out_fast, out_ref) <= 1e-5
    assert max_diff(dx_fast, dx_ref) <= 1e-5
    n_upper = len(list(model.upper.parameters())) if model.upper else 0
    assert len(grad_pairs(model, ref)) == 4 * model.dirs + n_upper + 4  # every weight is compared
    for name, g, g_ref in grad_pairs(model, ref):
        assert g is not None and g_ref is not None, name
        if seq_len > 1 or "weight_hh" not in name:  # one step from h0 = 0: W_hh gets no gradient
            assert g.abs().max() > 0, f"{name}: zero gradient, the comparison would be vacuous"
        assert max_diff(g, g_ref) <= 1e-5, name

    # the unhoisted path: nn.LSTM with W_ih = I on the per-step projection, contiguous input
    model.zero_grad()
    model.hoist = False
    x_slow = images.clone().requires_grad_()
    out_slow, dx_slow = run(
        model, x_slow.view(B, 1, -1).expand(B, seq_len, -1).contiguous(), x_slow, weights
    )
    assert max_diff(out_slow, out_ref) <= 1e-5
    assert max_diff(dx_slow, dx_ref) <= 1e-5
    for name, g, g_ref in grad_pairs(model, ref):
        assert max_diff(g, g_ref) <= 1e-5, f"unhoisted {name}"


@pytest.mark.parametrize("bidirectional", [True, False])
def test_unhoisted_model_equals_nn_lstm_on_general_sequence(bidirectional):
    model = make_model(layers=2, bidirectional=bidirectional, hoist=False)
    ref = seqlstm.ReferenceBiLSTMFC(model)
    x = torch.randn(B, 7, N_FEAT)
    assert max_diff(model(x), ref(x)) <= 1e-5


@pytest.mark.parametrize("readout", ["last", "mean", "attention"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layers,bidirectional", [(1, True), (1, False), (2, True)])
def test_every_component_keeps_the_hoisted_path_equal_to_the_plain_network(
    cell, readout, layers, bidirectional
):
    """Cell, directions, depth and readout: the hoisted loop, the hoisted fused kernel and the
    unhoisted path each equal nn.LSTM / nn.GRU on the repeated sequence, values and input
    gradients."""
    model = make_model(cell=cell, readout=readout, layers=layers, bidirectional=bidirectional)
    ref = seqlstm.ReferenceBiLSTMFC(model)
    assert isinstance(ref.rnn, torch.nn.GRU if cell == "gru" else torch.nn.LSTM)
    images, weights = (
        random_images().flatten(1),
        torch.randn(B, K, generator=torch.Generator().manual_seed(2)),
    )
    x_ref = images.clone().requires_grad_()
    out_ref, dx_ref = run(ref, x_ref.view(B, 1, -1).expand(B, 6, -1).contiguous(), x_ref, weights)
    for recurrence, hoist, contiguous in [
        ("loop", True, False),
        ("fused", True, False),
        ("loop", False, True),
    ]:
        model.recurrence, model.hoist = recurrence, hoist
        x = images.clone().requires_grad_()
        seq = x.view(B, 1, -1).expand(B, 6, -1)
        out, dx = run(model, seq.contiguous() if contiguous else seq, x, weights)
        assert max_diff(out, out_ref) <= 1e-5, (recurrence, hoist)
        assert max_diff(dx, dx_ref) <= 1e-5, (recurrence, hoist)


def test_readouts_read_different_features():
    x = seqlstm.identity(random_images(), seq_len=5)
    attention = make_model(readout="attention")
    last, mean = make_model(readout="last"), make_model(readout="mean")
    for other in (last, mean):
        other.load_state_dict(
            attention.state_dict(), strict=False
        )  # the same weights, the pool aside
    assert max_diff(last(x), mean(x)) > 1e-4 and max_diff(mean(x), attention(x)) > 1e-4
    torch.nn.init.zeros_(attention.pool.score.weight)  # equal scores: attention pooling is the mean
    assert max_diff(mean(x), attention(x)) <= 1e-6
    with pytest.raises(
        ValueError, match=r"unknown readout 'max': valid values are \['last', 'mean', 'attention'\]"
    ):
        make_model(readout="max")
    with pytest.raises(ValueError, match=r"unknown cell 'rnn': valid values are \['lstm', 'gru'\]"):
        make_model(cell="rnn")


def test_hoisted_path_is_taken_only_for_expanded_input(monkeypatch):
    calls = []
    loop = seqlstm.lstm_loop

    def counting(*args, **kw):
        calls.append(1)
        return loop(*args, **kw)

    monkeypatch.setattr(seqlstm, "lstm_loop", counting)
    model = make_model()
    expanded = seqlstm.identity(random_images(), seq_len=5)
    model(expanded)
    assert len(calls) == 1
    model(expanded.contiguous())
    assert len(calls) == 1  # contiguous input: the per-step nn.LSTM path
    model(seqlstm.identity(random_images(), seq_len=1))
    assert len(calls) == 1  # one step: nothing to hoist
    model.hoist = False
    model(expanded)
    assert len(calls) == 1  # switched off


# ----------------------------------------------------------------------------------------
# registry and factory


def test_create_model_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="bilstm_fc") as e:
        seqlstm.create_model("no_such_model", in_features=4, num_classes=2)
    assert "no_such_model" in str(e.value)


def test_create_model_bad_kwarg_lists_valid_keys():
    with pytest.raises(ValueError, match="hidden_size") as e:
        seqlstm.create_model("bilstm_fc", in_features=4, num_classes=2, hidden_size=3)
    for key in ("'hidden'", "'layers'", "'fc'", "'dropout'", "'bidirectional'"):
        assert key in str(e.value)


def test_create_model_overrides_win():
    model = seqlstm.create_model(
        "bilstm_fc", in_features=4, num_classes=3, hidden=6, layers=2, bidirectional=False
    )
    assert model.hidden == 6 and model.dirs == 1 and model.upper.num_layers == 1
    assert model.head[-1].out_features == 3


@pytest.mark.parametrize("kw", [dict(layers=0), dict(hidden=0), dict(fc=0)])
def test_bilstm_fc_rejects_non_positive_sizes(kw):
    with pytest.raises(ValueError, match=">= 1"):
        seqlstm.create_model("bilstm_fc", in_features=4, num_classes=2, **kw)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_count_params_counts_only_trainable(layers, bidirectional):
    f, h, fc, k = 12, 8, 10, 5
    model = seqlstm.BiLSTMFC(
        in_features=f, num_classes=k, hidden=h, layers=layers, fc=fc, bidirectional=bidirectional
    )
    d = 2 if bidirectional else 1
    lstm_layer = lambda n_in: (
        d * (4 * h * n_in + 4 * h * h + 8 * h)
    )  # W_ih, W_hh, b_ih, b_hh per direction
    expected = (
        d * 4 * h * f
        + d * 4 * h  # in_proj
        + d * (4 * h * h + 4 * h)  # recur: W_hh, b_hh (W_ih = I and b_ih = 0 are frozen)
        + (lstm_layer(d * h) if layers == 2 else 0)
        + d * h * fc
        + fc
        + fc * k
        + k
    )  # head
    assert seqlstm.count_params(model) == expected
    frozen = d * (4 * h * 4 * h + 4 * h)
    assert sum(p.numel() for p in model.parameters()) == expected + frozen


# ----------------------------------------------------------------------------------------
# distillation loss


def logits(seed, b=6, k=K):
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed)) * 3


def test_distillation_alpha_0_is_cross_entropy():
    s, t, y = logits(0), logits(1), torch.arange(6) % K
    for temperature in (1.0, 4.0):
        loss = seqlstm.distillation_loss(s, t, y, alpha=0.0, temperature=temperature)
        torch.testing.assert_close(loss, F.cross_entropy(s, y))


def test_distillation_alpha_1_is_zero_when_student_matches_teacher():
    s, y = logits(0), torch.arange(6) % K
    assert seqlstm.distillation_loss(s, s.clone(), y, alpha=1.0, temperature=4.0).abs() < 1e-6
    assert seqlstm.distillation_loss(s, logits(1), y, alpha=1.0, temperature=4.0) > 1e-2


def test_distillation_mixes_cross_entropy_and_scaled_kl():
    s, t, y, T, a = logits(0), logits(1), torch.arange(6) % K, 3.0, 0.3
    p_t = F.softmax(t / T, -1)
    kl = (
        (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    )  # KL(teacher || student), per sample
    expected = (1 - a) * F.cross_entropy(s, y) + a * T**2 * kl
    torch.testing.assert_close(seqlstm.distillation_loss(s, t, y, alpha=a, temperature=T), expected)


def test_hard_distillation_is_cross_entropy_against_the_teachers_argmax():
    s, t, y, a = logits(0), logits(1), torch.arange(6) % K, 0.3
    expected = (1 - a) * F.cross_entropy(s, y) + a * F.cross_entropy(s, t.argmax(1))
    for temperature in (1.0, 8.0):  # no part in the hard variant
        loss = seqlstm.distillation_loss(s, t, y, alpha=a, temperature=temperature, hard=True)
        torch.testing.assert_close(loss, expected)
    assert not torch.allclose(
        expected, seqlstm.distillation_loss(s, t, y, alpha=a, temperature=1.0)
    )


def test_distillation_gradient_flows_to_student_only():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, K), torch.nn.Linear(4, K)
    x, y, T = torch.randn(6, 4), torch.arange(6) % K, 2.0
    with torch.no_grad():  # the documented contract: the teacher's logits come from a no_grad pass
        t = teacher(x)
    s = student(x)
    s.retain_grad()
    seqlstm.distillation_loss(s, t, y, alpha=1.0, temperature=T).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # d/ds of T^2 * KL(p_t || softmax(s / T)), batch mean: T * (softmax(s / T) - p_t) / B
    expected = T * (F.softmax(s.detach() / T, -1) - F.softmax(t / T, -1)) / len(y)
    torch.testing.assert_close(s.grad, expected)


def test_distillation_never_trains_the_teacher_even_without_no_grad():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, K), torch.nn.Linear(4, K)
    x, y = torch.randn(6, 4), torch.arange(6) % K
    seqlstm.distillation_loss(student(x), teacher(x), y, alpha=0.5, temperature=4.0).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_eval_batch_shrinks_for_long_sequences():
    assert runner.eval_batch_size(20) == 1024  # the test task keeps large batches
    assert runner.eval_batch_size(784) == 167 and runner.eval_batch_size(1024) == 128
    assert runner.eval_batch_size(10**6) == 16
