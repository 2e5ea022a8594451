"""An outside reviewer's misuses of the data and starting-model layer (``ppu_fast.data``,
``ppu_fast.training``): each gave a silently different split or model, or an unhelpful crash, before
it was fixed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ppu_fast.data import CIFAR10_CLASSES, CIFAR100_CLASSES, ArrayDataset, _forget_indices, make_split
from ppu_fast.training import TrainConfig, cache_key, fit, fit_cached

from conftest import image_tree

# cifar5/cifar10 trees must use CIFAR-10's class names (the labels are their sorted order)
TEN = list(CIFAR10_CLASSES)


def test_hidden_folders_are_not_classes(tmp_path):
    root = image_tree(tmp_path / "t", TEN, {"train": 4, "test": 2}, size=(8, 8))
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "test" / "__MACOSX").mkdir()
    split = make_split("cifar10", data_root=root, scenario="class", progress=False)
    assert split.num_classes == 10
    # class 5 is still the sixth folder, dog: its 4 training images minus 1 for validation
    assert len(split.forget_idx) == 3 and split.forget_classes == [5]


def test_empty_or_mismatched_class_folders_are_refused(tmp_path):
    root = image_tree(tmp_path / "a", TEN, {"train": 4, "test": 2}, size=(8, 8))
    (root / "train" / "extra").mkdir()
    (root / "test" / "extra").mkdir()
    with pytest.raises(ValueError, match="class folder .*extra' has no images"):
        make_split("imagefolder", data_root=root, progress=False)
    root = image_tree(tmp_path / "b", TEN, {"train": 4}, size=(8, 8))
    image_tree(root, TEN[:9], {"test": 2}, size=(8, 8))
    with pytest.raises(ValueError, match=r"must hold the same class folders; test/ lacks \['truck'\]"):
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


def _pixels_of(path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.as_tensor(np.array(im.convert("RGB"))).permute(2, 0, 1)


def test_the_split_records_which_folder_each_label_is(tmp_path):
    # numbered folders sort as strings: label 2 is folder '10', as in torchvision's ImageFolder
    names = [str(i) for i in range(12)]
    root = image_tree(tmp_path / "n", names, {"train": 3, "test": 1}, size=(8, 8), ext="png")
    split = make_split("imagefolder", data_root=root, scenario="class", forget_class=2, val_fraction=0.0,
                       image_size=8, progress=False)
    assert split.describe()["classes"] == sorted(names) == ["0", "1", "10", "11", "2", "3", "4", "5", "6",
                                                           "7", "8", "9"]
    forgotten = split.train.images[split.forget_idx]
    assert any(torch.equal(x, _pixels_of(root / "train" / "10" / "0000.png")) for x in forgotten)
    # cifar5 uses the first 5 of CIFAR-10's classes, and says so
    root = image_tree(tmp_path / "c", TEN, {"train": 125, "test": 100}, size=(2, 2), ext="png")
    assert make_split("cifar5", data_root=root, progress=False).describe()["classes"] == TEN[:5]


def test_a_cifar_tree_needs_the_official_class_names(tmp_path):
    assert list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES)
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES) and len(set(CIFAR100_CLASSES)) == 100
    tutorial = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    root = image_tree(tmp_path / "t", tutorial, {"train": 4, "test": 2}, size=(2, 2))
    for name in ("cifar5", "cifar10"):
        with pytest.raises(ValueError, match=r"data_root: the class folders of .* not CIFAR-10's class names"
                                             r".*unexpected 'car', 'plane'; expected airplane, automobile.*"
                                             r"use dataset='imagefolder' \(--dataset imagefolder\)"):
            make_split(name, data_root=root, progress=False)
    assert make_split("imagefolder", data_root=root, scenario="class", progress=False).num_classes == 10
    hundred = list(CIFAR100_CLASSES[:99]) + ["zebra"]
    root = image_tree(tmp_path / "h", hundred, {"train": 2, "test": 1}, size=(2, 2))
    with pytest.raises(ValueError, match=r"not CIFAR-100's class names.*unexpected 'zebra'; expected apple"):
        make_split("cifar100", data_root=root, progress=False)


def test_16_and_32_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    root = image_tree(tmp_path / "t", ["a", "b"], {"test": 1}, size=(4, 4))
    grey = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000  # 0 .. 60000 of 65535
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        Image.fromarray(grey).save(root / "train" / c / "0.png")  # opens as mode I;16
    expected = torch.as_tensor((grey >> 8).astype(np.uint8))
    for n, (more, mode) in enumerate([(None, "I;16"), ("1.tif", "I;16B"), ("2.tif", "I"),
                                      ("3.pgm", "I")]):
        if more == "1.tif":
            Image.fromarray(grey.astype(">u2")).save(root / "train" / "a" / more)
        elif more == "2.tif":  # 32-bit: scaled by the type's range
            Image.fromarray(grey.astype(np.int32) << 15).save(root / "train" / "b" / more)
        elif more == "3.pgm":  # 16-bit PGM: mode I too, but 16-bit values (it turned black)
            Image.fromarray(grey).save(root / "train" / "a" / more)
        assert mode in {Image.open(p).mode for p in (root / "train").rglob(more or "*.png")}
        split = make_split("imagefolder", data_root=root, scenario="class", forget_class=0, val_fraction=0.0,
                           image_size=4, progress=False)
        assert len(split.train) == 2 + n
        for x in split.train.images:
            assert torch.equal(x[0], expected) and torch.equal(x[1], expected)


def test_image_folders_are_read_as_torchvision_reads_them(tmp_path):
    root = image_tree(tmp_path / "t", ["a", "b"], {"train": 2, "test": 1}, size=(4, 4))
    image_tree(root / "train" / "a", ["batch2"], {"deeper": 3}, size=(4, 4))  # a/deeper/batch2/*.jpg
    image_tree(root / "train" / "b", ["x"], {"tifs": 2}, size=(4, 4), ext="tif")
    image_tree(root / "train" / "b", ["y"], {"more": 1}, size=(4, 4), ext="webp")
    image_tree(root / "train" / "b", ["ppm"], {"more": 1}, size=(4, 4), ext="ppm")
    image_tree(root / "train" / "a", ["skip"], {".ipynb_checkpoints": 5}, size=(4, 4))  # hidden: not read
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    split = make_split("imagefolder", data_root=root, scenario="class", forget_class=0, val_fraction=0.0,
                       progress=False)
    assert torch.bincount(split.train.targets).tolist() == [5, 6]
    # a broken link in a sub-folder is named, not skipped
    (root / "train" / "b" / "tifs" / "x" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(ValueError, match=r"gone\.jpg' is not a readable image"):
        make_split("imagefolder", data_root=root, scenario="class", val_fraction=0.0, progress=False)


def test_the_built_in_digits_refuse_a_data_root(tmp_path):
    for name in ("digits", "digits5"):
        with pytest.raises(ValueError, match=f"data_root='{tmp_path}': dataset '{name}' is scikit-learn's "
                                             f"built-in 8x8 digits, .* expected None"):
            make_split(name, data_root=tmp_path, progress=False)


@pytest.mark.parametrize("size", [True, 0, -4, 31.5, "32", (16, 24)])
def test_image_size_must_be_a_positive_int(tmp_path, size):
    root = image_tree(tmp_path / "t", ["a", "b"], {"train": 2, "test": 1}, size=(4, 4))
    with pytest.raises(ValueError, match=r"image_size=.*: expected a positive int"):
        make_split("imagefolder", data_root=root, scenario="class", forget_class=0, image_size=size,
                   progress=False)
    assert make_split("imagefolder", data_root=root, scenario="class", forget_class=0, image_size=np.int64(6),
                      progress=False).image_size == 6


def test_a_checkpoint_without_batchnorm_counters_loads_as_torch_loads_it(tmp_path):
    """Older checkpoints lack BatchNorm's ``num_batches_tracked``; torch's strict load keeps the
    module's own counter for them, and ``--init-checkpoint`` must not refuse them as 'missing
    keys'. Any other missing key is still refused."""
    from ppu_fast.models import build_model
    from ppu_fast.pretrain import load_checkpoint_into

    torch.manual_seed(0)
    src = build_model("smallcnn", 5, 1, 0.5)
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(src.state_dict())
    torch.manual_seed(1)
    dst = build_model("smallcnn", 5, 1, 0.5)
    assert load_checkpoint_into(dst, old, what="smallcnn", source="'old.pt'") == "loaded"
    for k, v in old.items():
        assert torch.equal(dst.state_dict()[k], v), k
    # torch itself agrees on the plain dict
    build_model("smallcnn", 5, 1, 0.5).load_state_dict(old, strict=True)
    broken = {k: v for k, v in old.items() if k != "features.0.1.running_mean"}
    with pytest.raises(ValueError, match=r"missing keys features\.0\.1\.running_mean"):
        load_checkpoint_into(dst, broken, what="smallcnn", source="'broken.pt'")


