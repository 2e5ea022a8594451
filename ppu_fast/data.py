"""Datasets and the paper's unlearning splits (after SCRUB, Kurmanji et al. 2024).

Every dataset is held in memory as a :class:`ArrayDataset` (images and integer labels), so that splits
are plain index arrays and a seed fixes all of them. Nothing is ever downloaded: the CIFAR sets and any
ImageFolder tree are read from a local folder, and a missing folder is an error that says where the
files go.
"""
from __future__ import annotations

import itertools
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler,
                              SequentialSampler, Subset, default_collate, default_convert)

from .caller_state import check_seed, is_int

if TYPE_CHECKING:  # PIL is imported only when an image tree is read
    from PIL import Image

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

SMALL_SCALE = ("digits5", "cifar5")
LARGE_SCALE = ("digits", "cifar10", "cifar100", "imagefolder")
DATASETS = SMALL_SCALE + LARGE_SCALE
SCENARIOS = ("selective", "class")

# torchvision.datasets.folder.IMG_EXTENSIONS (used instead when torchvision is installed), so that a
# tree holds the same images here as in torchvision's ImageFolder.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The official label order (``label_names`` / ``fine_label_names`` in the batches' ``meta`` file,
# https://www.cs.toronto.edu/~kriz/cifar.html, which torchvision's CIFAR10/CIFAR100 ``.classes`` read).
# Both are alphabetical, so an ImageFolder tree with these folder names gets the official labels.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm")


