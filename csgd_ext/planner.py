"""The planner: find a model's coupled channel groups and cluster each one down to its kept width.

:func:`plan_clusters` traces the model (:func:`csgd_ext.graph.analyze`), sets each group's target width from
``keep`` (:func:`check_keep` is the one place ``keep`` is validated: a fraction in (0, 1] or a dict of
widths), clusters the channels on their producers' kernels (:mod:`csgd_ext.cluster`) and returns a
:class:`csgd_ext.ClusterPlan`.

Example::

    import torch, csgd_ext
    plan = csgd_ext.plan_clusters(model, torch.randn(1, 3, 32, 32), keep=0.625, seed=0)
    csgd_ext.planner.target_width(0.625, 16)      # 10 channels kept of 16
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from .cluster import METHODS, cluster_channels
from .graph import analyze
from .layers import KERNEL_KINDS
from .plan import ClusterPlan, GroupPlan
from .progress import progress

__all__ = ["plan_clusters", "check_keep", "target_width"]


def check_keep(keep, where: str = "keep"):
    """``keep`` if it is a fraction in (0, 1] or a non-empty dict ``{module name: int width}``; else
    TypeError/ValueError naming ``where`` (a CLI passes its flag, e.g. ``"--keep"``). Whether the dict's names
    and widths fit a model is checked by :func:`plan_clusters`, which knows the model.

    Example::

        check_keep(0.625)     # 0.625
        check_keep(1.5)       # ValueError: keep must be in (0, 1], got 1.5
    """
    if isinstance(keep, Mapping):
        if not keep:
            raise ValueError(f"{where} is an empty dict: name at least one producer module")
        for k, v in keep.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} dict keys must be module names (str), got {type(k).__name__}")
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{where}[{k!r}] must be an int width, got {type(v).__name__}")
        return keep
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{where} must be a float in (0, 1] or a dict {{module name: width}}, got "
                        f"{type(keep).__name__}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{where} must be in (0, 1], got {keep}")
    return keep


def target_width(keep: float, n: int) -> int:
    """``max(1, round(keep * n))`` channels kept of ``n`` for a fraction ``keep`` in (0, 1].

    >>> target_width(0.625, 16), target_width(0.01, 16)
    (10, 1)
    """
    keep = check_keep(keep)
    return max(1, min(n, int(round(keep * n))))


def _group_features(model_mods: Dict[str, nn.Module], g) -> torch.Tensor:
    feats = []
    n = g.width
    for mem in g.producers:
        if mem.kind not in KERNEL_KINDS:
            continue
        w = model_mods[mem.name].weight.detach().float().reshape(
            model_mods[mem.name].weight.shape[0], -1).cpu()
        idx = torch.tensor(mem.index)
        feats.append(w[idx])
    if not feats:
        for mem in g.producers:
            w = getattr(model_mods[mem.name], "weight", None)
            if w is not None and w.dim() >= 1:
                feats.append(w.detach().float().reshape(w.shape[0], -1).cpu()[torch.tensor(mem.index)])
    return torch.cat(feats, 1) if feats else torch.zeros(n, 1)


def plan_clusters(model: nn.Module, example_inputs, keep: Union[float, Mapping[str, int]] = 0.625,
                  method: str = "kmeans", seed: int = 0, ignored_layers: Sequence = ()) -> ClusterPlan:
    """Find the coupled channel groups of ``model`` and cluster each one down to its target width.

    Args:
        model: any traceable ``nn.Module`` (groups are found with torch-pruning's ``DependencyGraph``).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        keep: a fraction in (0, 1] (each group keeps ``max(1, round(keep * n))`` of its ``n`` channels) or a
            dict ``{producer module name: target width}`` (groups not named keep their width).
        method: ``"kmeans"`` (seeded scikit-learn KMeans on the producers' flattened kernels) or ``"even"``.
        seed: KMeans seed (``n_init`` is fixed at 10: same inputs, same plan).
        ignored_layers: module names or modules whose channels are not touched (with their submodules).

    Groups that reach the model output (the classifier) or contain an op without an exact merge
    (GroupNorm, LayerNorm, channel shuffle, ...) are not clustered and listed in ``plan.skipped``.

    Example::

        plan = plan_clusters(model, torch.randn(1, 3, 32, 32), keep=0.625)
        plan = plan_clusters(model, x, keep={"layer1.0.conv1": 4}, method="even")
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    keep = check_keep(keep)
    if isinstance(keep, Mapping):
        mods = dict(model.named_modules())
        for k in keep:
            if k not in mods:
                raise ValueError(f"keep names {k!r}, which is not a module of {type(model).__name__}")

    groups, skipped = analyze(model, example_inputs, ignored_layers)
    ok = []
    for g in groups:
        partial = [p.name for p in g.producers if -1 in p.index]
        bad_cons = [c.name for c in g.consumers if len({len(x) for x in c.index}) != 1 or not c.index[0]]
        if partial:
            skipped.append((tuple(g.modules), f"channels come from different layers ({partial}, e.g. a "
                            "concatenation feeding an add or a depthwise conv): clusters would span layers"))
        elif bad_cons:
            skipped.append((tuple(g.modules), f"consumers {bad_cons} do not read every channel of the group"))
        else:
            ok.append(g)

    widths: Dict[int, int] = {}
    if isinstance(keep, Mapping):
        owner = {}
        for gi, g in enumerate(ok):
            for p in g.producers:
                owner[p.name] = gi
        skipped_names = {n: why for mods, why in skipped for n in mods}
        for name in sorted(keep):
            v = int(keep[name])
            if name not in owner:
                if name in skipped_names:
                    raise ValueError(f"keep names {name!r}, whose channels are not clustered: "
                                     f"{skipped_names[name]}")
                raise ValueError(f"keep names {name!r}, which does not produce clusterable channels "
                                 "(give the name of a conv/linear/norm layer whose outputs are pruned)")
            gi = owner[name]
            n = ok[gi].width
            if not 1 <= v <= n:
                raise ValueError(f"keep[{name!r}] = {v} is out of range: the group of {name!r} has {n} "
                                 f"channels (width must be in [1, {n}])")
            if gi in widths and widths[gi][1] != v:
                other = widths[gi][0]
                raise ValueError(f"keep gives coupled layers {other!r} and {name!r} different widths "
                                 f"({widths[gi][1]} and {v}); they share channels, give one width")
            widths[gi] = (name, v)
        widths = {gi: v for gi, (_, v) in widths.items()}
    else:
        widths = {gi: target_width(keep, g.width) for gi, g in enumerate(ok)}

    mods = dict(model.named_modules())
    plans: List[GroupPlan] = []
    for gi, g in enumerate(progress(ok, desc="csgd_ext: clustering groups", enabled=len(ok) >= 16)):
        width = widths.get(gi, g.width)
        if width == g.width:
            labels = np.arange(g.width)
        elif method == "even":
            labels = cluster_channels(torch.zeros(g.width, 1), width, "even")
        else:
            labels = cluster_channels(_group_features(mods, g), width, "kmeans", seed=seed)
        plans.append(GroupPlan(root=g.root, width_before=g.width, width_after=int(width),
                               labels=[int(x) for x in labels],
                               producers={p.name: list(p.index) for p in g.producers},
                               consumers={c.name: [list(x) for x in c.index] for c in g.consumers},
                               kinds={m.name: m.kind for m in g.producers + g.consumers}))
    meta = {"method": method, "seed": seed, "keep": dict(keep) if isinstance(keep, Mapping) else keep}
    return ClusterPlan(model, plans, skipped, meta=meta)
