"""Stage 3, the plan: the contract between planning, training and merging.

* :mod:`.records` -- :class:`ClusterPlan` and :class:`GroupPlan`: which channels of which layers become one;
* :mod:`.options` -- the plan options (``keep``, ``round_to``, ``target_flops``) and their one validation;
* :mod:`.plan_file` -- the JSON file form of a plan: reading, field validation, fingerprints.

Imports only :mod:`csgd_ext.kinds`.
"""

from csgd_ext.plan.records import ClusterPlan, GroupPlan

__all__ = ["ClusterPlan", "GroupPlan"]
