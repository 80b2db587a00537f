"""The model zoo: every registered model builds at its default input, trains and says what it reads;
the registry's errors; and what makes each architecture itself (Lipschitz RNN's matrices, FNet's
mixing, the Nystrom approximation, TrellisNet's causality, the timm classes)."""

import pytest
import timm.models.sequencer
import timm.models.vision_transformer
import torch
import torch.nn.functional as F

import seqlstm

K = 5
ALL = seqlstm.list_models()
BY_FORM = {
    form: [n for n in ALL if seqlstm.MODEL_INFO[n]["input_form"] == form]
    for form in ("sequence", "pixels", "image")
}
ISSUE_5 = {
    "rnn",
    "gru",
    "lstm",
    "lstm_rows_mnist",
    "lstm_pixels_mnist",
    "sequencer2d_s",
    "sequencer2d_m",
    "vanilla_sequencer",
    "vit_small_seq",
    "trellisnet",
    "lipschitz_rnn",
    "pit",
    "nystromformer",
    "fnet",
    "cnn_teacher",
    "bilstm_fc",
}


def build(name, *, tiny=True, batch=4, seed=0, **overrides):
    """Model `name` and a batch of its default (tiny: test) input."""
    x, n_feat, args = seqlstm.model_input(name, batch, tiny=tiny, seed=seed)
    torch.manual_seed(seed)
    return seqlstm.create_model(name, in_features=n_feat, num_classes=K, **{**args, **overrides}), x


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------
# every model


def test_registry_holds_every_architecture():
    assert ISSUE_5 <= set(ALL)
    assert set(seqlstm.MODEL_INFO) == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_model_info_says_what_each_model_reads(name):
    info = seqlstm.MODEL_INFO[name]
    assert (
        info["input_form"] in ("sequence", "pixels", "image") and info["sequence"] and info["paper"]
    )
    for key in ("input", "test_input"):
        assert info[key]["transform"] in seqlstm.list_sequences()
        assert len(info[key]["image"]) == 3
    model, x = build(name)
    assert model.input_form == info["input_form"]
    expected = {"sequence": None, "pixels": "pixels", "image": "rows"}[info["input_form"]]
    assert expected is None or info["input"]["transform"] == expected


@pytest.mark.parametrize("name", ALL)
def test_forward_and_backward_at_the_default_input(name):
    model, x = build(name, tiny=False, batch=2)
    out = model(x)
    assert out.shape == (2, K)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    for n, p in trainable(model).items():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{n} has non-finite gradients"
    assert any(p.grad.abs().sum() > 0 for p in trainable(model).values())


FIT_LR = {
    "trellisnet": 1e-2,  # its gated levels learn slowly at 3e-3 (its authors: 4e-3, weight norm)
    "s4d": 1e-2,
}  # its authors' lr; at 3e-3 the loss fell only to 0.9x its start in 40 steps


@pytest.mark.parametrize("name", ALL)
def test_loss_falls_on_a_small_fixed_batch(name):
    """32 tiny images of 4 classes (a noisy prototype per class) as the model's test sequence:
    40 Adam steps must take the loss well below its start."""
    spec = seqlstm.MODEL_INFO[name]["test_input"]
    g = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 4
    images = torch.randn(4, *spec["image"], generator=g)[y] + 0.5 * torch.randn(
        32, *spec["image"], generator=g
    )
    x = seqlstm.make_sequence(spec["transform"], **spec["transform_args"])(images)
    torch.manual_seed(0)
    model = seqlstm.create_model(name, in_features=x.shape[-1], num_classes=4, **spec["model_args"])
    opt = torch.optim.Adam(model.parameters(), lr=FIT_LR.get(name, 3e-3))
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::5]


# ----------------------------------------------------------------------------------------
# the registry: names, keys and values


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="sequencer2d_s") as e:
        seqlstm.create_model("sequencer3d", in_features=4, num_classes=2)
    assert "sequencer3d" in str(e.value) and "nystromformer" in str(e.value)


@pytest.mark.parametrize("name", ALL)
def test_bad_model_arg_lists_valid_keys(name):
    x, n_feat, args = seqlstm.model_input(name, 1, tiny=True)
    with pytest.raises(ValueError, match="no_such_option") as e:
        seqlstm.create_model(name, in_features=n_feat, num_classes=2, no_such_option=1, **args)
    for key in seqlstm.model_options(name):
        assert f"'{key}'" in str(e.value)


