"""Performance model of a fused C-SGD step on a GPU, for judging a kernel design without one.

A step with momentum must move 5 accesses per element (read w, g, b; write w, b: 20 B per fp32 element), like
``torch.optim.SGD(fused=True)``, so a good kernel is a stream at the device's copy bandwidth. The model
counts, per design, the bytes each launch moves and how they are spread over the blocks, and predicts::

    time = LAUNCH_US + (launches - 1) * LAUNCH_GAP_US
           + sum over launches of max( bytes / bandwidth,                          # the stream
                                       max block bytes / per-block rate )         # the slowest block
    per-block rate = bytes a block keeps in flight / LATENCY_US   (Little's law; at most the bandwidth)

plus the bytes that a design moves beyond the 20 B (sector waste of scattered 4-byte accesses, re-read w).
Its inputs come from the same launch planning as the kernels: the CUDA kernel's plan statistics
(``csgd_ext.optim.ops.cuda_emulated.work_table_stats``, the work-table builder of ``csrc/csgd_worktable.cpp``); the previous CUDA kernel
(a multi-tensor apply of 96 blocks x 256 threads per launch, 24 tensors per launch, 4-byte scalar accesses,
one thread walking its cluster twice) and PyTorch's fused SGD (``MultiTensorApply.cuh``: 65,536-element
chunks, 320 blocks x 512 threads per launch, 16-byte accesses, 4 per thread in flight, at most 110 tensors of
depth 3 per launch) are modelled from their launch rules; the Triton rows come from
``benchmarks/step/perf_model_triton.py`` when it is present.

Assumptions (leads to check on the GPU, not measurements; the Triton rows use the same ones): LATENCY_US = 0.7
(a loaded HBM round trip), LAUNCH_US = 2.5 for a step's first launch and LAUNCH_GAP_US = 1.0 for each further
one (less when the step is replayed from a CUDA graph), a 32-byte sector for every scattered access narrower
than that. Run::

    python benchmarks/step/perf_model.py            # ResNet-50 and ResNet-56 shapes at 5/8, 1/2, singletons

>>> from benchmarks.harness.workloads import param_set
>>> ws = param_set("tiny", keep=0.625)
>>> rows = model_rows(ws, bandwidth_gbs=4300)
>>> [r["design"] for r in rows][:3]
['SGD fused (torch)', 'cuda (old)', 'cuda (new)']
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from csgd_ext.optim.row_layout import ClusterLayout, build_layout  # noqa: E402
from csgd_ext.optim.ops import cuda_emulated  # noqa: E402

from benchmarks.step.perf_constants import H200, LATENCY_US, LAUNCH_GAP_US, LAUNCH_US, SECTOR  # noqa: E402,F401


def _accesses(momentum: bool = True) -> int:
    return 5 if momentum else 3


def _launch_us(launches: int) -> float:
    return LAUNCH_US + max(0, launches - 1) * LAUNCH_GAP_US if launches else 0.0


def _wave_us(total_bytes: float, max_block_bytes: float, inflight_per_block: float, bandwidth_gbs: float) -> float:
    """One launch: the stream, or its slowest block at its latency-bound rate (never above the bandwidth)."""
    bw = bandwidth_gbs * 1e3  # bytes per microsecond
    per_block = min(bw, inflight_per_block / LATENCY_US)
    return max(total_bytes / bw, max_block_bytes / per_block)


def cuda_new(params: Sequence[torch.Tensor], layouts: Sequence[Optional[ClusterLayout]], *, bandwidth_gbs: float,
             sms: int = 132, blocks_per_sm: int = 2) -> Dict[str, object]:
    """The CUDA kernel of this repository, from its own launch plan (blocks_per_sm: from the kernel's
    ``__launch_bounds__``, 2 blocks of 256 threads)."""
    rows = []
    for st in cuda_emulated.work_table_stats(params, layouts, sm_count=sms, blocks_per_sm=blocks_per_sm):
        esize = st["elem_bytes"]
        n = st["elems_elem"] + st["elems_small"] + st["elems_large"] + st.get("elems_packed", 0)
        acc = _accesses()
        scalar = st["elems_scalar"]
        # scattered one-column clusters: each 2-8 byte access costs a 32-byte sector
        waste = st.get("elems_scattered", 0) * acc * max(0, SECTOR - esize)
        reread = st.get("elems_reread", 0) * esize  # w read again (members past the kept ones, large clusters)
        total = n * acc * esize + waste + reread + st["table_bytes"]
        max_block = st["max_block_elems"] * acc * esize
        # bytes in flight per block: 256 threads x (2 vectors x 3 streams) of 16 B on vector rows, 4 B otherwise
        vec_frac = 1.0 - scalar / max(1, n)
        inflight = 256 * 6 * (16 * vec_frac + esize * (1 - vec_frac))
        us = _launch_us(st["launches"]) + _wave_us(total, max_block, inflight, bandwidth_gbs)
        rows.append(dict(design="cuda (new)", dtype=st["dtype"], bytes=int(total), launches=st["launches"],
                         blocks=st["blocks"], items=st["items"], threads_per_sm=256 * blocks_per_sm,
                         bytes_per_load=16 if vec_frac > 0.5 else esize,
                         lanes_used_frac=round(st["small_lanes_used"] / max(1, st["small_lanes_total"]), 3)
                         if st["items_small"] else 1.0,
                         predicted_us=us))
    return _sum_rows(rows, "cuda (new)")


def _sum_rows(rows: List[Dict[str, object]], design: str) -> Dict[str, object]:
    if len(rows) == 1:
        return rows[0]
    out: Dict[str, object] = dict(design=design, dtype="+".join(str(r["dtype"]) for r in rows))
    for k in ("bytes", "launches", "blocks", "items", "predicted_us"):
        out[k] = sum(r[k] for r in rows)
    return out


def _pack(per_tensor: List[List[float]], max_tensors: int, max_blocks: int) -> List[List[float]]:
    """Multi-tensor-apply launch packing: tensors in order, a new launch when a launch holds ``max_tensors``
    tensors or ``max_blocks`` blocks (a tensor cut by a full launch goes on in the next). Each launch is the list
    of its blocks' bytes."""
    launches: List[List[float]] = [[]]
    ntensors = 0
    for items in per_tensor:
        if ntensors == max_tensors:
            launches.append([])
            ntensors = 0
        ntensors += 1
        for it in items:
            if len(launches[-1]) == max_blocks:
                launches.append([])
                ntensors = 1
            launches[-1].append(it)
    return [launch for launch in launches if launch]


