import numpy as np
import pytest
import torch

from conftest import data_dir
from edgepkd.data import augment, load_dataset
from edgepkd.errors import ConfigError, DataError
from edgepkd.recipe import DataConfig, load_recipe


def test_digits_splits_are_deterministic_and_disjoint():
    a = load_dataset(DataConfig(), seed=0)
    b = load_dataset(DataConfig(), seed=0)
    c = load_dataset(DataConfig(), seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (1294, 144, 359)
    assert torch.equal(a.test.x, b.test.x) and not torch.equal(a.test.x, c.test.x)
    assert a.train.x.dtype == torch.uint8 and a.input_shape == (1, 8, 8) and a.num_classes == 10
    rows = lambda s: {bytes(r) for r in s.x.flatten(1).numpy()}
    assert not (rows(a.test) & rows(a.val)) or len(rows(a.test) & rows(a.val)) < 5  # duplicates exist in digits


def test_normalize_uses_train_statistics():
    d = load_dataset(DataConfig(dataset="synthetic"), seed=0)
    x = d.normalize(d.train.x)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2
    assert d.preprocessing()["scale"] == pytest.approx(1 / 255)


def test_augment_keeps_shape_and_is_seeded():
    d = load_dataset(DataConfig(dataset="synthetic"), seed=0)
    x = d.train.x[:16]
    for mode in ("crop", "crop_flip"):
        a = augment(x, mode, torch.Generator().manual_seed(0))
        b = augment(x, mode, torch.Generator().manual_seed(0))
        assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, x)
    assert augment(x, "none", torch.Generator()) is x


def test_imagefolder_with_and_without_official_split(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "ds" / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(
                    tmp_path / "ds" / split / cls / f"{i}.png")
    d = load_dataset(DataConfig(dataset=f"imagefolder:{tmp_path / 'ds'}", image_size=8, val_fraction=0.1), seed=0)
    assert d.classes == ["cat", "dog"] and len(d.test) == 12 and d.input_shape == (3, 8, 8)
    d = load_dataset(DataConfig(dataset=f"imagefolder:{tmp_path / 'ds' / 'train'}"), seed=0)
    assert len(d.train) + len(d.val) + len(d.test) == 12 and d.input_shape == (3, 10, 10)
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(DataConfig(dataset=f"imagefolder:{tmp_path / 'missing'}"), seed=0)


def test_unknown_dataset_lists_names():
    with pytest.raises(ConfigError, match="unknown dataset 'mnsit'; did you mean 'mnist'"):
        load_dataset(DataConfig(dataset="mnsit"), seed=0)


def test_missing_mnist_says_which_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(dataset="mnist", download=False), seed=0, data_dir=str(tmp_path))
    assert f"{tmp_path}/MNIST/raw/t10k-labels-idx1-ubyte" in str(e.value)


@pytest.mark.data
def test_real_mnist_and_cifar10_jpg_load():
    root = data_dir()
    if root is None:
        pytest.skip("set EDGEPKD_DATA to a folder with MNIST/raw and cifar10-jpg (as ../shared/data)")
    m = load_dataset(load_recipe(None, ["data.dataset=mnist"]).data, seed=0, data_dir=str(root))
    assert len(m.train) + len(m.val) == 60000 and len(m.test) == 10000 and m.input_shape == (1, 28, 28)
    if not (root / "cifar10-jpg").is_dir():
        pytest.skip("no cifar10-jpg under EDGEPKD_DATA")
    c = load_dataset(DataConfig(dataset="cifar10", train_limit=None), seed=0, data_dir=str(root))
    assert len(c.test) == 10000 and c.input_shape == (3, 32, 32) and c.num_classes == 10


def test_image_size_resizes_every_dataset_and_mean_std_must_fit_channels():
    d = load_dataset(DataConfig(image_size=16), seed=0)
    assert d.input_shape == (1, 16, 16) and d.test.x.dtype == torch.uint8
    with pytest.raises(ConfigError, match="images have 1 channel"):
        load_dataset(DataConfig(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]), seed=0)