@pytest.mark.parametrize(
    "name, kw, valid",
    [
        ("lstm", dict(readout="max"), ["'last'", "'mean'"]),
        ("rnn", dict(cell="transformer"), ["'rnn'", "'gru'", "'lstm'"]),
        ("sequencer2d_s", dict(token_mixer="attention"), ["'lstm2d'", "'lstm1d'"]),
        ("vit_small_seq", dict(patch_size=5), ["[1, 2, 4, 8, 16, 32]"]),
        ("vit_small_seq", dict(readout="max"), ["'cls'", "'mean'"]),
        ("pit", dict(readout="max"), ["'cls'", "'mean'"]),
        ("fnet", dict(readout="cls"), ["'mean'", "'first'"]),
    ],
)
def test_bad_model_value_lists_valid_values(name, kw, valid):
    n_feat = {"image": 96, "pixels": 1, "sequence": 96}[seqlstm.MODEL_INFO[name]["input_form"]]
    with pytest.raises(ValueError) as e:
        seqlstm.create_model(name, in_features=n_feat, num_classes=2, **kw)
    for v in valid:
        assert v in str(e.value)


@pytest.mark.parametrize(
    "kw", [dict(hidden=0), dict(layers=0), dict(layers=(2, 2)), dict(dims=(48, 0, 96, 96))]
)
def test_bad_sizes_raise_value_error(kw):
    name = "lstm" if "hidden" in kw else "sequencer2d_s"
    with pytest.raises(ValueError):
        seqlstm.create_model(name, in_features=96, num_classes=2, **kw)


def test_image_models_check_channels_against_in_features():
    with pytest.raises(ValueError, match="channels"):
        seqlstm.create_model(
            "vit_small_seq", in_features=28, num_classes=10
        )  # MNIST rows, channels left at 3
    model = seqlstm.create_model("vit_small_seq", in_features=28, num_classes=10, channels=1)
    assert model.image_size == 28 and model.patch_size == 7


def test_pixel_models_refuse_sequences_longer_than_their_positions():
    model = seqlstm.create_model("pit", in_features=1, num_classes=2, seq_len=16)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.randn(1, 17, 1))


def test_overrides_win_over_the_variant_config():
    model = seqlstm.create_model(
        "lstm_rows_mnist", in_features=28, num_classes=10, hidden=16, bidirectional=True
    )
    assert model.rnn.hidden_size == 16 and model.rnn.num_layers == 3 and model.rnn.bidirectional
    deep = seqlstm.create_model("sequencer2d_m", in_features=96, num_classes=10, layers=1)
    assert [len(stage.blocks) for stage in deep.stages] == [1, 1, 1, 1]
    assert seqlstm.MODEL_INFO["sequencer2d_m"]["defaults"]["layers"] == (
        2,
        2,
        7,
        2,
    )  # the registry is untouched
    default = seqlstm.create_model("sequencer2d_m", in_features=96, num_classes=10)
    assert [len(stage.blocks) for stage in default.stages] == [2, 2, 7, 2]


def test_recurrent_presets():
    for name, (T, n_feat) in [("lstm_rows_mnist", (28, 28)), ("lstm_pixels_mnist", (784, 1))]:
        x, f, _ = seqlstm.model_input(name, 1)
        assert x.shape[1:] == (T, n_feat)
        model = seqlstm.create_model(name, in_features=f, num_classes=10)
        assert isinstance(model.rnn, torch.nn.LSTM)
        assert (model.rnn.num_layers, model.rnn.hidden_size, model.rnn.bidirectional) == (
            3,
            128,
            False,
        )
    for name, cls in [("rnn", torch.nn.RNN), ("gru", torch.nn.GRU), ("lstm", torch.nn.LSTM)]:
        assert isinstance(seqlstm.create_model(name, in_features=4, num_classes=2).rnn, cls)


@pytest.mark.parametrize("readout", ["last", "mean"])
def test_rnn_readouts(readout):
    torch.manual_seed(0)
    model = seqlstm.create_model(
        "gru", in_features=3, num_classes=2, hidden=6, bidirectional=True, readout=readout
    ).eval()
    x = torch.randn(2, 7, 3)
    out, h_n = model.rnn(x)
    feats = out.mean(1) if readout == "mean" else torch.cat([out[:, -1, :6], out[:, 0, 6:]], 1)
    torch.testing.assert_close(model(x), model.head(feats))


