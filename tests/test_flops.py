"""FLOPs/parameter counter: hand-computed MACs on small layers, published MACs of the paper's networks."""

import json

import pytest
import torch
from torch import nn

from csgd_ext import models
from csgd_ext.measure.flops import FlopsReport, count_flops_params, module_macs


pytestmark = pytest.mark.usefixtures("one_thread")


def meta_report(name, **kwargs):
    with torch.device("meta"):
        model = models.get_model(name, **kwargs)
    return count_flops_params(model, torch.empty(1, *models.default_input_shape(name), device="meta"))


def test_conv_hand_computed():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)             # 9x9 -> 5x5
    r = count_flops_params(conv, torch.randn(1, 3, 9, 9))
    assert r.macs == 8 * 5 * 5 * (3 * 3 * 3) == 5400
    assert r.flops == 2 * 5400
    assert r.params == 8 * 27 + 8
    s = r.per_module["Conv2d"]                                  # a bare module is named by its type
    assert (s.macs, s.params, s.output_shape, s.calls, s.counted) == (5400, 224, (1, 8, 5, 5), 1, True)


def test_grouped_and_depthwise_conv_hand_computed():
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_flops_params(dw, torch.randn(1, 8, 6, 6)).macs == 8 * 36 * 9
    grouped = nn.Conv2d(8, 12, (3, 1), padding=(1, 0), groups=2, bias=False)
    assert count_flops_params(grouped, torch.randn(1, 8, 6, 6)).macs == 12 * 36 * (4 * 3)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2)
    x = torch.randn(1, 4, 5, 5)
    assert count_flops_params(up, x).macs == 100 * 6 * 9        # every input element meets 6 * 9 weights


def test_linear_and_per_sample():
    fc = nn.Linear(10, 4)
    r = count_flops_params(fc, torch.randn(3, 10))
    assert (r.macs, r.params, r.batch_size) == (40, 44, 3)
    r = count_flops_params(fc, torch.randn(3, 10), per_sample=False)
    assert r.macs == 120 and not r.per_sample
    seq = count_flops_params(fc, torch.randn(2, 5, 10))          # (N, L, in): every position counts
    assert seq.macs == 5 * 40


def test_small_net_breakdown_and_norm_convention():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x = torch.randn(2, 3, 8, 8)
    conv_macs, fc_macs = 4 * 64 * 27, 64 * 5
    r = count_flops_params(net, x)
    assert r.macs == conv_macs + fc_macs
    assert r.macs_of(["0", "5"]) == r.macs
    assert r.per_module["1"].macs == 0 and not r.per_module["1"].counted and r.per_module["1"].params == 8
    assert r.per_module["2"].macs == 0 and r.per_module["3"].output_shape == (2, 4, 4, 4)
    assert r.by_type() == {"Conv2d": conv_macs, "Linear": fc_macs}
    with_bn = count_flops_params(net, x, count_norm=True)
    assert with_bn.macs == conv_macs + fc_macs + 4 * 64 and with_bn.per_module["1"].counted
    with pytest.raises(KeyError, match="'9'"):
        r.macs_of(["0", "9"])


def test_reused_module_accumulates_and_state_is_untouched():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1, bias=False)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x)))

    net = Twice().train()
    before = net.bn.running_mean.clone(), net.bn.num_batches_tracked.clone()
    r = count_flops_params(net, (torch.randn(1, 2, 3, 3),))
    assert r.per_module["conv"].calls == 2 and r.macs == 2 * (2 * 9 * 2)
    assert net.training and net.conv.training                    # modes restored
    assert torch.equal(net.bn.running_mean, before[0]) and torch.equal(net.bn.num_batches_tracked, before[1])


def test_inputs_forms_and_errors():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a, b=None):
            return self.fc(a + (0 if b is None else b))

    assert count_flops_params(Two(), [torch.randn(1, 3), torch.randn(1, 3)]).macs == 6
    assert count_flops_params(Two(), {"a": torch.randn(4, 3)}).macs == 6
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        count_flops_params(lambda x: x, torch.randn(1))
    with pytest.raises(TypeError, match="example_inputs"):
        count_flops_params(Two(), 3)


def test_module_macs_none_for_uncounted():
    relu = nn.ReLU()
    x = torch.randn(1, 3)
    assert module_macs(relu, (x,), relu(x)) is None


