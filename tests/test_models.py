"""Architectures: output shapes and parameter counts."""
import pytest
import torch
from torch import nn

from ppu_fast.models import AllCNN, ResNet18, SmallCNN, build_model, reset_parameters


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,channels,size,width", [
    ("smallcnn", 1, 8, 1.0), ("smallcnn", 3, 32, 0.5), ("allcnn", 3, 32, 0.25), ("resnet18", 3, 32, 0.125),
    ("allcnn", 1, 16, 0.25)])
@pytest.mark.parametrize("classes", [2, 7])
def test_output_shapes(name, channels, size, width, classes):
    torch.manual_seed(0)
    m = build_model(name, classes, channels, width).eval()
    out = m(torch.randn(3, channels, size, size))
    assert out.shape == (3, classes) and torch.isfinite(out).all()


def test_allcnn_parameter_count_matches_scrub_layout():
    def conv_bn(cin, cout, k):
        return cin * cout * k * k + 2 * cout  # no conv bias before BatchNorm; BN weight + bias
    expected = (conv_bn(3, 96, 3) + conv_bn(96, 96, 3) + conv_bn(96, 192, 3) + 3 * conv_bn(192, 192, 3)
                + conv_bn(192, 192, 3) + conv_bn(192, 192, 1) + 192 * 10 + 10)
    assert n_params(AllCNN(10)) == expected
    half = AllCNN(10, width=0.5)
    assert half.classifier.in_features == 96 and n_params(half) < expected / 3


def test_resnet18_matches_torchvision_with_cifar_stem():
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool = nn.Identity()
    ours = ResNet18(10)
    assert n_params(ours) == n_params(ref)
    # same tensors under the same names, so torchvision checkpoints load
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ours.eval()(x), ref.eval()(x), atol=1e-5)
    assert n_params(ResNet18(10, width=0.5)) < n_params(ours) / 3


def test_smallcnn_is_small():
    assert 5_000 < n_params(SmallCNN(10)) < 50_000


def test_reset_parameters_reinitialises_deterministically():
    a, b = SmallCNN(5), SmallCNN(5)
    reset_parameters(a, seed=4)
    reset_parameters(b, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    before = [p.clone() for p in a.parameters()]
    reset_parameters(a, seed=5)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), before))


@pytest.mark.parametrize("args,match", [(("vgg", 10), "unknown model 'vgg'"), (("allcnn", 0), "num_classes"),
                                        (("allcnn", 10, 3, 0.0), "width")])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_model(*args)


def test_reset_parameters_with_a_seed_leaves_the_callers_random_state():
    """A seed gives torch.manual_seed(seed)'s weights without reseeding the caller's stream (it
    did: the caller's next draws followed the seed); seed=None draws from that stream, as torch's
    own reset_parameters() does."""
    a, b = SmallCNN(5), SmallCNN(5)  # their constructors draw from the global stream
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    reset_parameters(a, seed=7)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(7)
    reset_parameters(b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(torch.rand(4), expected)  # seed=None consumed the global stream


def test_reset_parameters_of_a_model_on_another_device_type_reseeds_as_before():
    """torch's fork covers the CPU and CUDA: a model elsewhere (mps, xpu; meta here) gets
    torch.manual_seed(seed)'s semantics, which seed every device type (its weights drawn
    reproducibly) and leave the caller's stream reseeded."""
    meta = torch.nn.Linear(3, 3, device="meta")
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(123)
    reset_parameters(meta, seed=7)
    assert torch.equal(torch.rand(4), expected)
