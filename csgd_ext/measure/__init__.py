"""Measuring a model: FLOPs and parameters (:mod:`.flops`), CPU inference latency (:mod:`.latency`), and the
progress bars long jobs show (:mod:`.progress`). Used by planning (FLOPs budgets), merging (reports), training
and the applications; imports only :mod:`csgd_ext.kinds`.
"""
