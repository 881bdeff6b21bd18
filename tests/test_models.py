"""Model zoo: parameter counts, forward/backward, width multiplier, torch-pruning tracing, errors."""

import pytest
import torch
from torch import nn

from csgd_ext import models
from csgd_ext.models import scale_channels



pytestmark = pytest.mark.usefixtures("one_thread")


NAMES = ["resnet20", "resnet56", "resnet110", "vgg16", "densenet40", "resnet50", "mobilenetv2"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def small_shape(name):
    """Default input shape, with ImageNet nets reduced to 64x64 to keep CPU tests fast."""
    c, h, w = models.default_input_shape(name)
    return (c, min(h, 64), min(w, 64))


# --- independent, analytic parameter counts -------------------------------------------------------------

def cifar_resnet_params(n, classes=10, widths=(16, 32, 64)):
    total = 3 * 9 * widths[0] + 2 * widths[0]  # stem conv + BN
    cin = widths[0]
    for c in widths:
        for b in range(n):
            total += 9 * cin * c + 2 * c + 9 * c * c + 2 * c
            if cin != c:
                total += cin * c + 2 * c  # projection shortcut: 1x1 conv + BN
            cin = c
    return total + widths[-1] * classes + classes


def vgg16_params(pool, classes=10):
    total, cin = 0, 3
    for c in [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]:
        total += 9 * cin * c + 2 * c
        cin = c
    return total + (512 * pool * pool * 512 + 512) + (512 * classes + classes)


def densenet40_params(classes=10):
    c = 16
    total = 3 * 9 * 16
    for block in range(3):
        for _ in range(12):
            total += 2 * c + 9 * c * 12
            c += 12
        if block < 2:
            total += 2 * c + c * c
    return total + 2 * c + c * classes + classes


def test_registry():
    assert models.available_models() == sorted(NAMES)
    assert set(models.MODELS) == set(NAMES)
    for name in NAMES:
        shape = models.default_input_shape(name)
        assert shape == ((3, 224, 224) if name in ("resnet50", "mobilenetv2") else (3, 32, 32))
    assert isinstance(models.get_model("ResNet-20"), models.CifarResNet)
    with pytest.raises(ValueError, match="unknown model 'resnet18'.*resnet20"):
        models.get_model("resnet18")
    with pytest.raises(ValueError, match="unknown model"):
        models.default_input_shape("alexnet")
    with pytest.raises(TypeError, match="model name"):
        models.get_model(56)


@pytest.mark.parametrize("name,kwargs,expected", [
    ("resnet20", {}, cifar_resnet_params(3)),
    ("resnet56", {}, cifar_resnet_params(9)),
    ("resnet110", {}, cifar_resnet_params(18)),
    ("resnet56", {"num_classes": 100}, cifar_resnet_params(9, classes=100)),
    ("vgg16", {"pool_size": 1}, vgg16_params(1)),
    ("vgg16", {}, vgg16_params(2)),
    ("densenet40", {}, densenet40_params()),
    ("resnet50", {}, 25_557_032),      # torchvision resnet50
    ("mobilenetv2", {}, 3_504_872),    # torchvision mobilenet_v2
])
def test_param_counts_width1(name, kwargs, expected):
    with torch.device("meta"):
        model = models.get_model(name, **kwargs)
    assert n_params(model) == expected


def test_param_counts_match_published_figures():
    published = {"resnet56": 0.85e6, "resnet110": 1.7e6, "densenet40": 1.0e6, "vgg16": 15.0e6,
                 "resnet50": 25.557e6, "mobilenetv2": 3.50e6}
    for name, figure in published.items():
        with torch.device("meta"):
            count = n_params(models.get_model(name, **({"pool_size": 1} if name == "vgg16" else {})))
        assert abs(count - figure) / figure < 0.03, (name, count, figure)
    # the CIFAR ResNets are the identity-shortcut counts (853,018 / 1,730,714 - 2,752) plus 2 projections
    assert cifar_resnet_params(9) - 853_018 == cifar_resnet_params(18) - 1_727_962 == 16 * 32 + 64 + 32 * 64 + 128


def test_torchvision_compatible_shapes():
    with torch.device("meta"):
        r50, mb2 = models.resnet50(), models.mobilenetv2()
    sd = {k: tuple(v.shape) for k, v in r50.state_dict().items()}
    assert sd["conv1.weight"] == (64, 3, 7, 7)
    assert sd["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"] == (128, 128, 3, 3) and r50.layer2[0].conv2.stride == (2, 2)
    assert sd["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert sd["fc.weight"] == (1000, 2048)
    assert len([k for k in sd if k.endswith("num_batches_tracked")]) == 53
    sd = {k: tuple(v.shape) for k, v in mb2.state_dict().items()}
    assert sd["features.0.0.weight"] == (32, 3, 3, 3)
    assert sd["features.1.conv.0.0.weight"] == (32, 1, 3, 3)      # t=1: depthwise first
    assert sd["features.1.conv.1.weight"] == (16, 32, 1, 1)
    assert sd["features.2.conv.0.0.weight"] == (96, 16, 1, 1)     # t=6: expand
    assert sd["features.17.conv.2.weight"] == (320, 960, 1, 1)
    assert sd["features.18.0.weight"] == (1280, 320, 1, 1)
    assert sd["classifier.1.weight"] == (1000, 1280)
    assert len(sd) == 314


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_default_shape(name):
    torch.manual_seed(0)
    cifar = name not in ("resnet50", "mobilenetv2")
    model = models.get_model(name, num_classes=7, width=0.5 if cifar else 0.25)  # narrow: fast on CPU
    x = torch.randn(2, *small_shape(name))
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:3]}"
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 7)


