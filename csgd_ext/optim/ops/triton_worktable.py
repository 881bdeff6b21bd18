"""Work shaped by row width: the row-width classes of the Triton backend and its cached work table (the
kernels' launches and tables; "plan" in this package means the cluster plan of :mod:`csgd_ext.plan.records` only).

Pure PyTorch (no Triton import), so the performance model (``benchmarks/step/perf_model_triton.py``) builds the
very tables the backend launches, on a CPU, without a GPU.

Every tensor of one dtype in a step falls into one class, from its row width ``m`` (columns per output
channel) and its layout:

======== =========================================== ============ ============ =========
class    tensors                                     tile [R, C]  items        num_warps
======== =========================================== ============ ============ =========
``flat`` unclustered, or all-singleton layout:       [1, 4096]    4096-element 8
         elementwise over the dense tensor                        blocks
``vec``  clustered, ``m == 1`` (norm weights,        [512, 1]     one cluster  4
         biases): many clusters per program
``short`` clustered, ``2 <= m <= 256``: several      [2048/C, C]  one cluster  4
         clusters per program as a 2-D tile,                      x C columns
         C in 16..256
``long`` clustered, ``m > 256``: column blocks       [4096/C, C]  one cluster  8
         of C in 256..1024                                        x C columns
======== =========================================== ============ ============ =========

``C`` of the ``short`` and ``long`` classes is picked per set of layouts from the row widths present:
the power of two that wastes the fewest lanes to padding (``ceil(m / C) * C`` against ``m``), the
largest such one within 2 % of the best. An all-singleton layout runs ``flat``: each row is its own
cluster, so the update is elementwise and the row order does not matter.

Alignment: an item is *statically aligned* when its row width (``numel`` for ``flat``) is a multiple of
``ALIGN = 16 bytes / element size``; then, with every tensor's offset from the launch's base pointers a
multiple of ``ALIGN`` (checked on the host from ``data_ptr`` each step, no sync), each row starts on a
16-byte boundary and the kernel hints ``tl.multiple_of``/``tl.max_contiguous`` so loads and stores
become 16-byte vectors. Each class's items are one segment of aligned items and one of unaligned
ones; an unaligned segment (or an aligned one whose pointers fail the check) runs the same kernel with
``ALIGN = 1``: no hint, always correct.

One work table per set of layouts and dtype, ``int64 [P, 4]``: ``(tensor, first member in rows,
cluster size, first column)`` (``flat`` items: ``(tensor, 0, 1, first element)``), segment after
segment, each segment sorted by cluster size so the ``R`` items of a program share their member-loop
trip count. ``rows`` (int32) holds every cluster's member rows (``ClusterLayout.perm``). Built on the
device with tensor ops: no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["ClassSpec", "Launch", "WorkTable", "LayoutLike", "CLASSES", "FLAT_BLOCK", "align_elems", "classify",
           "pick_columns", "build_work_table"]

ALIGN_BYTES = 16
FLAT_BLOCK = 4096
SHORT_MAX = 256


@dataclass(frozen=True)
class ClassSpec:
    name: str
    tile: int            # elements per program (R * C)
    num_warps: int
    columns: Tuple[int, ...]  # candidate C (one for vec / flat)


CLASSES = {
    "flat": ClassSpec("flat", FLAT_BLOCK, 8, (FLAT_BLOCK,)),
    "vec": ClassSpec("vec", 512, 4, (1,)),
    "short": ClassSpec("short", 2048, 4, (16, 32, 64, 128, 256)),
    "long": ClassSpec("long", 4096, 8, (256, 512, 1024)),
}
ORDER = ("flat", "vec", "short", "long")


@dataclass(frozen=True)
class LayoutLike:
    """What the tables need of a :class:`csgd_ext.optim.row_layout.ClusterLayout` (or of the op's tensor inputs)."""
    perm: torch.Tensor
    offsets: torch.Tensor
    num_clusters: int
    max_size: int


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``n_items`` items of the table from ``item0``, tile ``[R, C]``."""
    cls: str
    item0: int
    n_items: int
    R: int
    C: int
    num_warps: int
    aligned: bool        # statically aligned segment (row widths multiples of ALIGN)
    tensors: Tuple[int, ...]  # tensor indices in this segment (for the per-step pointer check)

    @property
    def programs(self) -> int:
        return -(-self.n_items // self.R)


@dataclass
class WorkTable:
    """The cached tables of one set of layouts of one dtype, and their launches."""
    work: torch.Tensor          # int64 [P, 4]
    rows: torch.Tensor          # int32 [sum of rows of the clustered tensors] (at least 1 element)
    launches: List[Launch]
    classes: List[str]          # per tensor
    columns: dict = field(default_factory=dict)  # class -> C
    keep: tuple = ()            # objects kept alive while the table is cached


def align_elems(dtype: torch.dtype) -> int:
    return max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())


def classify(lay: Optional[LayoutLike], m: int) -> str:
    if lay is None or lay.max_size <= 1:
        return "flat"
    if m == 1:
        return "vec"
    return "short" if m <= SHORT_MAX else "long"


def pick_columns(spec: ClassSpec, widths: Sequence[Tuple[int, int]]) -> int:
    """The column block ``C`` of a class for ``widths = [(m, clusters), ...]``: fewest padded lanes,
    the largest ``C`` within 2 % of the best."""
    if len(spec.columns) == 1 or not widths:
        return spec.columns[-1] if len(spec.columns) == 1 else spec.columns[0]
    used = sum(m * k for m, k in widths)
    frac = {c: used / sum(-(-m // c) * c * k for m, k in widths) for c in spec.columns}
    best = max(frac.values())
    return max(c for c in spec.columns if frac[c] >= best - 0.02)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def build_work_table(entries: Sequence[Tuple[Optional[LayoutLike], int, int]], dtype: torch.dtype,
                     device: torch.device) -> WorkTable:
    """Tables for ``entries = [(layout or None, m, numel), ...]`` (one per tensor of this dtype; ``m``
    is the row width of a clustered tensor, ``numel`` its element count). No host sync."""
    align = align_elems(dtype)
    classes = [classify(lay, m) for lay, m, _ in entries]
    cols = {}
    for name in ORDER:
        widths = [(m, lay.num_clusters) for (lay, m, _), c in zip(entries, classes) if c == name and c != "flat"]
        cols[name] = pick_columns(CLASSES[name], widths)

    i64 = dict(dtype=torch.int64, device=device)
    rows, row_base = [], {}
    base = 0
    for t, ((lay, m, n), c) in enumerate(zip(entries, classes)):
        if c != "flat":
            row_base[t] = base
            rows.append(lay.perm.to(device=device, dtype=torch.int32))
            base += lay.perm.numel()

    pieces, launches = [], []
    item0 = 0
    for name in ORDER:
        spec = CLASSES[name]
        C = cols[name]
        for aligned in (True, False):
            seg, tensors, count = [], [], 0
            for t, ((lay, m, n), c) in enumerate(zip(entries, classes)):
                if c != name:
                    continue
                width = n if name == "flat" else m
                if (width % align == 0) != aligned and name != "vec":
                    continue
                if name == "vec" and not aligned:
                    continue  # one vec segment (no vector loads on a gather of one column)
                tensors.append(t)
                if name == "flat":
                    nb = -(-n // C)
                    starts = torch.arange(nb, **i64) * C
                    seg.append(torch.stack([torch.full((nb,), t, **i64), torch.zeros(nb, **i64),
                                            torch.ones(nb, **i64), starts], dim=1))
                    count += nb
                    continue
                nb = -(-m // C)
                k = lay.num_clusters
                offs = lay.offsets.to(device=device, dtype=torch.int64)
                starts = offs[:-1] + row_base[t]
                sizes = offs[1:] - offs[:-1]
                seg.append(torch.stack([torch.full((k * nb,), t, **i64), starts.repeat_interleave(nb),
                                        sizes.repeat_interleave(nb),
                                        (torch.arange(nb, **i64) * C).repeat(k)], dim=1))
                count += k * nb
            if not seg:
                continue
            table = torch.cat(seg)
            if name != "flat":
                table = table.index_select(0, torch.sort(table[:, 2], stable=True).indices)
            pieces.append(table)
            R = max(1, spec.tile // C)
            R = max(1, min(R, _pow2(count)))  # a small segment: no program wider than it needs
            launches.append(Launch(name, item0, count, R, C, spec.num_warps, aligned and name != "vec",
                                   tuple(tensors)))
            item0 += count
    work = torch.cat(pieces).contiguous() if pieces else torch.zeros((0, 4), **i64)
    rows_t = torch.cat(rows).contiguous() if rows else torch.zeros(1, dtype=torch.int32, device=device)
    if rows_t.numel() == 0:
        rows_t = torch.zeros(1, dtype=torch.int32, device=device)
    return WorkTable(work, rows_t, launches, classes, cols,
                     tuple(x for lay, _, _ in entries if lay is not None for x in (lay.perm, lay.offsets)))
