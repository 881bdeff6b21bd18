"""Helpers of ``benchmarks/step/gpu_check.sh``: device facts, the post-build check, and the final summary.

    python3 benchmarks/step/gpu_report.py facts OUTDIR        # facts.json (+ printed): versions, device, SMs, arch
    python3 benchmarks/step/gpu_report.py build-check OUTDIR  # build_check.json: is the native CUDA kernel there?
    python3 benchmarks/step/gpu_report.py summary OUTDIR      # summary.md, results.json, the table (printed last)
    python3 benchmarks/step/gpu_report.py collect-gpu-tests OUTDIR  # dry run: GPU tests collect without torch-pruning

``summary`` reads only files (``steps.tsv`` written by gpu_check.sh, the logs, junit XML, ``bench/bench.json``,
``host_overhead.json``) and imports nothing heavy, so it runs even when torch does not.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _run(cmd, timeout=30):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"({type(e).__name__}: {e})"


def find_tool(name: str):
    """``name`` on PATH, else under CUDA_HOME / /usr/local/cuda."""
    hit = shutil.which(name)
    if hit:
        return hit
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "bin", name)):
            return os.path.join(base, "bin", name)
    return None


def runtime() -> str:
    """``gvisor`` (kernel 4.4.0, as gVisor reports), ``firecracker`` (an -fc- kernel) or ``other``."""
    rel = platform.release()
    if rel.startswith("4.4.0"):
        return "gvisor"
    if "-fc-" in rel or "firecracker" in rel.lower():
        return "firecracker"
    return "other"


def facts(outdir: str) -> int:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "kernel": platform.release(),
            "runtime": runtime(), "nproc": os.cpu_count()}
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            cap = torch.cuda.get_device_capability(0)
            info.update(device_name=p.name, capability=f"{cap[0]}.{cap[1]}", arch=f"{cap[0]}.{cap[1]}",
                        sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                        l2_bytes=getattr(p, "L2_cache_size", None), device_count=torch.cuda.device_count())
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton_error"] = f"{type(e).__name__}: {e}"
    for tool in ("nvcc", "compute-sanitizer", "cuobjdump", "nvidia-smi", "ninja"):
        path = find_tool(tool)
        info[f"{tool}_path"] = path
        if path and tool in ("nvcc", "compute-sanitizer"):
            out = _run([path, "--version"])
            info[f"{tool}_version"] = (out.splitlines() or ["?"])[-1]
    with open(os.path.join(outdir, "facts.json"), "w") as f:
        json.dump(info, f, indent=1)
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return f"({type(e).__name__}: {e})"


def build_check(outdir: str) -> int:
    """Exit 0 when the native backend runs on the device (CUDA when present, else CPU: dry run)."""
    sys.path.insert(0, ROOT)
    import torch

    import csgd_ext
    from csgd_ext.optim.ops import native

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"device": dev, "csgd_ext_file": csgd_ext.__file__,
           "available_backends": {d: csgd_ext.available_backends(d) for d in ("cpu", dev)},
           "build_info": _safe(native.build_info),
           "extension": sorted(glob.glob(os.path.join(ROOT, "csgd_ext", "_C*.so")))}
    res["native_ok"] = res["available_backends"][dev]["native"] is None
    cuobjdump = find_tool("cuobjdump")
    if dev == "cuda" and cuobjdump and res["extension"]:
        elf = _run([cuobjdump, "--list-elf", res["extension"][-1]], timeout=60)
        res["cubins"] = sorted(set(re.findall(r"sm_\d+a?", elf)))
        res["device_arch"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
        res["only_device_arch"] = res["cubins"] == [res["device_arch"]]  # built for this GPU alone (sm_90)
    with open(os.path.join(outdir, "build_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    print(f"native backend on {dev}: " + ("available" if res["native_ok"] else
                                         f"UNAVAILABLE: {res['available_backends'][dev]['native']}"))
    if "only_device_arch" in res:
        print(f"cubins {res['cubins']}: " + ("the device's architecture only" if res["only_device_arch"] else
                                             f"NOT only the device's {res['device_arch']}"))
    return 0 if res["native_ok"] and res.get("only_device_arch", True) else 1


# ------------------------------------------------------------------------------------------ summary ----
def _read(path, limit=2_000_000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:]
    except OSError:
        return ""


def _json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


BITWISE_TEST = "test_cuda_without_clusters_is_fused_sgd_bitwise"


def _first_line(case, elem) -> str:
    """``dtype: first line of the failure message`` of one parametrized testcase."""
    param = re.sub(r"^.*\[(.*)\]$", r"\1", case.get("name", ""))
    line = ((elem.get("message") or elem.tag).splitlines() or [elem.tag])[0]
    return f"{param}: {line.removeprefix('AssertionError: ')[:160]}"


def _junit(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    tot["failed_tests"] = failed
    # issue #20's promise on CUDA: unclustered CSGD = torch's CUDA fused SGD, bit for bit
    bitwise = [c for s in suites for c in s.iter("testcase") if c.get("name", "").startswith(BITWISE_TEST)]
    if bitwise:
        bad = [(c, e) for c in bitwise for k in ("failure", "error", "skipped") for e in c.findall(k)]
        tot["cuda_bitwise_fused_sgd"] = "no" if bad else "yes"
        # the first line of each failure: which dtype, how many flag combinations differ
        tot["cuda_bitwise_detail"] = "; ".join(_first_line(c, e) for c, e in bad)
    return tot


def _bitwise_from_log(log: str) -> str:
    """yes/no from ``pytest -v`` lines when the junit XML is missing (pytest was killed at its time limit)."""
    got = dict(re.findall(BITWISE_TEST + r"\[(\S+)\] (PASSED|FAILED|ERROR|SKIPPED)", log))
    if any(v != "PASSED" for v in got.values()):
        return "no"
    return "yes" if set(got) >= {"torch.float32", "torch.float64"} else "not run"


def bitwise_verdict(outdir: str, dry: bool) -> str:
    """Whether unclustered CUDA CSGD equalled torch's CUDA fused SGD bit for bit in tests_gpu: yes, no (with the
    first line of each failure), or not run."""
    if dry:
        return "not run (dry run)"
    j = _junit(os.path.join(outdir, "tests_gpu.xml")) or {}
    if "cuda_bitwise_fused_sgd" in j:
        return j["cuda_bitwise_fused_sgd"] + (f" ({j['cuda_bitwise_detail']})" if j.get("cuda_bitwise_detail") else "")
    return _bitwise_from_log(_read(os.path.join(outdir, "tests_gpu.log")))


def _pytest_line(log: str) -> str:
    m = re.findall(r"^=+ (.*(?:passed|failed|error|skipped|deselected|collected|no tests ran).*?) =+$", log, re.M)
    if m:
        return m[-1]
    m = re.findall(r"^(\d+(?:/\d+)? tests? collected.*)$", log, re.M)
    return m[-1] if m else ""


def _key(name: str, outdir: str, log: str, status: str, dry: bool) -> tuple:
    """``(key numbers as text, details dict)`` of one step."""
    d: dict = {}
    if name == "facts":
        f = _json(os.path.join(outdir, "facts.json")) or {}
        d = f
        if f.get("device_name"):
            return (f"{f['device_name']}, sm_{f.get('arch', '?').replace('.', '')}, {f.get('sm_count')} SMs, "
                    f"torch {f.get('torch')}, triton {f.get('triton')}, {f.get('runtime')}"), d
        return f"no CUDA device; torch {f.get('torch')}, triton {f.get('triton')}, runtime {f.get('runtime')}", d
    if name == "build":
        if dry:
            return "-", d
        return ("compiled" if status == "PASS" else "see build.log"), d
    if name == "build_check":
        b = _json(os.path.join(outdir, "build_check.json")) or {}
        d = b
        if not b:
            return "no build_check.json", d
        why = b["available_backends"][b["device"]]["native"]
        cub = (f", cubins {','.join(b.get('cubins', []))}" + ("" if b.get("only_device_arch", True) else
                                                              f" (NOT only {b.get('device_arch')})")
               if b.get("cubins") else "")
        return f"native on {b['device']}: {'available' if why is None else 'UNAVAILABLE'}{cub}", d
    if name.startswith("tests") or name == "triton_suite":
        j = _junit(os.path.join(outdir, f"{name}.xml"))
        if j:
            d = j
            failed = f"; failed: {', '.join(j['failed_tests'][:4])}" if j["failed_tests"] else ""
            bitwise = f"; CUDA bitwise = torch fused SGD: {bitwise_verdict(outdir, dry)}" if name == "tests_gpu" else ""
            return (f"{j['passed']} passed, {j['failures'] + j['errors']} failed, {j['skipped']} skipped"
                    f"{bitwise}{failed}"), d
        return _pytest_line(log) or "-", d
    if name.startswith(("memcheck", "racecheck")) or name == "small_step":
        errs = re.findall(r"ERROR SUMMARY: (\d+) error", log)
        step = re.findall(r"gpu_small_step: (\S+ on \S+): (OK|MISMATCH|SKIP)", log)
        parts = []
        if errs:
            parts.append(f"sanitizer: {errs[-1]} errors")
            d["sanitizer_errors"] = int(errs[-1])
        if "Device not supported" in log:
            parts.append("sanitizer refused the device")
        parts += [f"{a}: {b}" for a, b in step]
        return "; ".join(parts) or "-", d
    if name.startswith("bench"):
        sub = name
        b = _json(os.path.join(outdir, sub, "bench.json"))
        if not b:
            return "no bench.json", d
        d = {"copy_gbs": b["meta"].get("copy_gbs"), "targets": b.get("targets", [])}
        parts = [f"copy {b['meta'].get('copy_gbs', 0):.0f} GB/s"]
        for r in b.get("step", []):
            if r["clusters"] == "5/8" and r["contender"].startswith("C-SGD") and r["net"] in ("resnet50", "tiny"):
                parts.append(f"{r['contender'][6:]} {r['mode']} " + (f"{r['vs_fused']:.2f}x" if r.get("vs_fused")
                                                                       else "err"))
        t = b.get("targets", [])
        if t:
            parts.append(f"targets {sum(x['verdict'] == 'met' for x in t)}/{len(t)} met")
        for r in b.get("train", []):
            if r.get("vs_fused") and r["candidate"].startswith("C-SGD"):
                parts.append(f"train {r['candidate'][6:]} {r['vs_fused']:.2f}x")
        for r in b.get("latency", []):
            if r.get("eager_speedup"):
                parts.append(f"{r['net']} b{r['batch']} merged {r['eager_speedup']:.2f}x")
        return ", ".join(parts[:9]), d
    if name == "host_overhead":
        h = _json(os.path.join(outdir, "host_overhead.json"))
        if not h:
            return "-", d
        d = h
        return (f"CSGD.step host {h['csgd_stub_us']:.0f} us stub / ~{h.get('estimated_compiled_us', 0):.0f} us "
                f"compiled op ({h['net']}, target <= {h['target_us']:.0f}: "
                f"{'met' if h['meets_target'] else 'missed'}), python-only {h['csgd_python_only_us']:.0f} us, "
                f"fused SGD python {h.get('sgd_fused_python_only_us', float('nan')):.0f} us"), d
    return "-", d


#: the order of the table (a dry run finishes its steps in any order)
ORDER = ["facts", "build", "build_pip", "build_check", "tests_gpu", "bench", "bench_retry", "host_overhead",
         "small_step", "memcheck_native", "racecheck_native", "memcheck_triton", "bench_extra", "triton_suite"]


def summary(outdir: str) -> int:
    rows = []
    path = os.path.join(outdir, "steps.tsv")
    dry = os.path.exists(os.path.join(outdir, "DRY_RUN"))
    for line in _read(path).splitlines():
        parts = line.split("\t")
        if len(parts) < 5:
            continue
        name, status, secs, rc, logname = parts[:5]
        note = parts[5] if len(parts) > 5 else ""
        log = _read(os.path.join(outdir, logname))
        if status == "FAIL" and name.startswith(("memcheck", "racecheck")) and "Device not supported" in log:
            status, note = "SKIP", "compute-sanitizer: Device not supported (gVisor?)"
        key, detail = ("-", {}) if status == "SKIP" else _key(name, outdir, log, status, dry)
        if note:
            key = f"{note}; {key}" if key != "-" else note
        rows.append({"step": name, "status": status, "seconds": float(secs or 0), "rc": rc, "log": logname,
                     "key": key, "detail": detail})
    last = rows[-1]["step"] if rows else "-"  # the step that ran last (the table is in ORDER)
    rows.sort(key=lambda r: ORDER.index(r["step"]) if r["step"] in ORDER else len(ORDER))
    total = sum(r["seconds"] for r in rows)
    wall = float(os.environ.get("GPU_CHECK_WALL_S") or total)
    facts_ = _json(os.path.join(outdir, "facts.json")) or {}
    final = os.environ.get("GPU_CHECK_FINAL") or outdir  # where gpu_check.sh puts summary, results, archive
    bitwise = bitwise_verdict(outdir, dry)
    res = {"dry_run": dry, "outdir": os.path.abspath(final), "step_seconds": total, "wall_seconds": wall,
           "partial": bool(os.environ.get("GPU_CHECK_PARTIAL")), "cuda_bitwise_fused_sgd": bitwise, "facts": facts_,
           "steps": rows, "ok": all(r["status"] in ("PASS", "SKIP") for r in rows)}
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    title = "GPU check" + (" (DRY RUN on CPU: steps checked, nothing measured on a GPU)" if dry else
                           f" on {facts_.get('device_name', 'no GPU')}")
    if res["partial"]:
        title += f" (PARTIAL: written after step {last}; the run did not finish)"
    md = [f"# {title}", "", f"Output folder: `{res['outdir']}` (every log in `gpu_check.tar.gz`); {wall:.0f} s wall "
          f"clock (steps {total:.0f} s).", "", f"CUDA bitwise = torch fused SGD: {bitwise}", "",
          "| step | status | seconds | key numbers | log |", "|---|---|---|---|---|"]
    md += [f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | {r['key'].replace('|', '/')} | {r['log']} |"
           for r in rows]
    bench_md = os.path.join(outdir, "bench", "bench.md")
    if os.path.exists(bench_md):
        md += ["", "Benchmark tables: `bench/bench.md` (and `bench_extra/bench.md` when run) in the archive."]
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    # the table, printed last
    w = max([len(r["step"]) for r in rows] + [4])
    print()
    print(f"=== {title}: {sum(r['status'] == 'PASS' for r in rows)}/{len(rows)} steps passed, "
          f"{sum(r['status'] == 'SKIP' for r in rows)} skipped, {wall:.0f} s; CUDA bitwise = torch fused SGD: "
          f"{bitwise[:120]} ===")
    print(f"{'step':<{w}}  {'status':<7}  {'secs':>6}  key numbers")
    for r in rows:
        print(f"{r['step']:<{w}}  {r['status']:<7}  {r['seconds']:6.1f}  {r['key'][:150]}")
    print(f"summary: {os.path.join(res['outdir'], 'summary.md')}  results: {os.path.join(res['outdir'], 'results.json')}"
          f"  archive: {os.path.join(res['outdir'], 'gpu_check.tar.gz')}")
    return 0 if res["ok"] else 1


def _collect(env) -> tuple:
    """``(count, pytest's last line, return code)`` of ``pytest -m gpu tests --collect-only`` under ``env``."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests", "--collect-only", "-q",
                        "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    m = re.findall(r"^(\d+)(?:/\d+)? tests? collected", r.stdout, re.M)
    return (int(m[-1]) if m else -1), (r.stdout.strip().splitlines() or [""])[-1], r.returncode


def collect_gpu_tests(outdir: str) -> int:
    """Dry run: the GPU tests collected in this environment (torch-pruning hidden, as on the lent machine) must
    be every GPU test: as many as with torch-pruning importable (this machine's, or the carried wheel)."""
    n_hidden, line, rc = _collect(dict(os.environ))
    print(f"without torch-pruning: {line}")
    env = dict(os.environ)
    wheels = sorted(glob.glob(os.path.join(HERE, "wheels", "torch_pruning-*.whl")))
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and "hidden_pkgs" not in p]
    env["PYTHONPATH"] = os.pathsep.join(wheels[-1:] + parts)
    n_all, line_all, rc_all = _collect(env)
    print(f"with torch-pruning: {line_all}")
    print(f"{n_hidden}/{n_all} gpu tests collected without torch-pruning")
    return 0 if rc == rc_all == 0 and n_hidden == n_all > 0 else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmds = {"facts": facts, "build-check": build_check, "summary": summary, "collect-gpu-tests": collect_gpu_tests}
    if len(argv) != 2 or argv[0] not in cmds:
        print(__doc__)
        return 2
    cmd, outdir = argv
    os.makedirs(outdir, exist_ok=True)
    return cmds[cmd](outdir)


if __name__ == "__main__":
    sys.exit(main())
