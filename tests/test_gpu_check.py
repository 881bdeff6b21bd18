"""The one-shot GPU check and its scripts, exercised on the CPU so that a broken script fails CI.

* ``bash benchmarks/step/gpu_check.sh --dry-run OUTDIR`` runs every step in its CPU mode and prints the table last;
* a GPU run killed from outside still leaves the archive and summary of the steps it finished;
* ``benchmarks/step/host_overhead.py`` really routes ``CSGD.step`` through its stub op (calls counted), and its
  figures are positive and finite (no timing assertion);
* ``benchmarks/step/gpu_bench.py``'s target verdicts flip at their limits, and its capture falls back on CPU.
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import csgd_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STEPS = ["facts", "build", "build_check", "tests_gpu", "bench", "host_overhead", "small_step", "memcheck_native",
         "racecheck_native", "memcheck_triton", "bench_extra", "triton_suite"]
PASSED = {"facts", "build", "build_check", "tests_gpu", "bench", "host_overhead", "small_step"}
needs_native = pytest.mark.skipif(csgd_ext.available_backends()["native"] is not None,
                                  reason="needs the native backend")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
@needs_native
def test_gpu_check_dry_run_reports_every_step(tmp_path):
    out = tmp_path / "gpu_out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "step", "gpu_check.sh"), str(out), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    # the table is printed last: its header, one line per step, then the paths
    lines = proc.stdout.rstrip().splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("=== GPU check (DRY RUN"))
    table = lines[head + 1:]
    assert table[0].split()[:3] == ["step", "status", "secs"]
    assert [line.split()[0] for line in table[1:-1]] == STEPS
    assert table[-1].startswith("summary: ")
    status = {line.split()[0]: line.split()[1] for line in table[1:-1]}
    assert {s for s, v in status.items() if v == "PASS"} == PASSED
    assert all(v == "SKIP" for s, v in status.items() if s not in PASSED)
    # OUTDIR gets three files (the device tool brings back only a handful): the archive holds every log
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "results.json", "summary.md"]
    res = json.loads((out / "results.json").read_text())
    assert res["dry_run"] is True and res["ok"] is True
    assert res["cuda_bitwise_fused_sgd"] == "not run (dry run)"
    assert res["partial"] is False
    assert [r["step"] for r in res["steps"]] == STEPS
    md = (out / "summary.md").read_text()
    assert "DRY RUN" in md and all(f"| {s} |" in md for s in STEPS)
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    out = tmp_path / "x"
    for s in STEPS:
        assert (out / f"{s}.log").exists(), s
    # the device's setup: torch-pruning hidden, the carried wheel used, every GPU test still collected
    assert "using the carried wheel torch_pruning-" in (out / "gpu_check.log").read_text()
    collected = (out / "tests_gpu.log").read_text()
    n = int(collected.split(" gpu tests collected without torch-pruning")[0].split()[-1].split("/")[0])
    assert f"{n}/{n} gpu tests collected without torch-pruning" in collected and n >= 20
    # what each step really did (not an echo)
    assert "gpu_check.sh: syntax ok" in (out / "facts.log").read_text()
    assert json.loads((out / "facts.json").read_text())["torch"] == torch.__version__
    assert json.loads((out / "build_check.json").read_text())["native_ok"] is True
    small = (out / "small_step.log").read_text()
    assert "native on cpu: OK" in small and "triton on cpu: OK" in small
    bench = json.loads((out / "bench" / "bench.json").read_text())
    contenders = {(r["contender"], r["mode"]) for r in bench["step"] if "median_us" in r}
    assert contenders == {(c, m) for c in ("SGD fused", "C-SGD native", "C-SGD triton") for m in ("eager", "graph")}
    assert bench["train"] and bench["latency"] and bench["targets"]
    assert not any("error" in r for r in bench["train"] + bench["latency"])  # planning ran (the carried wheel)
    host = json.loads((out / "host_overhead.json").read_text())
    assert host["stub_calls"] == host["steps"] and host["finite"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_run_killed_from_outside_still_leaves_its_results(tmp_path):
    """A GPU run (no --dry-run; here on the CPU) refreshes OUTDIR after every step: killed with SIGKILL after its
    first steps, as the device command's limit would, OUTDIR holds the archive of the steps done so far and a
    summary marked partial."""
    import signal
    import time

    out = tmp_path / "gpu_out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))  # the scratch directory under tmp_path too
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "benchmarks", "step", "gpu_check.sh"), str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "gpu_check.tar.gz").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert (out / "gpu_check.tar.gz").exists(), "no archive after 120 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run, mid-step
        proc.wait()
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "results.json", "summary.md"]
    res = json.loads((out / "results.json").read_text())
    assert res["partial"] is True and res["dry_run"] is False and res["steps"][0]["step"] == "facts"
    assert "(PARTIAL: written after step " in (out / "summary.md").read_text()
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "./facts.log" in names and "./facts.json" in names and "./steps.tsv" in names


@pytest.mark.parametrize("elf, rc", [("ELF file 1: _C.1.sm_90.cubin", 0),
                                      ("ELF file 1: _C.1.sm_80.cubin\nELF file 2: _C.2.sm_90.cubin", 1)])
def test_build_check_fails_unless_built_for_the_device_alone(tmp_path, monkeypatch, elf, rc):
    """On the GPU, build_check reads the extension's cubins (cuobjdump) and fails unless they are the device's
    architecture alone (sm_90 on an H200): CUDA, cuobjdump and the extension are stood in for here."""
    from benchmarks.step import gpu_report

    if not glob.glob(os.path.join(ROOT, "csgd_ext", "_C*.so")):
        monkeypatch.setattr(gpu_report.glob, "glob", lambda pattern: ["/x/_C.so"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(csgd_ext, "available_backends", lambda device=None: {"native": None, "triton": None})
    monkeypatch.setattr(gpu_report, "find_tool", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(gpu_report, "_run", lambda cmd, timeout=30: elf if cmd[1] == "--list-elf" else "")
    assert gpu_report.build_check(str(tmp_path)) == rc
    res = json.loads((tmp_path / "build_check.json").read_text())
    assert res["device_arch"] == "sm_90" and res["only_device_arch"] is (rc == 0)


def test_gpu_run_orders_steps_by_value_within_one_device_command():
    """The GPU branch of gpu_check.sh runs build, tests, the step benchmark and host overhead before the small
    step and the sanitizers, then the optional steps; its default budget, plus a step's 10 s kill grace and the
    summary, fits one 600 s device command."""
    import re

    text = open(os.path.join(ROOT, "benchmarks", "step", "gpu_check.sh")).read()
    gpu = text[text.index('\nelse\n  say "gpu_check.sh: output in'):text.index("# ---- g. summary")]
    order = []
    for name in re.findall(r"(?:run_step|skip_step) (\w+)", gpu):
        if name not in order:
            order.append(name)
    assert order == ["facts", "build", "build_pip", "build_check", "tests_gpu", "bench", "bench_retry",
                     "host_overhead", "small_step", "memcheck_native", "racecheck_native", "memcheck_triton",
                     "bench_extra", "triton_suite"]
    assert '"$PY" benchmarks/step/gpu_small_step.py --backend native,triton\n' in gpu  # no sanitizer, both backends
    budget = int(re.search(r'BUDGET="\$\{GPU_CHECK_BUDGET_S:-(\d+)\}"', text).group(1))
    assert 400 <= budget <= 600 - 60


@needs_native
def test_host_overhead_stub_is_called_and_numbers_are_finite(one_thread):
    from benchmarks.step import host_overhead

    r = host_overhead.measure("resnet20", keep=0.625, steps=5, warmup=1, sgd=True)
    # the op was swapped: every timed CSGD.step called the stub once (fp32 only: one op call per step)
    assert r["stub_calls"] == 5 and r["op_calls_per_step"] == 1
    assert r["python_noop_calls"] == 5
    assert r["op_list_len"] == r["tensors"] > 0
    for k, v in r.items():
        if k.endswith("_us"):
            assert math.isfinite(v) and v > 0, (k, v)
    # the package's op is restored afterwards
    assert torch.ops.csgd_ext.csgd_step_ is not host_overhead.stub_op()
    assert "csgd_step_" in str(torch.ops.csgd_ext.csgd_step_.default._schema)
    assert "target" in host_overhead.report(r)


def test_gpu_bench_target_verdicts_flip_at_the_limits():
    from benchmarks.step import gpu_bench

    def row(clusters, contender, vs_fused, pct):
        return {"net": "resnet50", "clusters": clusters, "contender": contender, "mode": "graph",
                "vs_fused": vs_fused, "pct_copy": pct}

    ok = gpu_bench.targets([row("5/8", "C-SGD native", 1.10, 80.0), row("singletons", "C-SGD triton", 1.03, 99.0),
                            row("5/8", "SGD fused", 1.0, 90.0), row("1/2", "C-SGD native", 2.0, 10.0)])
    assert [t["verdict"] for t in ok] == ["met", "met", "met"]
    bad = gpu_bench.targets([row("5/8", "C-SGD native", 1.11, 79.9), row("singletons", "C-SGD triton", 1.04, 99.0)])
    assert [t["verdict"] for t in bad] == ["MISSED", "MISSED", "MISSED"]
    err = gpu_bench.targets([{"net": "resnet50", "clusters": "5/8", "contender": "C-SGD triton", "mode": "graph",
                              "error": "capture failed: boom"}])
    assert all(t["verdict"].startswith("not measured: capture failed") for t in err)


def test_gpu_bench_capture_and_prediction_never_raise():
    from benchmarks.harness import timing
    from benchmarks.step import gpu_step

    calls = []
    replay = timing.capture_step(lambda: calls.append(1), "cpu", warmup=2)
    replay()
    assert len(calls) == 3  # CPU: graph mode emulated by plain calls
    us, detail = gpu_step.predict([torch.zeros(3, 2)], [None], "native", 100.0)
    assert us is None or us > 0
    assert isinstance(detail, dict)


@needs_native
def test_gpu_bench_hands_over_its_rows_after_every_pool(one_thread):
    """main() saves bench.json after every pool of the step section, so a bench step killed at its limit keeps
    the pools it finished."""
    from benchmarks.step import gpu_bench, gpu_step

    args = gpu_bench.parse_args(["--dry-run", "--contenders", "sgd-fused,csgd-native", "--rounds", "2"])
    args.keeps = [0.625, 1.0]  # two pools
    seen = []
    rows = gpu_step.step_section(args, 50.0, 1 << 20, lambda msg: None, {},
                                 on_pool=lambda r: seen.append([x["clusters"] for x in r]))
    assert seen == [["5/8"] * 4, ["5/8"] * 4 + ["singletons"] * 4]
    assert len(rows) == 8 and all("median_us" in r for r in rows)


@needs_native
def test_gpu_bench_fails_when_a_model_cannot_be_planned(tmp_path):
    """Without torch-pruning (and without the carried wheel) the latency section cannot plan: the benchmark
    reports the error rows and exits non-zero, instead of passing with them."""
    hide = tmp_path / "hide" / "torch_pruning"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text('raise ImportError("hidden by the test")\n')
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "hide"), ROOT])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step", "gpu_bench.py"), "--dry-run",
                           "--sections", "latency", "--rounds", "3", "--out", str(tmp_path / "b")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["latency"]
    assert rows and all("ImportError: hidden by the test" in r.get("error", "") for r in rows)


def test_summary_says_whether_cuda_equals_fused_sgd_bitwise(tmp_path, capsys):
    """yes / no (with the first line of each failure) from tests_gpu's junit XML; from ``pytest -v``'s lines when
    pytest was killed before writing it; "not run" when the test never ran. In results.json, summary.md, the
    tests_gpu row and the printed table's title."""
    from benchmarks.step import gpu_report

    case = '<testcase classname="tests.test_gpu" name="test_cuda_without_clusters_is_fused_sgd_bitwise[{}]"{}'
    failure = '><failure message="AssertionError: 3/20 flag combinations differ&#10;more">tb</failure></testcase>'
    out = tmp_path / "o"
    out.mkdir()
    (out / "steps.tsv").write_text("tests_gpu\tPASS\t12.0\t0\ttests_gpu.log\t\n")
    for fail, want in ((False, "yes"), (True, "no (torch.float64: 3/20 flag combinations differ)")):
        (out / "tests_gpu.xml").write_text('<testsuites><testsuite tests="2" failures="%d" errors="0" skipped="0">'
                                           % fail + case.format("torch.float32", "/>")
                                           + case.format("torch.float64", failure if fail else "/>")
                                           + "</testsuite></testsuites>")
        assert gpu_report._junit(str(out / "tests_gpu.xml"))["cuda_bitwise_fused_sgd"] == want[:3].strip()
        assert gpu_report.summary(str(out)) == 0
        assert json.loads((out / "results.json").read_text())["cuda_bitwise_fused_sgd"] == want
        assert f"CUDA bitwise = torch fused SGD: {want}" in (out / "summary.md").read_text()
        printed = capsys.readouterr().out
        assert f"CUDA bitwise = torch fused SGD: {want}" in printed.split("=== GPU check")[1].splitlines()[0]
        assert f"CUDA bitwise = torch fused SGD: {want}" in [x for x in printed.splitlines()
                                                             if x.startswith("tests_gpu")][0]
    # pytest killed at its limit: no XML, the -v lines decide
    (out / "tests_gpu.xml").unlink()
    line = "tests/test_gpu.py::test_cuda_without_clusters_is_fused_sgd_bitwise[torch.{}] {}\n"
    for lines, want in (([("float32", "PASSED"), ("float64", "PASSED")], "yes"),
                        ([("float32", "PASSED"), ("float64", "FAILED")], "no"),
                        ([("float32", "PASSED")], "not run"), ([], "not run")):
        (out / "tests_gpu.log").write_text("".join(line.format(d, v) for d, v in lines))
        assert gpu_report.bitwise_verdict(str(out), dry=False) == want
    assert gpu_report.bitwise_verdict(str(out), dry=True) == "not run (dry run)"
