"""Run the csgd_ext benchmarks and print / write a markdown report.

    python benchmarks/step/run.py --quick                 # < 2 min on 2 cores, rewrites benchmarks/step/RESULTS.md
    python benchmarks/step/run.py                         # full mode (longer, more repeats)
    python benchmarks/step/run.py --smoke --out -         # seconds: exercises every section, prints only
    python benchmarks/step/run.py --quick --sections step,train --out /tmp/r.md

Every comparison is interleaved (A B A B ...) with medians; ratios are taken within one run. The interpreted
Triton backend is never timed on CPU. Without a GPU the report says "GPU: not run (no GPU lent)".
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402

import csgd_ext  # noqa: E402
from benchmarks.harness import machine, nets, report, suites  # noqa: E402

SECTIONS = ("step", "sweep", "memory", "train", "latency")


def _device_sections(cfg, sections, device: str, progress: bool):
    """Run the sections on ``device``; returns ``(bw, step, sweep, mem, train, lat)`` rows."""
    bw = suites.copy_bandwidth_gbs(cfg, device=device)
    step = suites.step_section(cfg, bw, device=device, progress=progress) if "step" in sections else []
    sweep = suites.sweep_section(cfg, bw, device=device, progress=progress) if "sweep" in sections else []
    mem = suites.memory_section(cfg, device=device) if "memory" in sections else []
    train = suites.train_section(cfg, device=device) if "train" in sections else []
    lat = suites.latency_section(cfg, device=device, progress=progress) if "latency" in sections else []
    return bw, step, sweep, mem, train, lat


def _device_markdown(cfg, device: str, results, native_reason) -> List[str]:
    bw, step, sweep, mem, train, lat = results
    h = "##" if device == "cpu" else "###"
    md = [f"{h} Targets", "", report.table(["target", "measured", "verdict"],
                                           report.targets(step, train, lat, native_reason)), ""]
    slower = report.slower_lines(step, train)
    if slower:
        md += [f"{h} Where C-SGD stands against plain SGD", ""] + slower + [""]
    if step:
        md += [f"{h} Optimizer step", "", report.step_table(step)]
        only = ("; in this mode it and the reference backend (the readable spec, not a contender) are timed "
                "at " + ", ".join(report.keep_name(k) for k in cfg.slow_keeps) + " only"
                if len(cfg.slow_keeps) < len(cfg.keeps) else "")
        md += ["The dense approach's cost does not depend on the clustering (two n x n products per parameter "
               f"whatever the clusters){only}. Its GB/s is the same 20 B/element bookkeeping, not its real "
               "traffic.", ""]
        if not cfg.reference_everywhere:
            md += ["The sweeps and the training step leave the reference backend out in this mode (full mode "
                   "times it).", ""]
    if sweep:
        md += [f"{h} Sweeps", "", report.sweep_table(sweep)]
    if mem:
        md += [f"{h} Optimizer memory", "", report.memory_table(mem), "",
               "Computed state = momentum buffers + cluster ids/layouts (+ the dense n x n matrices). Measured = "
               "growth of resident (GPU: allocated) memory over the first step, and the peak above the steady "
               "level during a later step (temporaries); CPU RSS has allocator noise of a few MiB.", ""]
    if train:
        md += [f"{h} Training step", "", report.train_table(train), ""]
    if lat:
        md += [f"{h} Inference latency: merged vs unmerged", "", report.latency_table(lat), "",
               "Eval mode under `torch.inference_mode()`, interleaved, median; random weights snapped to their "
               "cluster means before merging (so the merged model computes the same function: see the max abs "
               "output diff); speed does not depend on the weight values.", ""]
    return md


def build_report(mode: str, sections=SECTIONS, command: str = "", progress: bool = True) -> str:
    """Run ``sections`` in ``mode`` (``smoke|quick|full``) on CPU (and on CUDA when present) and return the
    markdown report."""
    cfg = suites.CONFIGS[mode]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    t0 = time.time()
    info = machine.machine_info()
    cpu = _device_sections(cfg, sections, "cpu", progress)
    gpu = _device_sections(cfg, sections, "cuda", progress) if torch.cuda.is_available() else None
    load_end = os.getloadavg()

    md = [f"# csgd_ext benchmarks ({mode} mode)", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    for k, v in info.items():
        md.append(f"- {k}: {v}")
    md.append(f"- load average (1/5/15 min) at end: {' / '.join(f'{x:.2f}' for x in load_end)}")
    md.append(f"- networks: {nets.source()}")
    md.append(f"- run time: {time.time() - t0:.0f} s")
    md.append(f"- measured CPU copy bandwidth: **{cpu[0]:.1f} GB/s** (`dst.copy_(src)`, fp32, {cfg.copy_numel:,} "
              "elements, 3 x 4 bytes per element: read src, write-allocate read and write of dst; median)")
    md.append("- triton: excluded from CPU timings (on CPU it runs only in the TRITON_INTERPRET=1 interpreter, "
              "~1 s per 1M elements; it is a GPU backend)")
    md.append("- GPU: " + (f"{torch.cuda.get_device_name(0)}, see the GPU section" if gpu is not None
                           else "not run (no GPU lent)"))
    start_load = float(info.get("load average (1/5/15 min) at start", "0 / 0 / 0").split(" / ")[0])
    busy = max(start_load, load_end[0])
    if os.cpu_count() and busy > 0.5 * os.cpu_count():
        md.append(f"- **taken under load** (load average up to {busy:.1f} on {os.cpu_count()} cores, other jobs "
                  "running): absolute times are unreliable; read the interleaved ratios")
    md += ["", "Hyperparameters of every step: lr 1e-3, momentum 0.9, Nesterov, weight decay 1e-4, centripetal "
           "3e-3; clustered = every conv and norm parameter (random cluster ids at the stated keep fraction: "
           "members spread over the tensor as k-means clusters are; `benchmarks/step/access_order.py` shows what that "
           "order costs), classifier plain SGD. Ratios are "
           "medians of interleaved runs; `/ SGD fused` > 1 means slower than `torch.optim.SGD(fused=True)`.", ""]
    md += ["# CPU", ""] + _device_markdown(cfg, "cpu", cpu, csgd_ext.available_backends()["native"])
    if gpu is not None:
        md += [f"# GPU: {torch.cuda.get_device_name(0)}", "",
               f"Measured GPU copy bandwidth: **{gpu[0]:.1f} GB/s** (`dst.copy_(src)`, 2 x 4 bytes per element). "
               "CUDA events after a synchronize.", ""]
        md += _device_markdown(cfg, "cuda", gpu, csgd_ext.available_backends("cuda")["native"])
    else:
        md += ["# GPU", "", "GPU: not run (no GPU lent). On a CUDA machine the same command adds this section "
               "(every section on `cuda`, Triton included, CUDA-event timing, `torch.cuda.max_memory_allocated`).",
               ""]
    return "\n".join(md).replace("\n\n\n", "\n\n")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats, < 2 min on 2 cores")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for tests; prints only by default")
    ap.add_argument("--out", default=None,
                    help="markdown file to write ('-' = print only); default benchmarks/step/RESULTS.md "
                         "(smoke: print only)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {','.join(SECTIONS)}")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: torch's choice; 1 is steadier on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    m = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = args.out if args.out is not None else ("-" if args.smoke else os.path.join(HERE, "RESULTS.md"))
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    command = "python benchmarks/step/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                              else sys.argv[1:]))
    md = build_report(m, sections, command=command.strip(), progress=not args.no_progress)
    print(md)
    if out != "-":
        with open(out, "w") as f:
            f.write(md + "\n")
        print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
