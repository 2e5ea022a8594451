"""An outside reviewer's misuses of the data and starting-model layer (``ppu_fast.data``,
``ppu_fast.training``): each gave a silently different split or model, or an unhelpful crash, before
it was fixed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ppu_fast.data import ArrayDataset, _forget_indices, make_split
from ppu_fast.training import TrainConfig, cache_key, fit, fit_cached

from conftest import image_tree

TEN = [f"c{i}" for i in range(10)]


def test_hidden_folders_are_not_classes(tmp_path):
    root = image_tree(tmp_path / "t", TEN, {"train": 4, "test": 2}, size=(8, 8))
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "test" / "__MACOSX").mkdir()
    split = make_split("cifar10", data_root=root, scenario="class", progress=False)
    assert split.num_classes == 10
    # class 5 is still the sixth folder, c5: its 4 training images minus 1 for validation
    assert len(split.forget_idx) == 3 and split.forget_classes == [5]


def test_empty_or_mismatched_class_folders_are_refused(tmp_path):
    root = image_tree(tmp_path / "a", TEN, {"train": 4, "test": 2}, size=(8, 8))
    (root / "train" / "extra").mkdir()
    (root / "test" / "extra").mkdir()
    with pytest.raises(ValueError, match="class folder .*extra' has no images"):
        make_split("imagefolder", data_root=root, progress=False)
    root = image_tree(tmp_path / "b", TEN, {"train": 4}, size=(8, 8))
    image_tree(root, TEN[:9], {"test": 2}, size=(8, 8))
    with pytest.raises(ValueError, match=r"must hold the same class folders; test/ lacks \['c9'\]"):
        make_split("cifar10", data_root=root, progress=False)


def test_a_cifar_dataset_needs_its_class_count(tmp_path):
    root = image_tree(tmp_path / "t", TEN[:9], {"train": 4, "test": 2}, size=(8, 8))
    with pytest.raises(ValueError, match="has 9 classes .*dataset 'cifar10' expects CIFAR-10's 10"):
        make_split("cifar10", data_root=root, progress=False)
    assert make_split("imagefolder", data_root=root, scenario="class", progress=False).num_classes == 9


def test_degenerate_reductions_and_empty_classes_are_refused(tmp_path):
    root = image_tree(tmp_path / "t", TEN, {"train": 4, "test": 2}, size=(8, 8))
    with pytest.raises(ValueError, match="train_per_class: 1 image per class leaves none for training"):
        make_split("cifar10", data_root=root, train_per_class=1, progress=False)
    split = make_split("cifar10", data_root=root, train_per_class=np.int64(3), test_per_class=np.int32(1),
                       scenario="class", progress=False)
    assert split.describe()["reduced"] == {"train_per_class": 3, "test_per_class": 1}
    assert type(split.describe()["reduced"]["train_per_class"]) is int
    targets = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="forget_class=2: the training set has no example of class 2"):
        _forget_indices(targets, np.random.default_rng(0), "class", 2, None, None, 5, 100, 3)


def test_channels_first_pixels_are_refused():
    with pytest.raises(ValueError, match=r"look channels-first; expected \(N, H, W, C\) uint8"):
        ArrayDataset(np.zeros((4, 3, 8, 8), dtype=np.uint8), [0, 1, 0, 1])
    assert ArrayDataset(np.zeros((4, 8, 8, 3), dtype=np.uint8), [0, 1, 0, 1]).num_channels == 3


def _tiny():
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(16, 1, 4, 4, generator=g), torch.arange(16) % 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, data


def test_numpy_numbers_in_the_training_config():
    cfg = TrainConfig(epochs=np.int64(1), batch_size=np.int32(8), seed=np.int64(3), lr=np.float32(0.1))
    assert (type(cfg.epochs), type(cfg.seed), type(cfg.lr)) == (int, int, float)
    with pytest.raises(ValueError, match="epochs must be an integer, got 1.5"):
        TrainConfig(epochs=1.5)
    model, data = _tiny()
    fit(model, data, cfg, progress=False)


def test_fit_leaves_the_callers_random_stream_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path))
    model, data = _tiny()
    cfg = TrainConfig(epochs=1, batch_size=8)
    draws = []
    for _ in range(2):  # a cache miss, then a hit: the caller's next draw is the same
        torch.manual_seed(42)
        _, meta = fit_cached(model, data, cfg, progress=False)
        draws.append((meta["cached"], torch.rand(3)))
    assert [c for c, _ in draws] == [False, True]
    torch.manual_seed(42)
    assert torch.equal(draws[0][1], torch.rand(3)) and torch.equal(draws[1][1], draws[0][1])


def test_the_cache_key_covers_frozen_parameters_and_dataset_types(tmp_path, monkeypatch):
    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path))
    model, data = _tiny()
    cfg = TrainConfig(epochs=1, batch_size=8)
    full, _ = fit_cached(model, data, cfg, progress=False)
    probe = nn.Sequential(*[m for m in __import__("copy").deepcopy(model)])
    for p in probe[1].parameters():
        p.requires_grad_(False)
    trained, meta = fit_cached(probe, data, cfg, progress=False)
    assert not meta["cached"] and torch.equal(trained[1].weight, model[1].weight)
    assert not torch.equal(full[1].weight, model[1].weight)

    class Shifted(ArrayDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x, 1 - y

    shifted = Shifted(data.images, data.targets)
    assert cache_key(model, shifted, cfg) != cache_key(model, data, cfg)


def test_a_foreign_cache_file_is_retrained_over(tmp_path, monkeypatch):
    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path))
    model, data = _tiny()
    cfg = TrainConfig(epochs=1, batch_size=8)
    _, meta = fit_cached(model, data, cfg, progress=False)
    with open(meta["path"], "wb") as fh:
        fh.write(b"not a checkpoint at all")
    again, meta2 = fit_cached(model, data, cfg, progress=False)
    assert not meta2["cached"] and isinstance(again, nn.Module)
    assert fit_cached(model, data, cfg, progress=False)[1]["cached"]


def test_options_a_dataset_would_ignore_are_refused():
    with pytest.raises(ValueError, match="image_size=32: dataset 'digits5' is scikit-learn's 8x8 digits"):
        make_split("digits5", image_size=32, progress=False)
    with pytest.raises(ValueError, match="val_fraction=0.1: 'digits5' has the paper's fixed small-scale split"):
        make_split("digits5", val_fraction=0.1, progress=False)
    assert len(make_split("digits", val_fraction=0.1, progress=False).val) > 0
