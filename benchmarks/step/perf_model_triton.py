"""Performance model rows for the Triton backend: judge a work shape design without a GPU.

``triton_rows(params, layouts, bandwidth_gbs=..., sms=132)`` returns one dict per design:

* ``"triton (old)"``: the work shape of commit c01eeaf, rebuilt here from its algorithm: one launch per
  dtype, one ``BLOCK`` per dtype sized by the widest row (an unclustered tensor is one row of ``numel``
  columns), ``BLOCK = max(32, min(1024, next_pow2(widest)))``, ``R = max(1, min(2048 // BLOCK,
  next_pow2(items)))`` items per program, items sorted by cluster size, int64 member indices, scalar
  loads (no alignment known), 4 warps.
* ``"triton (new)"``: the tables that :func:`csgd_ext.optim.ops.triton_worktable.build_work_table` builds, the very code the
  backend launches: row-width classes ``flat / vec / short / long``, tile and ``num_warps`` per class,
  aligned segments with 16-byte vector loads (when every tensor is 16-byte aligned, as fresh allocations
  are), int32 member indices.

Keys: ``design, bytes, programs, launches, lanes_used_frac, bytes_per_load, predicted_us`` and
``ideal_us`` (compulsory bytes at full bandwidth: what ``SGD(fused=True)`` needs at best, one launch),
``ratio_to_ideal``, ``predicted_us_no_overlap``, ``data_bytes``, ``table_bytes``, ``l1_wavefronts``, ``t_dram_us``, ``t_l1_us``,
``t_latency_us``, ``classes`` (new design: launches per class).

Assumptions (an H200-like GPU; every constant is a module-level name below):

* a step moves the **compulsory bytes** once: read ``w, g, b``, write ``w, b`` (momentum on), so
  ``5 x element size`` per element (20 B for fp32); ``bytes`` adds the tables read once (work table,
  member rows, per-tensor meta). Re-reads of ``w`` in the second pass and of member indices hit L1/L2 and
  are not DRAM bytes.
* **lanes**: a program's data instructions cover its whole ``[R, C]`` tile for ``trips`` member iterations
  (``trips`` = the largest cluster among its ``R`` items) in each of two passes (pass 1 reads ``g`` and
  ``w``, pass 2 reads ``w, b`` and writes ``w, b``; ``flat`` is one pass of 5 accesses). Masked lanes
  issue but move nothing. ``lanes_used_frac`` = useful element slots / issued slots.
* **L1 throughput**: a warp instruction costs ``max(1, 32 * bytes_per_load / 128)`` wavefronts of 128 B;
  an SM retires ``L1_WAVEFRONTS_PER_CLK`` per clock at ``CLOCK_GHZ`` (so wasted lanes and 2-byte scalar
  loads cost issue time even though they move no DRAM bytes). Member-index loads count one instruction
  per 32 items per member iteration.
* **latency**: in the old kernel each member iteration is a dependent chain (index load, then data load):
  2 round trips of ``LATENCY_US`` per iteration per pass; the new kernel loads the next member's index one
  iteration ahead: 1 per iteration plus 1 per pass; a ``flat`` program 1; plus 1 for the work/meta loads;
  ``RESIDENT_THREADS`` threads per SM (at most 32 programs) overlap their chains.
* a launch costs ``max(t_dram, t_l1, t_latency)`` (the latency chains of some programs hidden behind the
  streaming of others) plus ``LAUNCH_US`` for the first launch of a step and ``LAUNCH_GAP_US`` for each
  further one; launches run one after another; ``predicted_us`` is the sum. ``predicted_us_no_overlap``
  is the pessimistic bound where the chains are not hidden: ``max(t_dram + t_latency, t_l1)`` per launch.
  The truth lies between the two; the GPU check decides.

It is a model, not a measurement: use it to compare designs (and to see which term binds), then check on a
GPU with ``benchmarks/step/gpu_check.sh``.

Run ``python -m benchmarks.step.perf_model_triton`` (or ``python benchmarks/step/perf_model_triton.py``) for the
ResNet-50 table (keep 5/8, 1/2 and all singletons).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from csgd_ext.optim.row_layout import build_layout  # noqa: E402
from csgd_ext.optim.ops import triton_worktable as tw  # noqa: E402

__all__ = ["triton_rows", "old_tables", "new_tables", "main"]

# shared with the CUDA rows (benchmarks/step/perf_model.py): memory latency and launch costs
from benchmarks.step.perf_constants import LATENCY_US, LAUNCH_GAP_US, LAUNCH_US  # noqa: E402

CLOCK_GHZ = 1.98            # H200 SM boost clock
L1_WAVEFRONTS_PER_CLK = 1   # per SM: one 128-byte wavefront per clock through the LSU/L1
RESIDENT_THREADS = 2048     # per SM
MAX_PROGRAMS_PER_SM = 32
WARP = 32


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _entries(params, layouts):
    """Per dtype: [(LayoutLike or None, m, numel)] and the element size (as the backend builds them)."""
    groups = {}
    for p, lay in zip(params, layouts):
        if p.numel() == 0:
            continue
        if lay is not None and lay.num_rows == 0:
            lay = None
        rows = p.shape[0] if lay is not None else 1
        ll = None if lay is None else tw.LayoutLike(lay.perm, lay.offsets, lay.num_clusters, lay.max_size)
        groups.setdefault(p.dtype, []).append((ll, p.numel() // rows, p.numel()))
    return groups


def _launch_stats(sizes: torch.Tensor, widths: torch.Tensor, R: int, C: int, passes_arrays, esize: int,
                  bpl: int, idx_bytes: int, warps: int, prefetch: bool = False) -> dict:
    """Statistics of one launch whose items have cluster ``sizes`` and useful columns ``widths``."""
    n = sizes.numel()
    progs = -(-n // R)
    pad = progs * R - n
    s = torch.cat([sizes, sizes.new_zeros(pad)]).view(progs, R)
    trips = s.max(dim=1).values.to(torch.float64)
    issued_per_iter = R * C
    useful = float((sizes.to(torch.float64) * widths.to(torch.float64)).sum())
    issued = float(trips.sum()) * issued_per_iter
    vec = max(1, bpl // esize)
    instr_per_access = trips.sum().item() * math.ceil(issued_per_iter / (WARP * vec))
    wave_per_instr = max(1, WARP * bpl // 128)
    accesses = sum(passes_arrays)
    wavefronts = instr_per_access * wave_per_instr * accesses
    if idx_bytes:  # member indices: one load per item per member iteration per pass, 32 items per instruction
        wavefronts += trips.sum().item() * math.ceil(R / WARP) * len(passes_arrays)
    resident = min(MAX_PROGRAMS_PER_SM, RESIDENT_THREADS // (WARP * warps))
    # round trips per program: index load then data load per member iteration (2), or 1 when the next
    # member's index is loaded one iteration ahead (plus the first index of each pass); +1 for work/meta
    per_iter, first = (2, 0) if idx_bytes and not prefetch else ((1, 1) if idx_bytes else (1, 0))
    chain = ((trips * per_iter + first) * len(passes_arrays) + 1).sum().item()
    return dict(programs=progs, useful=useful, issued=issued * len(passes_arrays), useful_x=useful * len(passes_arrays),
                wavefronts=wavefronts, chain=chain, resident=resident, elements=useful)


def _finish(design, launches, data_bytes, table_bytes, bw, sms, extra) -> dict:
    t_total = t_serial = 0.0
    terms = dict(t_dram_us=0.0, t_l1_us=0.0, t_latency_us=0.0)
    for ln in launches:
        t_dram = ln["dram"] / (bw * 1e3)  # bytes / (GB/s) -> us
        t_l1 = ln["wavefronts"] / (sms * L1_WAVEFRONTS_PER_CLK * CLOCK_GHZ * 1e3)
        t_lat = ln["chain"] * LATENCY_US / (sms * ln["resident"])
        terms["t_dram_us"] += t_dram
        terms["t_l1_us"] += t_l1
        terms["t_latency_us"] += t_lat
        gap = LAUNCH_US if ln is launches[0] else LAUNCH_GAP_US
        t_total += max(t_dram, t_l1, t_lat) + gap
        t_serial += max(t_dram + t_lat, t_l1) + gap
    issued = sum(ln["issued"] for ln in launches)
    useful = sum(ln["useful_x"] for ln in launches)
    wbytes = sum(ln["dram"] for ln in launches)
    ideal = data_bytes / (bw * 1e3) + LAUNCH_US
    row = dict(design=design, bytes=int(data_bytes + table_bytes), programs=int(sum(ln["programs"] for ln in launches)),
               launches=len(launches), lanes_used_frac=useful / issued if issued else 1.0,
               bytes_per_load=sum(ln["bpl"] * ln["dram"] for ln in launches) / wbytes if wbytes else 0.0,
               predicted_us=t_total, predicted_us_no_overlap=t_serial, ideal_us=ideal, ratio_to_ideal=t_total / ideal, data_bytes=int(data_bytes),
               table_bytes=int(table_bytes), l1_wavefronts=int(sum(ln["wavefronts"] for ln in launches)))
    row.update({k: round(v, 3) for k, v in terms.items()})
    row.update(extra)
    return row


def old_tables(entries, esize: int):
    """The c01eeaf work table of one dtype: ``(sizes, widths, R, BLOCK, items)`` (compiled-mode constants)."""
    max_m = max(m if lay is not None else n for lay, m, n in entries)
    block = max(32, min(1024, _pow2(max_m)))
    sizes, widths = [], []
    for lay, m, n in entries:
        if lay is None:
            m, s = n, torch.ones(1, dtype=torch.int64)
        else:
            s = lay.offsets[1:] - lay.offsets[:-1]
        nb = -(-m // block)
        cols = torch.arange(nb) * block
        sizes.append(s.cpu().repeat_interleave(nb))
        widths.append((m - cols).clamp(max=block).repeat(s.numel()))
    sizes, widths = torch.cat(sizes), torch.cat(widths)
    order = torch.sort(sizes, stable=True).indices
    sizes, widths = sizes[order], widths[order]
    R = max(1, min(2048 // block, _pow2(sizes.numel())))
    return sizes, widths, R, block


def new_tables(entries, dtype):
    """The backend's work table (:func:`csgd_ext.optim.ops.triton_worktable.build_work_table`) of one dtype, on the CPU."""
    return tw.build_work_table(entries, dtype, torch.device("cpu"))


