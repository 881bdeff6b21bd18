"""Cluster plans: which channels of which coupled layers C-SGD pulls together, and how they merge.

Example::

    import torch, csgd_ext
    plan = csgd_ext.plan_clusters(model, torch.randn(1, 3, 32, 32), keep=0.625, method="kmeans", seed=0)
    print(plan.summary())                          # per group: producers, consumers, width before -> after
    opt = csgd_ext.CSGD(plan.param_groups(lr=0.1, weight_decay=1e-4, centripetal=3e-3),
                        lr=0.1, momentum=0.9, nesterov=True, clusters=plan.clusters)
    ...                                            # train; csgd_ext.deviation(model, plan) -> 0
    plan.save("plan.json"); plan = csgd_ext.ClusterPlan.load("plan.json", model)
    small = csgd_ext.merge(model, plan)           # same function, fewer channels

A plan refers to layers by module name and carries a fingerprint of the model (module names, types and
parameter/buffer shapes); using it with a model that does not match raises a ValueError naming the mismatch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .cluster import METHODS, cluster_channels, target_width

__all__ = ["GroupPlan", "ClusterPlan", "plan_clusters", "model_fingerprint"]

_FORMAT = "csgd_ext.ClusterPlan/1"


@dataclass
class GroupPlan:
    """One coupled group: ``labels[r]`` is the cluster of root channel ``r``.

    ``producers``/``consumers`` map module names to channel maps (see :mod:`csgd_ext.graph`);
    ``kinds`` gives each module's kind (``conv``, ``linear``, ``depthwise``, ``norm``, ``prelu``).
    """

    root: str
    width_before: int
    width_after: int
    labels: List[int]
    producers: Dict[str, List[int]] = field(default_factory=dict)
    consumers: Dict[str, List[List[int]]] = field(default_factory=dict)
    kinds: Dict[str, str] = field(default_factory=dict)

    @property
    def modules(self) -> List[str]:
        return list(self.producers) + list(self.consumers)

    @property
    def clusters(self) -> List[List[int]]:
        """Root channels of each cluster, clusters ordered by their first (kept) member."""
        out: Dict[int, List[int]] = {}
        for r, lab in enumerate(self.labels):
            out.setdefault(lab, []).append(r)
        return sorted(out.values(), key=lambda c: c[0])

    def to_dict(self) -> dict:
        return {"root": self.root, "width_before": self.width_before, "width_after": self.width_after,
                "labels": list(map(int, self.labels)), "kinds": dict(self.kinds),
                "producers": {k: list(map(int, v)) for k, v in self.producers.items()},
                "consumers": {k: [list(map(int, x)) for x in v] for k, v in self.consumers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "GroupPlan":
        return cls(root=d["root"], width_before=int(d["width_before"]), width_after=int(d["width_after"]),
                   labels=[int(x) for x in d["labels"]], producers=dict(d["producers"]),
                   consumers=dict(d["consumers"]), kinds=dict(d["kinds"]))


def model_fingerprint(model: nn.Module) -> Dict[str, list]:
    """``{module name: [type name, {tensor name: shape}]}`` over all modules (direct params and buffers)."""
    fp = {}
    for name, m in model.named_modules():
        shapes = {k: list(v.shape) for k, v in m.named_parameters(recurse=False)}
        shapes.update({k: list(v.shape) for k, v in m.named_buffers(recurse=False) if v is not None})
        fp[name] = [type(m).__name__, shapes]
    return fp


def _fingerprint_mismatch(expected: Mapping, actual: Mapping) -> Optional[str]:
    for name, (typ, shapes) in expected.items():
        if name not in actual:
            return f"the model has no module {name!r} ({typ}) that the plan refers to"
        atyp, ashapes = actual[name]
        if atyp != typ and name == "":
            return f"the model is a {atyp}, the plan was made for a {typ}"
        if atyp != typ:
            return f"module {name!r} is a {atyp}, the plan expects a {typ}"
        for k, s in shapes.items():
            if k not in ashapes:
                return f"module {name!r} has no tensor {k!r}"
            if list(ashapes[k]) != list(s):
                return f"{name + '.' if name else ''}{k} has shape {tuple(ashapes[k])}, the plan expects {tuple(s)}"
    for name in actual:
        if name not in expected:
            return f"the model has a module {name!r} that the plan does not know"
    return None


class ClusterPlan:
    """The result of :func:`plan_clusters`: coupled groups, their clusters, and what was not clustered.

    Attributes:
        groups: list of :class:`GroupPlan` (clustered groups, ``width_after <= width_before``).
        skipped: list of ``(module names, reason)`` for groups left unclustered.
        model: the model the plan is bound to (its parameters are the keys of :attr:`clusters`).
    """

    def __init__(self, model: nn.Module, groups: List[GroupPlan], skipped: List[Tuple[Tuple[str, ...], str]],
                 fingerprint: Optional[dict] = None, meta: Optional[dict] = None):
        self.model = model
        self.groups = groups
        self.skipped = [(tuple(m), str(r)) for m, r in skipped]
        self.fingerprint = fingerprint if fingerprint is not None else model_fingerprint(model)
        self.meta = dict(meta or {})

    # -- checks -------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError (naming the first mismatch) if ``model`` is not the architecture of this plan."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        why = _fingerprint_mismatch(self.fingerprint, model_fingerprint(model))
        if why:
            raise ValueError(f"this ClusterPlan does not match {type(model).__name__}: {why} "
                             "(a plan from another model, or a model that was already merged?)")

    # -- per-module views ---------------------------------------------------------------------------
    def producer_clusters(self) -> Dict[str, List[List[int]]]:
        """``{producer module: [channels of each multi-member cluster, kept channel first]}``."""
        out: Dict[str, List[List[int]]] = {}
        for g in self.groups:
            for cl in g.clusters:
                if len(cl) < 2:
                    continue
                for name, index in g.producers.items():
                    out.setdefault(name, []).append([index[r] for r in cl])
        return out

    def consumer_clusters(self) -> Dict[str, List[List[List[int]]]]:
        """``{consumer module: [[input features of each member] of each multi-member cluster]}``."""
        out: Dict[str, list] = {}
        for g in self.groups:
            for cl in g.clusters:
                if len(cl) < 2:
                    continue
                for name, index in g.consumers.items():
                    out.setdefault(name, []).append([index[r] for r in cl])
        return out

    def clustered_parameters(self, model: Optional[nn.Module] = None) -> Dict[str, Tuple[nn.Parameter, torch.Tensor]]:
        """``{parameter name: (parameter, int64 ids)}`` for every clustered producer parameter."""
        model = self.model if model is None else model
        mods = dict(model.named_modules())
        out = {}
        for name, clusters in self.producer_clusters().items():
            m = mods[name]
            for pname, p in m.named_parameters(recurse=False):
                if p.dim() == 0 or (isinstance(m, nn.PReLU) and p.numel() == 1):
                    continue
                ids = torch.arange(p.shape[0], dtype=torch.int64)
                for cl in clusters:
                    ids[cl] = int(cl[0])
                _, ids = torch.unique(ids, return_inverse=True)
                out[f"{name}.{pname}" if name else pname] = (p, ids.to(p.device))
        return out

    @property
    def clusters(self) -> Dict[nn.Parameter, torch.Tensor]:
        """``{nn.Parameter: ids}`` for :class:`csgd_ext.CSGD` (every producer param of a clustered group)."""
        return {p: ids for p, ids in self.clustered_parameters().values()}

    def param_groups(self, lr: float, weight_decay: float, centripetal: float,
                     vector_centripetal_scale: float = 0.1, bias_weight_decay: float = 0.0) -> List[dict]:
        """Param groups for :class:`csgd_ext.CSGD` with the official C-SGD recipe.

        Clustered kernels (conv/linear weights): ``weight_decay``, ``centripetal``. Clustered vectors (norm
        affine params, biases): ``centripetal * vector_centripetal_scale``, ``bias_weight_decay``. Everything
        else: ``weight_decay``, centripetal 0. Parameters are given as ``(name, param)`` pairs; empty groups
        are left out; frozen parameters (``requires_grad=False``) too.

        Example::

            opt = csgd_ext.CSGD(plan.param_groups(0.1, 1e-4, 3e-3), lr=0.1, momentum=0.9, nesterov=True,
                                clusters=plan.clusters)
        """
        clustered = {id(p) for p, _ in self.clustered_parameters().values()}
        kern, vec, rest = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in clustered:
                (kern if p.dim() >= 2 else vec).append((name, p))
            else:
                rest.append((name, p))
        groups = [
            {"params": kern, "lr": lr, "weight_decay": weight_decay, "centripetal": centripetal},
            {"params": vec, "lr": lr, "weight_decay": bias_weight_decay,
             "centripetal": centripetal * vector_centripetal_scale},
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "centripetal": 0.0},
        ]
        return [g for g in groups if g["params"]]

    # -- persistence --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "meta": self.meta, "fingerprint": self.fingerprint,
                "groups": [g.to_dict() for g in self.groups],
                # informational: the CSGD cluster ids per parameter name (rebuilt from "groups" on load)
                "parameters": {n: ids.tolist() for n, (_, ids) in self.clustered_parameters().items()},
                "skipped": [[list(m), r] for m, r in self.skipped]}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the plan as JSON (module names, parameter names, clusters, model fingerprint)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: dict, model: nn.Module) -> "ClusterPlan":
        """Rebuild a plan from :meth:`to_dict` output and bind it to ``model`` (ValueError if it does not match)."""
        if not isinstance(d, Mapping) or d.get("format") != _FORMAT:
            raise ValueError(f"not a ClusterPlan dict (format {_FORMAT!r} expected)")
        try:
            groups = [GroupPlan.from_dict(g) for g in d["groups"]]
            skipped = [(tuple(m), r) for m, r in d["skipped"]]
            fingerprint = d["fingerprint"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed ClusterPlan dict: {type(e).__name__}: {e}") from None
        plan = cls(model, groups, skipped, fingerprint=fingerprint, meta=d.get("meta"))
        plan.check_model(model)
        return plan

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: nn.Module) -> "ClusterPlan":
        """Read a plan saved by :meth:`save` and bind it to ``model`` (ValueError if it does not match)."""
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)!r} is not a ClusterPlan JSON file: {e}") from None
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a ClusterPlan file (format {_FORMAT!r} expected)")
        return cls.from_dict(d, model)

    # -- reporting ----------------------------------------------------------------------------------
    def summary(self) -> str:
        """A text table: one line per group (root, producers, consumers, width before -> after), then skips."""
        lines = [f"ClusterPlan: {len(self.groups)} clustered groups, {len(self.skipped)} skipped "
                 f"(method={self.meta.get('method')}, seed={self.meta.get('seed')})"]
        for i, g in enumerate(self.groups):
            lines.append(f"  [{i}] {g.root}: {g.width_before} -> {g.width_after}  producers="
                         f"{list(g.producers)} consumers={list(g.consumers)}")
        for mods, why in self.skipped:
            lines.append(f"  skipped {list(mods)}: {why}")
        return "\n".join(lines)

    def report(self, example_inputs) -> dict:
        """Widths per group and the model's params/FLOPs before and after :func:`csgd_ext.merge`.

        Returns ``{"groups": [{root, width_before, width_after}], "params_before", "params_after",
        "macs_before", "macs_after", "flops_before", "flops_after", "skipped"}`` (MACs per sample as counted
        by ``csgd_ext.flops.count_flops_params``, else torch-pruning's ``count_ops_and_params``; FLOPs = 2 MACs).
        """
        from .merge import merge

        small = merge(self.model, self)
        mb, pb = count_flops_params(self.model, example_inputs)
        ma, pa = count_flops_params(small, example_inputs)
        return {"groups": [{"root": g.root, "width_before": g.width_before, "width_after": g.width_after}
                           for g in self.groups],
                "params_before": pb, "params_after": pa, "macs_before": mb, "macs_after": ma,
                "flops_before": 2 * mb, "flops_after": 2 * ma,
                "skipped": [(list(m), r) for m, r in self.skipped]}

    def __repr__(self) -> str:
        return f"ClusterPlan({len(self.groups)} groups, {len(self.skipped)} skipped)"


def count_flops_params(model: nn.Module, example_inputs) -> Tuple[int, int]:
    """``(macs, params)`` with ``csgd_ext.flops`` when available, else torch-pruning's counter (MACs)."""
    try:
        from .flops import count_flops_params as _count  # written in parallel; optional here
    except ImportError:
        _count = None
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            if _count is not None:
                res = _count(model, example_inputs)
                return int(res.macs), int(res.params)
            import torch_pruning as tp

            flops, params = tp.utils.count_ops_and_params(model, example_inputs)
            return int(flops), int(params)
    finally:
        model.train(was)


def _group_features(model_mods: Dict[str, nn.Module], g) -> torch.Tensor:
    feats = []
    n = g.width
    for mem in g.producers:
        if mem.kind not in ("conv", "linear", "depthwise"):
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
    from tqdm.auto import tqdm

    from .graph import analyze

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(keep, Mapping):
        if not keep:
            raise ValueError("keep is an empty dict: name at least one producer module")
        mods = dict(model.named_modules())
        for k, v in keep.items():
            if not isinstance(k, str):
                raise TypeError(f"keep dict keys must be module names (str), got {type(k).__name__}")
            if k not in mods:
                raise ValueError(f"keep names {k!r}, which is not a module of {type(model).__name__}")
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"keep[{k!r}] must be an int width, got {type(v).__name__}")
    else:
        target_width(keep, 1, "keep")  # validates the fraction early

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
        widths = {gi: target_width(keep, g.width, "keep") for gi, g in enumerate(ok)}

    mods = dict(model.named_modules())
    plans: List[GroupPlan] = []
    for gi, g in enumerate(tqdm(ok, desc="csgd_ext: clustering groups", disable=len(ok) < 16, leave=False)):
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
