"""The ``cuda_emulated`` backend (testing): the CUDA kernel's own device code, built for the host, run on CPU
tensors.

It runs the real work table and launches of the CUDA backend and walks every block and every thread of
every launch in order (``csrc/csgd_step_emulated.cpp``), so the CPU test suite checks what the GPU kernel
computes, not only that it compiles: every dtype, layout kind and hyperparameter combination against the
reference, vector and scalar paths, alignment (a misaligned 16-byte access raises, as the GPU would fault),
and that every output element is written exactly once. It is slow; never pick it to train.

The equivalence suite runs it like every backend, and ``tests/test_cuda_emulated.py`` checks every path against
the CPU kernel bit for bit: unaligned tensors, grids that make every block walk many items, several launches,
malformed layouts refused before any write, and every output element written exactly once. It walks a phase at
a time where the kernel has a barrier. ``"auto"`` never picks it.

Example::

    import torch, csgd_ext
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = csgd_ext.CSGD([w], lr=0.1, momentum=0.9, centripetal=0.1,
                        clusters={w: torch.tensor([0, 0, 1, 1, 2, 2])}, backend="cuda_emulated")
    w.grad = torch.randn(6, 4); opt.step()
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from csgd_ext.optim.hparams import HParams, as_hparams
from csgd_ext.optim.row_layout import ClusterLayout
from csgd_ext.optim.ops import native
from csgd_ext.optim.ops.staging import kernel_layout
from csgd_ext.optim.ops.registry import Backend, register

NAME = "cuda_emulated"
OP_NAME = "csgd_step_cuda_emulated_"


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None on CPU tensors when the native extension is built, else why not."""
    err = native.load_error()
    if err is not None:
        return err
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu":
        return "a testing backend: it runs the CUDA kernel's device code on CPU tensors only"
    if not hasattr(torch.ops.csgd_ext, OP_NAME):
        return f"csgd_ext._C was built without the {OP_NAME} op (rebuild the extension)"
    return None


def step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list,
         layouts: Sequence[Optional[ClusterLayout]], hp: Optional[HParams] = None, **hparams) -> None:
    """One C-SGD step through the emulated CUDA kernel (same contract as :func:`csgd_ext.optim.ops.reference.step`)."""
    native.run_op(NAME, OP_NAME, params, grads, momentum_buffers, layouts, as_hparams(hp, hparams))


def work_table_stats(params: Sequence[torch.Tensor], layouts: Sequence[Optional[ClusterLayout]], *,
                     sm_count: int = 132, blocks_per_sm: int = 4) -> List[Dict[str, object]]:
    """The CUDA kernel's work table for these tensors, one dict per dtype (``launches``, ``blocks``, ``items`` by
    kind, elements by path, ``max_block_elems``, cluster counts by size, ``table_bytes``...): the input of the
    performance model. The tensors may be on the CPU; only their shapes, dtypes and layouts matter.

    >>> from csgd_ext.optim.row_layout import build_layout
    >>> s = work_table_stats([torch.zeros(8, 64)], [build_layout(torch.tensor([0, 0, 1, 2, 3, 3, 4, 5]))])[0]
    >>> s["launches"], s["items_small"]
    (1, 1)
    """
    if native.load_error() is not None:
        raise RuntimeError(native.load_error())
    lts = [kernel_layout(lay, native.native_layout) for lay in layouts]
    out = []
    for raw in torch.ops.csgd_ext.cuda_work_table_stats(list(params), lts, int(sm_count), int(blocks_per_sm)):
        d: Dict[str, object] = {}
        for item in raw.split(";"):
            k, v = item.split("=", 1)
            d[k] = v if k == "dtype" else int(v)
        out.append(d)
    return out



def set_target(sm_count: int = 132, blocks_per_sm: int = 4) -> None:
    """The emulated GPU: multiprocessors and resident blocks per multiprocessor (default: an H200). The grid is
    ``min(items, sm_count * blocks_per_sm)``; a small one makes each block walk many items (for tests)."""
    torch.ops.csgd_ext.cuda_emulated_set_target(int(sm_count), int(blocks_per_sm))


def trace_writes(on: bool) -> None:
    """Start (``True``) or stop counting every element the emulated kernel stores (for tests)."""
    torch.ops.csgd_ext.cuda_emulated_trace_writes(bool(on))


def write_counts(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Per-element store counts (int32, shaped like each tensor) since :func:`trace_writes` was turned on."""
    return list(torch.ops.csgd_ext.cuda_emulated_write_counts(list(tensors)))

register(Backend(NAME, step, unavailable_reason, testing=True))
