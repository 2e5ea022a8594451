"""Splits (sizes, disjointness, determinism), the CIFAR / ImageFolder loaders and their errors."""
import pickle

import numpy as np
import pytest
import torch

from ppu_fast.data import CIFAR_MEAN, CIFAR_STD, ArrayDataset, dataset_targets, make_split

from conftest import CIFAR10_DIR as SHARED_CIFAR10, image_tree


def _check_partition(split):
    f, r = set(split.forget_idx.tolist()), set(split.retain_idx.tolist())
    assert not f & r
    assert f | r == set(range(len(split.train)))


def test_digits5_split_sizes_and_forget_set():
    s = make_split("digits5", seed=3)
    assert (len(s.train), len(s.val), len(s.forget_idx), len(s.retain_idx)) == (500, 125, 25, 475)
    assert s.num_classes == 5
    for ds, per_class in ((s.train, 100), (s.val, 25)):
        assert torch.bincount(ds.targets, minlength=5).tolist() == [per_class] * 5
    test_counts = torch.bincount(s.test.targets, minlength=5)
    assert len(test_counts) == 5 and int(test_counts.min()) >= 50
    assert s.forget_classes == [0]
    assert s.train[0][0].shape == (1, 8, 8)
    _check_partition(s)


def test_digits5_train_val_test_are_different_images():
    s = make_split("digits5", seed=0)
    rows = lambda ds: {tuple(x.flatten().tolist()) + (int(y),) for x, y in ds}  # noqa: E731
    train, val, test = rows(s.train), rows(s.val), rows(s.test)
    # scikit-learn's digits contains a few exact duplicate images; disjoint index sets still leave
    # almost every image in one part only.
    assert len(train & test) <= 3 and len(train & val) <= 3


def test_splits_are_deterministic_under_a_seed():
    a, b, c = make_split("digits5", seed=1), make_split("digits5", seed=1), make_split("digits5", seed=2)
    assert np.array_equal(a.forget_idx, b.forget_idx)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)


@pytest.mark.parametrize("scenario,forget_class,num_forget,expected", [
    ("class", 3, None, None), ("selective", None, 40, 40), ("selective", 7, 10, 10)])
def test_large_scale_scenarios(scenario, forget_class, num_forget, expected):
    s = make_split("digits", scenario=scenario, forget_class=forget_class, num_forget=num_forget, seed=0)
    c = 5 if forget_class is None else forget_class
    assert s.num_classes == 10 and s.forget_classes == [c]
    in_class = int((s.train.targets == c).sum())
    assert len(s.forget_idx) == (in_class if expected is None else expected)
    # val_fraction (5 %) of every class is held out
    for k in range(10):
        n_train, n_val = int((dataset_targets(s.train) == k).sum()), int((s.val.targets == k).sum())
        assert n_val == max(1, round(0.05 * (n_train + n_val)))
    _check_partition(s)


def test_explicit_forget_indices():
    s = make_split("digits5", forget_indices=[3, 1, 400])
    assert s.forget_idx.tolist() == [1, 3, 400] and len(s.retain_idx) == 497


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"forget_indices": [0, 500]}, ValueError, "training set"),
    ({"forget_indices": [-1]}, ValueError, "training set"),
    ({"forget_indices": []}, ValueError, "non-empty"),
    ({"forget_indices": [2, 2]}, ValueError, "repeated"),
    ({"num_forget": 0}, ValueError, "num_forget"),
    ({"num_forget": 101}, ValueError, "num_forget"),
    ({"forget_class": 7}, ValueError, "forget_class"),
    ({"scenario": "everything"}, ValueError, "scenario"),
])
def test_bad_split_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_split("digits5", **kwargs)


