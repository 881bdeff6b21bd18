"""csgd_ext: Centripetal SGD (C-SGD) channel pruning for PyTorch.

    import csgd_ext
    plan = csgd_ext.plan_clusters(model, example_inputs, keep=0.625)
    opt = csgd_ext.CSGD(model.parameters(), lr=0.1, momentum=0.9, centripetal=3e-3, clusters=plan.clusters)
    csgd_ext.csgd(params, grads, bufs, layouts, lr=0.1, momentum=0.9)   # the same step, functional form
    small = csgd_ext.merge(model, plan)                       # after training and csgd_ext.collapse
    csgd_ext.available_backends()   # {"reference": None, "native": None or why not, "triton": ...}

The package is a pipeline, one folder per stage; imports run one way, down this list
(``tests/test_layering.py`` enforces it):

=================  ===================================================================================
``apps/``          the commands (``python -m csgd_ext fit | prune | demo | squeeze | info``); never imported
``planning/``      model + example inputs -> :class:`ClusterPlan` (:func:`plan_clusters`)
``training/``      the training loop, :func:`deviation` / :func:`collapse`, checkpoints
``merging/``       trained model + plan -> a smaller model computing the same function (:func:`merge`)
``measure/``       FLOPs, latency, progress bars
``plan/``          the plan records and their file format: the contract between the stages
``kinds/``         what each layer kind (conv, norms, attention, ...) means to a plan and a merge
``optim/``         :class:`CSGD` over :func:`csgd`, and the step backends (``optim/ops``)
``models/``        the paper's networks
=================  ===================================================================================

``python -m csgd_ext info`` reports what was built and which backends can run.
"""

from csgd_ext.version import __version__
from csgd_ext.optim.row_layout import ClusterLayout
from csgd_ext.optim.ops import BackendUnavailableError, available_backends
from csgd_ext.optim.csgd import CSGD, csgd
from csgd_ext.kinds.attention import AttentionRule, register_attention
from csgd_ext.kinds.width_attrs import register_width_attribute
from csgd_ext.kinds.norms import WeightedLayerNorm, WeightedRMSNorm
from csgd_ext.kinds import norms  # the weighted norms a merge puts in
from csgd_ext.plan.records import ClusterPlan
from csgd_ext.measure import flops, latency  # MACs/params counter, CPU latency
from csgd_ext.merging.merge import merge, merge_report
from csgd_ext.planning.planner import plan_clusters
from csgd_ext.planning.contiguous import contiguous_clusters
from csgd_ext.training.loop import DeviationLogger, evaluate, train_model
from csgd_ext.training.monitor import collapse, deviation
from csgd_ext.training.checkpoint import load_checkpoint, load_merged, save_checkpoint
from csgd_ext import models  # the paper's networks

fit = train_model  # its earlier name, kept for users' code

__all__ = ["CSGD", "csgd", "register_attention", "AttentionRule", "register_width_attribute", "train_model", "fit",
           "evaluate", "DeviationLogger", "plan_clusters", "ClusterPlan", "contiguous_clusters",
           "deviation", "collapse", "merge", "merge_report", "save_checkpoint", "load_checkpoint", "load_merged",
           "available_backends", "BackendUnavailableError", "ClusterLayout", "WeightedLayerNorm", "WeightedRMSNorm",
           "__version__"]
