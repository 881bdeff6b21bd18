"""Two revisions of the CPU kernel on the same memory: C-SGD step time per revision, as a ratio to plain SGD.

    python benchmarks/step/kernel_ab.py                          # HEAD's kernel vs the working tree's
    python benchmarks/step/kernel_ab.py --base HEAD~3 --processes 5 --by-cols

``step_ab.py`` compares whole builds, each in its own process against ``SGD(fused=True)`` on its own copies of
the tensors; on a shared VM the physical placement of those copies moves a step by tens of percent between
processes (fused SGD itself took 3.7 ms to 10.7 ms on the same 8M-element tensors in one afternoon), which hides
kernel changes of 10 %. Here both revisions of ``csrc/csgd_cpu_kernel_impl.h`` are compiled into one program
(``kernel_ab.cpp``) and step the same ``w``, ``g`` and ``b`` in interleaved rounds, through the glue's own tiles
and visiting order (``csrc/csgd_cpu_tiles.h``), beside plain SGD on the same memory (the kernel's unclustered
loop, "flat"). One thread, fp32, momentum 0.9, Nesterov, weight decay 1e-4, centripetal 3e-3.

The clusters are ``harness.workloads.param_set``'s (the same as ``step_ab.py``'s: random ids, members scattered,
or made adjacent). The base revision's kernel must share ``csrc/csgd_math.h`` and ``csrc/csgd_cpu_kernel.h`` with
the working tree. No torch in the timed program: it needs a C++17 compiler (``$CXX``, default ``c++``) and
torch's headers only. Compiled with ``-O3 -march=native`` (no ``-march=native`` with ``CSGD_EXT_NATIVE_ARCH=0``),
as the extension is, then ``$CXXFLAGS``; about 45 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
IMPL = "csrc/csgd_cpu_kernel_impl.h"
SHARED = ("csrc/csgd_math.h", "csrc/csgd_cpu_kernel.h")
#: (label, keep, members adjacent)
CASES = (("5/8 scattered", 0.625, False), ("1/2 scattered", 0.5, False), ("5/8 adjacent", 0.625, True))


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def kernel_at(rev: str) -> str:
    """The text of the kernel at ``rev`` (``"worktree"``: the file as it is now)."""
    if rev == "worktree":
        with open(os.path.join(ROOT, IMPL)) as f:
            return f.read()
    changed = git("diff", "--name-only", rev, "--", *SHARED).split()
    if changed:
        raise SystemExit(f"kernel_ab: {', '.join(changed)} differ between {rev} and the working tree; both kernels "
                         "are compiled against the working tree's, so compare revisions that share them")
    return git("show", f"{rev}:{IMPL}")


def write_workload(path: str, net: str, keep: float, adjacent: bool) -> int:
    """The parameters of ``param_set(net, keep)`` with their layouts, in kernel_ab.cpp's format; returns the
    number of elements."""
    from benchmarks.harness import workloads as wl
    from csgd_ext.optim.ops.native import native_layout
    from csgd_ext.optim.row_layout import build_layout

    ws = wl.param_set(net, keep)
    ws = ws.contiguous() if adjacent else ws
    numel = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<q", len(ws.params)))
        for i, p in enumerate(ws.params):
            rows = p.shape[0] if p.dim() else 1
            cols = p.numel() // rows
            numel += p.numel()
            if i in ws.cluster_index:
                lay = native_layout(build_layout(ws.cluster_index[i])).cpu()
                clusters = lay.numel() - rows - 1
                f.write(struct.pack("<qqq", rows, cols, clusters))
                f.write(lay.numpy().astype("<i8").tobytes())
            else:
                f.write(struct.pack("<qqq", rows, cols, 0))
    return numel


def compile_harness(tmp: str, base: str, new: str) -> str:
    from torch.utils.cpp_extension import include_paths

    for name, rev in (("impl_a.h", base), ("impl_b.h", new)):
        with open(os.path.join(tmp, name), "w") as f:
            f.write(kernel_at(rev))
    exe = os.path.join(tmp, "kernel_ab")
    flags = ["-O3", "-std=c++17"]
    if os.environ.get("CSGD_EXT_NATIVE_ARCH", "1").strip().lower() in ("1", "true", "yes", "on"):
        flags.append("-march=native")
    flags += os.environ.get("CXXFLAGS", "").split()  # after ours: CXXFLAGS=-O0 compiles in seconds (for a dry run)
    cmd = [os.environ.get("CXX", "c++"), *flags, f"-I{tmp}", f"-I{os.path.join(ROOT, 'csrc')}",
           *(f"-I{p}" for p in include_paths()), os.path.join(HERE, "kernel_ab.cpp"), "-o", exe]
    print(f"compiling {base} (a) and {new} (b) into one program ...", flush=True)
    subprocess.run(cmd, check=True)
    return exe


def fmt(v: List[float]) -> str:
    return f"{statistics.median(v):.3f}x [{min(v):.2f} to {max(v):.2f}]"


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="revision of kernel a (default HEAD)")
    ap.add_argument("--new", default="worktree", help="revision of kernel b (default: the working tree's file)")
    ap.add_argument("--net", default="resnet50", help="resnet50, resnet20 (the demo net), tiny, ... (workloads)")
    ap.add_argument("--processes", type=int, default=3, help="processes per case (the spread is over them)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per process")
    ap.add_argument("--by-cols", action="store_true", help="also break the time down by row length")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        exe = compile_harness(tmp, args.base, args.new)
        results: Dict[str, Tuple[List[float], List[float], List[float]]] = {}
        by_cols: Dict[str, Dict[str, List[float]]] = {}
        for label, keep, adjacent in CASES:
            wpath = os.path.join(tmp, "workload.bin")
            numel = write_workload(wpath, args.net, keep, adjacent)
            a, b, ba = [], [], []
            for proc in range(args.processes):
                cmd = [exe, wpath, str(args.rounds)] + (["by-cols"] if args.by_cols else [])
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                a.append(res["a_ms"] / res["flat_ms"])
                b.append(res["b_ms"] / res["flat_ms"])
                ba.append(res["b_ms"] / res["a_ms"])
                print(f"{label}, process {proc + 1}/{args.processes}: a {res['a_ms']:.2f} ms, b {res['b_ms']:.2f} ms, "
                      f"flat {res['flat_ms']:.2f} ms ({numel / 1e6:.1f}M elements)", flush=True)
                if args.by_cols:
                    by_cols[label] = res["by_cols"]  # the last process's
            results[label] = (a, b, ba)
    print(f"\n{args.net} shapes, one thread, same memory; median [min to max] over {args.processes} processes of "
          f"{args.rounds} interleaved rounds; a = {args.base}, b = {args.new}, flat = plain SGD (b's unclustered "
          "loop):\n")
    print("| case | a / flat | b / flat | b / a |\n|---|---|---|---|")
    for label, (a, b, ba) in results.items():
        print(f"| {label} | {fmt(a)} | {fmt(b)} | {fmt(ba)} |")
    for label, table in by_cols.items():
        print(f"\n{label}, by row length (last process): ms per step and ratio to flat\n")
        print("| columns | flat | a | b | b - flat |\n|---|---|---|---|---|")
        for cols, (ta, tb, tf) in sorted(table.items(), key=lambda kv: int(kv[0])):
            print(f"| {cols} | {tf * 1e3:.3f} ms | {ta / tf:.2f}x | {tb / tf:.2f}x | {(tb - tf) * 1e3:+.3f} ms |")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, ROOT)
    sys.exit(main())
