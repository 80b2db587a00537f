"""Datasets: splits, statistics, ImageFolder copies, the decode cache, and errors that say what
to do."""

from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import resize

import seqlstm
from seqlab import figures

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def as_multiset(x, y):
    """Each (image, label) pair as bytes: equal multisets mean the same samples, duplicates
    included."""
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
    assert digits.counts() == {
        "train": n_train - round(0.1 * n_train),
        "val": round(0.1 * n_train),
        "test": 360,
    }
    for split in ("train", "val", "test"):
        x, y = getattr(digits, f"{split}_x"), getattr(digits, f"{split}_y")
        assert x.shape == (len(y), 1, 8, 8)
        assert 0 <= y.min() and y.max() <= 9
    assert set(digits.train_y.tolist()) == set(range(10))
    assert digits.image_shape == (1, 8, 8)
    assert digits.classes == [str(i) for i in range(10)]
    assert (
        digits.train_x.max() == 255 and digits.train_x.min() == 0
    )  # 0..16 scaled to the full uint8 range
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
    assert not torch.allclose(
        small.mean, digits.mean, atol=1e-4, rtol=0
    )  # really from the (limited) train split
    everything = torch.cat([digits.train_x, digits.val_x, digits.test_x])
    assert not torch.allclose(digits.mean, train_stats(everything)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0])
def test_bad_val_fraction_raises(val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        seqlstm.load_dataset("digits", val_fraction=val_fraction)


# ----------------------------------------------------------------------------------------
# ImageFolder copies written here with PIL

CLASSES = ["cat", "ant", "bee"]  # written unsorted: labels follow the sorted folder names


def write_folder(
    root, *, n_train=4, n_test=2, size=6, test_name="test", classes=CLASSES, test_classes=None
):
    """root/{train,test_name}/<class>/NN.png with known pixels; returns {split: (x, y)} in
    ImageFolder order."""
    rng = np.random.default_rng(0)
    expected = {}
    for split, n, names in (
        ("train", n_train, classes),
        (test_name, n_test, test_classes or classes),
    ):
        xs, ys = [], []
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / name / f"{i:02d}.png")
                xs.append(torch.from_numpy(pixels).permute(2, 0, 1))
                ys.append(sorted(names).index(name))
        order = sorted(
            range(len(ys)), key=lambda j: ys[j]
        )  # ImageFolder: by class, then by file name
        expected["test" if split == test_name else split] = (
            torch.stack([xs[j] for j in order]),
            torch.tensor([ys[j] for j in order]),
        )
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
    assert as_multiset(data.train_x, data.train_y) + as_multiset(
        data.val_x, data.val_y
    ) == as_multiset(train_x, train_y)
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
    # images of one size are cached at that size: every image_size is served by the same entry,
    # resized
    small = load(folder, tmp_path, image_size=4)
    assert small.image_shape == (3, 4, 4) and len(list(cache_dir.glob("*.pt"))) == 1
    assert torch.equal(small.test_x, resize(first.test_x, [4, 4], antialias=True))


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
    assert torch.equal(data.test_x, expected["test"][0]) and torch.equal(
        data.test_y, expected["test"][1]
    )


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
    assert len(list(cache_dir.glob("*.pt"))) == 1  # mixed sizes: cached at image_size 4 only ...
    assert load(folder, tmp_path, image_size=5).image_shape == (3, 5, 5)
    assert len(list(cache_dir.glob("*.pt"))) == 2  # ... so another size is another entry


# ----------------------------------------------------------------------------------------
# names and missing data


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="no-such-dataset") as e:
        seqlstm.load_dataset("no-such-dataset", data_dir=tmp_path)
    for name in ("'cifar10'", "'mnist'", "'digits'", "'cifar100'", "'tiny_imagenet'"):
        assert name in str(e.value)
    assert seqlstm.list_datasets() == [
        "cifar10",
        "cifar100",
        "cifar100_coarse",
        "digits",
        "fashion_mnist",
        "imagenette",
        "mnist",
        "svhn",
        "svhn_extra",
        "tiny_imagenet",
    ]


