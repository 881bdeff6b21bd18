"""Plan files: reading, validating and fingerprinting the dict form of a :class:`csgd_ext.ClusterPlan`.

A plan refers to layers by module name and carries a fingerprint of the model (module names, types and
parameter/buffer shapes). Everything read from a file is checked before use: the fields against each other
(:func:`parse_group`, :func:`parse_plan`) and against the model (:func:`check_against_model`); a problem raises
ValueError naming the file, the group and the field. :mod:`csgd_ext.plan.records` builds the objects from what this
module returns.

Example::

    from csgd_ext.plan.records import plan_file as planfile
    planfile.model_fingerprint(torch.nn.Linear(2, 3))      # {'': ['Linear', {'weight': [3, 2], 'bias': [3]}]}
    d = planfile.read_plan_file("plan.json")              # the checked JSON dict (format, groups, ...)
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from torch import nn

from csgd_ext.kinds.attention import head_labels_of, lift_head_labels
from csgd_ext.plan.options import canonical_labels, check_round_to, check_target_flops
from csgd_ext.kinds.layer_kinds import BLOCKED_KINDS, CONSUMER_KINDS, PRODUCER_KINDS, conv_group_of, index_bounds, module_kind, \
    named_members

__all__ = ["FORMAT", "model_fingerprint", "fingerprint_mismatch", "parse_group", "parse_plan",
           "check_against_model", "read_plan_file"]

FORMAT = "csgd_ext.ClusterPlan/1"


def model_fingerprint(model: nn.Module) -> Dict[str, list]:
    """``{module name: [type name, {tensor name: shape}]}`` over all modules (direct params and buffers)."""
    fp = {}
    for name, m in model.named_modules():
        shapes = {k: list(v.shape) for k, v in m.named_parameters(recurse=False)}
        shapes.update({k: list(v.shape) for k, v in m.named_buffers(recurse=False) if v is not None})
        fp[name] = [type(m).__name__, shapes]
    return fp


def fingerprint_mismatch(expected: Mapping, actual: Mapping) -> Optional[str]:
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



# -- field checks --------------------------------------------------------------------------------------
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


def _group_fields(d) -> dict:
    """Self-consistency checks of one group dict; its fields as ``GroupPlan`` keyword arguments.

    Raises :class:`_FieldError`.
    """
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
            if c == -1 and d.get("heads") is not None:
                continue  # a head group's separate q, k or v projection carries only its slots' rows
            if c < 0:
                raise _FieldError(fname, f"entry {r} is {c}: channel indices must be >= 0")
            if c in seen:
                raise _FieldError(fname, f"channel {c} is mapped from root channels {seen[c]} and {r}")
            seen[c] = r
        producers[name] = idx
    heads = d.get("heads")
    if heads is not None:
        if not _is_int(heads) or heads < 1 or wb % (3 * heads):
            raise _FieldError("heads", f"must be an int >= 1 with width_before ({wb}) a multiple of 3 x heads, "
                              f"got {heads!r}")
        hd = wb // (3 * heads)
        tied = lift_head_labels(head_labels_of(labels, heads, hd), heads, hd, wb)
        if canonical_labels(labels).tolist() != tied:
            raise _FieldError("labels", "of a head group must join whole heads: row (slot, head, dim) in the "
                              "cluster (slot, cluster of head, dim)")
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
            if heads is not None and r < 2 * wb // 3 and not row:
                rows.append(row)  # a head group's q and k rows feed no consumer
                continue
            ref = wb - 1 if heads is not None else 0  # (a head group's last row is a v row)
            if not row or len(row) != len(index[ref]):
                raise _FieldError(fname, f"entry {r} lists {len(row)} input features, entry {ref} lists "
                                  f"{len(index[ref])}: every root channel needs the same (non-zero) number")
            for c in row:
                if c < 0:
                    raise _FieldError(fname, f"entry {r} holds {c}: feature indices must be >= 0")
                if c in seen:
                    raise _FieldError(fname, f"input feature {c} is listed for root channels {seen[c]} and {r}")
                seen[c] = r
            rows.append(row)
        consumers[name] = rows
    kinds: Dict[str, str] = {}
    for name, kind in kinds_d.items():
        if not isinstance(kind, str):
            raise _FieldError(f"kinds[{name!r}]", f"must be a string, got {type(kind).__name__}")
        if name in producers and kind not in PRODUCER_KINDS:
            raise _FieldError(f"kinds[{name!r}]", f"{kind!r} is not a producer kind {PRODUCER_KINDS}")
        if name in consumers and name not in producers and kind not in CONSUMER_KINDS:
            raise _FieldError(f"kinds[{name!r}]", f"{kind!r} is not a consumer kind {CONSUMER_KINDS}")
        kinds[name] = kind
    members = set(producers) | set(consumers)
    if set(kinds) != members:
        missing, extra = sorted(members - set(kinds)), sorted(set(kinds) - members)
        raise _FieldError("kinds", f"must name exactly the producers and consumers: "
                          + (f"no kind for {missing}" if missing else f"{extra} are neither"))
    if root not in members:
        raise _FieldError("root", f"{root!r} is not one of the group's producers or consumers")
    ng = d.get("conv_groups", 1)
    if not _is_int(ng) or ng < 1 or wb % ng or wa % ng:
        raise _FieldError("conv_groups", f"must be an int >= 1 dividing width_before ({wb}) and width_after "
                          f"({wa}), got {ng!r}")
    return dict(root=root, width_before=wb, width_after=wa, labels=labels, producers=producers,
                consumers=consumers, kinds=kinds, conv_groups=int(ng), heads=None if heads is None else int(heads))


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


def _check_group_against_model(g, mods: Mapping[str, nn.Module]) -> None:
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
        n_out, _ = index_bounds(mods[name], g.kinds[name])
        if n_out is not None and max(idx) >= n_out:
            raise _FieldError(f"producers[{name!r}]", f"channel {max(idx)} is out of range: {name!r} has "
                              f"{n_out} output channels")
    for name, rows in g.consumers.items():
        _, n_in = index_bounds(mods[name], g.kinds[name])
        top = max((max(r) for r in rows if r), default=-1)
        if n_in is not None and top >= n_in:
            raise _FieldError(f"consumers[{name!r}]", f"input feature {top} is out of range: {name!r} has "
                              f"{n_in} input features")
    _check_conv_groups(g, mods)


def _check_conv_groups(g, mods) -> None:
    """Clusters stay inside one convolution group of every grouped conv, each group keeping as many."""
    for field, maps in (("producers", g.producers), ("consumers", g.consumers)):
        for name, index in maps.items():
            if g.kinds[name] not in BLOCKED_KINDS:
                continue
            m = mods[name]
            kept: Dict[int, int] = {}
            for cl in g.cluster_members:
                idx = [index[r] for r in cl] if field == "producers" else [i for r in cl for i in index[r]]
                gs = {conv_group_of(m, i, field == "producers") for i in idx}
                if len(gs) != 1:
                    raise _FieldError(f"{field}[{name!r}]", f"a cluster (root channels {cl[:6]}) spans "
                                      f"convolution groups {sorted(gs)} of grouped conv {name!r}")
                cg = gs.pop()
                kept[cg] = kept.get(cg, 0) + 1
            if len(set(kept.values())) > 1:
                raise _FieldError(f"{field}[{name!r}]", f"keeps {sorted(set(kept.values()))} channels in different "
                                  f"convolution groups of {name!r}: every group must keep the same number")


def _check_plan_against_model(plan, model: nn.Module, parameters) -> None:
    """Group fields against ``model``, channels claimed by two groups, ``skipped`` names, ``parameters``."""
    mods = named_members(model)
    owner: Dict[Tuple[str, str, int], int] = {}
    for i, g in enumerate(plan.groups):
        where = f"group {i} (root {g.root!r})"
        try:
            _check_group_against_model(g, mods)
        except _FieldError as e:
            raise e.at(where) from None
        claims = [("producers", n, c) for n, idx in g.producers.items() for c in idx if c >= 0]
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


def _meta_options(meta: Optional[Mapping]) -> Optional[dict]:
    """``meta`` with the planning options ``target_flops`` and ``round_to`` checked (None when a file written
    before they existed lacks them)."""
    if meta is None:
        return None
    meta = dict(meta)
    for key, check in (("target_flops", check_target_flops), ("round_to", check_round_to)):
        meta.setdefault(key, None)
        if meta[key] is not None:
            try:
                check(meta[key])
            except ValueError as e:
                raise _FieldError(f"meta[{key!r}]", str(e)) from None
    return meta


def _check_round_to_widths(groups: List[dict], meta: Optional[Mapping]) -> None:
    """With ``meta['round_to']``, every group's kept width is a multiple of it or its whole width."""
    n = (meta or {}).get("round_to")
    for i, g in enumerate(groups if n else ()):
        if g["width_after"] % n and g["width_after"] != g["width_before"]:
            raise _FieldError("width_after", f"{g['width_after']} is not a multiple of meta round_to={n} (nor the "
                              f"whole width {g['width_before']})").at(f"group {i} (root {g['root']!r})")


