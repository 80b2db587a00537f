"""seqlstm: classify images as sequences.

Images (DATASETS) become sequences (SEQUENCES: the identity sequence of Biswas et al., IJCNN 2014,
rows, pixels, patches, crops, series of transformed views) that sequence models read (MODELS:
BiLSTM + FC, RNNs, Sequencer2D, ViT, the LRA pixel models, S4D, ViL, Vim), alone or distilled from
a teacher.
This file imports torch, torchvision and timm only (scikit-learn, matplotlib and pandas lazily,
where a function needs them), so it can be dropped into Colab alone. The command line
(`python seqlstm.py report|train|tune|bench|datasets|transforms|models`) is handed off to the
package seqlab beside it, which imports this module.

Contents, in reading order (each section uses only what comes before it):
  Data                 ImageData, DATASETS, load_dataset: every dataset as in-memory uint8 tensors,
                       decoded once and cached
  Sequence transforms  SEQUENCES, make_sequence, STEP_LAYOUT; the batched fast path (normalize,
                       AUGMENTS, augment_batch, Batches); the per-sample path (per_sample_pipeline,
                       TensorImages)
  Models               MODELS, create_model, INITS: BiLSTM + FC, RNNs, image models, LRA pixel
                       models, S4D, ViL (mLSTM) and Vim (Mamba) on patch tokens; MODEL_INFO,
                       model_input
  Distillation         distillation_loss, build_teacher, TEST_VIEWS, Teacher (its logits from a
                       table or live), logits_table
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.sequencer import LSTM2d, Sequencer2d
from timm.models.vision_transformer import VisionTransformer


def default_data_dir() -> Path:
    return Path(os.environ.get("SEQLSTM_DATA", "./data"))


# ----------------------------------------------------------------------------------------
# Data: every dataset as in-memory uint8 tensors (N, C, H, W), decoded once and cached

@dataclass
class ImageData:
    """A dataset held in memory: uint8 images (N, C, H, W), int64 labels, class names.

    `mean` and `std` (per channel, in [0, 1] units) come from the train split only."""
    name: str
    classes: list
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    source: str = ""  # which copy was read: torchvision's files, an ImageFolder, sklearn

    @property
    def image_shape(self):
        return tuple(self.train_x.shape[1:])  # (C, H, W)

    def counts(self):
        return {split: len(getattr(self, f"{split}_y")) for split in ("train", "val", "test")}


class DatasetNotFound(FileNotFoundError):
    pass


def _missing(name, data_dir, layouts, url):
    listed = "\n".join(f"  - {data_dir / p}" for p in layouts)
    return DatasetNotFound(
        f"dataset '{name}' was not found under data_dir={data_dir.resolve()} and could not be "
        f"downloaded (offline?). Expected one of these layouts:\n{listed}\n"
        f"Official download: {url}\n"
        f"Set data_dir (or $SEQLSTM_DATA) to the folder that holds it.")


def _download(fetch, name, data_dir, download, layouts, url):
    """fetch() (downloading) when `download`; offline, or when it fails, DatasetNotFound naming
    what was looked for."""
    if download:
        try:
            return fetch()
        except Exception as e:  # no network, bad checksum, ...: say what we looked for instead
            raise _missing(name, data_dir, layouts, url) from e
    raise _missing(name, data_dir, layouts, url)


def _from_torchvision(ds, channels_first=False):
    """(images uint8 (N, C, H, W), labels int64) from a torchvision dataset's in-memory arrays:
    `.data` (N, H, W), (N, H, W, C) or, with channels_first (SVHN), (N, C, H, W); `.targets` or
    `.labels`."""
    x = torch.as_tensor(ds.data)
    if x.ndim == 3:
        x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    elif not channels_first:
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    labels = ds.targets if hasattr(ds, "targets") else ds.labels
    return x.contiguous(), torch.as_tensor(labels, dtype=torch.int64)


def _torchvision_splits(cls, root, download, *, train=({"train": True},), test=({"train": False},),
                        classes=None, channels_first=False, **kw):
    """(train_x, train_y, test_x, test_y, classes) through torchvision's class `cls`. `train` and
    `test` hold the constructor arguments of each part of a split (several parts are concatenated:
    SVHN train + extra); `classes` is for classes without a `.classes` attribute."""
    def split(parts):
        loaded = [cls(root, download=download, **part, **kw) for part in parts]
        xs, ys = zip(*(_from_torchvision(ds, channels_first) for ds in loaded))
        return (loaded[0], (torch.cat(xs) if len(xs) > 1 else xs[0]),
                (torch.cat(ys) if len(ys) > 1 else ys[0]))
    first, train_x, train_y = split(train)
    _, test_x, test_y = split(test)
    return train_x, train_y, test_x, test_y, list(classes or first.classes)


def _read_torchvision(cls, root, folder, **kw):
    """_torchvision_splits from files already on disk; a damaged or incomplete copy names its
    folder."""
    try:
        return _torchvision_splits(cls, root, False, **kw)
    # torchvision: "Dataset not found or corrupted" (a missing file or a bad checksum)
    except RuntimeError as e:
        raise ValueError(f"{folder} is there, but torchvision's {cls.__name__} cannot read it "
                         f"({e}). Replace the missing or damaged files, or delete the folder to "
                         f"download it again.") from e


class _MixedSizes(ValueError):
    pass


def _decode_folder(paths_labels, image_size=None):
    """Decode image files into one uint8 tensor (N, 3, H, W); every image must end up the same size
    (with `image_size`, images of another size are resized to image_size x image_size)."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor, resize
    from tqdm.auto import tqdm
    images = []
    quiet = not sys.stderr.isatty()  # a bar in a terminal; in a rendered report, stderr noise
    for path, _ in tqdm(paths_labels, desc="decoding images", mininterval=2, leave=False,
                        disable=quiet):
        try:
            with Image.open(path) as im:
                img = pil_to_tensor(im.convert("RGB"))  # (3, H, W) uint8
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"cannot decode image file {path}: {e}") from e
        if image_size is not None and img.shape[1:] != (image_size, image_size):
            img = resize(img, [image_size, image_size], antialias=True)
        if images and img.shape != images[0].shape:
            raise _MixedSizes(f"{path} is {tuple(img.shape)} but earlier images are "
                              f"{tuple(images[0].shape)}; pass image_size to resize every image "
                              f"to one size")
        images.append(img)
    return torch.stack(images), torch.tensor([label for _, label in paths_labels],
                                             dtype=torch.int64)


def cache_dir() -> Path:
    return Path(os.environ.get("SEQLSTM_CACHE", Path.home() / ".cache" / "seqlstm"))


def _read_decoded(cache: Path):
    """A decoded folder's cached (train_x, train_y, test_x, test_y, classes), or None: a truncated
    or foreign file is named, set aside as NAME.broken and decoded again."""
    try:
        splits = torch.load(cache, weights_only=True)  # tensors and names: nothing runs
        if len(splits) == 5 and all(torch.is_tensor(t) for t in splits[:4]):
            return splits
        raise ValueError("not the 4 tensors and class names of a decoded folder")
    except Exception as e:  # noqa: BLE001 (any unreadable file: decoded again)
        broken = cache.with_name(cache.name + ".broken")
        os.replace(cache, broken)
        print(f"note: the decoded-image cache {cache} cannot be read ({type(e).__name__}: "
              f"{str(e)[:200]}): set aside as {broken.name}; decoding the images again", flush=True)
        return None


def _cached_decode(root: Path, train_files, test_files, classes, image_size=None):
    """Decode (path, label) lists into (train_x, train_y, test_x, test_y, classes), once.

    The tensors are cached in cache_dir() ($SEQLSTM_CACHE, else ~/.cache/seqlstm) under a key made
    of the folder, the file list with its labels and class names, and the size and modification
    time of every file: an added, removed, changed or relabelled file makes a new entry. Images
    that share one size are cached at that size, one entry for every image_size (load_dataset
    resizes the tensors); only a folder of mixed sizes is decoded (and cached) at image_size."""
    root = Path(root)
    files = train_files + test_files
    stats = [os.stat(path) for path, _ in files]
    prefix = len(str(root))  # paths relative to root: the same key from any working directory
    listing = "\n".join([*classes, *(f"{str(path)[prefix:]}\t{label}" for path, label in files)])
    fingerprint = (f"{len(stats)}|{sum(s.st_size for s in stats)}|"
                   f"{max(s.st_mtime_ns for s in stats)}|"
                   f"{hashlib.sha1(listing.encode()).hexdigest()}")

    def entry(size):
        key = f"{root.resolve()}|{size}|{fingerprint}"
        return cache_dir() / f"{root.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"

    for cache in [entry(None)] + [entry(image_size)] * (image_size is not None):
        splits = _read_decoded(cache) if cache.exists() else None
        if splits is not None:
            return splits
    size = None
    try:
        splits = (*_decode_folder(train_files), *_decode_folder(test_files), list(classes))
    except _MixedSizes:
        if image_size is None:
            raise
        size = image_size
        splits = (*_decode_folder(train_files, size), *_decode_folder(test_files, size),
                  list(classes))
    cache = entry(size)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save(splits, tmp)
        os.replace(tmp, cache)  # atomic: a concurrent load never reads half a file
    except OSError as e:
        warnings.warn(f"could not write the decoded-image cache {cache}: {e}")
    return splits


def _image_folder(root: Path, image_size=None):
    """An ImageFolder copy: root/train/<class>/* and root/test/<class>/* (or val/ for test),
    decoded once and cached (_cached_decode)."""
    from torchvision.datasets.folder import find_classes, make_dataset, IMG_EXTENSIONS
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    splits = {}
    for split_dir in (root / "train", test_dir):
        classes, to_idx = find_classes(str(split_dir))
        try:
            splits[split_dir.name] = classes, make_dataset(str(split_dir), to_idx,
                                                            extensions=IMG_EXTENSIONS,
                                                            allow_empty=False)
        except FileNotFoundError as e:  # an empty class folder: say which split
            raise FileNotFoundError(f"{split_dir}: {e}") from e
    (train_classes, train_files), (test_classes, test_files) = splits.values()
    if train_classes != test_classes:
        raise ValueError(f"{root}: train/ and {test_dir.name}/ hold different class folders: "
                         f"{sorted(set(train_classes) ^ set(test_classes))}")
    return _cached_decode(root, train_files, test_files, train_classes, image_size)


def _is_image_folder(root: Path):
    return (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir())


def _cifar10(data_dir, download, image_size):
    """CIFAR-10 (torchvision CIFAR10), else the JPEG re-encoded ImageFolder copy cifar10-jpeg/."""
    from torchvision.datasets import CIFAR10
    if (data_dir / "cifar-10-batches-py").is_dir():
        return (_read_torchvision(CIFAR10, data_dir, data_dir / "cifar-10-batches-py"),
                "torchvision CIFAR10 (original pixels)")
    if _is_image_folder(data_dir / "cifar10-jpeg"):
        return (_image_folder(data_dir / "cifar10-jpeg", image_size),
                "cifar10-jpeg ImageFolder (JPEG re-encoded)")
    return _download(partial(_torchvision_splits, CIFAR10, data_dir, True), "cifar10", data_dir,
                     download, ["cifar-10-batches-py/data_batch_1..5, test_batch",
                                "cifar10-jpeg/{train,test}/<class>/*.jpg"],
                     CIFAR10.url), "torchvision CIFAR10 (downloaded)"


def _cifar100_coarse(folder, splits):
    """The same images with CIFAR-100's coarse labels (20 superclasses), read from the same
    pickles."""
    import pickle

    def read(file, key):
        with open(folder / file, "rb") as f:
            return pickle.load(f, encoding="latin1")[key]
    train_x, _, test_x, _, _ = splits
    train_y, test_y = (torch.as_tensor(read(f, "coarse_labels"), dtype=torch.int64)
                       for f in ("train", "test"))
    return train_x, train_y, test_x, test_y, list(read("meta", "coarse_label_names"))


def _cifar100(data_dir, download, image_size, labels="fine"):
    """CIFAR-100 (torchvision CIFAR100): 100 fine classes, or with labels="coarse" the 20
    superclasses."""
    from torchvision.datasets import CIFAR100
    if labels not in ("fine", "coarse"):
        raise ValueError(f"cifar100: labels must be 'fine' or 'coarse', got {labels!r}")
    folder = data_dir / CIFAR100.base_folder
    if folder.is_dir():
        splits, source = _read_torchvision(CIFAR100, data_dir, folder), "torchvision CIFAR100"
    else:
        splits = _download(partial(_torchvision_splits, CIFAR100, data_dir, True), "cifar100",
                           data_dir, download, ["cifar-100-python/{train,test,meta}"],
                           CIFAR100.url)
        source = "torchvision CIFAR100 (downloaded)"
    return ((splits, source) if labels == "fine"
            else (_cifar100_coarse(folder, splits), f"{source}, coarse labels"))


SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


def _svhn(data_dir, download, image_size, extra=False):
    """SVHN (torchvision SVHN): 32x32 house-number digits 0-9; extra=True adds the 531,131 extra
    images to train."""
    from torchvision.datasets import SVHN
    parts = ["train", "test"] + ["extra"] * bool(extra)
    kw = dict(train=[{"split": "train"}] + [{"split": "extra"}] * bool(extra),
              test=[{"split": "test"}], classes=[str(i) for i in range(10)], channels_first=True)
    name = "torchvision SVHN" + " + extra" * bool(extra)
    for root in (data_dir / "SVHN", data_dir):
        if all((root / f"{p}_32x32.mat").is_file() for p in parts):
            return _read_torchvision(SVHN, root, root, **kw), name
    files = "{" + ",".join(parts) + "}_32x32.mat"
    return _download(partial(_torchvision_splits, SVHN, data_dir / "SVHN", True, **kw), "svhn",
                     data_dir, download, [f"SVHN/{files}", files], SVHN_URL), f"{name} (downloaded)"


def _idx_files(cls, name, data_dir, download):
    """MNIST-style datasets: torchvision's `cls` reads <data_dir>/<cls name>/raw/*-ubyte."""
    folder = data_dir / cls.__name__ / "raw"
    if folder.is_dir():
        return _read_torchvision(cls, data_dir, folder), f"torchvision {cls.__name__}"
    return _download(partial(_torchvision_splits, cls, data_dir, True), name, data_dir, download,
                     [f"{cls.__name__}/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte"],
                     cls.mirrors[0]), f"torchvision {cls.__name__} (downloaded)"


def _mnist(data_dir, download, image_size):
    """MNIST (torchvision MNIST): 28x28 handwritten digits."""
    from torchvision.datasets import MNIST
    return _idx_files(MNIST, "mnist", data_dir, download)


def _fashion_mnist(data_dir, download, image_size):
    """Fashion-MNIST (torchvision FashionMNIST): 28x28 gray clothing images, 10 classes."""
    from torchvision.datasets import FashionMNIST
    return _idx_files(FashionMNIST, "fashion_mnist", data_dir, download)


# the wnids of torchvision's Imagenette and of fastai's releases
IMAGENETTE_CLASSES = {"n01440764": "tench", "n02102040": "English springer",
                      "n02979186": "cassette player", "n03000684": "chain saw",
                      "n03028079": "church", "n03394916": "French horn",
                      "n03417042": "garbage truck", "n03425413": "gas pump",
                      "n03445777": "golf ball", "n03888257": "parachute"}
IMAGENETTE_SIZES = {"full": "imagenette2", "320px": "imagenette2-320", "160px": "imagenette2-160"}


def _imagenette(data_dir, download, image_size, size=None):
    """Imagenette, 10 ImageNet classes (torchvision Imagenette, size full/320px/160px), or an
    ImageFolder copy."""
    from torchvision.datasets import Imagenette
    if size is not None and size not in IMAGENETTE_SIZES:
        raise ValueError(f"imagenette: size must be one of {list(IMAGENETTE_SIZES)} or None, "
                         f"got {size!r}")
    folders = ([IMAGENETTE_SIZES[size]] if size
               else ["imagenette-64", *reversed(IMAGENETTE_SIZES.values())])
    root = next((data_dir / f for f in folders if _is_image_folder(data_dir / f)), None)
    source = f"Imagenette ImageFolder {root.name}" if root else ""
    if root is None:
        # torchvision unpacks imagenette2-<size>/{train,val}/<wnid>/*.JPEG (images of mixed sizes)
        size = size or "160px"
        _download(lambda: Imagenette(data_dir, split="train", size=size, download=True),
                  "imagenette", data_dir, download,
                  [f"{f}/{{train,val}}/<wnid>/*.JPEG" for f in folders],
                  f"https://s3.amazonaws.com/fast-ai-imageclas/{IMAGENETTE_SIZES[size]}.tgz")
        root = data_dir / IMAGENETTE_SIZES[size]
        source = f"torchvision Imagenette {root.name} (downloaded)"
    train_x, train_y, test_x, test_y, wnids = _image_folder(root, image_size)
    return (train_x, train_y, test_x, test_y, [IMAGENETTE_CLASSES.get(w, w) for w in wnids]), source


TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _tiny_imagenet_files(root: Path):
    """(train [(path, label)], test [(path, label)], class names) of the Tiny-ImageNet release
    layout.

    Labels follow the sorted wnids of wnids.txt; names are the first synonym in words.txt."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    wnids = sorted(set((root / "wnids.txt").read_text().split()))
    if not wnids:
        raise ValueError(f"{root / 'wnids.txt'} lists no classes")
    to_idx = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, synonyms = line.partition("\t")
            words[wnid] = synonyms.split(",")[0].strip()
    folders = {p.name for p in (root / "train").iterdir() if p.is_dir()}
    if folders != set(wnids):
        raise ValueError(f"{root / 'train'} and {root / 'wnids.txt'} hold different classes: "
                         f"folders not in wnids.txt {sorted(folders - set(wnids))}, "
                         f"wnids without a folder {sorted(set(wnids) - folders)}")
    train = []
    for wnid in wnids:
        images = root / "train" / wnid / "images"
        found = (sorted(p for p in images.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
                 if images.is_dir() else [])
        if not found:
            raise FileNotFoundError(f"no image files in {images} (class {wnid} of wnids.txt)")
        train += [(str(p), to_idx[wnid]) for p in found]
    annotations, test = root / "val" / "val_annotations.txt", []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{annotations}, line {n}: expected '<file>\\t<wnid>...', "
                             f"got {line!r}")
        file, wnid = fields[0], fields[1]
        if wnid not in to_idx:
            raise ValueError(f"{annotations}, line {n}: {file} is labelled {wnid}, which is not in "
                             f"{root / 'wnids.txt'}")
        path = root / "val" / "images" / file
        if not path.is_file():
            raise FileNotFoundError(f"{annotations}, line {n}: the image file {path} "
                                    f"does not exist")
        test.append((str(path), to_idx[wnid]))
    if not test:
        raise ValueError(f"{annotations} labels no images")
    return train, test, [words.get(w) or w for w in wnids]


def _tiny_imagenet(data_dir, download, image_size):
    """Tiny-ImageNet-200 (the official zip): 64x64, 200 classes; its labelled val split is the
    test split."""
    root = data_dir / "tiny-imagenet-200"
    source = "Tiny-ImageNet tiny-imagenet-200/"
    if not all((root / p).exists() for p in ("wnids.txt", "train", "val/val_annotations.txt")):
        from torchvision.datasets.utils import download_and_extract_archive
        _download(lambda: download_and_extract_archive(TINY_IMAGENET_URL, data_dir),
                  "tiny_imagenet", data_dir, download,
                  ["tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, "
                   "val/images/*.JPEG, val/val_annotations.txt}"], TINY_IMAGENET_URL)
        source += " (downloaded)"
    train_files, test_files, classes = _tiny_imagenet_files(root)
    return _cached_decode(root, train_files, test_files, classes, image_size), source


def _digits(data_dir, download, image_size):
    """scikit-learn's bundled 8x8 digits (1,797 images, no download): a fixed stratified 80/20
    split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    # (N, 1, 8, 8), 0..16 -> 0..255
    x = torch.from_numpy(d.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(d.target).long()
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    return (x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)]), "scikit-learn digits"


# name -> loader(data_dir, download, image_size, **options)
#         -> ((train_x, train_y, test_x, test_y, classes), source).
# Options are load_dataset's dataset_args; a name variant binds some (cifar100_coarse, svhn_extra)
# so that a list of dataset names can mix them.
DATASETS = {"cifar10": _cifar10, "cifar100": _cifar100,
            "cifar100_coarse": partial(_cifar100, labels="coarse"),
            "svhn": _svhn, "svhn_extra": partial(_svhn, extra=True),
            "fashion_mnist": _fashion_mnist, "imagenette": _imagenette,
            "tiny_imagenet": _tiny_imagenet, "mnist": _mnist, "digits": _digits}


def list_datasets():
    return sorted(DATASETS)


def dataset_options(name):
    """{option: default} of a registered dataset: what load_dataset(name, dataset_args=...)
    accepts."""
    import inspect
    return {p.name: p.default
            for p in list(inspect.signature(DATASETS[name]).parameters.values())[3:]}


def _load_splits(name, data_dir, download, image_size, options=None):
    """(train_x, train_y, test_x, test_y, classes), source."""
    folder, options = Path(name), dict(options or {})
    if name in DATASETS:
        unknown = sorted(set(options) - set(dataset_options(name)))
        if unknown:
            raise ValueError(f"dataset '{name}' has no option {unknown}: its dataset_args are "
                             f"{dataset_options(name) or 'none'}")
        return DATASETS[name](data_dir, download, image_size, **options)
    if _is_image_folder(folder):
        if options:
            raise ValueError(f"an ImageFolder takes no dataset_args, got {options}")
        return _image_folder(folder, image_size), f"ImageFolder {folder.resolve()}"
    raise ValueError(f"unknown dataset '{name}': valid names are {list_datasets()}, or a folder "
                     f"with train/ and test/ (or val/) subfolders in ImageFolder layout "
                     f"({folder.resolve()} is not)")


def _chunked(x, fn, elements=1 << 24):
    """fn over uint8 images x (N, ...) in chunks of about `elements` values: bounded temporary
    memory."""
    if len(x) == 0:
        return fn(torch.zeros((1, *x.shape[1:]), dtype=x.dtype))[:0]
    step = max(1, elements // x[0].numel())
    if step >= len(x):
        return fn(x)
    first = fn(x[:step])
    out = torch.empty((len(x), *first.shape[1:]), dtype=first.dtype)
    out[:step] = first
    for i in range(step, len(x), step):
        out[i:i + step] = fn(x[i:i + step])
    return out


def _image_policy(x, *, image_size=None, grayscale=False, channels=None):
    """uint8 images (N, C, H, W): RGB to one channel of ITU-R 601 luma (torchvision's
    rgb_to_grayscale) when `grayscale` or channels == 1; resized to image_size x image_size
    (antialiased); 1 channel repeated to 3 when channels == 3."""
    from torchvision.transforms.v2.functional import resize, rgb_to_grayscale
    if (grayscale or channels == 1) and x.shape[1] == 3:
        x = _chunked(x, rgb_to_grayscale)
    if image_size and tuple(x.shape[-2:]) != (image_size, image_size):
        x = _chunked(x, partial(resize, size=[image_size, image_size], antialias=True))
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x


def _channel_stats(x, elements=1 << 24):
    """Per-channel mean and (unbiased) std in [0, 1] units of uint8 images (N, C, H, W), from
    histograms of the 256 values counted in chunks of about `elements` values: exact, and no float
    copy of the whole set."""
    C = x.shape[1]
    hist = torch.zeros(C, 256, dtype=torch.int64)
    step = max(1, elements // max(1, x[0].numel() if len(x) else 1))
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        for c in range(C):
            hist[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256)
    counts, values = hist.to(torch.float64), torch.arange(256, dtype=torch.float64)
    n = counts.sum(1)
    mean = counts @ values / n
    var = (counts * (values - mean[:, None]).square()).sum(1) / (n - 1).clamp_min(1)
    return (mean / 255).float(), (var.sqrt() / 255).float().clamp_min(1e-3)


def load_dataset(name: str, *, data_dir=None, val_fraction=0.1, seed=0, limit_train=None,
                 image_size=None, grayscale=False, channels=None, dataset_args=None,
                 download=True) -> ImageData:
    """Load a dataset as uint8 tensors with train / val / test splits.

    Validation is a seeded random `val_fraction` of the official train split; `limit_train`
    keeps only the first N remaining training images (quick runs). The image policy applies to
    every split: `image_size` resizes to image_size x image_size (antialiased), `grayscale` turns
    RGB into one channel of ITU-R 601 luma, `channels=3` repeats one channel three times
    (`channels=1` is grayscale). `dataset_args` are the dataset's own options
    (dataset_options(name), e.g. {"labels": "coarse"} for cifar100). Mean and std come from the
    final train split."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is not None and (isinstance(image_size, bool)
                                   or not isinstance(image_size, numbers.Integral)
                                   or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None (keep), 1 or 3, got {channels!r}")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    (train_x, train_y, test_x, test_y, classes), source = _load_splits(name, data_dir, download,
                                                                       image_size, dataset_args)
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(train_y)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if limit_train and limit_train > len(train_idx):
        raise ValueError(f"limit_train={limit_train} is above the {len(train_idx):,} training "
                         f"images of '{name}' (after holding out val_fraction={val_fraction}): "
                         f"use at most that, or 0 for all")
    if limit_train:
        train_idx = train_idx[:limit_train]
    policy = partial(_image_policy, image_size=image_size, grayscale=grayscale, channels=channels)
    train_x, val_x, test_x = policy(train_x[train_idx]), policy(train_x[val_idx]), policy(test_x)
    train_y, val_y = train_y[train_idx], train_y[val_idx]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"dataset '{name}': train images are {tuple(train_x.shape[1:])} but test "
                         f"images are {tuple(test_x.shape[1:])}; pass image_size to resize both")
    mean, std = _channel_stats(train_x)
    return ImageData(str(name), list(classes), train_x, train_y, val_x, val_y, test_x, test_y,
                     mean, std, source)


# ----------------------------------------------------------------------------------------
# Sequence transforms: pure functions (B, C, H, W) -> (B, T, F)
#
# They read normalised images (so a zero is the dataset's mean colour: what rotations and shifts
# fill in). T and F for a C x H x W image are in each docstring and `python seqlstm.py transforms`.

def identity(x: torch.Tensor, *, seq_len: int) -> torch.Tensor:
    """The identity sequence (Biswas et al., IJCNN 2014): each image flattened and repeated.
    T = seq_len, F = C*H*W.

    Returned as an expanded view (time stride 0): no copy, and the model can see that
    every step is the same vector and project it once (see BiLSTMFC)."""
    B = x.shape[0]
    return x.reshape(B, 1, -1).expand(B, seq_len, -1)  # (B, L, C*H*W)


def rows(x):
    """One image row per step, its pixels' channels side by side: T = H, F = W*C."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H, W * C)  # (B, H, W*C)


def columns(x):
    """One image column per step: T = W, F = H*C."""
    B, C, H, W = x.shape
    return x.permute(0, 3, 2, 1).reshape(B, W, H * C)  # (B, W, H*C)


PIXEL_ORDERS = ("raster", "snake", "permuted")


def pixel_order(H, W, order="raster", seed=0):
    """Indices of the H*W pixels in reading order: raster, snake (boustrophedon: every other
    row reversed) or permuted (one fixed permutation per seed: the "permuted MNIST" benchmark)."""
    if order not in PIXEL_ORDERS:
        raise ValueError(f"unknown pixel order '{order}': valid orders are {list(PIXEL_ORDERS)}")
    idx = torch.arange(H * W).view(H, W)
    if order == "snake":
        idx[1::2] = idx[1::2].flip(1)
    if order == "permuted":
        return torch.randperm(H * W, generator=torch.Generator().manual_seed(seed))
    return idx.flatten()


def pixels(x, *, order="raster", seed=0):
    """One pixel per step, all its channels together (channels never spread over steps):
    T = H*W, F = C."""
    B, C, H, W = x.shape
    seq = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C), raster order
    return seq if order == "raster" else seq[:, pixel_order(H, W, order, seed).to(x.device)]


def patches(x, *, patch=4):
    """Non-overlapping patch x patch squares in raster order: T = (H/p)*(W/p), F = p*p*C."""
    B, C, H, W = x.shape
    if H % patch or W % patch:
        valid = [p for p in range(1, min(H, W) + 1) if H % p == 0 and W % p == 0]
        raise ValueError(f"patch={patch} does not divide the {H}x{W} image: valid patch sizes "
                         f"are {valid}")
    p = patch
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def _crops(x, crop, size, ten):
    from torchvision.transforms.v2 import functional as TF
    H, W = x.shape[-2:]
    if not 1 <= crop <= min(H, W):
        raise ValueError(f"crop={crop} does not fit the {H}x{W} image: valid crop sizes are "
                         f"1..{min(H, W)}")
    # (B, 5|10, C, crop, crop)
    views = torch.stack(TF.ten_crop(x, crop) if ten else TF.five_crop(x, crop), 1)
    if size and size != crop:
        views = (TF.resize(views.flatten(0, 1), [size, size], antialias=True)
                 .unflatten(0, views.shape[:2]))
    return views.flatten(2)  # (B, 5|10, C*s*s)


def five_crop(x, *, crop=24, size=None):
    """torchvision's FiveCrop (four corners and centre), each crop resized to size x size (default:
    the crop size): T = 5, F = C*size*size."""
    return _crops(x, crop, size, ten=False)


def ten_crop(x, *, crop=24, size=None):
    """torchvision's TenCrop (FiveCrop and its horizontal mirror): T = 10, F = C*size*size."""
    return _crops(x, crop, size, ten=True)


# Series of L transformed views of the same image (Biswas et al.'s "series of transformations").
# Every one: T = seq_len, F = C*H*W; `include_original`: step 0 is the untouched image;
# `random`: magnitudes drawn per image and step instead of a fixed sweep (deterministic by
# default, so test-time sequences are reproducible).

def _sweep(B, L, extreme, *, include_original, random, symmetric, device):
    """Per image and step magnitudes (B, L) between 0 (untouched) and `extreme`, or within
    +-extreme when `symmetric`: a fixed sweep shared by every image, or random draws."""
    if L < 1:
        raise ValueError(f"seq_len must be >= 1, got {L}")
    n = L - 1 if include_original else L
    lo = -extreme if symmetric else 0.0
    if random:
        v = lo + (extreme - lo) * torch.rand(B, n, device=device)
    elif symmetric:
        v = (torch.linspace(-extreme, extreme, n, device=device).expand(B, n) if n > 1
             else torch.full((B, n), float(extreme), device=device))
    else:  # a ramp whose last step is the extreme; step 0 is 0 only with include_original
        v = ((extreme * torch.arange(1, n + 1, device=device) / n).expand(B, n) if n
             else torch.zeros(B, 0, device=device))
    return torch.cat([torch.zeros(B, L - n, device=device), v], 1)  # (B, L)


def _warp(x, theta):
    """Apply per image and step affine maps theta (B, L, 2, 3) to x (B, C, H, W): (B, L, C*H*W)."""
    B, L = theta.shape[:2]
    views = x.unsqueeze(1).expand(B, L, *x.shape[1:]).flatten(0, 1)  # (B*L, C, H, W)
    grid = F.affine_grid(theta.flatten(0, 1), list(views.shape), align_corners=False)
    return F.grid_sample(views, grid, padding_mode="zeros", align_corners=False).reshape(B, L, -1)


def _affine(scale=None, angle=None, dx=None, dy=None):
    """(B, L, 2, 3) affine matrices in affine_grid's normalised coordinates from (B, L)
    parameters."""
    ref = next(v for v in (scale, angle, dx, dy) if v is not None)
    one, zero = torch.ones_like(ref), torch.zeros_like(ref)
    a = torch.deg2rad(angle) if angle is not None else zero
    s = 1 / scale if scale is not None else one  # sampling a smaller area zooms in
    tx, ty = (dx if dx is not None else zero), (dy if dy is not None else zero)
    return torch.stack([torch.stack([s * torch.cos(a), -s * torch.sin(a), tx], -1),
                        torch.stack([s * torch.sin(a), s * torch.cos(a), ty], -1)], -2)


def rotations(x, *, seq_len, max_angle=30.0, include_original=True, random=False):
    """L views rotated by angles spread over +-max_angle degrees."""
    angle = _sweep(x.shape[0], seq_len, max_angle, include_original=include_original, random=random,
                   symmetric=True, device=x.device)
    return _warp(x, _affine(angle=angle))


def zooms(x, *, seq_len, max_zoom=1.5, include_original=True, random=False):
    """L views zoomed in from 1x towards max_zoom x about the centre."""
    extra = _sweep(x.shape[0], seq_len, max_zoom - 1, include_original=include_original,
                   random=random, symmetric=False, device=x.device)
    return _warp(x, _affine(scale=1 + extra))


def shifts(x, *, seq_len, max_shift=4.0, include_original=True, random=False):
    """L views translated by up to max_shift pixels: around a circle of that radius (a fixed
    sweep), or by random offsets in both axes."""
    B, H, W = x.shape[0], *x.shape[-2:]
    n = seq_len - 1 if include_original else seq_len
    if random:
        dx, dy = (_sweep(B, seq_len, max_shift, include_original=include_original, random=True,
                         symmetric=True, device=x.device) for _ in range(2))
    else:
        phase = 2 * torch.pi * torch.arange(n, device=x.device) / max(n, 1)
        lead = torch.zeros(seq_len - n, device=x.device)
        dx = torch.cat([lead, max_shift * torch.cos(phase)]).expand(B, seq_len)
        dy = torch.cat([lead, max_shift * torch.sin(phase)]).expand(B, seq_len)
    return _warp(x, _affine(dx=2 * dx / W, dy=2 * dy / H))  # pixels -> normalised coordinates


def blurs(x, *, seq_len, max_sigma=2.0, include_original=True, random=False):
    """L views blurred by Gaussians of sigma 0 -> max_sigma pixels (separable, reflect padding)."""
    B, C, H, W = x.shape
    sigma = _sweep(B, seq_len, max_sigma, include_original=include_original, random=random,
                   symmetric=False, device=x.device).flatten()  # (B*L,)
    radius = min(int(math.ceil(3 * max_sigma)), H - 1, W - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma.clamp_min(1e-6)[:, None]) ** 2)  # sigma 0: a delta
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*L*C, K)
    views = x.unsqueeze(1).expand(B, seq_len, C, H, W).reshape(1, B * seq_len * C, H, W)
    views = F.pad(views, (radius,) * 4, mode="reflect")
    views = F.conv2d(views, kernel[:, None, :, None], groups=B * seq_len * C)  # along H
    views = F.conv2d(views, kernel[:, None, None, :], groups=B * seq_len * C)  # along W
    return views.reshape(B, seq_len, C * H * W)


