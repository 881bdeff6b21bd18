"""Small ViTs whose attention is written the ways timm, torchvision and user code write it (for the head tests).

* :class:`TimmAttention` - timm 1.0's ``Attention``: stored ``num_heads``, ``head_dim``, ``attn_dim``,
  ``self.scale``, ``F.scaled_dot_product_attention`` (``fused=True``) or the explicit softmax path.
* :class:`InputWidthAttention` - older timm / TinyViT / many user codebases: the head width from the *input*
  (``C // self.num_heads``) and the output reshaped to the input width.
* :class:`MHABlock` - ``nn.MultiheadAttention`` (packed ``in_proj_weight``, ``out_proj``), as torchvision's ViT.
* :class:`NamedAttention` - a user class with its own attribute names (``n_head``, ``to_qkv``, ``to_out``),
  planned through ``csgd_ext.register_attention``.
* :class:`HeadMajorAttention` - q/k/v rows laid out ``(head, 3, dim)``: the default rule's layout is wrong for it,
  and the numeric check must refuse its heads.

``vit(kind)`` builds a 2-block ViT over 28x28 one-channel images with one of them.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads, fused=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=True)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


class InputWidthAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class NamedAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.n_head = num_heads
        self.to_qkv, self.to_out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(B, N, 3, self.n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))


class HeadMajorAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, self.num_heads, 3, -1).permute(3, 0, 2, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    """A pre-norm block; ``kind`` names one of :data:`ATTENTION` (or ``"mha"``) or is a factory ``(dim, heads)``."""

    def __init__(self, dim, heads, kind):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mha = kind == "mha"
        make = ATTENTION[kind] if isinstance(kind, str) and not self.mha else kind
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True) if self.mha else make(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        y = self.norm1(x)
        x = x + (self.attn(y, y, y, need_weights=False)[0] if self.mha else self.attn(y))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


ATTENTION = {"timm": TimmAttention, "timm_unfused": lambda d, h: TimmAttention(d, h, fused=False),
             "input_width": InputWidthAttention, "named": NamedAttention, "head_major": HeadMajorAttention}


class ViT(nn.Module):
    def __init__(self, kind="timm", dim=32, heads=4, depth=2, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, 7)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, kind) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


KINDS = ("timm", "timm_unfused", "input_width", "mha", "named", "head_major")


def vit(kind: str, **kw) -> ViT:
    return ViT(kind, **kw)
