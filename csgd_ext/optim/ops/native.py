"""The native backend: the C++ extension ``csgd_ext._C`` (CPU kernel; CUDA kernel when built with CUDA).

The package imports without the extension; only asking for ``backend="native"`` errors, with the reason.

**The op.** ``csgd_ext::csgd_step_`` is registered with ``TORCH_LIBRARY``, with a fake implementation so a
``torch.compile``d training step traces; ``torch.library.opcheck`` passes (``tests/test_native_ops.py``).

**CPU kernel** (C++/OpenMP): explicit 8-wide vectors, unrolled member loops for clusters of 2 to 4 rows and
software prefetch of the next cluster's rows. Members spread over the tensor make the reads scattered, which is
most of what a clustered step costs over fused SGD (``python benchmarks/step/access_order.py``).

**Torch SGD's bits.** Every fast backend rounds a fused multiply-add once exactly where ATen's SGD does (weight
decay, momentum, nesterov, the parameter update; ``csrc/csgd_math.h``, shared by the CPU and CUDA kernels,
mirrored in Triton with ``tl.fma``), so without clusters one step from the same state gives the same bits as
``torch.optim.SGD`` (default and ``foreach=True``; ``fused=True`` too, except a tensor's last few elements that do
not fill a vector, where ATen's fused CPU kernel fuses the momentum's other product). That holds wherever torch
runs its AVX2 / AVX-512 kernels; under ``ATEN_CPU_CAPABILITY=default`` torch itself does not fuse, and the two
agree to a few ulps per step (``tests/test_optim_sgd_equivalence.py``; CI runs it both ways).

**CUDA kernel** (``csrc/csgd_step_cuda.cu``, device code in ``csrc/csgd_device.h``), designed from a byte count:
a step must move what fused SGD moves (read ``w, g, b``, write ``w, b``: 20 B per fp32 element), so it is a
stream and everything else is overhead kept small. A work table is built once per set of layouts
(``csrc/csgd_worktable.cpp``: validated, cached, uploaded without a sync); a step fills 32 KB of kernel
parameters (up to 1,000 tensor addresses) and launches one persistent grid per dtype (2 blocks of 256 threads
per SM, no register spills: checked in CI). Work items: flat ranges for unclustered tensors, all-singleton
layouts and long runs of singleton rows (16-byte vectors, scalar heads and tails), small flat tensors (norm
vectors, biases) several to an item; clusters of up to 8 rows, one thread per (cluster, 16-byte column vector)
reading every member once (the first two members' ``w`` held in registers, the others' re-read from cache), many
clusters per block when rows are short (one-column norm parameters: one cluster per thread); larger clusters
split across the block's threads with a fixed-order reduction through shared memory. IEEE arithmetic (no fast
math), the update of an element from ``csrc/csgd_math.h`` (explicit fused multiply-adds where torch's SGD fuses,
none left to the compiler), no atomics: results equal the CPU kernel's bit for bit wherever the summation order
is the same (every cluster of up to 8 rows), and unclustered tensors round as torch's CPU SGD does. Not yet
checked on a GPU: torch's CUDA fused SGD computes fp32 with double-precision hyperparameters (read from its
source), so fp32 bitwise equality with it is expected to fail until the kernel copies that; ``tests/test_gpu.py``
checks it. Capturable in a CUDA graph after one step (the work table must exist before capture). **It has never
run on a GPU**: what it computes is checked on the CPU by the ``cuda_emulated`` backend
(:mod:`csgd_ext.optim.ops.cuda_emulated`). ``tests/test_cuda_compile.py`` compiles every ``csrc/*.cu`` against
torch's headers as the build does (``-O3``, sm_90) and fails if the kernel spills registers to local memory
(CI sets ``CSGD_EXT_REQUIRE_NVCC=1``, so a missing or failing ``nvcc`` fails CI instead of skipping).

**Build switches.** ``CSGD_EXT_NO_NATIVE=1`` installs the pure-Python package (reference backend only; asking for
``backend="native"`` then raises an error that says why), ``CSGD_EXT_NO_CUDA=1`` builds the CPU extension only,
``CSGD_EXT_NATIVE_ARCH=0`` drops ``-march=native`` (host code only) for a portable binary: the CPU kernel is
compiled twice, once for AVX2 + FMA through a per-function target and once for the baseline, and the copy is
picked at run time from the CPU's features, so a portable build keeps hardware FMA and the same bits (CI builds
it and runs the equivalence tests against it, ``tests/portable_build.sh``; its step time, within 4 % of the
native build's, is in ``benchmarks/README.md``). ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default:
the GPUs present, else 9.0; 7.0 or newer).
"""

from __future__ import annotations

import operator
from itertools import repeat
from typing import Optional, Sequence

import torch

