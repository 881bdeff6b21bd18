"""What this machine charges for rows read out of order, and what software prefetch into L1 or L2 buys back.

    python benchmarks/step/prefetch_probe.py                     # rows of 256 B to 8 KB, 3 processes
    python benchmarks/step/prefetch_probe.py --cols 512 --mb 64 --processes 5

Compiles ``prefetch_probe.c`` (a standalone momentum-SGD update, no torch, none of csgd_ext's code: ``$CC``,
default ``cc``, ``-O3 -march=native``) and runs it per row length: three arrays of ``--mb`` megabytes (well past
the caches), rows visited in order or shuffled, without prefetch or prefetching the row 1 or 4 visits ahead into
L1 (``prefetcht0``) or L2 (``prefetcht1``); and the cluster walk's own pattern on adjacent pairs of rows (both rows
of a pair in lockstep, 16 columns of one then of the other, as the kernel walks a cluster's members), without
prefetch or with the next pair prefetched into L2. Prints, per row length, each walk's time as a ratio to the in-order
walk of the same process: median [min to max] over the processes. The CPU kernel's prefetch choices
(``csrc/csgd_cpu_kernel_impl.h``) rest on this table; ``kernel_ab.py`` measures the kernel itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cols", default="64,512,2048", help="row lengths in fp32 columns (multiples of 16)")
    ap.add_argument("--mb", type=int, default=32, help="megabytes per array (three arrays)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per process")
    ap.add_argument("--processes", type=int, default=3)
    args = ap.parse_args(argv)
    cols = [int(c) for c in args.cols.split(",")]
    if any(c < 16 or c % 16 for c in cols):
        raise SystemExit(f"--cols: multiples of 16, got {args.cols}")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "prefetch_probe")
        subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", os.path.join(HERE, "prefetch_probe.c"),
                        "-o", exe], check=True)
        table: Dict[int, Dict[str, List[float]]] = {}
        for c in cols:
            for p in range(args.processes):
                out = subprocess.run([exe, str(c), str(args.mb), str(args.rounds)], check=True, capture_output=True,
                                     text=True).stdout
                ns = dict((name, float(v)) for name, v in (line.split("\t") for line in out.strip().splitlines()))
                for name, v in ns.items():
                    table.setdefault(c, {}).setdefault(name, []).append(v / ns["in order"])
                print(f"rows of {c * 4} B, process {p + 1}/{args.processes}: in order {ns['in order']:.3f} ns per "
                      "element", flush=True)
    names = list(next(iter(table.values())))
    print(f"\nTime per element as a ratio to the in-order walk, median [min to max] over {args.processes} processes "
          f"of {args.rounds} rounds; three arrays of {args.mb} MB:\n")
    print("| walk | " + " | ".join(f"rows of {c * 4} B" for c in cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for name in names[1:]:
        cells = [f"{statistics.median(table[c][name]):.2f}x [{min(table[c][name]):.2f} to "
                 f"{max(table[c][name]):.2f}]" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
