"""seqlstm: classify images as sequences.

Images become sequences (the identity sequence of Biswas et al., IJCNN 2014: the flattened
image repeated L times), a BiLSTM + fully connected head reads them, Lightning trains it and
MLflow tracks every run. `report.ipynb` drives it:  `python seqlstm.py report params/smoke.yaml`.
Other commands: `python seqlstm.py bench [--quick]`, `python seqlstm.py datasets|transforms|models`.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import numbers
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
OUTPUTS = Path(os.environ.get("SEQLSTM_OUTPUTS", ROOT / "outputs"))


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


def _from_torchvision(ds):
    """(images uint8 (N, C, H, W), labels int64) from a torchvision dataset's in-memory arrays."""
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N,H,W) or (N,H,W,C) -> (N,C,H,W)
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)


def _torchvision_splits(cls, root, download, **kw):
    train, test = cls(root, train=True, download=download, **kw), cls(root, train=False, download=download, **kw)
    return (*_from_torchvision(train), *_from_torchvision(test), list(train.classes))


def _decode_folder(paths_labels, image_size=None):
    """Decode image files into one uint8 tensor (N, 3, H, W); every image must end up the same size."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor, resize
    from tqdm.auto import tqdm
    images = []
    for path, _ in tqdm(paths_labels, desc="decoding images", mininterval=2, leave=False):
        try:
            with Image.open(path) as im:
                img = pil_to_tensor(im.convert("RGB"))  # (3, H, W) uint8
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"cannot decode image file {path}: {e}") from e
        if image_size is not None and img.shape[1:] != (image_size, image_size):
            img = resize(img, [image_size, image_size], antialias=True)
        if images and img.shape != images[0].shape:
            raise ValueError(f"{path} is {tuple(img.shape)} but earlier images are {tuple(images[0].shape)}; "
                             f"pass image_size to resize every image to one size")
        images.append(img)
    return torch.stack(images), torch.tensor([label for _, label in paths_labels], dtype=torch.int64)


def cache_dir() -> Path:
    return Path(os.environ.get("SEQLSTM_CACHE", Path.home() / ".cache" / "seqlstm"))


def _image_folder(root: Path, image_size=None):
    """An ImageFolder copy: root/train/<class>/* and root/test/<class>/* (or val/ for test).

    Decoded once into uint8 tensors and cached in cache_dir() ($SEQLSTM_CACHE, else
    ~/.cache/seqlstm), keyed by the folder, image_size and a fingerprint of its files."""
    from torchvision.datasets.folder import find_classes, make_dataset, IMG_EXTENSIONS
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    splits = {}
    for split_dir in (root / "train", test_dir):
        classes, to_idx = find_classes(str(split_dir))
        splits[split_dir.name] = classes, make_dataset(str(split_dir), to_idx, extensions=IMG_EXTENSIONS,
                                                        allow_empty=False)
    (train_classes, train_files), (test_classes, test_files) = splits.values()
    if train_classes != test_classes:
        raise ValueError(f"{root}: train/ and {test_dir.name}/ hold different class folders: "
                         f"{sorted(set(train_classes) ^ set(test_classes))}")
    stats = [os.stat(path) for path, _ in train_files + test_files]  # any added, removed or changed file: new key
    key = f"{root.resolve()}|{image_size}|{len(stats)}|{sum(s.st_size for s in stats)}|{max(s.st_mtime_ns for s in stats)}"
    cache = cache_dir() / f"{root.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    if cache.exists():
        return torch.load(cache)
    splits = (*_decode_folder(train_files, image_size), *_decode_folder(test_files, image_size), train_classes)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(splits, cache)
    except OSError as e:
        warnings.warn(f"could not write the decoded-image cache {cache}: {e}")
    return splits


def _is_image_folder(root: Path):
    return (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir())


def _cifar10(data_dir, download, image_size):
    from torchvision.datasets import CIFAR10
    if (data_dir / "cifar-10-batches-py").is_dir():
        return _torchvision_splits(CIFAR10, data_dir, False), "torchvision CIFAR10 (original pixels)"
    if _is_image_folder(data_dir / "cifar10-jpeg"):
        return _image_folder(data_dir / "cifar10-jpeg", image_size), "cifar10-jpeg ImageFolder (JPEG re-encoded)"
    return _download(CIFAR10, "cifar10", data_dir, download, ["cifar-10-batches-py/data_batch_1..5, test_batch",
                     "cifar10-jpeg/{train,test}/<class>/*.jpg"], CIFAR10.url), "torchvision CIFAR10 (downloaded)"


def _mnist(data_dir, download, image_size):
    from torchvision.datasets import MNIST
    if (data_dir / "MNIST" / "raw").is_dir():
        return _torchvision_splits(MNIST, data_dir, False), "torchvision MNIST"
    return _download(MNIST, "mnist", data_dir, download, ["MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"],
                     MNIST.mirrors[0]), "torchvision MNIST (downloaded)"


def _download(cls, name, data_dir, download, layouts, url):
    if download:
        try:
            return _torchvision_splits(cls, data_dir, True)
        except Exception as e:  # no network, bad checksum, ...: say what we looked for instead
            raise _missing(name, data_dir, layouts, url) from e
    raise _missing(name, data_dir, layouts, url)


def _digits(data_dir, download, image_size):
    """scikit-learn's bundled 8x8 digits (1,797 images, no download): a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.from_numpy(d.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)  # (N,1,8,8), 0..16 -> 0..255
    y = torch.from_numpy(d.target).long()
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    return (x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)]), "scikit-learn digits"


DATASETS = {"cifar10": _cifar10, "mnist": _mnist, "digits": _digits}


def list_datasets():
    return sorted(DATASETS)


def _load_splits(name, data_dir, download, image_size):
    """(train_x, train_y, test_x, test_y, classes), source."""
    folder = Path(name)
    if name in DATASETS:
        return DATASETS[name](data_dir, download, image_size)
    if _is_image_folder(folder):
        return _image_folder(folder, image_size), f"ImageFolder {folder.resolve()}"
    raise ValueError(f"unknown dataset '{name}': valid names are {list_datasets()}, or a folder with "
                     f"train/ and test/ (or val/) subfolders in ImageFolder layout ({folder.resolve()} is not)")


def load_dataset(name: str, *, data_dir=None, val_fraction=0.1, seed=0, limit_train=None,
                 image_size=None, download=True) -> ImageData:
    """Load a dataset as uint8 tensors with train / val / test splits.

    Validation is a seeded random `val_fraction` of the official train split; `limit_train`
    keeps only the first N remaining training images (quick runs)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    (train_x, train_y, test_x, test_y, classes), source = _load_splits(name, data_dir, download, image_size)
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(train_y)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if limit_train:
        train_idx = train_idx[:limit_train]
    train_x, train_y, val_x, val_y = train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx]
    pixels = train_x.transpose(0, 1).flatten(1).float() / 255  # (C, N*H*W), one channel at a time fits memory
    mean = pixels.mean(1)
    std = pixels.std(1).clamp_min(1e-3)
    return ImageData(str(name), list(classes), train_x, train_y, val_x, val_y, test_x, test_y, mean, std, source)


# ----------------------------------------------------------------------------------------
# Sequence transforms: pure functions (B, C, H, W) -> (B, T, F)

def identity(x: torch.Tensor, *, seq_len: int) -> torch.Tensor:
    """The identity sequence: each image flattened to C*H*W and repeated seq_len times.

    Returned as an expanded view (time stride 0): no copy, and the model can see that
    every step is the same vector and project it once (see BiLSTMFC)."""
    B = x.shape[0]
    return x.reshape(B, 1, -1).expand(B, seq_len, -1)  # (B, L, C*H*W)


SEQUENCES = {"identity": identity}


def list_sequences():
    return sorted(SEQUENCES)


def make_sequence(name: str, **args):
    """The batched transform `name` with its arguments bound: (B, C, H, W) -> (B, T, F)."""
    if name not in SEQUENCES:
        raise ValueError(f"unknown sequence transform '{name}': valid names are {list_sequences()}")
    seq_len = args.get("seq_len", 1)
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    return partial(SEQUENCES[name], **args)  # a partial, not a lambda: DataLoader workers can pickle it


def sequence_transform(name: str, **args):
    """The same transform for one image (C, H, W) -> (T, F), as a torchvision transform
    (built on `transforms.Lambda`, as torchvision's FiveCrop documentation does)."""
    from torchvision import transforms
    return transforms.Lambda(partial(_one_image, make_sequence(name, **args)))


def _one_image(batched, img):
    return batched(img.unsqueeze(0))[0]


def per_sample_pipeline(mean, std, seq, augment="none", size=32):
    """The classic torchvision per-sample pipeline on uint8 (C, size, size) tensors, the same
    steps as the batched fast path, for DataLoader users."""
    from torchvision.transforms import v2
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment '{augment}': valid values are {list(AUGMENTS)}")
    steps = [v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect")] if "crop" in augment else []
    steps += [v2.RandomHorizontalFlip()] if "flip" in augment else []
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean.tolist(), std.tolist()), seq])


class TensorImages(torch.utils.data.Dataset):
    """uint8 images + labels served one sample at a time through a per-sample transform."""
    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


# The fast path: whole batches of uint8 tensors, normalised and augmented at once.

def normalize(x_uint8, mean, std):
    x = x_uint8.to(torch.float32) / 255
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def batch_crop(x, padding, generator=None):
    """Random crops with reflect padding for a whole batch at once: one gather, no Python per image."""
    B, C, H, W = x.shape
    xp = F.pad(x, (padding,) * 4, mode="reflect")  # (B, C, H+2p, W+2p)
    dy, dx = (torch.randint(0, 2 * padding + 1, (2, B, 1), generator=generator).to(x.device))
    rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    return xp[torch.arange(B, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B,H,W,C)->(B,C,H,W)


def batch_flip(x, generator=None):
    flip = torch.rand(x.shape[0], generator=generator).to(x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


AUGMENTS = ("none", "flip", "crop", "flip_crop")


def augment_batch(x, augment, generator=None):
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment '{augment}': valid values are {list(AUGMENTS)}")
    if "crop" in augment:
        x = batch_crop(x, padding=max(1, x.shape[-1] // 8), generator=generator)
    if "flip" in augment:
        x = batch_flip(x, generator)
    return x


class Batches:
    """Shuffled (or ordered) batches of in-memory tensors: the loader of the fast path.

    No per-sample indexing or collation; each epoch draws a new seeded permutation."""
    def __init__(self, x, y, batch_size, shuffle=False, seed=0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]


# ----------------------------------------------------------------------------------------
# Models

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
        i, f, g, o = torch.baddbmm(gates_x, h, w_hh.transpose(1, 2)).chunk(4, -1)  # PyTorch's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return h, torch.stack(outs)


class BiLSTMFC(nn.Module):
    """Bidirectional LSTM reading the final hidden state of both directions, then two fully
    connected layers: 2H -> fc -> ReLU -> classes (the test task: H = 32, fc = 100).

    The first layer's input projection W_ih x is pulled out of the LSTM (`in_proj`), so that
    over the identity sequence, where every step is the same vector, it is computed once per
    image instead of once per step (`hoist`). Only layer 1 can be hoisted: its outputs differ
    from step to step, so layers 2+ are a plain nn.LSTM. The recurrence of layer 1 is an
    nn.LSTM per direction whose input weight is a fixed identity matrix, so precomputed gate
    pre-activations run on the fused kernel (`recurrence="fused"`); on the hoisted path a
    small loop advancing both directions in one batched matmul per step (`"loop"`) measured
    faster on CPU (`python seqlstm.py bench`) and is the default. Either way the results
    equal nn.LSTM on the repeated sequence (tests/test_models.py)."""

    def __init__(self, *, in_features, num_classes, hidden=32, layers=1, fc=100, dropout=0.0,
                 bidirectional=True, hoist=True, recurrence="loop"):
        super().__init__()
        if layers < 1 or hidden < 1 or fc < 1:
            raise ValueError(f"layers, hidden and fc must be >= 1, got {layers}, {hidden}, {fc}")
        if recurrence not in ("loop", "fused"):
            raise ValueError(f"unknown recurrence '{recurrence}': valid values are ['fused', 'loop']")
        self.hidden, self.dirs, self.hoist, self.recurrence = hidden, 2 if bidirectional else 1, hoist, recurrence
        D, H = self.dirs, hidden
        self.in_proj = nn.Linear(in_features, D * 4 * H)  # layer-1 W_ih and b_ih of every direction
        self.recur = nn.ModuleList(nn.LSTM(4 * H, H, batch_first=True) for _ in range(D))
        for lstm in self.recur:  # input weight fixed to I: gate pre-activations pass straight through
            lstm.weight_ih_l0 = nn.Parameter(torch.eye(4 * H), requires_grad=False)
            lstm.bias_ih_l0 = nn.Parameter(torch.zeros(4 * H), requires_grad=False)
        self.upper = nn.LSTM(D * H, H, layers - 1, batch_first=True, bidirectional=bidirectional,
                             dropout=dropout if layers > 2 else 0.0) if layers > 1 else None  # self.drop before it
        self.drop = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(D * H, fc), nn.ReLU(), nn.Dropout(dropout), nn.Linear(fc, num_classes))

    def forward(self, x):  # x: (B, T, F)
        B, T, _ = x.shape
        if self.hoist and T > 1 and x.stride(1) == 0:  # every step is the same vector (identity sequence)
            gates = self.in_proj(x[:, 0])  # (B, D*4H): once per image, not once per step
            seq, h_last = (self._loop if self.recurrence == "loop" else self._fused)(gates, T)
        else:
            seq, h_last = self._fused(self.in_proj(x), T)  # (B, T, D*4H)
        if self.upper is not None:
            _, (h_n, _) = self.upper(self.drop(seq))
            h_last = h_n[-self.dirs:]
        feats = h_last.transpose(0, 1).reshape(B, -1)  # (B, D*H): [forward final, backward final]
        return self.head(self.drop(feats))

    def _fused(self, gates, T):
        """Layer 1 on nn.LSTM's fused kernel: gates (B, T, D*4H), or (B, D*4H) for every step."""
        if gates.ndim == 2:
            gates = gates.unsqueeze(1).expand(-1, T, -1)
        gates = gates.chunk(self.dirs, -1)  # D x (B, T, 4H)
        out_f, (h_f, _) = self.recur[0](gates[0])
        outs, h_last = [out_f], [h_f[0]]
        if self.dirs == 2:
            out_b, (h_b, _) = self.recur[1](gates[1].flip(1))
            outs.append(out_b.flip(1))  # back to input positions
            h_last.append(h_b[0])
        return torch.cat(outs, -1), torch.stack(h_last)  # (B, T, D*H), (D, B, H)

    def _loop(self, gates, T):
        """Layer 1 as a Python loop over steps for gates (B, D*4H) that are the same at every step."""
        B, D, H = gates.shape[0], self.dirs, self.hidden
        w_hh = torch.stack([lstm.weight_hh_l0 for lstm in self.recur])  # (D, 4H, H)
        b_hh = torch.stack([lstm.bias_hh_l0 for lstm in self.recur]).unsqueeze(1)  # (D, 1, 4H)
        h_last, outs = lstm_loop(gates.view(B, D, 4 * H).transpose(0, 1) + b_hh, w_hh, T)  # (D,B,H), (T,D,B,H)
        if self.upper is None:
            return None, h_last
        seq = outs.permute(2, 0, 1, 3)  # (B, T, D, H)
        if D == 2:  # the backward direction's step t saw inputs T-1-t..T-1: reverse it to input positions
            seq = torch.stack([seq[:, :, 0], seq[:, :, 1].flip(1)], 2)
        return seq.reshape(B, T, D * H), h_last


def reference_lstm(model: BiLSTMFC) -> nn.LSTM:
    """A plain nn.LSTM holding the same weights as `model`'s LSTM layers (for the equivalence
    tests and the naive baseline of the benchmark)."""
    D, H = model.dirs, model.hidden
    layers = 1 + (model.upper.num_layers if model.upper else 0)
    ref = nn.LSTM(model.in_proj.in_features, H, layers, batch_first=True, bidirectional=D == 2,
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
    """The same network on a plain nn.LSTM over the explicitly repeated sequence: the naive baseline."""
    def __init__(self, model: BiLSTMFC):
        super().__init__()
        import copy
        self.lstm, self.head, self.dirs = reference_lstm(model), copy.deepcopy(model.head), model.dirs

    def forward(self, x):  # (B, T, F), materialised
        _, (h_n, _) = self.lstm(x.contiguous())
        return self.head(h_n[-self.dirs:].transpose(0, 1).flatten(1))


MODELS = {"bilstm_fc": BiLSTMFC}


def list_models():
    return sorted(MODELS)


def create_model(name: str, *, in_features: int, num_classes: int, **overrides) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}': valid names are {list_models()}")
    try:
        return MODELS[name](in_features=in_features, num_classes=num_classes, **overrides)
    except TypeError as e:
        import inspect
        valid = [p for p in inspect.signature(MODELS[name]).parameters if p not in ("in_features", "num_classes")]
        raise ValueError(f"bad model_args {overrides} for '{name}': valid keys are {valid}") from e


def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------
# Distillation loss

def distillation_loss(student_logits, teacher_logits, labels, *, alpha=0.5, temperature=4.0):
    """Hinton et al. (2015): (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T).

    Run the teacher under torch.no_grad(); its logits are detached here all the same."""
    teacher_logits = teacher_logits.detach()
    ce = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


# ----------------------------------------------------------------------------------------
# Lightning module: the fast path (normalise, augment, sequence) runs on whole batches

import pytorch_lightning as pl  # noqa: E402  (after the model code it wraps)


class SeqClassifier(pl.LightningModule):
    """Wraps a sequence model; turns uint8 image batches into normalised sequences on the device."""

    def __init__(self, model, *, to_seq, mean, std, augment="none", lr=1e-3, weight_decay=0.0,
                 optimizer="adam", schedule="onecycle", seed=0):
        super().__init__()
        self.model, self.to_seq = model, to_seq
        self.save_hyperparameters(ignore=["model", "to_seq", "mean", "std"])
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.augment_gen = torch.Generator().manual_seed(seed)
        self.history, self._sums = [], {}  # per-epoch metrics; running (loss sum, correct, count) per stage

    def sequences(self, x_uint8, train=False):
        x = normalize(x_uint8, self.mean, self.std)
        if train and self.hparams.augment != "none":
            x = augment_batch(x, self.hparams.augment, self.augment_gen)
        return self.to_seq(x)  # (B, T, F)

    def forward(self, x_uint8):
        return self.model(self.sequences(x_uint8))

    def _step(self, stage, logits, y):
        loss = F.cross_entropy(logits, y)
        correct = (logits.argmax(1) == y).sum()
        self._sums[stage] = self._sums.get(stage, 0) + torch.stack([loss.detach() * len(y), correct, y.new_tensor(len(y))])
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", correct / len(y), on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, _):
        x, y = batch
        return self._step("train", self.model(self.sequences(x, train=True)), y)

    def validation_step(self, batch, _):
        x, y = batch
        self._step("val", self(x), y)

    def predict_step(self, batch, _):
        return self(batch[0]).argmax(1)

    def on_validation_epoch_end(self):  # runs after the epoch's last training batch
        record = {"epoch": self.current_epoch + 1}
        for stage, (loss, correct, n) in self._sums.items():
            record.update({f"{stage}_loss": float(loss / n), f"{stage}_acc": float(correct / n)})
        self._sums = {}
        if not self.trainer.sanity_checking:
            self.history.append(record)

    def configure_optimizers(self):
        hp = self.hparams
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        if hp.optimizer not in optimizers:
            raise ValueError(f"unknown optimizer '{hp.optimizer}': valid values are {sorted(optimizers)}")
        opt = optimizers[hp.optimizer]([p for p in self.parameters() if p.requires_grad],
                                       lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "none":
            return opt
        if hp.schedule != "onecycle":
            raise ValueError(f"unknown schedule '{hp.schedule}': valid values are ['onecycle', 'none']")
        steps = self.trainer.estimated_stepping_batches
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, hp.lr, total_steps=steps, pct_start=0.15),
            "interval": "step"}}


class EpochLog(pl.Callback):
    """One line per epoch with metrics and time left: a progress report that reads well in a
    rendered notebook, where a per-step bar would print hundreds of lines."""
    def on_train_start(self, trainer, module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):  # after this epoch's validation
        if not module.history:
            return
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        per_epoch = (time.perf_counter() - self._t) / epoch
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in module.history[-1].items() if k != "epoch")
        print(f"epoch {epoch:>3}/{total}  {metrics}  {per_epoch:.1f} s/epoch, "
              f"{per_epoch * (total - epoch) / 60:.1f} min left", flush=True)


class TrainTimer(pl.Callback):
    """Seconds spent in training batches (forward, backward, step), validation excluded."""
    def __init__(self):
        self.seconds, self.images = 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, i):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, i):
        self.seconds += time.perf_counter() - self._t
        self.images += len(batch[1])


# ----------------------------------------------------------------------------------------
# Experiment runner and tracking

def set_threads(threads=0):
    """Use `threads` CPU threads (0: every core this process may run on); returns the number."""
    n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(n)
    return n


def tracking_uri():
    """$MLFLOW_TRACKING_URI, else an SQLite store under outputs/ (MLflow's file store is deprecated)."""
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(OUTPUTS / 'mlflow.db').resolve()}"


@dataclass
class RunResult:
    row: dict  # the summary.csv row
    history: list  # per-epoch train/val metrics
    report: dict  # sklearn classification_report(output_dict=True)
    confusion: object  # numpy (K, K)
    classes: list
    params: dict = field(default_factory=dict)


SUMMARY_FIELDS = ["dataset", "model", "transform", "seq_len", "epochs", "test_acc", "macro_f1", "n_params",
                  "train_seconds", "train_images_per_s", "mlflow_run_id"]


def append_summary(row, path=None):
    path = Path(path or OUTPUTS / "summary.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def plot_confusion(cm, classes, title=""):
    import matplotlib.pyplot as plt
    import seaborn as sns
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 0.9 + 0.5 * k))
    sns.heatmap(cm, annot=k <= 20, fmt="d", cmap="Blues", xticklabels=classes, yticklabels=classes, ax=ax, cbar=False)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def plot_history(history, title=""):
    import matplotlib.pyplot as plt
    import pandas as pd
    h = pd.DataFrame(history).set_index("epoch")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    h[[c for c in ("train_loss", "val_loss") if c in h]].plot(ax=a, marker=".", title=f"{title} loss")
    h[[c for c in ("train_acc", "val_acc") if c in h]].plot(ax=b, marker=".", title=f"{title} accuracy")
    a.set_xlabel("epoch"), b.set_xlabel("epoch")
    fig.tight_layout()
    return fig


def run_experiment(params: dict, *, dataset: str, seq_len: int) -> RunResult:
    """Train params['model'] on `dataset` turned into sequences of length `seq_len`; track it in MLflow.

    `params` are the report's parameters (see report.ipynb); the best-validation checkpoint is
    evaluated on the test split."""
    import numpy as np
    import yaml
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
    from pytorch_lightning.loggers import MLFlowLogger
    from sklearn.metrics import classification_report, confusion_matrix, f1_score

    p = {**params, "dataset": dataset, "seq_len": seq_len}
    if not p["val_fraction"] > 0:
        raise ValueError("val_fraction must be > 0: the best-validation checkpoint is the one tested")
    threads = set_threads(p["threads"])
    pl.seed_everything(p["seed"], workers=True, verbose=False)
    data = load_dataset(dataset, data_dir=p["data_dir"] or None, val_fraction=p["val_fraction"], seed=p["seed"],
                        limit_train=p["limit_train"] or None)
    to_seq = make_sequence(p["transform"], seq_len=seq_len, **p["transform_args"])
    T, n_feat = to_seq(data.train_x[:1].float()).shape[1:]
    model = create_model(p["model"], in_features=n_feat, num_classes=len(data.classes), **p["model_args"])
    module = SeqClassifier(model, to_seq=to_seq, mean=data.mean, std=data.std, augment=p["augment"], lr=p["lr"],
                           weight_decay=p["weight_decay"], optimizer=p["optimizer"], schedule=p["schedule"],
                           seed=p["seed"])
    run_name = f"{dataset}-{p['model']}-{p['transform']}-L{seq_len}"
    logger = MLFlowLogger(experiment_name=p["experiment"], run_name=run_name, tracking_uri=tracking_uri(),
                          artifact_location=(OUTPUTS / "mlartifacts").resolve().as_uri())
    derived = {"threads": threads, "n_params": count_params(model), "seq_steps": T, "seq_features": n_feat,
               "data_source": data.source, **{f"n_{k}": v for k, v in data.counts().items()},
               "torch": str(torch.__version__), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    logger.log_hyperparams({**p, **derived})
    steps = len(Batches(data.train_x, data.train_y, p["batch_size"]))
    ckpt_dir = OUTPUTS / "checkpoints" / logger.run_id
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor="val_acc", mode="max", save_top_k=1)
    timer = TrainTimer()
    on_terminal = sys.stderr.isatty()  # a per-step bar in a terminal; in a notebook, one line per epoch
    trainer = pl.Trainer(max_epochs=p["epochs"], logger=logger, num_sanity_val_steps=0, log_every_n_steps=steps,
                         callbacks=[checkpoint, timer, EpochLog()] + [TQDMProgressBar()] * on_terminal,
                         enable_progress_bar=on_terminal,
                         deterministic=True if not torch.cuda.is_available() else "warn",
                         enable_model_summary=False, accelerator="auto", devices=1)
    t0 = time.perf_counter()
    trainer.fit(module, Batches(data.train_x, data.train_y, p["batch_size"], shuffle=True, seed=p["seed"]),
                Batches(data.val_x, data.val_y, 1024))
    fit_seconds = time.perf_counter() - t0

    preds = torch.cat(trainer.predict(module, Batches(data.test_x, data.test_y, 1024), ckpt_path="best")).numpy()
    y = data.test_y.numpy()
    labels = list(range(len(data.classes)))
    report = classification_report(y, preds, labels=labels, target_names=data.classes, output_dict=True,
                                   zero_division=0)
    cm = confusion_matrix(y, preds, labels=labels)
    test_acc, macro_f1 = float(np.mean(preds == y)), float(f1_score(y, preds, average="macro"))

    client, run_id = logger.experiment, logger.run_id
    client.log_metric(run_id, "test_acc", test_acc)
    client.log_metric(run_id, "macro_f1", macro_f1)
    client.log_metric(run_id, "train_seconds", fit_seconds)
    client.log_metric(run_id, "train_images_per_s", timer.images / max(timer.seconds, 1e-9))
    client.log_dict(run_id, report, "classification_report.json")
    client.log_text(run_id, yaml.safe_dump({**p, **derived}, sort_keys=False), "params.yaml")
    fig = plot_confusion(cm, data.classes, run_name)
    client.log_figure(run_id, fig, "confusion_matrix.png")
    import matplotlib.pyplot as plt
    plt.close(fig)
    client.set_terminated(run_id)

    row = {"dataset": dataset, "model": p["model"], "transform": p["transform"], "seq_len": seq_len,
           "epochs": p["epochs"], "test_acc": round(test_acc, 4), "macro_f1": round(macro_f1, 4),
           "n_params": derived["n_params"], "train_seconds": round(fit_seconds, 1),
           "train_images_per_s": round(timer.images / max(timer.seconds, 1e-9)), "mlflow_run_id": run_id}
    append_summary(row)
    return RunResult(row, module.history, report, cm, data.classes, {**p, **derived})


# ----------------------------------------------------------------------------------------
# Report: the notebook's parameters are the single source of defaults

NOTEBOOK = ROOT / "report.ipynb"


def report_defaults(notebook=NOTEBOOK):
    """The report's parameters and their defaults, read from the notebook's `parameters` cell."""
    import ast
    import papermill as pm
    return {name: ast.literal_eval(p["default"]) for name, p in pm.inspect_notebook(str(notebook)).items()}


def check_params(given: dict, known: dict):
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}: valid parameters are {sorted(known)}")


def notebook_params(namespace: dict, names) -> dict:
    """The report's parameters from the notebook's globals, after papermill's injection.

    `names` are the public global names right after the parameters (and injected) cells.
    The parameters cell declares each parameter with a type annotation; papermill injects
    plain assignments, so a name without an annotation was injected and is unknown
    (papermill itself only warns about those)."""
    try:
        hidden = set(get_ipython().user_ns_hidden)  # noqa: F821 (names IPython defines itself)
    except NameError:
        hidden = set()
    known = namespace.get("__annotations__", {})
    check_params({k: None for k in names if k not in hidden}, known)
    return {k: namespace[k] for k in known}


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def render_report(params_file=None, overrides=(), out_dir=None):
    """Execute report.ipynb with a params YAML (+ overrides) into outputs/NAME.ipynb and NAME.html."""
    import papermill as pm
    import yaml
    params = (yaml.safe_load(Path(params_file).read_text()) or {}) if params_file else {}
    for key, value in overrides:
        params[key] = yaml.safe_load(value)
    check_params(params, report_defaults())
    name = Path(params_file).stem if params_file else "report"
    params.setdefault("experiment", name)
    out_dir = Path(out_dir or OUTPUTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{name}.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(executed), parameters=params, cwd=str(ROOT), progress_bar=True)
    return executed, to_html(executed)


def to_html(notebook: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook), as_version=4))
    html = notebook.with_suffix(".html")
    html.write_text(body)
    return html


# ----------------------------------------------------------------------------------------
# Benchmark: speed as ratios measured in one run

def _train_images_per_s(model, make_batch, steps, warmup=2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        x, y = make_batch()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps * len(y) / (time.perf_counter() - t)


def matmul_gflops(n=2048, reps=10, device="cpu"):
    a = torch.randn(n, n, device=device)
    a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def bilstm_train_flops(in_features, seq_len, hidden=32, fc=100, classes=10, dirs=2):
    """Multiply-add FLOPs of one training image on the hoisted path (forward + backward = 3x forward)."""
    gates = dirs * 4 * hidden
    forward = 2 * (in_features * gates + seq_len * gates * hidden + dirs * hidden * fc + fc * classes)
    return 3 * forward


def bench(quick=False, json_path=None, device=None):
    """Training throughput of the fast path against the naive one, and of the data paths."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = set_threads(0)
    torch.manual_seed(0)
    B, steps = 256, 4 if quick else 12
    C, H, W, K = 3, 32, 32, 10
    n_feat = C * H * W
    images = torch.randint(0, 256, (B * 8, C, H, W), dtype=torch.uint8)
    labels = torch.randint(0, K, (B * 8,))
    mean, std = torch.full((C,), 0.47), torch.full((C,), 0.25)

    def batch_of(seq_len, materialise=False):
        def make():
            idx = torch.randint(0, len(labels), (B,))
            x = identity(normalize(images[idx].to(device), mean.to(device), std.to(device)), seq_len=seq_len)
            return (x.contiguous() if materialise else x), labels[idx].to(device)
        return make

    result = {"threads": threads, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "matmul_gflops": round(matmul_gflops(device=device), 1), "identity": {}, "data": {}, "models": {}}
    for L in (5, 10, 20):
        model = BiLSTMFC(in_features=n_feat, num_classes=K).to(device)
        naive = _train_images_per_s(ReferenceBiLSTMFC(model).to(device), batch_of(L, True), max(2, steps // 2))
        fast = _train_images_per_s(model, batch_of(L), steps)  # hoisted projection, loop recurrence (default)
        model.recurrence = "fused"  # hoisted projection, nn.LSTM's fused kernel with W_ih = I
        fused = _train_images_per_s(model, batch_of(L), steps)
        gflops = fast * bilstm_train_flops(n_feat, L) / 1e9
        result["identity"][str(L)] = {"naive_img_s": round(naive), "fast_img_s": round(fast),
                                      "ratio": round(fast / naive, 1), "fast_gflops": round(gflops, 1),
                                      "fused_img_s": round(fused)}

    seq = sequence_transform("identity", seq_len=20)
    per_sample = TensorImages(images, labels, per_sample_pipeline(mean, std, seq, augment="flip_crop"))
    loader = torch.utils.data.DataLoader(per_sample, batch_size=B, shuffle=True)
    n = 0
    t = time.perf_counter()
    for x, y in loader:
        n += len(y)
    tv = n / (time.perf_counter() - t)
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    n = 0
    for _ in range(2 if quick else 5):
        for x, y in Batches(images, labels, B, shuffle=True):
            x = identity(augment_batch(normalize(x, mean, std), "flip_crop", gen), seq_len=20)
            n += len(y)
    fast = n / (time.perf_counter() - t)
    result["data"] = {"torchvision_img_s": round(tv), "fast_img_s": round(fast), "ratio": round(fast / tv, 1)}

    for name in list_models():
        model = create_model(name, in_features=n_feat, num_classes=K).to(device)
        result["models"][name] = {"params": count_params(model),
                                  "train_img_s": round(_train_images_per_s(model, batch_of(20), steps))}

    print(format_bench(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_bench(r):
    lines = [f"device {r['device']}, {r['threads']} threads, float32 matmul peak {r['matmul_gflops']:.0f} GFLOP/s", "",
             "identity sequence, BiLSTM(32)+FC(100), CIFAR-10 shapes, batch 256, training images/s",
             f"{'L':>4} {'naive nn.LSTM':>14} {'fast (loop)':>12} {'ratio':>6} {'GFLOP/s':>8} {'hoisted+fused':>14}"]
    for L, v in r["identity"].items():
        lines.append(f"{L:>4} {v['naive_img_s']:>14,} {v['fast_img_s']:>12,} {v['ratio']:>5.1f}x "
                     f"{v['fast_gflops']:>8.1f} {v['fused_img_s']:>14,}")
    d = r["data"]
    lines += ["", "data pipeline (normalise + flip + crop + identity L=20), images/s",
              f"{'torchvision per-sample':>24} {d['torchvision_img_s']:>10,}",
              f"{'batched fast path':>24} {d['fast_img_s']:>10,}   ({d['ratio']:.1f}x)",
              "", f"{'model':<16} {'params':>10} {'train img/s':>12}"]
    lines += [f"{k:<16} {v['params']:>10,} {v['train_img_s']:>12,}" for k, v in r["models"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    ap = argparse.ArgumentParser(prog="seqlstm.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rep = sub.add_parser("report", help="execute report.ipynb with a params file into outputs/NAME.{ipynb,html}")
    rep.add_argument("params", nargs="?", help="params/NAME.yaml (overrides of the notebook's defaults)")
    rep.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                     help="override one parameter (VALUE is YAML: 20, [5, 10], cifar10)")
    b = sub.add_parser("bench", help="training and data throughput, fast path against naive")
    b.add_argument("--quick", action="store_true", help="fewer steps (under 2 minutes on 2 CPU cores)")
    b.add_argument("--json", help="also write the results as JSON to this path")
    sub.add_parser("datasets", help="list dataset names")
    sub.add_parser("transforms", help="list sequence transforms")
    sub.add_parser("models", help="list models")
    args = ap.parse_args(argv)
    if args.cmd == "report":
        executed, html = render_report(args.params, args.param)
        print(f"executed notebook: {executed}\nHTML report:       {html}")
    elif args.cmd == "bench":
        bench(quick=args.quick, json_path=args.json)
    elif args.cmd == "datasets":
        print("\n".join(list_datasets() + ["<folder with train/ and test/ or val/ in ImageFolder layout>"]))
    elif args.cmd == "transforms":
        x = torch.zeros(1, 3, 32, 32)
        for name in list_sequences():
            T, n = make_sequence(name, seq_len=10)(x).shape[1:]
            print(f"{name:<12} 3x32x32 -> T={T}, F={n}")
    elif args.cmd == "models":
        for name in list_models():
            print(f"{name:<12} {count_params(create_model(name, in_features=3072, num_classes=10)):>10,} params "
                  f"(3x32x32 identity sequence)")


if __name__ == "__main__":
    main()