@pytest.mark.parametrize("name", NAMES)
def test_mnist_single_channel(name):
    model = models.get_model(name, in_channels=1, width=0.25).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10 if name not in ("resnet50", "mobilenetv2") else 1000)


def conv_widths(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16", "densenet40", "resnet50"])
def test_width_scales_every_channel(name):
    with torch.device("meta"):
        base, half, double = (conv_widths(models.get_model(name, width=w)) for w in (1.0, 0.5, 2.0))
        tiny = models.get_model(name, width=0.01)
    assert base.keys() == half.keys() == double.keys()
    assert all(half[k] * 2 == base[k] for k in base), name
    assert all(double[k] == 2 * base[k] for k in base), name
    assert all(c >= 1 for c in conv_widths(tiny).values())
    hidden = [m for m in tiny.modules() if isinstance(m, nn.Linear)]
    assert hidden[-1].out_features == 10 if name != "resnet50" else 1000  # num_classes is never scaled


def test_width_tiny_still_runs():
    for name in ("resnet20", "densenet40", "vgg16"):
        model = models.get_model(name, width=0.01).eval()
        assert min(conv_widths(model).values()) == 1
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mobilenetv2_width_divisible_by_8():
    with torch.device("meta"):
        base, slim = models.mobilenetv2(), models.mobilenetv2(width=0.5)
    b, s = conv_widths(base), conv_widths(slim)
    assert all(c % 8 == 0 for c in s.values())
    assert all(s[k] < b[k] for k in b)                      # every channel count shrinks, the last conv too
    assert s["features.18.0"] == scale_channels(1280, 0.5, 8) == 640
    assert slim.features[0][0].out_channels == 16


def test_vgg16_flatten_head_couples_hw_features():
    model = models.vgg16(width=0.25)
    last = [m for m in model.features if isinstance(m, nn.Conv2d)][-1]
    assert model.classifier[0].in_features == last.out_channels * 4      # 2x2 map flattened
    assert models.vgg16(pool_size=1, width=0.25).classifier[0].in_features == last.out_channels


def test_bad_arguments_name_the_model():
    with pytest.raises(ValueError, match="resnet56: width"):
        models.resnet56(width=0)
    with pytest.raises(ValueError, match="mobilenetv2: width"):
        models.mobilenetv2(width=float("nan"))
    with pytest.raises(TypeError, match="densenet40: width"):
        models.densenet40(width="1")
    with pytest.raises(ValueError, match="vgg16: num_classes"):
        models.vgg16(num_classes=0)
    with pytest.raises(TypeError, match="resnet50: in_channels"):
        models.resnet50(in_channels=3.0)
    with pytest.raises(ValueError, match="vgg16: pool_size"):
        models.vgg16(pool_size=0)


def module_names(model, group):
    names = {m: n for n, m in model.named_modules()}
    return {(names.get(dep.target.module), "out" if "out" in str(dep.handler) else "in") for dep, _ in group}


@pytest.mark.parametrize("name", NAMES)
def test_traces_with_torch_pruning(name):
    tp = pytest.importorskip("torch_pruning", reason="torch-pruning is not installed (as on a lent GPU machine)")
    model = models.get_model(name, width=0.25).eval()
    x = torch.randn(1, *small_shape(name))
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    groups = list(dg.get_all_groups())
    assert len(groups) > 3
    if name.startswith("resnet") and name != "resnet50":
        # the stem and every stage-1 block's conv2 are one coupled group (identity shortcuts)
        got = module_names(model, dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0]))
        blocks = len(model.stage1)
        assert {(f"stage1.{i}.conv2", "out") for i in range(blocks)} <= got
        assert ("stage2.0.shortcut.0", "in") in got and ("stage2.0.conv1", "in") in got
    elif name == "resnet50":
        got = module_names(model, dg.get_pruning_group(model.layer1[0].conv3, tp.prune_conv_out_channels,
                                                       idxs=[0]))
        assert {("layer1.0.downsample.0", "out"), ("layer1.1.conv3", "out"), ("layer1.2.conv3", "out"),
                ("layer2.0.conv1", "in"), ("layer2.0.downsample.0", "in")} <= got
    elif name == "densenet40":
        # the stem's channels are read by every layer of block 1 and by transition 1
        got = module_names(model, dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0]))
        assert {(f"block1.{i}.conv", "in") for i in range(12)} | {("trans1.conv", "in")} <= got
    elif name == "vgg16":
        last = [n for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)][-1]
        got = module_names(model, dg.get_pruning_group(model.features[int(last)], tp.prune_conv_out_channels,
                                                       idxs=[0]))
        assert ("classifier.0", "in") in got
        group = dg.get_pruning_group(model.features[int(last)], tp.prune_conv_out_channels, idxs=[0])
        fc_idxs = [idxs for dep, idxs in group if dep.target.module is model.classifier[0]][0]
        assert len(fc_idxs) == 4  # one channel -> its 2x2 flattened features
    elif name == "mobilenetv2":
        block = model.features[2].conv
        got = module_names(model, dg.get_pruning_group(block[0][0], tp.prune_conv_out_channels, idxs=[0]))
        assert {("features.2.conv.1.0", "out"), ("features.2.conv.2", "in")} <= got