def host_array(values: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    """``values`` (a tensor on any device, an array or a sequence) as a numpy array: a tensor is
    brought to the CPU first (numpy cannot read a GPU tensor, and labels kept on the GPU are
    common)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values)


def _image_extensions() -> tuple[str, ...]:
    try:  # imported late: torchvision is optional and slow to import
        from torchvision.datasets.folder import IMG_EXTENSIONS
    except ImportError:
        return _IMAGE_EXTENSIONS
    return tuple(e.lower() for e in IMG_EXTENSIONS)


class ArrayDataset(Dataset):
    """Images and labels held in memory.

    Args:
        images: (N, H, W, C) uint8 pixels, or (N, C, H, W) float32 already scaled.
        targets: (N,) integer labels.
        mean, std: per-channel normalisation applied to uint8 pixels after scaling to [0, 1].

    Items are ``(x, y)`` with ``x`` a (C, H, W) float32 tensor and ``y`` an int64 scalar tensor.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, targets: Sequence[int] | np.ndarray | torch.Tensor,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        # Arrays and lists on the CPU whatever the caller's default device; a tensor stays where it is.
        images = images if isinstance(images, torch.Tensor) else torch.as_tensor(images, device="cpu")
        targets = torch.as_tensor(host_array(targets), device="cpu")
        if targets.numel() and (targets.is_floating_point() or targets.is_complex()
                                or targets.dtype == torch.bool):
            # A cast would truncate 1.7 to class 1, as every metric refuses to.
            raise ValueError(f"targets: {str(targets.dtype).split('.')[-1]} values; expected "
                             f"integer class labels")
        targets = targets.long()
        if images.dim() != 4:
            raise ValueError(f"images must have 4 dimensions (N, H, W, C) or (N, C, H, W), got shape "
                             f"{tuple(images.shape)}")
        if images.shape[0] != targets.shape[0]:
            raise ValueError(f"images and targets disagree on N: {images.shape[0]} != {targets.shape[0]}")
        if images.dtype == torch.uint8:
            if images.shape[3] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
                # (N, C, H, W) pixels read as (N, H, W, C) would train on scrambled images.
                raise ValueError(f"images: uint8 pixels of shape {tuple(images.shape)} look channels-first; "
                                 f"expected (N, H, W, C) uint8 (e.g. images.permute(0, 2, 3, 1)) or "
                                 f"(N, C, H, W) float32 already scaled")
            # Keep pixels as uint8 (4x smaller than float) and convert per item.
            self.images = images.permute(0, 3, 1, 2).contiguous()
            c = self.images.shape[1]
            for arg, v in (("mean", mean), ("std", std)):
                if v is not None and np.size(v) != c:
                    raise ValueError(f"{arg}: {np.size(v)} values for {c}-channel images; "
                                     f"expected one per channel")
            self._mean = torch.tensor(mean if mean is not None else [0.5] * c,
                                      device=images.device).view(c, 1, 1)
            self._std = torch.tensor(std if std is not None else [0.5] * c,
                                     device=images.device).view(c, 1, 1)
        else:
            self.images = images.float()
            self._mean = self._std = None
        self.targets = targets

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self._mean is not None:
            x = (x.float() / 255.0 - self._mean) / self._std
        return x, self.targets[i]

    @property
    def num_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def fingerprint_bytes(self) -> list[bytes]:
        """Raw bytes that identify the data (for cache keys)."""
        held = [self.images, self.targets] + ([self._mean, self._std] if self._mean is not None
                                              else [])
        return [host_array(t).tobytes() for t in held]  # images may live on a GPU


@dataclass
class Split:
    """A dataset split for unlearning.

    ``train`` is the original model's training set; ``forget_idx`` and ``retain_idx`` partition it
    (indices into ``train``). ``val`` and ``test`` are held out. ``forget_classes`` are the classes that
    occur in the forget set (the membership-inference attack and the "val" selection policy look only at
    them).
    """

    name: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    forget_idx: np.ndarray
    retain_idx: np.ndarray
    num_classes: int
    scenario: str
    seed: int
    info: dict = field(default_factory=dict)

    @property
    def forget(self) -> Subset:
        return Subset(self.train, self.forget_idx.tolist())

    @property
    def retain(self) -> Subset:
        return Subset(self.train, self.retain_idx.tolist())

    @property
    def forget_classes(self) -> list[int]:
        return sorted(set(self.train.targets[self.forget_idx].tolist()))

    @property
    def in_channels(self) -> int:
        return self.train.num_channels

    @property
    def image_size(self) -> int:
        return self.train.image_size

    def describe(self) -> dict:
        return {"dataset": self.name, "scenario": self.scenario, "seed": self.seed,
                "num_classes": self.num_classes, "train": len(self.train), "val": len(self.val),
                "test": len(self.test), "forget": int(len(self.forget_idx)),
                "retain": int(len(self.retain_idx)), "forget_classes": self.forget_classes, **self.info}


def dataset_targets(data: Dataset | DataLoader) -> torch.Tensor:
    """Labels (N,) of a dataset, a ``Subset`` of one, or a loader's dataset, without loading images
    when the dataset exposes ``targets`` of its length (through its ``target_transform`` where it
    has one, as torchvision's datasets label their items); otherwise from its items."""
    if isinstance(data, DataLoader):
        data = loader_examples(data, "data")
    if isinstance(data, Subset):
        rows = torch.as_tensor(list(data.indices), dtype=torch.long, device="cpu")
        return dataset_targets(data.dataset)[rows]
    targets = getattr(data, "targets", None)
    if targets is not None:
        # torchvision's datasets return target_transform(targets[i]) as an item's label.
        transform = getattr(data, "target_transform", None)
        if transform is not None:
            targets = [transform(t) for t in targets]
        out = torch.as_tensor(host_array(targets), dtype=torch.long, device="cpu")
        # An (N, 1) column (numpy labels kept as a column), as the items' (1,) labels are read.
        out = out.reshape(-1) if out.ndim == 2 and out.shape[1] == 1 else out
        # A wrapper that shortens the dataset (its own __len__) but keeps the full targets: those
        # do not describe its items, so the items' own labels are read instead.
        if out.ndim != 1 or out.shape[0] == len(data):
            return out
    return torch.as_tensor([_label(data[i][1]) for i in range(len(data))], dtype=torch.long,
                           device="cpu")


def _label(y: object) -> int:
    """An item's label as an int: a one-element label of any shape too (int() refuses a (1,)
    numpy array under numpy 2)."""
    return int(_one(y))


def collate_pairs(items: list) -> object:
    """``default_collate`` for (x, y) pairs, the labels as cross-entropy takes them: (B,) int64.
    int32 / uint8 labels, one-element labels of shape (1,) (a TensorDataset built from a column, a
    numpy label per item), and sets mixing those with scalar labels failed inside torch otherwise
    (``unlearn`` accepts them, as the metrics do). Items that are not pairs are collated as
    ``default_collate`` would, for the caller's own check to name."""
    if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
        return default_collate(items)
    ys = [_one(b) for _, b in items]
    if (len({type(v) for v in ys}) > 1
            and all(isinstance(v, (torch.Tensor, np.ndarray, np.generic, int)) for v in ys)):
        # default_collate batches by the first item's kind: a Python int after a tensor failed.
        ys = [torch.as_tensor(v) for v in ys]
    x, y = default_collate([(a, b) for (a, _), b in zip(items, ys)])
    if isinstance(y, torch.Tensor) and not (y.is_floating_point() or y.is_complex()
                                            or y.dtype == torch.bool):
        y = y.long()
    return x, y


def named_batches(loader: DataLoader, name: str) -> Iterator:
    """The batches of ``loader``, with torch's collate refusal of an item it cannot batch (a PIL
    image, a string) reworded to name ``name`` and what is expected."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except TypeError as exc:
            if "default_collate" not in str(exc):
                raise
            raise TypeError(f"{name}: its items cannot be batched (torch: {exc}); expected "
                            f"tensors, arrays or numbers (e.g. apply torchvision's ToTensor)"
                            ) from None
        yield batch


def _one(y: object) -> object:
    # A one-element label of any shape as a scalar of its kind.
    if isinstance(y, torch.Tensor) and y.ndim > 0 and y.numel() == 1:
        return y.reshape(())
    if isinstance(y, np.ndarray) and y.ndim > 0 and y.size == 1:
        return y.reshape(())
    return y


class CpuDrawLoader(DataLoader):
    """A ``DataLoader`` that draws its order, its base seed and its batches with torch's default
    device set to the CPU, whatever the caller's default is (the items and the generator are on
    the CPU). Under ``torch.set_default_device("cuda")`` (common in LLM code) torch's own loader
    failed at its first batch: it draws with a CPU generator into tensors made on the default
    device ("Expected a 'cuda' device type for generator", pytorch/pytorch#110820). The order a
    seed gives is the same under any default device; each ``next`` pushes the CPU device mode only
    when the caller's default is another, and only around the loader's own work, so the model
    runs under the caller's default."""

    def __iter__(self):
        if torch.get_default_device().type == "cpu":
            return super().__iter__()
        return _CpuDrawIterator(self)


class _CpuDrawIterator:
    def __init__(self, loader: DataLoader) -> None:
        with torch.device("cpu"):
            self._it = DataLoader.__iter__(loader)

    def __iter__(self) -> "_CpuDrawIterator":
        return self

    def __len__(self) -> int:
        return len(self._it)

    def __next__(self) -> object:
        with torch.device("cpu"):
            return next(self._it)


def check_map_style(data: object, name: str) -> None:
    """Refuse an IterableDataset as ``name``: the methods and the metrics index the examples and
    count them (len)."""
    if isinstance(data, IterableDataset):
        raise TypeError(f"{name} is an IterableDataset; expected a map-style Dataset (len and "
                        f"indexing) of (x, y) pairs")


def loader_examples(loader: DataLoader, arg: str) -> Dataset:
    """The examples a loader visits, as a Dataset: its dataset when it visits all of it once (the
    plain sequential or shuffled loader), else the ``Subset`` its sampler draws, each example once
    (``drop_last`` drops batches of one iteration, not examples of the set). ``unlearn`` and the
    metrics batch the examples themselves, so a loader's batch size is not used; a custom
    ``collate_fn`` is refused rather than silently skipped. ``arg`` names the loader in errors."""
    ds = loader.dataset
    if isinstance(ds, IterableDataset):
        raise TypeError(f"{arg} is a DataLoader over an IterableDataset; expected a map-style "
                        f"Dataset (len and indexing) of (x, y) pairs")
    if loader.collate_fn not in (default_collate, default_convert):
        raise ValueError(f"{arg}: a DataLoader with a custom collate_fn "
                         f"({getattr(loader.collate_fn, '__name__', loader.collate_fn)!r}) is not "
                         f"supported (the methods batch the examples themselves); pass a Dataset "
                         f"of (x, y) pairs")
    batches = loader.batch_sampler
    # The sampler the batches draw from: a batch_sampler= of the caller's has its own (the
    # loader's .sampler is then a default SequentialSampler over the whole dataset).
    sampler = batches.sampler if type(batches) is BatchSampler else loader.sampler
    whole = (getattr(sampler, "data_source", None) is ds
             and (isinstance(sampler, SequentialSampler)
                  or (isinstance(sampler, RandomSampler) and not sampler.replacement
                      and sampler.num_samples == len(ds))))
    if whole and (batches is None or type(batches) is BatchSampler):
        return ds
    # The sampler's draws, not the batches': a loader's drop_last would lose examples silently.
    custom_batches = batches is not None and type(batches) is not BatchSampler
    # On the CPU: a caller's random sampler draws with torch factories (CpuDrawLoader's reason).
    # Reading the draws is no use of the loader: torch's global RNG and the samplers' own
    # generators are as they were afterwards (so the set read is the one the loader's next
    # iteration visits).
    owners = (sampler, batches, getattr(batches, "sampler", None))
    gens = [g for g in (getattr(o, "generator", None) for o in owners)
            if isinstance(g, torch.Generator)]  # one met twice is restored twice, alike
    states = [g.get_state() for g in gens]
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        draws = (i for b in batches for i in b) if custom_batches else iter(sampler)
        # At most one draw past the dataset's size: an infinite sampler (iteration-based loops'
        # InfiniteSampler) never stops, and listing its draws hung.
        idx = [int(i) for i in itertools.islice(draws, len(ds) + 1)]
    for g, st in zip(gens, states):
        g.set_state(st)
    if len(idx) > len(ds):
        raise ValueError(f"{arg}: the DataLoader's sampler draws more than the dataset's {len(ds)} "
                         f"examples (an infinite or repeating sampler?); expected a loader (or "
                         f"Dataset) that visits each example of the set once")
    if len(set(idx)) != len(idx):
        raise ValueError(f"{arg}: the DataLoader's sampler draws {len(idx)} examples but only "
                         f"{len(set(idx))} distinct ones; expected a loader (or Dataset) that "
                         f"visits each example of the set once")
    return Subset(ds, sorted(idx))


def make_loader(data: Dataset | DataLoader, batch_size: int = 256, shuffle: bool = False,
                seed: int | None = None, name: str = "data") -> DataLoader:
    """A DataLoader over ``data``; a loader stands for the examples its sampler visits
    (:func:`loader_examples`), as ``unlearn`` reads it, so that a metric scores the rows the
    caller's loader selects, all of them. ``name``: the caller's argument, for the errors."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if isinstance(data, DataLoader):
        data = loader_examples(data, name)
    # A generator of its own even unshuffled: each iterator draws a base seed from it, which
    # would otherwise come from (and advance) the caller's global torch RNG.
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    return CpuDrawLoader(data, batch_size=int(batch_size), shuffle=shuffle, generator=generator,
                         collate_fn=collate_pairs)


# ----------------------------------------------------------------------------------------------- pools
@dataclass
class _Pool:
    """Labels of a train or test pool, and a way to decode selected images (so that a small split of a
    large JPEG tree decodes only what it uses)."""

    targets: np.ndarray
    load: Callable[[np.ndarray], np.ndarray]  # indices -> (n, H, W, C) uint8
    classes: list[str]
    from_folders: bool = False  # an ImageFolder tree: ``classes`` are its folder names


def _missing(root: Path, what: str, expected: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what}: no data at '{root}'. Nothing is downloaded; put the files there yourself. Expected "
        f"{expected}.")


def _cifar_official(root: Path, hundred: bool) -> tuple[_Pool, _Pool] | None:
    folder = "cifar-100-python" if hundred else "cifar-10-batches-py"
    base = root / folder if (root / folder).is_dir() else root
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test"] if hundred else ["test_batch"]
    if not all((base / f).is_file() for f in train_files + test_files):
        return None
    key = b"fine_labels" if hundred else b"labels"
    n_classes = 100 if hundred else 10

    def read(files: list[str]) -> _Pool:
        xs, ys = [], []
        for f in files:
            # A truncated download or extract must say which file, not end in a bare UnpicklingError.
            try:
                with open(base / f, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(np.asarray(d[key], dtype=np.int64))
                if len(ys[-1]) != len(xs[-1]):
                    raise ValueError(f"{len(xs[-1])} images but {len(ys[-1])} labels")
                bad = np.flatnonzero((ys[-1] < 0) | (ys[-1] >= n_classes))
                if len(bad):
                    # The split draws per class in range(n_classes): such images were dropped.
                    raise ValueError(f"label {ys[-1][bad[0]]} of image {bad[0]} (and {len(bad) - 1} "
                                     f"more) is outside 0..{n_classes - 1}")
            except (pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError, TypeError,
                    AttributeError) as exc:
                raise ValueError(
                    f"data_root: '{base / f}' is not a readable CIFAR batch ({type(exc).__name__}: {exc}); "
                    f"expected the unmodified file from {folder}/ of the official python version "
                    f"(a dict with b'data' of 3072 uint8 per image and b'{key.decode()}')") from None
        x = np.concatenate(xs)
        return _Pool(np.concatenate(ys), lambda idx: x[idx], [str(c) for c in range(n_classes)])

    return read(train_files), read(test_files)


def _class_folders(folder: Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted (label i = the i-th). Hidden folders
    (``.ipynb_checkpoints``, ``.git``) and ``__MACOSX`` are not classes: counted as one, an empty
    folder sorting first would make itself class 0 and move every label by one."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")


def _image_folder(root: Path, image_size: int | None, progress: bool) -> tuple[_Pool, _Pool] | None:
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        return None
    classes = _class_folders(root / "train")
    if not classes:
        return None
    # Labels are positions in this list, so test/ must hold the same classes: a class missing there
    # would leave it out of the test error and the attacks, an extra one would be dropped.
    test_classes = _class_folders(root / "test")
    if test_classes != classes:
        missing, extra = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise ValueError(f"data_root: '{root}/test' and '{root}/train' must hold the same class folders; "
                         f"test/ lacks {missing} and has {extra} that train/ lacks")
    if len(classes) < 2:
        raise ValueError(f"data_root: '{root}/train' holds one class folder ({classes[0]!r}); "
                         f"expected at least 2 (one folder per class)")
    index = {c: i for i, c in enumerate(classes)}
    extensions = _image_extensions()

    def read(sub: str) -> _Pool:
        paths, ys = [], []
        for c in classes:
            folder = root / sub / c
            found = _images_under(folder, extensions)
            if not found:
                # As torchvision's ImageFolder: an empty class folder would still shift every label.
                raise ValueError(f"data_root: class folder '{folder}' has no images "
                                 f"({', '.join(sorted(extensions))}); remove it or add its images")
            paths += found
            ys += [index[c]] * len(found)

        def load(idx: np.ndarray) -> np.ndarray:
            from PIL import Image
            from tqdm.auto import tqdm

            out = []
            for i in tqdm(idx.tolist(), desc=f"decode {sub}", disable=not progress or len(idx) < 2000,
                          leave=False):
                try:
                    with Image.open(paths[i]) as im:
                        im = _to_rgb(im)
                        if image_size is not None and im.size != (image_size, image_size):
                            im = im.resize((image_size, image_size), Image.BILINEAR)
                        out.append(np.asarray(im, dtype=np.uint8))
                except OSError as exc:  # PIL.UnidentifiedImageError and truncated files included
                    raise ValueError(f"data_root: '{paths[i]}' is not a readable image "
                                     f"({type(exc).__name__}: {exc}); expected an image file in "
                                     f"every class folder") from None
            return np.stack(out)

        return _Pool(np.asarray(ys, dtype=np.int64), load, classes, from_folders=True)

    return read("train"), read("test")


def _images_under(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """The image files anywhere under a class folder, in torchvision's ImageFolder order (sorted
    folders, then sorted names; symlinked folders followed): a tree must give the same images here
    as there. Hidden folders and ``__MACOSX`` are skipped as at the class level (``__MACOSX`` holds
    resource forks named like images), and each real folder is walked once (a symlink loop would
    never end)."""
    walked, seen = [], set()
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__MACOSX"]
        walked.append((here, files))
    # Sorted after the walk (torchvision sorts os.walk's tuples): sorting the generator itself would
    # walk everything before the pruning above could act.
    return [Path(here) / f for here, files in sorted(walked)
            for f in sorted(files) if f.lower().endswith(extensions)]


def _to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB. PIL's convert('RGB') clips 16- and 32-bit integer pixels at 255, which
    turns a 16-bit PNG or TIFF (microscopy, medical sets) white: scale them to 8 bits first."""
    from PIL import Image

    # A PGM / PPM of more than 8 bits opens as mode I, its values already scaled by Pillow to
    # 0..65535 whatever the header's maxval: 16-bit data, which the 32-bit rule turned black.
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PPM"):
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "I":  # 32-bit signed integers: the range of the type, negatives as black
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 2 ** 31 - 1) >> 23).astype(np.uint8), "L")
    return im.convert("RGB")