@pytest.mark.parametrize(
    "name, layouts",
    [
        ("mnist", ["MNIST/raw"]),
        ("cifar10", ["cifar-10-batches-py", "cifar10-jpeg"]),
        ("cifar100", ["cifar-100-python/{train,test,meta}", "cifar-100-python.tar.gz"]),
        ("svhn", ["SVHN/{train,test}_32x32.mat", "ufldl.stanford.edu/housenumbers"]),
        ("svhn_extra", ["SVHN/{train,test,extra}_32x32.mat"]),
        (
            "fashion_mnist",
            ["FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", "fashion-mnist"],
        ),
        (
            "imagenette",
            [
                "imagenette-64/{train,val}/<wnid>",
                "imagenette2-160/{train,val}",
                "imagenette2-160.tgz",
            ],
        ),
        (
            "tiny_imagenet",
            [
                "tiny-imagenet-200/",
                "val/val_annotations.txt",
                "cs231n.stanford.edu/tiny-imagenet-200.zip",
            ],
        ),
    ],
)
def test_missing_dataset_offline_says_where_to_put_it(name, layouts, tmp_path):
    with pytest.raises(seqlstm.DatasetNotFound) as e:
        seqlstm.load_dataset(name, data_dir=tmp_path, download=False)
    assert isinstance(e.value, FileNotFoundError)
    message = str(e.value)
    assert f"'{name.replace('_extra', '')}'" in message
    assert str(tmp_path.resolve()) in message
    for layout in layouts:
        assert layout in message
    assert "http" in message
    assert not (tmp_path / ".cache").exists() or not any(
        (tmp_path / ".cache").iterdir()
    )  # nothing cached


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


@pytest.mark.needs_data("imagenette-64")
def test_imagenette_shared_copy(data_dir):
    data = seqlstm.load_dataset("imagenette", data_dir=data_dir, val_fraction=0)
    check_dtypes(data)
    assert data.counts() == {"train": 9469, "val": 0, "test": 3925}
    assert data.image_shape == (3, 64, 64)
    assert data.classes == IMAGENETTE_NAMES
    assert torch.equal(torch.unique(data.test_y), torch.arange(10))
    assert torch.bincount(data.train_y).min() > 800
    assert "imagenette-64" in data.source
    small = seqlstm.load_dataset("imagenette", data_dir=data_dir, image_size=32, limit_train=500)
    assert small.image_shape == (3, 32, 32) and small.test_x.shape == (3925, 3, 32, 32)
    assert small.counts() == {"train": 500, "val": 947, "test": 3925}
    assert torch.equal(small.test_x, resize(data.test_x, [32, 32], antialias=True))


@pytest.mark.needs_data("tiny-imagenet-200")
def test_tiny_imagenet_shared_copy(data_dir):
    data = seqlstm.load_dataset("tiny_imagenet", data_dir=data_dir, val_fraction=0)
    check_dtypes(data)
    n_train = len(
        list((data_dir / "tiny-imagenet-200" / "train").glob("*/images/*.JPEG"))
    )  # 10,000 in the subset
    assert data.counts() == {"train": n_train, "val": 0, "test": 10000}
    assert data.image_shape == (3, 64, 64)
    assert len(data.classes) == 200 and len(set(data.classes)) == 200
    assert data.classes[0] == "goldfish"  # n01443537, the first wnid in sorted order
    assert (
        torch.bincount(data.test_y, minlength=200).tolist() == [50] * 200
    )  # 50 labelled val images per class
    assert torch.bincount(data.train_y, minlength=200).min() > 0
    assert "Tiny-ImageNet" in data.source
    gray = seqlstm.load_dataset(
        "tiny_imagenet", data_dir=data_dir, grayscale=True, image_size=32, limit_train=1000
    )
    assert gray.image_shape == (1, 32, 32) and gray.test_x.shape == (10000, 1, 32, 32)
    assert gray.mean.shape == gray.std.shape == (1,)


# ----------------------------------------------------------------------------------------
# torchvision datasets without a shared copy: small files written in torchvision's exact layouts

IMAGENETTE_NAMES = [
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
]