def test_a_pickled_whole_model_gets_told_to_save_its_state_dict(tmp_path):
    """``torch.save(model)`` files fail torch's weights_only load with advice to unpickle
    them (which runs code): the error says what to save instead."""
    from ppu_fast.models import build_model
    from ppu_fast.pretrain import read_checkpoint

    path = tmp_path / "whole.pt"
    torch.save(build_model("smallcnn", 5, 1, 0.5), path)
    with pytest.raises(ValueError, match=r"init_checkpoint: .*pickles Python objects \(GLOBAL "
                                         r"ppu_fast\.models\.SmallCNN\), e\.g\. a whole model "
                                         r"saved with torch\.save\(model\).*save "
                                         r"model\.state_dict\(\) instead$") as info:
        read_checkpoint(path)
    assert "weights_only=False" not in str(info.value)  # torch's advice to unpickle it anyway
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"not a torch checkpoint .*\(UnpicklingError: "
                                         r"Unsupported operand \d+\); expected a file written by "
                                         r"torch\.save\(model\.state_dict\(\), path\)$") as info:
        read_checkpoint(junk)
    # torch's advice to unpickle it anyway, or to file an issue, is wrong for a corrupt file
    assert "state_dict() instead" not in str(info.value)
    assert "weights_only` set to `False" not in str(info.value)
    assert "file an issue" not in str(info.value)


