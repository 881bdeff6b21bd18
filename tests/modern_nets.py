"""Small versions of the architectures users bring from timm/torchvision, a few lines each (no torchvision).

* :class:`DenseNormAct` - DenseNet-style dense block whose norms are a ``BatchNorm2d`` subclass with its own
  forward (batch norm, then activation and drop path), as timm's ``BatchNormAct2d``.
* :class:`ResNeXtNet` - ResNeXt bottlenecks (1x1, grouped 3x3, 1x1, residual).
* :class:`RegNetNet` - RegNet-Y blocks: grouped 3x3 with squeeze-excitation.
* :class:`ConvNeXtNet` - a ConvNeXt stage: LayerNorm2d stem, blocks (depthwise 7x7, permute, LayerNorm,
  Linear, GELU, Linear, layer scale), downsampling LayerNorm2d + conv, LayerNorm head.
* :class:`ViTNet` - a ViT-tiny-style encoder (patch conv, class token, position embedding, pre-norm blocks).
"""

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d in a few lines: F.batch_norm, then drop and activation, in the norm's forward."""

    def __init__(self, c, drop=0.0):
        super().__init__(c)
        self.drop = nn.Dropout(drop)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class DenseLayer(nn.Module):
    def __init__(self, c_in, growth):
        super().__init__()
        self.norm1, self.conv1 = BatchNormAct2d(c_in), nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = BatchNormAct2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv2(self.norm2(self.conv1(self.norm1(x))))], 1)


class DenseNormAct(nn.Module):
    def __init__(self, in_ch=3, classes=10, growth=8):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(in_ch, 16, 3, padding=1, bias=False), BatchNormAct2d(16)
        self.block = nn.Sequential(DenseLayer(16, growth), DenseLayer(16 + growth, growth))
        self.trans_norm, self.trans = BatchNormAct2d(16 + 2 * growth), nn.Conv2d(16 + 2 * growth, 24, 1)
        self.norm, self.fc = BatchNormAct2d(24), nn.Linear(24, classes)

    def forward(self, x):
        x = self.block(self.stem_norm(self.stem(x)))
        x = F.avg_pool2d(self.trans(self.trans_norm(x)), 2)
        return self.fc(self.norm(x).mean((2, 3)))


class Bottleneck(nn.Module):
    def __init__(self, c, width, groups):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(x + self.bn3(self.conv3(y)))


class ResNeXtNet(nn.Module):
    def __init__(self, in_ch=3, classes=10, c=32, width=32, groups=8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(in_ch, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Bottleneck(c, width, groups), Bottleneck(c, width, groups))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.blocks(F.relu(self.bn(self.stem(x)))).mean((2, 3)))


class SE(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class RegNetYBlock(nn.Module):
    def __init__(self, c_in, c_out, group_width=8, stride=2):
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.b = nn.Conv2d(c_out, c_out, 3, stride, 1, groups=c_out // group_width, bias=False)
        self.b_bn, self.se = nn.BatchNorm2d(c_out), SE(c_out, max(1, c_in // 4))
        self.c, self.c_bn = nn.Conv2d(c_out, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.proj, self.proj_bn = nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)

    def forward(self, x):
        y = F.relu(self.a_bn(self.a(x)))
        y = self.se(F.relu(self.b_bn(self.b(y))))
        return F.relu(self.proj_bn(self.proj(x)) + self.c_bn(self.c(y)))


class RegNetNet(nn.Module):
    def __init__(self, in_ch=3, classes=10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(in_ch, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.s1, self.s2 = RegNetYBlock(16, 32), RegNetYBlock(32, 48)
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        return self.fc(self.s2(self.s1(F.relu(self.bn(self.stem(x))))).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute to channels-last, layer norm, permute back."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm style (``gamma`` of shape (C,) on the channels-last tensor) or torchvision style (``layer_scale``
    of shape (C, 1, 1) after the permute back)."""

    def __init__(self, c, timm_style=True, scale=0.5):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.timm_style = timm_style
        if timm_style:
            self.gamma = nn.Parameter(torch.full((c,), scale))
        else:
            self.layer_scale = nn.Parameter(torch.full((c, 1, 1), scale))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y)))
        if self.timm_style:
            return x + (y * self.gamma).permute(0, 3, 1, 2)
        return x + self.layer_scale * y.permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    def __init__(self, in_ch=3, classes=10, dims=(16, 24)):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(in_ch, dims[0], 2, 2), LayerNorm2d(dims[0], eps=1e-6)
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[0], True), ConvNeXtBlock(dims[0], False))
        self.down_norm, self.down = LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2)
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1], True))
        self.head_norm, self.head = nn.LayerNorm(dims[1]), nn.Linear(dims[1], classes)

    def forward(self, x):
        x = self.stage1(self.stem_norm(self.stem(x)))
        x = self.stage2(self.down(self.down_norm(x)))
        return self.head(self.head_norm(x.mean((2, 3))))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # head width from qkv, not from x: the residual stream may be narrower after a merge
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, -1))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, mlp=2):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp * dim), nn.Linear(mlp * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTNet(nn.Module):
    def __init__(self, in_ch=1, classes=10, img=28, patch=7, dim=32, depth=2, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(in_ch, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


NETS = {"densenet_normact": DenseNormAct, "resnext": ResNeXtNet, "regnety": RegNetNet, "convnext": ConvNeXtNet,
        "vit": ViTNet}