def write_cifar100(data_dir, n_train=12, n_test=6):
    """cifar-100-python/{train,test,meta}: pickled dicts as in the official archive; returns
    {split: (x, fine, coarse)}."""
    import pickle

    rng = np.random.default_rng(1)
    folder = data_dir / "cifar-100-python"
    folder.mkdir(parents=True)
    expected = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(
            0, 256, (n, 3 * 32 * 32), dtype=np.uint8
        )  # rows: R plane, G plane, B plane
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        with open(folder / split, "wb") as f:
            pickle.dump(
                {
                    "filenames": [f"img_{i}.png" for i in range(n)],
                    "batch_label": f"{split} batch",
                    "fine_labels": fine,
                    "coarse_labels": coarse,
                    "data": data,
                },
                f,
            )
        expected[split] = (
            torch.from_numpy(data).view(n, 3, 32, 32),
            torch.tensor(fine),
            torch.tensor(coarse),
        )
    with open(folder / "meta", "wb") as f:
        pickle.dump(
            {
                "fine_label_names": [f"fine_{i:02d}" for i in range(100)],
                "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
            },
            f,
        )
    return expected


@pytest.fixture
def no_cifar_checksums(monkeypatch):
    """The files written here are not the official ones: skip torchvision's md5 checks of
    CIFAR-100."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda *args, **kw: True
    )  # meta


def test_cifar100_damaged_copy_names_its_folder(tmp_path):
    write_cifar100(tmp_path)  # torchvision's checksums fail on these files
    with pytest.raises(ValueError, match="cannot read") as e:
        seqlstm.load_dataset("cifar100", data_dir=tmp_path)
    assert str(tmp_path / "cifar-100-python") in str(e.value)


def test_cifar100_fine_and_coarse_labels(tmp_path, no_cifar_checksums):
    expected = write_cifar100(tmp_path)
    fine = seqlstm.load_dataset("cifar100", data_dir=tmp_path, val_fraction=0.25)
    check_dtypes(fine)
    assert fine.counts() == {"train": 9, "val": 3, "test": 6}
    assert fine.image_shape == (3, 32, 32)
    assert fine.classes == [f"fine_{i:02d}" for i in range(100)]
    test_x, test_fine, test_coarse = expected["test"]
    assert torch.equal(fine.test_x, test_x) and torch.equal(fine.test_y, test_fine)
    train_x, train_fine, train_coarse = expected["train"]
    assert as_multiset(fine.train_x, fine.train_y) + as_multiset(
        fine.val_x, fine.val_y
    ) == as_multiset(train_x, train_fine)
    assert fine.source == "torchvision CIFAR100"

    coarse = seqlstm.load_dataset(
        "cifar100", data_dir=tmp_path, val_fraction=0.25, dataset_args={"labels": "coarse"}
    )
    assert coarse.classes == [f"coarse_{i:02d}" for i in range(20)]
    assert torch.equal(coarse.test_x, test_x) and torch.equal(coarse.test_y, test_coarse)
    assert torch.equal(coarse.train_x, fine.train_x)  # the same images, the same seeded split
    assert torch.equal(coarse.train_y, train_coarse[fine_positions(fine.train_x, train_x)])
    assert "coarse" in coarse.source
    variant = seqlstm.load_dataset("cifar100_coarse", data_dir=tmp_path, val_fraction=0.25)
    assert torch.equal(variant.train_y, coarse.train_y) and variant.classes == coarse.classes


def fine_positions(images, originals):
    """Index of each image in `originals` (the random images are all different)."""
    where = {img.numpy().tobytes(): i for i, img in enumerate(originals)}
    return torch.tensor([where[img.numpy().tobytes()] for img in images])


def test_dataset_args_are_checked(tmp_path, no_cifar_checksums):
    write_cifar100(tmp_path)
    with pytest.raises(ValueError, match="'fine' or 'coarse'"):
        seqlstm.load_dataset("cifar100", data_dir=tmp_path, dataset_args={"labels": "medium"})
    with pytest.raises(ValueError, match="no option") as e:
        seqlstm.load_dataset("cifar100", data_dir=tmp_path, dataset_args={"label": "coarse"})
    assert "labels" in str(e.value)  # the valid option is named
    with pytest.raises(ValueError, match="no option"):
        seqlstm.load_dataset("digits", dataset_args={"labels": "coarse"})
    assert seqlstm.dataset_options("cifar100") == {"labels": "fine"}
    assert seqlstm.dataset_options("svhn") == {"extra": False}
    assert seqlstm.dataset_options("imagenette") == {"size": None}
    assert seqlstm.dataset_options("mnist") == {}


def write_svhn(folder, sizes):
    """{split}_32x32.mat as in the official files: X (32, 32, 3, N) uint8, y (N, 1) with 10 for
    the digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for split, n in sizes.items():
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        expected[split] = (
            torch.from_numpy(x).permute(3, 2, 0, 1),
            torch.from_numpy(y[:, 0] % 10).long(),
        )
    return expected


