"""The native backend: the C++ extension ``csgd_ext._C`` (CPU kernel; CUDA kernel when built with CUDA).

The package imports without the extension; only asking for ``backend="native"`` errors, with the reason.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..layout import ClusterLayout, rows_dense, same_order

NAME = "native"
OP = "csgd_ext::csgd_step_"


_LOAD_ERROR: list = []  # the result of load_error(), once computed (a plain cache: torch.compile traces it)


def load_error() -> Optional[str]:
    """Why ``csgd_ext._C`` cannot be imported, or None when it loads."""
    if not _LOAD_ERROR:
        _LOAD_ERROR.append(_load())
    return _LOAD_ERROR[0]


def _load() -> Optional[str]:
    import importlib.util

    if importlib.util.find_spec("csgd_ext._C") is None:
        return ("the native extension csgd_ext._C was not built (installed with CSGD_EXT_NO_NATIVE=1, or "
                "not installed with `pip install --no-build-isolation -e .`)")
    try:
        from .. import _C  # noqa: F401  (loading registers the ops)
    except ImportError as e:  # built against another torch, missing symbol...
        return f"the native extension csgd_ext._C failed to load: {e}"
    if hasattr(torch.ops.csgd_ext, "csgd_step_"):
        _register_fake()
    return None


def build_info() -> dict:
    """Build flags compiled into the extension (``{}`` when it is not built)."""
    if load_error() is not None:
        return {}
    raw = torch.ops.csgd_ext.build_info()
    return dict(item.split("=", 1) for item in raw.split(";") if "=" in item)


def _dispatch_key(device: torch.device) -> str:
    return {"cpu": "CPU", "cuda": "CUDA"}.get(device.type, device.type.upper())


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the native kernel can run on ``device`` (default CPU), else why not."""
    err = load_error()
    if err is not None:
        return err
    device = torch.device("cpu" if device is None else device)
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(OP, _dispatch_key(device))
    except RuntimeError:
        return f"csgd_ext._C was built without the {OP} op"
    if not has_kernel:
        if device.type == "cuda":
            return ("csgd_ext._C was built without CUDA kernels (CPU-only torch or CSGD_EXT_NO_CUDA=1); "
                    "rebuild with a CUDA torch to use backend='native' on GPU")
        return f"csgd_ext._C has no {OP} kernel for device type {device.type!r}"
    return None


_FAKE_REGISTERED = False


def _register_fake() -> None:
    """Register the fake (meta) kernel so ``torch.compile`` can trace a step (once, after _C loads)."""
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return
    _FAKE_REGISTERED = True

    @torch.library.register_fake(OP)
    def _csgd_step_fake(params, grads, momentum_buffers, layouts, lr, weight_decay, momentum, dampening,
                        nesterov, maximize, centripetal, is_first_step):
        return None


def native_layout(layout: ClusterLayout) -> torch.Tensor:
    """The kernel-ready form of ``layout``: one int64 tensor ``[offsets (k + 1) | perm (n)]`` on its device.

    Built once per layout and cached in ``layout.extras["native"]`` (a new layout, as after
    ``CSGD.set_clusters``, gets a new one).

    >>> from csgd_ext.layout import build_layout
    >>> native_layout(build_layout(torch.tensor([7, 3, 7]))).tolist()
    [0, 1, 3, 1, 0, 2]
    """
    t = layout.extras.get(NAME)
    if t is None:
        t = torch.cat([layout.offsets.to(torch.int64), layout.perm.to(torch.int64)]).contiguous()
        layout.extras[NAME] = t
    return t


_READY: set = set()  # device types the op was found to run on (checked once per process, not every step)


def step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list,
         layouts: Sequence[Optional[ClusterLayout]], *, lr: float, weight_decay: float, momentum: float,
         dampening: float, nesterov: bool, maximize: bool, centripetal: float) -> None:
    """One fused C-SGD step over lists of tensors, in place (the signature of every backend's ``step``).

    All tensors go through one ``torch.ops.csgd_ext.csgd_step_`` call per dtype (two when some momentum
    buffers do not exist yet: those are allocated here and filled by the kernel's first step).
    Parameters whose rows are not dense blocks of memory (e.g. a transposed view) are computed on a
    contiguous copy that is copied back; gradients or buffers whose element order differs from their
    parameter's are copied into the parameter's layout (buffers are copied back). Contiguous and
    ``channels_last`` tensors take no copy.

    Example::

        from csgd_ext.layout import build_layout
        w = torch.randn(4, 3); g = torch.randn(4, 3); bufs = [None]
        step([w], [g], bufs, [build_layout(torch.tensor([0, 0, 1, 1]))], lr=0.1, weight_decay=0.0,
             momentum=0.9, dampening=0.0, nesterov=True, maximize=False, centripetal=0.01)
    """
    if len(params) == 0:
        return
    if torch.is_grad_enabled():  # in-place updates of leaf parameters (CSGD.step already runs without grad)
        with torch.no_grad():
            return step(params, grads, momentum_buffers, layouts, lr=lr, weight_decay=weight_decay,
                        momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize,
                        centripetal=centripetal)
    dev_type = params[0].device.type
    if dev_type not in _READY and not torch.compiler.is_compiling():  # checked eagerly; not traced
        reason = unavailable_reason(params[0].device)
        if reason is not None:
            raise RuntimeError(f"backend 'native' is unavailable on {dev_type}: {reason}")
        _register_fake()
        _READY.add(dev_type)
    use_momentum = momentum != 0
    # (dtype, is_first_step) -> (params, grads, bufs, layouts)
    calls: Dict[tuple, tuple] = {}
    copy_back = []
    for i, p in enumerate(params):
        g = grads[i]
        b = momentum_buffers[i] if use_momentum else None
        first = use_momentum and b is None
        if p.numel() == 0:
            if first:
                momentum_buffers[i] = torch.zeros_like(p)
            continue
        pw = p
        if not (p.is_contiguous() and g.is_contiguous() and (b is None or b.is_contiguous())):
            # the common case skips this: nothing to copy (the op checks shapes, dtypes and devices)
            if not rows_dense(p):
                pw = p.contiguous()  # documented copy: rows of p are not dense blocks
                copy_back.append((p, pw))
            if not same_order(g, pw):
                g = torch.empty_like(pw).copy_(g)
            if b is not None and not same_order(b, pw):
                bw = torch.empty_like(pw).copy_(b)
                copy_back.append((b, bw))
                b = bw
        if first:
            b = momentum_buffers[i] = torch.empty_like(pw)
        lay = layouts[i]
        lt = None if lay is None or lay.num_rows == 0 else native_layout(lay)
        key = (p.dtype, first)
        lists = calls.get(key)
        if lists is None:
            lists = calls[key] = ([], [], [], [])
        lists[0].append(pw)
        lists[1].append(g)
        if use_momentum:
            lists[2].append(b)
        lists[3].append(lt)
    for (_, first), (ps, gs, bs, ls) in calls.items():
        torch.ops.csgd_ext.csgd_step_(ps, gs, bs, ls, float(lr), float(weight_decay), float(momentum),
                                      float(dampening), bool(nesterov), bool(maximize), float(centripetal),
                                      first)
    for dst, src in copy_back:
        dst.copy_(src)
