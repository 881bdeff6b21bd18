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
            g.clusters   # [[0, 1], [2, 3]]
        """
        try:
            return _group_from_dict(d)
        except _FieldError as e:
            raise ValueError(f"malformed GroupPlan: {e}") from None

    def _check_model(self, mods: Mapping[str, nn.Module]) -> None:
        """Raise :class:`_FieldError` if a module name, kind or channel index does not fit ``mods``."""
        _check_group_against_model(self, mods)


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
    def _member_lists(self, attr: str) -> Dict[str, list]:
        """``{module: [[index of each member] of each multi-member cluster]}`` over ``GroupPlan.<attr>``."""
        out: Dict[str, list] = {}
        for g in self.groups:
            for cl in g.clusters:
                if len(cl) < 2:
                    continue
                for name, index in getattr(g, attr).items():
                    out.setdefault(name, []).append([index[r] for r in cl])
        return out

    def producer_clusters(self) -> Dict[str, List[List[int]]]:
        """``{producer module: [channels of each multi-member cluster, kept channel first]}``."""
        return self._member_lists("producers")

    def consumer_clusters(self) -> Dict[str, List[List[List[int]]]]:
        """``{consumer module: [[input features of each member] of each multi-member cluster]}``."""
        return self._member_lists("consumers")

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
        where = f"ClusterPlan {source}" if source else "ClusterPlan dict"
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(d, Mapping) or d.get("format") != _FORMAT:
            raise ValueError(f"{'%s: ' % source if source else ''}not a ClusterPlan dict "
                             f"(format {_FORMAT!r} expected)")
        try:
            fingerprint = _check_fingerprint(_field(d, "fingerprint", Mapping))
            meta = d.get("meta")
            if meta is not None and not isinstance(meta, Mapping):
                raise _FieldError("meta", f"must be a dict, got {type(meta).__name__}")
            skipped = _skipped_from(_field(d, "skipped", list))
            groups = []
            for i, gd in enumerate(_field(d, "groups", list)):
                ctx = f"group {i}" + (f" (root {gd['root']!r})" if isinstance(gd, Mapping)
                                      and isinstance(gd.get("root"), str) else "")
                try:
                    groups.append(_group_from_dict(gd))
                except _FieldError as e:
                    raise e.at(ctx) from None
        except _FieldError as e:
            raise ValueError(f"malformed {where}: {e}") from None
        plan = cls(model, groups, skipped, fingerprint=dict(fingerprint), meta=meta)
        try:
            plan.check_model(model)
        except ValueError as e:
            raise ValueError(f"{source}: {e}" if source else str(e)) from None
        try:
            _check_plan_against_model(plan, model, d.get("parameters"))
        except _FieldError as e:
            raise ValueError(f"malformed {where}: {e}" + (" (an edited file?)" if source else "")) from None
        return plan

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: nn.Module) -> "ClusterPlan":
        """Read a plan saved by :meth:`save` and bind it to ``model``.

        Raises ValueError naming the file (and the group and field) if it is not valid JSON, not a plan, does
        not match ``model`` or holds inconsistent contents (see :meth:`from_dict`).
        """
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)!r} is not a ClusterPlan JSON file: {e}") from None
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a ClusterPlan file (format {_FORMAT!r} expected)")
        return cls.from_dict(d, model, source=f"file {os.fspath(path)!r}")

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


# -- validation of plan dicts ------------------------------------------------------------------------
class _FieldError(ValueError):
    """A bad field of a plan dict; ``str()`` is ``[where, ]field 'labels': problem`` (or ``producers['conv1']``)."""

    def __init__(self, name: str, problem: str, where: str = ""):
        self.name, self.problem, self.where = name, problem, where
        shown = name if "[" in name else repr(name)  # producers['conv1'] or 'labels'
        super().__init__(f"{where + ', ' if where else ''}field {shown}: {problem}")

    def at(self, where: str) -> "_FieldError":
        return _FieldError(self.name, self.problem, where)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _field(d: Mapping, name: str, typ):
    if name not in d:
        raise _FieldError(name, "is missing")
    v = d[name]
    if not isinstance(v, typ):
        want = {list: "a list", Mapping: "a dict", str: "a string"}.get(typ, getattr(typ, "__name__", str(typ)))
        raise _FieldError(name, f"must be {want}, got {type(v).__name__}")
    return v


def _int_field(d: Mapping, name: str, lo: int) -> int:
    v = _field(d, name, object)
    if not _is_int(v):
        raise _FieldError(name, f"must be an int, got {type(v).__name__} {v!r}")
    if v < lo:
        raise _FieldError(name, f"must be >= {lo}, got {v}")
    return int(v)


def _int_list(name: str, v, length: int, what: str) -> List[int]:
    if not isinstance(v, list):
        raise _FieldError(name, f"must be a list of ints, got {type(v).__name__}")
    if len(v) != length:
        raise _FieldError(name, f"has {len(v)} entries, expected {length} ({what})")
    for j, x in enumerate(v):
        if not _is_int(x):
            raise _FieldError(name, f"entry {j} is {type(x).__name__} {x!r}, expected an int")
    return [int(x) for x in v]


def _group_from_dict(d) -> "GroupPlan":
    """Self-consistency checks of one group dict; raises :class:`_FieldError`."""
    if not isinstance(d, Mapping):
        raise _FieldError("groups", f"each group must be a dict, got {type(d).__name__}")
    root = _field(d, "root", str)
    wb = _int_field(d, "width_before", 1)
    wa = _int_field(d, "width_after", 1)
    if wa > wb:
        raise _FieldError("width_after", f"{wa} is larger than width_before {wb}")
    per_root = f"one per root channel: width_before = {wb}"
    labels = _int_list("labels", _field(d, "labels", list), wb, per_root)
    bad = [x for x in labels if not 0 <= x < wa]
    if bad:
        raise _FieldError("labels", f"label {bad[0]} is out of range: labels must lie in [0, width_after = {wa})")
    empty = sorted(set(range(wa)) - set(labels))
    if empty:
        raise _FieldError("labels", f"cluster(s) {empty[:8]} have no member: labels must cover every cluster "
                          f"0 .. {wa - 1} (width_after = {wa}), found {len(set(labels))} distinct")
    kinds_d = _field(d, "kinds", Mapping)
    prods_d = _field(d, "producers", Mapping)
    cons_d = _field(d, "consumers", Mapping)
    if not prods_d:
        raise _FieldError("producers", "is empty: a group needs at least one producer layer")
    producers: Dict[str, List[int]] = {}
    for name, index in prods_d.items():
        fname = f"producers[{name!r}]"
        if not isinstance(name, str):
            raise _FieldError("producers", f"keys must be module names (str), got {type(name).__name__}")
        idx = _int_list(fname, index, wb, per_root)
        seen: Dict[int, int] = {}
        for r, c in enumerate(idx):
            if c < 0:
                raise _FieldError(fname, f"entry {r} is {c}: channel indices must be >= 0")
            if c in seen:
                raise _FieldError(fname, f"channel {c} is mapped from root channels {seen[c]} and {r}")
            seen[c] = r
        producers[name] = idx
    consumers: Dict[str, List[List[int]]] = {}
    for name, index in cons_d.items():
        fname = f"consumers[{name!r}]"
        if not isinstance(name, str):
            raise _FieldError("consumers", f"keys must be module names (str), got {type(name).__name__}")
        if not isinstance(index, list):
            raise _FieldError(fname, f"must be a list of lists of ints, got {type(index).__name__}")
        if len(index) != wb:
            raise _FieldError(fname, f"has {len(index)} entries, expected {wb} ({per_root})")
        rows = []
        seen = {}
        for r, feats in enumerate(index):
            row = _int_list(f"{fname}[{r}]", feats, len(feats) if isinstance(feats, list) else -1,
                            "input features of the root channel")
            if not row or len(row) != len(index[0]):
                raise _FieldError(fname, f"entry {r} lists {len(row)} input features, entry 0 lists "
                                  f"{len(index[0])}: every root channel needs the same (non-zero) number")
            for c in row:
                if c < 0:
                    raise _FieldError(fname, f"entry {r} holds {c}: feature indices must be >= 0")
                if c in seen:
                    raise _FieldError(fname, f"input feature {c} is listed for root channels {seen[c]} and {r}")
                seen[c] = r
            rows.append(row)
        consumers[name] = rows
    kinds: Dict[str, str] = {}
    from .graph import PRODUCER_KINDS

    for name, kind in kinds_d.items():
        if not isinstance(kind, str):
            raise _FieldError(f"kinds[{name!r}]", f"must be a string, got {type(kind).__name__}")
        if name in producers and kind not in PRODUCER_KINDS:
            raise _FieldError(f"kinds[{name!r}]", f"{kind!r} is not a producer kind {PRODUCER_KINDS}")
        if name in consumers and name not in producers and kind not in ("conv", "linear"):
            raise _FieldError(f"kinds[{name!r}]", f"{kind!r} is not a consumer kind ('conv', 'linear')")
        kinds[name] = kind
    members = set(producers) | set(consumers)
    if set(kinds) != members:
        missing, extra = sorted(members - set(kinds)), sorted(set(kinds) - members)
        raise _FieldError("kinds", f"must name exactly the producers and consumers: "
                          + (f"no kind for {missing}" if missing else f"{extra} are neither"))
    if root not in members:
        raise _FieldError("root", f"{root!r} is not one of the group's producers or consumers")
    return GroupPlan(root=root, width_before=wb, width_after=wa, labels=labels, producers=producers,
                     consumers=consumers, kinds=kinds)


def _check_fingerprint(fp: Mapping) -> Mapping:
    for name, entry in fp.items():
        ok = (isinstance(name, str) and isinstance(entry, (list, tuple)) and len(entry) == 2
              and isinstance(entry[0], str) and isinstance(entry[1], Mapping)
              and all(isinstance(k, str) and isinstance(s, list) and all(_is_int(n) for n in s)
                      for k, s in entry[1].items()))
        if not ok:
            raise _FieldError(f"fingerprint[{name!r}]", "must be [type name, {tensor name: shape}]")
    return fp


def _skipped_from(v: list) -> List[Tuple[Tuple[str, ...], str]]:
    out = []
    for j, item in enumerate(v):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
                and all(isinstance(m, str) for m in item[0]) and isinstance(item[1], str)):
            raise _FieldError(f"skipped[{j}]", "must be [[module names], reason]")
        out.append((tuple(item[0]), item[1]))
    return out


def _channel_counts(m: nn.Module, kind: str) -> Tuple[Optional[int], Optional[int]]:
    """``(output channels, input features)`` a plan may index in ``m`` (None: no bound from the module)."""
    if kind in ("conv", "depthwise"):
        return m.out_channels, m.in_channels
    if kind == "linear":
        return m.out_features, m.in_features
    if kind == "norm":
        return m.num_features, None
    if kind == "prelu":  # a single shared slope applies to any number of channels
        return (m.num_parameters if m.num_parameters > 1 else None), None
    return None, None


def _check_group_against_model(g: "GroupPlan", mods: Mapping[str, nn.Module]) -> None:
    from .graph import module_kind

    if g.root not in mods:
        raise _FieldError("root", f"the model has no module {g.root!r}")
    for name, kind in g.kinds.items():
        if name not in mods:
            raise _FieldError(f"kinds[{name!r}]", f"the model has no module {name!r}")
        actual, why = module_kind(mods[name])
        if actual != kind:
            raise _FieldError(f"kinds[{name!r}]", f"{name!r} is a {why or actual} in the model, the plan "
                              f"says {kind!r}")
    for name, idx in g.producers.items():
        n_out, _ = _channel_counts(mods[name], g.kinds[name])
        if n_out is not None and max(idx) >= n_out:
            raise _FieldError(f"producers[{name!r}]", f"channel {max(idx)} is out of range: {name!r} has "
                              f"{n_out} output channels")
    for name, rows in g.consumers.items():
        _, n_in = _channel_counts(mods[name], g.kinds[name])
        top = max(max(r) for r in rows)
        if n_in is not None and top >= n_in:
            raise _FieldError(f"consumers[{name!r}]", f"input feature {top} is out of range: {name!r} has "
                              f"{n_in} input features")


def _check_plan_against_model(plan: "ClusterPlan", model: nn.Module, parameters) -> None:
    """Group fields against ``model``, channels claimed by two groups, ``skipped`` names, ``parameters``."""
    mods = dict(model.named_modules())
    owner: Dict[Tuple[str, str, int], int] = {}
    for i, g in enumerate(plan.groups):
        where = f"group {i} (root {g.root!r})"
        try:
            g._check_model(mods)
        except _FieldError as e:
            raise e.at(where) from None
        claims = [("producers", n, c) for n, idx in g.producers.items() for c in idx]
        claims += [("consumers", n, c) for n, rows in g.consumers.items() for row in rows for c in row]
        for key in claims:
            if owner.setdefault(key, i) != i:
                j = owner[key]
                raise _FieldError(f"{key[0]}[{key[1]!r}]", f"claims channel {key[2]} of {key[1]!r}, which group "
                                  f"{j} (root {plan.groups[j].root!r}) already holds", where)
    for mods_, _ in plan.skipped:
        for m in mods_:
            if m not in mods:
                raise _FieldError("skipped", f"the model has no module {m!r}")
    if parameters is None:
        return
    if not isinstance(parameters, Mapping):
        raise _FieldError("parameters", f"must be a dict, got {type(parameters).__name__}")
    pnames = {n for n, _ in model.named_parameters()}
    built = {n: ids.tolist() for n, (_, ids) in plan.clustered_parameters(model).items()}
    for name, ids in parameters.items():
        if name not in pnames:
            raise _FieldError("parameters", f"the model has no parameter {name!r}")
        if built.get(name) != ids:
            raise _FieldError(f"parameters[{name!r}]", "disagrees with the ids rebuilt from 'groups' "
                              "(this field is derived from 'groups': edit those instead)")
    missing = sorted(set(built) - set(parameters))
    if missing:
        raise _FieldError("parameters", f"lacks {missing[:4]}, which 'groups' cluster")


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
