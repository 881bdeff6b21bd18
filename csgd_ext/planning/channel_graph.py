"""Coupled-channel analysis: which layers share output channels, and can a merge of them be exact?

:func:`coupled_groups` traces a model once with torch-pruning's ``DependencyGraph`` and turns every pruning
group into a :class:`CoupledGroup`:

* **producers** - layers whose output channels are the group's channels and are clustered: conv/linear
  output rows, depthwise and grouped convs, batch/instance norms and their subclasses (affine params and
  running stats), Layer/RMS/GroupNorms over the channels, per-channel PReLU, bare per-channel parameters
  (layer scales, position embeddings, class tokens), the table of an ``nn.Embedding`` producing the stream
  (a token model's embedding: its columns are the channels, held as a bare parameter).
  ``index[r]`` is the producer's channel for root channel ``r`` (``-1`` where the producer does not carry it,
  e.g. one input of a concatenation that feeds a residual add).
* **consumers** - conv/linear layers that read the channels; ``index[r]`` lists the consumer's input features
  for root channel ``r`` (one per channel, ``H*W`` for a flatten-to-linear head, shifted by the offset of a
  concatenation; a grouped conv's global input channel).
* **blocks** - with grouped convs or splits, the convolution group and split chunk of each root channel
  (clusters stay inside one; a consumer after a split reads only its chunk's channels).

* **attention head groups** - for every attention module a rule of :mod:`csgd_ext.kinds.attention` covers, the
  group of its q/k/v projection is a head group (:mod:`csgd_ext.planning.head_groups`): its clusters join whole heads.
  ``nn.MultiheadAttention`` reads the stream with its packed in-projection (a consumer) and produces it with its
  ``out_proj``.

Groups whose channels pass through an op for which "identical channels -> keep one, sum the consumers" is not
exact (an unbind of channels, a reduction over every dim, a layer without a merge rule such as a norm subclass
with extra work, a bare parameter whose channel dim torch-pruning puts elsewhere) or that reach the model's output are returned in
``skipped`` with the reason, never silently clustered. Ops whose exactness depends on where they move the
channel dim (permutes, reshapes other than a flatten head, slices and concatenations of tokens, partial
reductions, unknown elementwise ops) are listed in ``CoupledGroup.unverified``: the planner keeps such a group
only when the numeric check of :mod:`csgd_ext.planning.numeric_check` passes.

Example::

    groups, skipped = coupled_groups(model, torch.randn(1, 3, 32, 32))
    for g in groups:
        print(g.root, g.width, [p.name for p in g.producers], [c.name for c in g.consumers])
    for modules, reason in skipped:
        print(modules, reason)
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from csgd_ext.planning.coupled import CoupledGroup, Member
from csgd_ext.planning.head_groups import add_head_groups
from csgd_ext.kinds.layer_kinds import BARE_KIND, BLOCKED_KINDS, CONSUMER_KINDS, GROUPED_CONSUMER_KINDS, ROOT_TYPES, \
    LINEAR_KIND, STREAM_SPLIT_KINDS, TRACED_TYPES, BareParam, conv_group_of, module_kind, named_members

__all__ = ["Member", "CoupledGroup", "coupled_groups", "resolve_modules"]

# Ops (autograd node names without the "Backward<N>" suffix) that act on each channel independently:
# identical input channels give identical output channels, and the channel axis does not move.
_CHANNELWISE_OPS = {
    "Relu", "Hardtanh", "LeakyRelu", "Elu", "Gelu", "Silu", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid",
    "Mish", "Softplus", "Threshold", "Add", "Sub", "Mul", "Div", "Neg", "Clone", "Abs", "Pow", "Exp",
    "Clamp", "ClampMin", "ClampMax", "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices",
    "AvgPool1D", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "UpsampleNearest1D", "UpsampleNearest2D",
    "UpsampleNearest3D", "UpsampleBilinear2D", "UpsampleBicubic2D", "UpsampleTrilinear3D", "ConstantPadNd",
    "ReflectionPad1D", "ReflectionPad2D", "ReplicationPad1D", "ReplicationPad2D", "NativeDropout",
    "ToCopy", "Alias", "Squeeze", "Unsqueeze", "Expand", "MaxPool2D",
}
# batch-norm ops of a norm module whose output is its activation's (timm's BatchNormAct2d): per channel
_BATCHNORM_OPS = {"NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm", "NativeBatchNormLegit",
                  "NativeBatchNormLegitFunctional", "NativeBatchNormLegitNoTraining"}
_REDUCTIONS = {"Mean", "Sum", "Amax", "Amin", "Max", "Min", "Std", "Var", "Logsumexp"}
# the matrix products inside an nn.Linear called on an N-D (e.g. channels-last) input
_LINEAR_INTERNALS = {"Addmm", "Mm", "Bmm", "UnsafeView"}


def resolve_modules(model: nn.Module, items: Iterable, what: str = "ignored_layers") -> List[nn.Module]:
    """Modules named (or given) in ``items``, with all their submodules; unknown names raise ValueError."""
    by_name = dict(model.named_modules())
    known = {id(m) for m in by_name.values()}

    def lookup(it) -> nn.Module:
        if isinstance(it, nn.Module):
            if id(it) in known:
                return it
            raise ValueError(f"{what}: {type(it).__name__} module is not part of the model")
        if not isinstance(it, str):
            raise TypeError(f"{what} must hold module names or nn.Modules, got {type(it).__name__}")
        if it in by_name:
            return by_name[it]
        raise ValueError(f"{what}: {type(model).__name__} has no module named {it!r}")

    if isinstance(items, (str, nn.Module)):
        items = [items]
    return [sub for it in items for sub in lookup(it).modules()]


def _op_name(grad_fn) -> str:
    try:
        return re.sub(r"Backward\d*$", "", grad_fn.name())
    except Exception:  # no grad_fn / no name
        return "Unknown"


def _saved_ndim(grad_fn):
    for attr in ("_saved_self_sym_sizes", "_saved_self"):
        v = getattr(grad_fn, attr, None)
        if v is not None:
            return len(v.shape) if isinstance(v, torch.Tensor) else len(v)
    return None


def _reduces_channels(grad_fn) -> bool:
    """True for a reduction over every dim (a scalar): it always mixes the channels."""
    dims = getattr(grad_fn, "_saved_dim", None)
    nd = _saved_ndim(grad_fn)
    if dims is None or nd is None:
        return True  # a full reduction
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return nd < 2 or len(dims) == 0 or len({d % nd for d in dims}) == nd


def _reaches_linear(node, tp_ops, depth: int = 0) -> bool:
    """A reshape is exact only as a flatten into linear layers (maybe through channel-wise ops)."""
    if depth > 8 or not node.outputs:
        return False
    for out in node.outputs:
        m = out.module
        if isinstance(m, nn.Linear):
            continue
        if isinstance(m, tp_ops._ElementWiseOp) and _op_name(out.grad_fn) in _CHANNELWISE_OPS:
            if not _reaches_linear(out, tp_ops, depth + 1):
                return False
            continue
        return False
    return True


def _into_linear(node, tp_ops) -> bool:
    """True if every output of ``node`` is an nn.Linear, directly or through that Linear's own matmul op."""
    if not node.outputs:
        return False
    for out in node.outputs:
        if isinstance(out.module, nn.Linear):
            continue
        if (isinstance(out.module, tp_ops._ElementWiseOp) and _op_name(out.grad_fn) in _LINEAR_INTERNALS
                and out.outputs and all(isinstance(o.module, nn.Linear) for o in out.outputs)):
            continue
        return False
    return True