# ----------------------------------------------------------------------------------------
# image models: timm's classes, one input convention


def test_timm_models_are_timm_classes():
    for name in ("sequencer2d_s", "sequencer2d_m", "vanilla_sequencer"):
        model = seqlstm.create_model(name, in_features=96, num_classes=10)
        assert isinstance(model, timm.models.sequencer.Sequencer2d)
    s = seqlstm.create_model("sequencer2d_s", in_features=96, num_classes=10)
    assert all(
        isinstance(b.rnn_tokens, timm.models.sequencer.LSTM2d) for st in s.stages for b in st.blocks
    )
    v = seqlstm.create_model("vanilla_sequencer", in_features=96, num_classes=10)
    assert all(isinstance(b.rnn_tokens, seqlstm.BiLSTM1d) for st in v.stages for b in st.blocks)
    vit = seqlstm.create_model("vit_small_seq", in_features=96, num_classes=10)
    assert isinstance(vit, timm.models.vision_transformer.VisionTransformer)


def test_pit_is_timm_vit_on_the_folded_pixel_sequence():
    pit = seqlstm.create_model("pit", in_features=1, num_classes=10).eval()
    assert isinstance(pit, timm.models.vision_transformer.VisionTransformer)
    assert pit.patch_embed.patch_size == (1, 1) and pit.pos_embed.shape == (
        1,
        1024,
        64,
    )  # no position for CLS
    assert (
        len(pit.blocks) == 2
        and pit.blocks[0].attn.num_heads == 2
        and pit.blocks[0].mlp.fc1.out_features == 128
    )
    images = torch.randn(2, 1, 32, 32)
    vit_forward = timm.models.vision_transformer.VisionTransformer.forward
    torch.testing.assert_close(
        pit(seqlstm.pixels(images)), vit_forward(pit, images)
    )  # raster order folds back
    assert seqlstm.count_params(pit) == 133_450  # the hand-written encoder's size
    with pytest.raises(ValueError, match="square"):
        pit(torch.randn(1, 1000, 1))


def test_sequencer_token_grids_for_32x32():
    model = seqlstm.create_model("sequencer2d_s", in_features=96, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    grids = [f.shape[-2:] for f in model.forward_intermediates(x, intermediates_only=True)]
    assert grids == [(16, 16), (8, 8), (4, 4), (4, 4)]


def test_vit_small_seq_configuration():
    vit = seqlstm.create_model("vit_small_seq", in_features=96, num_classes=10)
    assert vit.patch_embed.patch_size == (4, 4) and vit.pos_embed.shape == (1, 8 * 8 + 1, 64)
    assert len(vit.blocks) == 6 and vit.blocks[0].attn.num_heads == 8
    assert (
        vit.blocks[0].mlp.fc1.out_features == 128
        and vit.cls_token is not None
        and vit.global_pool == "token"
    )


def test_cnn_teacher_is_resnet20():
    model = seqlstm.create_model("cnn_teacher", in_features=96, num_classes=10)
    convs = [
        m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and "shortcut" not in n
    ]
    assert len(convs) + 1 == 20  # 6n + 2 with n = 3: the convs and the linear head
    assert 0.26e6 < seqlstm.count_params(model) < 0.29e6


@pytest.mark.parametrize("name", BY_FORM["image"])
def test_image_models_read_images_or_their_rows(name):
    model, _ = build(name)
    model.eval()
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(images), model(seqlstm.rows(images)))
    assert model(torch.randn(2, 3, 7, 10)).shape == (
        2,
        K,
    )  # other sizes: padded to the model's stride


# ----------------------------------------------------------------------------------------
# Long Range Arena pixel models


@pytest.mark.parametrize("name", BY_FORM["pixels"])
def test_pixel_values_are_projected_not_quantised(name):
    """A linear projection of the normalised values: a change far below one grey level (1/255 of
    the range, about 0.016 in normalised units) still changes the output; values beyond 0..255
    are fine."""
    model, x = build(name)
    model.eval()
    assert (model(x) - model(x + 1e-3)).abs().max() > 1e-7
    assert torch.isfinite(model(x * 300)).all()


