"""A small C-SGD step for compute-sanitizer (memcheck, racecheck) and as a quick device smoke check.

    compute-sanitizer --tool memcheck  python3 benchmarks/step/gpu_small_step.py --backend native
    compute-sanitizer --tool racecheck python3 benchmarks/step/gpu_small_step.py --backend native
    compute-sanitizer --tool memcheck  python3 benchmarks/step/gpu_small_step.py --backend triton
    python3 benchmarks/step/gpu_small_step.py --dry-run          # CPU: native kernel + interpreted Triton

A few thousand rows in the shapes that exercise every path a kernel has: rows that start off a 16-byte boundary
(a parameter that is a view at storage offset 1), row lengths around the vector width, many one-column
(batch-norm-like) vectors, singletons, one large cluster, clusters of every size 1..9, unclustered tensors,
channels_last, fp32/fp16/bf16/fp64. Three steps (the first allocates the momentum buffers), then every
parameter and buffer is compared with the reference backend run on CPU copies of the same inputs. Exit 0 when
all match, 1 on a mismatch, 2 when the backend cannot run here.

Run it with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` under memcheck (gpu_check.sh does): with PyTorch's caching
allocator an access past a tensor's end usually lands inside a larger cached block and is not reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="native", help="comma list of backends: native, triton (default native)")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="run on CPU (native CPU kernel, Triton interpreter)")
    return ap.parse_args(argv)


# (shape, cluster kind, dtype name, storage offset in elements, channels_last)
SPECS = [
    ((64, 300), "uneven", "float32", 1, False),      # rows start 4 bytes past a 16-byte boundary
    ((33, 5, 3, 3), "sizes", "float32", 0, False),  # every cluster size 1..9
    ((48, 17), "one", "float32", 3, False),         # one cluster of 48 rows, odd row length, unaligned
    ((3, 1023), "uneven", "float32", 0, False),     # long rows, length not a multiple of 4
    ((5, 4), "uneven", "float32", 0, False),        # rows exactly one 16-byte vector
    ((40,), "uneven", "float32", 0, False),         # one-column rows
    ((40,), "singletons", "float32", 2, False),
    ((7, 5), None, "float32", 0, False),            # unclustered
    ((70001,), None, "float32", 1, False),          # a large unclustered vector, unaligned
    ((16, 8, 3, 3), "uneven", "float32", 0, True),  # channels_last
    ((24, 40), "uneven", "float16", 1, False),
    ((24, 40), "sizes", "bfloat16", 0, False),
    ((9, 13), "gaps", "float64", 1, False),
] + [((13,), "uneven", "float32", 0, False)] * 30   # many small batch-norm-like vectors (packing)
#: ``--dry-run``: the same kinds, fewer and smaller tensors (the Triton interpreter is slow).
DRY_SPECS = [s for s in SPECS if s[0] not in ((70001,), (13,), (3, 1023))] + [((13,), "uneven", "float32", 0, False)] * 3

HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=False, centripetal=0.4)


def _ids(torch, kind, n, gen):
    if kind == "singletons":
        return torch.randperm(n, generator=gen)
    if kind == "one":
        return torch.zeros(n, dtype=torch.int64)
    if kind == "uneven":
        return torch.randint(0, max(1, n // 3), (n,), generator=gen)
    if kind == "sizes":  # clusters of sizes 1, 2, ..., 9 (and a remainder), members spread out
        sizes = torch.arange(1, 10).repeat(n // 45 + 1)
        ids = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)[:n]
        return ids[torch.randperm(n, generator=gen)]
    if kind == "gaps":
        vals = torch.tensor([-7, 3, 1000003, 42, 5])
        return vals[torch.randint(0, vals.numel(), (n,), generator=gen)]
    raise ValueError(kind)


def _place(torch, data, offset, channels_last, device):
    """``data`` copied to ``device`` as a tensor at storage offset ``offset`` (rows off 16-byte boundaries)."""
    if channels_last:
        return data.to(device).contiguous(memory_format=torch.channels_last)
    base = torch.empty(data.numel() + offset, dtype=data.dtype, device=device)
    t = base[offset:offset + data.numel()].view(data.shape)
    t.copy_(data)
    return t


TOL = {"float32": (1e-4, 1e-5), "float64": (1e-10, 1e-12), "float16": (2e-3, 2e-3), "bfloat16": (2e-2, 2e-2)}


def run(backend: str, device: str, steps: int = 3, seed: int = 0, specs=None) -> dict:
    """Step ``backend`` on ``device`` and the reference on CPU copies; returns ``{ok, max_err, ...}``."""
    import torch
    from csgd_ext.optim import ops
    from csgd_ext.optim.row_layout import build_layout

    why = ops.get(backend).unavailable_reason(torch.device(device))
    if why is not None:
        return {"backend": backend, "ok": None, "error": f"unavailable on {device}: {why}"}
    specs = SPECS if specs is None else specs
    gen = torch.Generator().manual_seed(seed)
    mine, ref, lay_mine, lay_ref, dtypes = [], [], [], [], []
    for shape, kind, dt, off, cl in specs:
        dtype = getattr(torch, dt)
        data = torch.randn(shape, generator=gen).to(dtype)
        mine.append(_place(torch, data, off, cl, device))
        ref.append(data.clone().contiguous(memory_format=torch.channels_last) if cl else data.clone())
        ids = None if kind is None else _ids(torch, kind, shape[0], gen)
        lay_mine.append(None if ids is None else build_layout(ids.to(device)))
        lay_ref.append(None if ids is None else build_layout(ids))
        dtypes.append(dt)
    mod, refmod = ops.get(backend), ops.get("reference")
    bufs_mine, bufs_ref = [None] * len(mine), [None] * len(ref)
    # the native kernel against its host emulation (the same device code run on the CPU), where it exists
    emu = None
    if backend == "native" and "cuda_emulated" in getattr(ops, "BACKENDS", ()):
        if ops.get("cuda_emulated").unavailable_reason(torch.device("cpu")) is None:
            emu = ([t.clone() for t in ref], [None] * len(ref), ops.get("cuda_emulated"))
    t0 = time.perf_counter()
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in ref]
        mod.step(mine, [_place(torch, g, 1 if i % 2 else 0, specs[i][4], device) for i, g in enumerate(grads)],
                 bufs_mine, lay_mine, **HP)
        refmod.step(ref, grads, bufs_ref, lay_ref, **HP)
        if emu is not None:
            emu[2].step(emu[0], grads, emu[1], lay_ref, **HP)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    worst, bad = {}, []
    for i, (a, b, ba, bb, dt) in enumerate(zip(mine, ref, bufs_mine, bufs_ref, dtypes)):
        for what, x, y in (("param", a, b), ("buffer", ba, bb)):
            x = x.detach().cpu().double()
            y = y.detach().double()
            err = ((x - y).abs() / (y.abs() + 1)).max().item() if x.numel() else 0.0
            worst[dt] = max(worst.get(dt, 0.0), err if err == err else float("inf"))
            rtol, atol = TOL[dt]
            if not torch.allclose(x, y, rtol=rtol, atol=atol) or not torch.isfinite(x).all():
                bad.append(f"{what} #{i} {tuple(x.shape)} {dt}: max rel err {err:.3g}")
    bitwise = None
    if emu is not None:  # fp32 tensors bitwise equal to cuda_emulated (information: printed, not a failure)
        pairs = [(a, b) for a, b, dt in zip(mine + bufs_mine, emu[0] + emu[1], dtypes + dtypes) if dt == "float32"]
        bitwise = (sum(torch.equal(a.detach().cpu(), b) for a, b in pairs), len(pairs))
    return {"backend": backend, "device": device, "ok": not bad, "mismatches": bad, "max_rel_err": worst,
            "bitwise_vs_cuda_emulated": bitwise,
            "tensors": len(mine), "elements": sum(p.numel() for p in mine), "seconds": secs}


def main(argv=None) -> int:
    args = _args(argv)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if args.dry_run:
        args.device = "cpu"
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: OpenMP barriers on a busy CI machine cost more than the work
        args.steps = min(args.steps, 2)
    if device == "cpu" and "triton" in backends:
        # before csgd_ext imports its Triton kernels (triton.jit picks its mode at decoration time)
        os.environ["TRITON_INTERPRET"] = "1"
    rc = 0
    for b in backends:
        r = run(b, device, steps=args.steps, seed=args.seed, specs=DRY_SPECS if args.dry_run else SPECS)
        if r["ok"] is None:
            print(f"gpu_small_step: {b}: SKIP ({r['error']})")
            rc = max(rc, 2)
            continue
        errs = ", ".join(f"{k} {v:.2g}" for k, v in sorted(r["max_rel_err"].items()))
        print(f"gpu_small_step: {b} on {device}: {'OK' if r['ok'] else 'MISMATCH'}: {r['tensors']} tensors, "
              f"{r['elements']} elements, {args.steps} steps in {r['seconds']:.2f} s; max rel err vs reference "
              f"(CPU): {errs}")
        if r.get("bitwise_vs_cuda_emulated"):
            same, n = r["bitwise_vs_cuda_emulated"]
            print(f"gpu_small_step: {b} on {device}: fp32 params and buffers bitwise equal to cuda_emulated: "
                  f"{same}/{n}")
        for m in r["mismatches"][:20]:
            print("  " + m)
        if not r["ok"]:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
