"""``benchmarks/step/perf_model_triton.py``: the Triton model rows come from the backend's own work table (new design)
and from the c01eeaf algorithm (old design), and respond to what they model."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.step import perf_model_triton as pm  # noqa: E402
from csgd_ext.optim.row_layout import build_layout  # noqa: E402
from csgd_ext.optim.ops import triton_worktable as tw  # noqa: E402

KEYS = {"design", "bytes", "programs", "launches", "lanes_used_frac", "bytes_per_load", "predicted_us"}


def _small_net(keep_one=False):
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 7, 7), (64,), (64,), (256, 64, 1, 1), (256,), (512, 256, 3, 3), (1000, 2048), (1000,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    layouts = []
    for s in shapes:
        if len(s) == 2:
            layouts.append(None)
        else:
            ids = torch.arange(s[0]) if keep_one else torch.randint(0, max(1, s[0] * 5 // 8), (s[0],), generator=g)
            layouts.append(build_layout(ids))
    return params, layouts


def test_rows_have_the_keys_and_the_new_row_is_the_backends_work_table():
    params, layouts = _small_net()
    old, new = pm.triton_rows(params, layouts, bandwidth_gbs=4300)
    assert KEYS <= set(old) and KEYS <= set(new)
    assert (old["design"], new["design"]) == ("triton (old)", "triton (new)")
    # old: one launch per dtype, BLOCK = 1024 (the classifier's 2,048,000 columns), 2 items per program
    assert old["launches"] == 1 and "[2, 1024]" in old["tile"]
    sizes, widths, R, block = pm.old_tables(pm._entries(params, layouts)[torch.float32], 4)
    assert (R, block) == (2, 1024) and old["programs"] == -(-sizes.numel() // R)
    # new: exactly the launches and programs of triton_worktable.build_work_table on the same entries
    table = tw.build_work_table(pm._entries(params, layouts)[torch.float32], torch.float32, torch.device("cpu"))
    assert new["launches"] == len(table.launches)
    assert new["programs"] == sum(ln.programs for ln in table.launches)
    # same compulsory bytes (20 B per fp32 element), the new design uses far more of its lanes
    n = sum(p.numel() for p in params)
    assert old["data_bytes"] == new["data_bytes"] == 20 * n
    assert new["lanes_used_frac"] > 0.9 and old["lanes_used_frac"] < 0.7  # BN clusters: 1 of 1024 lanes
    assert old["bytes_per_load"] == 4.0 and new["bytes_per_load"] > 12
    assert new["predicted_us"] >= new["ideal_us"] - 1e-9 and old["predicted_us"] >= old["ideal_us"] - 1e-9


def test_singletons_are_one_flat_launch_and_bandwidth_scales_the_time():
    params, layouts = _small_net(keep_one=True)
    _, new = pm.triton_rows(params, layouts, bandwidth_gbs=4300)
    assert new["launches"] == 1 and set(new["classes"]) == {"flat"}
    _, slow = pm.triton_rows(params, layouts, bandwidth_gbs=1000)
    assert slow["t_dram_us"] > 4 * new["t_dram_us"]
