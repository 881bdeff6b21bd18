"""The numeric check of a plan: does merging its groups leave the model's function unchanged?

Graph analysis (:mod:`csgd_ext.planning.channel_graph`) proves most groups exact from the ops on their path. Some ops make it
depend on which dim carries the channels: a permute to channels-last, a patch-embedding flatten, a slice or a
concatenation of tokens, a reduction over some dims, a LayerNorm called functionally. For those (and, as a
safety net, for every group) :func:`inexact_groups` runs the merge itself: on a float64 copy of the model
(its own dtype when a float64 copy would pass ``FP64_MAX_BYTES``; all-zero parameters such as a zero-initialized
classifier filled with small random values, :func:`fill_zero_parameters`) in eval mode it collapses random
clusters (about half the width, inside each convolution group) of the groups, merges, and compares the outputs
on the example inputs. A group whose merge changes the output by more than ``rtol`` (relative to the largest
output) is reported, found by bisection: a model whose groups all pass costs one merge and two forward passes.

Example::

    from csgd_ext.planning import numeric_check as verify
    bad = verify.inexact_groups(model, candidate_plans, torch.randn(1, 3, 32, 32))
    # {index of a group plan: "merging it changes the output by 3.1e-01 (relative) ..."}
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from csgd_ext.kinds.model_call import call_model
from csgd_ext.kinds.layer_kinds import channel_tensors, named_members
from csgd_ext.merging.merge import merge, snap_to_means
from csgd_ext.planning.channel_clustering import probe_labels
from csgd_ext.plan.records import ClusterPlan, GroupPlan

__all__ = ["inexact_groups", "fill_zero_parameters"]

#: relative output change above which a merge counts as inexact (float64; an exact merge gives ~1e-15)
RTOL_FP64 = 1e-9
#: the same when the model cannot run in float64, or is too large for a float64 copy
RTOL_FP32 = 1e-4
#: a model whose float64 copy would take more bytes than this is checked in its own dtype
FP64_MAX_BYTES = 2 * 2 ** 30


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


@torch.no_grad()
def fill_zero_parameters(m: nn.Module, seed: int = 0) -> None:
    """Give every all-zero parameter of ``m`` (a zero-initialized classifier, zero biases, zero-init residual
    norms) small seeded random values, in place. The check does this to its probe copy: exactness is a property
    of the structure, and with a zero classifier every merge would compare as exact."""
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        if p.is_floating_point() and p.numel() > 1 and not p.any():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.02)


class _Probe:
    """A float64 (else float32) eval-mode copy of the model and the example inputs."""

    def __init__(self, model: nn.Module, example_inputs):
        self.rtol = RTOL_FP64
        size = sum(t.numel() for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())
        tries = ((torch.float64, RTOL_FP64), (None, RTOL_FP32))
        if size * 8 > FP64_MAX_BYTES:  # the probe and its merge are two copies: a ViT-H in float64 is 10 GB
            tries = tries[1:]
        for dtype, rtol in tries:
            m = copy.deepcopy(model).eval()
            x = example_inputs
            if dtype is not None:
                m, x = m.to(dtype), _cast(x, dtype)
            fill_zero_parameters(m)
            try:
                with torch.no_grad():
                    call_model(m, x)
            except Exception:  # noqa: BLE001 - e.g. an op without float64 support: use the model's dtype
                continue
            self.model, self.inputs, self.rtol = m, x, rtol
            return
        raise ValueError(f"cannot run {type(model).__name__} on the example inputs in eval mode")

    @torch.no_grad()
    def check(self, groups: List[GroupPlan]) -> Optional[str]:
        """None if merging ``groups`` together is exact, else the reason. The probe model is collapsed in place
        and restored afterwards (only the clustered tensors are saved: no second copy of the model)."""
        m = self.model
        plan = ClusterPlan(m, groups, [])
        mods = named_members(m)
        saved = [(t, t.detach().clone()) for name in plan.producer_clusters()
                 for _, t in channel_tensors(mods[name], with_buffers=True)]
        try:
            snap_to_means(m, plan)
            ref = _tensors(call_model(m, self.inputs))
            out = _tensors(call_model(merge(m, plan), self.inputs))
        except Exception as e:  # noqa: BLE001 - a merge that cannot be built or run is not exact
            return f"the merged model fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        finally:
            for t, v in saved:
                t.copy_(v)
        if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
            return "the merged model's outputs have other shapes"
        scale = max([a.abs().max().item() for a in ref if a.numel()] + [1e-30])
        diff = max([(a - b).abs().max().item() for a, b in zip(ref, out) if a.numel()] + [0.0])
        if not diff <= self.rtol * scale:  # also catches NaN
            return f"merging it changes the output by {diff / scale:.1e} (relative)"
        return None


def inexact_groups(model: nn.Module, groups: Sequence[GroupPlan], example_inputs, seed: int = 0,
                   blocks: Optional[Sequence[Optional[Sequence[int]]]] = None,
                   required: Optional[Sequence[int]] = None, labels: Optional[Dict[int, List[int]]] = None,
                   units: Optional[List[List[int]]] = None) -> Dict[int, str]:
    """``{index: reason}`` for the groups of ``groups`` whose merge is not exact (see the module docstring).

    ``groups`` are :class:`GroupPlan` s of ``model`` (their labels are replaced by random probe clusters, or by
    ``labels[i]`` where given: an attention head group's clusters join whole heads); ``units`` are lists of
    group indices checked and reported together (a stream with the attention head groups tied to its width);
    ``blocks[i]`` is group ``i``'s block partition (:attr:`csgd_ext.planning.channel_graph.CoupledGroup.blocks`). When the model
    cannot be copied or run in eval mode, the groups in ``required`` (default: all) are reported: those whose
    exactness only the check can establish.
    """
    if not groups:
        return {}
    rng = np.random.default_rng(seed)
    probes = []
    for i, g in enumerate(groups):
        lab = probe_labels(g.width_before, blocks[i] if blocks is not None else None, rng)
        lab = (labels or {}).get(i, lab)
        probes.append(GroupPlan(root=g.root, width_before=g.width_before, width_after=max(lab) + 1,
                                labels=lab, producers=g.producers, consumers=g.consumers, kinds=g.kinds,
                                heads=g.heads))
    try:
        probe = _Probe(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - e.g. a model holding non-leaf tensors cannot be deep-copied
        why = f"the numeric check cannot copy or run the model ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        return {i: why for i in (range(len(groups)) if required is None else required)}
    bad: Dict[int, str] = {}

    units = units if units is not None else [[i] for i in range(len(probes))]

    def bisect(idx: List[int]) -> None:
        why = probe.check([probes[i] for u in idx for i in units[u]])
        if why is None:
            return
        if len(idx) == 1:
            bad.update({i: why for i in units[idx[0]]})
            return
        found = len(bad)
        half = len(idx) // 2
        bisect(idx[:half])
        bisect(idx[half:])
        if len(bad) == found:  # each half merges exactly, together they do not: keep none of them
            bad.update({i: f"{why} (merged together with {len(idx) - 1} other groups)" for u in idx for i in units[u]})

    bisect(list(range(len(units))))
    return bad
