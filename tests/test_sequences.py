"""Sequence transforms, batched augmentation and the in-memory batch loader."""

import pytest
import torch
import torch.nn.functional as F

import seqlstm


def images(b=4, c=3, h=5, w=6, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def uint8_images(b=4, c=3, h=5, w=6, seed=0):
    return torch.randint(
        0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


# ----------------------------------------------------------------------------------------
# identity sequence


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("seq_len", [1, 4])
def test_identity_shape_and_every_step_is_the_flattened_image(channels, seq_len):
    x = images(c=channels)
    seq = seqlstm.identity(x, seq_len=seq_len)
    assert seq.shape == (4, seq_len, channels * 5 * 6)  # (B, L, C*H*W)
    for t in range(seq_len):
        assert torch.equal(seq[:, t], x.reshape(4, -1))


def test_identity_is_an_expanded_view_with_time_stride_zero():
    # BiLSTMFC relies on stride(1) == 0 to project each image once instead of once per step
    x = images()
    seq = seqlstm.identity(x, seq_len=7)
    assert seq.stride(1) == 0
    assert seq.data_ptr() == x.data_ptr()  # no copy


@pytest.mark.parametrize("channels", [1, 3])
def test_per_sample_transform_equals_batched_transform(channels):
    x = images(b=5, c=channels)
    per_sample = seqlstm.sequence_transform("identity", seq_len=6)
    batched = seqlstm.make_sequence("identity", seq_len=6)(x)
    for i in range(len(x)):
        out = per_sample(x[i])
        assert out.shape == (6, channels * 5 * 6)
        assert torch.equal(out, batched[i])


def test_per_sample_pipeline_through_dataloader_equals_batched_fast_path():
    x, y = uint8_images(b=10), torch.arange(10)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    seq = seqlstm.sequence_transform("identity", seq_len=3)
    dataset = seqlstm.TensorImages(
        x, y, seqlstm.per_sample_pipeline(mean, std, seq, augment="none")
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)
    xs, ys = zip(*loader)
    slow = torch.cat(xs)
    fast = seqlstm.identity(seqlstm.normalize(x, mean, std), seq_len=3)
    assert slow.shape == fast.shape == (10, 3, 3 * 5 * 6)
    assert slow.dtype == torch.float32
    torch.testing.assert_close(slow, fast.contiguous(), atol=1e-6, rtol=0)
    assert torch.equal(torch.cat(ys), y)


def test_normalize_uses_per_channel_mean_and_std():
    x = uint8_images(c=2)
    mean, std = torch.tensor([0.1, 0.9]), torch.tensor([0.5, 2.0])
    out = seqlstm.normalize(x, mean, std)
    for c in range(2):
        torch.testing.assert_close(out[:, c], (x[:, c].float() / 255 - mean[c]) / std[c])


def test_normalize_leaves_its_input_alone():
    x = torch.rand(2, 3, 4, 4)
    before = x.clone()
    seqlstm.normalize(x, torch.zeros(3), torch.ones(3))
    assert torch.equal(x, before)


@pytest.mark.parametrize("size", [28, 32])
def test_per_sample_crop_keeps_the_image_size(size):
    x = torch.randint(0, 256, (1, size, size), dtype=torch.uint8)
    seq = seqlstm.sequence_transform("identity", seq_len=2)
    out = seqlstm.per_sample_pipeline(
        torch.zeros(1), torch.ones(1), seq, augment="flip_crop", size=size
    )(x)
    assert out.shape == (2, size * size)


def test_per_sample_pipeline_rejects_unknown_augment():
    seq = seqlstm.sequence_transform("identity", seq_len=2)
    with pytest.raises(ValueError, match="flip_crop"):
        seqlstm.per_sample_pipeline(torch.zeros(3), torch.ones(3), seq, augment="rotate")


def test_per_sample_transform_pickles_for_dataloader_workers():
    import pickle

    seq = pickle.loads(pickle.dumps(seqlstm.sequence_transform("identity", seq_len=4)))
    assert seq(torch.ones(3, 2, 2)).shape == (4, 12)


@pytest.mark.parametrize("seq_len", [0, -1, 2.5, True])
def test_bad_seq_len_raises(seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        seqlstm.make_sequence("identity", seq_len=seq_len)
    with pytest.raises(ValueError, match="seq_len"):
        seqlstm.sequence_transform("identity", seq_len=seq_len)


def test_unknown_transform_lists_valid_names():
    with pytest.raises(ValueError, match="identity") as e:
        seqlstm.make_sequence("no_such_transform", seq_len=2)
    assert "no_such_transform" in str(e.value)
    assert "identity" in seqlstm.list_sequences()


# ----------------------------------------------------------------------------------------
# batched augmentation


def test_batch_crop_is_a_translate_of_the_reflect_padded_image():
    x, p = images(b=16, c=2, h=5, w=6), 2
    out = seqlstm.batch_crop(x, padding=p, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    xp = F.pad(x, (p,) * 4, mode="reflect")
    offsets = set()
    for b in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[b], xp[b, :, dy : dy + 5, dx : dx + 6])
        ]
        assert found, f"image {b} is not a crop of its own padded image"
        offsets.update(found)
    assert len(offsets) > 1  # the offsets are random, not always the same


def test_batch_flip_returns_each_image_or_its_mirror():
    x = images(b=32)
    out = seqlstm.batch_flip(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    flipped = []
    for b in range(len(x)):
        same, mirror = torch.equal(out[b], x[b]), torch.equal(out[b], x[b].flip(-1))
        assert same or mirror
        flipped.append(mirror)
    assert 0 < sum(flipped) < len(x)  # both outcomes occur


@pytest.mark.parametrize("augment", ["none", "flip", "crop", "flip_crop"])
def test_augment_batch_keeps_shape_and_is_seeded(augment):
    x = images(b=16, h=8, w=8)
    a = seqlstm.augment_batch(x, augment, torch.Generator().manual_seed(3))
    b = seqlstm.augment_batch(x, augment, torch.Generator().manual_seed(3))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    if augment == "none":
        assert torch.equal(a, x)
    else:
        c = seqlstm.augment_batch(x, augment, torch.Generator().manual_seed(4))
        assert not torch.equal(a, c)


def test_augment_batch_unknown_name_lists_valid_values():
    with pytest.raises(ValueError, match="flip_crop") as e:
        seqlstm.augment_batch(images(), "rotate")
    for name in ("none", "flip", "crop"):
        assert f"'{name}'" in str(e.value)


# ----------------------------------------------------------------------------------------
# Batches


def epoch(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


@pytest.mark.parametrize("n, bs", [(10, 3), (12, 4), (5, 8)])
def test_batches_cover_every_index_once_per_epoch(n, bs):
    x, y = torch.arange(n) * 10, torch.arange(n)
    loader = seqlstm.Batches(x, y, bs, shuffle=True, seed=0)
    assert len(loader) == -(-n // bs)
    for _ in range(2):
        batches = epoch(loader)
        assert len(batches) == len(loader)
        assert all(len(yb) == bs for _, yb in batches[:-1]) and 1 <= len(batches[-1][1]) <= bs
        ys = torch.cat([yb for _, yb in batches])
        assert sorted(ys.tolist()) == list(range(n))
        assert torch.equal(
            torch.cat([xb for xb, _ in batches]), ys * 10
        )  # images stay with their labels


def test_batches_unshuffled_keep_order():
    y = torch.arange(7)
    assert torch.equal(torch.cat([yb for _, yb in seqlstm.Batches(y, y, 3)]), y)


def test_batches_shuffle_differs_per_epoch_and_is_seeded():
    y = torch.arange(50)
    a, b = (
        seqlstm.Batches(y, y, 8, shuffle=True, seed=1),
        seqlstm.Batches(y, y, 8, shuffle=True, seed=1),
    )
    a1, a2 = torch.cat([yb for _, yb in a]), torch.cat([yb for _, yb in a])
    b1, b2 = torch.cat([yb for _, yb in b]), torch.cat([yb for _, yb in b])
    assert not torch.equal(a1, a2)  # a new permutation each epoch
    assert not torch.equal(a1, y)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same seed, same orders
    c1 = torch.cat([yb for _, yb in seqlstm.Batches(y, y, 8, shuffle=True, seed=2)])
    assert not torch.equal(a1, c1)


def test_flip_crop_is_a_translate_or_a_mirrored_translate_in_one_gather():
    import torch.nn.functional as F

    x = torch.randint(
        0, 256, (40, 3, 8, 8), dtype=torch.uint8
    )  # uint8: augmentation runs before normalising
    out = seqlstm.augment_batch(x, "flip_crop", torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    xp = F.pad(x.float(), (1,) * 4, mode="reflect")  # padding = 8 // 8
    kinds = set()
    for b in range(len(x)):
        views = {
            (i, j, m): xp[b, :, i : i + 8, j : j + 8].flip(-1)
            if m
            else xp[b, :, i : i + 8, j : j + 8]
            for i in range(3)
            for j in range(3)
            for m in (0, 1)
        }
        hits = [k for k, v in views.items() if torch.equal(out[b].float(), v)]
        assert hits, f"image {b} is no (mirrored) translate of its padded original"
        kinds.add(hits[0][2])
    assert kinds == {0, 1}  # some images mirrored, some not
