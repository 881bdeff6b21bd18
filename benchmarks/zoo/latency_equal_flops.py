"""Merged vs base CPU latency at equal FLOPs, with and without ``round_to=8``, in NCHW and channels-last.

For each model, two plans at the same ``target_flops=F``: one without rounding, one with ``round_to=8`` (every
kept width a multiple of 8). The widths come from the FLOPs allocation alone, so the plans cluster with
``method="even"`` (the default k-means gives the same widths, slower). Both are merged (no training: latency does
not depend on the weights' values), and
their FLOPs fractions are counted with :func:`csgd_ext.measure.flops.count_flops_params`, so the comparison is at
(nearly) equal FLOPs. Then ``--processes`` fresh Python processes, one after the other, each time base and both
merged models with :func:`csgd_ext.measure.latency.measure_latency_interleaved` (the three alternate round by
round, so they see the same load), for every batch size, thread count and memory layout. The table gives the
median over processes of each process's interleaved median, and the speed-up (base / merged) as the median and the
range (min-max) over processes.

Models: ResNet-50 (224 px), ResNet-56 and MobileNetV2 (32 px, CIFAR-style) from ``csgd_ext.models.get_model``,
and ``vit_ti``: a ViT-Ti/16-shaped ViT defined here (224 px, 3 heads x 64, depth 12, MLP 4x, timm-style
attention with ``F.scaled_dot_product_attention``), so no timm is needed.

Example::

    python benchmarks/zoo/latency_equal_flops.py                      # everything: ~4 min on a 2-core VM, 12 at load 8
    python benchmarks/zoo/latency_equal_flops.py --models resnet56 --threads 1 --processes 1 --budget-s 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from csgd_ext.measure.flops import count_flops_params  # noqa: E402
from csgd_ext.measure.latency import measure_latency_interleaved  # noqa: E402

#: model -> (input C,H,W, batch sizes); ResNet-50 at batch 1 only (a batch of 64 at 224 px takes ~15 s per
#: forward on one thread of the loaded development VM; --batches 1,8 adds a larger batch)
MODELS = {
    "resnet50": ((3, 224, 224), (1,)),
    "resnet56": ((3, 32, 32), (1, 64)),
    "mobilenetv2": ((3, 32, 32), (1, 64)),
    "vit_ti": ((3, 224, 224), (8,)),
}


class _Attention(nn.Module):
    """timm 1.0's ``Attention`` (fused path)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, self.attn_dim * 3)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """ViT-Ti/16 shape by default: 224 px, patch 16, dim 192, 3 heads, depth 12, MLP 768."""

    def __init__(self, dim: int = 192, heads: int = 3, depth: int = 12, mlp: int = 768, image: int = 224,
                 patch: int = 16, classes: int = 1000):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "vit_ti":
        return ViT()
    from csgd_ext.models import get_model

    return get_model(name, num_classes=1000 if name == "resnet50" else 10)


def prepare(name: str, target: float, round_to: int, path: str) -> Dict:
    """Plan (with and without rounding) and merge ``name``; save the three models to ``path``; FLOPs and widths."""
    from csgd_ext import merge, plan_clusters

    shape, _ = MODELS[name]
    x = torch.randn(1, *shape)
    base = build(name).eval()
    models, info = {"base": base}, {"flops": {}, "plan_s": {}, "widths": {}}
    flops0 = count_flops_params(base, x).flops
    for variant, r in (("plain", None), ("rounded", round_to)):
        t0 = time.perf_counter()
        plan = plan_clusters(base, x, target_flops=target, round_to=r, method="even")
        info["plan_s"][variant] = time.perf_counter() - t0
        models[variant] = merge(base, plan).eval()
        info["flops"][variant] = count_flops_params(models[variant], x).flops / flops0
        widths = [g.width_after for g in plan.groups]
        info["widths"][variant] = {"groups": len(widths), "multiple_of_8": sum(w % 8 == 0 for w in widths)}
    torch.save(models, path)
    return info