@pytest.fixture
def no_svhn_checksums(monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)


@pytest.mark.parametrize("subfolder", ["SVHN", "."])
def test_svhn_labels_0_to_9_and_extra(subfolder, tmp_path, no_svhn_checksums):
    expected = write_svhn(tmp_path / subfolder, {"train": 20, "test": 10, "extra": 5})
    data = seqlstm.load_dataset("svhn", data_dir=tmp_path, val_fraction=0.25)
    check_dtypes(data)
    assert data.counts() == {"train": 15, "val": 5, "test": 10}
    assert data.image_shape == (3, 32, 32)
    assert data.classes == [str(i) for i in range(10)]
    assert torch.equal(data.test_x, expected["test"][0]) and torch.equal(
        data.test_y, expected["test"][1]
    )
    assert data.test_y.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # the file's 10 is the digit 0
    assert as_multiset(data.train_x, data.train_y) + as_multiset(
        data.val_x, data.val_y
    ) == as_multiset(*expected["train"])

    extra = seqlstm.load_dataset(
        "svhn", data_dir=tmp_path, val_fraction=0, dataset_args={"extra": True}
    )
    assert extra.counts() == {"train": 25, "val": 0, "test": 10}
    assert as_multiset(extra.train_x, extra.train_y) == as_multiset(
        *expected["train"]
    ) + as_multiset(*expected["extra"])
    assert "extra" in extra.source
    assert (
        seqlstm.load_dataset("svhn_extra", data_dir=tmp_path, val_fraction=0).counts()
        == extra.counts()
    )


def test_svhn_extra_missing_offline(tmp_path, no_svhn_checksums):
    write_svhn(tmp_path / "SVHN", {"train": 4, "test": 2})
    assert seqlstm.load_dataset("svhn", data_dir=tmp_path, download=False).counts()["test"] == 2
    with pytest.raises(seqlstm.DatasetNotFound, match=r"SVHN/\{train,test,extra\}_32x32\.mat"):
        seqlstm.load_dataset(
            "svhn", data_dir=tmp_path, download=False, dataset_args={"extra": True}
        )


def write_idx(path, array):
    """An idx-ubyte file as in (Fashion-)MNIST: big-endian magic 0x0800 + ndim, the sizes, then
    the bytes."""
    import struct

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        struct.pack(">I", 0x0800 + array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(np.uint8).tobytes()
    )


def write_fashion_mnist(data_dir, n_train=16, n_test=8):
    rng = np.random.default_rng(3)
    raw = data_dir / "FashionMNIST" / "raw"
    expected = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        expected[split] = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long()
    return expected


def test_fashion_mnist_from_raw_idx_files(tmp_path):
    from torchvision.datasets import FashionMNIST

    expected = write_fashion_mnist(tmp_path)
    data = seqlstm.load_dataset("fashion_mnist", data_dir=tmp_path, val_fraction=0.25)
    check_dtypes(data)
    assert data.counts() == {"train": 12, "val": 4, "test": 8}
    assert data.image_shape == (1, 28, 28)
    assert data.classes == FashionMNIST.classes and data.classes[0] == "T-shirt/top"
    assert torch.equal(data.test_x, expected["test"][0]) and torch.equal(
        data.test_y, expected["test"][1]
    )
    assert data.source == "torchvision FashionMNIST"


