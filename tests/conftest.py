"""Shared fixtures: synthetic classifiers, the GPU skip, the optional shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# ../shared beside the repository; a user's clone has none, and tests that read it skip.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10_DIR = SHARED / "data" / "cifar10"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def confident_classifier(n: int, k: int, seed: int = 0, margin: float = 6.0):
    """Labels (n,) and probabilities (n x k) of a confident classifier: true-class logit +margin."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), y] += margin
    return y, torch.softmax(logits, dim=1)


class LogitsAreInputs(torch.nn.Module):
    """A 'model' whose logits are its inputs, so losses and confidences can be set exactly."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + 0 * self.dummy


class ItemsDataset(torch.utils.data.Dataset):
    """A map-style Dataset whose item i is ``items[i]`` as given: the forms a caller's own dataset
    returns (a bare input, a numpy label, a (1,) array) without any conversion on the way."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def state(model):
    """A detached copy of a model's state dict, to compare before and after."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b, keys=None) -> bool:
    """Whether two state dicts are bit-identical (on ``keys``, or all of ``a``'s)."""
    return all(torch.equal(a[k], b[k]) for k in (keys if keys is not None else a))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: for tiny models, thread synchronisation costs dominate."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small_problem():
    """A small refine problem: (probs 300 x 5, forget mask with 30 rows)."""
    y, p = confident_classifier(300, 5, seed=1)
    mask = torch.zeros(300, dtype=torch.bool)
    mask[torch.nonzero(y == 2)[:30, 0]] = True
    return p, mask


def image_tree(root: Path, classes, counts: dict, size: tuple = (32, 32), ext: str = "jpg") -> Path:
    """An ImageFolder tree of random RGB images: ``root/<split>/<class>/<i>.<ext>``, ``counts[split]``
    images per class, each ``size`` (height, width)."""
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for c in classes:
            d = root / split / str(c)
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i:04d}.{ext}")
    return root


@pytest.fixture(scope="session")
def digits5_trained():
    """(split, init, model): digits5 and a width-0.5 small CNN trained on it for 6 epochs from
    ``init``; shared by the unlearning tests, which must leave ``model`` untouched."""
    import copy

    from ppu_fast.data import make_split
    from ppu_fast.models import build_model
    from ppu_fast.training import TrainConfig, fit

    torch.set_num_threads(1)
    split = make_split("digits5", seed=0)
    torch.manual_seed(0)
    init = build_model("smallcnn", 5, 1, width=0.5)
    model = fit(copy.deepcopy(init), split.train, TrainConfig(epochs=6, lr=0.05, batch_size=32),
                progress=False)
    return split, init, model
