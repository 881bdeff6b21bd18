"""csgd_ext: Centripetal SGD (C-SGD) channel pruning for PyTorch.

    import csgd_ext
    plan = csgd_ext.plan_clusters(model, example_inputs, keep=0.625)
    opt = csgd_ext.CSGD(model.parameters(), lr=0.1, momentum=0.9, centripetal=3e-3, clusters=plan.clusters)
    csgd_ext.csgd(params, grads, bufs, layouts, lr=0.1, momentum=0.9)   # the same step, functional form
    small = csgd_ext.merge(model, plan)                       # after training and csgd_ext.collapse
    csgd_ext.available_backends()   # {"reference": None, "native": None or why not, "triton": ...}

The library (optimizer, planning, merge, checkpoints, training helper) is this package; the applications built
on it (the command line, the demo and its data, plots) are :mod:`csgd_ext.apps`, which the library never
imports. ``python -m csgd_ext info`` reports what was built and which backends can run.
"""

from .version import __version__
from .layout import ClusterLayout
from .ops import BackendUnavailableError, available_backends
from .optim import CSGD
from .functional import csgd
from .plan import ClusterPlan
from .planner import plan_clusters
from .merge import collapse, deviation, merge, merge_report
from .checkpoint import load_checkpoint, load_merged, save_checkpoint
from .reorder import contiguous_clusters
from .attention import AttentionRule, register_attention
from .width_attrs import register_width_attribute
from .norms import WeightedLayerNorm, WeightedRMSNorm
from . import flops, latency, models, norms  # model zoo, MACs/params counter, CPU latency
from .train import DeviationLogger, evaluate, fit

__all__ = ["CSGD", "csgd", "register_attention", "AttentionRule", "register_width_attribute", "fit", "evaluate",
           "DeviationLogger", "plan_clusters", "ClusterPlan", "contiguous_clusters",
           "deviation", "collapse", "merge", "merge_report", "save_checkpoint", "load_checkpoint", "load_merged",
           "available_backends", "BackendUnavailableError", "ClusterLayout", "__version__"]
