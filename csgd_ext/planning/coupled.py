"""The result records of coupled-channel analysis (:mod:`csgd_ext.planning.channel_graph`,
:mod:`csgd_ext.planning.head_groups`), and the :class:`~csgd_ext.plan.records.GroupPlan` a group becomes once clustered."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from csgd_ext.plan.records import GroupPlan

__all__ = ["Member", "CoupledGroup"]


@dataclass
class Member:
    """One layer of a coupled group. ``index``: see the module docstring."""

    name: str
    kind: str
    index: list


@dataclass
class CoupledGroup:
    """A set of coupled channels: ``width`` root channels shared by ``producers`` and read by ``consumers``."""

    root: str
    width: int
    producers: List[Member] = field(default_factory=list)
    consumers: List[Member] = field(default_factory=list)
    #: ``blocks[r]``: the block of root channel ``r``: its convolution group in the group's grouped convs and
    #: its chunk of the splits on the path (clusters stay inside one block); None when there are neither
    blocks: Optional[List[int]] = None
    #: the number of convolution groups (of equal size, each keeping as many channels); 1 without grouped convs
    conv_groups: int = 1
    #: ops on the group's path whose exactness depends on how they move the channel dim (numeric check)
    unverified: List[str] = field(default_factory=list)
    #: ``(heads, head_dim)`` for an attention head group (:mod:`csgd_ext.kinds.attention`): its root channels are the
    #: rows of a ``(slot, head, dim)``-ordered q/k/v projection and its clusters join whole heads
    heads: Optional[Tuple[int, int]] = None
    #: a head group whose attention needs the stream to keep ``heads * head_dim`` channels: the name of the
    #: layer reading that stream (the stream group is the group with this consumer)
    tied: Optional[str] = None

    @property
    def modules(self) -> List[str]:
        return [m.name for m in self.producers] + [m.name for m in self.consumers]

    def to_plan(self, labels: List[int]) -> GroupPlan:
        """The :class:`GroupPlan` of this group with cluster ``labels`` (one per root channel)."""
        return GroupPlan(root=self.root, width_before=self.width, width_after=int(max(labels)) + 1,
                         labels=list(labels), producers={p.name: list(p.index) for p in self.producers},
                         consumers={c.name: [list(x) for x in c.index] for c in self.consumers},
                         kinds={m.name: m.kind for m in self.producers + self.consumers},
                         conv_groups=self.conv_groups, heads=self.heads[0] if self.heads else None)
