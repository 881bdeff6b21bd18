"""Stage 5, planning: from a model and example inputs to a :class:`~csgd_ext.plan.records.ClusterPlan`.

In the order :func:`~csgd_ext.planning.planner.plan_clusters` runs them:

* :mod:`.channel_graph` -- coupled-channel analysis: which layers share output channels (records in :mod:`.coupled`);
* :mod:`.head_groups` -- attention heads as coupled groups;
* :mod:`.numeric_check` -- merge random clusters of a copy and compare outputs: can a group merge exactly?
* :mod:`.budget` -- widths for ``round_to`` and ``target_flops``;
* :mod:`.channel_clustering` -- k-means (or even splits) of a group's channels into its kept width;
* :mod:`.planner` -- ``plan_clusters``, the driver;
* :mod:`.contiguous` -- ``contiguous_clusters``: permute channels so every cluster's members are adjacent.

Imports :mod:`csgd_ext.merging` (the numeric check merges), :mod:`csgd_ext.plan.records` and below.
"""