def test_unknown_dataset_and_missing_folders(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        make_split("mnist")
    with pytest.raises(ValueError, match="data_root"):
        make_split("cifar10")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*put the files there"):
        make_split("cifar10", data_root=missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        make_split("cifar10", data_root=tmp_path / "empty")


def _write_official(root, hundred, per_class_train, per_class_test, n_classes):
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = b"fine_labels" if hundred else b"labels"
    def batch(labels):
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        return {b"data": data, key: list(labels)}
    train_labels = np.repeat(np.arange(n_classes), per_class_train)
    rng.shuffle(train_labels)
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    written = []
    for name, part in zip(names, np.array_split(train_labels, len(names))):
        d = batch(part)
        written.append(d)
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)
    with open(folder / ("test" if hundred else "test_batch"), "wb") as fh:
        pickle.dump(batch(np.repeat(np.arange(n_classes), per_class_test)), fh)
    return written


def test_cifar10_official_batches_selective(tmp_path):
    batches = _write_official(tmp_path, False, 30, 4, 10)
    s = make_split("cifar10", data_root=tmp_path, num_forget=6, seed=0, progress=False)
    assert s.num_classes == 10 and len(s.test) == 40 and len(s.forget_idx) == 6
    assert len(s.train) + len(s.val) == 300 and s.forget_classes == [5]
    # pixel layout: channel-major rows of 1024, normalised with the CIFAR statistics
    x0, y0 = s.train[0]
    flat = np.concatenate([b[b"data"] for b in batches])
    labels = np.concatenate([b[b"labels"] for b in batches])
    raw = torch.as_tensor(flat, dtype=torch.float32).view(-1, 3, 32, 32) / 255
    expected = (raw - torch.tensor(CIFAR_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR_STD).view(3, 1, 1)
    match = [i for i in range(len(raw)) if torch.allclose(expected[i], x0, atol=1e-5)]
    assert len(match) == 1 and labels[match[0]] == int(y0)
    _check_partition(s)
    with pytest.raises(ValueError, match="image_size=64: the official CIFAR batches .* are 32x32"):
        make_split("cifar10", data_root=tmp_path, image_size=64, progress=False)


def test_reduced_large_scale_split(tmp_path):
    _write_official(tmp_path, False, 30, 4, 10)
    full = make_split("cifar10", data_root=tmp_path, scenario="class", seed=1, progress=False)
    s = make_split("cifar10", data_root=tmp_path, scenario="class", seed=1, progress=False,
                   train_per_class=20, test_per_class=3)
    counts = np.bincount(s.train.targets.numpy(), minlength=10) + np.bincount(s.val.targets.numpy(), minlength=10)
    assert counts.tolist() == [20] * 10 and len(s.val) == 10  # 5 % of 20 per class, at least 1
    assert np.bincount(s.test.targets.numpy(), minlength=10).tolist() == [3] * 10
    assert len(s.forget_idx) == int((s.train.targets == 5).sum())  # class scenario: the whole class
    assert s.describe()["reduced"] == {"train_per_class": 20, "test_per_class": 3}
    assert "reduced" not in full.describe() and len(full.train) + len(full.val) == 300
    again = make_split("cifar10", data_root=tmp_path, scenario="class", seed=1, progress=False,
                       train_per_class=20, test_per_class=3)
    assert torch.equal(again.train.targets, s.train.targets) and torch.equal(again.train.images, s.train.images)
    _check_partition(s)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "cifar5", "train_per_class": 10}, "train_per_class: only for the large-scale"),
    ({"name": "cifar10", "test_per_class": 0}, "test_per_class: expected a positive number"),
    ({"name": "cifar10", "train_per_class": 2.5}, "train_per_class: expected a positive number"),
    ({"name": "cifar10", "train_per_class": 31}, "train_per_class: class 0 has 30 examples, 31 needed"),
])
def test_reduced_split_bad_arguments(tmp_path, kwargs, match):
    _write_official(tmp_path, False, 30, 4, 10)
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        make_split(name, data_root=tmp_path, progress=False, **kwargs)


def test_cifar5_and_cifar100_official(tmp_path):
    _write_official(tmp_path / "c10", False, 125, 100, 10)
    s = make_split("cifar5", data_root=tmp_path / "c10", seed=0, progress=False)
    assert (len(s.train), len(s.val), len(s.test), len(s.forget_idx)) == (500, 125, 500, 25)
    _write_official(tmp_path / "c100", True, 3, 1, 100)
    s = make_split("cifar100", data_root=tmp_path / "c100", scenario="class", forget_class=42,
                   val_fraction=0.0, progress=False)
    assert s.num_classes == 100 and len(s.forget_idx) == 3 and len(s.test) == 100 and len(s.val) == 0


