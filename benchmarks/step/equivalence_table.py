"""How each backend's step compares with torch SGD and with the reference, one step from the same state.

    python benchmarks/step/equivalence_table.py            # native, cuda_emulated, triton (interpreted on CPU)

Columns: whether the step equals ``torch.optim.SGD`` (single-tensor and foreach) bit for bit on unclustered
tensors, per dtype, over every flag combination; and the largest difference from the reference backend on
clustered tensors (every cluster size 1..7, uneven sizes, one big cluster, odd row lengths), in ulps of the
step's scale (the largest magnitude among the step's inputs and outputs), per dtype. Run it under a portable
build to get that build's row (``tests/portable_build.sh`` shows how to build one).
"""

from __future__ import annotations

import itertools
import os
import sys

if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # Triton on the CPU (set before triton.jit runs)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests"))

import torch  # noqa: E402

import csgd_ext  # noqa: E402
from csgd_ext.optim import ops

from _equiv import hparam_grid, make_params, step_beside_torch_sgd, ulps  # noqa: E402

SHAPES = [(7,), (33, 5), (16, 3, 3, 3), (1000,), (17,), ()]
CLUSTERED = [(28,), (28, 15), (28, 16), (28, 17), (13, 4, 3, 3), (24, 300)]
KINDS = ["sizes", "sizes", "uneven", "gaps", "uneven", "one"]


def bitwise_vs_torch(backend: str, dtype) -> bool:
    combos = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
              for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 1e-2],
                                                        [False, True]) if not (n and (m == 0 or d != 0))]
    for ci, hp in enumerate(combos):
        for foreach, later in itertools.product((False, True), (False, True)):
            gen = torch.Generator().manual_seed(ci)
            ps, gs, bufs = ([torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(3))
            for a, b, ba, bb in step_beside_torch_sgd(ps, gs, bufs, hp, backend, lr=0.05, later=later,
                                                      foreach=foreach):
                if not torch.equal(a, b) or (ba is not None and not torch.equal(ba, bb)):
                    return False
    return True


def max_ulps_vs_reference(backend: str, dtype) -> float:
    worst = 0.0
    shapes = CLUSTERED if backend != "triton" else CLUSTERED[:4]
    for hi, hp in enumerate(hparam_grid()):
        gen = torch.Generator().manual_seed(hi)
        ps, lays = make_params(shapes, KINDS[:len(shapes)], dtype, gen)
        gs = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
        bufs = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
        out = {}
        for name in (backend, "reference"):
            qs, qb = [p.clone() for p in ps], [b.clone() for b in bufs]
            ops.get(name).step(qs, gs, qb, lays, **hp)
            out[name] = (qs, qb)
        for i in range(len(ps)):
            for j in range(2):
                worst = max(worst, ulps(out[backend][j][i], out["reference"][j][i], ps[i], gs[i], bufs[i]))
    return worst


def main() -> int:
    import csgd_ext._C  # noqa: F401

    info = torch.ops.csgd_ext.build_info()
    print(f"build: {info}; CPU kernel copy: {torch.ops.csgd_ext.cpu_kernel_isa()}; torch CPU capability: "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    print("| backend | bitwise = torch SGD, fp32 | fp64 | max per-step ulps vs reference, fp32 | fp64 | fp16 | "
          "bf16 |\n|---|---|---|---|---|---|---|")
    for backend in ("native", "cuda_emulated", "triton"):
        why = csgd_ext.available_backends()[backend]
        if why is not None:
            print(f"| {backend} | unavailable: {why} | | | | | |")
            continue
        bits = ["yes" if bitwise_vs_torch(backend, dt) else "no" for dt in dtypes[:2]]
        u = [f"{max_ulps_vs_reference(backend, dt):.2f}" for dt in dtypes]
        print(f"| {backend} | {bits[0]} | {bits[1]} | " + " | ".join(u) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