def test_lipschitz_rnn_matrices_split_into_symmetric_and_skew_parts():
    beta, gamma_a, gamma_w = 0.7, 0.05, 0.02
    model = seqlstm.create_model(
        "lipschitz_rnn",
        in_features=1,
        num_classes=2,
        hidden=6,
        beta=beta,
        gamma_a=gamma_a,
        gamma_w=gamma_w,
    )
    eye = torch.eye(6)
    for mat, M, gamma in [(model.A(), model.M_A[0], gamma_a), (model.W(), model.M_W[0], gamma_w)]:
        torch.testing.assert_close(mat + mat.T, (1 - beta) * 2 * (M + M.T) - 2 * gamma * eye)
        torch.testing.assert_close(mat - mat.T, beta * 2 * (M - M.T))
    # beta = 1: A is skew-symmetric minus gamma I, so its eigenvalues have real part -gamma
    skew = seqlstm.create_model(
        "lipschitz_rnn", in_features=1, num_classes=2, hidden=6, beta=1.0, gamma_a=0.1
    )
    torch.testing.assert_close(
        torch.linalg.eigvals(skew.A()).real, torch.full((6,), -0.1), atol=1e-5, rtol=0
    )


def test_lipschitz_rnn_is_the_euler_step():
    model = seqlstm.create_model("lipschitz_rnn", in_features=2, num_classes=3, hidden=5, eps=0.1)
    x = torch.randn(4, 3, 2)
    h = torch.zeros(4, 5)
    A, W = model.A(), model.W()
    for t in range(3):
        h = h + 0.1 * (h @ A.T + torch.tanh(h @ W.T + model.U[0](x[:, t])))
    torch.testing.assert_close(model(x), model.head(h))


def test_lipschitz_rnn_state_stays_bounded_over_1024_steps_at_initialisation():
    torch.manual_seed(0)
    model = seqlstm.create_model("lipschitz_rnn", in_features=1, num_classes=10)
    assert (
        torch.linalg.eigvals(model.A()).real.max() < 0.5
    )  # init_std 32 gave 1.3: the state exploded
    logits = model(
        torch.randn(8, 1024, 1)
    )  # one normalised grayscale CIFAR image per row, as pixels
    assert logits.abs().max() < 10


def test_fnet_mixing_is_the_real_part_of_the_2d_fft():
    x = torch.randn(3, 10, 8)
    mixed = seqlstm.FourierMixing()(x)
    torch.testing.assert_close(mixed, torch.fft.fft2(x).real)
    dft = lambda n: torch.exp(-2j * torch.pi * torch.outer(torch.arange(n), torch.arange(n)) / n)
    # over both the sequence and the hidden dimension: Re(F_T x F_D)
    torch.testing.assert_close(
        mixed, (dft(10) @ x.to(torch.complex64) @ dft(8)).real, atol=1e-4, rtol=1e-4
    )
    model = seqlstm.create_model("fnet", in_features=1, num_classes=2)
    assert isinstance(model.mixing, seqlstm.FourierMixing) and not any(
        isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()
    )


def test_nystrom_attention_matches_softmax_attention_with_a_landmark_per_step():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    errors = {}
    for iterations in (6, 20):
        torch.manual_seed(1)
        attention = seqlstm.NystromAttention(
            32, heads=2, landmarks=16, pinv_iterations=iterations, conv_kernel=0
        )
        exact = attention(x, exact=True)
        errors[iterations] = ((attention(x) - exact).abs().max() / exact.abs().max()).item()
    assert errors[6] < 0.05  # the paper's 6 iterations: close
    assert errors[20] < 1e-4  # a converged pseudo-inverse: K2 pinv(K2) K2 = K2, the exact attention


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    a = torch.softmax(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)), -1)
    torch.testing.assert_close(
        seqlstm.iterative_pinv(a, 30), torch.linalg.pinv(a), atol=1e-3, rtol=1e-3
    )