def triton_rows(params: Sequence[torch.Tensor], layouts: Sequence[Optional[object]], *, bandwidth_gbs: float,
                sms: int = 132, momentum: bool = True, centripetal: bool = True) -> List[dict]:
    """One row per design (``triton (old)``, ``triton (new)``) for ``params`` clustered by ``layouts``."""
    groups = _entries(params, layouts)
    per_elem = 5 if momentum else 3
    pass1 = 2 if centripetal else 1
    pass2 = 4 if momentum else 2
    data_bytes = sum(n * torch.empty((), dtype=dt).element_size() * per_elem
                     for dt, ents in groups.items() for _, _, n in ents)
    rows = []

    # -- old: one launch per dtype
    launches, table_bytes = [], 0
    for dt, ents in groups.items():
        es = torch.empty((), dtype=dt).element_size()
        sizes, widths, R, block = old_tables(ents, es)
        st = _launch_stats(sizes, widths, R, block, (pass1, pass2), es, es, 8, 4)
        tb = sizes.numel() * 32 + sum(lay.perm.numel() * 8 for lay, _, _ in ents if lay is not None) + len(ents) * 40
        table_bytes += tb
        dram = sum(n for _, _, n in ents) * es * per_elem + tb
        launches.append(dict(st, dram=dram, bpl=es))
    rows.append(_finish("triton (old)", launches, data_bytes, table_bytes, bandwidth_gbs, sms,
                        dict(tile=", ".join(f"{dt}: [{R}, {block}]" for dt in groups))))

    # -- new: the backend's plan
    launches, table_bytes, classes = [], 0, {}
    for dt, ents in groups.items():
        es = torch.empty((), dtype=dt).element_size()
        plan = new_tables(ents, dt)
        work = plan.work
        tb_all = work.numel() * 8 + (plan.rows.numel() * 4 if plan.rows.numel() > 1 else 0) + len(ents) * 48
        table_bytes += tb_all
        for ln in plan.launches:
            seg = work[ln.item0:ln.item0 + ln.n_items]
            tens = seg[:, 0]
            if ln.cls == "flat":
                numel = torch.tensor([ents[t][2] for t in range(len(ents))], dtype=torch.int64)
                sizes = torch.ones(ln.n_items, dtype=torch.int64)
                widths = (numel[tens] - seg[:, 3]).clamp(max=ln.C)
                arrays, idx = (per_elem,), 0
            else:
                ms = torch.tensor([ents[t][1] for t in range(len(ents))], dtype=torch.int64)
                sizes = seg[:, 2]
                widths = (ms[tens] - seg[:, 3]).clamp(max=ln.C)
                arrays, idx = (pass1, pass2), 4
            bpl = 16 if ln.aligned else es
            st = _launch_stats(sizes, widths, ln.R, ln.C, arrays, es, bpl, idx, ln.num_warps, prefetch=True)
            dram = float((sizes * widths).sum()) * es * per_elem + ln.n_items * 32
            launches.append(dict(st, dram=dram, bpl=bpl))
            key = f"{ln.cls}{'' if ln.aligned or ln.cls == 'vec' else '/unaligned'}"
            classes[key] = classes.get(key, "") + f"[{ln.R}x{ln.C}] w{ln.num_warps} "
    rows.append(_finish("triton (new)", launches, data_bytes, table_bytes, bandwidth_gbs, sms,
                        dict(classes={k: v.strip() for k, v in classes.items()})))
    return rows