def cuda_old(params: Sequence[torch.Tensor], layouts: Sequence[Optional[ClusterLayout]], *,
             bandwidth_gbs: float) -> Dict[str, object]:
    """The CUDA kernel before this design (commit c01eeaf): launch packing as its ``launch_all``."""
    max_tensors, max_blocks, threads, chunk, colblock, item_elems = 24, 96, 256, 65536, 256, 65536
    acc_bytes = _accesses() * 4
    per_tensor: List[List[float]] = []
    for p, lay in zip(params, layouts):
        numel = p.numel()
        if numel == 0:
            continue
        rows = p.shape[0] if p.dim() else 1
        cols = numel // rows
        items: List[float] = []
        if lay is None or lay.num_rows == 0:
            items = [min(chunk, numel - a) * acc_bytes for a in range(0, numel, chunk)]
        else:
            k = lay.num_clusters
            avg = max(1, rows // k)
            ncb = -(-cols // colblock)
            width = min(cols, colblock)
            per_item = max(1, item_elems // (avg * width))
            offsets = lay.offsets.tolist()
            for c0 in range(0, k, per_item):
                n_rows = offsets[min(k, c0 + per_item)] - offsets[c0]
                for j in range(ncb):
                    w = min(colblock, cols - j * colblock)
                    # g and w read twice (sum pass, update pass), scattered 4-byte accesses: a sector each
                    items.append(n_rows * w * (acc_bytes + 8) * (SECTOR / 4 if cols == 1 else 1))
        per_tensor.append(items)
    launches = _pack(per_tensor, max_tensors, max_blocks)
    inflight = threads * 2 * 4  # one thread: about two 4-byte loads in flight (serial member loops)
    us = _launch_us(len(launches)) + sum(_wave_us(sum(ln), max(ln), inflight, bandwidth_gbs) for ln in launches)
    return dict(design="cuda (old)", dtype="float32", bytes=int(sum(map(sum, launches))), launches=len(launches),
                blocks=sum(map(len, launches)), items=sum(map(len, launches)), threads_per_sm=256,
                bytes_per_load=4, predicted_us=us)


def sgd_fused(params: Sequence[torch.Tensor], *, bandwidth_gbs: float) -> Dict[str, object]:
    """``torch.optim.SGD(fused=True)`` with momentum: PyTorch's multi_tensor_apply launch rules."""
    chunk, max_blocks, max_tensors, threads = 65536, 320, 110, 512
    esize = params[0].element_size() if params else 4
    per_tensor = [[min(chunk, p.numel() - a) * _accesses() * esize for a in range(0, p.numel(), chunk)]
                  for p in params if p.numel() > 0]
    launches = _pack(per_tensor, max_tensors, max_blocks)
    inflight = threads * 4 * 3 * 16  # ILP 4, three streams, 16-byte accesses
    us = _launch_us(len(launches)) + sum(_wave_us(sum(ln), max(ln), inflight, bandwidth_gbs) for ln in launches)
    return dict(design="SGD fused (torch)", dtype=str(params[0].dtype).replace("torch.", "") if params else "-",
                bytes=int(sum(map(sum, launches))), launches=len(launches), blocks=sum(map(len, launches)),
                items=sum(map(len, launches)), threads_per_sm=2048, bytes_per_load=16, predicted_us=us)


def _layouts(ws) -> List[Optional[ClusterLayout]]:
    return [build_layout(ws.cluster_index[i]) if i in ws.cluster_index else None for i in range(len(ws.params))]


def predict(params: Sequence[torch.Tensor], layouts: Sequence[Optional[ClusterLayout]], *, backend: str = "native",
            bandwidth_gbs: float = H200["bandwidth_gbs"], sms: int = H200["sms"]) -> Dict[str, object]:
    """The model's row for one backend's current design (``native``: the CUDA kernel; ``triton``: the Triton
    backend, when ``benchmarks/step/perf_model_triton.py`` is present; ``sgd-fused``: torch's fused SGD)."""
    if backend == "native":
        return cuda_new(params, layouts, bandwidth_gbs=bandwidth_gbs, sms=sms)
    if backend == "sgd-fused":
        return sgd_fused(params, bandwidth_gbs=bandwidth_gbs)
    if backend == "triton":
        from benchmarks.step.perf_model_triton import triton_rows  # written alongside the Triton backend

        rows = triton_rows(params, layouts, bandwidth_gbs=bandwidth_gbs, sms=sms)
        return next(r for r in rows if r["design"] == "triton (new)")
    raise ValueError(f"no model for backend {backend!r}")


def model_rows(ws, *, bandwidth_gbs: float = H200["bandwidth_gbs"], sms: int = H200["sms"]) -> List[Dict[str, object]]:
    """Every design's row for workload ``ws`` (``benchmarks.harness.workloads.Workload``), fused SGD first."""
    lays = _layouts(ws)
    rows = [sgd_fused(ws.params, bandwidth_gbs=bandwidth_gbs), cuda_old(ws.params, lays, bandwidth_gbs=bandwidth_gbs),
            cuda_new(ws.params, lays, bandwidth_gbs=bandwidth_gbs, sms=sms)]
    try:
        from benchmarks.step.perf_model_triton import triton_rows
    except ImportError:
        triton_rows = None
    if triton_rows is not None:
        rows += triton_rows(ws.params, lays, bandwidth_gbs=bandwidth_gbs, sms=sms)
    base = rows[0]["predicted_us"]
    ideal = sum(p.numel() for p in ws.params) * _accesses() * 4 / (bandwidth_gbs * 1e3)
    for r in rows:
        r["x_sgd_fused"] = r["predicted_us"] / base
        r["pct_of_copy_bw"] = 100.0 * ideal / r["predicted_us"]
    return rows


def format_table(label: str, rows: List[Dict[str, object]]) -> str:
    head = "| workload | design | launches | blocks (programs) | items | MB moved | predicted µs | x SGD fused | % of copy BW at 20 B/elem |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        blocks = r.get("blocks", r.get("programs"))
        lines.append(f"| {label} | {r['design']} | {r['launches']} | {blocks} | {r.get('items', blocks)} | "
                     f"{r['bytes'] / 1e6:.1f} | {r['predicted_us']:.1f} | {r['x_sgd_fused']:.2f} | "
                     f"{r['pct_of_copy_bw']:.0f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from benchmarks.harness.workloads import keep_label, param_set

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bandwidth", type=float, default=H200["bandwidth_gbs"], help="copy bandwidth, GB/s (H200: 4300)")
    ap.add_argument("--sms", type=int, default=H200["sms"])
    ap.add_argument("--nets", default="resnet50,resnet56")
    args = ap.parse_args(argv)
    print(f"Performance model at {args.bandwidth:g} GB/s, {args.sms} SMs (latency {LATENCY_US} us, launch {LAUNCH_US} us)\n")
    for net in args.nets.split(","):
        for keep in (0.625, 0.5, 1.0):
            ws = param_set(net, keep=keep)
            print(format_table(f"{net} {keep_label(keep)}", model_rows(ws, bandwidth_gbs=args.bandwidth, sms=args.sms)))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
