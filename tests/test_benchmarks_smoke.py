"""The benchmarks' shared baselines and report generation (what is timed is tested).

* ``benchmarks.harness.baselines.DenseCSGD`` (the official dense merge-matrix C-SGD + ``torch.optim.SGD``) equals
  ``csgd_ext.CSGD`` over several steps, parameters and momentum buffers;
* the timing helper interleaves and caps; the target verdicts flip at their limits;
* ``benchmarks/step/run.py --smoke`` exercises every section and the table generation without writing RESULTS.md;
* ``benchmarks/step/access_order.py`` times every layout it names.
"""

import os
import sys

import pytest
import torch

import csgd_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.harness import report
from benchmarks.step import run  # noqa: E402
from benchmarks.harness.baselines import DenseCSGD, dense_matrices, sgd  # noqa: E402
from benchmarks.harness.timing import interleave  # noqa: E402
from benchmarks.harness.workloads import make_ids, param_set, state_bytes, make_optimizer  # noqa: E402

HPS = [dict(momentum=0.9, nesterov=True, weight_decay=1e-4, centripetal=3e-2),
       dict(momentum=0.9, nesterov=False, weight_decay=5e-4, centripetal=1e-1),
       dict(momentum=0.0, nesterov=False, weight_decay=0.0, centripetal=5e-2)]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 3, 3, 3), (12,), (12,), (8, 12, 1, 1), (5, 8)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ids = {0: torch.tensor([0, 1, 0, 2, 2, 2, 3, 1, 0, 4, 4, 5]), 3: make_ids(8, 0.5, gen)}
    ids[1] = ids[2] = ids[0]
    return ps, ids


@pytest.mark.parametrize("hp", HPS, ids=["nesterov", "momentum", "plain"])
def test_dense_official_equals_csgd(backend, hp):
    a, ids = _params()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    hp = dict(hp)
    c = hp.pop("centripetal")
    dense = DenseCSGD(a, lr=0.05, centripetal=c, clusters={a[i]: v for i, v in ids.items()}, **hp)
    ours = csgd_ext.CSGD(b, lr=0.05, centripetal=c, clusters={b[i]: v for i, v in ids.items()},
                         backend=backend, **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        dense.step()
        ours.step()
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"param {i}")
        if hp["momentum"]:
            torch.testing.assert_close(dense.sgd.state[p]["momentum_buffer"], ours.state[q]["momentum_buffer"],
                                       rtol=1e-5, atol=1e-6, msg=f"momentum buffer {i}")
    # the clustered rows really moved towards their means (the comparison is not vacuous)
    assert not torch.allclose(a[0], _params()[0][0])


