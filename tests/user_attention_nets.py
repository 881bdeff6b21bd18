"""Attention as user code writes it, with nothing registered (issue 31): the head count in an attribute of any
name, separate q/k/v projections, a q plus a fused kv, an output projection in a sibling module, and a token
model with a split of the fused projection by the input width.

* :class:`HAttention` - fused ``qkv``, the head count in ``self.h``, the head width ``d // self.h`` from the input.
* :class:`SepAttention` - CLIP / Hugging Face style ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``;
  ``num_heads`` and ``head_dim`` stored.
* :class:`QKVAttention` - PVT style ``q`` plus a fused ``kv`` (``reshape(B, N, 2, heads, head_dim)``).
* :class:`SelfAttention` + :class:`SelfOutput` - Hugging Face ``ViTSelfAttention`` / ``ViTSelfOutput``:
  ``query``, ``key``, ``value`` and ``num_attention_heads``, the output ``dense`` in a sibling module.
* :class:`GPT` - nanoGPT: an ``nn.Embedding`` of tokens and one of positions produce the residual stream,
  ``c_attn(x).split(C, dim=2)``, ``n_head``, ``B, T, C = x.size()``, causal attention, ``c_proj``.

``vit(kind)`` builds a 2-block ViT over 28x28 one-channel images with one of the image attentions; ``gpt()`` a
2-block GPT over 64 tokens.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import attention_nets


class HAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, N, d = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.h)
        return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, N, d))


class SepAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = d, heads, d // heads
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.size()
        q = self.q_proj(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        w = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)
        return self.out_proj((w @ v).transpose(1, 2).reshape(B, N, C))


class QKVAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.num_heads = heads
        self.scale = (d // heads) ** -0.5
        self.q, self.kv, self.proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class SelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, d // heads
        self.all_head_size = d
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        B = x.shape[0]
        shape = (B, -1, self.num_attention_heads, self.attention_head_size)
        q, k, v = (f(x).view(*shape).transpose(1, 2) for f in (self.query, self.key, self.value))
        ctx = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (self.all_head_size,))


class SelfOutput(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense, self.dropout = nn.Linear(d, d), nn.Dropout(0.0)

    def forward(self, h):
        return self.dropout(self.dense(h))


class HFAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attention, self.output = SelfAttention(d, heads), SelfOutput(d)

    def forward(self, x):
        return self.output(self.attention(x))


ATTENTION = {"h": HAttention, "sep": SepAttention, "q_kv": QKVAttention, "hf": HFAttention}


def vit(kind: str, **kw) -> attention_nets.ViT:
    """The 2-block ViT of :mod:`attention_nets` with the attention ``kind`` of :data:`ATTENTION`."""
    return attention_nets.ViT(ATTENTION[kind], **kw)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.0), nn.Dropout(0.0)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn, self.mlp = CausalSelfAttention(n_embd, n_head, block_size), MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([GPTBlock(n_embd, n_head, block_size) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def gpt(**kw) -> GPT:
    return GPT(**kw)


TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