def test_an_unreadable_official_batch_is_named(tmp_path):
    _write_official(tmp_path, False, 3, 1, 10)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    whole = batch.read_bytes()
    batch.write_bytes(whole[:1000])  # an interrupted download or extract
    with pytest.raises(ValueError, match=r"data_root: '.*data_batch_3' is not a readable CIFAR batch "
                                         r"\((UnpicklingError|EOFError).*expected the unmodified file"):
        make_split("cifar10", data_root=tmp_path, progress=False)
    with open(batch, "wb") as fh:  # a pickle of something else: no b'labels'
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8)}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3' is not a readable CIFAR batch \(KeyError"):
        make_split("cifar10", data_root=tmp_path, progress=False)
    # A label outside 0..9 (a modified batch): its image was dropped from every split silently.
    with open(batch, "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 3072), dtype=np.uint8), b"labels": [1, 10, -1]}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3' is not a readable CIFAR batch \(ValueError: "
                                         r"label 10 of image 1 \(and 1 more\) is outside 0\.\.9\)"):
        make_split("cifar10", data_root=tmp_path, progress=False)


def test_other_cifar10_classes_for_pretraining(tmp_path):
    from ppu_fast.data import other_classes_dataset

    batches = _write_official(tmp_path / "c10", False, 12, 2, 10)
    data, classes = other_classes_dataset("cifar5", data_root=tmp_path / "c10", per_class=7, progress=False)
    assert classes == [5, 6, 7, 8, 9] and len(data) == 35
    assert torch.bincount(data.targets).tolist() == [7] * 5  # renumbered 0..4
    # each image is one of the training images of the class it is labelled with (class 5 + label)
    flat = np.concatenate([b[b"data"] for b in batches])
    labels = np.concatenate([b[b"labels"] for b in batches])
    x, y = data[0]
    raw = (x * torch.tensor(CIFAR_STD).view(3, 1, 1) + torch.tensor(CIFAR_MEAN).view(3, 1, 1)) * 255
    match = np.flatnonzero(np.abs(flat.astype(np.float32) - raw.reshape(-1).numpy()).max(1) < 0.5)
    assert len(match) == 1 and labels[match[0]] == 5 + int(y)
    for name in ("cifar10", "digits5"):
        with pytest.raises(ValueError, match="leaves no CIFAR-10 classes free"):
            other_classes_dataset(name, data_root=tmp_path / "c10")
    with pytest.raises(ValueError, match="per_class must be a positive"):
        other_classes_dataset("cifar5", data_root=tmp_path / "c10", per_class=0)


def test_imagefolder_tree_resized(tmp_path):
    image_tree(tmp_path, ("alice", "bob"), {"train": 6, "test": 2}, size=(40, 50), ext="png")
    s = make_split("imagefolder", data_root=tmp_path, forget_class=1, num_forget=2, val_fraction=0.2,
                   progress=False)
    assert s.num_classes == 2 and s.train[0][0].shape == (3, 32, 32)
    assert len(s.test) == 4 and len(s.forget_idx) == 2 and len(s.val) == 2


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/data/cifar10 not present")
def test_cifar5_from_shared_jpeg_tree():
    s = make_split("cifar5", data_root=SHARED_CIFAR10, seed=0, progress=False)
    assert (len(s.train), len(s.val), len(s.test), len(s.forget_idx)) == (500, 125, 500, 25)
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and 0 <= int(y) < 5
    # normalised pixels: roughly zero mean, unit spread over a few hundred real images
    xs = torch.stack([s.test[i][0] for i in range(0, 500, 2)])
    assert abs(float(xs.mean())) < 0.5 and 0.6 < float(xs.std()) < 1.5
    assert torch.bincount(s.test.targets).tolist() == [100] * 5


def test_array_dataset_checks_shapes():
    with pytest.raises(ValueError, match="4 dimensions"):
        ArrayDataset(np.zeros((3, 8, 8), np.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match="disagree"):
        ArrayDataset(np.zeros((3, 8, 8, 3), np.uint8), [0, 1])
