"""GPU benchmark of the optimizer step: fused SGD against C-SGD (native CUDA, Triton), eager and CUDA-graph.

    python3 benchmarks/step/gpu_bench.py --out gpu_out/bench                  # on a CUDA machine
    python3 benchmarks/step/gpu_bench.py --sections step,train,latency        # + training step, merged latency
    python3 benchmarks/step/gpu_bench.py --dry-run --out /tmp/b               # CPU, tiny sizes: same code paths

Per workload (ResNet-50 / ResNet-56 parameter shapes of ``benchmarks.harness.workloads.param_set``, conv and norm
parameters clustered at 5/8 or 1/2 with random scattered ids, or all singletons; momentum 0.9, Nesterov,
weight decay, centripetal 3e-3) one interleaved pool of contenders: ``torch.optim.SGD(fused=True)``,
``CSGD(backend="native")``, ``CSGD(backend="triton")``, each eager (``opt.step()`` back to back) and as a
replayed CUDA graph of ``opt.step()`` (captured after warm-up steps on a side stream, as PyTorch's CUDA-graph
docs show; a contender that fails to capture is reported with its error). Timing: CUDA events around a batch
of calls after a synchronize, warm-up first, median over rounds whose start rotates. When one parameter set
fits in a few L2 caches, several independent copies are stepped in rotation so that the numbers are not L2's.

The harness is the CPU benchmark's (``benchmarks/step/run.py``): :mod:`benchmarks.harness.timing` (timer, interleaved
rounds, CUDA-graph capture), :mod:`benchmarks.harness.suites` (training step and merged latency, here with graph mode
and channels_last) and :mod:`benchmarks.step.gpu_step` (this benchmark's step section: eager and graph modes,
rotated copies past L2, the performance model); :mod:`benchmarks.step.gpu_bench_report` writes ``bench.md``. This
file is the command line.

Columns: median µs per step, ratio to fused SGD in the same mode, GB/s at 20 bytes per fp32 element (read w,
g, buffer; write w, buffer) and its % of the measured device-to-device copy bandwidth (a large ``copy_``,
bytes read + written), eager host µs per ``step()`` call, and the performance model's prediction
(``benchmarks.step.perf_model.predict``) where it imports. On CPU (``--dry-run`` / ``--device cpu --tiny``) the same
code runs at tiny sizes with ``perf_counter`` timing and graph mode emulated by plain calls; those numbers mean
nothing and are labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:  # run as a script: this tree's benchmarks and csgd_ext
    sys.path.insert(0, ROOT)
from benchmarks.step.gpu_bench_report import build_markdown, short_table, targets  # noqa: E402,F401  (re-exported)

__all__ = ["parse_args", "main", "targets", "train_section", "latency_section"]


def _ms(rows: List[dict]) -> List[dict]:
    """bench.json's millisecond keys (``median_ms``, ``eager_merged_ms``, ...) beside the harness's seconds."""
    for r in rows:
        r.update({k[:-2] + "_ms": v * 1e3 for k, v in list(r.items()) if k.endswith("_s") and isinstance(v, float)})
    return rows


def train_section(args, log) -> List[dict]:
    """ResNet-56 (batch 64) forward + backward + step, fused SGD against C-SGD (native, triton) at 5/8."""
    from benchmarks.harness import suites

    net, batch = ("resnet20", 2) if args.tiny else ("resnet56", 64)
    # on CPU the Triton interpreter takes seconds per ResNet step: the training step leaves it out there
    cands = ["SGD fused", "C-SGD native"] + (["C-SGD triton"] if args.device.startswith("cuda") else [])
    rows = suites.train_section(None, args.device, net, 0.625, batch=batch, candidates=cands, rounds=args.rounds,
                                min_rounds=min(args.rounds, 5), budget_s=args.pool_budget_s,
                                min_sample_s=args.min_sample_ms / 1e3 * 5, errors={})
    for r in _ms(rows):
        if "error" not in r:
            log(f"[train] {net} batch {batch} {r['candidate']}: {r['median_ms']:.3f} ms  x{r['vs_fused']:.3f}")
    return rows


def latency_section(args, log) -> List[dict]:
    """Inference latency, merged against unmerged: ResNet-50 (70 % of each bottleneck's conv1/conv2) and
    ResNet-56 (5/8), batch 1 and 64, channels_last, eval + inference_mode, eager and CUDA graph."""
    import torch

    from benchmarks.harness import suites

    cases = [("resnet20", 0.625, (1, 2))] if args.tiny else [("resnet56", 0.625, (1, 64)), ("resnet50", 0.7, (1, 64))]
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    return _ms(suites.latency_section(None, args.device, False, cases=cases, modes=("eager", "graph"),
                                      channels_last=True, rounds=args.rounds, min_rounds=min(args.rounds, 5),
                                      budget_s=args.pool_budget_s, min_sample_s=args.min_sample_ms / 1e3,
                                      errors={}, log=log))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny parameter set and models (for CPU dry runs)")
    ap.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny, few rounds")
    ap.add_argument("--out", default=None, help="output folder for bench.json / bench.md (default $OUT/bench "
                                                "or ./gpu_out/bench)")
    ap.add_argument("--sections", default="step", help="comma list of step,train,latency (default step)")
    ap.add_argument("--nets", default="resnet50,resnet56")
    ap.add_argument("--keeps", default="0.625,1.0,0.5", help="clusterings, in priority order")
    ap.add_argument("--contenders", default="sgd-fused,csgd-native,csgd-triton")
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--rounds", type=int, default=25, help="timed samples per contender (median)")
    ap.add_argument("--min-sample-ms", type=float, default=2.0, help="each sample batches calls up to this")
    ap.add_argument("--budget-s", type=float, default=180.0, help="step section: no new workload after this")
    ap.add_argument("--pool-budget-s", type=float, default=6.0, help="timing rounds of one pool stop after this")
    ap.add_argument("--copy-numel", type=int, default=1 << 28)
    ap.add_argument("--no-predict", dest="predict", action="store_false", help="skip the performance model")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
        args.rounds = min(args.rounds, 2)
        args.min_sample_ms = 0.0
        args.keeps = "0.625"  # every code path (targets() is unit-tested); the interpreted Triton step is slow
    args.nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    args.keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(args.sections) - {"step", "train", "latency"}
    if bad:
        ap.error(f"unknown sections {sorted(bad)}")
    if args.out is None:
        args.out = os.path.join(os.environ.get("OUT") or "gpu_out", "bench")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" or (args.device is None and os.environ.get("CUDA_VISIBLE_DEVICES") == ""):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"
    cuda = args.device.startswith("cuda")
    if not cuda:
        args.tiny = True  # full-size sets on CPU are run.py's business
        torch.set_num_threads(1)
        args.copy_numel = min(args.copy_numel, 1 << 20)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    try:
        import triton  # noqa: F401  (its version only; the package imports it lazily)
    except Exception:  # noqa: BLE001 - the Triton contender then reports why it cannot run
        pass

    meta = {"device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": getattr(sys.modules.get("triton"), "__version__", None), "python": platform.python_version(),
            "command": "python3 benchmarks/step/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        meta.update(device_name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    sm_count=props.multi_processor_count,
                    l2_bytes=int(getattr(props, "L2_cache_size", 0) or 60 * 2 ** 20))
    else:
        meta.update(device_name="CPU (dry run: tiny sizes, perf_counter timing, graph mode emulated by plain "
                                "calls; the numbers mean nothing)", l2_bytes=1 << 20,
                    note="no CUDA: code paths exercised only")
    from benchmarks.step.gpu_step import step_section
    from benchmarks.harness.machine import copy_bandwidth, copy_bytes_per_element

    bw = copy_bandwidth(args.copy_numel, repeats=15, device=args.device)
    meta.update(copy_gbs=bw, copy_numel=args.copy_numel, copy_bytes_per_element=copy_bytes_per_element(args.device))
    log(f"[copy] {bw:.1f} GB/s ({args.copy_numel:,} fp32 elements, read + write)")
    res = {"meta": meta, "step": [], "targets": [], "train": [], "latency": [], "errors": {}}

    def save():
        res["seconds"] = time.perf_counter() - t0
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(build_markdown(res) + "\n")

    rc = 0
    def pool_done(rows):
        res.update(step=rows, targets=targets(rows))
        save()

    for section, fn in (("step", lambda: step_section(args, bw, meta["l2_bytes"], log, meta, pool_done)),
                        ("train", lambda: train_section(args, log)),
                        ("latency", lambda: latency_section(args, log))):
        if section not in args.sections:
            continue
        try:
            res[section] = fn()
        except Exception as e:  # noqa: BLE001 - one section's failure does not lose the others
            res["errors"][section] = traceback.format_exc()
            log(f"[{section}] FAILED: {type(e).__name__}: {e}")
            rc = 1
        if section == "step":
            res["targets"] = targets(res["step"])
        save()
    if any("error" in r and not r["error"].startswith("not run") for r in res["step"]):
        rc = rc or 3  # some contender failed (reported in the table)
    if any("error" in r for r in res["train"] + res["latency"]):
        rc = rc or 5  # a model could not be trained, planned or merged (e.g. torch-pruning missing): not a pass
    if meta.get("broken_by"):
        rc = 4  # gpu_check.sh reruns without this contender
        print(f"CUDA_BROKEN_BY={meta['broken_by']}")
    print()
    print(short_table(res))
    print(f"wrote {os.path.join(args.out, 'bench.json')} and bench.md in {time.perf_counter() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