def test_nystromformer_pads_to_a_multiple_of_the_landmarks():
    torch.manual_seed(0)
    attention = seqlstm.NystromAttention(16, heads=2, landmarks=4, conv_kernel=0)
    x = torch.randn(2, 10, 16)  # padded to 12: 4 segments of 3
    out = attention(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    model = seqlstm.create_model(
        "nystromformer", in_features=1, num_classes=2, seq_len=50, landmarks=8
    )
    assert model(torch.randn(2, 37, 1)).shape == (2, 2)


def test_trellisnet_is_causal():
    torch.manual_seed(0)
    model = seqlstm.create_model("trellisnet", in_features=1, num_classes=2).eval()
    x = torch.randn(2, 64, 1)
    for t in (0, 20, 50):
        y = x.clone()
        y[:, t + 1 :] += torch.randn_like(y[:, t + 1 :])
        hx, hy = model.features(x), model.features(y)
        torch.testing.assert_close(
            hx[:, : t + 1], hy[:, : t + 1], rtol=0, atol=0
        )  # the past never sees the future
        assert (hx[:, t + 1 :] - hy[:, t + 1 :]).abs().max() > 1e-6


def test_trellisnet_receptive_field_covers_a_1024_pixel_image():
    torch.manual_seed(0)
    model = seqlstm.create_model("trellisnet", in_features=1, num_classes=2).eval()
    x = torch.randn(1, 1024, 1)
    y = x.clone()
    y[:, 0] += 1.0  # the first pixel reaches the last step through the 11 dilated levels
    assert (model(x) - model(y)).abs().max() > 1e-7


def test_trellisnet_shares_one_convolution_across_depth():
    model = seqlstm.create_model("trellisnet", in_features=1, num_classes=2)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert (
        len(convs) == 2
    )  # the input injection and the one shared hidden convolution, for all 11 levels
    assert model.levels == 11


def trellisnet_reference_features(model, x):
    """TrellisNet's levels as written in its paper: the input injection W_x * x and the shared
    W_h * h as two convolutions, added (the model folds them into one convolution of [h; x])."""
    x = x.transpose(1, 2)
    h = x.new_zeros(x.shape[0], model.hidden, x.shape[2])
    c = torch.zeros_like(h)
    for level in range(model.levels):
        d = model.dilations[level % len(model.dilations)]
        z = F.conv1d(F.pad(x, (d, 0)), model.inject.weight, dilation=d) + F.conv1d(
            F.pad(h, (d, 0)), model.conv.weight, model.conv.bias, dilation=d
        )
        i, o, g, f = z.chunk(4, 1)
        c = torch.sigmoid(f) * F.pad(c, (d, 0))[:, :, : x.shape[2]] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return h.transpose(1, 2)


@pytest.mark.parametrize("in_features", [1, 3])
def test_trellisnet_folded_injection_equals_two_convolutions(in_features):
    """Outputs and every gradient (input, W_x, W_h, b) within 1e-5 of the two-convolution form."""
    torch.manual_seed(0)
    model = seqlstm.create_model("trellisnet", in_features=in_features, num_classes=2, layers=7)
    x = torch.randn(3, 80, in_features, requires_grad=True)
    results = []
    for features in (model.features, lambda x: trellisnet_reference_features(model, x)):
        out = features(x)
        results.append((out, torch.autograd.grad(out.square().sum(), [x, *model.parameters()],
                                                 allow_unused=True)))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


def test_lipschitz_rnn_is_initialised_as_the_authors_code():
    """erichson/LipschitzRNN since November 2020: M ~ N(0, (0.1 / hidden)^2), and the input and
    readout layers at PyTorch's defaults: U(1 -> 128) std 1/sqrt(3) = 0.58 with uniform biases
    (Xavier-normal gave 0.125 and zero biases), the readout (128 -> 10) 0.051 (Xavier: 0.12)."""
    torch.manual_seed(0)
    model = seqlstm.create_model("lipschitz_rnn", in_features=1, num_classes=10)
    stds = {
        "M_A": model.M_A[0].std() * 128,
        "M_W": model.M_W[0].std() * 128,
        "U": model.U[0].weight.std(),
        "U bias": model.U[0].bias.std(),
        "readout": model.head.weight.std(),
    }
    uniform = 3**-0.5  # U(-1, 1): fan-in 1
    readout = (3 * 128) ** -0.5  # U(-1/sqrt(128), 1/sqrt(128))
    expected = {"M_A": 0.1, "M_W": 0.1, "U": uniform, "U bias": uniform, "readout": readout}
    for name, std in stds.items():
        assert abs(std / expected[name] - 1) < 0.25, (name, float(std), expected[name])
    assert model.head.bias.abs().max() > 0  # PyTorch's uniform biases, not zeros