def test_dense_matrices_and_misuse():
    M, D = dense_matrices(torch.tensor([3, 1, 3, 3]), weight_decay=0.1, centripetal=2.0)
    torch.testing.assert_close(M.sum(1), torch.ones(4))
    torch.testing.assert_close(M @ M, M)  # a projection onto cluster means
    torch.testing.assert_close(D, 0.1 * torch.eye(4) + 2.0 * (torch.eye(4) - M))
    with pytest.raises(TypeError, match="ids"):
        dense_matrices(torch.tensor([0.0, 1.0]), 0.0, 0.0)
    p = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="one id per row"):
        DenseCSGD([p], lr=0.1, clusters={p: torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="impl"):
        sgd([p], impl="magic", lr=0.1, momentum=0.0, weight_decay=0.0, nesterov=False)


def test_workloads_and_state_bytes():
    ws = param_set("tiny", keep=0.5)
    assert ws.numel == sum(p.numel() for p in ws.params) and ws.clusters
    for ids in ws.cluster_index.values():
        assert ids.unique().numel() == max(1, round(0.5 * ids.numel()))
    opt = make_optimizer("sgd-fused", ws.clone())
    opt.step()
    assert state_bytes(opt) == ws.numel * 4  # one momentum buffer per parameter
    dense = make_optimizer("dense", ws.clone())
    dense.step()
    assert state_bytes(dense) == ws.numel * 4 + dense.state_bytes() > ws.numel * 4


def test_interleave_alternates_and_caps():
    order = []
    cands = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    t = interleave(cands, min_rounds=4, max_rounds=4, warmup=1, min_sample_s=0.0)
    assert [len(t[k].samples) for k in "ab"] == [4, 4]
    assert order[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # start rotates each round
    t = interleave(cands, min_rounds=2, max_rounds=6, cap_s=0.0, min_sample_s=0.0)
    assert len(t["a"].samples) == 2  # capped once it had its minimum


def _rows(native_vs_fused, dense_over_native, train_ratio, speedup):
    step = [{"net": "resnet50", "candidate": "SGD fused", "median_s": 1.0, "vs_fused": 1.0},
            {"net": "resnet50", "candidate": "C-SGD native @ 5/8", "median_s": native_vs_fused,
             "vs_fused": native_vs_fused},
            {"net": "resnet50", "candidate": "dense (official) @ 5/8",
             "median_s": native_vs_fused * dense_over_native, "vs_fused": 0.0}]
    train = [{"candidate": "SGD fused", "median_s": 1.0, "batch": 64},
             {"candidate": "C-SGD native", "median_s": train_ratio, "batch": 64}]
    lat = [{"net": "resnet56", "keep": 0.625, "batch": 64, "eager_speedup": speedup, "how": "x"}]
    return step, train, lat


def test_target_verdicts_flip_at_the_limits():
    met = report.targets(*_rows(1.10, 150, 1.02, 1.8), native_reason=None)
    assert [r[2] for r in met] == ["MET"] * 4
    missed = report.targets(*_rows(1.20, 50, 1.10, 1.2), native_reason=None)
    assert [r[2] for r in missed] == ["MISSED"] * 4
    none = report.targets([], [], [], native_reason="not built")
    assert all(r[2].startswith("NOT MEASURED") for r in none)


@pytest.mark.parametrize("adjacent, verdict", [(1.12, "MISSED (met at 5/8 after `contiguous_clusters`)"),
                                               (1.18, "MISSED")])
def test_contiguous_candidate_is_reported_beside_the_verdict(adjacent, verdict):
    step, train, lat = _rows(1.20, 50, 1.02, 1.8)
    step.append({"net": "resnet50", "candidate": "C-SGD native @ 5/8 contiguous", "median_s": adjacent,
                 "vs_fused": adjacent})
    row = report.targets(step, train, lat, native_reason=None)[0]
    assert row[2] == verdict  # the verdict stays on the clusters as planned (1.20x)
    assert "5/8: 1.2x" in row[1] and "5/8 contiguous (after `contiguous_clusters`)" in row[1]


def test_run_smoke_prints_every_section_and_leaves_results_alone(capsys):
    results = os.path.join(ROOT, "benchmarks", "step", "RESULTS.md")
    before = open(results).read() if os.path.exists(results) else None
    threads = torch.get_num_threads()
    try:  # one thread: no OpenMP barrier stalls on a busy CI machine (this checks the report, not speed)
        assert run.main(["--smoke", "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for heading in ("## Targets", "## Optimizer step", "## Sweeps", "## Optimizer memory", "## Training step",
                    "## Inference latency", "copy bandwidth"):
        assert heading in out, heading
    assert "| SGD fused |" in out and "dense (official) @ 5/8" in out
    assert "C-SGD reference @ 5/8" in out and "C-SGD triton" not in out  # no interpreted Triton timings
    assert "torch threads 1" in out
    if not torch.cuda.is_available():
        assert "GPU: not run (no GPU lent)" in out
    assert (open(results).read() if os.path.exists(results) else None) == before


@pytest.mark.skipif(csgd_ext.available_backends()["native"] is not None, reason="needs the native backend")
def test_access_order_probe_times_every_layout(capsys):
    """``benchmarks/step/access_order.py`` (quoted in the README) runs the real op on every layout it names."""
    from benchmarks.step import access_order

    assert access_order.main(["--rounds", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x (" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == ["unclustered (one flat pass)", *access_order.LAYOUTS]
    assert all(r.count("x (") == 2 for r in rows)  # 1x1 and 3x3 columns


@pytest.mark.skipif(csgd_ext.available_backends()["native"] is not None, reason="needs the native backend")
def test_step_groups_times_every_group_both_ways(capsys):
    """``benchmarks/step/step_groups.py`` (quoted in benchmarks/README.md) times every group of the net, with
    the members scattered and adjacent, and the groups add up to the whole net."""
    from benchmarks.step import step_groups

    assert step_groups.main(["--net", "resnet20", "--rounds", "1"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| scattered")
            or line.startswith("| adjacent")]
    for members in ("| scattered", "| adjacent"):
        mine = {r[1]: r for r in rows if r[0] == members}
        assert set(mine) == {"unclustered", "one column (norms)", "1x1 convs", "other clustered", "all"}
        parts = [k for k in mine if k != "all"]
        assert sum(int(mine[k][2]) for k in parts) == int(mine["all"][2]) == len(param_set("resnet20", 0.625).params)
        assert all(float(r[-1].rstrip("x |")) > 0 for r in mine.values())


@pytest.mark.skipif(csgd_ext.available_backends()["native"] is not None, reason="needs the native backend")
def test_kernel_ab_compiles_two_revisions_and_times_every_case(capsys, monkeypatch):
    """``benchmarks/step/kernel_ab.py`` (quoted in benchmarks/README.md) builds HEAD's kernel and the working tree's
    into one program and reports every case, for every process, on the whole net."""
    from benchmarks.step import kernel_ab

    monkeypatch.setenv("CXXFLAGS", "-O0")  # the plumbing, not the speed: compiles in seconds
    assert kernel_ab.main(["--net", "tiny", "--processes", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    numel = sum(p.numel() for p in param_set("tiny", 0.625).params)
    for label, _, _ in kernel_ab.CASES:
        runs = [line for line in out.splitlines() if line.startswith(f"{label}, process ")]
        assert len(runs) == 2 and all(f"({numel / 1e6:.1f}M elements)" in r for r in runs)
        row = [line for line in out.splitlines() if line.startswith(f"| {label} |")]
        assert len(row) == 1 and all(float(c.split("x")[0]) > 0 for c in row[0].split(" | ")[1:])


def test_kernel_ab_refuses_a_base_with_other_shared_headers():
    """Both kernels are compiled against the working tree's csgd_math.h and csgd_cpu_kernel.h: a revision whose
    own differ is refused by name, not compiled against the wrong arithmetic."""
    from benchmarks.step import kernel_ab

    changes = kernel_ab.git("log", "--format=%H", "--", "csrc/csgd_math.h").split()
    if not changes:
        pytest.skip("needs the git history of csrc/csgd_math.h")
    older = f"{changes[0]}~1"  # before its latest change (here: before it existed)
    with pytest.raises(SystemExit, match="csrc/csgd_math.h differ"):
        kernel_ab.kernel_at(older)
    assert "namespace CSGD_CPU_NS" in kernel_ab.kernel_at("HEAD")


def test_kernel_ab_compiles_the_kernel_for_the_extensions_target():
    """kernel_ab.cpp must compile the kernel as csrc/csgd_cpu_avx2.cpp does: the target pragma decides the vector
    width of the compiler's own loops, which moved the flat step by 7 % on the development VM."""
    def targets(path):
        with open(os.path.join(ROOT, path)) as f:
            return [line.strip() for line in f if line.startswith("#pragma GCC target")]

    ext = targets("csrc/csgd_cpu_avx2.cpp")
    assert len(ext) == 1 and "avx2" in ext[0]
    assert targets("benchmarks/step/kernel_ab.cpp") == ext


@pytest.mark.skipif(csgd_ext.available_backends()["native"] is not None, reason="needs the native backend")
def test_step_ab_runs_the_build_it_names(tmp_path):
    """``step_ab.py --so LABEL=PATH`` times the extension at PATH whatever the file is called: its package copy
    loads that file (not the working tree's build through an editable install), and a process that loaded another
    build refuses to time it."""
    import shutil
    import subprocess

    import csgd_ext._C as ext
    from benchmarks.step import step_ab

    so = tmp_path / "other_build.so"
    shutil.copy(ext.__file__, so)
    d = step_ab.package_dir(str(tmp_path), "label", str(so))
    probe = "import sys; from benchmarks.step.step_ab import check_loaded; check_loaded(sys.argv[1])"

    def loads(root):
        return subprocess.run([sys.executable, "-c", probe, root], cwd=root, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=root))

    ok = loads(d)
    assert ok.returncode == 0, ok.stderr
    os.remove(os.path.join(d, "csgd_ext", os.path.basename(ext.__file__)))
    shutil.copy(so, os.path.join(d, "csgd_ext", "other_build.so"))  # the old copy: the file's own name
    bad = loads(d)
    assert bad.returncode != 0 and "step_ab:" in bad.stderr


def test_prefetch_probe_reports_every_walk_per_row_length(capsys):
    """``benchmarks/step/prefetch_probe.py`` (quoted in benchmarks/README.md) compiles and runs its probe and
    reports every walk but the in-order one (the reference) for every row length asked for."""
    import shutil

    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("needs a C compiler")
    from benchmarks.step import prefetch_probe

    assert prefetch_probe.main(["--cols", "16,64", "--mb", "2", "--rounds", "1", "--processes", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| shuffled")]
    assert len(rows) == 5 and all(r.count("x [") == 2 for r in rows)
    pairs = [line for line in out if line.startswith("| adjacent pairs in lockstep")]
    assert len(pairs) == 2 and all(r.count("x [") == 2 for r in pairs)
    with pytest.raises(SystemExit, match="multiples of 16"):
        prefetch_probe.main(["--cols", "20"])


@pytest.mark.skipif(csgd_ext.available_backends()["native"] is not None, reason="needs the native backend")
def test_flat_vs_aten_times_both_loops_on_the_same_tensors(capsys):
    """``benchmarks/step/flat_vs_aten.py`` (quoted in benchmarks/README.md): a child process times the native
    flat loop and torch._fused_sgd_, and the summary gives one ratio per process."""
    from benchmarks.step import flat_vs_aten

    res = flat_vs_aten.child("tiny", 2)
    assert set(res) == {"native", "aten"} and all(v > 0 for v in res.values())
    assert flat_vs_aten.main(["--net", "tiny", "--processes", "2", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("ratio ") == 2 and "over 2 processes" in out
