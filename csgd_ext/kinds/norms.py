"""Multiplicity-weighted LayerNorm / RMSNorm: the exact replacement for a norm over merged channels.

When C-SGD merges a cluster of identical channels into one kept channel, a LayerNorm (or RMSNorm) that
normalizes over those channels would see fewer channels and compute different statistics. The exact fix is
to let each kept channel ``k`` count with its cluster size ``n_k`` (``sum(n) = C``, the original width)::

    mean = sum_k n_k x_k / sum(n)
    var  = sum_k n_k (x_k - mean)^2 / sum(n)
    y_k  = (x_k - mean) / sqrt(var + eps) * weight_k + bias_k            # WeightedLayerNorm
    y_k  = x_k / sqrt(sum_k n_k x_k^2 / sum(n) + eps) * weight_k         # WeightedRMSNorm

On an input whose channels are identical within each cluster, the weighted norm of the kept channels equals
the plain norm of the full input restricted to the kept channels (up to float rounding); with all counts 1 it
is the plain norm.

Example::

    import torch
    from torch import nn
    from csgd_ext.kinds.norms import WeightedLayerNorm

    ln = nn.LayerNorm(6)                                 # normalizes 6 channels ...
    keep = torch.tensor([0, 2, 5])                       # ... merged into clusters {0,1}, {2,3,4}, {5}
    wln = WeightedLayerNorm.from_norm(ln, counts=[2, 3, 1], keep_index=keep)
    x = torch.randn(8, 6)[:, [0, 0, 2, 2, 2, 5]]         # channels identical within each cluster
    torch.testing.assert_close(wln(x[:, keep]), ln(x)[:, keep])

    # channels-first (N, C, H, W), e.g. ConvNeXt / torchvision LayerNorm2d:
    wln2d = WeightedLayerNorm([2, 3, 1], eps=1e-6, channel_dim=1)

The forward is plain tensor ops (no data-dependent Python control flow, no ``.item()``), so the modules work
with ``torch.fx.symbolic_trace``, ``torch.jit.trace`` and ``torch.export.export``. Statistics are computed in
at least float32 (half / bfloat16 inputs are upcast, the result is cast back to the input dtype), like
``F.layer_norm``. ``counts`` is a persistent float32 buffer of shape ``(width,)``, so a state dict reloads into
a module built with placeholder counts of the same width (``torch.load(..., weights_only=True)`` suffices).
Counts are integers: keep the module's buffers in float32 or float64 (``.bfloat16()`` on the module would
round counts above 256, ``.half()`` those above 2048).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["check_counts", "WeightedLayerNorm", "WeightedRMSNorm", "WeightedGroupNorm", "WeightedNormAct"]

_MAX_EXACT = 2 ** 24  # float32 represents every integer up to here, so counts and their sum stay exact


def check_counts(counts) -> torch.Tensor:
    """Validate cluster multiplicities and return them as a 1-D float32 tensor (on the input's device).

    ``counts`` is a 1-D sequence, array or tensor of positive integers (integer-valued floats are accepted).
    Raises ``TypeError`` for non-numeric or boolean values and ``ValueError`` for an empty or non-1-D input,
    non-finite, non-integer or non-positive entries, or a total too large to be exact in float32::

        >>> check_counts([2, 3, 1])
        tensor([2., 3., 1.])
    """
    if isinstance(counts, (str, bytes)):
        raise TypeError(f"counts must be a 1-D sequence or tensor of positive integers, got {type(counts).__name__}")
    if not isinstance(counts, torch.Tensor):
        try:
            counts = torch.as_tensor(counts)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"counts must be a 1-D sequence or tensor of positive integers, "
                            f"got {type(counts).__name__}: {exc}") from None
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"counts must hold integers, got dtype {counts.dtype}")
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D (one multiplicity per kept channel), got shape {tuple(counts.shape)}")
    if counts.numel() == 0:
        raise ValueError("counts is empty: a weighted norm needs at least one channel")
    c = counts.detach().to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"counts must be finite, got {counts.tolist()}")
    if not bool((c == c.round()).all()):
        bad = c[c != c.round()][:5].tolist()
        raise ValueError(f"counts must be integers (cluster sizes), got non-integer values {bad}")
    if not bool((c > 0).all()):
        bad = c[c <= 0][:5].tolist()
        raise ValueError(f"counts must be positive (every kept channel stands for >= 1 channel), got {bad}")
    if float(c.sum()) > _MAX_EXACT:
        raise ValueError(f"sum(counts) = {int(c.sum())} exceeds {_MAX_EXACT}, which float32 cannot represent exactly")
    return c.to(torch.float32)


def _check_channel_dim(channel_dim) -> int:
    integral = isinstance(channel_dim, numbers.Integral) and not isinstance(channel_dim, bool)
    if not integral or int(channel_dim) not in (-1, 1):
        raise ValueError(f"channel_dim must be -1 (channels last, like nn.LayerNorm) or 1 (channels first, "
                         f"(N, C, *) inputs like LayerNorm2d), got {channel_dim!r}")
    return int(channel_dim)


def _check_eps(eps, allow_none: bool):
    if eps is None and allow_none:
        return None
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0 or eps != eps:
        raise ValueError(f"eps must be a non-negative float{' or None' if allow_none else ''}, got {eps!r}")
    return float(eps)


def _norm_width(norm: nn.Module, expected: type) -> int:
    if not isinstance(norm, expected):
        raise TypeError(f"from_norm expects an {expected.__module__}.{expected.__qualname__} (or a subclass), "
                        f"got {type(norm).__name__}")
    shape = tuple(norm.normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"{type(norm).__name__} normalizes over {len(shape)} dims (normalized_shape={shape}); "
                         f"a weighted norm supports only a single channel dim")
    return int(shape[0])


def _check_keep(keep_index, counts: torch.Tensor, width: int) -> torch.Tensor:
    keep = keep_index if isinstance(keep_index, torch.Tensor) else torch.as_tensor(keep_index)
    if keep.dtype == torch.bool or keep.is_floating_point() or keep.is_complex():
        raise TypeError(f"keep_index must be integer channel indices (a LongTensor), got dtype {keep.dtype}")
    if keep.dim() != 1:
        raise ValueError(f"keep_index must be 1-D, got shape {tuple(keep.shape)}")
    keep = keep.long()
    if keep.numel() != counts.numel():
        raise ValueError(f"len(counts) = {counts.numel()} != len(keep_index) = {keep.numel()}: "
                         f"give one count per kept channel")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= width):
        raise ValueError(f"keep_index must lie in [0, {width}), got min {int(keep.min())}, max {int(keep.max())}")
    if torch.unique(keep).numel() != keep.numel():
        raise ValueError("keep_index has duplicate channels: each cluster keeps exactly one distinct channel")
    if int(counts.sum()) != width:
        raise ValueError(f"sum(counts) = {int(counts.sum())} != the norm's width {width}: counts must be the "
                         f"cluster sizes of all {width} original channels")
    return keep


def _rows(param, keep: torch.Tensor):
    return param.detach()[keep.to(param.device)].clone()


class _WeightedNormBase(nn.Module):
    def __init__(self, counts, eps, channel_dim: int, device, dtype):
        super().__init__()
        n = check_counts(counts)
        self.width = int(n.numel())
        self.eps = eps
        self.channel_dim = _check_channel_dim(channel_dim)
        self.register_buffer("counts", n.to(device=device if device is not None else n.device), persistent=True)

    def _to_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(1, -1) if self.channel_dim == 1 else x

    def _from_last(self, y: torch.Tensor) -> torch.Tensor:
        return y.movedim(-1, 1) if self.channel_dim == 1 else y

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}, channel_dim={self.channel_dim}"


class WeightedLayerNorm(_WeightedNormBase):
    """LayerNorm over one channel dim in which kept channel ``k`` counts ``counts[k]`` times.

    ``channel_dim=-1`` normalizes the last dim (like ``nn.LayerNorm(width)``); ``channel_dim=1`` normalizes
    dim 1 of an ``(N, C, *)`` input (channels-first, like ConvNeXt's ``LayerNorm2d``). ``weight`` (ones) and
    ``bias`` (zeros, when ``bias=True``) have shape ``(width,)`` when ``elementwise_affine``::

        wln = WeightedLayerNorm([2, 3, 1])                              # width 3, stands for 6 channels
        y = wln(torch.randn(4, 10, 3))
        wln = WeightedLayerNorm.from_norm(nn.LayerNorm(6), [2, 3, 1], torch.tensor([0, 2, 5]))
    """

    def __init__(self, counts, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 channel_dim: int = -1, device=None, dtype=None):
        super().__init__(counts, _check_eps(eps, allow_none=False), channel_dim, device, dtype)
        self.elementwise_affine = bool(elementwise_affine)
        factory = {"device": device, "dtype": dtype}
        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.width, **factory))
            self.bias = nn.Parameter(torch.zeros(self.width, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_norm(cls, norm_module: nn.LayerNorm, counts, keep_index, channel_dim: int = -1) -> "WeightedLayerNorm":
        """Build from an ``nn.LayerNorm`` (or subclass, e.g. a channels-first ``LayerNorm2d`` with
        ``channel_dim=1``) whose channels were merged: ``keep_index[k]`` is the kept channel of cluster ``k``
        and ``counts[k]`` its size (``sum(counts)`` must equal the norm's width). Copies eps, affine-ness, the
        kept rows of weight/bias, device and dtype::

            wln = WeightedLayerNorm.from_norm(model.norm, counts=[2, 1, 3], keep_index=torch.tensor([0, 2, 3]))
        """
        width = _norm_width(norm_module, nn.LayerNorm)
        n = check_counts(counts)
        keep = _check_keep(keep_index, n, width)
        w, b = norm_module.weight, getattr(norm_module, "bias", None)
        ref = w if w is not None else (b if b is not None else None)
        out = cls(n, eps=norm_module.eps, elementwise_affine=norm_module.elementwise_affine, bias=b is not None,
                  channel_dim=channel_dim, device=ref.device if ref is not None else None,
                  dtype=ref.dtype if ref is not None else None)
        with torch.no_grad():
            if out.weight is not None and w is not None:
                out.weight.copy_(_rows(w, keep))
            if out.bias is not None and b is not None:
                out.bias.copy_(_rows(b, keep))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xl = self._to_last(x)
        n = self.counts.float()                       # float32 (x float64 -> float64) via type promotion
        total = n.sum()
        mean = (xl * n).sum(-1, keepdim=True) / total  # promoted: half/bf16 -> float32
        d = xl - mean
        var = (d * d * n).sum(-1, keepdim=True) / total
        y = d * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return self._from_last(y.type_as(x))


class WeightedRMSNorm(_WeightedNormBase):
    """RMSNorm over one channel dim in which kept channel ``k`` counts ``counts[k]`` times (weight, no bias).

    ``eps=None`` matches ``nn.RMSNorm``: the machine epsilon of the compute dtype (float32 for
    half/bfloat16/float32 inputs, float64 for float64)::

        wrms = WeightedRMSNorm([2, 3, 1])
        wrms = WeightedRMSNorm.from_norm(nn.RMSNorm(6), [2, 3, 1], torch.tensor([0, 2, 5]))
    """

    def __init__(self, counts, eps: float | None = None, elementwise_affine: bool = True, channel_dim: int = -1,
                 device=None, dtype=None):
        super().__init__(counts, _check_eps(eps, allow_none=True), channel_dim, device, dtype)
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.width, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    @classmethod
    def from_norm(cls, norm_module: nn.RMSNorm, counts, keep_index, channel_dim: int = -1) -> "WeightedRMSNorm":
        """Build from an ``nn.RMSNorm`` (or subclass) whose channels were merged; see
        :meth:`WeightedLayerNorm.from_norm`::

            wrms = WeightedRMSNorm.from_norm(block.norm, counts=[2, 1, 3], keep_index=torch.tensor([0, 2, 3]))
        """
        width = _norm_width(norm_module, nn.RMSNorm)
        n = check_counts(counts)
        keep = _check_keep(keep_index, n, width)
        w = norm_module.weight
        out = cls(n, eps=norm_module.eps, elementwise_affine=norm_module.elementwise_affine, channel_dim=channel_dim,
                  device=w.device if w is not None else None, dtype=w.dtype if w is not None else None)
        if out.weight is not None and w is not None:
            with torch.no_grad():
                out.weight.copy_(_rows(w, keep))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xl = self._to_last(x)
        n = self.counts.float()
        ms = (xl * n * xl).sum(-1, keepdim=True) / n.sum()  # xl * n first: half/bf16 -> float32
        if self.eps is None:
            one = ms.new_ones(())
            eps = torch.nextafter(one, one + one) - one    # finfo(compute dtype).eps, as tensor ops
            y = xl * torch.rsqrt(ms + eps)
        else:
            y = xl * torch.rsqrt(ms + self.eps)
        if self.weight is not None:
            y = y * self.weight
        return self._from_last(y.type_as(x))


class WeightedGroupNorm(nn.Module):
    """GroupNorm over ``num_groups`` channel groups in which kept channel ``k`` counts ``counts[k]`` times.

    The merged form of an ``nn.GroupNorm`` whose channels were clustered inside its groups, each group keeping
    the same number of channels: the statistics of group ``g`` are those of the full group,
    ``mean_g = sum_{k in g} n_k sum_s x_ks / (S sum_{k in g} n_k)`` (and the variance likewise), ``S`` the
    spatial size. Input ``(N, C, *)``::

        wgn = WeightedGroupNorm([2, 1, 1, 2], num_groups=2)          # 4 kept channels standing for 6
        wgn = WeightedGroupNorm.from_norm(nn.GroupNorm(2, 6), [2, 1, 1, 2], torch.tensor([0, 2, 3, 5]))
    """

    def __init__(self, counts, num_groups: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__()
        n = check_counts(counts)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 \
                or n.numel() % num_groups:
            raise ValueError(f"num_groups must be a positive int dividing the width {n.numel()}, got {num_groups!r}")
        self.width, self.num_groups = int(n.numel()), num_groups
        self.eps = _check_eps(eps, allow_none=False)
        self.affine = bool(affine)
        self.register_buffer("counts", n.to(device=device if device is not None else n.device), persistent=True)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(self.width, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(self.width, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_norm(cls, norm_module: nn.GroupNorm, counts, keep_index) -> "WeightedGroupNorm":
        """Build from an ``nn.GroupNorm`` whose channels were merged inside its groups: ``keep_index[k]`` is the
        kept channel of cluster ``k`` and ``counts[k]`` its size; every group keeps as many channels::

            wgn = WeightedGroupNorm.from_norm(block.norm, counts=[2, 1, 1, 2], keep_index=torch.tensor([0, 2, 3, 5]))
        """
        if not isinstance(norm_module, nn.GroupNorm):
            raise TypeError(f"from_norm expects an nn.GroupNorm (or a subclass), got {type(norm_module).__name__}")
        n = check_counts(counts)
        keep = _check_keep(keep_index, n, norm_module.num_channels)
        per = norm_module.num_channels // norm_module.num_groups
        kept_per_group = torch.bincount(keep // per, minlength=norm_module.num_groups)
        if len(set(kept_per_group.tolist())) != 1:
            raise ValueError(f"every group must keep the same number of channels, got {kept_per_group.tolist()}")
        w = norm_module.weight
        out = cls(n, norm_module.num_groups, eps=norm_module.eps, affine=norm_module.affine,
                  device=w.device if w is not None else None, dtype=w.dtype if w is not None else None)
        if out.weight is not None:
            with torch.no_grad():
                out.weight.copy_(_rows(w, keep))
                out.bias.copy_(_rows(norm_module.bias, keep))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.num_groups
        xg = x.reshape(x.shape[0], g, self.width // g, -1)  # (N, groups, channels per group, spatial)
        n = self.counts.float().reshape(g, -1, 1)
        total = n.sum(1, keepdim=True) * xg.shape[-1]
        mean = (xg * n).sum((2, 3), keepdim=True) / total
        d = xg - mean
        var = (d * d * n).sum((2, 3), keepdim=True) / total
        y = d * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.reshape(g, -1, 1) + self.bias.reshape(g, -1, 1)
        return y.reshape_as(x).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.width}, eps={self.eps}"


class WeightedNormAct(nn.Module):
    """A weighted norm followed by the elementwise modules its original ran after the norm (a drop and an
    activation): the merged form of a norm-act layer such as timm's ``GroupNormAct`` / ``LayerNormAct2d``, whose
    forward is ``act(drop(norm(x)))``. ``norm`` is the weighted norm (so ``norm.counts`` is where the cluster
    sizes are), ``post`` the modules in order::

        WeightedNormAct(WeightedGroupNorm([2, 1, 1, 2], num_groups=2), [nn.Identity(), nn.ReLU()])
    """

    def __init__(self, norm: nn.Module, post):
        super().__init__()
        self.norm = norm
        self.post = nn.Sequential(*post)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.norm(x))