def _digits_pools(seed: int, train_per_class: int | None) -> tuple[_Pool, _Pool]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 8x8 pixels in 0..16; scale to [-1, 1] once.
    x = (d.images.astype(np.float32)[:, None] / 8.0 - 1.0)
    y = d.target.astype(np.int64)
    # scikit-learn's digits has no test split: hold out a seeded share of each class.
    rng = np.random.default_rng(seed + 7919)
    test = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = len(idx) - train_per_class if train_per_class is not None else len(idx) // 5
        test.append(idx[:n])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(y)), test)
    names = [str(c) for c in range(10)]
    return (_Pool(y[train], lambda idx: x[train][idx], names),
            _Pool(y[test], lambda idx: x[test][idx], names))


def _pools(name: str, root: str | Path | None, seed: int, image_size: int | None,
           progress: bool) -> tuple[_Pool, _Pool, tuple | None]:
    if name in ("digits", "digits5"):
        if image_size not in (None, 8):
            raise ValueError(f"image_size={image_size!r}: dataset '{name}' is scikit-learn's 8x8 digits, "
                             f"which are not resized; expected None")
        if root is not None:
            # Recorded in the split's description, an ignored folder would pass for the data used.
            raise ValueError(f"data_root={str(root)!r}: dataset '{name}' is scikit-learn's built-in 8x8 "
                             f"digits, which are not read from a folder; expected None (for digit images "
                             f"of your own use dataset='imagefolder')")
        # digits5 keeps 125 per class for train+val and the rest (52-58 per class) as its test set;
        # digits holds out a fifth of each class as its test set.
        train, test = _digits_pools(seed, 125 if name == "digits5" else None)
        return train, test, None
    if root is None:
        raise ValueError(f"dataset '{name}' needs data_root: a folder with the official python batches "
                         f"or an ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg)")
    if image_size is not None:
        # True would pass as 1 (1x1 images) and 0, 31.5 or '32' fail inside PIL without a name.
        if not is_int(image_size) or image_size < 1:
            raise ValueError(f"image_size={image_size!r}: expected a positive int, the side in pixels "
                             f"that ImageFolder images are resized to (or None for 32)")
        image_size = int(image_size)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _missing(root, f"dataset '{name}'", "train/<class>/ and test/<class>/ image folders" +
                       ("" if name == "imagefolder" else
                        " or torchvision's python batches (cifar-10-batches-py/ or cifar-100-python/)"))
    pools = None
    if name in ("cifar5", "cifar10", "cifar100"):
        pools = _cifar_official(root, hundred=name == "cifar100")
        if pools is not None and image_size not in (None, 32):
            raise ValueError(f"image_size={image_size!r}: the official CIFAR batches at '{root}' are 32x32 "
                             f"and are not resized; expected None (only ImageFolder trees are resized)")
    if pools is None:
        pools = _image_folder(root, 32 if image_size is None else image_size, progress)
    if pools is None:
        # One of the two folders is there: name the one that is not.
        gone = [s for s in ("train", "test") if not (root / s).is_dir()]
        what = (f"dataset '{name}' ({' and '.join(g + '/' for g in gone)} missing)"
                if len(gone) == 1 else f"dataset '{name}'")
        raise _missing(root, what, "train/<class>/ and test/<class>/ image folders" +
                       ("" if name == "imagefolder" else
                        " or torchvision's python batches (cifar-10-batches-py/ or cifar-100-python/)"))
    want = {"cifar5": 10, "cifar10": 10, "cifar100": 100}.get(name)
    if want is not None and len(pools[0].classes) != want:
        raise ValueError(f"data_root: '{root}' has {len(pools[0].classes)} classes "
                         f"({', '.join(pools[0].classes[:12])}{', ...' if len(pools[0].classes) > 12 else ''}); "
                         f"dataset '{name}' expects {'CIFAR-100' if want == 100 else 'CIFAR-10'}'s {want} "
                         f"(use dataset 'imagefolder' for other trees)")
    if want is not None and pools[0].from_folders:
        # Labels are the sorted folder names; only the official names make them CIFAR's labels
        # (a tree named plane/car/... would put 'bird' at label 0 without a word).
        official = CIFAR100_CLASSES if want == 100 else CIFAR10_CLASSES
        unexpected = [c for c in pools[0].classes if c not in official]
        if unexpected:
            raise ValueError(
                f"data_root: the class folders of '{root}' are not {'CIFAR-100' if want == 100 else 'CIFAR-10'}'s "
                f"class names, which dataset '{name}' needs for its labels: unexpected "
                f"{', '.join(repr(c) for c in unexpected[:12])}{', ...' if len(unexpected) > 12 else ''}; "
                f"expected {', '.join(official[:12])}{', ...' if want == 100 else ''}. For another tree use "
                f"dataset='imagefolder' (--dataset imagefolder)")
    norm = (CIFAR_MEAN, CIFAR_STD) if name.startswith("cifar") else ((0.5,) * 3, (0.5,) * 3)
    return pools[0], pools[1], norm