from csgd_ext.optim.hparams import HParams, as_hparams
from csgd_ext.optim.row_layout import ClusterLayout
from csgd_ext.optim.ops.staging import copy_back, layout_forms, stage
from csgd_ext.optim.ops.registry import Backend, register

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
        from csgd_ext import _C  # noqa: F401  (loading registers the ops)
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

    def _csgd_step_fake(params, grads, momentum_buffers, layouts, lr, weight_decay, momentum, dampening,
                        nesterov, maximize, centripetal, is_first_step):
        return None

    for op in (OP, "csgd_ext::csgd_step_cuda_emulated_"):
        if hasattr(torch.ops.csgd_ext, op.split("::")[1]):
            torch.library.register_fake(op)(_csgd_step_fake)


def native_layout(layout: ClusterLayout) -> torch.Tensor:
    """The kernel-ready form of ``layout``: one int64 tensor ``[offsets (k + 1) | perm (n)]`` on its device.

    Built once per layout and cached in ``layout.extras["native"]`` (a new layout, as after
    ``CSGD.set_clusters``, gets a new one).

    >>> from csgd_ext.optim.row_layout import build_layout
    >>> native_layout(build_layout(torch.tensor([7, 3, 7]))).tolist()
    [0, 1, 3, 1, 0, 2]
    """
    t = layout.extras.get(NAME)
    if t is None:
        t = torch.cat([layout.offsets.to(torch.int64), layout.perm.to(torch.int64)]).contiguous()
        layout.extras[NAME] = t
    return t


_READY: set = set()  # (op, device type) pairs found to run (checked once per process, not every step)
_STAGED: dict = {}  # id(layouts list) -> the list, for step lists whose tensors the op did not take as they are


def step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list,
         layouts: Sequence[Optional[ClusterLayout]], hp: Optional[HParams] = None, **hparams) -> None:
    """One fused C-SGD step over lists of tensors, in place (the signature of every backend's ``step``:
    the hyperparameters ``hp``, or the keywords ``lr=..., momentum=...``).

    All tensors go through one ``torch.ops.csgd_ext.csgd_step_`` call per dtype (two when some momentum
    buffers do not exist yet: those are allocated here and filled by the kernel's first step).
    Parameters whose rows are not dense blocks of memory (e.g. a transposed view) are computed on a
    contiguous copy that is copied back; gradients or buffers whose element order differs from their
    parameter's are copied into the parameter's layout (buffers are copied back). Contiguous and
    ``channels_last`` tensors take no copy.

    Example::

        from csgd_ext.optim.hparams import HParams
        from csgd_ext.optim.row_layout import build_layout
        w = torch.randn(4, 3); g = torch.randn(4, 3); bufs = [None]
        step([w], [g], bufs, [build_layout(torch.tensor([0, 0, 1, 1]))],
             HParams(lr=0.1, momentum=0.9, nesterov=True, centripetal=0.01))
    """
    run_op(NAME, "csgd_step_", params, grads, momentum_buffers, layouts, as_hparams(hp, hparams))


def run_op(backend: str, op_name: str, params, grads, momentum_buffers: list, layouts, hp: HParams) -> None:
    """:func:`step` through ``torch.ops.csgd_ext.<op_name>`` (an op with ``csgd_step_``'s schema), for the
    backend named ``backend`` (named in errors; ``unavailable_reason`` of that backend's module is asked)."""
    if len(params) == 0:
        return
    if torch.is_grad_enabled():  # in-place updates of leaf parameters (CSGD.step already runs without grad)
        with torch.no_grad():
            return run_op(backend, op_name, params, grads, momentum_buffers, layouts, hp)
    dev_type = params[0].device.type
    if (op_name, dev_type) not in _READY and not torch.compiler.is_compiling():  # checked eagerly; not traced
        from csgd_ext.optim.ops.registry import get

        reason = get(backend).unavailable_reason(params[0].device)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} is unavailable on {dev_type}: {reason}")
        _register_fake()
        _READY.add((op_name, dev_type))
    op = getattr(torch.ops.csgd_ext, op_name)
    args = (float(hp.lr), float(hp.weight_decay), float(hp.momentum), float(hp.dampening), bool(hp.nesterov),
            bool(hp.maximize), float(hp.centripetal))  # the op's order
    bufs = momentum_buffers if hp.momentum != 0 else []
    if id(layouts) not in _STAGED and not any(map(operator.is_, bufs, repeat(None))):
        # the common case, without a Python pass per tensor: every buffer exists, so one call does it when the
        # op accepts the tensors as they are (it checks dtypes, shapes and memory orders before any write)
        try:
            op(params, grads, bufs, layout_forms(layouts, native_layout), *args, False)
            return
        except (ValueError, TypeError):  # mixed dtypes on the CPU, a layout that needs a copy, or a real error
            _STAGED[id(layouts)] = layouts  # staged from now on (kept: its id stays its own)
            if len(_STAGED) > 64:
                _STAGED.pop(next(iter(_STAGED)))
    calls, staged = stage(params, grads, momentum_buffers, layouts, hp.momentum != 0, native_layout)
    for (_, first), (ps, gs, bs, ls) in calls.items():
        op(ps, gs, bs, ls, *args, first)
    copy_back(staged)

register(Backend(NAME, step, unavailable_reason))