def noise(x, *, seq_len, max_sigma=0.5, include_original=True, random=False, seed=0):
    """L views with Gaussian noise of sigma 0 -> max_sigma (in units of the data's std). The fixed
    sweep adds the same seeded noise pattern to every image, so test sequences are reproducible."""
    B = x.shape[0]
    sigma = _sweep(B, seq_len, max_sigma, include_original=include_original, random=random,
                   symmetric=False, device=x.device)
    if random:
        z = torch.randn(B, seq_len, *x.shape[1:], device=x.device)
    else:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(seq_len, *x.shape[1:], generator=g).to(x.device).expand(B, -1, -1, -1, -1)
    return (x.unsqueeze(1) + sigma[:, :, None, None, None] * z).reshape(B, seq_len, -1)


def jitter(x, *, seq_len, amount=0.4, include_original=True, random=False):
    """L views with brightness and contrast changed: x * (1 + c) + b, with b, c within +-amount
    (the fixed sweep moves both together, from darker and flatter to brighter and stronger)."""
    B = x.shape[0]
    b = _sweep(B, seq_len, amount, include_original=include_original, random=random, symmetric=True,
               device=x.device)
    c = _sweep(B, seq_len, amount, include_original=include_original, random=True, symmetric=True,
               device=x.device) if random else b
    return ((x.unsqueeze(1) * (1 + c[:, :, None, None, None]) + b[:, :, None, None, None])
            .reshape(B, seq_len, -1))


SEQUENCES = {"identity": identity, "rows": rows, "columns": columns, "pixels": pixels,
             "patches": patches, "five_crop": five_crop, "ten_crop": ten_crop,
             "rotations": rotations, "zooms": zooms, "shifts": shifts, "blurs": blurs,
             "noise": noise, "jitter": jitter}


def list_sequences():
    return sorted(SEQUENCES)


def make_sequence(name: str, seq_len=None, **args):
    """The batched transform `name` with its arguments bound: (B, C, H, W) -> (B, T, F).

    `seq_len` goes to the transforms whose length it sets (identity and the series); the others
    have a length fixed by the image (rows: T = H, ...) and ignore it."""
    import inspect
    if name not in SEQUENCES:
        raise ValueError(f"unknown sequence transform '{name}': valid names are {list_sequences()}")
    fn = SEQUENCES[name]
    valid = [p for p in inspect.signature(fn).parameters if p != "x"]
    bad = sorted(set(args) - set(valid))
    if bad:
        raise ValueError(f"unknown argument(s) {bad} for transform '{name}': valid arguments "
                         f"are {valid}")
    if "seq_len" in valid:
        seq_len = 1 if seq_len is None else seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        args["seq_len"] = int(seq_len)
    if "order" in args and args["order"] not in PIXEL_ORDERS:
        raise ValueError(f"unknown pixel order '{args['order']}': valid orders are "
                         f"{list(PIXEL_ORDERS)}")
    return partial(fn, **args)  # a partial, not a lambda: DataLoader workers can pickle it


def sequence_shape(name, image_shape=(3, 32, 32), seq_len=None, **args):
    """(T, F) of transform `name` for one C x H x W image."""
    return tuple(make_sequence(name, seq_len, **args)(torch.zeros(1, *image_shape)).shape[1:])


def _one_image(batched, img):
    return batched(img.unsqueeze(0))[0]


def sequence_transform(name: str, **args):
    """The same transform for one image (C, H, W) -> (T, F), as a torchvision transform
    (built on `transforms.Lambda`, as torchvision's FiveCrop documentation does)."""
    from torchvision import transforms
    return transforms.Lambda(partial(_one_image, make_sequence(name, **args)))


STEP_LAYOUT = {"rows": "sequence", "columns": "sequence", "pixels": "sequence", "patches": "patch"}


ARG_CHOICES = {"order": PIXEL_ORDERS}  # transform arguments with a fixed set of values


# The fast path: whole batches of uint8 tensors, normalised and augmented at once.

def normalize(x_uint8, mean, std):
    """(x / 255 - mean) / std per channel, as one fused multiply-add: one pass over the batch, not
    four broadcast ones."""
    scale, shift = (1 / (255 * std)).view(1, -1, 1, 1), (-mean / std).view(1, -1, 1, 1)
    return torch.addcmul(shift, x_uint8.to(torch.float32), scale)


def _reflect(i, n):
    """Indices outside 0..n-1 mirrored back in, as F.pad(mode="reflect") does (the edge not
    repeated)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def batch_crop(x, padding, generator=None, flip=None):
    """Random crops of a reflect-padded batch, optionally mirrored per image (`flip`, a (B,) bool
    tensor), as one gather of mirrored indices: no padded copy, no Python per image, and it works
    on uint8, so it runs before normalisation on a quarter of the bytes."""
    B, C, H, W = x.shape
    dy, dx = torch.randint(-padding, padding + 1, (2, B, 1), generator=generator).to(x.device)
    rows = _reflect(dy + torch.arange(H, device=x.device), H)  # (B, H)
    cols = _reflect(dx + torch.arange(W, device=x.device), W)  # (B, W)
    if flip is not None:
        cols = torch.where(flip.view(B, 1), cols.flip(1), cols)
    return x[torch.arange(B, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]
             ].permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)


def _coin(B, generator, device):
    return (torch.rand(B, generator=generator) < 0.5).to(device)


def batch_cutout(x, fill, generator=None):
    """Cutout (DeVries & Taylor, 2017): in each image one square of half the image's side set to
    `fill` (uint8 per channel: the mean pixel, which normalises to zero); its centre falls anywhere
    in the image, so the square may lie partly outside, as in the paper. One masked select, on
    uint8."""
    B, C, H, W = x.shape
    side = max(1, H // 2)
    top = torch.randint(0, H, (B, 1), generator=generator).to(x.device) - side // 2
    left = torch.randint(0, W, (B, 1), generator=generator).to(x.device) - side // 2
    r, c = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows, cols = (r >= top) & (r < top + side), (c >= left) & (c < left + side)  # (B, H), (B, W)
    mask = rows[:, None, :, None] & cols[:, None, None, :]  # (B, 1, H, W)
    return torch.where(mask, fill.to(x).view(1, C, 1, 1), x)


AUGMENTS = ("none", "flip", "crop", "flip_crop", "cutout", "flip_crop_cutout")


def augment_with_flips(x, augment, generator=None, fill=None):
    """(augmented batch, which images were mirrored: a (B,) bool tensor, or None without flips), on
    uint8 images; cutout fills with `fill` (uint8 per channel, default 0). The random draws are
    those of augment_batch, so a distilled student sees the very batches its undistilled twin sees;
    a teacher's logits table is looked up by the flags."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment '{augment}': valid values are {list(AUGMENTS)}")
    flip = _coin(x.shape[0], generator, x.device) if "flip" in augment else None
    if "crop" in augment:  # flip_crop: both in the one gather
        x = batch_crop(x, padding=max(1, x.shape[-1] // 8), generator=generator, flip=flip)
    elif flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if "cutout" in augment:
        x = batch_cutout(x, torch.zeros(x.shape[1], dtype=x.dtype) if fill is None else fill,
                         generator)
    return x, flip


def augment_batch(x, augment, generator=None, fill=None):
    """Batch augmentation on uint8 images (see augment_with_flips)."""
    return augment_with_flips(x, augment, generator, fill)[0]


def batch_flip(x, generator=None):
    return augment_with_flips(x, "flip", generator)[0]


class Batches:
    """Shuffled (or ordered) batches of in-memory tensors: the loader of the fast path.

    No per-sample indexing or collation. Epoch e's order is a function of (seed, e) alone, so a
    run resumed at epoch e sees the batches an uninterrupted one would have seen: seqlab's
    SeqClassifier calls `set_epoch(e)` before each training epoch; used alone, each pass is the
    next epoch. With `with_index`, each batch also carries its images' indices (x, y, idx): a
    teacher's logits table is looked up by them.

    Under DDP (`world` processes) each `rank` reads its share of every epoch (`indices`): shuffled,
    rank r takes the r-th of `world` equal, disjoint blocks of the epoch's permutation, so the
    ranks take equal steps and together see every image once (when N is not a multiple of `world`,
    the permutation's last N % world images sit that epoch out, as with DistributedSampler's
    drop_last); ordered (evaluation), rank r takes every world-th image from r on: all of them,
    once."""
    def __init__(self, x, y, batch_size, shuffle=False, seed=0, with_index=False, rank=0, world=1):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.seed, self.epoch, self.with_index = seed, 0, with_index
        self.rank, self.world = rank, world

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        n = len(self.y) // self.world if self.shuffle else len(self.y[self.rank::self.world])
        return -(-n // self.batch_size)

    def order(self, epoch):
        """The (epoch + 1)-th permutation drawn from a generator seeded with `seed`: the same
        stream as one generator drawn once per epoch (the order of round-1 runs), recomputed from
        scratch."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):
            order = torch.randperm(len(self.y), generator=generator)
        return order

    def indices(self):
        """This rank's images of the current epoch, in the order it reads them."""
        if not self.shuffle:
            return torch.arange(self.rank, len(self.y), self.world)
        share = len(self.y) // self.world
        return self.order(self.epoch)[self.rank * share:(self.rank + 1) * share]

    def __iter__(self):
        order = self.indices()
        self.epoch += 1
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield (self.x[idx], self.y[idx], idx) if self.with_index else (self.x[idx], self.y[idx])


# The per-sample path: the same steps as torchvision transforms of one image at a time, for
# DataLoader users.

def per_sample_pipeline(mean, std, seq, augment="none", size=32):
    """The classic torchvision per-sample pipeline on uint8 (C, size, size) tensors, the same
    steps as the batched fast path, for DataLoader users."""
    from torchvision.transforms import v2
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment '{augment}': valid values are {list(AUGMENTS)}")
    if "cutout" in augment:
        raise ValueError(f"augment '{augment}': cutout runs on the batched fast path only")
    steps = ([v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect")]
             if "crop" in augment else [])
    steps += [v2.RandomHorizontalFlip()] if "flip" in augment else []
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean.tolist(), std.tolist()), seq])


class TensorImages(torch.utils.data.Dataset):
    """uint8 images + labels served one sample at a time through a per-sample transform."""
    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


# ----------------------------------------------------------------------------------------
# Models
#
# One registry for every architecture, in timm's style: MODELS maps a name to a dict config
# (its variant's defaults) and the factory (a class or function) that builds its family;
# `create_model(name, in_features=F, num_classes=K, **overrides)` merges the two, the caller's
# overrides winning, and a bad name, key or value raises ValueError naming the valid ones.
# MODEL_INFO says per model which input it reads, its default input (the one `model_input`
# builds for tests and benchmarks) and its source paper.
#
# Every model reads (B, T, F) sequences, so seqlab's runner, the benchmark and the generic tests
# can treat them alike. `model.input_form` (also MODEL_INFO[name]["input_form"]) says which form
# suits it:
#   "sequence"  any (B, T, F) sequence (identity, rows, pixels, series, ...): in_features = F.
#   "pixels"    Long Range Arena models: the image as a sequence of pixels (B, H*W, C) (transform
#               `pixels`; grayscale CIFAR-10: 1,024 steps of 1): in_features = C. Pixel values are
#               embedded by a linear projection of the normalised values (no 0..255 tokens).
#   "image"     (B, C, H, W) images, or the `rows` transform's (B, H, W*C), which the model folds
#               back into the image (rows is lossless): in_features = W*C (the F of `rows`), and the
#               override `channels` = C (default 3; 1 for MNIST). The runner can keep `transform:
#               rows` unchanged, or skip the transform and pass the normalised images themselves.

def _check_choice(what, value, valid):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}: valid values are {list(valid)}")


def _check_sizes(**sizes):
    """Every size an integer >= 1 (a tuple: each of its entries)."""
    for key, value in sizes.items():
        values = value if isinstance(value, (tuple, list)) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
                             for v in values):
            raise ValueError(f"{key} must be >= 1 (integers), got {value!r}")