def _virtual_op_problem(node, tp_ops) -> Tuple[Optional[str], Optional[str]]:
    """``(reason, None)`` if the traced (non-module) op cannot merge exactly, ``(None, op name)`` if whether it
    does depends on where it moves or reads the channel dim (a permute, a reshape, a slice of tokens, a
    reduction: the numeric check of :mod:`csgd_ext.planning.numeric_check` decides), ``(None, None)`` if it keeps a merge
    exact."""
    m = node.module
    name = _op_name(node.grad_fn)
    if isinstance(m, tp_ops._OutputOp):
        return "its channels reach the model output (an output layer's channels are never pruned)", None
    if isinstance(m, tp_ops._ConcatOp):
        nd = _saved_ndim(node.grad_fn)
        dim = getattr(node.grad_fn, "_saved_dim", 1)
        if nd is not None and dim % max(nd, 1) != 1 and dim != 1:
            return None, f"Cat(dim={dim})"  # e.g. a class token joining the tokens of a channels-last stream
        return None, None
    if isinstance(m, tp_ops._ExpandOp):
        return None, None
    if isinstance(m, tp_ops._ReshapeOp):
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        if sizes is not None and (len(sizes) <= 2 or all(int(s) == 1 for s in sizes[2:])):
            return None, None  # (N, C) <-> (N, C, 1, 1): channels do not move
        if _reaches_linear(node, tp_ops) or _into_linear(node, tp_ops):
            return None, None  # a flatten head, or an nn.Linear flattening its channels-last input
        return None, name  # a patch-embedding flatten keeps the channels; a channel shuffle does not
    if isinstance(m, tp_ops._UnbindOp):
        return f"{name} (unbind of channels, e.g. the q, k, v of an attention no rule covers: see " \
               "csgd_ext.register_attention)", None
    if isinstance(m, tp_ops._SplitOp):
        if not getattr(m, "offsets", None):
            return f"{name} (a split whose chunk sizes are unknown: cluster members may land in different " \
                   "branches)", None
        return None, (None if getattr(node.grad_fn, "_saved_dim", 1) == 1 else name)  # clusters stay in chunks
    if isinstance(m, tp_ops._SliceOp):
        return None, name  # a slice of tokens keeps every channel; a slice of channels splits clusters
    if isinstance(m, tp_ops._ElementWiseOp):
        if name in _CHANNELWISE_OPS or name in _BATCHNORM_OPS:
            return None, None
        if name in _LINEAR_INTERNALS and node.outputs and all(isinstance(o.module, nn.Linear)
                                                               for o in node.outputs):
            return None, None  # the matmul inside an nn.Linear call on an N-D input
        if name in _REDUCTIONS and _reduces_channels(node.grad_fn):
            return f"{name} reduces over every dim including the channels: no exact merge", None
        return None, name  # permutes, reductions over some dims, layer norms, selects, unknown ops
    return f"{type(m).__name__} (no exact merge rule)", None