def _per_class(rng: np.random.Generator, targets: np.ndarray, classes: Sequence[int],
               n: int | None, arg: str = "the split") -> dict[int, np.ndarray]:
    out = {}
    for c in classes:
        idx = rng.permutation(np.flatnonzero(targets == c))
        if n is not None:
            if len(idx) < n:
                raise ValueError(f"{arg}: class {c} has {len(idx)} examples, {n} needed")
            idx = idx[:n]
        out[c] = idx
    return out


def dataset_channels(name: str) -> int:
    """The input channels of ``name``'s images as :func:`make_split` loads them, known before any
    is decoded: the digits are grey (1), every image dataset is read as RGB (3)."""
    return 1 if name in ("digits", "digits5") else 3


def check_reduction(name: str, train_per_class: int | None, test_per_class: int | None) -> None:
    """Raise ValueError, naming the argument, unless ``train_per_class`` / ``test_per_class`` are
    None or positive image counts on a large-scale dataset (see :func:`make_split`)."""
    for arg, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if value is None:
            continue
        if name in SMALL_SCALE:
            raise ValueError(f"{arg}: only for the large-scale datasets ({', '.join(LARGE_SCALE)}); "
                             f"'{name}' has the paper's fixed small-scale split")
        if not is_int(value) or value < 1:
            raise ValueError(f"{arg}: expected a positive number of images per class, got {value!r}")
        if arg == "train_per_class" and value < 2:
            raise ValueError(f"{arg}: {value} image per class leaves none for training once the "
                             f"validation hold-out (at least 1 per class) is taken; expected >= 2")