# -- entry points ---------------------------------------------------------------------------------------
def parse_group(d) -> dict:
    """The checked fields of one group dict (``GroupPlan`` keyword arguments); ValueError naming the field."""
    try:
        return _group_fields(d)
    except _FieldError as e:
        raise ValueError(f"malformed GroupPlan: {e}") from None


def parse_plan(d, source: Optional[str] = None) -> Tuple[List[dict], list, dict, Optional[Mapping]]:
    """``(group fields, skipped, fingerprint, meta)`` of a plan dict, every field checked against the others.

    Raises ValueError naming ``source`` (e.g. the file), the group and the field.
    """
    where = f"ClusterPlan {source}" if source else "ClusterPlan dict"
    if not isinstance(d, Mapping) or d.get("format") != FORMAT:
        raise ValueError(f"{'%s: ' % source if source else ''}not a ClusterPlan dict "
                         f"(format {FORMAT!r} expected)")
    try:
        fingerprint = _check_fingerprint(_field(d, "fingerprint", Mapping))
        meta = d.get("meta")
        if meta is not None and not isinstance(meta, Mapping):
            raise _FieldError("meta", f"must be a dict, got {type(meta).__name__}")
        meta = _meta_options(meta)
        skipped = _skipped_from(_field(d, "skipped", list))
        groups = []
        for i, gd in enumerate(_field(d, "groups", list)):
            ctx = f"group {i}" + (f" (root {gd['root']!r})" if isinstance(gd, Mapping)
                                  and isinstance(gd.get("root"), str) else "")
            try:
                groups.append(_group_fields(gd))
            except _FieldError as e:
                raise e.at(ctx) from None
        _check_round_to_widths(groups, meta)
    except _FieldError as e:
        raise ValueError(f"malformed {where}: {e}") from None
    return groups, skipped, dict(fingerprint), meta


def check_against_model(plan, model: nn.Module, parameters, source: Optional[str] = None) -> None:
    """Check a plan's groups against ``model`` (names, kinds, channel ranges), channels claimed by two groups,
    ``skipped`` names and the informational ``parameters`` ids; ValueError naming ``source``, group and field."""
    try:
        _check_plan_against_model(plan, model, parameters)
    except _FieldError as e:
        where = f"ClusterPlan {source}" if source else "ClusterPlan dict"
        raise ValueError(f"malformed {where}: {e}" + (" (an edited file?)" if source else "")) from None


def read_plan_file(path: Union[str, os.PathLike]) -> dict:
    """The JSON dict of a plan file; ValueError naming the file if it is not JSON or not a plan."""
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(path)!r} is not a ClusterPlan JSON file: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a ClusterPlan file (format {FORMAT!r} expected)")
    return d