def resnet50_layouts(keep: float, seed: int = 0):
    """ResNet-50 parameters (fp32) and layouts from ``benchmarks.harness.workloads.param_set`` (random clusters)."""
    from benchmarks.harness.workloads import param_set
    ws = param_set("resnet50", keep=keep, seed=seed)
    params = [p.detach() for p in ws.params]
    layouts = [build_layout(ws.cluster_index[i]) if i in ws.cluster_index else None for i in range(len(params))]
    return params, layouts


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidth-gbs", type=float, default=4300.0)
    ap.add_argument("--sms", type=int, default=132)
    args = ap.parse_args(argv)
    out = []
    print(f"Triton C-SGD step, ResNet-50 shapes (fp32, momentum + Nesterov + wd + centripetal), "
          f"{args.bandwidth_gbs:g} GB/s, {args.sms} SMs (model, not a measurement)")
    hdr = (f"{'keep':>10} {'design':>13} {'MB':>7} {'launches':>8} {'programs':>8} {'lanes':>6} {'B/load':>6} "
           f"{'dram us':>8} {'L1 us':>7} {'lat us':>7} {'pred us':>8} {'x ideal':>7} {'no-overlap us':>13} {'x ideal':>7}")
    print(hdr)
    for keep, label in ((0.625, "5/8"), (0.5, "1/2"), (1.0, "singletons")):
        params, layouts = resnet50_layouts(keep)
        rows = triton_rows(params, layouts, bandwidth_gbs=args.bandwidth_gbs, sms=args.sms)
        for r in rows:
            print(f"{label:>10} {r['design']:>13} {r['bytes'] / 1e6:7.1f} {r['launches']:8d} {r['programs']:8d} "
                  f"{r['lanes_used_frac']:6.1%} {r['bytes_per_load']:6.1f} {r['t_dram_us']:8.1f} {r['t_l1_us']:7.1f} "
                  f"{r['t_latency_us']:7.1f} {r['predicted_us']:8.1f} {r['ratio_to_ideal']:7.2f} "
                  f"{r['predicted_us_no_overlap']:13.1f} {r['predicted_us_no_overlap'] / r['ideal_us']:7.2f}")
            out.append(dict(r, keep=label))
        print(f"{label:>10} {'ideal':>13} (compulsory bytes at full bandwidth + one launch: "
              f"{rows[0]['ideal_us']:.1f} us); new classes: {rows[1]['classes']}")
    return out


if __name__ == "__main__":
    main()