def worker(path: str, name: str, batches: List[int], threads: List[int], layouts: List[str],
           budget_s: float) -> Dict:
    """One process: every (batch, threads, layout) timed, the three models interleaved; medians in ms."""
    models = torch.load(path, weights_only=False)
    shape, _ = MODELS[name]
    out = {}
    for b in batches:
        x0 = torch.randn(b, *shape)
        for layout in layouts:
            cl = layout == "channels_last"
            ms = {k: (m.to(memory_format=torch.channels_last) if cl else m.to(memory_format=torch.contiguous_format))
                  for k, m in models.items()}
            x = x0.to(memory_format=torch.channels_last) if cl else x0.contiguous()
            for t in threads:
                probe = measure_latency_interleaved(ms, x, repeats=1, warmup=1, threads=t)
                round_s = sum(r["median_ms"] for r in probe.values()) / 1e3
                repeats = int(max(5, min(40, budget_s / max(round_s, 1e-6))))
                r = measure_latency_interleaved(ms, x, repeats=repeats, warmup=2, threads=t)
                out[f"{b}|{t}|{layout}"] = {k: v["median_ms"] for k, v in r.items()} | {"repeats": repeats}
    return out


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _fmt_speedup(values: List[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def table(results: Dict, round_to: int) -> str:
    r8 = "rounded"
    lines = [f"| model | input | batch | threads | layout | FLOPs kept, no rounding / round_to={round_to} | base ms | "
             f"merged, no rounding: ms, speed-up (range) | merged, round_to={round_to}: ms, speed-up (range) | "
             f"round_to={round_to} vs no rounding |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        shape = "x".join(map(str, MODELS[name][0][1:]))
        fl = res["info"]["flops"]
        for key in res["runs"][0]:
            b, t, layout = key.split("|")
            per = [run[key] for run in res["runs"]]
            med = {v: statistics.median(p[v] for p in per) for v in ("base", "plain", r8)}
            s1 = [p["base"] / p["plain"] for p in per]
            s8 = [p["base"] / p[r8] for p in per]
            rel = [p["plain"] / p[r8] for p in per]
            lines.append(f"| {name} | {shape} | {b} | {t} | {'NCHW' if layout == 'nchw' else 'channels-last'} | "
                         f"{fl['plain']:.3f} / {fl[r8]:.3f} | {med['base']:.2f} | "
                         f"{med['plain']:.2f}, {_fmt_speedup(s1)} | {med[r8]:.2f}, {_fmt_speedup(s8)} | "
                         f"{_fmt_speedup(rel)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--target-flops", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--batches", default=None, help="override every model's batch sizes, e.g. 1,64")
    p.add_argument("--processes", type=int, default=3, help="fresh processes, one after the other")
    p.add_argument("--budget-s", type=float, default=3.0,
                   help="seconds of timing per configuration and process (5 to 40 interleaved rounds)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--_worker", nargs=6, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        path, name, batches, threads, layouts, budget = a._worker
        print(json.dumps(worker(path, name, [int(v) for v in batches.split(",")],
                                [int(v) for v in threads.split(",")], layouts.split(","), float(budget))))
        return 0
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    for n in names:
        if n not in MODELS:
            p.error(f"--models: unknown {n!r}; choose from {', '.join(MODELS)}")
    t_start = time.perf_counter()
    results, loads = {}, [_load()]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = os.path.join(tmp, f"{name}.pt")
            info = prepare(name, a.target_flops, a.round_to, path)
            plan_s = ", ".join(f"{k} {v:.1f} s" for k, v in info["plan_s"].items())
            print(f"{name}: FLOPs kept {info['flops']}, planning {plan_s}, widths multiple of 8: {info['widths']}",
                  file=sys.stderr, flush=True)
            batches = a.batches or ",".join(map(str, MODELS[name][1]))
            runs = []
            for i in range(a.processes):
                cmd = [sys.executable, os.path.abspath(__file__), "--_worker", path, name, batches, a.threads,
                       a.layouts, str(a.budget_s)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                loads.append(_load())
                print(f"  {name}: process {i + 1}/{a.processes} done ({time.perf_counter() - t_start:.0f} s)",
                      file=sys.stderr, flush=True)
            results[name] = {"info": info, "runs": runs}
    cmd = "python benchmarks/zoo/latency_equal_flops.py" + "".join(f" {x}" for x in (argv if argv is not None
                                                                                      else sys.argv[1:]))
    print(f"Command: `{cmd}`; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, 1-minute load average {min(loads):.1f} to {max(loads):.1f} (sampled after each "
          f"process), {time.perf_counter() - t_start:.0f} s. "
          f"target_flops={a.target_flops}; each cell: median over {a.processes} processes of each process's "
          f"interleaved median (base and both merged models alternate round by round); speed-up = base / merged, "
          f"median (min-max over processes).\n")
    print(table(results, a.round_to))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