def test_download_is_tried_and_its_failure_says_where_to_put_the_data(tmp_path, monkeypatch):
    """Online, each loader asks torchvision to download the official files (here the network is
    stubbed out)."""
    import torchvision

    tried = []

    def offline(url, *args, **kw):
        tried.append(url)
        raise OSError("no network in this test")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    monkeypatch.setattr(torchvision.datasets.svhn, "download_url", offline)
    for name, url in [
        ("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
        ("svhn", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"),
        (
            "fashion_mnist",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
        ),
        ("imagenette", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"),
        ("tiny_imagenet", "http://cs231n.stanford.edu/tiny-imagenet-200.zip"),
    ]:
        tried.clear()
        with pytest.raises(seqlstm.DatasetNotFound) as e:
            seqlstm.load_dataset(name, data_dir=tmp_path / name, download=True)
        assert tried[:1] == [url], name
        assert f"'{name}'" in str(e.value) and "no network in this test" in str(e.value.__cause__)
    tried.clear()
    with pytest.raises(seqlstm.DatasetNotFound):
        seqlstm.load_dataset("imagenette", data_dir=tmp_path / "i", dataset_args={"size": "320px"})
    assert tried == ["https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"]


# ----------------------------------------------------------------------------------------
# Imagenette and Tiny-ImageNet layouts written here


def test_imagenette_folder_names_classes_by_wnid(tmp_path, cache_dir):
    wnids = list(seqlstm.IMAGENETTE_CLASSES)
    write_folder(tmp_path / "imagenette2-160", classes=wnids, n_train=1, n_test=1, test_name="val")
    with pytest.raises(ValueError, match="image_size"):  # mixed sizes, as in fastai's releases
        Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(
            tmp_path / "imagenette2-160" / "val" / wnids[3] / "b.JPEG"
        )
        seqlstm.load_dataset("imagenette", data_dir=tmp_path)
    data = seqlstm.load_dataset("imagenette", data_dir=tmp_path, image_size=5, val_fraction=0)
    assert data.classes == IMAGENETTE_NAMES
    assert data.counts() == {"train": 10, "val": 0, "test": 11} and data.image_shape == (3, 5, 5)
    assert "imagenette2-160" in data.source
    with pytest.raises(
        seqlstm.DatasetNotFound, match="imagenette2-320"
    ):  # an explicit size looks for that copy
        seqlstm.load_dataset(
            "imagenette", data_dir=tmp_path, download=False, dataset_args={"size": "320px"}
        )


TINY_WNIDS = {
    "n01443537": "goldfish, Carassius auratus",
    "n01629819": "European fire salamander, Salamandra",
    "n01641577": "bullfrog, Rana catesbeiana",
}
TINY_COLOURS = [
    (220, 30, 30),
    (30, 220, 30),
    (30, 30, 220),
]  # one solid colour per class (sorted wnids)
TINY_VAL = [2, 0, 1, 1, 2, 0, 0]  # the class of val_0 .. val_6
TINY_VAL_ORDER = [3, 0, 6, 1, 5, 2, 4]  # the order of val_annotations.txt: not by file name


def write_tiny(data_dir, n_train=3, size=8):
    """tiny-imagenet-200/ in the release layout, with solid-colour JPEG images of known class."""
    root = data_dir / "tiny-imagenet-200"
    wnids = sorted(TINY_WNIDS)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text(
        "\n".join(reversed(wnids)) + "\n"
    )  # unsorted, as in the release
    (root / "words.txt").write_text(
        "n00001740\tentity\n" + "".join(f"{w}\t{t}\n" for w, t in TINY_WNIDS.items())
    )
    for k, wnid in enumerate(wnids):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(n_train):
            Image.new("RGB", (size, size), TINY_COLOURS[k]).save(
                images / f"{wnid}_{i}.JPEG", quality=95
            )
    lines = []
    for i in TINY_VAL_ORDER:
        k = TINY_VAL[i]
        Image.new("RGB", (size, size), TINY_COLOURS[k]).save(
            root / "val" / "images" / f"val_{i}.JPEG", quality=95
        )
        lines.append(f"val_{i}.JPEG\t{wnids[k]}\t0\t0\t{size - 1}\t{size - 1}\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    return root


def colour_labels(x):
    """The class of each solid-colour image: the index of its brightest channel."""
    return x.float().mean((2, 3)).argmax(1)


def test_tiny_imagenet_layout(tmp_path, cache_dir):
    write_tiny(tmp_path)
    data = seqlstm.load_dataset("tiny_imagenet", data_dir=tmp_path, val_fraction=0)
    check_dtypes(data)
    assert data.classes == ["goldfish", "European fire salamander", "bullfrog"]
    assert data.counts() == {"train": 9, "val": 0, "test": 7}
    assert data.image_shape == (3, 8, 8)
    assert data.test_y.tolist() == [
        TINY_VAL[i] for i in TINY_VAL_ORDER
    ]  # from val_annotations.txt, in its order
    assert torch.equal(colour_labels(data.test_x), data.test_y)  # each file got its own label
    assert torch.equal(colour_labels(data.train_x), data.train_y)
    assert torch.bincount(data.train_y).tolist() == [3, 3, 3]
    assert "Tiny-ImageNet" in data.source


def test_tiny_imagenet_second_load_reads_the_cache(tmp_path, cache_dir, monkeypatch):
    write_tiny(tmp_path)
    first = seqlstm.load_dataset("tiny_imagenet", data_dir=tmp_path)
    assert len(list(cache_dir.glob("tiny-imagenet-200-*.pt"))) == 1

    def no_decoding(*args, **kw):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(seqlstm, "_decode_folder", no_decoding)
    second = seqlstm.load_dataset("tiny_imagenet", data_dir=tmp_path)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(first, f"{split}_x"), getattr(second, f"{split}_x"))
        assert torch.equal(getattr(first, f"{split}_y"), getattr(second, f"{split}_y"))
    assert second.classes == first.classes
    assert seqlstm.load_dataset("tiny_imagenet", data_dir=tmp_path, image_size=4).image_shape == (
        3,
        4,
        4,
    )
    # a relabelled val image is a new cache entry, not a stale one
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(
        annotations.read_text().replace("val_0.JPEG\tn01641577", "val_0.JPEG\tn01443537")
    )
    with pytest.raises(AssertionError, match="decoded again"):
        seqlstm.load_dataset("tiny_imagenet", data_dir=tmp_path)


def break_unknown_wnid(root):
    Image.new("RGB", (8, 8)).save(root / "val" / "images" / "val_7.JPEG")
    with open(root / "val" / "val_annotations.txt", "a") as f:
        f.write("val_7.JPEG\tn09999999\t0\t0\t7\t7\n")
    return ValueError, [
        "n09999999",
        "val_7.JPEG",
        "line 8",
        str(root / "val" / "val_annotations.txt"),
    ]


def break_missing_val_image(root):
    (root / "val" / "images" / "val_3.JPEG").unlink()
    return FileNotFoundError, [str(root / "val" / "images" / "val_3.JPEG"), "line 1"]


def break_empty_class(root):
    for p in (root / "train" / "n01629819" / "images").iterdir():
        p.unlink()
    return FileNotFoundError, [str(root / "train" / "n01629819" / "images")]


def break_extra_class_folder(root):
    (root / "train" / "n09999999" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "n09999999" / "images" / "n09999999_0.JPEG")
    return ValueError, ["different classes", "n09999999", str(root / "wnids.txt")]


def break_corrupt_image(root):
    bad = root / "train" / "n01641577" / "images" / "n01641577_1.JPEG"
    bad.write_bytes(b"not a jpeg")
    return ValueError, ["decode", str(bad)]


@pytest.mark.parametrize(
    "damage",
    [
        break_unknown_wnid,
        break_missing_val_image,
        break_empty_class,
        break_extra_class_folder,
        break_corrupt_image,
    ],
)
def test_tiny_imagenet_bad_layout_names_the_file(damage, tmp_path, cache_dir):
    error, parts = damage(write_tiny(tmp_path))
    with pytest.raises(error) as e:
        seqlstm.load_dataset("tiny_imagenet", data_dir=tmp_path)
    for part in parts:
        assert part in str(e.value)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())  # nothing cached


# ----------------------------------------------------------------------------------------
# the image policy: size, grayscale, channels; normalisation statistics


def test_image_size_resizes_every_split_of_a_tensor_dataset(tmp_path):
    expected = write_fashion_mnist(tmp_path)
    data = seqlstm.load_dataset(
        "fashion_mnist", data_dir=tmp_path, image_size=14, val_fraction=0.25
    )
    assert data.image_shape == (1, 14, 14) and data.val_x.shape[1:] == data.test_x.shape[1:] == (
        1,
        14,
        14,
    )
    assert data.test_x.dtype == torch.uint8
    assert torch.equal(data.test_x, resize(expected["test"][0], [14, 14], antialias=True))
    mean, std = train_stats(data.train_x)  # statistics of the resized images
    torch.testing.assert_close(data.mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(data.std, std, atol=1e-5, rtol=0)
    big = seqlstm.load_dataset("fashion_mnist", data_dir=tmp_path, image_size=32, channels=3)
    assert big.image_shape == (3, 32, 32) and big.mean.shape == (3,)
    assert torch.equal(big.test_x[:, 0], big.test_x[:, 2])  # the one channel, three times
    assert torch.equal(big.test_x[:, :1], resize(expected["test"][0], [32, 32], antialias=True))


def test_grayscale_is_itu_r_601_luma(tmp_path, cache_dir):
    colours = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
    for name, rgb in colours.items():
        for split in ("train", "test"):
            (tmp_path / "rgb" / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (5, 5), rgb).save(tmp_path / "rgb" / split / name / f"{i}.png")
    rgb = seqlstm.load_dataset(str(tmp_path / "rgb"), val_fraction=0)
    assert rgb.image_shape == (3, 5, 5)
    gray = seqlstm.load_dataset(str(tmp_path / "rgb"), val_fraction=0, grayscale=True)
    assert gray.image_shape == (1, 5, 5) and gray.test_x.dtype == torch.uint8
    # 0.2989 R + 0.587 G + 0.114 B, truncated to uint8 as torchvision's rgb_to_grayscale does
    luma = {"blue": 29, "green": 149, "red": 76}
    for k, name in enumerate(gray.classes):
        assert (gray.test_x[gray.test_y == k] == luma[name]).all(), name
    assert gray.mean.shape == gray.std.shape == (1,)
    torch.testing.assert_close(gray.mean, train_stats(gray.train_x)[0], atol=1e-5, rtol=0)
    assert torch.equal(
        seqlstm.load_dataset(str(tmp_path / "rgb"), val_fraction=0, channels=1).test_x, gray.test_x
    )
    as_rgb = seqlstm.load_dataset(str(tmp_path / "rgb"), val_fraction=0, grayscale=True, channels=3)
    assert as_rgb.image_shape == (3, 5, 5) and (as_rgb.test_x == gray.test_x).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 2.5}, "image_size"),
        ({"channels": 2}, "channels"),
    ],
)
def test_bad_image_policy_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        seqlstm.load_dataset("digits", **kw)


