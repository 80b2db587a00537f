"""The image -> sequence transform registry: shapes, exact inverses, orders, series, paths,
errors."""

import pickle

import pytest
import torch

import seqlstm
from seqlab import figures, plan

SERIES = ["rotations", "zooms", "shifts", "blurs", "noise", "jitter"]
L = 6


def images(c, b=3, h=8, w=8, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def expected_shape(name, c, h, w):
    return {
        "identity": (L, c * h * w),
        "rows": (h, w * c),
        "columns": (w, h * c),
        "pixels": (h * w, c),
        "patches": ((h // 4) * (w // 4), 16 * c),
        "five_crop": (5, c * 6 * 6),
        "ten_crop": (10, c * 6 * 6),
        **{s: (L, c * h * w) for s in SERIES},
    }[name]


def args_for(name):
    return {"patches": {"patch": 4}, "five_crop": {"crop": 6}, "ten_crop": {"crop": 6}}.get(
        name, {}
    )


def test_registry_holds_the_issue_list():
    assert set(seqlstm.list_sequences()) >= {
        "identity",
        "rows",
        "columns",
        "pixels",
        "patches",
        "five_crop",
        "ten_crop",
        *SERIES,
    }


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", seqlstm.list_sequences())
def test_shapes_on_one_and_three_channel_images(name, c):
    x = images(c, h=8, w=12)
    out = seqlstm.make_sequence(name, seq_len=L, **args_for(name))(x)
    assert out.shape == (3, *expected_shape(name, c, 8, 12))
    assert seqlstm.sequence_shape(name, (c, 8, 12), seq_len=L, **args_for(name)) == expected_shape(
        name, c, 8, 12
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", seqlstm.list_sequences())
def test_per_sample_path_equals_batched_path(name):
    x = images(3)
    batched = seqlstm.make_sequence(name, seq_len=L, **args_for(name))(x)
    one = seqlstm.sequence_transform(name, seq_len=L, **args_for(name))
    for i in range(len(x)):
        torch.testing.assert_close(one(x[i]), batched[i], atol=1e-5, rtol=0)


def test_rows_columns_pixels_and_patches_reshape_back_to_the_image():
    x = images(3, h=8, w=12)
    B, C, H, W = x.shape
    assert torch.equal(seqlstm.rows(x).reshape(B, H, W, C).permute(0, 3, 1, 2), x)
    assert torch.equal(seqlstm.columns(x).reshape(B, W, H, C).permute(0, 3, 2, 1), x)
    assert torch.equal(seqlstm.pixels(x).reshape(B, H, W, C).permute(0, 3, 1, 2), x)
    p = 4
    back = seqlstm.patches(x, patch=p).reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
    assert torch.equal(back.reshape(B, C, H, W), x)


def test_a_pixel_step_holds_the_channels_of_one_pixel():
    x = images(3, h=4, w=4)
    assert torch.equal(seqlstm.pixels(x)[:, 4 * 2 + 1], x[:, :, 2, 1])  # row 2, column 1


def test_snake_order_reverses_every_other_row():
    x = images(1, h=3, w=4)
    snake = seqlstm.pixels(x, order="snake")[0, :, 0].view(3, 4)
    img = x[0, 0]
    assert (
        torch.equal(snake[0], img[0])
        and torch.equal(snake[1], img[1].flip(0))
        and torch.equal(snake[2], img[2])
    )


def test_permuted_order_is_one_fixed_permutation_per_seed():
    a, b = (
        seqlstm.pixel_order(8, 8, "permuted", seed=1),
        seqlstm.pixel_order(8, 8, "permuted", seed=1),
    )
    c = seqlstm.pixel_order(8, 8, "permuted", seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(64)) and not torch.equal(a, torch.arange(64))
    x = images(2)
    seq = seqlstm.make_sequence("pixels", order="permuted", seed=1)
    assert torch.equal(seq(x), seq(x))
    assert torch.equal(seq(x), seqlstm.pixels(x)[:, a])


@pytest.mark.parametrize("name", SERIES)
def test_deterministic_series_are_deterministic_and_start_untouched(name):
    x = images(3)
    seq = seqlstm.make_sequence(name, seq_len=L)
    a, b = seq(x), seq(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(
        a[:, 0], x.flatten(1), atol=1e-5, rtol=0
    )  # step 0 is the image itself
    assert (a[:, 1:] - x.flatten(1)[:, None]).abs().amax() > 1e-2  # the other steps are changed
    later = seqlstm.make_sequence(name, seq_len=L, include_original=False)(x)
    assert (later[:, 0] - x.flatten(1)).abs().amax() > 1e-3


@pytest.mark.parametrize("name", SERIES)
def test_random_series_differ_between_calls_and_images(name):
    x = images(1, b=1).expand(2, 1, 8, 8)  # two copies of one image
    seq = seqlstm.make_sequence(name, seq_len=L, random=True)
    torch.manual_seed(0)
    a = seq(x)
    assert not torch.allclose(a, seq(x))  # a new draw on every call
    assert not torch.allclose(a[0, 1:], a[1, 1:])  # and for every image
    torch.testing.assert_close(a[:, 0], x.flatten(1), atol=1e-5, rtol=0)


def test_series_sweeps_grow_in_the_right_direction():
    x = images(1, b=2, h=16, w=16)
    blurred = seqlstm.blurs(x, seq_len=5).view(2, 5, 16, 16)
    roughness = [(v[:, :, 1:] - v[:, :, :-1]).abs().mean().item() for v in blurred.unbind(1)]
    assert roughness == sorted(roughness, reverse=True)  # more blur, smoother images
    noisy = seqlstm.noise(x, seq_len=5) - x.flatten(1)[:, None]
    spread = noisy.std(-1).mean(0).tolist()
    assert spread == sorted(spread) and spread[-1] == pytest.approx(
        0.5, rel=0.15
    )  # up to max_sigma
    angles = seqlstm._sweep(
        1, 5, 30.0, include_original=True, random=False, symmetric=True, device="cpu"
    )
    assert angles.tolist() == [[0.0, -30.0, -10.0, 10.0, 30.0]]


def test_rotation_by_90_degrees_turns_the_image():
    x = images(1, b=1, h=6, w=6)
    turned = seqlstm._warp(x, seqlstm._affine(angle=torch.tensor([[90.0]]))).view(6, 6)
    assert torch.allclose(turned, x[0, 0].rot90(1), atol=1e-4) or torch.allclose(
        turned, x[0, 0].rot90(-1), atol=1e-4
    )


def test_crops_are_torchvision_five_and_ten_crop():
    from torchvision.transforms.v2 import functional as TF

    x = images(3)
    five = seqlstm.five_crop(x, crop=5)
    for i, view in enumerate(TF.five_crop(x, 5)):
        assert torch.equal(five[:, i], view.flatten(1))
    assert seqlstm.ten_crop(x, crop=5, size=8).shape == (
        3,
        10,
        3 * 8 * 8,
    )  # resized to a common size
    assert torch.equal(
        seqlstm.ten_crop(x, crop=5)[:, 5], TF.ten_crop(x, 5)[5].flatten(1)
    )  # the mirrored half


def test_only_identity_is_a_stride_zero_view():
    x = images(3)
    assert seqlstm.identity(x, seq_len=4).stride(1) == 0  # the model hoists its input projection
    assert all(seqlstm.make_sequence(n, seq_len=4)(x).stride(1) != 0 for n in SERIES)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: seqlstm.make_sequence("patches", patch=3)(images(3)),
            r"valid patch sizes are \[1, 2, 4, 8\]",
        ),
        (
            lambda: seqlstm.make_sequence("five_crop", crop=9)(images(3)),
            r"valid crop sizes are 1..8",
        ),
        (lambda: seqlstm.make_sequence("ten_crop", crop=0)(images(3)), r"valid crop sizes"),
        (
            lambda: seqlstm.make_sequence("pixels", order="spiral"),
            r"\['raster', 'snake', 'permuted'\]",
        ),
        (lambda: seqlstm.make_sequence("rotations", seq_len=0), r"seq_len must be an integer >= 1"),
        (lambda: seqlstm.make_sequence("identity", seq_len=-3), r"seq_len"),
        (lambda: seqlstm.make_sequence("spiral"), r"valid names are \[.*'rotations'.*\]"),
        (
            lambda: seqlstm.make_sequence("rotations", seq_len=3, angle=5),
            r"valid arguments are \[.*'max_angle'",
        ),
    ],
)
def test_bad_input_names_the_valid_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_fixed_length_transforms_ignore_seq_len_and_run_once():
    x = images(3)
    assert seqlstm.make_sequence("rows", seq_len=20)(x).shape[1] == 8
    runs = plan.plan_runs(["digits"], ["identity", "rows", "zooms"], [5, 10], ["lstm"])
    assert runs == [
        ("digits", "lstm", "identity", 5),
        ("digits", "lstm", "identity", 10),
        ("digits", "lstm", "rows", None),
        ("digits", "lstm", "zooms", 5),
        ("digits", "lstm", "zooms", 10),
    ]


def test_transforms_pickle_for_dataloader_workers():
    seq = pickle.loads(pickle.dumps(seqlstm.sequence_transform("rotations", seq_len=3)))
    assert seq(images(3)[0]).shape == (3, 3 * 64)


@pytest.mark.parametrize(
    "name, panels", [("identity", 4), ("rows", 1), ("pixels", 1), ("patches", 4), ("five_crop", 4)]
)
def test_plot_sequence_draws_what_the_model_sees(name, panels):
    x = images(3, b=1)
    seq = seqlstm.make_sequence(name, seq_len=4, **args_for(name))(x)[0]
    fig = figures.plot_sequence(seq, (3, 8, 8), torch.zeros(3), torch.ones(3), name, max_steps=4)
    assert len(fig.axes) == panels
    assert f"T={seq.shape[0]}" in fig._suptitle.get_text()
