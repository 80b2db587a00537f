"""Datasets: splits, statistics, ImageFolder copies, the decode cache, and errors that say what to do."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import seqlstm

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def as_multiset(x, y):
    """Each (image, label) pair as bytes: equal multisets mean the same samples, duplicates included."""
    return Counter((img.numpy().tobytes(), int(label)) for img, label in zip(x, y))


def check_dtypes(data):
    for split in ("train", "val", "test"):
        assert getattr(data, f"{split}_x").dtype == torch.uint8, split
        assert getattr(data, f"{split}_y").dtype == torch.int64, split


def train_stats(x):
    x = x.float() / 255
    return x.mean((0, 2, 3)), x.transpose(0, 1).flatten(1).std(1).clamp_min(1e-3)


# ----------------------------------------------------------------------------------------
# scikit-learn digits (bundled, no files)

@pytest.fixture(scope="module")
def digits():
    return seqlstm.load_dataset("digits", val_fraction=0.1, seed=0)


def test_digits_shapes_dtypes_and_splits(digits):
    check_dtypes(digits)
    n_train = 1797 - 360  # the fixed stratified 80/20 split
    assert digits.counts() == {"train": n_train - round(0.1 * n_train), "val": round(0.1 * n_train), "test": 360}
    for split in ("train", "val", "test"):
        x, y = getattr(digits, f"{split}_x"), getattr(digits, f"{split}_y")
        assert x.shape == (len(y), 1, 8, 8)
        assert 0 <= y.min() and y.max() <= 9
    assert set(digits.train_y.tolist()) == set(range(10))
    assert digits.image_shape == (1, 8, 8)
    assert digits.classes == [str(i) for i in range(10)]
    assert digits.train_x.max() == 255 and digits.train_x.min() == 0  # 0..16 scaled to the full uint8 range
    assert "digits" in digits.source


def test_digits_val_split_is_seeded_and_train_val_partition_the_train_split(digits):
    again = seqlstm.load_dataset("digits", val_fraction=0.1, seed=0)
    assert torch.equal(again.val_x, digits.val_x) and torch.equal(again.val_y, digits.val_y)
    assert torch.equal(again.train_x, digits.train_x)
    other = seqlstm.load_dataset("digits", val_fraction=0.1, seed=1)
    assert not torch.equal(other.val_x, digits.val_x)
    assert torch.equal(other.test_x, digits.test_x)  # the test split never moves

    full = seqlstm.load_dataset("digits", val_fraction=0.0)
    assert len(full.val_y) == 0
    assert len(full.train_y) == len(digits.train_y) + len(digits.val_y)
    # train + val are exactly the official train split: no sample twice, none lost
    together = as_multiset(digits.train_x, digits.train_y) + as_multiset(digits.val_x, digits.val_y)
    assert together == as_multiset(full.train_x, full.train_y)
    for seed in (0, 1):
        d = digits if seed == 0 else other
        assert as_multiset(d.train_x, d.train_y) + as_multiset(d.val_x, d.val_y) == together


def test_digits_limit_train_truncates_and_stats_come_from_train(digits):
    small = seqlstm.load_dataset("digits", val_fraction=0.1, seed=0, limit_train=100)
    assert small.counts() == {**digits.counts(), "train": 100}
    assert torch.equal(small.train_x, digits.train_x[:100])
    assert torch.equal(small.val_x, digits.val_x)
    for data in (digits, small):
        mean, std = train_stats(data.train_x)
        assert data.mean.shape == data.std.shape == (1,)
        torch.testing.assert_close(data.mean, mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(data.std, std, atol=1e-5, rtol=0)
    assert not torch.allclose(small.mean, digits.mean, atol=1e-4, rtol=0)  # really from the (limited) train split
    everything = torch.cat([digits.train_x, digits.val_x, digits.test_x])
    assert not torch.allclose(digits.mean, train_stats(everything)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0])
def test_bad_val_fraction_raises(val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        seqlstm.load_dataset("digits", val_fraction=val_fraction)


# ----------------------------------------------------------------------------------------
# ImageFolder copies written here with PIL

CLASSES = ["cat", "ant", "bee"]  # written unsorted: labels follow the sorted folder names


def write_folder(root, *, n_train=4, n_test=2, size=6, test_name="test", classes=CLASSES, test_classes=None):
    """root/{train,test_name}/<class>/NN.png with known pixels; returns {split: (x, y)} in ImageFolder order."""
    rng = np.random.default_rng(0)
    expected = {}
    for split, n, names in (("train", n_train, classes), (test_name, n_test, test_classes or classes)):
        xs, ys = [], []
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / name / f"{i:02d}.png")
                xs.append(torch.from_numpy(pixels).permute(2, 0, 1))
                ys.append(sorted(names).index(name))
        order = sorted(range(len(ys)), key=lambda j: ys[j])  # ImageFolder: by class, then by file name
        expected["test" if split == test_name else split] = (torch.stack([xs[j] for j in order]),
                                                             torch.tensor([ys[j] for j in order]))
    return expected


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("SEQLSTM_CACHE", str(path))
    return path


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "tiny"


def load(folder, tmp_path, **kw):
    return seqlstm.load_dataset(str(folder), data_dir=tmp_path / "data", **kw)


def test_image_folder_classes_labels_and_exact_pixels(folder, tmp_path, cache_dir):
    expected = write_folder(folder)
    data = load(folder, tmp_path, val_fraction=0.25)
    check_dtypes(data)
    assert data.classes == ["ant", "bee", "cat"]
    assert data.counts() == {"train": 9, "val": 3, "test": 6}
    assert data.image_shape == (3, 6, 6)
    test_x, test_y = expected["test"]
    assert torch.equal(data.test_x, test_x) and torch.equal(data.test_y, test_y)  # PNG is lossless
    assert test_y.tolist() == [0, 0, 1, 1, 2, 2]
    train_x, train_y = expected["train"]
    assert as_multiset(data.train_x, data.train_y) + as_multiset(data.val_x, data.val_y) == \
        as_multiset(train_x, train_y)
    assert "ImageFolder" in data.source and str(folder.resolve()) in data.source


def test_image_folder_second_load_reads_the_cache(folder, tmp_path, cache_dir, monkeypatch):
    write_folder(folder)
    first = load(folder, tmp_path)
    assert len(list(cache_dir.glob("*.pt"))) == 1

    def no_decoding(*args, **kw):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(seqlstm, "_decode_folder", no_decoding)
    second = load(folder, tmp_path)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(first, f"{split}_x"), getattr(second, f"{split}_x"))
        assert torch.equal(getattr(first, f"{split}_y"), getattr(second, f"{split}_y"))
    assert second.classes == first.classes and second.source == first.source
    with pytest.raises(AssertionError, match="decoded again"):  # another image_size is another cache entry
        load(folder, tmp_path, image_size=4)


def test_image_folder_cache_notices_added_files(folder, tmp_path, cache_dir):
    write_folder(folder)
    before = load(folder, tmp_path, val_fraction=0.25)
    extra = folder / "train" / "ant" / "zz_extra.png"
    Image.fromarray(np.full((6, 6, 3), 7, dtype=np.uint8)).save(extra)
    after = load(folder, tmp_path, val_fraction=0.25)
    assert sum(after.counts().values()) == sum(before.counts().values()) + 1
    assert len(list(cache_dir.glob("*.pt"))) == 2  # a new entry, the old one untouched


def test_image_folder_with_val_instead_of_test(folder, tmp_path, cache_dir):
    expected = write_folder(folder, test_name="val", n_test=3)
    data = load(folder, tmp_path)
    assert data.classes == ["ant", "bee", "cat"]
    assert torch.equal(data.test_x, expected["test"][0]) and torch.equal(data.test_y, expected["test"][1])


def test_image_folder_different_class_sets_raise(folder, tmp_path, cache_dir):
    write_folder(folder, test_classes=["ant", "bee", "dog"])
    with pytest.raises(ValueError, match="different class") as e:
        load(folder, tmp_path)
    assert "cat" in str(e.value) and "dog" in str(e.value)
    assert "ant" not in str(e.value)


def test_image_folder_empty_class_raises(folder, tmp_path, cache_dir):
    write_folder(folder)
    (folder / "train" / "dog").mkdir()
    (folder / "test" / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match="dog"):
        load(folder, tmp_path)


def test_image_folder_corrupt_image_raises_naming_the_file(folder, tmp_path, cache_dir):
    write_folder(folder)
    bad = folder / "train" / "bee" / "99.png"
    bad.write_bytes(b"this is not a png file")
    with pytest.raises(ValueError, match="decode") as e:
        load(folder, tmp_path)
    assert str(bad) in str(e.value)


def test_image_folder_mixed_sizes_raise_unless_image_size(folder, tmp_path, cache_dir):
    write_folder(folder)
    Image.fromarray(np.zeros((7, 5, 3), np.uint8), "RGB").save(folder / "test" / "cat" / "99.png")
    with pytest.raises(ValueError, match="image_size") as e:
        load(folder, tmp_path)
    assert "99.png" in str(e.value)
    data = load(folder, tmp_path, image_size=4)
    assert data.image_shape == (3, 4, 4)
    assert data.test_x.shape == (7, 3, 4, 4) and data.val_x.shape[1:] == (3, 4, 4)


# ----------------------------------------------------------------------------------------
# names and missing data

def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="no-such-dataset") as e:
        seqlstm.load_dataset("no-such-dataset", data_dir=tmp_path)
    for name in ("'cifar10'", "'mnist'", "'digits'"):
        assert name in str(e.value)
    assert seqlstm.list_datasets() == ["cifar10", "digits", "mnist"]


@pytest.mark.parametrize("name, layouts", [("mnist", ["MNIST/raw"]),
                                           ("cifar10", ["cifar-10-batches-py", "cifar10-jpeg"])])
def test_missing_dataset_offline_says_where_to_put_it(name, layouts, tmp_path):
    with pytest.raises(seqlstm.DatasetNotFound) as e:
        seqlstm.load_dataset(name, data_dir=tmp_path, download=False)
    assert isinstance(e.value, FileNotFoundError)
    message = str(e.value)
    assert f"'{name}'" in message
    assert str(tmp_path.resolve()) in message
    for layout in layouts:
        assert layout in message
    assert "http" in message
    assert not (tmp_path / ".cache").exists() or not any((tmp_path / ".cache").iterdir())  # nothing cached


# ----------------------------------------------------------------------------------------
# the shared copies (skipped where they are not unpacked)

@pytest.mark.needs_data("MNIST/raw")
def test_mnist_shared_copy(data_dir):
    data = seqlstm.load_dataset("mnist", data_dir=data_dir, val_fraction=0.1)
    check_dtypes(data)
    assert data.counts() == {"train": 54000, "val": 6000, "test": 10000}
    assert data.image_shape == (1, 28, 28)
    assert len(data.classes) == 10
    assert torch.equal(torch.unique(data.test_y), torch.arange(10))
    assert "MNIST" in data.source


@pytest.mark.slow
@pytest.mark.needs_data("cifar-10-batches-py", "cifar10-jpeg")
def test_cifar10_shared_copy(data_dir):
    data = seqlstm.load_dataset("cifar10", data_dir=data_dir, val_fraction=0.1)
    check_dtypes(data)
    assert data.counts() == {"train": 45000, "val": 5000, "test": 10000}
    assert data.image_shape == (3, 32, 32)
    assert data.classes == CIFAR10_CLASSES
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    if (data_dir / "cifar-10-batches-py").is_dir():
        assert "original" in data.source
    else:
        assert "JPEG" in data.source
