"""The CPU kernel's two copies (csrc/csgd_cpu_kernel.h): the AVX2 + FMA one, picked on CPUs that have both, and
the baseline one (CSGD_EXT_CPU_ISA=base forces it). Both write every fused multiply-add explicitly, so they
compute the same bits: this is what lets a portable build (CSGD_EXT_NATIVE_ARCH=0) keep torch SGD's bits."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import csgd_ext

pytestmark = pytest.mark.skipif(csgd_ext.available_backends()["native"] is not None,
                                reason=f"native backend unavailable: {csgd_ext.available_backends()['native']}")

# every dtype, every cluster size 1..9 on rows of 1, 15, 16, 17 and 300 columns, plus an unclustered tensor;
# one step with and one without momentum, each hyperparameter on
SCRIPT = textwrap.dedent("""
    import sys, torch, csgd_ext, csgd_ext._C
    from csgd_ext.optim.row_layout import build_layout
    from csgd_ext.optim.ops import native
    out = {"isa": torch.ops.csgd_ext.cpu_kernel_isa()}
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        shapes = [(45,), (45, 15), (45, 16), (45, 17), (45, 300), (50, 7)]
        ids = torch.repeat_interleave(torch.arange(9), torch.arange(1, 10))
        lays = [build_layout(ids[torch.randperm(45, generator=gen)]) for _ in shapes[:-1]] + [None]
        for hp in (dict(lr=0.1, momentum=0.9, dampening=0.2, nesterov=False, weight_decay=0.05, maximize=True,
                        centripetal=0.4),
                   dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=False,
                        centripetal=0.4),
                   dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.05, maximize=False,
                        centripetal=0.4)):
            ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            bufs = [torch.randn(s, generator=gen).to(dtype) for s in shapes] if hp["momentum"] else []
            native.step(ps, gs, bufs or [None] * len(ps), lays, **hp)
            out[(str(dtype), hp["nesterov"], hp["momentum"])] = ps + bufs
    torch.save(out, sys.argv[1])
""")


def run(tmp_path, isa):
    path = tmp_path / f"{isa or 'auto'}.pt"
    env = dict(os.environ)
    env.pop("CSGD_EXT_CPU_ISA", None)
    if isa:
        env["CSGD_EXT_CPU_ISA"] = isa
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


def has_avx2_fma() -> bool:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def test_both_copies_give_identical_bits(tmp_path):
    auto, base = run(tmp_path, None), run(tmp_path, "base")
    assert base["isa"] == "base"
    assert auto["isa"] == ("avx2+fma" if has_avx2_fma() else "base")
    keys = [k for k in auto if k != "isa"]
    assert len(keys) == 12
    for k in keys:
        for i, (x, y) in enumerate(zip(auto[k], base[k])):
            assert torch.equal(x, y), f"{k} tensor {i}: {(x.double() - y.double()).abs().max().item()}"