def lstm_loop(gates_x, w_hh, steps):
    """LSTM recurrence over `steps` steps whose input gate pre-activations are the same at
    every step: gates_x (D, B, 4H) per direction (W_ih x + b_ih + b_hh), w_hh (D, 4H, H).

    Both directions advance in one batched matmul per step; over the identity sequence the
    backward direction reads the same inputs as the forward one, so it needs no flip.
    Returns the final hidden states (D, B, H) and all outputs (T, D, B, H)."""
    D, B, G = gates_x.shape
    h = gates_x.new_zeros(D, B, G // 4)
    c = torch.zeros_like(h)
    outs = []
    for _ in range(steps):
        # PyTorch's gate order
        i, f, g, o = torch.baddbmm(gates_x, h, w_hh.transpose(1, 2)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return h, torch.stack(outs)


def gru_loop(gates_x, w_hh, b_hh, steps):
    """GRU recurrence as lstm_loop: gates_x (D, B, 3H) = W_ih x + b_ih, the same at every step;
    b_hh (D, 1, 3H) stays apart, since the reset gate scales the hidden part of the new gate."""
    D, B, G = gates_x.shape
    x_r, x_z, x_n = gates_x.chunk(3, -1)
    h = gates_x.new_zeros(D, B, G // 3)
    outs = []
    for _ in range(steps):
        # PyTorch's gate order
        h_r, h_z, h_n = torch.baddbmm(b_hh, h, w_hh.transpose(1, 2)).chunk(3, -1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
        outs.append(h)
    return h, torch.stack(outs)


READOUTS = ("last", "mean", "attention")


class AttentionPool(nn.Module):
    """A learned attention pooling over steps: softmax over t of a linear score of each output."""
    def __init__(self, dim):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, seq):  # (B, T, C) -> (B, C)
        weights = torch.softmax(self.score(seq), dim=1)  # (B, T, 1)
        return (weights * seq).sum(1)


def readout_features(readout, seq, h_last, pool=None):
    """The features a head reads: "last" the final states h_last (D, B, H) side by side, "mean"
    the top layer's outputs seq (B, T, D*H) averaged over steps, "attention" pooled by `pool`."""
    if readout == "mean":
        return seq.mean(1)
    if readout == "attention":
        return pool(seq)
    # (B, D*H): [forward final, backward final]
    return h_last.transpose(0, 1).reshape(h_last.shape[1], -1)


class BiLSTMFC(nn.Module):
    """Bidirectional LSTM (or GRU, `cell`) reading the final hidden state of both directions
    (or, `readout`, the outputs' mean or attention pooling over steps), then two fully
    connected layers: 2H -> fc -> ReLU -> classes (the test task: LSTM, H = 32, fc = 100).

    The first layer's input projection W_ih x is pulled out of the recurrence (`in_proj`), so
    that over the identity sequence, where every step is the same vector, it is computed once
    per image instead of once per step (`hoist`); for both cells the input enters the gates
    only through W_ih x + b_ih, so this holds for the GRU too. Only layer 1 can be hoisted: its
    outputs differ from step to step, so layers 2+ are a plain nn.LSTM / nn.GRU. The recurrence
    of layer 1 is an nn.LSTM / nn.GRU per direction whose input weight is a fixed identity
    matrix, so precomputed gate pre-activations run on the fused kernel (`recurrence="fused"`);
    on the hoisted path a small loop advancing both directions in one batched matmul per step
    (`"loop"`) is the default, as it ran faster on CPU (docs/speed.md). Either way the results
    equal nn.LSTM / nn.GRU on the repeated sequence (tests/test_models.py)."""

    CELLS = {"lstm": (nn.LSTM, 4), "gru": (nn.GRU, 3)}  # class, gates

    def __init__(self, *, in_features, num_classes, cell="lstm", hidden=32, layers=1, fc=100,
                 dropout=0.0, bidirectional=True, readout="last", hoist=True, recurrence="loop"):
        super().__init__()
        _check_sizes(layers=layers, hidden=hidden, fc=fc)
        _check_choice("cell", cell, list(self.CELLS))
        _check_choice("readout", readout, READOUTS)
        _check_choice("recurrence", recurrence, ["fused", "loop"])
        self.cell, self.readout, self.hoist, self.recurrence = cell, readout, hoist, recurrence
        self.hidden, self.dirs = hidden, 2 if bidirectional else 1
        rnn, gates = self.CELLS[cell]
        D, H, G = self.dirs, hidden, gates * hidden
        self.in_proj = nn.Linear(in_features, D * G)  # layer-1 W_ih and b_ih of every direction
        self.recur = nn.ModuleList(rnn(G, H, batch_first=True) for _ in range(D))
        for r in self.recur:  # input weight fixed to I: gate pre-activations pass straight through
            r.weight_ih_l0 = nn.Parameter(torch.eye(G), requires_grad=False)
            r.bias_ih_l0 = nn.Parameter(torch.zeros(G), requires_grad=False)
        self.upper = (rnn(D * H, H, layers - 1, batch_first=True, bidirectional=bidirectional,
                          dropout=dropout if layers > 2 else 0.0)
                      if layers > 1 else None)  # self.drop before it
        self.pool = AttentionPool(D * H) if readout == "attention" else None
        self.drop = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(D * H, fc), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(fc, num_classes))

    def forward(self, x):  # x: (B, T, F)
        B, T, _ = x.shape
        # every step is the same vector (the identity sequence)
        if self.hoist and T > 1 and x.stride(1) == 0:
            gates = self.in_proj(x[:, 0])  # (B, D*G): once per image, not once per step
            seq, h_last = (self._loop if self.recurrence == "loop" else self._fused)(gates, T)
        else:
            seq, h_last = self._fused(self.in_proj(x), T)  # (B, T, D*G)
        if self.upper is not None:
            seq, h_n = self.upper(self.drop(seq))
            h_last = (h_n[0] if isinstance(h_n, tuple) else h_n)[-self.dirs:]  # the LSTM's (h, c)
        return self.head(self.drop(readout_features(self.readout, seq, h_last, self.pool)))

    def _fused(self, gates, T):
        """Layer 1 on the fused kernel: gates (B, T, D*G), or (B, D*G) for every step."""
        if gates.ndim == 2:
            gates = gates.unsqueeze(1).expand(-1, T, -1)
        gates = gates.chunk(self.dirs, -1)  # D x (B, T, G)
        outs, h_last = [], []
        for d, r in enumerate(self.recur):
            out, h_n = r(gates[d].flip(1) if d else gates[d])
            outs.append(out.flip(1) if d else out)  # the backward direction back to input positions
            h_last.append((h_n[0] if isinstance(h_n, tuple) else h_n)[0])
        return torch.cat(outs, -1), torch.stack(h_last)  # (B, T, D*H), (D, B, H)

    def _loop(self, gates, T):
        """Layer 1 as a Python loop over steps for gates (B, D*G) that are the same at every
        step."""
        B, D, H = gates.shape[0], self.dirs, self.hidden
        w_hh = torch.stack([r.weight_hh_l0 for r in self.recur])  # (D, G, H)
        b_hh = torch.stack([r.bias_hh_l0 for r in self.recur]).unsqueeze(1)  # (D, 1, G)
        gates = gates.view(B, D, -1).transpose(0, 1)  # (D, B, G)
        if self.cell == "lstm":
            h_last, outs = lstm_loop(gates + b_hh, w_hh, T)  # (D, B, H), (T, D, B, H)
        else:
            h_last, outs = gru_loop(gates, w_hh, b_hh, T)
        if self.upper is None and self.readout == "last":
            return None, h_last
        seq = outs.permute(2, 0, 1, 3)  # (B, T, D, H)
        if D == 2:  # the backward direction's step t saw inputs T-1-t..T-1: back to input positions
            seq = torch.stack([seq[:, :, 0], seq[:, :, 1].flip(1)], 2)
        return seq.reshape(B, T, D * H), h_last


def reference_rnn(model: BiLSTMFC) -> nn.RNNBase:
    """A plain nn.LSTM / nn.GRU holding the same weights as `model`'s recurrent layers (for the
    equivalence tests and the naive baseline of the benchmark)."""
    D, H = model.dirs, model.hidden
    layers = 1 + (model.upper.num_layers if model.upper else 0)
    rnn = BiLSTMFC.CELLS[model.cell][0]
    ref = rnn(model.in_proj.in_features, H, layers, batch_first=True, bidirectional=D == 2,
              dropout=model.upper.dropout if model.upper else 0.0)
    w_ih, b_ih = model.in_proj.weight.chunk(D), model.in_proj.bias.chunk(D)
    with torch.no_grad():
        for d, suffix in enumerate(["", "_reverse"][:D]):
            getattr(ref, f"weight_ih_l0{suffix}").copy_(w_ih[d])
            getattr(ref, f"bias_ih_l0{suffix}").copy_(b_ih[d])
            getattr(ref, f"weight_hh_l0{suffix}").copy_(model.recur[d].weight_hh_l0)
            getattr(ref, f"bias_hh_l0{suffix}").copy_(model.recur[d].bias_hh_l0)
        for name, p in (model.upper.named_parameters() if model.upper else []):
            kind, layer = name.rsplit("_l", 1)  # weight_ih_l0_reverse -> weight_ih, 0_reverse
            num, _, suffix = layer.partition("_")
            getattr(ref, f"{kind}_l{int(num) + 1}{'_' + suffix if suffix else ''}").copy_(p)
    return ref


class ReferenceBiLSTMFC(nn.Module):
    """The same network on a plain nn.LSTM / nn.GRU over the explicitly repeated sequence (the
    naive baseline)."""
    def __init__(self, model: BiLSTMFC):
        super().__init__()
        import copy
        self.rnn, self.head, self.dirs = reference_rnn(model), copy.deepcopy(model.head), model.dirs
        self.readout, self.pool = model.readout, copy.deepcopy(model.pool)

    def forward(self, x):  # (B, T, F), materialised
        seq, h_n = self.rnn(x.contiguous())
        h_n = h_n[0] if isinstance(h_n, tuple) else h_n
        return self.head(readout_features(self.readout, seq, h_n[-self.dirs:], self.pool))


class RNNClassifier(nn.Module):
    """A recurrent network on any (B, T, F) sequence and a linear head: `cell` "rnn" (Elman's
    tanh RNN, 1990), "gru" (Cho et al., EMNLP 2014) or "lstm" (Hochreiter & Schmidhuber, 1997),
    as PyTorch's fused nn.RNN / nn.GRU / nn.LSTM; uni- or bidirectional, `layers` deep, dropout
    between layers and before the head.

    readout "last": the top layer's final hidden state (both directions' when bidirectional: the
    forward one after step T, the backward one after step 1); "mean": the top layer's outputs
    averaged over steps; "attention": a learned attention pooling of them (readout_features).
    The presets lstm_rows_mnist and lstm_pixels_mnist are the classic sequential-MNIST LSTM
    (3 layers x 128, unidirectional, last state): rows read 28 steps of 28 pixels, pixels 784
    steps of 1 (Le, Jaitly & Hinton, 2015, "A simple way to initialize recurrent
    networks of rectified linear units", introduced pixel-by-pixel MNIST)."""

    input_form = "sequence"
    CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(self, *, in_features, num_classes, cell="lstm", hidden=128, layers=1,
                 bidirectional=False, dropout=0.0, readout="last"):
        super().__init__()
        _check_choice("cell", cell, list(self.CELLS))
        _check_choice("readout", readout, READOUTS)
        _check_sizes(in_features=in_features, hidden=hidden, layers=layers)
        self.cell, self.hidden, self.layers, self.readout = cell, hidden, layers, readout
        self.dirs = 2 if bidirectional else 1
        self.rnn = self.CELLS[cell](in_features, hidden, layers, batch_first=True,
                                    bidirectional=bidirectional,
                                    dropout=dropout if layers > 1 else 0.0)
        self.pool = AttentionPool(self.dirs * hidden) if readout == "attention" else None
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.dirs * hidden, num_classes)

    def forward(self, x):  # (B, T, F)
        out, h_n = self.rnn(x.contiguous())  # identity sequences arrive as stride-0 views
        h_n = h_n[0] if isinstance(h_n, tuple) else h_n  # the LSTM's (h, c)
        return self.head(self.drop(readout_features(self.readout, out, h_n[-self.dirs:],
                                                    self.pool)))


# ---- image models: (B, C, H, W), or the rows layout (B, H, W*C) folded back into the image

def _image_geometry(in_features, channels, image_size):
    """channels and image size of an image model built for rows of in_features = W*C."""
    _check_sizes(in_features=in_features, channels=channels)
    if in_features % channels:
        raise ValueError(f"in_features={in_features} is not a multiple of channels={channels}: "
                         f"image models read the rows layout (B, H, W*C), so in_features = W*C; "
                         f"pass channels=C")
    image_size = in_features // channels if image_size is None else image_size
    _check_sizes(image_size=image_size)
    return channels, image_size


class ImageInput:
    """Mixin of the image models: `as_image` takes (B, C, H, W) images as they are and folds the
    `rows` transform's (B, H, W*C) back into them (rows: x.permute(0, 2, 3, 1).reshape(B, H, W*C)).
    Sides that are not multiples of `pad_multiple` (the model's total stride) get zero padding at
    the bottom and right, so any height and width run."""

    input_form = "image"
    channels = 3
    pad_multiple = 1

    def as_image(self, x):
        if x.ndim == 3:
            B, H, WC = x.shape
            if WC % self.channels:
                raise ValueError(f"a rows sequence (B, H, W*C) with F={WC} cannot hold "
                                 f"{self.channels}-channel pixels: pass channels=C to create_model")
            x = x.reshape(B, H, WC // self.channels, self.channels).permute(0, 3, 1, 2)
        elif x.ndim != 4:
            raise ValueError(f"image models take (B, C, H, W) images or rows sequences "
                             f"(B, H, W*C), got shape {tuple(x.shape)}")
        m = self.pad_multiple
        pad_h, pad_w = -x.shape[-2] % m, -x.shape[-1] % m
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class BiLSTM1d(nn.Module):
    """The Vanilla Sequencer's token mixer (Tatsunami & Taki, NeurIPS 2022, Fig. 2d): one BiLSTM
    over the H*W tokens in raster order, then a linear layer back to the channel width. Takes
    timm's `rnn_layer` arguments, so it drops into timm's Sequencer2d blocks in place of LSTM2d."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, bidirectional=True,
                 union="cat", with_fc=True, **_):
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers, bias=bias, batch_first=True,
                           bidirectional=bidirectional)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), input_size)

    def forward(self, x):  # (B, H, W, C), timm's NHWC
        B, H, W, C = x.shape
        y, _ = self.rnn(x.reshape(B, H * W, C))
        return self.fc(y).reshape(B, H, W, C)


TOKEN_MIXERS = {"lstm2d": LSTM2d, "lstm1d": BiLSTM1d}


class SequencerImage(ImageInput, Sequencer2d):
    """Sequencer2D (Tatsunami & Taki, "Sequencer: Deep LSTM for Image Classification", NeurIPS
    2022): timm's `Sequencer2d`, unchanged, behind the image input of this project (a subclass,
    so the state dict is timm's). Patch embedding, then stages of pre-norm blocks: a BiLSTM2D token
    mixer (a vertical and a horizontal BiLSTM over the token grid, concatenated and fused by a
    linear layer; timm's LSTM2d) and a channel MLP, with a patch-merging downsampling conv between
    stages, global average pooling and a linear head.

    Scaled down for 32x32 inputs: the ImageNet presets (Sequencer2D-S: layers 4-3-8-3, -M:
    4-3-14-3; dims 192-384-384-384, LSTM hidden 48-96-96-96, patch sizes 7-2-2-1 on 224x224 images,
    a 32x32 token grid) would see a 4x4 grid with patch 7 on CIFAR and are far too slow for a CPU.
    Here: stem patch 2 (a 16x16 grid, then 8x8, 4x4, 4x4: the ImageNet progression at half the
    grid side), the same four stages at about half the depth (S: 2-2-4-2, M: 2-2-7-2, keeping the
    deep third stage), a quarter of the widths (dims 48-96-96-96, hidden 12-24-24-24: timm's
    hidden = dim / 4) and timm's MLP ratio 3. `token_mixer` "lstm1d" gives the Vanilla Sequencer
    (BiLSTM1d over the flattened tokens instead of BiLSTM2D).

    `layers`, `patch_sizes`, `dims`, `hidden_sizes`: one entry per stage (`layers` may be one int
    for every stage)."""

    def __init__(self, *, in_features, num_classes, channels=3, image_size=None,
                 layers=(2, 2, 4, 2), patch_sizes=(2, 2, 2, 1), dims=(48, 96, 96, 96),
                 hidden_sizes=(12, 24, 24, 24), mlp_ratio=3.0, token_mixer="lstm2d", dropout=0.0,
                 drop_path=0.0):
        channels, image_size = _image_geometry(in_features, channels, image_size)
        _check_choice("token_mixer", token_mixer, list(TOKEN_MIXERS))
        patch_sizes, dims, hidden_sizes = tuple(patch_sizes), tuple(dims), tuple(hidden_sizes)
        layers = (layers,) * len(dims) if isinstance(layers, numbers.Integral) else tuple(layers)
        _check_sizes(layers=layers, patch_sizes=patch_sizes, dims=dims, hidden_sizes=hidden_sizes)
        if not len(layers) == len(patch_sizes) == len(dims) == len(hidden_sizes):
            raise ValueError(f"layers, patch_sizes, dims and hidden_sizes need one entry per "
                             f"stage, got {layers}, {patch_sizes}, {dims}, {hidden_sizes}")
        super().__init__(num_classes=num_classes, img_size=image_size, in_chans=channels,
                         layers=layers, patch_sizes=patch_sizes, embed_dims=dims,
                         hidden_sizes=hidden_sizes, mlp_ratios=(float(mlp_ratio),) * len(dims),
                         rnn_layer=TOKEN_MIXERS[token_mixer], drop_rate=dropout,
                         drop_path_rate=drop_path)
        self.channels, self.image_size = channels, image_size
        self.pad_multiple = math.prod(patch_sizes)

    def forward(self, x):
        return super().forward(self.as_image(x))


def _nearest_divisor(n, target=6):
    """The divisor of n nearest to target (ties: the smaller one): ViT's patch size."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))


class ViTImage(ImageInput, VisionTransformer):
    """Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021): timm's
    `VisionTransformer`, unchanged, behind the image input of this project (a subclass). Small for
    CPU and 28-32 pixel images: embed 64, depth 6 (`layers`), 8 heads, MLP hidden 128 (mlp_ratio 2),
    a CLS token read by the head (readout "cls"; "mean": average of the patch tokens, no CLS).

    patch_size: by default the divisor of image_size nearest to 6, ties going to the smaller one
    (32 -> 4: an 8x8 grid of 64 tokens; 28 -> 7: 4x4). Other image sizes run too (timm's dynamic
    image size: the learned positions are resampled, sides padded to a multiple of the patch)."""

    def __init__(self, *, in_features, num_classes, channels=3, image_size=None, patch_size=None,
                 dim=64, layers=6, heads=8, mlp_ratio=2.0, dropout=0.0, drop_path=0.0,
                 readout="cls"):
        channels, image_size = _image_geometry(in_features, channels, image_size)
        _check_choice("readout", readout, ["cls", "mean"])
        patch_size = _nearest_divisor(image_size) if patch_size is None else patch_size
        _check_sizes(patch_size=patch_size, dim=dim, layers=layers, heads=heads)
        if image_size % patch_size:
            valid = [d for d in range(1, image_size + 1) if image_size % d == 0]
            raise ValueError(f"patch_size={patch_size} does not divide image_size={image_size}: "
                             f"valid patch sizes are {valid}")
        if dim % heads:
            raise ValueError(f"heads={heads} does not divide dim={dim}")
        super().__init__(img_size=image_size, patch_size=patch_size, in_chans=channels,
                         num_classes=num_classes,
                         global_pool="token" if readout == "cls" else "avg",
                         class_token=readout == "cls", embed_dim=dim, depth=layers,
                         num_heads=heads, mlp_ratio=mlp_ratio, drop_rate=dropout,
                         proj_drop_rate=dropout, drop_path_rate=drop_path, dynamic_img_size=True,
                         dynamic_img_pad=True)
        self.channels, self.image_size, self.patch_size = channels, image_size, patch_size

    def forward(self, x):
        return super().forward(self.as_image(x))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with batch norm, a 1x1 conv shortcut when the shape
    changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class CifarResNet(ImageInput, nn.Module):
    """The CIFAR ResNet of He et al. ("Deep Residual Learning for Image Recognition", CVPR 2016,
    section 4.2): a 3x3 stem at full 32x32 resolution, three stages of `layers` basic blocks with
    `width`, 2x and 4x channels (stride 2 between stages: 32 -> 16 -> 8), global average pooling
    and a linear head; 6 * layers + 2 weighted layers (default layers=3: ResNet-20, 0.27M
    parameters, 91.3% on CIFAR-10 in the paper). Adapted: 1x1 conv shortcuts (the paper's option
    B) instead of zero-padded identity shortcuts. A teacher for distillation (fast_cnn is the
    faster one; its accuracy here: docs/results.md)."""

    def __init__(self, *, in_features, num_classes, channels=3, image_size=None, layers=3,
                 width=16):
        super().__init__()
        channels, image_size = _image_geometry(in_features, channels, image_size)
        layers = (layers,) * 3 if isinstance(layers, numbers.Integral) else tuple(layers)
        _check_sizes(layers=layers, width=width)
        self.channels, self.image_size = channels, image_size
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks, c = [], width
        for stage, n in enumerate(layers):
            c_out = width * 2 ** stage
            for i in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if stage and i == 0 else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.blocks(self.stem(self.as_image(x)))
        return self.head(x.mean((2, 3)))


class ConvGroup(nn.Module):
    """airbench's block: a 3x3 conv, 2x2 max pooling (halving the side, rounding up), batch norm,
    GELU, then a 3x3 conv, batch norm, GELU."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2, ceil_mode=True)))
        return F.gelu(self.norm2(self.conv2(x)))


class FastCifarNet(ImageInput, nn.Module):
    """The fast-training CIFAR net of airbench (Jordan, "94% on CIFAR-10 in 3.29 Seconds on a
    Single GPU", 2024; airbench93's widths): a 3x3 stem conv, three ConvGroups of `widths`
    channels (32 -> 16 -> 8 -> 4 pixels), global max pooling and a linear head; 0.6M parameters,
    about 0.07 GMAC per 32x32 image forward, a quarter of airbench94's (widths 64-256-256).
    Without airbench's whitening initialisation and lookahead; trained by seqlab's
    TEACHER_RECIPE, which also gives it airbench's test-time augmentation
    (TEST_VIEWS["flip_shift"]). Runs in channels-last memory layout, which oneDNN's CPU
    convolutions take faster. The default teacher."""

    def __init__(self, *, in_features, num_classes, channels=3, image_size=None,
                 widths=(64, 128, 128), stem=32):
        super().__init__()
        channels, image_size = _image_geometry(in_features, channels, image_size)
        widths = tuple(widths)
        _check_sizes(widths=widths, stem=stem)
        self.channels, self.image_size = channels, image_size
        self.stem = nn.Sequential(nn.Conv2d(channels, stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem), nn.GELU())
        self.groups = nn.Sequential(*(ConvGroup(c_in, c_out)
                                      for c_in, c_out in zip((stem,) + widths, widths)))
        self.head = nn.Linear(widths[-1], num_classes)
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = self.as_image(x).contiguous(memory_format=torch.channels_last)
        return self.head(self.groups(self.stem(x)).amax((2, 3)))


# ---- Long Range Arena pixel models: the image as a sequence of pixels (B, H*W, C)

class TrellisNet(nn.Module):
    """TrellisNet (Bai, Kolter & Koltun, "Trellis Networks for Sequence Modeling", ICLR 2019): a
    temporal convolutional network whose one causal convolution is shared by every level, with the
    input injected at every level and an LSTM-style gated activation. Level i + 1 at step t:

        z = W_x * x[t-d, t] + W_h * h_i[t-d, t] + b        (kernel 2, dilation d)
        c_{i+1}[t] = sigmoid(f) c_i[t-d] + sigmoid(i) tanh(g)
        h_{i+1}[t] = sigmoid(o) tanh(c_{i+1}[t])

    with the gates (i, o, g, f) the four channel groups of z (W_x * x is computed once per d). As in
    the authors' sequential MNIST / CIFAR setup: kernel 2, dilations 1, 1, 2, 4, ..., 512 over 11
    levels (receptive field 1,025 steps: the whole 1,024-pixel sequence), a linear head on the top
    level's last step. Adapted for CPU: 32 hidden units (the authors: 130) and none of their weight
    normalisation, weight dropout or auxiliary losses. `layers` is the number of levels; on
    sequences much shorter than 1,024 steps drop the levels whose dilation exceeds the length
    (layers=7: receptive field 65 for 8x8 images), as levels that only see padding slow training
    down. Causal: `features(x)[:, t]` depends on x[:, :t+1] only (tests/test_zoo.py)."""

    input_form = "pixels"

    def __init__(self, *, in_features, num_classes, hidden=32, layers=11, kernel_size=2,
                 dilations=(1, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512), dropout=0.0):
        super().__init__()
        dilations = tuple(dilations)
        _check_sizes(in_features=in_features, hidden=hidden, layers=layers, kernel_size=kernel_size,
                     dilations=dilations)
        self.hidden, self.levels = hidden, layers
        self.kernel_size, self.dilations = kernel_size, dilations
        # input injection: W_x
        self.inject = nn.Conv1d(in_features, 4 * hidden, kernel_size, bias=False)
        # the convolution every level shares: W_h, b
        self.conv = nn.Conv1d(hidden, 4 * hidden, kernel_size)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x):
        """The top level's hidden state at every step: (B, T, F) -> (B, T, hidden), causal."""
        x = x.transpose(1, 2)  # (B, F, T)
        B, T = x.shape[0], x.shape[2]
        h = x.new_zeros(B, self.hidden, T)
        c = torch.zeros_like(h)
        # W_h * h + W_x * x as one convolution of [h; x]: the input injection rides along as F
        # more input channels (a convolution of its own per dilation cost as much as the shared
        # one: with F = 1 its kernel ran far below the machine's rate)
        weight = torch.cat([self.conv.weight, self.inject.weight], 1)  # (4H, H + F, k)
        for level in range(self.levels):
            d = self.dilations[level % len(self.dilations)]
            pad = (self.kernel_size - 1) * d  # left padding only: causal
            z = F.conv1d(F.pad(torch.cat([h, x], 1), (pad, 0)), weight, self.conv.bias, dilation=d)
            i, o, g, f = z.chunk(4, 1)
            c_prev = F.pad(c, (d, 0))[:, :, :T]  # the level below's cell state at t - d
            c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return h.transpose(1, 2)

    def forward(self, x):
        return self.head(self.drop(self.features(x)[:, -1]))


class LipschitzRNN(nn.Module):
    """Lipschitz RNN (Erichson, Azencot, Queiruga, Hodgkinson & Mahoney, "Lipschitz Recurrent
    Neural Networks", ICLR 2021): the continuous-time system h' = A h + tanh(W h + U x + b)
    discretised by forward Euler,

        h <- h + eps * (A h + tanh(W h + U x_t + b)),
        A = (1 - beta)(M_A + M_A^T) + beta (M_A - M_A^T) - gamma_a I,
        W = (1 - beta)(M_W + M_W^T) + beta (M_W - M_W^T) - gamma_w I,

    so beta trades a symmetric part against a skew-symmetric one and gamma shifts the spectrum left.
    Initialised as the authors' code does (erichson/LipschitzRNN since November 2020): M_A and M_W
    drawn from N(0, (init_std / hidden)^2) with init_std 0.1, their driver's default, which their
    README's pixel-MNIST commands keep (before, the driver's default was 6 and the README's 32,
    which puts A's spectrum at real part 1.3: the state grows to norm ~7e4 over 1,024 steps); U,
    b and the linear readout of the last state keep PyTorch's default initialisation (they
    dropped their Xavier-normal / zero-bias one then). Defaults: 128 units, eps 0.01, beta 0.65,
    gamma 0.001; their README runs pixel MNIST (784 steps) with eps 0.03, beta 0.75, gamma 0.001
    and Adam at lr 0.003, without gradient clipping (their 2020 driver clipped norms at 10: report
    parameter `grad_clip`). eps sets how far 1,024 (or 784) steps integrate; scale it up for much
    shorter sequences (eps=0.1 for 64 steps). Adapted: `layers` > 1 stacks cells (each reads the
    states of the one below); the authors use one."""

    input_form = "pixels"

    def __init__(self, *, in_features, num_classes, hidden=128, layers=1, eps=0.01, beta=0.65,
                 gamma_a=0.001, gamma_w=0.001, init_std=0.1, dropout=0.0):
        super().__init__()
        _check_sizes(in_features=in_features, hidden=hidden, layers=layers)
        if not 0 <= beta <= 1 or eps <= 0:
            raise ValueError(f"need 0 <= beta <= 1 and eps > 0, got beta={beta}, eps={eps}")
        self.hidden, self.layers, self.eps = hidden, layers, eps
        self.beta, self.gamma_a, self.gamma_w = beta, gamma_a, gamma_w
        self.U = nn.ModuleList(nn.Linear(in_features if i == 0 else hidden, hidden)
                               for i in range(layers))

        def gaussian():
            return nn.Parameter(torch.randn(hidden, hidden) * init_std / hidden)
        self.M_A = nn.ParameterList(gaussian() for _ in range(layers))
        self.M_W = nn.ParameterList(gaussian() for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def _structured(self, M, gamma):
        return ((1 - self.beta) * (M + M.T) + self.beta * (M - M.T)
                - gamma * torch.eye(len(M), device=M.device))

    def A(self, layer=0):
        return self._structured(self.M_A[layer], self.gamma_a)

    def W(self, layer=0):
        return self._structured(self.M_W[layer], self.gamma_w)

    def forward(self, x):  # (B, T, F)
        seq = x
        for layer in range(self.layers):
            z = self.U[layer](seq)  # (B, T, H): U x_t + b for every step at once
            # A h and W h in one matmul per step
            AW = torch.cat([self.A(layer), self.W(layer)]).T  # (H, 2H)
            h = z.new_zeros(z.shape[0], self.hidden)
            states = []
            # unbind, not z[:, t]: its backward would add T full-size gradients
            for z_t in z.unbind(1):
                ah, wh = (h @ AW).chunk(2, -1)
                h = h + self.eps * (ah + torch.tanh(wh + z_t))
                states.append(h)
            seq = torch.stack(states, 1) if layer < self.layers - 1 else None
        return self.head(self.drop(h))


def _pixel_embedding(in_features, dim, seq_len):
    """Linear projection of each step's (normalised) values and learned positions, both initialised
    as in ViT (truncated normal, std 0.02): with PyTorch's default init a projection of one grey
    value (fan-in 1) would start 30x larger than the positions and drown them."""
    _check_sizes(in_features=in_features, dim=dim, seq_len=seq_len)
    embed, pos = nn.Linear(in_features, dim), nn.Parameter(torch.zeros(1, seq_len, dim))
    nn.init.trunc_normal_(embed.weight, std=0.02)
    nn.init.zeros_(embed.bias)
    nn.init.trunc_normal_(pos, std=0.02)
    return embed, pos


def _positions(pos, T):
    if T > pos.shape[1]:
        raise ValueError(f"a sequence of {T} steps is longer than the model's "
                         f"seq_len={pos.shape[1]} learned positions: create it with "
                         f"seq_len >= {T}")
    return pos[:, :T]


class PixelTransformer(VisionTransformer):
    """Pixel Transformer, PiT (Nguyen, Mahmoud, ..., Snoek & Chen, "An Image is Worth More Than
    16x16 Patches: Exploring Transformers on Individual Pixels", 2024): ViT with patch size 1, every
    pixel a token. timm's `VisionTransformer` with `patch_size=1`, behind the pixel input of this
    project: the sequence (B, H*W, C) is folded back into the (B, C, H, W) image it came from (a
    square of seq_len pixels) and embedded by timm's 1x1 patch convolution (a linear projection of
    each pixel's values) plus learned positions, then pre-norm blocks (GELU MLP), a final LayerNorm
    and a CLS token read by the head (readout "cls"; "mean": average over tokens, no CLS). Adapted:
    the Long Range Arena image-task size (Tay et al., ICLR 2021, as in the Nystromformer authors'
    config: width 64, 2 layers, 2 heads, MLP 128) instead of ViT-S, for CPU; no position for the CLS
    token (timm's no_embed_class). seq_len: the number of learned positions (1,024 for 32x32); a
    shorter square sequence (784 MNIST pixels) gets them resampled to its grid (timm's dynamic image
    size)."""

    input_form = "pixels"

    def __init__(self, *, in_features, num_classes, seq_len=1024, dim=64, layers=2, heads=2,
                 mlp=128, dropout=0.0, readout="cls"):
        _check_choice("readout", readout, ["cls", "mean"])
        _check_sizes(in_features=in_features, seq_len=seq_len, dim=dim, layers=layers, heads=heads,
                     mlp=mlp)
        side = math.isqrt(seq_len)
        if side * side != seq_len:
            raise ValueError(f"seq_len={seq_len} is not a square number of pixels (H*W with H = W)")
        if dim % heads:
            raise ValueError(f"heads={heads} does not divide dim={dim}")
        super().__init__(img_size=side, patch_size=1, in_chans=in_features, num_classes=num_classes,
                         global_pool="token" if readout == "cls" else "avg",
                         class_token=readout == "cls",
                         no_embed_class=True, embed_dim=dim, depth=layers, num_heads=heads,
                         mlp_ratio=mlp / dim, proj_drop_rate=dropout, attn_drop_rate=dropout,
                         dynamic_img_size=True)
        self.seq_len = seq_len
        # PyTorch's default init would start a 1x1 projection of one grey value (fan-in 1) 30x
        # larger than timm's positions (std 0.02) and drown them: initialise it like them.
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward(self, x):  # (B, T, C), T = H*W pixels in raster order
        B, T, C = x.shape
        side = math.isqrt(T)
        if T > self.seq_len or side * side != T:
            raise ValueError(f"PiT reads square images of at most seq_len={self.seq_len} pixels, "
                             f"got a sequence of {T} steps")
        image = x.reshape(B, side, side, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return super().forward(image)


def iterative_pinv(a, iterations=6):
    """Moore-Penrose pseudo-inverse of each matrix in `a` (..., m, m) by the Nystromformer's
    iteration (Razavi et al., 2014):

        Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4 from Z = A^T / (||A||_1 ||A||_inf)."""
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    norm = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)  # ||A||_1 ||A||_inf per matrix
    z = a.transpose(-1, -2) / norm[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nystrom approximation of Xiong et al. (AAAI 2021):

        softmax(Q K^T / sqrt(d)) V  ~  softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V

    (Q and K each scaled by d^-1/4), with landmarks Ql, Kl the means of `landmarks` equal segments
    of the queries and keys, and pinv the 6-iteration pseudo-inverse above. The sequence is
    zero-padded to a multiple of the number of landmarks (padded keys masked out of the last factor,
    as in the authors' code); fewer steps than landmarks use one landmark per step.
    `conv_kernel` > 0 adds the paper's skip connection: a depthwise convolution of the values along
    the sequence (35 in the authors' LRA runs). `forward(x, exact=True)` computes the exact softmax
    attention instead."""

    def __init__(self, dim, heads, landmarks=32, pinv_iterations=6, conv_kernel=35, dropout=0.0):
        super().__init__()
        _check_sizes(dim=dim, heads=heads, landmarks=landmarks, pinv_iterations=pinv_iterations)
        if dim % heads:
            raise ValueError(f"heads={heads} does not divide dim={dim}")
        self.heads, self.landmarks, self.pinv_iterations = heads, landmarks, pinv_iterations
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.conv = nn.Conv1d(heads, heads, conv_kernel, padding=conv_kernel // 2, groups=heads,
                              bias=False) if conv_kernel else None  # one kernel per head

    def forward(self, x, exact=False):  # (B, T, D)
        B, T, D = x.shape
        h, d = self.heads, D // self.heads
        # each (B, h, T, d)
        q, k, v = self.qkv(x).view(B, T, 3, h, d).permute(2, 0, 3, 1, 4).contiguous()
        if exact:
            out = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        else:
            m = min(self.landmarks, T)
            pad = -T % m
            q, k = q / d ** 0.25, k / d ** 0.25
            if pad:
                q, k, vp = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            else:
                vp = v
            ql = q.reshape(B, h, m, -1, d).mean(-2)  # (B, h, m, d): segment means
            kl = k.reshape(B, h, m, -1, d).mean(-2)
            k1 = F.softmax(q @ kl.transpose(-1, -2), -1)  # (B, h, T', m)
            k2 = F.softmax(ql @ kl.transpose(-1, -2), -1)  # (B, h, m, m)
            scores = ql @ k.transpose(-1, -2)  # (B, h, m, T')
            if pad:
                scores = scores.masked_fill(torch.arange(T + pad, device=x.device) >= T,
                                            float("-inf"))
            k3 = F.softmax(scores, -1)
            out = ((k1 @ iterative_pinv(k2, self.pinv_iterations)) @ (k3 @ vp))[:, :, :T]
        if self.conv is not None:
            # the head's kernel on each of its d channels: a depthwise conv1d over h*d (on CPU
            # faster than a Conv2d (K, 1))
            w = self.conv.weight.repeat_interleave(d, 0)  # (h*d, 1, K)
            conv = F.conv1d(v.transpose(2, 3).reshape(B, h * d, T), w, padding=self.conv.padding,
                            groups=h * d)
            out = out + conv.view(B, h, d, T).transpose(2, 3)
        return self.drop(self.proj(out.transpose(1, 2).reshape(B, T, D)))


class _PreNormBlock(nn.Module):
    def __init__(self, dim, mixer, mlp, dropout):
        super().__init__()
        self.norm1, self.mixer, self.norm2 = nn.LayerNorm(dim), mixer, nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Nystromformer(nn.Module):
    """Nystromformer (Xiong, Zeng, Chakraborty, Tan, Fung, Li & Singh, "Nystromformer: A
    Nystrom-Based Algorithm for Approximating Self-Attention", AAAI 2021) on pixel sequences: a
    linear projection of each pixel plus learned positions, pre-norm blocks of NystromAttention and
    an MLP, a final layer norm and mean pooling. Sizes from the authors' Long Range Arena image
    config: width 64, 2 layers, 2 heads, MLP 128, mean pooling; 32 landmarks and the depthwise
    value convolution of kernel 35 (their "nystrom-32")."""

    input_form = "pixels"

    def __init__(self, *, in_features, num_classes, seq_len=1024, dim=64, layers=2, heads=2,
                 mlp=128, landmarks=32, pinv_iterations=6, conv_kernel=35, dropout=0.0):
        super().__init__()
        _check_sizes(layers=layers, mlp=mlp)
        self.embed, self.pos = _pixel_embedding(in_features, dim, seq_len)
        self.blocks = nn.Sequential(*[
            _PreNormBlock(dim, NystromAttention(dim, heads, landmarks, pinv_iterations, conv_kernel,
                                                dropout), mlp, dropout)
            for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        z = self.blocks(self.embed(x) + _positions(self.pos, x.shape[1]))
        return self.head(self.norm(z).mean(1))


class FourierMixing(nn.Module):
    """FNet's token mixing: the real part of the 2-D FFT over the sequence and hidden dimensions."""

    def forward(self, x):  # (B, T, D)
        return torch.fft.fft2(x, dim=(-2, -1)).real


class FNet(nn.Module):
    """FNet (Lee-Thorp, Ainslie, Eckstein & Ontanon, "FNet: Mixing Tokens with Fourier Transforms",
    NAACL 2022): a transformer encoder whose self-attention is replaced by FourierMixing, post-norm
    blocks as in the paper (x = LN(x + mix(x)); x = LN(x + MLP(x))). Embedding: a linear projection
    of each pixel plus learned positions, then layer norm. Adapted: the Long Range Arena image size
    (width 64, 2 layers, MLP 128) and mean pooling (readout "mean"; "first": the first token, the
    paper's [CLS]-position pooling, here with no [CLS] token)."""

    input_form = "pixels"

    def __init__(self, *, in_features, num_classes, seq_len=1024, dim=64, layers=2, mlp=128,
                 dropout=0.0, readout="mean"):
        super().__init__()
        _check_choice("readout", readout, ["mean", "first"])
        _check_sizes(layers=layers, mlp=mlp)
        self.readout = readout
        self.embed, self.pos = _pixel_embedding(in_features, dim, seq_len)
        self.embed_norm = nn.LayerNorm(dim)
        self.mixing = FourierMixing()
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim),
                                                nn.Dropout(dropout)) for _ in range(layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        z = self.drop(self.embed_norm(self.embed(x) + _positions(self.pos, x.shape[1])))
        for norm1, mlp, norm2 in zip(self.norms1, self.mlps, self.norms2):
            z = norm1(z + self.mixing(z))
            z = norm2(z + mlp(z))
        return self.head(z.mean(1) if self.readout == "mean" else z[:, 0])


class SwapLH(torch.autograd.Function):
    """(B, L, H) <-> (B, H, L) as a contiguous copy, forward and backward alike. A plain
    `transpose(1, 2).contiguous()` hands its gradient back as a strided view, and every
    element-wise backward behind it (GELU's: 91 ms against 7 forward per S4D layer) then reads
    memory out of order."""

    @staticmethod
    def forward(ctx, x):
        return x.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(1, 2).contiguous()


class FFTConv(torch.autograd.Function):
    """The causal convolution y = (k * u)[:L] by FFT of n points: u (B, H, L), k (H, Lk), Lk <= n
    -> (B, H, L); n >= L + Lk - 1 makes it linear (S4D's bidirectional kernel of 2L taps, n = 2L,
    wraps on purpose: its second half reads the future). The backward is the two correlations
    with the saved spectra, grad_u = (g corr k)[:L] and grad_k = sum_b (g corr u)[:Lk], from one
    FFT of g: autograd's chain took a full complex FFT (rfft's backward) and a zero-filled copy
    (the slice's) per layer instead."""

    @staticmethod
    def forward(ctx, u, k, n):
        U, K = torch.fft.rfft(u, n=n), torch.fft.rfft(k, n=n)
        ctx.save_for_backward(U, K)
        ctx.sizes = u.shape[-1], k.shape[-1], n
        return torch.fft.irfft(U * K, n=n)[..., : u.shape[-1]]

    @staticmethod
    def backward(ctx, grad):
        U, K = ctx.saved_tensors
        L, Lk, n = ctx.sizes
        G = torch.fft.rfft(grad, n=n)
        grad_u = torch.fft.irfft(G * K.conj(), n=n)[..., :L] if ctx.needs_input_grad[0] else None
        grad_k = None
        if ctx.needs_input_grad[1]:
            grad_k = torch.fft.irfft((G * U.conj()).sum(0), n=n)[..., :Lk]
        return grad_u, grad_k, None


def s4d_kernel(dt, A, C, L):
    """The convolution kernel of diagonal state-space models, zero-order hold: per channel and mode

        A_bar = exp(dt A),   B_bar = (A_bar - 1) / A * B   (B = 1: S4D learns C only),
        K[l] = 2 Re(sum_n C_n B_bar_n A_bar_n^l),   l = 0 .. L-1,

    a Vandermonde product. dt (..., H) step sizes, A and C (..., H, N/2) complex -> K (..., H, L).
    Each mode stands for itself and its complex conjugate (the real system has state size N):
    hence 2 Re. Factorised: with l = c j + k (c = ceil(sqrt(L))), A_bar^l = A_bar^(c j) A_bar^k,
    so two tables of c powers and one batched complex matmul replace L complex exponentials per
    mode (their exp and its backward were most of the kernel's time)."""
    dtA = dt.unsqueeze(-1) * A  # (..., H, N/2)
    c = math.isqrt(L - 1) + 1  # steps per chunk
    steps = torch.arange(c, device=A.device, dtype=dt.dtype)
    within = torch.exp(dtA.unsqueeze(-1) * steps)  # (..., H, N/2, c): A_bar^k
    starts = (c * steps[: -(-L // c)]).unsqueeze(-1)  # (L/c, 1): each chunk's first step, c j
    chunks = torch.exp(dtA.unsqueeze(-2) * starts)  # (..., H, L/c, N/2): A_bar^(c j)
    coef = (C * torch.expm1(dtA) / A).unsqueeze(-2)  # (..., H, 1, N/2): C B_bar
    K = (chunks * coef) @ within  # (..., H, L/c, c): chunk j, step k within it
    return 2 * K.real.flatten(-2)[..., :L]  # (..., H, L)


class S4DLayer(nn.Module):
    """One S4D layer on (B, L, H) sequences: per channel a diagonal state-space model
    (A, B = 1, C, D, step size dt) applied as a length-L convolution by FFT, then GELU, dropout and
    a position-wise GLU output layer (Linear H -> 2H, GLU). S4D-Lin initialisation:
    A_n = -1/2 + i pi n; log dt uniform in [log dt_min, log dt_max]; C complex standard normal.
    A and dt carry `_optim` (their own lr, no weight decay), the S4 authors' convention that
    `param_groups` reads.

    bidirectional: a second kernel (a second set of A, C, dt) reads the sequence backwards; both are
    laid into one kernel of length 2L, the backward one flipped into the second half, so one FFT
    convolution of size 2L applies both: step t sees steps <= t through the first and steps > t
    through the second (as in the authors' code). Dropout masks are shared by all steps of a channel
    (the authors' DropoutNd)."""

    def __init__(self, dim, *, state=64, bidirectional=False, dropout=0.0, ssm_lr=1e-3, dt_min=1e-3,
                 dt_max=1e-1):
        super().__init__()
        c, n = 1 + bidirectional, state // 2  # kernels (one per direction); modes (conjugate pairs)
        self.bidirectional, self.dropout = bidirectional, dropout
        self.log_dt = nn.Parameter(torch.rand(c, dim) * math.log(dt_max / dt_min)
                                   + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.full((c, dim, n), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(n, dtype=torch.float32).repeat(c, dim, 1))
        C = torch.randn(c, dim, n, dtype=torch.cfloat)
        self.C = nn.Parameter(torch.view_as_real(C))  # (c, H, N/2, 2): real and imaginary parts
        self.D = nn.Parameter(torch.randn(dim))
        for p in (self.log_dt, self.log_A_real, self.A_imag):
            p._optim = {"lr": ssm_lr, "weight_decay": 0.0}
        self.out = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GLU(-1))

    def ssm(self):
        """The continuous-time parameters: dt (c, H), A and C (c, H, N/2) complex; c = 2 if
        bidirectional."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        return torch.exp(self.log_dt), A, torch.view_as_complex(self.C)

    def kernel(self, L):
        """(H, L), or bidirectional (H, 2L): [forward kernel, backward kernel flipped]."""
        k = s4d_kernel(*self.ssm(), L)  # (c, H, L)
        if not self.bidirectional:
            return k[0]
        return F.pad(k[0], (0, L)) + F.pad(k[1].flip(-1), (L, 0))

    def conv_channels_first(self, u):
        """The state-space model alone, y = K * u + D u: (B, H, L) -> (B, H, L), channels first
        (the FFTs run along the last, contiguous dimension). D is the kernel's tap 0 (its impulse
        answer at step 0), so one FFT convolution applies both; its size 2L keeps the circular
        convolution from wrapping around."""
        L = u.shape[-1]
        k = self.kernel(L)  # (H, L) or (H, 2L)
        k = torch.cat([k[:, :1] + self.D.unsqueeze(-1), k[:, 1:]], -1)
        return FFTConv.apply(u, k, 2 * L)

    def conv(self, u):
        """conv_channels_first in the layer's layout: (B, L, H) -> (B, L, H)."""
        return self.conv_channels_first(u.transpose(1, 2)).transpose(1, 2)

    def forward(self, u):  # (B, L, H)
        # the model in (B, H, L), where the FFTs want the values; GELU and dropout there too
        # (dropout1d drops whole channels); one copy in and one out, each contiguous both ways
        y = self.conv_channels_first(SwapLH.apply(u))
        y = F.dropout1d(F.gelu(y), self.dropout, self.training)
        return self.out(SwapLH.apply(y))  # (B, L, H)


def _check_flag(**flags):
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be True or False, got {value!r}")


class S4D(nn.Module):
    """S4D (Gu, Gupta, Goel & Re, "On the Parameterization and Initialization of Diagonal State
    Space Models", NeurIPS 2022): a linear encoder of each step's values (no 0..255 tokens),
    `layers` S4DLayers of `dim` channels with state size `state` (N: N/2 complex modes and their
    conjugates), each in a residual block with LayerNorm (post-norm: x = LN(x + drop(S4D(x)));
    prenorm: x = x + drop(S4D(LN(x)))) and channel dropout, mean pooling over steps and a linear
    head. `ssm_lr` is the learning rate of A and dt (their weight decay 0): the authors' training
    recipe, honoured by `param_groups`.

    Adapted for a CPU: 4 layers x 64 channels (the authors' LRA Image model: 6 x 512, bidirectional,
    a 200-epoch schedule), unidirectional by default; the minimal S4D of the authors' code (B fixed
    at 1, C learned; no bottleneck or gating options). Causal unless bidirectional:
    `features(x)[:, t]` depends on x[:, :t+1] only (tests/test_s4d.py)."""

    input_form = "pixels"

    def __init__(self, *, in_features, num_classes, dim=64, layers=4, state=64, dropout=0.1,
                 prenorm=False, bidirectional=False, ssm_lr=1e-3, dt_min=1e-3, dt_max=1e-1):
        super().__init__()
        _check_sizes(in_features=in_features, dim=dim, layers=layers, state=state)
        if state % 2:
            raise ValueError(f"state must be even (N/2 complex modes and their conjugates), "
                             f"got {state!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not ssm_lr >= 0:
            raise ValueError(f"ssm_lr must be >= 0, got {ssm_lr!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
        _check_flag(prenorm=prenorm, bidirectional=bidirectional)
        self.prenorm, self.dropout = prenorm, dropout
        self.encoder = nn.Linear(in_features, dim)
        layer = partial(S4DLayer, dim, state=state, bidirectional=bidirectional, dropout=dropout,
                        ssm_lr=ssm_lr, dt_min=dt_min, dt_max=dt_max)
        self.layers = nn.ModuleList(layer() for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, num_classes)

    def features(self, x):
        """(B, L, F) -> (B, L, dim): the top layer's output at every step."""
        x = self.encoder(x)
        for layer, norm in zip(self.layers, self.norms):
            z = layer(norm(x) if self.prenorm else x).transpose(1, 2)  # (B, H, L)
            x = x + F.dropout1d(z, self.dropout, self.training).transpose(1, 2)
            x = x if self.prenorm else norm(x)
        return x

    def forward(self, x):  # (B, L, F)
        return self.head(self.features(x).mean(1))


# ---- modern recurrent image models: the image as patch tokens (ViL's mLSTM, Vim's Mamba)

class PatchTokens(nn.Module):
    """ViT's patch embedding: non-overlapping patch x patch squares of the image, each projected
    linearly (a convolution of stride patch), plus learned positions on the token grid (truncated
    normal, std 0.02), resampled bilinearly for other grids (as timm's dynamic image size).
    (B, C, H, W) -> (B, T, dim), T = (H / patch)(W / patch) tokens in raster order."""

    def __init__(self, channels, dim, patch, image_size):
        super().__init__()
        _check_sizes(channels=channels, dim=dim, patch_size=patch, image_size=image_size)
        side = -(-image_size // patch)  # the grid of a padded image
        self.proj = nn.Conv2d(channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, dim, side, side))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x):  # (B, C, H, W)
        z = self.proj(x)  # (B, D, H/p, W/p)
        pos = self.pos
        if pos.shape[-2:] != z.shape[-2:]:
            pos = F.interpolate(pos, size=z.shape[-2:], mode="bilinear", align_corners=False)
        return (z + pos).flatten(2).transpose(1, 2)  # (B, T, D)


def causal_conv1d(x, conv):
    """A depthwise nn.Conv1d of kernel k over (B, T, D), padded on the left: step t sees steps
    t-k+1 .. t."""
    k = conv.kernel_size[0]
    return conv(F.pad(x.transpose(1, 2), (k - 1, 0))).transpose(1, 2)  # (B, T, D)


def mlstm_parallel(q, k, v, i_pre, f_pre, eps=1e-6):
    """The mLSTM (Beck et al., xLSTM, 2024) in its parallel (quadratic) form: q, k, v
    (B, NH, T, DH) and the input and forget gates' pre-activations (B, NH, T) -> h (B, NH, T, DH).

        log D[t, s] = sum_{r=s+1..t} log sigmoid(f_r) + i_s   (s <= t; -inf above the diagonal)
        m_t = max_s log D[t, s]                                (the stabiliser, row by row)
        S = (q k^T / sqrt(DH)) * exp(log D - m),   h = S v / (max(|sum_s S[t, s]|, exp(-m_t)) + eps)

    the same numbers as mlstm_recurrent (tests/test_modern.py)."""
    T, DH = q.shape[-2:]
    log_f = F.logsigmoid(f_pre).cumsum(-1)  # (B, NH, T)
    log_d = log_f.unsqueeze(-1) - log_f.unsqueeze(-2) + i_pre.unsqueeze(-2)  # (B, NH, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    log_d = log_d.masked_fill(~causal, float("-inf"))
    m = log_d.amax(-1, keepdim=True)  # (B, NH, T, 1)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(DH) * torch.exp(log_d - m)  # (B, NH, T, T)
    normaliser = torch.maximum(s.sum(-1, keepdim=True).abs(), torch.exp(-m))
    return (s / (normaliser + eps)) @ v


def mlstm_recurrent(q, k, v, i_pre, f_pre, eps=1e-6):
    """The mLSTM step by step, in the stabilised state space (C~ = C exp(-m), n~ = n exp(-m)):

        m_t = max(log f_t + m_{t-1}, i_t),   f' = exp(log f_t + m_{t-1} - m_t),  i' = exp(i_t - m_t)
        C_t = f' C_{t-1} + i' v_t k_t^T,     n_t = f' n_{t-1} + i' k_t   (k scaled by 1/sqrt(DH))
        h_t = C_t q_t / (max(|n_t^T q_t|, exp(-m_t)) + eps)

    from C = 0, n = 0, m = -inf (so that m_t is the parallel form's row maximum)."""
    B, NH, T, DH = q.shape
    k = k / math.sqrt(DH)
    c, n = q.new_zeros(B, NH, DH, DH), q.new_zeros(B, NH, DH)  # C: (value, key)
    m = q.new_full((B, NH), float("-inf"))
    log_f, out = F.logsigmoid(f_pre), []
    for t in range(T):
        m_new = torch.maximum(log_f[..., t] + m, i_pre[..., t])  # (B, NH)
        f = torch.exp(log_f[..., t] + m - m_new).unsqueeze(-1)  # (B, NH, 1)
        i = torch.exp(i_pre[..., t] - m_new).unsqueeze(-1)
        q_t, k_t, v_t = q[:, :, t], k[:, :, t], v[:, :, t]  # (B, NH, DH)
        c = f.unsqueeze(-1) * c + (i * v_t).unsqueeze(-1) * k_t.unsqueeze(-2)  # (B, NH, DH, DH)
        n = f * n + i * k_t
        denominator = torch.maximum((n * q_t).sum(-1, keepdim=True).abs(),
                                    torch.exp(-m_new).unsqueeze(-1))
        out.append((c @ q_t.unsqueeze(-1)).squeeze(-1) / (denominator + eps))
        m = m_new
    return torch.stack(out, 2)  # (B, NH, T, DH)


MLSTM_MODES = {"parallel": mlstm_parallel, "recurrent": mlstm_recurrent}


class HeadwiseLinear(nn.Module):
    """xLSTM's headwise projection: a block-diagonal linear map of blocks of `block` features,
    weights normal with std sqrt(2 / (5 block)) (small init), zero bias."""

    def __init__(self, dim, block):
        super().__init__()
        if dim % block:
            raise ValueError(f"qkv_block={block} does not divide the inner width {dim}")
        self.weight = nn.Parameter(torch.randn(dim // block, block, block) * math.sqrt(0.4 / block))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):  # (B, T, D)
        blocks = x.unflatten(-1, (self.weight.shape[0], -1))  # (B, T, D/b, b)
        return torch.einsum("...hi,hoi->...ho", blocks, self.weight).flatten(-2) + self.bias


class MLSTMCell(nn.Module):
    """The mLSTM cell of xLSTM as ViL uses it: input and forget gates per head from [q, k, v]
    (weights zero; input-gate biases N(0, 0.1^2), forget-gate biases spaced 3 .. 6, so that
    sigmoid(f) starts near 1), the matrix memory in its `mode` ("parallel" for training,
    "recurrent": step by step, the same numbers), then a layer norm per head (a group norm)."""

    def __init__(self, dim, heads, *, mode="parallel"):
        super().__init__()
        _check_choice("mode", mode, list(MLSTM_MODES))
        if dim % heads:
            raise ValueError(f"heads={heads} does not divide the inner width {dim}")
        self.heads, self.mode = heads, mode
        self.igate, self.fgate = nn.Linear(3 * dim, heads), nn.Linear(3 * dim, heads)
        for gate in (self.igate, self.fgate):
            nn.init.zeros_(gate.weight)
        nn.init.normal_(self.igate.bias, std=0.1)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, heads))
        self.norm = nn.GroupNorm(heads, dim)

    def forward(self, q, k, v):  # (B, T, D) each
        B, T, D = q.shape
        gates = torch.cat([q, k, v], -1)  # (B, T, 3D)
        i_pre, f_pre = self.igate(gates).transpose(1, 2), self.fgate(gates).transpose(1, 2)

        def split(z):
            return z.reshape(B, T, self.heads, -1).transpose(1, 2)  # (B, NH, T, DH)
        h = MLSTM_MODES[self.mode](split(q), split(k), split(v), i_pre, f_pre)
        return self.norm(h.transpose(1, 2).reshape(B * T, D)).reshape(B, T, D)


class MLSTMBlock(nn.Module):
    """ViL's block (Alkin et al., 2024): x + mLSTM layer(LayerNorm(x)). The layer: an up-projection
    to 2 x expansion x dim, split into the mLSTM branch and the gate z; the mLSTM branch through a
    causal depthwise conv1d and SiLU (c), headwise projections q(c), k(c), v(branch), the MLSTMCell,
    a learnable skip of c, the output gate SiLU(z) (the o_t of xLSTM's mLSTM block) and a
    down-projection. `reverse`: the layer reads the tokens in reverse order and its output is
    flipped back, so step t sees tokens t .. T-1 (ViL's odd blocks). Init as ViL's: small init
    (std sqrt(2 / (5 dim))) for the up-projection, Wang's (std 2 / (blocks sqrt(dim))) for the
    down-projection, skip 1."""

    def __init__(self, dim, *, reverse, expansion, heads, qkv_block, conv_kernel, blocks, mode,
                 dropout):
        super().__init__()
        inner = expansion * dim
        self.reverse = reverse
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * inner)
        self.conv = nn.Conv1d(inner, inner, conv_kernel, groups=inner)
        self.q, self.k, self.v = (HeadwiseLinear(inner, qkv_block) for _ in range(3))
        self.cell = MLSTMCell(inner, heads, mode=mode)
        self.skip = nn.Parameter(torch.ones(inner))
        self.down = nn.Linear(inner, dim)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.up.weight, std=math.sqrt(2 / (5 * dim)))
        nn.init.normal_(self.down.weight, std=2 / (blocks * math.sqrt(dim)))
        for lin in (self.up, self.down):
            nn.init.zeros_(lin.bias)

    def layer(self, x):  # (B, T, D), read from the first token to the last
        branch, z = self.up(x).chunk(2, -1)  # (B, T, inner) each
        c = F.silu(causal_conv1d(branch, self.conv))
        h = self.cell(self.q(c), self.k(c), self.v(branch))
        return self.down((h + self.skip * c) * F.silu(z))

    def forward(self, x):  # (B, T, D)
        y = self.norm(x)
        y = self.layer(y.flip(1)).flip(1) if self.reverse else self.layer(y)
        return x + self.drop(y)


class VisionLSTM(ImageInput, nn.Module):
    """Vision-LSTM, ViL (Alkin, Beck, Poeppel, Hochreiter & Brandstetter, "Vision-LSTM: xLSTM as
    Generic Vision Backbone", 2024; the mLSTM of Beck et al., "xLSTM: Extended Long Short-Term
    Memory", NeurIPS 2024): patch tokens (PatchTokens: 4x4 patches, an 8x8 grid of 64 tokens on
    32x32 images) and learned positions, a stack of MLSTMBlocks whose direction alternates (even
    blocks read the tokens from the top left, odd blocks from the bottom right), a final layer norm
    and a linear head. readout "bilateral" (ViL's default pooling, "bilateral_avg"): the mean of the
    first and the last token, the two that have seen every token in one direction; "mean": the mean
    over tokens. ViL's settings otherwise: expansion 2, 4 heads, headwise q/k/v blocks of 4, conv
    kernel 4, biases on. `mode`: "parallel" (the quadratic form, for training) or "recurrent" (step
    by step, the same numbers).

    Adapted for a CPU: dim 96 and 6 blocks (ViL-T: 192 and 24), no drop path."""

    def __init__(self, *, in_features, num_classes, channels=3, image_size=None, patch_size=4,
                 dim=96, layers=6, expansion=2, heads=4, qkv_block=4, conv_kernel=4,
                 readout="bilateral", mode="parallel", dropout=0.0):
        super().__init__()
        channels, image_size = _image_geometry(in_features, channels, image_size)
        _check_choice("readout", readout, ["bilateral", "mean"])
        _check_sizes(layers=layers, expansion=expansion, heads=heads, qkv_block=qkv_block,
                     conv_kernel=conv_kernel)
        self.channels, self.image_size, self.pad_multiple = channels, image_size, patch_size
        self.readout = readout
        self.embed = PatchTokens(channels, dim, patch_size, image_size)
        block = partial(MLSTMBlock, dim, expansion=expansion, heads=heads, qkv_block=qkv_block,
                        conv_kernel=conv_kernel, blocks=layers, mode=mode, dropout=dropout)
        self.blocks = nn.ModuleList(block(reverse=i % 2 == 1) for i in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def set_mode(self, mode):
        """Every cell's form: "parallel" or "recurrent"."""
        _check_choice("mode", mode, list(MLSTM_MODES))
        for b in self.blocks:
            b.cell.mode = mode
        return self

    def features(self, x):
        """Image (or its rows) -> the tokens after the last block and the norm, (B, T, dim)."""
        z = self.embed(self.as_image(x))
        for b in self.blocks:
            z = b(z)
        return self.norm(z)

    def forward(self, x):
        z = self.features(x)
        return self.head((z[:, 0] + z[:, -1]) / 2 if self.readout == "bilateral" else z.mean(1))


LOG_DECAY_MIN = -20.0  # a step's decay exp(dt A) is clamped at exp(-20) = 2e-9 (see selective_scan)
SCAN_CHUNK = 8


def _scan_sequential(log_a, u, c):
    h, ys = torch.zeros_like(u[:, 0]), []
    for a_t, u_t, c_t in zip(torch.exp(log_a).unbind(1), u.unbind(1), c.unbind(1)):
        h = torch.addcmul(u_t, a_t, h)  # (B, D, N): a_t h + u_t, one op the bench counts
        ys.append((h @ c_t.unsqueeze(-1)).squeeze(-1))  # (B, D)
    return torch.stack(ys, 1)


def _scan_chunked(log_a, u, c, chunk=SCAN_CHUNK):
    """Chunks of `chunk` steps, each by a log-space cumulative sum from the state h0 before it:

        h_t = exp(L_t) h0 + sum_{s<=t} exp(L_t - L_s) u_s
            = exp(L_t - R) (cumsum_s(exp(R - L_s) u_s) + exp(R) h0),

    L the cumulative log decay within the chunk and R its value in the chunk's middle, so that
    no factor exceeds exp(chunk / 2 x 20) = exp(80) (float32 holds exp(88)); the states h0 are
    passed on from chunk to chunk, one small (B, D, N) step per chunk."""
    L = u.shape[1]
    pad = -L % chunk  # steps after the end: they change no earlier state
    log_a, u = F.pad(log_a, (0, 0, 0, 0, 0, pad)), F.pad(u, (0, 0, 0, 0, 0, pad))
    cum = log_a.unflatten(1, (-1, chunk)).cumsum(2)  # (B, L/c, c, D, N): L_t
    ref = cum[:, :, chunk // 2 - 1]  # (B, L/c, D, N): R
    grow = torch.exp(cum - ref.unsqueeze(2))  # exp(L_t - R)
    # exp(R - L_s), not 1 / exp(L_t - R): the gradient of a division would square exp(80)
    sums = (u.unflatten(1, (-1, chunk)) * torch.exp(ref.unsqueeze(2) - cum)).cumsum(2)
    h0, starts = torch.zeros_like(u[:, 0]), []
    # the chunks' last steps, sliced once (a slice's gradient is a full-size tensor)
    ends = zip(torch.exp(ref).unbind(1), grow[:, :, -1].unbind(1), sums[:, :, -1].unbind(1))
    for scale, grow_end, sums_end in ends:  # (B, D, N) each
        starts.append(scale * h0)  # exp(R) h0
        h0 = grow_end * (sums_end + starts[-1])
    h = grow * (sums + torch.stack(starts, 1).unsqueeze(2))  # (B, L/c, c, D, N)
    y = torch.einsum("bkcdn,bkcn->bkcd", h, F.pad(c, (0, 0, 0, pad)).unflatten(1, (-1, chunk)))
    return y.flatten(1, 2)[:, :L]


SCANS = {"chunked": _scan_chunked, "sequential": _scan_sequential}


def selective_scan(log_a, u, c, *, mode="chunked"):
    """The linear recurrence of Mamba's selective state-space model and its readout,
    h_t = a_t h_{t-1} + u_t from h_{-1} = 0 and y_t = h_t c_t, along dim 1: log a_t and u_t
    (B, L, D, N), c_t (B, L, N) -> y (B, L, D). "chunked" (L / 8 steps of whole chunks, the form
    for parallel hardware) and "sequential" (L small steps) give the same numbers
    (tests/test_modern.py); on a CPU core the sequential loop is the faster (docs/usage.md). The
    caller clamps
    log a_t at LOG_DECAY_MIN: a decay below 2e-9 per step is a state reset at float32 precision
    either way."""
    _check_choice("scan", mode, list(SCANS))
    return SCANS[mode](log_a, u, c)


class SelectiveSSM(nn.Module):
    """One direction of Mamba's mixer (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with
    Selective State Spaces", 2023) after its input projection: a causal depthwise conv1d and SiLU
    (u), then the selective state-space model with input-dependent step, input and output,

        dt, B, C = split(x_proj(u)),   Delta = softplus(dt_proj(dt))    (dt of rank dt_rank)
        h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t u_t,   y_t = C_t h_t + D u_t,

    A = -exp(A_log) diagonal (D x N), S4D-real init A_n = -(n + 1); D = 1; dt_proj's bias such that
    softplus(bias) is log-uniform in [dt_min, dt_max], its weight uniform in +-dt_rank^-0.5, as in
    Mamba. A_log and D carry `_optim` without weight decay (Mamba's _no_weight_decay)."""

    def __init__(self, dim, *, state, conv_kernel, dt_rank, dt_min, dt_max, scan):
        super().__init__()
        _check_choice("scan", scan, list(SCANS))
        self.state, self.dt_rank, self.scan = state, dt_rank, scan
        self.conv = nn.Conv1d(dim, dim, conv_kernel, groups=dim)
        self.x_proj = nn.Linear(dim, dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, dim)
        nn.init.uniform_(self.dt_proj.weight, -dt_rank**-0.5, dt_rank**-0.5)
        dt = torch.exp(torch.rand(dim) * math.log(dt_max / dt_min) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1.0)).repeat(dim, 1))
        self.D = nn.Parameter(torch.ones(dim))
        for p in (self.A_log, self.D):
            p._optim = {"weight_decay": 0.0}

    def forward(self, x):  # (B, L, D)
        u = F.silu(causal_conv1d(x, self.conv))
        dt, b, c = self.x_proj(u).split([self.dt_rank, self.state, self.state], -1)
        delta = F.softplus(self.dt_proj(dt))  # (B, L, D)
        log_a = (delta.unsqueeze(-1) * -torch.exp(self.A_log)).clamp(min=LOG_DECAY_MIN)
        y = selective_scan(log_a, (delta * u).unsqueeze(-1) * b.unsqueeze(2), c, mode=self.scan)
        return y + u * self.D  # (B, L, D)


class BiMamba(nn.Module):
    """Vim's bidirectional Mamba mixer (Zhu et al., 2024, "bimamba v2"): one input projection to
    the branch x and the gate z (2 x expand x dim, no bias); a forward SelectiveSSM on x and a
    backward one, with its own conv and SSM parameters, on x reversed (its output flipped back);
    the two averaged, gated by SiLU(z) and projected back to dim (no bias)."""

    def __init__(self, dim, *, expand, **ssm):
        super().__init__()
        inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.forward_ssm, self.backward_ssm = SelectiveSSM(inner, **ssm), SelectiveSSM(inner, **ssm)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x):  # (B, L, D)
        branch, z = self.in_proj(x).chunk(2, -1)  # (B, L, inner) each
        y = (self.forward_ssm(branch) + self.backward_ssm(branch.flip(1)).flip(1)) / 2
        return self.out_proj(y * F.silu(z))


class VisionMamba(ImageInput, nn.Module):
    """Vision Mamba, Vim (Zhu, Liao, Zhang, Wang, Liu & Wang, "Vision Mamba: Efficient Visual
    Representation Learning with Bidirectional State Space Model", ICML 2024): patch tokens
    (PatchTokens: 4x4 patches, an 8x8 grid of 64 tokens on 32x32 images) and learned positions,
    residual pre-norm blocks x + BiMamba(RMSNorm(x)), a final RMSNorm and a linear head. readout
    "middle_cls" (Vim's): a learned class token inserted in the middle of the token sequence
    (position T // 2, where both directions have read half the image) and read by the head; "mean":
    the mean of the tokens, no class token. Vim's (and Mamba's) settings otherwise: state 16,
    expand 2, conv kernel 4, dt_rank ceil(dim / 16), dt in [0.001, 0.1], the two directions
    averaged, out_proj's default init scaled by 1 / sqrt(layers). `scan`: "sequential" (step by
    step, the faster on a CPU) or "chunked" (the parallel form, the same numbers).

    Adapted for a CPU: dim 96 and 4 blocks (Vim-Ti: 192 and 24), no drop path, no position of its
    own for the class token (it is itself learned)."""

    def __init__(self, *, in_features, num_classes, channels=3, image_size=None, patch_size=4,
                 dim=96, layers=4, state=16, expand=2, conv_kernel=4, dt_rank=None, dt_min=1e-3,
                 dt_max=1e-1, readout="middle_cls", scan="sequential", dropout=0.0):
        super().__init__()
        channels, image_size = _image_geometry(in_features, channels, image_size)
        _check_choice("readout", readout, ["middle_cls", "mean"])
        dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        _check_sizes(layers=layers, state=state, expand=expand, conv_kernel=conv_kernel,
                     dt_rank=dt_rank)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
        self.channels, self.image_size, self.pad_multiple = channels, image_size, patch_size
        self.readout = readout
        self.embed = PatchTokens(channels, dim, patch_size, image_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if readout == "middle_cls" else None
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls, std=0.02)
        mixer = partial(BiMamba, dim, expand=expand, state=state, conv_kernel=conv_kernel,
                        dt_rank=dt_rank, dt_min=dt_min, dt_max=dt_max, scan=scan)
        self.mixers = nn.ModuleList(mixer() for _ in range(layers))
        self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(layers))
        with torch.no_grad():
            for m in self.mixers:
                m.out_proj.weight /= math.sqrt(layers)
        self.norm, self.drop = nn.RMSNorm(dim), nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def set_scan(self, scan):
        """Every SSM's scan: "chunked" or "sequential"."""
        _check_choice("scan", scan, list(SCANS))
        for m in self.mixers:
            m.forward_ssm.scan = m.backward_ssm.scan = scan
        return self

    def features(self, x):
        """Image (or its rows) -> the tokens after the last block and the norm, (B, T(+1), dim),
        the class token at index T // 2."""
        z = self.embed(self.as_image(x))  # (B, T, D)
        if self.cls is not None:
            mid = z.shape[1] // 2
            z = torch.cat([z[:, :mid], self.cls.expand(len(z), -1, -1), z[:, mid:]], 1)
        for norm, mixer in zip(self.norms, self.mixers):
            z = z + self.drop(mixer(norm(z)))
        return self.norm(z)

    def forward(self, x):
        z = self.features(x)
        pooled = z[:, (z.shape[1] - 1) // 2] if self.cls is not None else z.mean(1)
        return self.head(pooled)


# ---- the registry

@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: `factory(in_features=, num_classes=, **cfg)` builds the model. `input` is
    the default input (the one tests and benchmarks use): a C x H x W image turned into a sequence
    by `transform` (with `transform_args`), plus the `model_args` that input needs; `test_input` a
    tiny one for fast tests (8x8 images; 64-step pixel sequences, for which the pixel models'
    position tables shrink to 64, TrellisNet keeps the 7 levels whose receptive field (65 steps)
    covers them and the Lipschitz RNN's step eps grows to 0.1 and S4D's step sizes 16x, so that 64
    steps integrate over a time comparable to the 1,024 steps of the default)."""
    factory: object
    cfg: dict
    input_form: str
    sequence: str
    input: dict
    test_input: dict
    paper: str


def _input(image, transform, **args):
    return {"image": tuple(image), "transform": transform,
            "transform_args": args.pop("transform_args", {}), "model_args": args}


_ANY = "identity/any (B, T, F)"
_PIXELS = "pixels (B, H*W, C); any (B, T, F)"
_IMAGE = "image (B, C, H, W) or its rows layout (B, H, W*C)"
_SEQUENCER = "Tatsunami & Taki, Sequencer: Deep LSTM for Image Classification, NeurIPS 2022"
_CIFAR = (3, 32, 32)
_GRAY = (1, 32, 32)

MODELS = {
    "bilstm_fc": ModelEntry(
        factory=BiLSTMFC, cfg={}, input_form="sequence", sequence=_ANY,
        input=_input(_CIFAR, "identity", transform_args={"seq_len": 10}),
        test_input=_input((3, 4, 4), "identity", transform_args={"seq_len": 5}),
        paper="the test task: BiLSTM + FC on identity sequences (Biswas et al., IJCNN 2014)"),
    "rnn": ModelEntry(
        factory=RNNClassifier, cfg=dict(cell="rnn"), input_form="sequence", sequence=_ANY,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper="Elman, Finding Structure in Time, Cognitive Science 1990"),
    "gru": ModelEntry(
        factory=RNNClassifier, cfg=dict(cell="gru"), input_form="sequence", sequence=_ANY,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper="Cho et al., Learning Phrase Representations using RNN Encoder-Decoder, EMNLP 2014"),
    "lstm": ModelEntry(
        factory=RNNClassifier, cfg=dict(cell="lstm"), input_form="sequence", sequence=_ANY,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper="Hochreiter & Schmidhuber, Long Short-Term Memory, Neural Computation 1997"),
    "lstm_rows_mnist": ModelEntry(
        factory=RNNClassifier, cfg=dict(cell="lstm", hidden=128, layers=3), input_form="sequence",
        sequence="rows (B, 28, 28); any (B, T, F)",
        input=_input((1, 28, 28), "rows"), test_input=_input((1, 8, 8), "rows"),
        paper="Hochreiter & Schmidhuber 1997; sequential MNIST (Le, Jaitly & Hinton 2015)"),
    "lstm_pixels_mnist": ModelEntry(
        factory=RNNClassifier, cfg=dict(cell="lstm", hidden=128, layers=3), input_form="sequence",
        sequence="pixels (B, 784, 1); any (B, T, F)",
        input=_input((1, 28, 28), "pixels"), test_input=_input((1, 8, 8), "pixels"),
        paper="Hochreiter & Schmidhuber 1997; pixel-by-pixel MNIST (Le, Jaitly & Hinton 2015)"),
    "sequencer2d_s": ModelEntry(
        factory=SequencerImage, cfg=dict(layers=(2, 2, 4, 2)), input_form="image", sequence=_IMAGE,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper=_SEQUENCER + " (Sequencer2D-S scaled down for 32x32)"),
    "sequencer2d_m": ModelEntry(
        factory=SequencerImage, cfg=dict(layers=(2, 2, 7, 2)), input_form="image", sequence=_IMAGE,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper=_SEQUENCER + " (Sequencer2D-M scaled down for 32x32)"),
    "vanilla_sequencer": ModelEntry(
        factory=SequencerImage,
        cfg=dict(token_mixer="lstm1d", layers=(2, 2), patch_sizes=(4, 2), dims=(64, 128),
                 hidden_sizes=(32, 64)),
        input_form="image", sequence=_IMAGE,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper=_SEQUENCER + " (Vanilla Sequencer: BiLSTM over flattened tokens)"),
    "vit_small_seq": ModelEntry(
        factory=ViTImage, cfg={}, input_form="image", sequence=_IMAGE,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper="Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021"),
    "cnn_teacher": ModelEntry(
        factory=CifarResNet, cfg={}, input_form="image", sequence=_IMAGE,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper="He et al., Deep Residual Learning for Image Recognition, CVPR 2016 "
              "(CIFAR ResNet-20)"),
    "fast_cnn": ModelEntry(
        factory=FastCifarNet, cfg={}, input_form="image", sequence=_IMAGE,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper="Jordan, 94% on CIFAR-10 in 3.29 Seconds on a Single GPU, 2024 "
              "(airbench93's net, no whitening)"),
    "trellisnet": ModelEntry(
        factory=TrellisNet, cfg={}, input_form="pixels", sequence=_PIXELS,
        input=_input(_GRAY, "pixels"), test_input=_input((1, 8, 8), "pixels", layers=7),
        paper="Bai, Kolter & Koltun, Trellis Networks for Sequence Modeling, ICLR 2019"),
    "lipschitz_rnn": ModelEntry(
        factory=LipschitzRNN, cfg={}, input_form="pixels", sequence=_PIXELS,
        input=_input(_GRAY, "pixels"), test_input=_input((1, 8, 8), "pixels", eps=0.1),
        paper="Erichson et al., Lipschitz Recurrent Neural Networks, ICLR 2021"),
    "pit": ModelEntry(
        factory=PixelTransformer, cfg={}, input_form="pixels", sequence=_PIXELS,
        input=_input(_GRAY, "pixels"), test_input=_input((1, 8, 8), "pixels", seq_len=64),
        paper="Nguyen et al., An Image is Worth More Than 16x16 Patches: Exploring Transformers on "
              "Individual Pixels, 2024"),
    "nystromformer": ModelEntry(
        factory=Nystromformer, cfg={}, input_form="pixels", sequence=_PIXELS,
        input=_input(_GRAY, "pixels"),
        test_input=_input((1, 8, 8), "pixels", seq_len=64, landmarks=8, conv_kernel=9),
        paper="Xiong et al., Nystromformer: A Nystrom-Based Algorithm for Approximating "
              "Self-Attention, AAAI 2021"),
    "fnet": ModelEntry(
        factory=FNet, cfg={}, input_form="pixels", sequence=_PIXELS,
        input=_input(_GRAY, "pixels"), test_input=_input((1, 8, 8), "pixels", seq_len=64),
        paper="Lee-Thorp et al., FNet: Mixing Tokens with Fourier Transforms, NAACL 2022"),
    "s4d": ModelEntry(
        factory=S4D, cfg={}, input_form="pixels", sequence=_PIXELS,
        input=_input(_GRAY, "pixels"),
        test_input=_input((1, 8, 8), "pixels", dim=32, state=8, dropout=0.0, dt_min=0.016,
                          dt_max=1.6),
        paper="Gu, Gupta, Goel & Re, On the Parameterization and Initialization of Diagonal State "
              "Space Models, NeurIPS 2022 (S4D)"),
    "vil": ModelEntry(
        factory=VisionLSTM, cfg={}, input_form="image", sequence=_IMAGE,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper="Alkin et al., Vision-LSTM: xLSTM as Generic Vision Backbone, 2024; Beck et al., "
              "xLSTM: Extended Long Short-Term Memory, NeurIPS 2024 (mLSTM)"),
    "vim": ModelEntry(
        factory=VisionMamba, cfg={}, input_form="image", sequence=_IMAGE,
        input=_input(_CIFAR, "rows"), test_input=_input((3, 8, 8), "rows"),
        paper="Zhu et al., Vision Mamba: Efficient Visual Representation Learning with "
              "Bidirectional State Space Model, ICML 2024; Gu & Dao, Mamba: Linear-Time Sequence "
              "Modeling with Selective State Spaces, 2023"),
}

MODEL_INFO = {name: {"input_form": e.input_form, "sequence": e.sequence, "input": e.input,
                     "test_input": e.test_input, "paper": e.paper, "defaults": dict(e.cfg)}
              for name, e in MODELS.items()}


def list_models():
    return sorted(MODELS)


def model_options(name):
    """The keyword overrides create_model accepts for `name`."""
    import inspect
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}': valid names are {list_models()}")
    params = inspect.signature(MODELS[name].factory).parameters.values()
    return [p.name for p in params
            if p.name not in ("in_features", "num_classes") and p.kind == p.KEYWORD_ONLY]


def _check_flags(name, overrides):
    """A switch (a keyword whose default is True or False) takes True or False only: "no" is an
    error, not a true value."""
    import inspect
    defaults = {p.name: p.default for p in
                inspect.signature(MODELS[name].factory).parameters.values()}
    for key, value in overrides.items():
        if isinstance(defaults.get(key), bool) and not isinstance(value, bool):
            raise ValueError(f"{key} must be True or False, got {value!r} (model_args of "
                             f"'{name}')")


def create_model(name: str, *, in_features: int, num_classes: int, **overrides) -> nn.Module:
    """Build model `name` for (B, T, in_features) inputs (see MODEL_INFO[name] for the form it
    reads) and num_classes outputs: the registry's config for `name`, updated by `overrides`."""
    valid = model_options(name)
    bad = sorted(set(overrides) - set(valid))
    if bad:
        raise ValueError(f"bad model_args {overrides} for '{name}': unknown key(s) {bad}; "
                         f"valid keys are {valid}")
    _check_flags(name, overrides)
    model = MODELS[name].factory(in_features=in_features, num_classes=num_classes,
                                 **{**MODELS[name].cfg, **overrides})
    if not hasattr(model, "input_form"):
        model.input_form = MODELS[name].input_form
    return model


def _orthogonal_rnn(rnn: nn.RNNBase, gates: int):
    """Per gate: orthogonal W_hh, Xavier W_ih, zero biases, and an LSTM's forget-gate bias 1 (on
    b_hh, so that b_ih + b_hh is 1). A frozen weight (BiLSTMFC's identity W_ih) keeps its value."""
    for name, p in rnn.named_parameters():
        if not p.requires_grad:
            continue
        with torch.no_grad():
            for g, chunk in enumerate(p.chunk(gates)):  # one (H, ...) block per gate
                if name.startswith("weight_hh"):
                    nn.init.orthogonal_(chunk)
                elif name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(chunk)
                else:
                    chunk.fill_(1.0 if gates == 4 and g == 1 and name.startswith("bias_hh")
                                else 0.0)


def orthogonal_init(model):
    """Orthogonal hidden-to-hidden weights (Saxe et al., 2014), forget-gate bias 1 (Jozefowicz et
    al., 2015), Xavier input weights (Glorot & Bengio, 2010) in every recurrent layer of `model`."""
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    if not rnns:
        raise ValueError(f"init 'orthogonal' is for recurrent models; {type(model).__name__} "
                         f"has no recurrent layer (nn.LSTM, nn.GRU or nn.RNN)")
    for rnn in rnns:
        _orthogonal_rnn(rnn, {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1))
    if isinstance(model, BiLSTMFC):  # layer 1's input weights and biases live in in_proj
        with torch.no_grad():
            for chunk in model.in_proj.weight.chunk(model.in_proj.out_features // model.hidden):
                nn.init.xavier_uniform_(chunk)
            model.in_proj.bias.zero_()
    return model


# init name -> function(model) -> model: PyTorch's own initialisation, or orthogonal_init
INITS = {"default": lambda model: model, "orthogonal": orthogonal_init}


def model_input(name, batch_size=1, *, tiny=False, seed=0):
    """A batch of model `name`'s default input (MODEL_INFO[name]["input"]; tiny: its "test_input"):
    standard-normal "normalised images" turned into that sequence. Returns (x, in_features,
    model_args), ready for
    create_model(name, in_features=in_features, num_classes=K, **model_args)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}': valid names are {list_models()}")
    spec = MODEL_INFO[name]["test_input" if tiny else "input"]
    images = torch.randn(batch_size, *spec["image"], generator=torch.Generator().manual_seed(seed))
    x = make_sequence(spec["transform"], **spec["transform_args"])(images)
    return x, x.shape[-1], dict(spec["model_args"])


def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------
# Distillation: the loss, and the teacher as a student's training step reads it

def distillation_loss(student_logits, teacher_logits, labels, *, alpha, temperature, hard=False):
    """Hinton et al. (2015), batch means:

        (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T);

    with `hard`, DeiT's hard-label variant (Touvron et al. 2021), where the temperature plays no
    part:

        (1 - alpha) * CE(student, labels) + alpha * CE(student, teacher's argmax).

    Run the teacher under torch.no_grad(); its logits are detached here all the same."""
    teacher_logits = teacher_logits.detach()
    ce = F.cross_entropy(student_logits, labels)
    if hard:
        return (1 - alpha) * ce + alpha * F.cross_entropy(student_logits, teacher_logits.argmax(-1))
    kl = F.kl_div(F.log_softmax(student_logits / temperature, -1),
                  F.log_softmax(teacher_logits / temperature, -1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def as_is(x):
    return x


def build_teacher(name, args, image_shape, num_classes):
    """(model, image -> its input) of teacher `name`: image models read the normalised images
    (B, C, H, W); every other model its registry default input's transform (MODEL_INFO[name]
    ["input"]: rows for the RNNs, pixels for the LRA models, identity for bilstm_fc). `args`
    override the model's defaults."""
    C, H, W = image_shape
    if MODEL_INFO[name]["input_form"] == "image":
        to_input, defaults, n_feat = as_is, {"channels": C}, W * C
    else:
        spec = MODEL_INFO[name]["input"]
        to_input, defaults = (make_sequence(spec["transform"], **spec["transform_args"]),
                              spec["model_args"])
        n_feat = to_input(torch.zeros(1, *image_shape)).shape[-1]
    return create_model(name, in_features=n_feat, num_classes=num_classes,
                        **{**defaults, **args}), to_input


def _moved(z, start):
    """The batch z (B, C, H, W) moved one pixel sideways, reflect-padded: start 0 moves it right,
    2 left."""
    return F.pad(z, (1, 1, 0, 0), mode="reflect")[..., start:start + z.shape[-1]]


# a teacher's test-time augmentation: normalised batch -> [(weight, view)], weights summing to 1
TEST_VIEWS = {
    "none": lambda z: [(1.0, z)],
    "flip": lambda z: [(0.5, z), (0.5, z.flip(3))],
    # airbench's: the image and its mirror, each as is (1/4) and moved a pixel left and right (1/8
    # each); closed under mirroring (the mirror of a view is a view), so an image and its mirror
    # get one answer
    "flip_shift": lambda z: [(w, v) for u in (z, z.flip(3))
                             for w, v in ((0.25, u), (0.125, _moved(u, 0)), (0.125, _moved(u, 2)))],
}


class Teacher:
    """A trained teacher as a student's training step reads it: its logits for the very augmented
    batch the student sees, looked up in `table` (the logits of every training image and of its
    mirror image, (N, 2, K) float16, by index and flip flag) or computed live by `model` (eval mode,
    no_grad: crops cannot be tabled). Deliberately not an nn.Module: assigned to a student it is no
    submodule, so its weights are never trained, checkpointed, counted or switched to train mode
    with the student's. `info` says what it is (key, accuracy, training time, test predictions).
    `tta` (TEST_VIEWS) averages its logits over views of each image: every path (table, live,
    its test accuracy) answers with the same average."""

    def __init__(self, model, to_input, mean, std, *, table=None, info=None, tta="none"):
        self.model = model.eval().requires_grad_(False)
        self.to_input, self.mean, self.std = to_input, mean, std
        self.table, self.info, self.tta = table, dict(info or {}), tta

    def to(self, device):
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        self.table = self.table.to(device) if self.table is not None else None
        return self

    @torch.no_grad()
    def live(self, x_uint8):  # (B, K) float32
        views = TEST_VIEWS[self.tta](normalize(x_uint8, self.mean, self.std))
        return sum(w * self.model(self.to_input(v)).float() for w, v in views)

    def logits(self, x_uint8, idx=None, flip=None):
        """Logits of the augmented uint8 batch x_uint8: from the table when there is one (idx: the
        images' training-set indices, flip: which were mirrored, None for none), else live."""
        if self.table is None:
            return self.live(x_uint8)
        return self.table[idx, 0 if flip is None else flip.long()].float()


def logits_table(teacher: Teacher, x_uint8, batch=512):
    """The teacher's logits for every image of x_uint8 (N, C, H, W) and for its mirror image:
    (N, 2, K) float16 ([:, 0] as is, [:, 1] flipped), in eval mode, batched. A teacher whose
    test-time views include the mirror gives both one answer: computed once."""
    def both(xb):
        logits = teacher.live(xb)
        return torch.stack([logits, logits if teacher.tta != "none" else teacher.live(xb.flip(3))],
                           1).half()
    return torch.cat([both(xb) for xb in x_uint8.split(batch)])


if __name__ == "__main__":  # the command line lives in the package: a hand-off, not an import
    from seqlab.cli import main
    main()