def test_chunked_policy_and_statistics_match_the_whole_set_computation():
    x = torch.randint(0, 256, (37, 3, 9, 7), dtype=torch.uint8)
    for elements in (1, 500, 9 * 7 * 3 * 10, 1 << 24):  # one image per chunk .. everything at once
        whole = resize(x, [4, 4], antialias=True)
        torch.testing.assert_close(
            seqlstm._chunked(x, partial(resize, size=[4, 4], antialias=True), elements),
            whole,
            atol=0,
            rtol=0,
        )
        mean, std = seqlstm._channel_stats(x, elements)
        ref_mean, ref_std = train_stats(x)
        torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(std, ref_std, atol=1e-6, rtol=0)
    assert seqlstm._chunked(x[:0], partial(resize, size=[4, 4], antialias=True)).shape == (
        0,
        3,
        4,
        4,
    )


# ----------------------------------------------------------------------------------------
# the report's overview


def test_dataset_overview_counts_and_grid(digits):
    import matplotlib.pyplot as plt

    counts, fig = figures.dataset_overview(digits, per_class=3)
    try:
        assert (
            list(counts.columns) == ["train", "val", "test"]
            and list(counts.index) == digits.classes
        )
        assert counts.sum().to_dict() == digits.counts()
        assert counts["test"].tolist() == torch.bincount(digits.test_y, minlength=10).tolist()
        assert len(fig.axes) == 10 * 3  # one row per class, per_class columns
        assert [fig.axes[3 * r].get_ylabel() for r in range(10)] == digits.classes
        assert all(len(ax.images) == 1 for ax in fig.axes)
        first = fig.axes[0].images[0].get_array()
        assert np.array_equal(
            first, digits.train_x[(digits.train_y == 0).nonzero()[0, 0], 0].numpy()
        )
        assert "of" not in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_dataset_overview_caps_the_classes_shown():
    import matplotlib.pyplot as plt

    k = 30
    y = torch.arange(k).repeat_interleave(2)[:-1]  # the last class has one train image
    x = torch.randint(0, 256, (len(y), 3, 4, 4), dtype=torch.uint8)
    empty = torch.zeros(0, dtype=torch.int64)
    data = seqlstm.ImageData(
        "many",
        [f"class {i}" for i in range(k)],
        x,
        y,
        x[:0],
        empty,
        x[:5],
        y[:5],
        torch.zeros(3),
        torch.ones(3),
    )
    counts, fig = figures.dataset_overview(data, per_class=2)
    try:
        assert len(counts) == k and counts.sum().to_dict() == {"train": len(y), "val": 0, "test": 5}
        rows = [fig.axes[2 * r].get_ylabel() for r in range(len(fig.axes) // 2)]
        assert len(fig.axes) == 20 * 2 and len(rows) == 20 and len(set(rows)) == 20
        assert rows[0] == "class 0" and rows[-1] == "class 29"
        assert "20 of 30 classes" in fig._suptitle.get_text()
        assert [len(ax.images) for ax in fig.axes[-2:]] == [
            1,
            0,
        ]  # fewer images than per_class: a blank cell
    finally:
        plt.close(fig)


@pytest.mark.slow
def test_the_datasets_params_run_on_cifar100_and_svhn_files(
    tmp_path, outputs, no_cifar_checksums, no_svhn_checksums
):
    """params/datasets.yaml for the two datasets of the task with no offline copy here: every
    configuration (baseline, improved and distilled student, rows GRU, vanilla Sequencer) trains
    three epochs on small files written in torchvision's layouts."""
    from pathlib import Path

    from seqlab import report, schema

    write_cifar100(tmp_path / "data", n_train=40, n_test=20)
    write_svhn(tmp_path / "data" / "SVHN", {"train": 40, "test": 20})
    given = schema.read_params_file(Path(__file__).parents[1] / "params" / "datasets.yaml")
    short = dict(seed=[0], epochs=3, teacher_epochs=1, batch_size=16, threads=1)
    params = {**schema.defaults(), **given, **short, "overview_per_class": 0}
    params.update(dataset=["cifar100", "svhn"], data_dir=str(tmp_path / "data"))
    params["extra_runs"] = [{**extra, "epochs": 3} for extra in params["extra_runs"]]
    runs, loaded = report.prepare_report(params)
    assert sorted((r.dataset, r.model, r.variant, bool(r.distill.teacher)) for r in runs) == [
        (ds, m, v, t)
        for ds in ("cifar100", "svhn")
        for m, v, t in [("bilstm_fc", "default", False), ("bilstm_fc", "improved", False),
                        ("bilstm_fc", "improved", True), ("lstm", "", False),
                        ("vanilla_sequencer", "", False)]
    ]  # fmt: skip
    results = report.train_all(runs, loaded)
    assert [r.status for r in results] == ["ok"] * len(runs), [r.error for r in results]