def _order_split_outputs(DG, tp) -> None:
    """Put each split node's outputs in chunk order and redo its index mapping.

    torch-pruning maps the ``i``-th entry of ``node.outputs`` to the ``i``-th chunk, but lists the outputs in the
    order its graph walk met them, which can be another order: the consumers of two chunks would swap. The
    chunk an output reads is the ``output_nr`` of its edge to the split in the autograd graph."""
    for node in list(DG.module2node.values()):
        if not isinstance(node.module, tp.ops._SplitOp) or len(node.outputs) < 2:
            continue
        chunk = {}
        for out in node.outputs:
            nrs = [nr for f, nr in getattr(out.grad_fn, "next_functions", ()) if f is node.grad_fn]
            if len(set(nrs)) != 1:
                break  # an output reading several chunks: leave torch-pruning's mapping
            chunk[out] = nrs[0]
        else:
            order = sorted(node.outputs, key=chunk.__getitem__)
            if order != node.outputs:
                node.outputs[:] = order
                tp.dependency.index_mapping.update_split_index_mapping(DG, node)


def _trace(model, example_inputs):
    import torch_pruning as tp

    calls: Dict[nn.Module, int] = {}

    def hook(mod, inp, out):
        calls[mod] = calls.get(mod, 0) + 1

    watched = [m for m in model.modules() if isinstance(m, TRACED_TYPES)]
    handles = [m.register_forward_hook(hook) for m in watched]
    was_training = {m: m.training for m in model.modules()}
    DG = tp.DependencyGraph()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)  # tp tries model(*inputs) first: never unpack a batch
    try:
        with torch.enable_grad():
            DG.build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as e:  # noqa: BLE001 - any failure of the trace is the user's model/inputs
        raise ValueError(f"cannot trace {type(model).__name__} with the example inputs: forward or the "
                         f"autograd graph walk failed with {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in was_training.items():
            m.training = t
    _order_split_outputs(DG, tp)
    names = {m: n for n, m in model.named_modules()}
    for m in watched:
        if calls.get(m) and m not in DG.module2node and any(p.requires_grad for p in m.parameters()):
            raise ValueError(f"cannot trace {type(model).__name__}: module {names[m]!r} ({type(m).__name__}) "
                             "ran in forward but is not connected to the output through autograd "
                             "(detach(), torch.no_grad() or a non-torch op such as .numpy() inside forward)")
    if not any(isinstance(m, ROOT_TYPES) for m in DG.module2node):
        raise ValueError(f"cannot trace {type(model).__name__}: no conv/linear layer is connected to the output "
                         "through autograd (does forward detach its result or run under torch.no_grad()?)")
    reused = {m for m, c in calls.items() if c > 1}
    return DG, names, reused


def _blocks(grp: CoupledGroup, tmods: Dict[str, object], split_keys: Dict[int, tuple]) \
        -> Tuple[Optional[List[int]], int, Optional[str]]:
    """``(blocks, conv groups, reason)``: the partition of ``grp``'s root channels that clusters may not cross
    (see :attr:`CoupledGroup.blocks`): the convolution groups of its grouped convs (which must be equal in size)
    and the chunks of the splits on its path."""
    conv_keys: List[tuple] = [() for _ in range(grp.width)]
    for mem, output in [(p, True) for p in grp.producers] + [(c, False) for c in grp.consumers]:
        if mem.kind not in BLOCKED_KINDS:
            continue
        m = tmods[mem.name]
        for r in range(grp.width):
            idx = [mem.index[r]] if output else mem.index[r]
            gs = {conv_group_of(m, i, output) for i in idx}
            if len(gs) != 1:
                return None, 1, f"{mem.name!r} reads one channel in several convolution groups"
            conv_keys[r] = conv_keys[r] + (gs.pop(),)
    conv_groups = len(set(conv_keys))
    keys = [conv_keys[r] + split_keys.get(r, ()) for r in range(grp.width)]
    if len(set(keys)) == 1:
        return None, 1, None
    ids: Dict[tuple, int] = {}
    blocks = [ids.setdefault(k, len(ids)) for k in keys]
    sizes = {blocks.count(b) for b in range(len(ids))}
    if conv_groups > 1 and len(sizes) != 1:
        return None, 1, (f"its grouped convs (and splits) divide its {grp.width} channels into blocks of unequal "
                         f"sizes {sorted(sizes)}")
    return blocks, conv_groups, None


def _split_chunks(node, idxs, root_idxs, split_keys: Dict[int, tuple]) -> None:
    """Record the chunk of a split (its ``offsets``) that each root channel goes to."""
    offsets = getattr(node.module, "offsets", None)
    if not offsets:
        return
    for i, r in zip(idxs, root_idxs):
        chunk = max(k for k, o in enumerate(offsets[:-1]) if o <= int(i))
        split_keys[r] = split_keys.get(r, ()) + ((node.module.id, chunk),)


def coupled_groups(model: nn.Module, example_inputs,
                   ignored_layers: Sequence = ()) -> Tuple[List[CoupledGroup], list]:
    """Trace ``model`` and return ``(groups, skipped)``; ``skipped`` holds ``(module names, reason)`` pairs.

    Raises ValueError when the model cannot be traced (naming the module or op) or an ignored layer is unknown.
    """
    import torch_pruning as tp

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ignored = {id(m) for m in resolve_modules(model, ignored_layers)}
    DG, names, reused = _trace(model, example_inputs)
    tmods = named_members(model)
    pnames = {id(p): n for n, p in model.named_parameters()}
    groups: List[CoupledGroup] = []
    skipped: list = []
    for g in DG.get_all_groups(root_module_types=ROOT_TYPES):
        root_mod = g[0].dep.target.module
        n = len(g[0].idxs)
        root = names.get(root_mod, repr(root_mod))
        reasons: List[str] = []
        unverified: List[str] = []
        prod: Dict[str, Dict[int, set]] = {}
        cons: Dict[str, Dict[int, list]] = {}
        kinds: Dict[str, str] = {}
        involved: List[str] = []
        split_keys: Dict[int, tuple] = {}
        for item in g:
            dep = item.dep
            m = dep.target.module
            if isinstance(m, tp.ops._SplitOp):
                _split_chunks(dep.target, item.idxs, item.root_idxs, split_keys)
            if isinstance(m, nn.Parameter):
                pname = pnames.get(id(m), f"a parameter of shape {tuple(m.shape)}")
                tgt = tmods.get(pname)
                involved.append(pname if isinstance(tgt, BareParam) else pname.rpartition(".")[0])
                dim = getattr(dep.target, "pruning_dim", 0)
                if not isinstance(tgt, BareParam):
                    reasons.append(f"parameter {pname!r} is used outside its layer's forward")
                elif dim != tgt.dim:
                    reasons.append(f"parameter {pname!r} (shape {tuple(m.shape)}) carries the channels on dim "
                                   f"{dim}, not on its last non-singleton dim {tgt.dim}")
                else:
                    kinds[pname] = BARE_KIND
                    slot = prod.setdefault(pname, {})
                    for i, r in zip(item.idxs, item.root_idxs):
                        slot.setdefault(r, set()).add(int(i))
                continue
            if not isinstance(m, nn.Module) or m not in names:
                if not dep.target.inputs and not isinstance(m, tp.ops._OutputOp):
                    continue  # an op on parameters only (e.g. a linear layer's weight.t()): not on the channels
                prob, check = _virtual_op_problem(dep.target, tp.ops)
                if prob is None and not dep.target.outputs:
                    prob = "its channels reach the model output (an output layer's channels are never pruned)"
                if prob:
                    reasons.append(prob)
                elif check and check not in unverified:
                    unverified.append(check)
                continue
            if isinstance(m, nn.Embedding) and DG.is_out_channel_pruning_fn(dep.handler):
                # a token (or position) table producing the stream: its columns are the channels, a bare
                # parameter with the channels on its last dim
                name = f"{names[m]}.weight"
                involved.append(name)
                if m.max_norm is not None:
                    reasons.append(f"{names[m]!r} renormalizes its rows (max_norm): no exact merge")
                kinds[name] = BARE_KIND
                slot = prod.setdefault(name, {})
                for i, r in zip(item.idxs, item.root_idxs):
                    slot.setdefault(r, set()).add(int(i))
                continue
            name = names[m]
            if name not in involved:
                involved.append(name)
            if id(m) in ignored:
                reasons.append(f"{name!r} is in ignored_layers")
            if m in reused:
                reasons.append(f"{name!r} is called more than once in forward (shared weights)")
            kind, why = module_kind(m)
            if kind is None:
                reasons.append(f"{name!r} is a {why}")
                continue
            is_out = DG.is_out_channel_pruning_fn(dep.handler)
            if kind in STREAM_SPLIT_KINDS and is_out:
                # nn.MultiheadAttention: torch-pruning couples its input and output widths (one embed_dim); its
                # packed in-projection reads the channels, its out_proj produces them
                kinds[name] = kind
                slot = cons.setdefault(name, {})
                for i, r in zip(item.idxs, item.root_idxs):
                    slot.setdefault(r, []).append(int(i))
                name, kind = f"{name}.out_proj", LINEAR_KIND
            kinds[name] = kind
            if (is_out or kind not in CONSUMER_KINDS) and not dep.target.outputs:
                reasons.append(f"{name!r} produces a model output (an output layer's channels are never pruned)")
            if kind in CONSUMER_KINDS and not is_out:
                slot = cons.setdefault(name, {})
                for i, r in zip(item.idxs, item.root_idxs):
                    slot.setdefault(r, []).append(int(i))
            else:
                slot = prod.setdefault(name, {})
                for i, r in zip(item.idxs, item.root_idxs):
                    slot.setdefault(r, set()).add(int(i))
        if not reasons:
            for name, slot in prod.items():
                seen = {}
                for r, idx in slot.items():
                    for i in idx:
                        if len(idx) > 1 or i in seen:
                            reasons.append(f"{name!r} carries a channel more than once (no 1:1 channel map)")
                            break
                        seen[i] = r
        grp = CoupledGroup(root=root, width=n, unverified=unverified)
        if not reasons:
            for name, slot in prod.items():
                grp.producers.append(Member(name, kinds[name], [next(iter(slot[r])) if r in slot else -1
                                                                 for r in range(n)]))
            for name, slot in cons.items():
                grp.consumers.append(Member(name, kinds[name], [sorted(set(slot.get(r, []))) for r in range(n)]))
            if any(-1 in p.index for p in grp.producers if p.kind in BLOCKED_KINDS) or \
                    any(not x for c in grp.consumers if c.kind in GROUPED_CONSUMER_KINDS for x in c.index):
                reasons.append("a grouped conv carries only part of the group's channels")
            else:
                grp.blocks, grp.conv_groups, why = _blocks(grp, tmods, split_keys)
                if why:
                    reasons.append(why)
        if reasons:
            skipped.append((tuple(involved), "; ".join(dict.fromkeys(reasons))))
            continue
        groups.append(grp)
    return add_head_groups(model, example_inputs, groups, skipped, ignored, reused)
