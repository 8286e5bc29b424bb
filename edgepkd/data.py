"""Named datasets, held in memory as uint8 tensors, with deterministic train/val/test splits.

    digits           scikit-learn's bundled 8x8 digits (1,797 images; offline; the demo)
    mnist            torchvision's MNIST (28x28), official test split
    cifar10          torchvision's CIFAR-10 (32x32) or a class-per-folder JPEG copy (cifar10-jpg/{train,test})
    imagefolder:PATH any class-per-folder dataset; PATH/{train,test}/ when present, else split by test_fraction
    synthetic        class-conditional random patterns, for tests

Files are looked up under ``--data-dir``, else ``$EDGEPKD_DATA``, else ``~/.cache/edgepkd/data``. A run records
where its dataset's files were (``state.json``: ``data_dir``); ``evaluate``, ``export``, ``bench`` and ``pick`` of
that run read them there unless ``--data-dir`` or ``$EDGEPKD_DATA`` say otherwise (``load_run_dataset``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgepkd.errors import ConfigError, DataError
from edgepkd.recipe import DataConfig
from edgepkd.registry import Registry
from edgepkd.rundir import RunDir

DATASETS: Registry[Callable] = Registry("dataset")
FILE_DATASETS = ("mnist", "cifar10", "imagefolder")   # the datasets read from files under the data location
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: list[float]   # per channel, [0, 1] units
    std: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # (C, H, W)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32, scaled to [0, 1] then standardised per channel."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def preprocessing(self) -> dict:
        """What a device must do to a raw image: carried into run metadata and exported artifacts."""
        c, h, w = self.input_shape
        return {"input_shape": [c, h, w], "channel_order": "gray" if c == 1 else "RGB", "layout": "NCHW",
                "resize": [h, w], "scale": 1 / 255.0, "mean": self.mean, "std": self.std}


def data_location(data_dir: str | os.PathLike | None = None, run: RunDir | None = None) -> tuple[Path, str]:
    """Where dataset files are read, and why there: ``data_dir`` (--data-dir), else $EDGEPKD_DATA, else the location
    ``run`` recorded when it was made, else ~/.cache/edgepkd/data."""
    if data_dir:
        return Path(data_dir).expanduser(), "--data-dir"
    if os.environ.get("EDGEPKD_DATA"):
        return Path(os.environ["EDGEPKD_DATA"]).expanduser(), "$EDGEPKD_DATA"
    recorded = run.recorded_data_dir() if run is not None else None
    if recorded:
        return Path(recorded), f"recorded by the run in {run.state_path}; --data-dir or $EDGEPKD_DATA override it"
    return Path.home() / ".cache" / "edgepkd" / "data", "the default; --data-dir or $EDGEPKD_DATA choose another"


def data_root(data_dir: str | os.PathLike | None) -> Path:
    return data_location(data_dir)[0]


def reads_files(cfg: DataConfig) -> bool:
    """Whether the dataset is read from files under the data location (digits and synthetic are not)."""
    return cfg.dataset.partition(":")[0] in FILE_DATASETS


def load_run_dataset(run: RunDir, recipe, data_dir: str | None = None, log=None) -> Dataset:
    """The dataset of a finished run (``evaluate``, ``export``, ``bench``, ``pick``), read where ``data_location``
    says; ``log`` is told which location that was."""
    root, why = data_location(data_dir, run)
    data = load_dataset(recipe.data, recipe.seed, str(root))
    if log is not None and reads_files(recipe.data):
        log(f"data: {root} ({why})")  # once found: a failure is the error's one line, naming the location
    return data


def load_dataset(cfg: DataConfig, seed: int, data_dir: str | None = None) -> Dataset:
    """Load ``cfg.dataset`` and split it deterministically from ``seed``."""
    kind, _, arg = cfg.dataset.partition(":")
    loader = DATASETS.get(kind)
    root = data_root(data_dir)
    trainval, test, classes = loader(cfg, root, seed, arg)
    gen = torch.Generator().manual_seed(seed)
    if test is None:  # no official test split: hold one out
        perm = torch.randperm(len(trainval), generator=gen)
        n_test = max(1, int(round(cfg.test_fraction * len(trainval))))
        test = _take(trainval, perm[:n_test])
        trainval = _take(trainval, perm[n_test:])
    perm = torch.randperm(len(trainval), generator=gen)
    n_val = int(round(cfg.val_fraction * len(trainval)))
    val, train = _take(trainval, perm[:n_val]), _take(trainval, perm[n_val:])
    if cfg.image_size is not None and tuple(train.x.shape[-2:]) != (cfg.image_size, cfg.image_size):
        train, val, test = (_resize(s, cfg.image_size) for s in (train, val, test))
    if cfg.train_limit is not None:
        train = _take(train, torch.arange(min(cfg.train_limit, len(train))))
    if cfg.mean is not None:
        c = train.x.shape[1]
        if len(cfg.mean) not in (1, c) or len(cfg.std) not in (1, c):
            raise ConfigError(f"data.mean / data.std: '{cfg.dataset}' images have {c} channel(s); give 1 or {c} "
                              "values each")
        mean, std = _per_channel(cfg.mean, c), _per_channel(cfg.std, c)
    else:
        xf = train.x.float() / 255.0
        mean = xf.mean(dim=(0, 2, 3)).tolist()
        std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    name = cfg.dataset
    return Dataset(name=name, train=train, val=val, test=test, classes=classes,
                   mean=[round(m, 6) for m in mean], std=[round(s, 6) for s in std])


def _per_channel(values: list[float], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)


def _resize(split: Split, size: int) -> Split:
    """Bilinear (antialiased) resize of uint8 images to size x size."""
    x = torch.nn.functional.interpolate(split.x.float(), size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)                        # (N, C, size, size)
    return Split(x.round().clamp(0, 255).to(torch.uint8), split.y)


def _take(split: Split, idx: torch.Tensor) -> Split:
    return Split(split.x[idx], split.y[idx])


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding of 1/8 of the size) and, for 'crop_flip', horizontal flip. uint8 in, uint8 out."""
    if mode == "none":
        return x
    b, c, h, w = x.shape                                                     # (B, C, H, W)
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))               # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]                 # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]                 # (B, 1, 1, W)
    bidx = torch.arange(b)[:, None, None, None]
    cidx = torch.arange(c)[None, :, None, None]
    out = padded[bidx, cidx, rows, cols]                                     # (B, C, H, W)
    if mode == "crop_flip":
        flip = torch.rand(b, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


# ---------------------------------------------------------------------------------------------- loaders
# Each returns (trainval, test or None, class names).

@DATASETS.register("digits")
def _digits(cfg: DataConfig, root: Path, seed: int, arg: str):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    x = torch.from_numpy(x).unsqueeze(1)                                      # (N, 1, 8, 8)
    return Split(x, torch.from_numpy(d.target).long()), None, [str(i) for i in range(10)]


@DATASETS.register("synthetic")
def _synthetic(cfg: DataConfig, root: Path, seed: int, arg: str):
    s = cfg.synthetic
    gen = torch.Generator().manual_seed(10_000 + seed)
    protos = torch.randn(s.num_classes, s.channels, s.image_size, s.image_size, generator=gen)
    y = torch.arange(s.num_samples) % s.num_classes
    x = protos[y] + s.noise * torch.randn(s.num_samples, s.channels, s.image_size, s.image_size, generator=gen)
    x = ((x * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)          # (N, C, S, S)
    return Split(x, y), None, [f"class{i}" for i in range(s.num_classes)]


def _missing(what: str, root: Path, files: list[str], hint: str) -> DataError:
    listed = ", ".join(str(root / f) for f in files)
    return DataError(f"{what} not found: put {listed} there ({hint}), or pass --data-dir DIR / set EDGEPKD_DATA")


def _torchvision(cls, root: Path, train: bool, download: bool):
    """Instantiate a torchvision dataset, trying the download (with a timeout) only when allowed."""
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        return cls(root=str(root), train=train, download=True)
    except Exception as e:  # offline, mirror down, disk full...
        raise RuntimeError(str(e)) from None
    finally:
        socket.setdefaulttimeout(old)


@DATASETS.register("mnist")
def _mnist(cfg: DataConfig, root: Path, seed: int, arg: str):
    from torchvision.datasets import MNIST

    try:
        tr = _torchvision(MNIST, root, True, cfg.download)
        te = _torchvision(MNIST, root, False, cfg.download)
    except RuntimeError:
        raise _missing("MNIST", root, [f"MNIST/raw/{f}" for f in MNIST_FILES],
                       "torchvision's layout, uncompressed IDX files") from None
    classes = [str(i) for i in range(10)]
    return (Split(tr.data.unsqueeze(1).clone(), tr.targets.long()),
            Split(te.data.unsqueeze(1).clone(), te.targets.long()), classes)


@DATASETS.register("cifar10")
def _cifar10(cfg: DataConfig, root: Path, seed: int, arg: str):
    from torchvision.datasets import CIFAR10

    jpg = root / "cifar10-jpg"
    if not (root / "cifar-10-batches-py").is_dir() and (jpg / "train").is_dir() and (jpg / "test").is_dir():
        return _imagefolder(cfg, root, seed, str(jpg))
    try:
        tr = _torchvision(CIFAR10, root, True, cfg.download)
        te = _torchvision(CIFAR10, root, False, cfg.download)
    except RuntimeError:
        raise _missing("CIFAR-10", root, ["cifar-10-batches-py/"],
                       "torchvision's pickled batches; or a JPEG copy as cifar10-jpg/{train,test}/<class>/*.jpg") from None

    def to_split(ds):
        return Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long())

    return to_split(tr), to_split(te), list(tr.classes)


@DATASETS.register("imagefolder")
def _imagefolder(cfg: DataConfig, root: Path, seed: int, arg: str):
    if not arg:
        raise DataError("data.dataset: imagefolder needs a path: 'imagefolder:PATH' (a folder of class folders)")
    path = Path(arg).expanduser()
    if not path.is_absolute() and not path.is_dir() and (root / path).is_dir():
        path = root / path
    if not path.is_dir():
        raise DataError(f"imagefolder: {arg}: no such directory (looked in . and {root})")
    if (path / "train").is_dir() and (path / "test").is_dir():
        train, classes = _read_folder(path / "train", cfg.image_size)
        test, test_classes = _read_folder(path / "test", cfg.image_size)
        if test_classes != classes:
            raise DataError(f"imagefolder: {path}/test has classes {test_classes}, train has {classes}")
        return train, test, classes
    split, classes = _read_folder(path, cfg.image_size)
    return split, None, classes


def _read_folder(path: Path, image_size: int | None) -> tuple[Split, list[str]]:
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"imagefolder: {path}: no class folders (expected {path}/<class>/<image>)")
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((path / c).iterdir()) if f.suffix.lower() in exts]
    if not files:
        raise DataError(f"imagefolder: {path}: no images found in its class folders")
    images, size = [], None
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if image_size is not None:
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"imagefolder: {f}: cannot read the image ({e}); remove or replace it") from None
        if size is None:
            size = arr.shape
        elif arr.shape != size:
            raise DataError(f"imagefolder: {f} is {arr.shape[1]}x{arr.shape[0]}, others {size[1]}x{size[0]}: "
                            "set data.image_size to resize all images")
        images.append(arr)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()   # (N, 3, H, W)
    y = torch.tensor([i for _, i in files], dtype=torch.long)
    return Split(x, y), classes