def make_split(name: str = "digits5", *, data_root: str | Path | None = None, scenario: str = "selective",
               forget_class: int | None = None, num_forget: int | None = None,
               forget_indices: Sequence[int] | None = None, val_fraction: float = 0.05, seed: int = 0,
               image_size: int | None = None, progress: bool = True, train_per_class: int | None = None,
               test_per_class: int | None = None) -> Split:
    """Build the paper's split of a dataset.

    Small scale (``digits5``, ``cifar5``): classes 0-4; 125 training images per class, split 100 train /
    25 val; 100 test images per class (digits5: the ~55 per class that scikit-learn's digits has left);
    the forget set is 25 training samples of class 0 (``scenario`` must be "selective").

    Large scale (``digits``, ``cifar10``, ``cifar100``, ``imagefolder``): all classes and all training
    images except ``val_fraction`` of each class, held out as the validation set. ``scenario="class"``
    forgets every training sample of ``forget_class`` (default 5); ``"selective"`` forgets ``num_forget``
    (default 100) samples of it.

    ``train_per_class`` and ``test_per_class`` (large scale only) reduce a large-scale run to fit a
    CPU: each class keeps that many of its training images (a seeded choice, made before the
    validation hold-out, which stays ``val_fraction`` of them) and of its test images. Default: all.
    The test reduction draws from the seed's stream before the selective forget sample does, so a
    run with ``test_per_class`` forgets other images of the class than one without it (the training
    set, and so the cached original, are the same).

    ``forget_indices`` (indices into the training set) overrides the scenario. ``seed`` fixes every
    choice. Returns a :class:`Split`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; expected one of {', '.join(DATASETS)}")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario '{scenario}'; expected one of {', '.join(SCENARIOS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if name in SMALL_SCALE and scenario != "selective":
        raise ValueError(f"scenario={scenario!r}: '{name}' has the paper's fixed small-scale split "
                         f"(25 training samples of forget_class forgotten, the class kept); for class "
                         f"unlearning use a large-scale dataset, e.g. 'digits' or 'cifar10'")
    if name in SMALL_SCALE and val_fraction != 0.05:
        raise ValueError(f"val_fraction={val_fraction!r}: '{name}' has the paper's fixed small-scale split "
                         f"(25 validation images per class); val_fraction applies to the large-scale datasets")
    check_reduction(name, train_per_class, test_per_class)
    seed = check_seed(seed)  # an int in the record (results.json), as the counts below
    # numpy integers pass the check; the split's record must stay JSON (results.json).
    train_per_class = None if train_per_class is None else int(train_per_class)
    test_per_class = None if test_per_class is None else int(test_per_class)
    if scenario == "class" and num_forget is not None and name not in SMALL_SCALE:
        raise ValueError(f"num_forget={num_forget!r}: the class scenario forgets every training "
                         f"example of forget_class; num_forget applies to scenario='selective'")
    train_pool, test_pool, norm = _pools(name, data_root, seed, image_size, progress)
    rng = np.random.default_rng(seed)
    num_classes = len(train_pool.classes)
    if name in SMALL_SCALE:
        classes = list(range(5))
        chosen = _per_class(rng, train_pool.targets, classes, 125)
        tr = np.sort(np.concatenate([v[:100] for v in chosen.values()]))
        va = np.sort(np.concatenate([v[100:] for v in chosen.values()]))
        n_test = 100 if name == "cifar5" else None
        te = np.sort(np.concatenate(list(_per_class(rng, test_pool.targets, classes, n_test).values())))
        num_classes = 5
        default_class, default_forget = 0, 25
        scenario = "selective"
    else:
        classes = list(range(num_classes))
        chosen = _per_class(rng, train_pool.targets, classes, train_per_class, "train_per_class")
        n_val = {c: max(1, int(round(val_fraction * len(v)))) if val_fraction > 0 else 0
                 for c, v in chosen.items()}
        for c, v in chosen.items():
            if len(v) <= n_val[c]:  # the model would never see the class it is tested on
                if not n_val[c]:
                    raise ValueError(f"the split: class {c} ('{train_pool.classes[c]}') has no "
                                     f"training example; expected at least one per class")
                raise ValueError(
                    f"the split: class {c} ('{train_pool.classes[c]}') has {len(v)} training "
                    f"example(s), all held out for validation (val_fraction={val_fraction:g}, at "
                    f"least one per class), leaving none to train on; expected at least "
                    f"{n_val[c] + 1} per class, or val_fraction=0")
        tr = np.sort(np.concatenate([v[n_val[c]:] for c, v in chosen.items()]))
        va = np.sort(np.concatenate([v[:n_val[c]] for c, v in chosen.items()]))
        # Not _per_class(..., None) for "all": it would draw from rng and so move the forget set of
        # every unreduced split (and the models cached for it).
        te = np.arange(len(test_pool.targets)) if test_per_class is None else np.sort(np.concatenate(
            list(_per_class(rng, test_pool.targets, classes, test_per_class, "test_per_class").values())))
        default_class, default_forget = 5, 100

    def build(pool: _Pool, idx: np.ndarray) -> ArrayDataset:
        # An empty part (val_fraction=0) keeps the pool's image shape.
        images = pool.load(idx) if len(idx) else pool.load(np.arange(1))[:0]
        mean, std = norm if norm else (None, None)
        return ArrayDataset(images, pool.targets[idx], mean, std)

    train, val, test = build(train_pool, tr), build(train_pool, va), build(test_pool, te)
    forget_idx = _forget_indices(train.targets.numpy(), rng, scenario, forget_class, num_forget,
                                 forget_indices, default_class, default_forget, num_classes)
    retain_idx = np.setdiff1d(np.arange(len(train)), forget_idx)
    info = {"data_root": str(data_root) if data_root is not None else None}
    if train_pool.from_folders:
        # Labels follow the sorted folder names as strings ('10' before '2'), so the record says which
        # folder each label is; cifar5 uses the first 5.
        info["classes"] = list(train_pool.classes[:num_classes])
    if train_per_class is not None or test_per_class is not None:
        info["reduced"] = {"train_per_class": train_per_class, "test_per_class": test_per_class}
    return Split(name, train, val, test, forget_idx, retain_idx, num_classes, scenario, seed, info)


# The CIFAR-10 classes each small-scale CIFAR set uses; the others are free for pre-training.
_CIFAR10_USED = {"cifar5": list(range(5))}


def check_other_classes(name: str) -> None:
    """Refuse a dataset that leaves no CIFAR-10 classes for :func:`other_classes_dataset`."""
    if name not in _CIFAR10_USED:
        raise ValueError(f"pretrain 'cifar10-other': dataset '{name}' leaves no CIFAR-10 classes free for "
                         f"pre-training; expected one of {', '.join(_CIFAR10_USED)} (cifar5 uses classes "
                         f"0-4 and pre-trains on 5-9)")


def other_classes_dataset(name: str, *, data_root: str | Path | None, per_class: int | None = None,
                          seed: int = 0, image_size: int | None = None,
                          progress: bool = True) -> tuple[ArrayDataset, list[int]]:
    """The training images of the CIFAR-10 classes that dataset ``name`` does not use, for
    pre-training (the stand-in for the paper's CIFAR-100 pre-training, which cannot be fetched here).

    Only ``cifar5`` leaves classes free: it uses CIFAR-10 classes 0-4, so this returns classes 5-9
    from the same ``data_root`` (official batches or an ImageFolder tree; folders in sorted order are
    the classes), with labels renumbered 0, 1, ... in that order and the normalisation of ``name``'s
    split. ``per_class`` keeps at most that many images of each class (a seeded choice; default
    all; a class with fewer keeps all of its images, and the returned dataset's length says how
    many were kept).
    Returns ``(dataset, original class indices)``."""
    check_other_classes(name)
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be a positive number of images per class, got {per_class}")
    train_pool, _, norm = _pools(name, data_root, seed, image_size, progress)
    used = set(_CIFAR10_USED[name])
    other = [c for c in range(len(train_pool.classes)) if c not in used]
    if len(other) < 2:
        raise ValueError(f"pretrain 'cifar10-other': the data at '{data_root}' has {len(train_pool.classes)} "
                         f"classes, so {len(other)} beside the {len(used)} that {name} uses; pre-training "
                         f"needs at least 2 (CIFAR-10 has 10)")
    rng = np.random.default_rng(seed)
    chosen = _per_class(rng, train_pool.targets, other, None)
    idx = np.sort(np.concatenate([v[:per_class] if per_class is not None else v for v in chosen.values()]))
    if len(idx) == 0:
        raise ValueError(f"pretrain 'cifar10-other': no training images of classes {other} at '{data_root}'")
    remap = {c: i for i, c in enumerate(other)}
    labels = np.array([remap[int(c)] for c in train_pool.targets[idx]], dtype=np.int64)
    mean, std = norm if norm else (None, None)
    return ArrayDataset(train_pool.load(idx), labels, mean, std), other


def _forget_indices(targets: np.ndarray, rng: np.random.Generator, scenario: str, forget_class: int | None,
                    num_forget: int | None, forget_indices: Sequence[int] | None, default_class: int,
                    default_forget: int, num_classes: int) -> np.ndarray:
    n = len(targets)
    if forget_indices is not None:
        idx = np.asarray(forget_indices)
        if idx.ndim != 1 or idx.size == 0:
            raise ValueError("forget_indices must be a non-empty 1-D sequence of training-set indices")
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"forget_indices must be integers, got dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"forget_indices must lie in the training set [0, {n}); got values in "
                             f"[{idx.min()}, {idx.max()}]")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("forget_indices contains repeated indices")
        return np.sort(idx.astype(np.int64))
    # 1.5, True or "0" read by int() as classes 1, 1 and 0: refused instead.
    for arg, v in (("forget_class", forget_class), ("num_forget", num_forget)):
        if v is not None and not is_int(v):
            raise ValueError(f"{arg}: expected an integer, got {v!r}")
    c = default_class if forget_class is None else int(forget_class)
    if not 0 <= c < num_classes:
        raise ValueError(f"forget_class must be in [0, {num_classes}), got "
                         + (f"{forget_class}" if forget_class is not None else
                            f"none, whose default {c} is not a class of this {num_classes}-class "
                            f"dataset: pass forget_class (--forget-class)"))
    of_class = np.flatnonzero(targets == c)
    if scenario == "class":
        if len(of_class) == 0:
            raise ValueError(f"forget_class={c}: the training set has no example of class {c}, so the "
                             f"class scenario would forget nothing")
        return of_class.astype(np.int64)
    k = default_forget if num_forget is None else int(num_forget)
    if k <= 0:
        raise ValueError(f"num_forget must be positive (an empty forget set forgets nothing), got {k}")
    if k > len(of_class):
        given = "" if num_forget is not None else " (the default: none was given)"
        raise ValueError(f"num_forget={k}{given} but class {c} has only {len(of_class)} training "
                         f"samples; expected num_forget (--num-forget) <= {len(of_class)}, or more "
                         f"training images per class")
    return np.sort(rng.permutation(of_class)[:k]).astype(np.int64)
