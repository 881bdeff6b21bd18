"""Former name of :mod:`csgd_ext.ops.triton_worktable` (``build_plan`` is now ``build_work_table``, ``Plan`` is
``WorkTable``), kept only while ``benchmarks/perf_model_triton.py`` imports it; new code imports
:mod:`csgd_ext.ops.triton_worktable`."""

from .triton_worktable import *  # noqa: F401,F403
from .triton_worktable import WorkTable as Plan, build_work_table as build_plan  # noqa: F401
