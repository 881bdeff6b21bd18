"""Cluster plans: which channels of which coupled layers C-SGD pulls together, and how they merge.

The data model of planning: :class:`GroupPlan` (one coupled group and its clusters) and :class:`ClusterPlan`
(all groups, bound to a model, with the views :class:`csgd_ext.CSGD` and :func:`csgd_ext.merge` use).
:func:`csgd_ext.plan_clusters` (:mod:`csgd_ext.planning.planner`) makes one; :mod:`csgd_ext.plan.plan_file` reads and checks
the saved form.

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
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from csgd_ext.kinds.layer_kinds import BareParam, channel_tensors, cluster_ids, named_members
from csgd_ext.plan.plan_file import FORMAT, check_against_model, fingerprint_mismatch, model_fingerprint, parse_group, parse_plan, \
    read_plan_file

__all__ = ["GroupPlan", "ClusterPlan", "model_fingerprint"]


@dataclass
class GroupPlan:
    """One coupled group: ``labels[r]`` is the cluster of root channel ``r``.

    ``producers``/``consumers`` map module names to channel maps (see :mod:`csgd_ext.planning.channel_graph`);
    ``kinds`` gives each module's kind (see :mod:`csgd_ext.kinds.layer_kinds`; a bare parameter is named by its qualified
    parameter name). ``conv_groups`` > 1 when the group passes through grouped convs: each convolution group
    holds ``width_before / conv_groups`` channels and keeps ``width_after / conv_groups`` clusters.
    ``heads`` is set on an attention head group (:mod:`csgd_ext.kinds.attention`): its root channels are the rows of a
    ``(3, heads, head_dim)`` q/k/v projection, its clusters join whole heads, and its consumers read the v rows.
    """

    root: str
    width_before: int
    width_after: int
    labels: List[int]
    producers: Dict[str, List[int]] = field(default_factory=dict)
    consumers: Dict[str, List[List[int]]] = field(default_factory=dict)
    kinds: Dict[str, str] = field(default_factory=dict)
    conv_groups: int = 1
    heads: Optional[int] = None

    @property
    def modules(self) -> List[str]:
        return list(self.producers) + list(self.consumers)

    @property
    def cluster_members(self) -> List[List[int]]:
        """Root channels of each cluster (lists of channels), clusters ordered by their first (kept) member."""
        out: Dict[int, List[int]] = {}
        for r, lab in enumerate(self.labels):
            out.setdefault(lab, []).append(r)
        return sorted(out.values(), key=lambda c: c[0])

    def to_dict(self) -> dict:
        return {"root": self.root, "width_before": self.width_before, "width_after": self.width_after,
                "labels": list(map(int, self.labels)), "kinds": dict(self.kinds),
                "producers": {k: list(map(int, v)) for k, v in self.producers.items()},
                "consumers": {k: [list(map(int, x)) for x in v] for k, v in self.consumers.items()},
                "conv_groups": int(self.conv_groups), **({"heads": int(self.heads)} if self.heads else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "GroupPlan":
        """Rebuild a group from :meth:`to_dict` output, checking every field against the others.

        Raises ValueError naming the field when a field is missing or has the wrong type, ``labels`` does not
        have ``width_before`` entries covering exactly ``0 .. width_after - 1`` (no empty cluster), a channel
        map does not have one entry per root channel, repeats a channel, or a module has no (or a wrong) kind.
        The checks against a model (names exist, channel ranges) are done by :meth:`ClusterPlan.from_dict`.

        Example::

            g = GroupPlan.from_dict({"root": "conv1", "width_before": 4, "width_after": 2,
                                     "labels": [0, 0, 1, 1], "producers": {"conv1": [0, 1, 2, 3]},
                                     "consumers": {"conv2": [[0], [1], [2], [3]]},
                                     "kinds": {"conv1": "conv", "conv2": "conv"}})
            g.cluster_members   # [[0, 1], [2, 3]]
        """
        return cls(**parse_group(d))



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
        why = fingerprint_mismatch(self.fingerprint, model_fingerprint(model))
        if why:
            raise ValueError(f"this ClusterPlan does not match {type(model).__name__}: {why} "
                             "(a plan from another model, or a model that was already merged?)")

    # -- per-module views ---------------------------------------------------------------------------
    def _member_lists(self, attr: str) -> Dict[str, list]:
        """``{module: [[index of each member] of each multi-member cluster]}`` over ``GroupPlan.<attr>``."""
        out: Dict[str, list] = {}
        for g in self.groups:
            for cl in g.cluster_members:
                if len(cl) < 2:
                    continue
                for name, index in getattr(g, attr).items():
                    if attr == "producers" and index[cl[0]] < 0:
                        continue  # a head group's q, k or v projection does not carry this cluster's slot
                    out.setdefault(name, []).append([index[r] for r in cl])
        return out

    def producer_clusters(self) -> Dict[str, List[List[int]]]:
        """``{producer module: [channels of each multi-member cluster, kept channel first]}``."""
        return self._member_lists("producers")

    def consumer_clusters(self) -> Dict[str, List[List[List[int]]]]:
        """``{consumer module: [[input features of each member] of each multi-member cluster]}``."""
        return self._member_lists("consumers")

    def clustered_parameters(self, model: Optional[nn.Module] = None) -> Dict[str, Tuple[nn.Parameter, torch.Tensor]]:
        """``{parameter name: (parameter, int64 ids)}`` for every clustered producer parameter (the ids of a bare
        parameter index its channel dim, :attr:`csgd_ext.kinds.layer_kinds.BareParam.dim`)."""
        return {n: (p, ids) for n, (p, ids, _) in self._clustered(model).items()}

    def _clustered(self, model: Optional[nn.Module] = None) -> Dict[str, tuple]:
        model = self.model if model is None else model
        mods = named_members(model)
        out = {}
        for name, clusters in self.producer_clusters().items():
            m = mods[name]
            if isinstance(m, BareParam):
                p = m.param
                out[name] = (p, cluster_ids(clusters, p.shape[m.dim], p.device), m.dim)
                continue
            for pname, p in channel_tensors(m):
                out[f"{name}.{pname}" if name else pname] = (p, cluster_ids(clusters, p.shape[0], p.device), 0)
        return out

    @property
    def clusters(self) -> Dict[nn.Parameter, object]:
        """``{nn.Parameter: ids}`` for :class:`csgd_ext.CSGD` (every producer param of a clustered group);
        ``(ids, dim)`` for a parameter whose channels are not its dim 0 (a position embedding)."""
        return {p: (ids if dim == 0 else (ids, dim)) for p, ids, dim in self._clustered().values()}

    def param_groups(self, lr: float, weight_decay: float, centripetal: float,
                     vector_centripetal_scale: float = 0.1, bias_weight_decay: float = 0.0) -> List[dict]:
        """Param groups for :class:`csgd_ext.CSGD` with the official C-SGD recipe.

        Clustered kernels (conv/linear weights): ``weight_decay``, ``centripetal``. Clustered vectors (norm
        affine params, biases, layer scales, position embeddings and class tokens):
        ``centripetal * vector_centripetal_scale``, ``bias_weight_decay``. Everything
        else: ``weight_decay``, centripetal 0. Parameters are given as ``(name, param)`` pairs; empty groups
        are left out; frozen parameters (``requires_grad=False``) too.

        Example::

            opt = csgd_ext.CSGD(plan.param_groups(0.1, 1e-4, 3e-3), lr=0.1, momentum=0.9, nesterov=True,
                                clusters=plan.clusters)
        """
        clustered = {id(p): dim for p, _, dim in self._clustered().values()}
        kern, vec, rest = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in clustered:  # a kernel has several values per channel along dims 1...
                is_kernel = clustered[id(p)] == 0 and p.dim() >= 2 and p[0].numel() > 1
                (kern if is_kernel else vec).append((name, p))
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
        return {"format": FORMAT, "meta": self.meta, "fingerprint": self.fingerprint,
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
    def from_dict(cls, d: dict, model: nn.Module, *, source: Optional[str] = None) -> "ClusterPlan":
        """Rebuild a plan from :meth:`to_dict` output and bind it to ``model``.

        Every field is checked against the others and against ``model`` before anything is used: the model
        fingerprint; per group the types, ``len(labels) == width_before``, labels covering exactly
        ``0 .. width_after - 1``, channel maps with one entry per root channel and indices within the
        referenced module's actual channel counts, module names and kinds; no channel or input feature
        claimed by two groups; ``skipped`` names and the informational ``parameters`` ids. A problem raises ValueError
        naming ``source`` (e.g. the file), the group and the field.

        Example::

            plan = csgd_ext.ClusterPlan.from_dict(json.loads(text), model)
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        fields, skipped, fingerprint, meta = parse_plan(d, source)
        plan = cls(model, [GroupPlan(**f) for f in fields], skipped, fingerprint=fingerprint, meta=meta)
        try:
            plan.check_model(model)
        except ValueError as e:
            raise ValueError(f"{source}: {e}" if source else str(e)) from None
        check_against_model(plan, model, d.get("parameters"), source)
        return plan

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: nn.Module) -> "ClusterPlan":
        """Read a plan saved by :meth:`save` and bind it to ``model``.

        Raises ValueError naming the file (and the group and field) if it is not valid JSON, not a plan, does
        not match ``model`` or holds inconsistent contents (see :meth:`from_dict`).
        """
        return cls.from_dict(read_plan_file(path), model, source=f"file {os.fspath(path)!r}")

    # -- reporting ----------------------------------------------------------------------------------
    def summary(self) -> str:
        """A text table: one line per group (root, producers, consumers, width before -> after), then skips."""
        opts = "".join(f", {k}={self.meta[k]}" for k in ("target_flops", "round_to") if self.meta.get(k) is not None)
        lines = [f"ClusterPlan: {len(self.groups)} clustered groups, {len(self.skipped)} skipped "
                 f"(method={self.meta.get('method')}, seed={self.meta.get('seed')}{opts})"]
        for i, g in enumerate(self.groups):
            per = (f" ({g.conv_groups} groups x {g.width_before // g.conv_groups} -> "
                   f"{g.width_after // g.conv_groups})") if g.conv_groups > 1 else ""
            if g.heads:
                per = f" (q/k/v rows: {g.heads} heads -> {g.width_after * g.heads // g.width_before})"
            lines.append(f"  [{i}] {g.root}: {g.width_before} -> {g.width_after}{per}  producers="
                         f"{list(g.producers)} consumers={list(g.consumers)}")
        for mods, why in self.skipped:
            lines.append(f"  skipped {list(mods)}: {why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ClusterPlan({len(self.groups)} groups, {len(self.skipped)} skipped)"