def test_report_table_compare_json():
    net, slim = models.resnet20(width=0.5), models.resnet20(width=0.25)
    x = torch.randn(1, 3, 32, 32)
    a, b = count_flops_params(net, x), count_flops_params(slim, x)
    table = a.format_table()
    assert "stage3.2.conv2" in table and f"{a.macs:,}" in table and "FLOPs = 2 x MACs" in table
    assert len(a.format_table(max_rows=3).splitlines()) == 3 + 5      # header, rule, 3 rows, rule, total, line
    cmp = a.compare(b)
    assert "stage1.0.conv1" in cmp and "25.0" in cmp                  # half the width -> a quarter of MACs
    d = json.loads(json.dumps(a.to_dict()))
    assert d["macs"] == a.macs and d["flops"] == 2 * a.macs
    assert d["per_module"]["fc"]["macs"] == 32 * 10                   # 64 * 0.5 features -> 10 classes
    assert isinstance(a, FlopsReport)


def cifar_resnet_macs(n, classes=10):
    """Analytic conv + linear MACs of the C-SGD CIFAR ResNet (projection shortcuts) at 32x32."""
    total = 32 * 32 * 16 * 27
    cin, hw = 16, 32 * 32
    for c, stride in ((16, 1), (32, 2), (64, 2)):
        for b in range(n):
            if b == 0 and stride == 2:
                hw //= 4
                total += hw * c * cin                       # 1x1 projection shortcut
            total += hw * c * cin * 9 + hw * c * c * 9
            cin = c
    return total + 64 * classes


def densenet40_macs(classes=10):
    total, c, hw = 32 * 32 * 16 * 27, 16, 32 * 32
    for block in range(3):
        for _ in range(12):
            total += hw * 12 * c * 9
            c += 12
        if block < 2:
            total += hw * c * c                              # 1x1 transition conv before pooling
            hw //= 4
    return total + c * classes


def test_cifar_nets_match_analytic_macs():
    assert meta_report("resnet20").macs == cifar_resnet_macs(3)
    assert meta_report("resnet110").macs == cifar_resnet_macs(18)
    assert meta_report("densenet40").macs == densenet40_macs()
    vgg = meta_report("vgg16", pool_size=1).macs
    cfg, cin, hw, ref = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512], 3, 1024, 0
    for v in cfg:
        if v == "M":
            hw //= 4
        else:
            ref, cin = ref + hw * v * cin * 9, v
    assert vgg == ref + 512 * 512 + 512 * 10


def test_published_macs():
    # ResNet-56 on CIFAR: ~125 M MACs published (125.49 M with identity shortcuts; the two projection
    # shortcuts of the official C-SGD code add 2 x 131,072)
    r56 = meta_report("resnet56").macs
    assert r56 == cifar_resnet_macs(9) == 125_485_696 + 2 * 131_072
    assert abs(r56 - 125e6) / 125e6 < 0.01
    # ResNet-50 at 224: ~4.1 G MACs (torchvision lists 4.09 "GFLOPS", i.e. MACs)
    r50 = meta_report("resnet50")
    assert r50.macs == 4_089_184_256 and abs(r50.macs - 4.1e9) / 4.1e9 < 0.01
    assert r50.params == 25_557_032
    assert r50.per_module["layer1.0.conv2"].macs == 56 * 56 * 64 * 64 * 9
    # MobileNetV2 at 224: ~300 M MACs (paper: 300 M multiply-adds; torchvision 0.30 "GFLOPS")
    mb2 = meta_report("mobilenetv2").macs
    assert abs(mb2 - 300e6) / 300e6 < 0.01


def test_meta_matches_real_tensors():
    net = models.resnet20(width=0.5)
    real = count_flops_params(net, torch.randn(1, 3, 32, 32))
    with torch.device("meta"):
        shadow = models.resnet20(width=0.5)
    meta = count_flops_params(shadow, torch.empty(1, 3, 32, 32, device="meta"))
    assert real.macs == meta.macs and real.params == meta.params
    assert {k: v.macs for k, v in real.per_module.items()} == {k: v.macs for k, v in meta.per_module.items()}


def test_batch_independent_per_sample():
    net = models.densenet40(width=0.25)
    one = count_flops_params(net, torch.randn(1, 3, 16, 16))
    four = count_flops_params(net, torch.randn(4, 3, 16, 16))
    assert one.macs == four.macs and four.batch_size == 4