def test_another_architecture_is_refused_before_any_image_is_decoded(tmp_path, monkeypatch):
    """``--init-checkpoint`` of another architecture used to be refused only after the first
    seed's split was built (a minute of JPEG decoding for CIFAR-10): it is refused first now."""
    from ppu_fast.models import build_model
    from ppu_fast.unlearn import experiment

    def no_split(*args, **kwargs):
        raise AssertionError("the split was built before the checkpoint was checked")

    monkeypatch.setattr(experiment, "make_split", no_split)
    torch.save(build_model("allcnn", 10, 3, 0.1).state_dict(), tmp_path / "allcnn.pt")
    with pytest.raises(ValueError, match=r"is not a state dict of smallcnn \(width 0\.5, 3 input "
                                         r"channel\(s\)\): unexpected keys"):
        experiment.run_experiment(dataset="cifar10", data_root=tmp_path, model="smallcnn", width=0.5,
                                  methods=["original"], seeds=[0], progress=False,
                                  init_checkpoint=tmp_path / "allcnn.pt")
    # the right architecture with another class count passes the early check (head re-initialised)
    torch.save(build_model("smallcnn", 7, 3, 0.5).state_dict(), tmp_path / "small.pt")
    with pytest.raises(AssertionError, match="split was built"):
        experiment.run_experiment(dataset="cifar10", data_root=tmp_path, model="smallcnn", width=0.5,
                                  methods=["original"], seeds=[0], progress=False,
                                  init_checkpoint=tmp_path / "small.pt")


def test_dataset_channels_are_what_the_split_loads(tmp_path):
    from ppu_fast.data import dataset_channels

    for name in ("digits", "digits5"):
        assert make_split(name, progress=False).in_channels == dataset_channels(name) == 1
    image_tree(tmp_path, ["a", "b"], {"train": 6, "test": 3}, size=(8, 8))
    s = make_split("imagefolder", data_root=tmp_path, forget_class=1, num_forget=2, progress=False)
    assert s.in_channels == dataset_channels("imagefolder") == 3
    assert dataset_channels("cifar10") == dataset_channels("cifar5") == 3


def test_a_class_whose_only_image_goes_to_validation_is_refused(tmp_path):
    # The hold-out takes at least one image per class: a class with one training image vanished
    # from training, and its test images still counted (probe 28).
    root = image_tree(tmp_path / "t", ["a", "b", "c"], {"train": 4, "test": 2}, size=(4, 4))
    for f in sorted((root / "train" / "c").iterdir())[1:]:
        f.unlink()
    with pytest.raises(ValueError, match=r"the split: class 2 \('c'\) has 1 training example\(s\), "
                                         r"all held out for validation \(val_fraction=0.05"):
        make_split("imagefolder", data_root=root, scenario="class", forget_class=0, progress=False)
    split = make_split("imagefolder", data_root=root, scenario="class", forget_class=0,
                       val_fraction=0.0, progress=False)
    assert torch.bincount(split.train.targets).tolist() == [4, 4, 1]


def test_a_tree_without_test_says_which_folder_is_missing(tmp_path):
    root = image_tree(tmp_path / "t", ["a", "b"], {"train": 2}, size=(4, 4))
    with pytest.raises(FileNotFoundError, match=r"dataset 'imagefolder' \(test/ missing\): no data at"):
        make_split("imagefolder", data_root=root, scenario="class", progress=False)


@pytest.mark.parametrize("arg,value", [("forget_class", 1.5), ("forget_class", True),
                                       ("forget_class", "0"), ("num_forget", "25"),
                                       ("num_forget", 2.5)])
def test_split_refuses_a_class_or_count_that_is_not_an_integer(arg, value):
    """int() read 1.5 and True as class 1 and "0" as class 0, silently (a runner hunt's find)."""
    scenario = "class" if arg == "forget_class" else "selective"
    with pytest.raises(ValueError, match=rf"{arg}: expected an integer, got {value!r}"):
        make_split("digits", scenario=scenario, **{arg: value})
